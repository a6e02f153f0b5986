//! `check`, `compare`, `measure` and `convert` compared with qemu-img: same stdout, stderr
//! (modulo program name) and exit codes; converted images are read back with QEMU's tools.

mod common;

use common::*;
use std::path::{Path, PathBuf};

fn mk(cwd: &Path, opts: &str, name: &str, size: &str) {
    let mut a = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        a.extend_from_slice(&["-o", opts]);
    }
    a.extend_from_slice(&[name, size]);
    qemu_img_ok(cwd, &a);
}

// ---- small qcow2 editing helpers (16-bit refcounts, first refblock / first L2 table) -------

fn refblock0(p: &Path) -> u64 {
    let h = Qcow2Hdr::read(p);
    assert_eq!(h.refcount_order, 4, "helpers assume 16-bit refcounts");
    be64(p, h.refcount_table_offset)
}

fn set_refcount16(p: &Path, cluster: u64, v: u16) {
    write_at(p, refblock0(p) + 2 * cluster, &v.to_be_bytes());
}

fn l2_table0(p: &Path) -> u64 {
    let h = Qcow2Hdr::read(p);
    be64(p, h.l1_table_offset) & 0x00ff_ffff_ffff_fe00
}

fn l2_entry_off(p: &Path, idx: u64) -> u64 {
    l2_table0(p) + 8 * idx
}

/// An image with data in guest clusters 0..4 and a zero cluster at 4 (64 KiB clusters).
fn base_image(cwd: &Path, name: &str) -> PathBuf {
    mk(cwd, "", name, "4M");
    io(
        cwd,
        "qcow2",
        name,
        &[
            "write -P 1 0 256k",
            "write -z 256k 64k",
            "write -P 2 1M 64k",
        ],
    );
    cwd.join(name)
}

// ---- check ---------------------------------------------------------------------------------

fn check_all_forms(cwd: &Path, img: &str) {
    assert_same(cwd, &["check", img]);
    assert_same(cwd, &["check", "--output=json", img]);
    assert_same(cwd, &["check", "-f", "qcow2", "--output", "json", img]);
    assert_same(cwd, &["check", "-q", img]);
}

/// `check -r MODE` on two copies of the image (one per tool); same output and exit code, and
/// the repaired images must then be clean for qemu-img and hold the same data.
fn check_repair_same(cwd: &Path, img: &str, mode: &str) {
    let q = cwd.join("rq");
    let t = cwd.join("rt");
    std::fs::create_dir_all(&q).unwrap();
    std::fs::create_dir_all(&t).unwrap();
    std::fs::copy(cwd.join(img), q.join(img)).unwrap();
    std::fs::copy(cwd.join(img), t.join(img)).unwrap();
    let theirs = qemu_img(&q, ["check", "-r", mode, "--output=json", img]);
    let ours = qimg(&t, ["check", "-r", mode, "--output=json", img]);
    assert_outputs_equal(&ours, &theirs, &|s| s.to_string());
    let after_q = qemu_img(&q, ["check", img]);
    let after_t = qemu_img(&t, ["check", img]);
    assert_eq!(after_t.stdout, after_q.stdout, "state after repair differs");
    assert_eq!(after_t.code(), after_q.code());
    let cmp = qemu_img(cwd, ["compare", &format!("rq/{img}"), &format!("rt/{img}")]);
    assert_eq!(
        cmp.code(),
        Some(0),
        "data after repair differs: {}",
        cmp.describe()
    );
}

#[test]
fn check_clean_images() {
    let t = Tmp::new("check_clean");
    let cwd = t.path();
    base_image(cwd, "a.qcow2");
    check_all_forms(cwd, "a.qcow2");
    mk(cwd, "compat=0.10,cluster_size=4k", "b.qcow2", "4M");
    io(
        cwd,
        "qcow2",
        "b.qcow2",
        &["write -c -P 3 0 4k", "write -P 4 64k 4k"],
    );
    qemu_img_ok(cwd, &["snapshot", "-c", "s", "b.qcow2"]);
    check_all_forms(cwd, "b.qcow2");
    mk(cwd, "", "empty.qcow2", "0");
    check_all_forms(cwd, "empty.qcow2");
}

#[test]
fn check_raw_not_supported() {
    let t = Tmp::new("check_raw");
    qemu_img_ok(t.path(), &["create", "-q", "-f", "raw", "r.img", "1M"]);
    let (ours, _) = assert_same(t.path(), &["check", "-f", "raw", "r.img"]);
    assert_eq!(ours.code(), Some(63));
    assert_same(t.path(), &["check", "--output=json", "r.img"]);
}

#[test]
fn check_leak_header_refcount_2() {
    // Refcount of cluster 0 raised to 2: one leak (refcount > references), exit 3.
    let t = Tmp::new("check_leak");
    let p = base_image(t.path(), "a.qcow2");
    set_refcount16(&p, 0, 2);
    check_all_forms(t.path(), "a.qcow2");
    let (ours, _) = assert_same(t.path(), &["check", "a.qcow2"]);
    assert_eq!(ours.code(), Some(3));
    check_repair_same(t.path(), "a.qcow2", "leaks");
}

#[test]
fn check_leak_unreferenced_cluster_in_file() {
    // The file is grown by two clusters and one of them gets refcount 1 without a reference.
    let t = Tmp::new("check_leak2");
    let p = base_image(t.path(), "a.qcow2");
    let len = file_len(&p);
    let end_cluster = len.div_ceil(65536);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len((end_cluster + 2) * 65536)
        .unwrap();
    set_refcount16(&p, end_cluster, 1);
    check_all_forms(t.path(), "a.qcow2");
    check_repair_same(t.path(), "a.qcow2", "leaks");
    check_repair_same(t.path(), "a.qcow2", "all");
}

#[test]
fn check_leak_beyond_eof() {
    // A refcount for a cluster past the end of the file.
    let t = Tmp::new("check_leak3");
    let p = base_image(t.path(), "a.qcow2");
    set_refcount16(&p, 40, 1);
    check_all_forms(t.path(), "a.qcow2");
}

#[test]
fn check_corruption_refcount_zero() {
    // A referenced data cluster whose refcount is 0: corruption, exit 2.
    let t = Tmp::new("check_corrupt");
    let p = base_image(t.path(), "a.qcow2");
    let e = be64(&p, l2_entry_off(&p, 1));
    let host = e & 0x00ff_ffff_ffff_fe00;
    assert_ne!(host, 0);
    set_refcount16(&p, host / 65536, 0);
    check_all_forms(t.path(), "a.qcow2");
    let (ours, _) = assert_same(t.path(), &["check", "a.qcow2"]);
    assert_eq!(ours.code(), Some(2));
    check_repair_same(t.path(), "a.qcow2", "all");
}

#[test]
fn check_corruption_copied_flag_cleared() {
    let t = Tmp::new("check_copied");
    let p = base_image(t.path(), "a.qcow2");
    let off = l2_entry_off(&p, 2);
    put_be64(&p, off, be64(&p, off) & !(1u64 << 63));
    check_all_forms(t.path(), "a.qcow2");
    check_repair_same(t.path(), "a.qcow2", "all");
}

#[test]
fn check_corruption_double_reference() {
    // Two L2 entries point at the same host cluster (refcount 1, two references).
    let t = Tmp::new("check_double");
    let p = base_image(t.path(), "a.qcow2");
    let e0 = be64(&p, l2_entry_off(&p, 0));
    put_be64(&p, l2_entry_off(&p, 3), e0);
    check_all_forms(t.path(), "a.qcow2");
}

#[test]
fn check_corruption_l2_unaligned_and_reserved_bits() {
    let t = Tmp::new("check_unaligned");
    let p = base_image(t.path(), "a.qcow2");
    let off = l2_entry_off(&p, 1);
    put_be64(&p, off, be64(&p, off) | 0x200); // offset not cluster aligned
    let off2 = l2_entry_off(&p, 2);
    put_be64(&p, off2, be64(&p, off2) | 0x0100_0000_0000_0000); // reserved bit 56
    check_all_forms(t.path(), "a.qcow2");
}

#[test]
fn check_corruption_l2_beyond_eof() {
    let t = Tmp::new("check_l2eof");
    let p = base_image(t.path(), "a.qcow2");
    put_be64(&p, l2_entry_off(&p, 16), (1 << 63) | (1000 * 65536));
    check_all_forms(t.path(), "a.qcow2");
}

#[test]
fn check_corruption_l1_reserved_bits() {
    let t = Tmp::new("check_l1");
    let p = base_image(t.path(), "a.qcow2");
    let l1 = Qcow2Hdr::read(&p).l1_table_offset;
    put_be64(&p, l1, be64(&p, l1) | 0x0200_0000_0000_0000);
    check_all_forms(t.path(), "a.qcow2");
}

#[test]
fn check_dirty_and_corrupt_bits() {
    let t = Tmp::new("check_bits");
    let p = base_image(t.path(), "a.qcow2");
    put_be64(&p, 72, 2); // corrupt bit alone: still "No errors"
    check_all_forms(t.path(), "a.qcow2");
    check_repair_same(t.path(), "a.qcow2", "leaks");
    mk(t.path(), "lazy_refcounts=on", "l.qcow2", "4M");
    io(t.path(), "qcow2", "l.qcow2", &["write -P 1 0 128k"]);
    let l = t.join("l.qcow2");
    put_be64(&l, 72, 1); // dirty
    set_refcount16(&l, 2, 0); // stale refcount (the refblock itself)
    check_all_forms(t.path(), "l.qcow2");
}

#[test]
fn check_usage_errors() {
    let t = Tmp::new("check_usage");
    base_image(t.path(), "a.qcow2");
    assert_same(t.path(), &["check", "-r", "bogus", "a.qcow2"]);
    assert_same(t.path(), &["check", "--output=xml", "a.qcow2"]);
    assert_same(t.path(), &["check", "missing.qcow2"]);
    assert_same(t.path(), &["check"]);
    assert_same(t.path(), &["check", "a.qcow2", "a.qcow2"]);
}

// ---- compare -------------------------------------------------------------------------------

#[test]
fn compare_cases() {
    let t = Tmp::new("compare");
    let cwd = t.path();
    base_image(cwd, "a.qcow2");
    qemu_img_ok(cwd, &["convert", "-O", "raw", "a.qcow2", "a.raw"]);
    base_image(cwd, "b.qcow2");
    io(cwd, "qcow2", "b.qcow2", &["write -P 9 3000k 512"]);
    // Same content, zero-written vs unallocated.
    mk(cwd, "", "z1.qcow2", "4M");
    mk(cwd, "", "z2.qcow2", "4M");
    io(cwd, "qcow2", "z2.qcow2", &["write -z 0 1M"]);
    // Larger image whose extra part is zero, and one where it is not.
    mk(cwd, "", "big0.qcow2", "6M");
    io(
        cwd,
        "qcow2",
        "big0.qcow2",
        &["write -P 1 0 256k", "write -P 2 1M 64k"],
    );
    mk(cwd, "", "big1.qcow2", "6M");
    io(
        cwd,
        "qcow2",
        "big1.qcow2",
        &["write -P 1 0 256k", "write -P 2 1M 64k", "write -P 3 5M 4k"],
    );
    let cases: &[(&[&str], Option<i32>)] = &[
        (&["compare", "a.qcow2", "a.raw"], Some(0)),
        (
            &["compare", "-f", "qcow2", "-F", "raw", "a.qcow2", "a.raw"],
            Some(0),
        ),
        (&["compare", "a.qcow2", "b.qcow2"], Some(1)),
        (&["compare", "-s", "a.qcow2", "b.qcow2"], Some(1)),
        (&["compare", "z1.qcow2", "z2.qcow2"], Some(0)),
        (&["compare", "-s", "z1.qcow2", "z2.qcow2"], Some(1)),
        (&["compare", "a.qcow2", "big0.qcow2"], Some(0)),
        (&["compare", "big0.qcow2", "a.qcow2"], Some(0)),
        (&["compare", "a.qcow2", "big1.qcow2"], Some(1)),
        (&["compare", "-s", "a.qcow2", "big0.qcow2"], Some(1)),
        (&["compare", "-q", "a.qcow2", "b.qcow2"], Some(1)),
        (&["compare", "a.qcow2", "missing.qcow2"], Some(2)),
        (&["compare", "missing.qcow2", "a.qcow2"], Some(2)),
        (&["compare", "-f", "raw", "a.raw", "a.raw"], Some(0)),
        (&["compare", "a.qcow2"], Some(1)),
    ];
    for (args, code) in cases {
        let (ours, _) = assert_same(cwd, args);
        assert_eq!(ours.code(), *code, "{args:?}");
    }
}

// ---- measure -------------------------------------------------------------------------------

#[test]
fn measure_size() {
    let t = Tmp::new("measure_size");
    let cwd = t.path();
    let opts = [
        "",
        "cluster_size=4k",
        "cluster_size=512",
        "cluster_size=2M",
        "preallocation=metadata",
        "preallocation=full",
        "extended_l2=on",
        "refcount_bits=1",
        "refcount_bits=64",
        "compat=0.10",
        "cluster_size=512,refcount_bits=64,extended_l2=off",
    ];
    for size in ["0", "1", "1G", "100M", "1T", "12345678"] {
        for o in opts {
            for out in ["human", "json"] {
                let mut a = vec!["measure", "--output", out, "--size", size, "-O", "qcow2"];
                if !o.is_empty() {
                    a.extend_from_slice(&["-o", o]);
                }
                assert_same(cwd, &a);
            }
        }
        assert_same(cwd, &["measure", "--size", size, "-O", "raw"]);
    }
}

#[test]
fn measure_images() {
    let t = Tmp::new("measure_img");
    let cwd = t.path();
    base_image(cwd, "a.qcow2");
    qemu_img_ok(cwd, &["bitmap", "--add", "a.qcow2", "bm"]);
    io(cwd, "qcow2", "a.qcow2", &["write -P 5 2M 512k"]);
    mk(cwd, "cluster_size=4k,compat=0.10", "v2.qcow2", "3M");
    io(cwd, "qcow2", "v2.qcow2", &["write -P 6 4k 12k"]);
    qemu_img_ok(cwd, &["snapshot", "-c", "s1", "v2.qcow2"]);
    write_pseudo_random(&cwd.join("r.raw"), 2 << 20, 5);
    io(cwd, "raw", "r.raw", &["write -z 512k 512k"]);
    for img in ["a.qcow2", "v2.qcow2", "r.raw"] {
        for o in [
            "",
            "cluster_size=4k",
            "compat=0.10",
            "preallocation=full",
            "extended_l2=on",
        ] {
            for out in ["human", "json"] {
                let mut a = vec!["measure", "--output", out, "-O", "qcow2"];
                if !o.is_empty() {
                    a.extend_from_slice(&["-o", o]);
                }
                a.push(img);
                assert_same(cwd, &a);
            }
        }
        assert_same(cwd, &["measure", "-O", "raw", img]);
        assert_same(cwd, &["measure", img]);
    }
    assert_same(cwd, &["measure", "-O", "qcow2", "-l", "s1", "v2.qcow2"]);
    assert_same(cwd, &["measure", "-O", "qcow2", "-f", "raw", "r.raw"]);
    assert_same(
        cwd,
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "backing_file=a.qcow2,backing_fmt=qcow2",
            "r.raw",
        ],
    );
}

#[test]
fn measure_errors() {
    let t = Tmp::new("measure_err");
    let cwd = t.path();
    base_image(cwd, "a.qcow2");
    for args in [
        &["measure", "--size", "1G", "a.qcow2"][..],
        &["measure", "--output=foo", "--size", "1G"],
        &["measure"],
        &["measure", "--size", "1Q"],
        &["measure", "-O", "bogus", "--size", "1G"],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=1000",
            "--size",
            "1G",
        ],
        &["measure", "-O", "qcow2", "missing.qcow2"],
        &["measure", "-O", "qcow2", "--size", "3E"],
    ] {
        let (ours, _) = assert_same(cwd, args);
        assert_ne!(ours.code(), Some(0), "{args:?}");
    }
}

// ---- convert -------------------------------------------------------------------------------

/// Runs `convert ARGS` in `q/` (qemu-img) and `t/` (binary under test) with sources in the
/// parent directory. Same outputs and exit code; on success the target is checked by
/// qemu-img, compared with the source, and its allocation map (without host offsets) and
/// info must equal those of qemu-img's target.
fn convert_same(cwd: &Path, args: &[&str], target: &str, target_fmt: &str, pre: &dyn Fn(&Path)) {
    let q = cwd.join("q");
    let t = cwd.join("t");
    for d in [&q, &t] {
        let _ = std::fs::remove_dir_all(d);
        std::fs::create_dir(d).unwrap();
        pre(d);
    }
    let mut a = vec!["convert"];
    a.extend_from_slice(args);
    let theirs = qemu_img(&q, &a);
    let ours = qimg(&t, &a);
    assert_outputs_equal(&ours, &theirs, &|s| s.to_string());
    if !theirs.success() {
        assert_eq!(
            t.join(target).exists(),
            q.join(target).exists(),
            "target left behind or not"
        );
        return;
    }
    let src = args[args.len() - 2];
    let src_fmt: Vec<&str> = match args.iter().position(|a| *a == "-f") {
        Some(i) => vec!["-f", args[i + 1]],
        None => vec![],
    };
    if target_fmt == "qcow2" {
        let c = qemu_img(&t, ["check", target]);
        assert_eq!(
            c.code(),
            Some(0),
            "qemu-img check of our target: {}",
            c.describe()
        );
    }
    let mut cmp = vec!["compare", "-F", target_fmt];
    cmp.extend_from_slice(&src_fmt);
    cmp.extend_from_slice(&[src, target]);
    let c = qemu_img(&t, &cmp);
    assert_eq!(
        c.code(),
        Some(0),
        "target differs from source: {}",
        c.describe()
    );
    let strip_offsets = |s: &str| {
        s.lines()
            .map(|l| match l.find(", \"offset\"") {
                Some(i) => format!("{}}}{}", &l[..i], if l.ends_with(',') { "," } else { "" }),
                None => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let mq = qemu_img(&q, ["map", "-f", target_fmt, "--output=json", target]).ok();
    let mt = qemu_img(&t, ["map", "-f", target_fmt, "--output=json", target]).ok();
    assert_eq!(
        strip_offsets(&mt.stdout),
        strip_offsets(&mq.stdout),
        "allocation of the target differs"
    );
    let iq = qemu_img(&q, ["info", "-f", target_fmt, "--output=json", target]).ok();
    let it = qemu_img(&t, ["info", "-f", target_fmt, "--output=json", target]).ok();
    assert_eq!(
        normalize_info_json_text(&it.stdout),
        normalize_info_json_text(&iq.stdout)
    );
}

fn no_pre(_: &Path) {}

/// Sources shared by the convert tests, in the test's root directory.
fn convert_sources(cwd: &Path) {
    write_pseudo_random(&cwd.join("src.raw"), 3 << 20, 17);
    io(
        cwd,
        "raw",
        "src.raw",
        &[
            "write -P 0x41 1M 256k",
            "write -z 2M 512k",
            "write -z 3068k 4k",
        ],
    );
    base_image(cwd, "src.qcow2");
    io(
        cwd,
        "qcow2",
        "src.qcow2",
        &["write -c -P 7 2M 64k", "write -P 0 3M 64k"],
    );
    mk(cwd, "", "top.qcow2", "4M");
    qemu_img_ok(
        cwd,
        &[
            "rebase",
            "-u",
            "-F",
            "qcow2",
            "-b",
            "src.qcow2",
            "top.qcow2",
        ],
    );
    io(
        cwd,
        "qcow2",
        "top.qcow2",
        &["write -P 8 64k 64k", "write -z 1M 64k"],
    );
}

macro_rules! convert_case {
    ($name:ident, [$($arg:expr),*], $target:expr, $tfmt:expr) => {
        convert_case!($name, [$($arg),*], $target, $tfmt, no_pre);
    };
    ($name:ident, [$($arg:expr),*], $target:expr, $tfmt:expr, $pre:expr) => {
        #[test]
        fn $name() {
            let t = Tmp::new(stringify!($name));
            convert_sources(t.path());
            convert_same(t.path(), &[$($arg),*], $target, $tfmt, &$pre);
        }
    };
}

fn pre_qcow2_target(d: &Path) {
    mk(d, "", "out.qcow2", "3M");
}

fn pre_raw_target(d: &Path) {
    qemu_img_ok(d, &["create", "-q", "-f", "raw", "out.raw", "3M"]);
}

fn pre_small_target(d: &Path) {
    mk(d, "", "out.qcow2", "1M");
}

convert_case!(
    convert_raw_to_qcow2,
    ["-O", "qcow2", "../src.raw", "out.qcow2"],
    "out.qcow2",
    "qcow2"
);
convert_case!(
    convert_raw_to_qcow2_f,
    ["-f", "raw", "-O", "qcow2", "../src.raw", "out.qcow2"],
    "out.qcow2",
    "qcow2"
);
convert_case!(
    convert_raw_to_qcow2_s0,
    ["-S", "0", "-O", "qcow2", "../src.raw", "out.qcow2"],
    "out.qcow2",
    "qcow2"
);
convert_case!(
    convert_raw_to_qcow2_s64k,
    ["-S", "64k", "-O", "qcow2", "../src.raw", "out.qcow2"],
    "out.qcow2",
    "qcow2"
);
convert_case!(
    convert_raw_to_qcow2_s512,
    ["-S", "512", "-O", "qcow2", "../src.raw", "out.qcow2"],
    "out.qcow2",
    "qcow2"
);
convert_case!(
    convert_raw_to_qcow2_opts,
    [
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4k,refcount_bits=8,compat=0.10",
        "../src.raw",
        "out.qcow2"
    ],
    "out.qcow2",
    "qcow2"
);
convert_case!(
    convert_raw_to_qcow2_extl2,
    [
        "-O",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=32k",
        "../src.raw",
        "out.qcow2"
    ],
    "out.qcow2",
    "qcow2"
);
convert_case!(
    convert_raw_to_qcow2_prealloc,
    [
        "-O",
        "qcow2",
        "-o",
        "preallocation=metadata",
        "../src.raw",
        "out.qcow2"
    ],
    "out.qcow2",
    "qcow2"
);
convert_case!(
    convert_compressed_zstd,
    [
        "-c",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd",
        "../src.raw",
        "out.qcow2"
    ],
    "out.qcow2",
    "qcow2"
);
convert_case!(
    convert_compressed_zlib,
    ["-c", "-O", "qcow2", "../src.qcow2", "out.qcow2"],
    "out.qcow2",
    "qcow2"
);
convert_case!(
    convert_qcow2_to_raw,
    ["-O", "raw", "../src.qcow2", "out.raw"],
    "out.raw",
    "raw"
);
convert_case!(
    convert_qcow2_to_raw_s0,
    ["-S", "0", "-O", "raw", "../src.qcow2", "out.raw"],
    "out.raw",
    "raw"
);
convert_case!(
    convert_qcow2_to_qcow2,
    ["-O", "qcow2", "../src.qcow2", "out.qcow2"],
    "out.qcow2",
    "qcow2"
);
convert_case!(
    convert_chain_to_qcow2,
    ["-O", "qcow2", "../top.qcow2", "out.qcow2"],
    "out.qcow2",
    "qcow2"
);
convert_case!(
    convert_chain_to_raw,
    ["-f", "qcow2", "-O", "raw", "../top.qcow2", "out.raw"],
    "out.raw",
    "raw"
);
convert_case!(
    convert_raw_to_raw,
    ["-O", "raw", "../src.raw", "out.raw"],
    "out.raw",
    "raw"
);
convert_case!(
    convert_existing_qcow2_n,
    ["-n", "-O", "qcow2", "../src.raw", "out.qcow2"],
    "out.qcow2",
    "qcow2",
    pre_qcow2_target
);
convert_case!(
    convert_existing_target_is_zero,
    [
        "-n",
        "--target-is-zero",
        "-O",
        "qcow2",
        "../src.raw",
        "out.qcow2"
    ],
    "out.qcow2",
    "qcow2",
    pre_qcow2_target
);
convert_case!(
    convert_existing_raw_n,
    ["-n", "-O", "raw", "../src.qcow2", "out.raw"],
    "out.raw",
    "raw",
    pre_raw_target
);
convert_case!(
    convert_err_target_too_small,
    ["-n", "-O", "qcow2", "../src.raw", "out.qcow2"],
    "out.qcow2",
    "qcow2",
    pre_small_target
);
convert_case!(
    convert_err_target_is_zero_without_n,
    ["--target-is-zero", "-O", "raw", "../src.raw", "out.raw"],
    "out.raw",
    "raw"
);
convert_case!(
    convert_err_missing_source,
    ["-O", "raw", "../missing.qcow2", "out.raw"],
    "out.raw",
    "raw"
);
convert_case!(
    convert_err_bad_s,
    ["-S", "100", "-O", "raw", "../src.raw", "out.raw"],
    "out.raw",
    "raw"
);
convert_case!(
    convert_err_bad_format,
    ["-O", "bogus", "../src.raw", "out.raw"],
    "out.raw",
    "raw"
);
convert_case!(
    convert_err_bad_option,
    [
        "-O",
        "qcow2",
        "-o",
        "cluster_size=3k",
        "../src.raw",
        "out.qcow2"
    ],
    "out.qcow2",
    "qcow2"
);

// ---- convert with unreadable source clusters ------------------------------------------------

/// A compressed image whose guest clusters 4 and 9 no longer decompress: QEMU's read of
/// them fails with EIO.
fn damaged_compressed(cwd: &Path) {
    let text: Vec<u8> = (0..)
        .flat_map(|i: u32| format!("line {i:08} of compressible text\n").into_bytes())
        .take(1 << 20)
        .collect();
    std::fs::write(cwd.join("a.raw"), &text).unwrap();
    qemu_img_ok(
        cwd,
        &[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "a.raw",
            "bad.qcow2",
        ],
    );
    let p = cwd.join("bad.qcow2");
    for idx in [4, 9] {
        let e = be64(&p, l2_entry_off(&p, idx));
        assert_ne!(e & (1 << 62), 0, "cluster {idx} is not compressed");
        // 64 KiB clusters: the host offset is in bits 0..54.
        let host = e & ((1 << 54) - 1);
        write_at(&p, host + 16, &[0xff; 64]);
    }
}

#[test]
fn convert_read_errors_and_salvage_match_qemu() {
    let t = tempfile::tempdir().unwrap();
    damaged_compressed(t.path());
    let cases: &[(&[&str], &str, &str)] = &[
        (&["-O", "raw"], "o.raw", "raw"),
        (&["-O", "qcow2"], "o.qcow2", "qcow2"),
        (&["--salvage", "-O", "raw"], "o.raw", "raw"),
        (&["--salvage", "-O", "qcow2"], "o.qcow2", "qcow2"),
        (&["--salvage", "-c", "-O", "qcow2"], "o.qcow2", "qcow2"),
    ];
    for (opts, out, fmt) in cases {
        let (q, o) = (t.path().join("q"), t.path().join("t"));
        for d in [&q, &o] {
            let _ = std::fs::remove_dir_all(d);
            std::fs::create_dir(d).unwrap();
        }
        let mut a = vec!["convert"];
        a.extend_from_slice(opts);
        a.extend_from_slice(&["../bad.qcow2", out]);
        let theirs = qemu_img(&q, &a);
        let ours = qimg(&o, &a);
        assert_eq!(ours.code(), theirs.code(), "{}", ours.describe());
        assert_eq!(ours.stdout, theirs.stdout);
        if !theirs.success() {
            // qemu-img reports the first failed request, and sometimes also the other
            // damaged cluster when its parallel requests fail before it exits; qimg
            // reports the first.
            let first = "PROG: error while reading at byte 262144: Input/output error";
            let other = "PROG: error while reading at byte 589824: Input/output error";
            assert_eq!(
                norm_ours(&ours.stderr).trim_end(),
                first,
                "{}",
                ours.cmdline
            );
            let theirs_lines = norm_theirs(&theirs.stderr);
            assert!(
                theirs_lines.lines().any(|l| l == first)
                    && theirs_lines.lines().all(|l| l == first || l == other),
                "{theirs_lines}"
            );
            continue;
        }
        // One salvage warning per sector: qemu-img's come in the order its parallel
        // requests finish, so they are compared as sets.
        let sorted = |s: String| {
            let mut l: Vec<String> = s.lines().map(str::to_string).collect();
            l.sort();
            l
        };
        assert_eq!(
            sorted(norm_ours(&ours.stderr)),
            sorted(norm_theirs(&theirs.stderr)),
            "stderr differs: {}",
            ours.cmdline
        );
        assert!(
            theirs
                .stderr
                .contains("warning: error while reading offset 262144"),
            "{}",
            theirs.stderr
        );
        let c = qemu_img(
            t.path(),
            [
                "compare",
                "-f",
                fmt,
                "-F",
                fmt,
                &format!("q/{out}"),
                &format!("t/{out}"),
            ],
        );
        assert_eq!(c.code(), Some(0), "{:?}: {}", opts, c.describe());
        if *fmt == "qcow2" {
            let c = qemu_img(&o, ["check", *out]);
            assert_eq!(c.code(), Some(0), "{}", c.describe());
        }
    }
}

#[test]
fn convert_rate_limit_paces_the_copy() {
    let t = tempfile::tempdir().unwrap();
    write_pseudo_random(&t.path().join("src.raw"), 4 << 20, 5);
    // 4 MiB at 2 MiB/s: the first 2 MiB request goes at once, the second after a
    // second (qemu-img: 1.0 s too). With -c the requests are clusters: about 2 s.
    for (args, min) in [(&["-O", "raw"][..], 0.9), (&["-c", "-O", "qcow2"][..], 1.8)] {
        let mut a = vec!["convert", "-r", "2M"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["src.raw", "out"]);
        let t0 = std::time::Instant::now();
        let o = qimg(t.path(), &a);
        let secs = t0.elapsed().as_secs_f64();
        assert!(o.success(), "{}", o.describe());
        assert!(
            secs >= min,
            "{args:?}: {secs:.2} s, expected at least {min} s"
        );
        let c = qemu_img(t.path(), ["compare", "-f", "raw", "src.raw", "out"]);
        assert_eq!(c.code(), Some(0), "{}", c.describe());
    }
}

// ---- convert -C (copy offloading): same images and allocation as qemu-img's -C ---------------

convert_case!(
    convert_copy_range_raw_to_raw,
    ["-C", "-f", "raw", "-O", "raw", "../src.raw", "out.raw"],
    "out.raw",
    "raw"
);
convert_case!(
    convert_copy_range_raw_to_qcow2,
    ["-C", "-f", "raw", "-O", "qcow2", "../src.raw", "out.qcow2"],
    "out.qcow2",
    "qcow2"
);
convert_case!(
    convert_copy_range_chain_to_raw,
    ["-C", "-O", "raw", "../top.qcow2", "out.raw"],
    "out.raw",
    "raw"
);
convert_case!(
    convert_copy_range_chain_to_qcow2,
    [
        "-C",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "../top.qcow2",
        "out.qcow2"
    ],
    "out.qcow2",
    "qcow2"
);
convert_case!(
    convert_copy_range_into_existing_qcow2,
    ["-C", "-n", "-O", "qcow2", "../top.qcow2", "out.qcow2"],
    "out.qcow2",
    "qcow2",
    pre_qcow2_target
);
convert_case!(
    convert_copy_range_into_existing_raw,
    ["-C", "-n", "-O", "raw", "../src.qcow2", "out.raw"],
    "out.raw",
    "raw",
    pre_raw_target
);
