//! `create_qcow2` / `create_raw` against `qemu-img create` (the oracle, run at test time).
//!
//! Every case creates the same image with both tools and compares the files: lengths,
//! and the bytes of every region that holds data in either file (holes read as zeros in
//! both, so skipping ranges that are holes in both is exact and keeps multi-GiB sparse
//! images fast).

use qimg::ondisk::header::CompressionType;
use qimg::qcow2::create::{
    create_qcow2, create_raw, Compat, CreateOptions, Preallocation, TOO_LARGE,
};
use qimg::storage::{FileStorage, Storage};
use std::path::Path;
use std::process::Command;

fn parse_size(s: &str) -> u64 {
    let (num, mult) = match s.chars().last().unwrap() {
        'k' | 'K' => (&s[..s.len() - 1], 1u64 << 10),
        'M' => (&s[..s.len() - 1], 1 << 20),
        'G' => (&s[..s.len() - 1], 1 << 30),
        'T' => (&s[..s.len() - 1], 1 << 40),
        'P' => (&s[..s.len() - 1], 1 << 50),
        _ => (s, 1),
    };
    num.parse::<u64>().unwrap() * mult
}

/// Builds CreateOptions from a qemu-img `-o` string plus the `-b`/`-F` values.
fn options(o: &str, size: &str, backing: Option<(&str, &str)>) -> CreateOptions {
    let mut c = CreateOptions {
        size: parse_size(size),
        ..Default::default()
    };
    for kv in o.split(',').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap();
        let on = v == "on";
        match k {
            "compat" => c.compat = Compat::parse(v).unwrap(),
            "cluster_size" => c.cluster_size = parse_size(v),
            "refcount_bits" => c.refcount_bits = v.parse().unwrap(),
            "extended_l2" => c.extended_l2 = on,
            "lazy_refcounts" => c.lazy_refcounts = on,
            "preallocation" => c.preallocation = Preallocation::parse(v).unwrap(),
            "compression_type" => {
                c.compression_type = if v == "zstd" {
                    CompressionType::Zstd
                } else {
                    CompressionType::Zlib
                }
            }
            "data_file" => c.data_file = Some(v.to_string()),
            "data_file_raw" => c.data_file_raw = on,
            "backing_fmt" => c.backing_fmt = Some(v.to_string()),
            _ => panic!("unknown option {k}"),
        }
    }
    if let Some((b, f)) = backing {
        c.backing_file = Some(b.to_string());
        c.backing_fmt = Some(f.to_string());
    }
    c
}

fn qemu_create(
    dir: &Path,
    name: &str,
    o: &str,
    size: &str,
    backing: Option<(&str, &str)>,
) -> Result<(), String> {
    let mut cmd = Command::new("qemu-img");
    cmd.current_dir(dir).args(["create", "-q", "-f", "qcow2"]);
    if let Some((b, f)) = backing {
        cmd.args(["-u", "-b", b, "-F", f]);
    }
    if !o.is_empty() {
        cmd.args(["-o", o]);
    }
    let out = cmd.args([name, size]).output().expect("qemu-img runs");
    if out.status.success() {
        Ok(())
    } else {
        let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
        let prefix = format!("qemu-img: {name}: ");
        Err(msg.strip_prefix(&prefix).unwrap_or(&msg).to_string())
    }
}

/// The text qemu-img prints for an error: I/O errors end in strerror, without Rust's
/// " (os error N)".
fn qemu_text(e: &qimg::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) if s.ends_with(')') => s[..i].to_string(),
        _ => s,
    }
}

/// Compares two files: length, then every range that is data in either one.
fn same_file(a: &Path, b: &Path) -> Result<(), String> {
    let fa = FileStorage::open(a, false).unwrap();
    let fb = FileStorage::open(b, false).unwrap();
    let (la, lb) = (fa.len().unwrap(), fb.len().unwrap());
    if la != lb {
        return Err(format!("length {la} != {lb}"));
    }
    let mut pos = 0u64;
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    while pos < la {
        // The next offset where either file has data, and how far that data goes.
        let next = |f: &FileStorage| match f.next_data(pos).unwrap() {
            None => (pos, la),
            Some((d, h)) => (d.min(la), h.min(la)),
        };
        let (da, ha) = next(&fa);
        let (db, hb) = next(&fb);
        let start = da.min(db);
        if start >= la {
            break;
        }
        let end = if da <= db { ha } else { hb };
        let end = end.max(start + 1).min(la);
        let mut p = start;
        while p < end {
            let n = ((end - p) as usize).min(ba.len());
            fa.read_at(&mut ba[..n], p).unwrap();
            fb.read_at(&mut bb[..n], p).unwrap();
            if ba[..n] != bb[..n] {
                let i = (0..n).find(|&i| ba[i] != bb[i]).unwrap();
                return Err(format!(
                    "first difference at byte {:#x}: {:#04x} != {:#04x}",
                    p + i as u64,
                    ba[i],
                    bb[i]
                ));
            }
            p += n as u64;
        }
        pos = end;
    }
    Ok(())
}

/// Creates one image both ways and compares (including the data file, if any).
fn check(o: &str, size: &str, backing: Option<(&str, &str)>) {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("q");
    std::fs::create_dir(&q).unwrap();
    let m = dir.path().join("m");
    std::fs::create_dir(&m).unwrap();
    let qr = qemu_create(&q, "img.qcow2", o, size, backing);
    let opts = options(o, size, backing);
    let mr = create_qcow2(&m.join("img.qcow2"), &opts).map_err(|e| qemu_text(&e));
    match (&qr, &mr) {
        (Ok(()), Ok(())) => {}
        (Err(a), Err(b)) => {
            assert_eq!(a, b, "-o {o} size {size}: different errors");
            return;
        }
        _ => panic!("-o {o} size {size}: qemu {qr:?}, qimg {mr:?}"),
    }
    if let Err(e) = same_file(&q.join("img.qcow2"), &m.join("img.qcow2")) {
        panic!("-o {o} size {size} backing {backing:?}: image differs: {e}");
    }
    if let Some(df) = &opts.data_file {
        if let Err(e) = same_file(&q.join(df), &m.join(df)) {
            panic!("-o {o} size {size}: data file differs: {e}");
        }
    }
}

#[test]
fn plain_images_all_cluster_sizes_and_widths() {
    for cs in ["512", "1k", "4k", "64k", "2M"] {
        for rb in [1, 2, 4, 8, 16, 32, 64] {
            for size in ["0", "1", "511", "1M", "1G"] {
                check(&format!("cluster_size={cs},refcount_bits={rb}"), size, None);
            }
        }
    }
}

#[test]
fn large_images_grow_the_refcount_table() {
    for (o, size) in [
        ("cluster_size=512", "10G"),
        ("cluster_size=512", "24G"),
        ("cluster_size=512", "40G"),
        ("cluster_size=512,refcount_bits=64", "4G"),
        ("cluster_size=1k,refcount_bits=64", "64G"),
        ("cluster_size=512,refcount_bits=1", "128G"),
        ("cluster_size=1k,refcount_bits=64", "1T"),
        ("cluster_size=4k", "10T"),
        ("cluster_size=4k", "8T"),
        ("cluster_size=4k,refcount_bits=64", "16T"),
        ("", "1T"),
        ("", "100T"),
        ("", "2P"),
        ("extended_l2=on", "1P"),
        ("cluster_size=2M", "8P"),
        ("compat=0.10,cluster_size=512", "20G"),
    ] {
        check(o, size, None);
    }
}

#[test]
fn versions_features_and_headers() {
    for o in [
        "compat=0.10",
        "compat=v2,cluster_size=4k",
        "compat=1.1",
        "lazy_refcounts=on",
        "compression_type=zstd",
        "extended_l2=on",
        "extended_l2=on,cluster_size=16k",
        "extended_l2=on,cluster_size=2M",
        "cluster_size=4k,lazy_refcounts=on,compression_type=zstd",
        "cluster_size=8k,extended_l2=on,refcount_bits=2",
    ] {
        for size in ["0", "1000", "1G", "10G"] {
            check(o, size, None);
        }
    }
}

#[test]
fn backing_files() {
    for (o, b) in [
        ("", ("base.qcow2", "qcow2")),
        ("compat=0.10", ("base.raw", "raw")),
        ("cluster_size=512", ("../some/dir/base.img", "raw")),
        (
            "extended_l2=on,preallocation=metadata",
            ("base.qcow2", "qcow2"),
        ),
        (
            "extended_l2=on,preallocation=falloc",
            ("base.qcow2", "qcow2"),
        ),
        ("data_file=d.raw", ("base.qcow2", "qcow2")),
    ] {
        check(o, "64M", Some(b));
    }
    let long = "x".repeat(1023);
    check("", "1M", Some((&long, "qcow2")));
    let too_long = "x".repeat(1024);
    check("", "1M", Some((&too_long, "qcow2")));
    // Fits only in a bigger cluster.
    let mid = "y".repeat(380);
    check("cluster_size=512", "1M", Some((&mid, "qcow2")));
    check("cluster_size=1k", "1M", Some((&mid, "qcow2")));
}

#[test]
fn preallocation_modes() {
    for mode in ["metadata", "falloc", "full"] {
        for (o, size) in [
            ("", "0"),
            ("", "1"),
            ("", "1049088"),
            ("", "64M"),
            ("cluster_size=512", "1M"),
            ("cluster_size=512", "3M"),
            ("cluster_size=4k,refcount_bits=1", "8M"),
            ("cluster_size=1k,refcount_bits=64", "4M"),
            ("cluster_size=2M", "64M"),
            ("extended_l2=on", "32M"),
            ("extended_l2=on", "1049088"),
            ("extended_l2=on,cluster_size=2M", "5000000"),
            ("compat=0.10", "16M"),
            ("lazy_refcounts=on", "16M"),
        ] {
            let o = if o.is_empty() {
                format!("preallocation={mode}")
            } else {
                format!("{o},preallocation={mode}")
            };
            check(&o, size, None);
        }
    }
}

#[test]
fn sparse_preallocation_of_large_images() {
    for (o, size) in [
        ("preallocation=metadata", "4G"),
        ("preallocation=metadata,cluster_size=2M", "10G"),
        ("preallocation=metadata,cluster_size=4k", "512M"),
        ("preallocation=falloc,cluster_size=2M", "3G"),
        // QEMU itself needs a minute for 1G with 512-byte clusters; these sizes still
        // make it grow the refcount table several times mid-preallocation.
        ("preallocation=metadata,cluster_size=512", "24M"),
        (
            "preallocation=metadata,cluster_size=512,refcount_bits=64",
            "8M",
        ),
        (
            "preallocation=falloc,cluster_size=512,refcount_bits=64",
            "8M",
        ),
    ] {
        check(o, size, None);
    }
}

#[test]
fn external_data_files() {
    for o in [
        "data_file=d.raw",
        "data_file=d.raw,data_file_raw=on",
        "data_file=d.raw,preallocation=metadata",
        "data_file=d.raw,preallocation=falloc",
        "data_file=d.raw,preallocation=full",
        "data_file=d.raw,data_file_raw=on,preallocation=full",
        "data_file=d.raw,data_file_raw=on,extended_l2=on",
        "data_file=d.raw,data_file_raw=on,cluster_size=512",
        "data_file=d.raw,extended_l2=on,preallocation=falloc",
    ] {
        for size in ["0", "1049088", "16M"] {
            check(o, size, None);
        }
    }
}

#[test]
fn invalid_options_give_qemus_messages() {
    for (o, size, backing) in [
        ("cluster_size=1000", "1G", None),
        ("cluster_size=256", "1G", None),
        ("cluster_size=4M", "1G", None),
        ("refcount_bits=3", "1G", None),
        ("refcount_bits=128", "1G", None),
        ("compat=0.10,refcount_bits=8", "1G", None),
        ("compat=0.10,lazy_refcounts=on", "1G", None),
        ("compat=0.10,compression_type=zstd", "1G", None),
        ("compat=0.10,extended_l2=on", "1G", None),
        ("compat=0.10,data_file=d.raw", "1G", None),
        ("data_file_raw=on", "1G", None),
        ("extended_l2=on,cluster_size=8k", "1G", None),
        ("extended_l2=on,cluster_size=1000", "1G", None),
        ("backing_fmt=qcow2", "1G", None),
        ("preallocation=metadata", "1G", Some(("b.qcow2", "qcow2"))),
        ("data_file=d.raw,data_file_raw=on", "1G", Some(("b.qcow2", "qcow2"))),
        ("data_file_raw=on", "1G", Some(("b.qcow2", "qcow2"))),
        ("cluster_size=512", "129G", None),
        ("", "2049T", None),
        ("extended_l2=on", "1025T", None),
        ("", "9223372036854775296", None),
        ("cluster_size=2M", "9223372036854775807", None),
        // Several violations at once: the first in qemu's order wins.
        ("compat=0.10,lazy_refcounts=on,compression_type=zstd,extended_l2=on,refcount_bits=8,data_file=d.raw", "1G", None),
        ("compat=0.10,compression_type=zstd,extended_l2=on,cluster_size=1000", "1G", None),
        ("compat=0.10,lazy_refcounts=on,refcount_bits=3", "1G", None),
        ("refcount_bits=3,compression_type=zstd,compat=0.10", "1G", None),
        ("compat=0.10,refcount_bits=8,data_file=d.raw", "1G", None),
        ("compat=0.10,compression_type=zstd,data_file=d.raw", "1G", None),
        ("compat=0.10,lazy_refcounts=on", "1G", Some(("b.qcow2", "qcow2"))),
        ("compat=0.10,data_file=d.raw,data_file_raw=on", "1G", Some(("b.qcow2", "qcow2"))),
        ("refcount_bits=3,backing_fmt=raw", "1G", None),
        ("cluster_size=512,compat=0.10,compression_type=zstd", "200G", None),
    ] {
        check(o, size, backing);
    }
    assert!(CreateOptions {
        size: 1 << 50,
        cluster_size: 512,
        ..Default::default()
    }
    .validate()
    .unwrap_err()
    .to_string()
    .starts_with(TOO_LARGE));
}

#[test]
fn failed_creation_leaves_existing_files_alone_when_options_are_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("keep.qcow2");
    std::fs::write(&p, b"precious").unwrap();
    let opts = CreateOptions {
        size: 1 << 20,
        cluster_size: 1000,
        ..Default::default()
    };
    assert!(create_qcow2(&p, &opts).is_err());
    assert_eq!(std::fs::read(&p).unwrap(), b"precious");
    let e = create_qcow2(
        &dir.path().join("no/such/dir/x.qcow2"),
        &CreateOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("Could not create '"), "{e}");
}

fn qemu_raw(dir: &Path, size: &str, mode: &str) -> Vec<u8> {
    let p = dir.join("q.raw");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw", "-o"])
        .arg(format!("preallocation={mode}"))
        .arg(&p)
        .arg(size)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::read(&p).unwrap()
}

#[test]
fn raw_images() {
    let dir = tempfile::tempdir().unwrap();
    for (mode, m) in [
        ("off", Preallocation::Off),
        ("falloc", Preallocation::Falloc),
        ("full", Preallocation::Full),
    ] {
        for size in ["0", "1", "511", "1000", "4096", "1M"] {
            let want = qemu_raw(dir.path(), size, mode);
            let p = dir.path().join("m.raw");
            create_raw(&p, parse_size(size), m).unwrap();
            assert_eq!(std::fs::read(&p).unwrap(), want, "{mode} {size}");
            let blocks = |p: &Path| {
                use std::os::unix::fs::MetadataExt;
                std::fs::metadata(p).unwrap().blocks()
            };
            assert_eq!(
                blocks(&p),
                blocks(&dir.path().join("q.raw")),
                "{mode} {size}"
            );
        }
    }
}

/// Seeded random combinations, to catch interactions the tables above do not list.
#[test]
fn random_combinations() {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    for _ in 0..40 {
        let cs_bits = 9 + next(13);
        let rb = 1u64 << next(7);
        let ext = cs_bits >= 14 && next(3) == 0;
        let prealloc = ["off", "off", "metadata", "falloc", "full"][next(5) as usize];
        let lazy = next(4) == 0;
        let zstd = next(4) == 0;
        let data = next(5) == 0;
        let raw = data && next(2) == 0;
        // Keep preallocated images small for slow 512-byte-cluster QEMU runs.
        let max_shift = match prealloc {
            "off" => 36,
            "full" => 22,
            _ if cs_bits < 12 => 22,
            _ => 27,
        };
        let shift = next(max_shift);
        // A power of two plus up to as much again, in 512-byte steps (0 for tiny sizes).
        let size = (1u64 << shift) + next(1 << shift.saturating_sub(9).min(20)) * 512;
        let mut o = format!("cluster_size={},refcount_bits={rb}", 1u64 << cs_bits);
        if ext {
            o.push_str(",extended_l2=on");
        }
        o.push_str(&format!(",preallocation={prealloc}"));
        if lazy {
            o.push_str(",lazy_refcounts=on");
        }
        if zstd {
            o.push_str(",compression_type=zstd");
        }
        if data {
            o.push_str(",data_file=d.raw");
        }
        if raw {
            o.push_str(",data_file_raw=on");
        }
        check(&o, &size.to_string(), None);
    }
}
