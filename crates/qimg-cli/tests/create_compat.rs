//! `create`: for a table of option combinations, the binary under test and qemu-img run the
//! same command line in two sibling directories (same relative file names). The results must
//! match: stdout ("Formatting ..."), stderr, exit code, the files left behind (byte for byte,
//! for the image and any external data file), `qemu-img check` must accept the image, and
//! `qemu-img info` (human and JSON) must print the same for both files.
//!
//! qemu-img create is deterministic (no timestamps or random data in a qcow2 image); each
//! test verifies that first by creating the reference twice.

mod common;

use common::*;
use std::path::Path;

/// Files a create command may produce, compared between the two directories.
const PRODUCTS: &[&str] = &["img", "img.data"];

/// Prepares backing files in a directory (identical in each directory).
fn setup_backing(dir: &Path) {
    qemu_img_ok(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "3M"]);
    io(dir, "qcow2", "base.qcow2", &["write -P 0x5a 0 1M"]);
    qemu_img_ok(dir, &["create", "-q", "-f", "raw", "base.raw", "2M"]);
    qemu_img_ok(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "base-v2.qcow2",
            "5M",
        ],
    );
}

fn run_create(t: &Tmp, args: &[&str]) {
    let dq = t.subdir("qemu");
    let dq2 = t.subdir("qemu2");
    let dt = t.subdir("test");
    if args.iter().any(|a| a.contains("base")) {
        for d in [&dq, &dq2, &dt] {
            setup_backing(d);
        }
    }
    let mut a = vec!["create"];
    a.extend_from_slice(args);
    let theirs = qemu_img(&dq, &a);
    let theirs2 = qemu_img(&dq2, &a);
    let ours = qimg(&dt, &a);

    // Determinism of the oracle (otherwise byte comparisons below would be meaningless).
    assert_eq!(theirs.stdout, theirs2.stdout);
    assert_eq!(theirs.code(), theirs2.code());
    for f in PRODUCTS {
        let (p1, p2) = (dq.join(f), dq2.join(f));
        assert_eq!(p1.exists(), p2.exists());
        if p1.exists() {
            compare_files(&p1, &p2).expect("qemu-img create is not deterministic here");
        }
    }

    assert_outputs_equal(&ours, &theirs, &|s| s.to_string());
    for f in PRODUCTS {
        let (pq, pt) = (dq.join(f), dt.join(f));
        assert_eq!(
            pt.exists(),
            pq.exists(),
            "{f}: exists for qimg: {}, for qemu-img: {}",
            pt.exists(),
            pq.exists()
        );
        if pq.exists() {
            if let Err(e) = compare_files(&pt, &pq) {
                // Point at the first differing qcow2 structure before failing.
                panic!("{f}: created file differs from qemu-img's: {e}");
            }
        }
    }
    if !theirs.success() {
        return;
    }
    // The image must be accepted by QEMU and described identically.
    let fmt_args: &[&str] = if args.contains(&"raw") {
        &["-f", "raw"]
    } else {
        &[]
    };
    let mut check = vec!["check"];
    check.extend_from_slice(fmt_args);
    check.push("img");
    let c = qemu_img(&dt, &check);
    let cq = qemu_img(&dq, &check);
    // Exit 63: format (raw) does not support checks. Exit 1 only where the backing file was
    // deliberately missing (`-u`), and then for both images.
    assert!(
        matches!(cq.code(), Some(0) | Some(63) | Some(1)),
        "qemu-img check: {}",
        cq.describe()
    );
    assert_eq!(
        c.code(),
        cq.code(),
        "qemu-img check on our image: {}",
        c.describe()
    );
    assert_eq!(c.stdout, cq.stdout);
    for out in [
        &["--output=json"][..],
        &[],
        &["--backing-chain", "--output=json"],
    ] {
        let mut info = vec!["info"];
        info.extend_from_slice(fmt_args);
        info.extend_from_slice(out);
        info.push("img");
        let it = qemu_img(&dt, &info);
        let iq = qemu_img(&dq, &info);
        let norm = |s: &str| normalize_info_human(&normalize_info_json_text(s));
        assert_eq!(
            norm(&it.stdout),
            norm(&iq.stdout),
            "qemu-img {:?} differs",
            info
        );
        assert_eq!(it.stderr, iq.stderr, "qemu-img {:?} differs", info);
        assert_eq!(it.code(), iq.code(), "qemu-img {:?} differs", info);
        if out.contains(&"--output=json") && iq.success() {
            parse_json(&it.stdout);
        }
    }
}

macro_rules! create {
    ($name:ident, [$($arg:expr),* $(,)?]) => {
        #[test]
        fn $name() {
            let t = Tmp::new(stringify!($name));
            run_create(&t, &[$($arg),*]);
        }
    };
}

// ---- successful combinations -------------------------------------------------------------

create!(defaults, ["-f", "qcow2", "img", "4M"]);
create!(quiet, ["-q", "-f", "qcow2", "img", "4M"]);
create!(
    compat_0_10,
    ["-f", "qcow2", "-o", "compat=0.10", "img", "4M"]
);
create!(compat_v2, ["-f", "qcow2", "-o", "compat=v2", "img", "4M"]);
create!(compat_1_1, ["-f", "qcow2", "-o", "compat=1.1", "img", "4M"]);
create!(compat_v3, ["-f", "qcow2", "-o", "compat=v3", "img", "4M"]);
create!(
    cluster_512,
    ["-f", "qcow2", "-o", "cluster_size=512", "img", "4M"]
);
create!(
    cluster_4k,
    ["-f", "qcow2", "-o", "cluster_size=4k", "img", "4M"]
);
create!(
    cluster_8192,
    ["-f", "qcow2", "-o", "cluster_size=8192", "img", "4M"]
);
create!(
    cluster_2m,
    ["-f", "qcow2", "-o", "cluster_size=2M", "img", "4M"]
);
create!(
    cluster_512_v2,
    [
        "-f",
        "qcow2",
        "-o",
        "compat=0.10,cluster_size=512",
        "img",
        "64M"
    ]
);
create!(
    cluster_2m_v2,
    [
        "-f",
        "qcow2",
        "-o",
        "compat=0.10,cluster_size=2M",
        "img",
        "4M"
    ]
);
create!(
    refcount_1,
    ["-f", "qcow2", "-o", "refcount_bits=1", "img", "4M"]
);
create!(
    refcount_2,
    ["-f", "qcow2", "-o", "refcount_bits=2", "img", "4M"]
);
create!(
    refcount_4,
    ["-f", "qcow2", "-o", "refcount_bits=4", "img", "4M"]
);
create!(
    refcount_8,
    ["-f", "qcow2", "-o", "refcount_bits=8", "img", "4M"]
);
create!(
    refcount_16,
    ["-f", "qcow2", "-o", "refcount_bits=16", "img", "4M"]
);
create!(
    refcount_32,
    ["-f", "qcow2", "-o", "refcount_bits=32", "img", "4M"]
);
create!(
    refcount_64,
    [
        "-f",
        "qcow2",
        "-o",
        "refcount_bits=64,cluster_size=512",
        "img",
        "4M"
    ]
);
create!(
    refcount_16_v2,
    [
        "-f",
        "qcow2",
        "-o",
        "refcount_bits=16,compat=0.10",
        "img",
        "4M"
    ]
);
create!(
    extended_l2,
    ["-f", "qcow2", "-o", "extended_l2=on", "img", "4M"]
);
create!(
    extended_l2_16k,
    [
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=16k",
        "img",
        "4M"
    ]
);
create!(
    extended_l2_2m,
    [
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=2M",
        "img",
        "4M"
    ]
);
create!(
    lazy_refcounts,
    ["-f", "qcow2", "-o", "lazy_refcounts=on", "img", "4M"]
);
create!(
    zstd,
    ["-f", "qcow2", "-o", "compression_type=zstd", "img", "4M"]
);
create!(
    zlib_explicit,
    ["-f", "qcow2", "-o", "compression_type=zlib", "img", "4M"]
);
create!(
    prealloc_off,
    ["-f", "qcow2", "-o", "preallocation=off", "img", "4M"]
);
create!(
    prealloc_metadata,
    ["-f", "qcow2", "-o", "preallocation=metadata", "img", "4M"]
);
create!(
    prealloc_falloc,
    ["-f", "qcow2", "-o", "preallocation=falloc", "img", "4M"]
);
create!(
    prealloc_full,
    ["-f", "qcow2", "-o", "preallocation=full", "img", "4M"]
);
create!(
    prealloc_metadata_512,
    [
        "-f",
        "qcow2",
        "-o",
        "preallocation=metadata,cluster_size=512",
        "img",
        "2M"
    ]
);
create!(
    prealloc_metadata_v2,
    [
        "-f",
        "qcow2",
        "-o",
        "preallocation=metadata,compat=0.10",
        "img",
        "4M"
    ]
);
create!(
    prealloc_metadata_extl2,
    [
        "-f",
        "qcow2",
        "-o",
        "preallocation=metadata,extended_l2=on",
        "img",
        "4M"
    ]
);
create!(
    prealloc_full_refcount_1,
    [
        "-f",
        "qcow2",
        "-o",
        "preallocation=full,refcount_bits=1",
        "img",
        "3M"
    ]
);
create!(
    combo_all_v3,
    [
        "-f",
        "qcow2",
        "-o",
        "compat=1.1,cluster_size=16k,refcount_bits=8,extended_l2=on,lazy_refcounts=on,compression_type=zstd",
        "img",
        "5M"
    ]
);
create!(
    backing_qcow2,
    ["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "img"]
);
create!(
    backing_qcow2_larger,
    [
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "img",
        "8M"
    ]
);
create!(
    backing_qcow2_smaller,
    [
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "img",
        "1M"
    ]
);
create!(
    backing_raw,
    ["-f", "qcow2", "-b", "base.raw", "-F", "raw", "img"]
);
create!(
    backing_v2_overlay_v2,
    [
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        "base-v2.qcow2",
        "-F",
        "qcow2",
        "img"
    ]
);
create!(
    backing_unsafe_missing,
    [
        "-f",
        "qcow2",
        "-u",
        "-b",
        "missing.qcow2",
        "-F",
        "qcow2",
        "img",
        "2M"
    ]
);
create!(
    backing_via_o,
    [
        "-f",
        "qcow2",
        "-o",
        "backing_file=base.qcow2,backing_fmt=qcow2",
        "img"
    ]
);
create!(
    backing_extl2_prealloc,
    [
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,preallocation=metadata",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "img"
    ]
);
create!(
    backing_zstd_4k,
    [
        "-f",
        "qcow2",
        "-o",
        "compression_type=zstd,cluster_size=4k",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "img"
    ]
);
create!(
    data_file,
    ["-f", "qcow2", "-o", "data_file=img.data", "img", "4M"]
);
create!(
    data_file_raw,
    [
        "-f",
        "qcow2",
        "-o",
        "data_file=img.data,data_file_raw=on",
        "img",
        "4M"
    ]
);
create!(
    data_file_raw_full,
    [
        "-f",
        "qcow2",
        "-o",
        "data_file=img.data,data_file_raw=on,preallocation=full",
        "img",
        "4M"
    ]
);
create!(
    data_file_prealloc_metadata,
    [
        "-f",
        "qcow2",
        "-o",
        "data_file=img.data,preallocation=metadata",
        "img",
        "4M"
    ]
);
create!(
    data_file_backing,
    [
        "-f",
        "qcow2",
        "-o",
        "data_file=img.data",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "img"
    ]
);
create!(raw_default_format, ["img", "4M"]);
create!(raw, ["-f", "raw", "img", "4M"]);
create!(
    raw_prealloc_full,
    ["-f", "raw", "-o", "preallocation=full", "img", "1M"]
);
create!(
    raw_prealloc_falloc,
    ["-f", "raw", "-o", "preallocation=falloc", "img", "1M"]
);
create!(size_zero, ["-f", "qcow2", "img", "0"]);
create!(size_bytes_unaligned, ["-f", "qcow2", "img", "1000"]);
create!(size_b_suffix, ["-f", "qcow2", "img", "4096b"]);
create!(size_k_suffix, ["-f", "qcow2", "img", "1536k"]);
create!(size_upper_k_suffix, ["-f", "qcow2", "img", "64K"]);
create!(size_fraction, ["-f", "qcow2", "img", "1.5M"]);
create!(size_1g, ["-f", "qcow2", "img", "1G"]);
create!(size_1t, ["-f", "qcow2", "img", "1T"]);
create!(
    size_max_512_clusters,
    ["-f", "qcow2", "-o", "cluster_size=512", "img", "128G"]
);
create!(size_raw_unaligned, ["-f", "raw", "img", "1000"]);

// ---- errors: same message, exit code, and no file left where qemu-img leaves none --------

create!(
    err_cluster_size_1000,
    ["-f", "qcow2", "-o", "cluster_size=1000", "img", "1M"]
);
create!(
    err_cluster_size_256,
    ["-f", "qcow2", "-o", "cluster_size=256", "img", "1M"]
);
create!(
    err_cluster_size_4m,
    ["-f", "qcow2", "-o", "cluster_size=4M", "img", "1M"]
);
create!(
    err_refcount_bits_3,
    ["-f", "qcow2", "-o", "refcount_bits=3", "img", "1M"]
);
create!(
    err_refcount_bits_128,
    ["-f", "qcow2", "-o", "refcount_bits=128", "img", "1M"]
);
create!(
    err_refcount_bits_v2,
    [
        "-f",
        "qcow2",
        "-o",
        "refcount_bits=8,compat=0.10",
        "img",
        "1M"
    ]
);
create!(
    err_lazy_v2,
    [
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on,compat=0.10",
        "img",
        "1M"
    ]
);
create!(
    err_zstd_v2,
    [
        "-f",
        "qcow2",
        "-o",
        "compression_type=zstd,compat=0.10",
        "img",
        "1M"
    ]
);
create!(
    err_compression_lz4,
    ["-f", "qcow2", "-o", "compression_type=lz4", "img", "1M"]
);
create!(
    err_extl2_v2,
    [
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,compat=0.10",
        "img",
        "1M"
    ]
);
create!(
    err_extl2_4k,
    [
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=4k",
        "img",
        "1M"
    ]
);
create!(
    err_compat_bad,
    ["-f", "qcow2", "-o", "compat=0.9", "img", "1M"]
);
create!(err_too_large, ["-f", "qcow2", "img", "2049T"]);
create!(err_too_large_1e, ["-f", "qcow2", "img", "1E"]);
create!(
    err_too_large_512,
    ["-f", "qcow2", "-o", "cluster_size=512", "img", "129G"]
);
create!(
    err_prealloc_backing,
    [
        "-f",
        "qcow2",
        "-o",
        "preallocation=metadata",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "img"
    ]
);
create!(
    err_prealloc_bogus,
    ["-f", "qcow2", "-o", "preallocation=bogus", "img", "1M"]
);
create!(
    err_data_file_raw_without_data_file,
    ["-f", "qcow2", "-o", "data_file_raw=on", "img", "1M"]
);
create!(
    err_data_file_v2,
    [
        "-f",
        "qcow2",
        "-o",
        "data_file=img.data,compat=0.10",
        "img",
        "1M"
    ]
);
create!(
    err_data_file_raw_backing,
    [
        "-f",
        "qcow2",
        "-o",
        "data_file=img.data,data_file_raw=on",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "img"
    ]
);
create!(
    err_backing_fmt_without_file,
    ["-f", "qcow2", "-o", "backing_fmt=qcow2", "img", "1M"]
);
create!(
    err_backing_without_fmt,
    ["-f", "qcow2", "-b", "base.qcow2", "img"]
);
create!(
    err_backing_missing,
    [
        "-f",
        "qcow2",
        "-b",
        "missing.qcow2",
        "-F",
        "qcow2",
        "img",
        "1M"
    ]
);
create!(
    err_unsafe_backing_without_size,
    [
        "-f",
        "qcow2",
        "-u",
        "-b",
        "missing.qcow2",
        "-F",
        "qcow2",
        "img"
    ]
);
create!(
    err_unknown_option,
    ["-f", "qcow2", "-o", "foo=1", "img", "1M"]
);
create!(err_unknown_format, ["-f", "bogus", "img", "1M"]);
create!(err_missing_size, ["-f", "qcow2", "img"]);
create!(err_bad_size_suffix, ["-f", "qcow2", "img", "1Q"]);
create!(err_negative_size, ["-f", "qcow2", "img", "-1"]);
create!(err_no_filename, ["-f", "qcow2"]);
create!(err_bad_flag, ["--bogus", "-f", "qcow2", "img", "1M"]);
create!(
    err_lazy_bad_value,
    ["-f", "qcow2", "-o", "lazy_refcounts=maybe", "img", "1M"]
);
