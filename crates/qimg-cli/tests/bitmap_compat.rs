//! `bitmap` compared with qemu-img: the same command sequence runs on two identical images,
//! one per tool; messages, exit codes, the bitmap list and the bits must match, and the
//! images must stay clean for `qemu-img check`. Bitmaps made and filled by QEMU are
//! merged and cleared by qimg, and the result is used by qemu-img again.

mod common;

use common::*;
use qimg::qcow2::{Qcow2, Qcow2Options};
use qimg::storage::FileStorage;
use std::path::Path;
use std::sync::Arc;

/// QEMU names anonymous nodes `#blockNNN` with a number that depends on the run.
fn norm_node(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("#block") {
        out.push_str(&rest[..i + 6]);
        rest = rest[i + 6..].trim_start_matches(|c: char| c.is_ascii_digit());
    }
    out.push_str(rest);
    out
}

/// Same exit code, stdout and stderr, modulo program and node names.
#[track_caller]
fn same(ours: &Out, theirs: &Out) {
    assert_eq!(ours.stdout, theirs.stdout, "{}", ours.cmdline);
    assert_eq!(
        norm_node(&norm_ours(&ours.stderr)),
        norm_node(&norm_theirs(&theirs.stderr)),
        "{}",
        ours.cmdline
    );
    assert_eq!(ours.code(), theirs.code(), "{}", ours.cmdline);
}

fn setup(dir: &Path) {
    mk(dir, "", "img.qcow2", "64M");
    mk(dir, "cluster_size=4096", "src.qcow2", "64M");
    mk(dir, "cluster_size=2M", "big.qcow2", "64M");
    mk(dir, "compat=0.10", "v2.qcow2", "64M");
    qemu_img_ok(dir, &["bitmap", "--add", "-g", "16k", "src.qcow2", "s"]);
    qemu_img_ok(dir, &["bitmap", "--add", "img.qcow2", "q"]);
    io(
        dir,
        "qcow2",
        "src.qcow2",
        &["write 1M 100k", "write 20M 1k"],
    );
    io(dir, "qcow2", "img.qcow2", &["write 0 5k", "write 30M 64k"]);
}

fn mk(dir: &Path, opts: &str, name: &str, size: &str) {
    let mut a = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        a.extend_from_slice(&["-o", opts]);
    }
    a.extend_from_slice(&[name, size]);
    qemu_img_ok(dir, &a);
}

/// Name, enabled, granularity and set ranges of one bitmap.
type BitmapBits = (String, bool, u64, Vec<(u64, u64)>);

fn bits(path: &Path) -> Vec<BitmapBits> {
    let st = Arc::new(FileStorage::open(path, false).unwrap());
    let q = Qcow2::open(st, Qcow2Options::default()).unwrap();
    q.bitmap_list()
        .into_iter()
        .map(|b| {
            let r = q.bitmap_dirty_ranges(&b.name).unwrap_or_default();
            (b.name, b.enabled, b.granularity, r)
        })
        .collect()
}

const STEPS: &[&[&str]] = &[
    &["bitmap", "--add", "img.qcow2", "a"],
    &["bitmap", "--add", "img.qcow2", "a"],
    &["bitmap", "--add", "-g", "512", "img.qcow2", "small"],
    &["bitmap", "--add", "-g", "1000", "img.qcow2", "x"],
    &["bitmap", "--add", "-g", "4G", "img.qcow2", "x"],
    &["bitmap", "--add", "big.qcow2", "d2m"],
    &["bitmap", "--add", "src.qcow2", "d4k"],
    &["bitmap", "--add", "v2.qcow2", "x"],
    &["bitmap", "--remove", "img.qcow2", "nope"],
    &["bitmap", "--clear", "img.qcow2", "nope"],
    &["bitmap", "--enable", "img.qcow2", "nope"],
    &["bitmap", "--merge", "nope", "img.qcow2", "a"],
    &["bitmap", "--merge", "q", "img.qcow2", "nope"],
    &[
        "bitmap",
        "--merge",
        "s",
        "-b",
        "src.qcow2",
        "img.qcow2",
        "a",
    ],
    &[
        "bitmap",
        "--merge",
        "s",
        "-b",
        "src.qcow2",
        "-F",
        "raw",
        "img.qcow2",
        "a",
    ],
    &["bitmap", "--merge", "q", "img.qcow2", "small"],
    &["bitmap", "--disable", "img.qcow2", "small"],
    &[
        "bitmap",
        "--clear",
        "--merge",
        "s",
        "-b",
        "src.qcow2",
        "src.qcow2",
        "d4k",
    ],
    &[
        "bitmap",
        "--add",
        "--remove",
        "--add",
        "--disable",
        "img.qcow2",
        "tmp",
    ],
    &["bitmap", "--clear", "img.qcow2", "q"],
    &["bitmap", "--remove", "img.qcow2", "tmp"],
    &["bitmap", "--enable", "img.qcow2", "small"],
    &["bitmap", "--remove", "src.qcow2", "s"],
    &["bitmap", "img.qcow2", "a"],
];

#[test]
fn bitmap_sequence_matches_qemu_img() {
    let t = tempfile::tempdir().unwrap();
    let ours = t.path().join("ours");
    let theirs = t.path().join("theirs");
    std::fs::create_dir_all(&ours).unwrap();
    std::fs::create_dir_all(&theirs).unwrap();
    setup(&ours);
    for f in ["img.qcow2", "src.qcow2", "big.qcow2", "v2.qcow2"] {
        std::fs::copy(ours.join(f), theirs.join(f)).unwrap();
    }
    for args in STEPS {
        let a = qemu_img(&theirs, args.iter());
        let b = qimg(&ours, args.iter());
        same(&b, &a);
    }
    for f in ["img.qcow2", "src.qcow2", "big.qcow2"] {
        let ja = qemu_img_ok(&theirs, &["info", "--output=json", f]).stdout;
        let jb = qemu_img_ok(&ours, &["info", "--output=json", f]).stdout;
        let ja = parse_json(&ja)["format-specific"]["data"]["bitmaps"].clone();
        let jb = parse_json(&jb)["format-specific"]["data"]["bitmaps"].clone();
        assert_eq!(ja, jb, "{f}: bitmap list");
        assert_eq!(bits(&theirs.join(f)), bits(&ours.join(f)), "{f}: bits");
        let c = qemu_img(&ours, ["check", f]);
        assert_eq!(c.code(), Some(0), "{f}: {}", c.describe());
    }
    // QEMU goes on with what qimg stored: it writes (recording into the enabled bitmaps)
    // and merges; qimg's images still match.
    for d in [&ours, &theirs] {
        io(d, "qcow2", "img.qcow2", &["write 40M 4k"]);
        qemu_img_ok(d, &["bitmap", "--merge", "a", "img.qcow2", "q"]);
    }
    assert_eq!(
        bits(&theirs.join("img.qcow2")),
        bits(&ours.join("img.qcow2"))
    );
    let c = qemu_img(&ours, ["check", "img.qcow2"]);
    assert_eq!(c.code(), Some(0), "{}", c.describe());
}

#[test]
fn inconsistent_bitmaps_like_qemu_img() {
    let t = tempfile::tempdir().unwrap();
    let ours = t.path().join("ours");
    let theirs = t.path().join("theirs");
    std::fs::create_dir_all(&ours).unwrap();
    std::fs::create_dir_all(&theirs).unwrap();
    mk(&ours, "", "i.qcow2", "64M");
    qemu_img_ok(&ours, &["bitmap", "--add", "i.qcow2", "good"]);
    qemu_img_ok(&ours, &["bitmap", "--add", "i.qcow2", "bad"]);
    // Mark "bad" in use, as a crash would leave it: its entry is the second one.
    let p = ours.join("i.qcow2");
    let st = Arc::new(FileStorage::open(&p, false).unwrap());
    let q = Qcow2::open(st, Qcow2Options::default()).unwrap();
    let ext = q.header().bitmaps.unwrap();
    drop(q);
    let first = ext.directory_offset;
    let second = first + (24 + 4u64).div_ceil(8) * 8;
    let flags = be32(&p, second + 12);
    put_be32(&p, second + 12, flags | 1);
    std::fs::copy(&p, theirs.join("i.qcow2")).unwrap();
    for args in [
        &["bitmap", "--clear", "i.qcow2", "bad"][..],
        &["bitmap", "--enable", "i.qcow2", "bad"],
        &["bitmap", "--merge", "bad", "i.qcow2", "good"],
        &["bitmap", "--merge", "good", "i.qcow2", "bad"],
        &["bitmap", "--remove", "i.qcow2", "bad"],
    ] {
        let a = qemu_img(&theirs, args.iter());
        let b = qimg(&ours, args.iter());
        same(&b, &a);
    }
    let ja = qemu_img_ok(&theirs, &["info", "--output=json", "i.qcow2"]).stdout;
    let jb = qemu_img_ok(&ours, &["info", "--output=json", "i.qcow2"]).stdout;
    assert_eq!(
        parse_json(&ja)["format-specific"]["data"]["bitmaps"],
        parse_json(&jb)["format-specific"]["data"]["bitmaps"]
    );
    let c = qemu_img(&ours, ["check", "i.qcow2"]);
    assert_eq!(c.code(), Some(0), "{}", c.describe());
}
