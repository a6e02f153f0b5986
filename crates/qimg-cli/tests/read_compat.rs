//! Reading images that QEMU made: for every variant, `convert -O raw` must produce the same
//! bytes as qemu-img, and `info` / `map` / `check` (human and JSON, with and without
//! `--backing-chain`) must print exactly what qemu-img prints for the same file.
//!
//! Both tools read the very same file, so nothing is volatile and no output is normalized
//! (except the program name in error messages).

mod common;

use common::*;
use std::path::Path;

/// Creates a qcow2 image with qemu-img (`-o opts`, may be empty).
fn mk(cwd: &Path, opts: &str, name: &str, size: &str) {
    let mut a = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        a.extend_from_slice(&["-o", opts]);
    }
    a.extend_from_slice(&[name, size]);
    qemu_img_ok(cwd, &a);
}

/// Creates an overlay with a backing file (backing path relative to the overlay's directory).
fn mk_overlay(cwd: &Path, opts: &str, name: &str, backing: &str, bfmt: &str, size: Option<&str>) {
    let mut a = vec!["create", "-q", "-f", "qcow2", "-b", backing, "-F", bfmt];
    if !opts.is_empty() {
        a.extend_from_slice(&["-o", opts]);
    }
    a.push(name);
    if let Some(s) = size {
        a.push(s);
    }
    qemu_img_ok(cwd, &a);
}

fn qio(cwd: &Path, img: &str, cmds: &[&str]) {
    io(cwd, "qcow2", img, cmds)
}

/// A mixed set of writes for a 4 MiB image: full clusters, sub-cluster and unaligned
/// (512-aligned) writes, a write crossing a 1 MiB boundary, the last sectors of the disk,
/// zero writes over data and over nothing, and a rewrite.
const MIXED: &[&str] = &[
    "write -P 0xab 0 64k",
    "write -P 0x11 100k 3k",
    "write -P 0x22 1020k 8k",
    "write -P 0x33 4088k 4k",
    "write -P 0x44 2M 192k",
    "write -z 2112k 64k",
    "write -z 3M 64k",
    "write -P 0x55 8k 1k",
];

/// Every read-only comparison for one image.
fn check_image(cwd: &Path, img: &str) {
    assert_convert_raw_same(cwd, &[], img);
    for args in [
        &["info", img][..],
        &["info", "--output=json", img],
        &["info", "--output", "json", "--backing-chain", img],
        &["info", "--backing-chain", img],
        &["map", "--output=json", img],
        &["map", img],
        &["check", img],
        &["check", "--output=json", img],
    ] {
        let (ours, _) = assert_same(cwd, args);
        if ours.success() && args.iter().any(|a| a.contains("json")) {
            parse_json(&ours.stdout);
        }
    }
}

/// Also with an explicit format and an explicit map window.
fn check_image_fmt(cwd: &Path, img: &str, fmt: &str) {
    check_image(cwd, img);
    assert_convert_raw_same(cwd, &["-f", fmt], img);
    assert_same(cwd, &["info", "-f", fmt, "--output=json", img]);
    assert_same(cwd, &["map", "-f", fmt, "--output=json", img]);
    assert_same(
        cwd,
        &[
            "map",
            "-f",
            fmt,
            "--output=json",
            "--start-offset",
            "65536",
            "--max-length",
            "1049088",
            img,
        ],
    );
}

macro_rules! case {
    ($name:ident, |$cwd:ident| $body:block) => {
        #[test]
        fn $name() {
            let t = Tmp::new(stringify!($name));
            let $cwd: &Path = t.path();
            let (img, fmt): (&str, &str) = $body;
            check_image_fmt($cwd, img, fmt);
        }
    };
}

// ---- versions and cluster sizes ------------------------------------------------------------

macro_rules! geometry_case {
    ($name:ident, $opts:expr, $size:expr) => {
        case!($name, |cwd| {
            mk(cwd, $opts, "a.qcow2", $size);
            qio(cwd, "a.qcow2", MIXED);
            ("a.qcow2", "qcow2")
        });
    };
}

geometry_case!(v2_cs64k, "compat=0.10", "4M");
geometry_case!(v3_cs64k, "compat=1.1", "4M");
geometry_case!(v2_cs512, "compat=0.10,cluster_size=512", "4M");
geometry_case!(v3_cs512, "cluster_size=512", "4M");
geometry_case!(v2_cs4k, "compat=0.10,cluster_size=4k", "4M");
geometry_case!(v3_cs4k, "cluster_size=4096", "4M");
geometry_case!(v3_cs2m, "cluster_size=2M", "4M");
geometry_case!(v2_cs2m, "compat=0.10,cluster_size=2M", "4M");
case!(v3_unaligned_size, |cwd| {
    // Virtual size not a multiple of the cluster size; the last sector is written.
    mk(cwd, "", "a.qcow2", "4193792");
    qio(cwd, "a.qcow2", MIXED);
    qio(cwd, "a.qcow2", &["write -P 0x66 4095k 512"]);
    ("a.qcow2", "qcow2")
});
geometry_case!(v3_empty, "cluster_size=64k", "4M");

case!(v3_cs512_many_l2, |cwd| {
    // 512-byte clusters: one L2 table maps only 32 KiB, so this image has many L2 tables
    // and a multi-cluster L1 table.
    mk(cwd, "cluster_size=512", "a.qcow2", "3M");
    let cmds: Vec<String> = (0..48)
        .map(|i| format!("write -P {} {}k 1k", i + 1, i * 64 + 3))
        .collect();
    let c: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
    qio(cwd, "a.qcow2", &c);
    ("a.qcow2", "qcow2")
});

case!(v3_fragmented_reverse_writes, |cwd| {
    // Clusters written back to front: host order is the reverse of guest order, so the map
    // has one extent per cluster.
    mk(cwd, "cluster_size=4k", "a.qcow2", "2M");
    let cmds: Vec<String> = (0..40)
        .rev()
        .map(|i| format!("write -P {} {}k 4k", i + 1, i * 8))
        .collect();
    let c: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
    qio(cwd, "a.qcow2", &c);
    ("a.qcow2", "qcow2")
});

// ---- refcount widths ----------------------------------------------------------------------

macro_rules! refcount_case {
    ($name:ident, $bits:expr) => {
        case!($name, |cwd| {
            mk(
                cwd,
                concat!("cluster_size=4k,refcount_bits=", $bits),
                "a.qcow2",
                "4M",
            );
            qio(cwd, "a.qcow2", MIXED);
            // Shared clusters (refcount 2) through an internal snapshot, then COW; a 1-bit
            // refcount cannot count to 2, so that width gets no snapshot.
            if $bits != "1" {
                qemu_img_ok(cwd, &["snapshot", "-c", "s1", "a.qcow2"]);
            }
            qio(cwd, "a.qcow2", &["write -P 0x66 0 4k", "discard 2M 64k"]);
            ("a.qcow2", "qcow2")
        });
    };
}

refcount_case!(refcount_bits_1, "1");
refcount_case!(refcount_bits_2, "2");
refcount_case!(refcount_bits_4, "4");
refcount_case!(refcount_bits_8, "8");
refcount_case!(refcount_bits_16, "16");
refcount_case!(refcount_bits_32, "32");
refcount_case!(refcount_bits_64, "64");

// ---- zero clusters and discards ------------------------------------------------------------

case!(zero_clusters_v3, |cwd| {
    mk(cwd, "", "a.qcow2", "4M");
    qio(
        cwd,
        "a.qcow2",
        &[
            "write -P 1 0 1M",
            "write -z 64k 128k",     // zero flag, allocation kept
            "write -z -u 256k 128k", // zero flag, cluster freed
            "write -z 1M 128k",      // zero flag on unallocated clusters
            "write -z -u 2M 64k",
            "write -z 3M 4k", // sub-cluster zero write: allocates and writes zeros
        ],
    );
    ("a.qcow2", "qcow2")
});

case!(zero_clusters_v2, |cwd| {
    // v2 has no zero flag: zero writes become discards or explicit zero data.
    mk(cwd, "compat=0.10", "a.qcow2", "4M");
    qio(
        cwd,
        "a.qcow2",
        &[
            "write -P 1 0 1M",
            "write -z 64k 128k",
            "write -z -u 256k 128k",
            "write -z 3M 4k",
        ],
    );
    ("a.qcow2", "qcow2")
});

case!(zero_clusters_over_backing, |cwd| {
    // Zero clusters hide the backing file's data; unallocated ones show it.
    mk(cwd, "", "base.qcow2", "4M");
    qio(cwd, "base.qcow2", &["write -P 0x77 0 4M"]);
    mk_overlay(cwd, "", "top.qcow2", "base.qcow2", "qcow2", None);
    qio(
        cwd,
        "top.qcow2",
        &[
            "write -z 64k 64k",
            "write -z -u 1M 128k",
            "write -P 2 2M 64k",
            "write -z -u 2M 64k",
        ],
    );
    ("top.qcow2", "qcow2")
});

case!(discard_v3, |cwd| {
    mk(cwd, "", "a.qcow2", "4M");
    qio(
        cwd,
        "a.qcow2",
        &[
            "write -P 1 0 2M",
            "discard 64k 192k",
            "discard 1M 4k",
            "discard 3M 1M",
        ],
    );
    ("a.qcow2", "qcow2")
});

case!(discard_v2_with_backing, |cwd| {
    // In v2 a discarded cluster becomes unallocated and shows the backing file again.
    mk(cwd, "compat=0.10", "base.qcow2", "4M");
    qio(cwd, "base.qcow2", &["write -P 0x31 0 4M"]);
    mk_overlay(cwd, "compat=0.10", "top.qcow2", "base.qcow2", "qcow2", None);
    qio(cwd, "top.qcow2", &["write -P 2 0 1M", "discard 128k 128k"]);
    ("top.qcow2", "qcow2")
});

case!(discard_v3_with_backing, |cwd| {
    mk(cwd, "", "base.qcow2", "4M");
    qio(cwd, "base.qcow2", &["write -P 0x31 0 4M"]);
    mk_overlay(cwd, "", "top.qcow2", "base.qcow2", "qcow2", None);
    qio(cwd, "top.qcow2", &["write -P 2 0 1M", "discard 128k 128k"]);
    ("top.qcow2", "qcow2")
});

// ---- extended L2 ---------------------------------------------------------------------------

macro_rules! extl2_case {
    ($name:ident, $opts:expr, $compressed:expr) => {
        case!($name, |cwd| {
            mk(cwd, $opts, "a.qcow2", "4M");
            qio(
                cwd,
                "a.qcow2",
                &[
                    "write -P 1 0 2k",    // one subcluster (64k clusters: 2k subclusters)
                    "write -P 2 6k 3k",   // partial subclusters
                    "write -z 16k 2k",    // zero subcluster in an allocated cluster
                    "write -z -u 20k 4k", // zero subclusters, may unmap
                    "write -P 3 1M 64k",  // full cluster
                    "write -z 1M 32k",    // zero half of it
                    "write -z 2M 128k",   // zero whole unallocated clusters
                    "write -P 4 3M 512",  // smallest write
                ],
            );
            qio(cwd, "a.qcow2", $compressed);
            ("a.qcow2", "qcow2")
        });
    };
}

extl2_case!(
    extended_l2_cs64k,
    "extended_l2=on",
    &["write -c -P 5 3136k 64k"]
);
extl2_case!(
    extended_l2_cs16k,
    "extended_l2=on,cluster_size=16k",
    &["write -c -P 5 3136k 16k"]
);
extl2_case!(extended_l2_cs2m, "extended_l2=on,cluster_size=2M", &[]);
extl2_case!(
    extended_l2_zstd,
    "extended_l2=on,compression_type=zstd",
    &["write -c -P 5 3136k 64k"]
);

case!(extended_l2_over_backing, |cwd| {
    // Unwritten subclusters of an allocated cluster still read from the backing file.
    mk(cwd, "", "base.qcow2", "4M");
    qio(cwd, "base.qcow2", &["write -P 0x61 0 4M"]);
    mk_overlay(
        cwd,
        "extended_l2=on",
        "top.qcow2",
        "base.qcow2",
        "qcow2",
        None,
    );
    qio(
        cwd,
        "top.qcow2",
        &[
            "write -P 1 2k 2k",
            "write -z 8k 2k",
            "write -P 2 70k 10k",
            "discard 1M 64k",
        ],
    );
    ("top.qcow2", "qcow2")
});

// ---- compression ---------------------------------------------------------------------------

macro_rules! compressed_case {
    ($name:ident, $opts:expr) => {
        case!($name, |cwd| {
            // Patterned clusters compress well; the qemu-io pattern makes whole clusters.
            let cs: u64 = match $opts {
                o if o.contains("cluster_size=4k") => 4096,
                o if o.contains("cluster_size=512") => 512,
                o if o.contains("cluster_size=2M") => 2 << 20,
                _ => 65536,
            };
            let size = (4u64 << 20).max(3 * cs);
            mk(cwd, $opts, "a.qcow2", &size.to_string());
            let cmds = [
                format!("write -c -P 0x11 0 {cs}"),
                format!("write -c -P 0x12 {} {}", cs, cs),
                format!("write -c -P 0x13 {} {}", (2u64 << 20).max(2 * cs), cs),
                "write -P 0x14 3M 4k".to_string(),
                // Overwrite part of a compressed cluster: it is decompressed and rewritten.
                "write -P 0x15 512 512".to_string(),
            ];
            let c: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
            qio(cwd, "a.qcow2", &c);
            ("a.qcow2", "qcow2")
        });
    };
}

compressed_case!(compressed_zlib, "compression_type=zlib");
compressed_case!(compressed_zstd, "compression_type=zstd");
compressed_case!(compressed_zlib_v2, "compat=0.10");
compressed_case!(compressed_zlib_cs4k, "cluster_size=4k");
compressed_case!(
    compressed_zstd_cs512,
    "cluster_size=512,compression_type=zstd"
);
compressed_case!(compressed_zlib_cs2m, "cluster_size=2M");

fn convert_compressed(cwd: &Path, ctype: &str, cs: &str) {
    // Source with random (incompressible), patterned and zero parts.
    write_pseudo_random(&cwd.join("src.raw"), 3 << 20, 7);
    io(
        cwd,
        "raw",
        "src.raw",
        &["write -P 0x41 1M 512k", "write -z 2M 256k"],
    );
    qemu_img_ok(
        cwd,
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            &format!("compression_type={ctype},cluster_size={cs}"),
            "src.raw",
            "a.qcow2",
        ],
    );
}

case!(convert_c_zlib, |cwd| {
    convert_compressed(cwd, "zlib", "64k");
    ("a.qcow2", "qcow2")
});

case!(convert_c_zstd, |cwd| {
    convert_compressed(cwd, "zstd", "64k");
    ("a.qcow2", "qcow2")
});

case!(convert_c_zstd_cs4k, |cwd| {
    convert_compressed(cwd, "zstd", "4k");
    ("a.qcow2", "qcow2")
});

// ---- external data file ------------------------------------------------------------------

case!(data_file, |cwd| {
    mk(cwd, "data_file=a.data", "a.qcow2", "4M");
    qio(cwd, "a.qcow2", MIXED);
    ("a.qcow2", "qcow2")
});

case!(data_file_raw, |cwd| {
    mk(cwd, "data_file=a.data,data_file_raw=on", "a.qcow2", "4M");
    qio(cwd, "a.qcow2", MIXED);
    ("a.qcow2", "qcow2")
});

case!(data_file_extended_l2, |cwd| {
    mk(cwd, "data_file=a.data,extended_l2=on", "a.qcow2", "4M");
    qio(
        cwd,
        "a.qcow2",
        &[
            "write -P 1 0 2k",
            "write -z 4k 2k",
            "write -P 2 1M 64k",
            "discard 1M 32k",
        ],
    );
    ("a.qcow2", "qcow2")
});

// ---- backing chains ----------------------------------------------------------------------

case!(backing_chain_3_deep_relative, |cwd| {
    // chain/base.qcow2 <- chain/mid.qcow2 (backing "base.qcow2", relative to its own
    // directory) <- top.qcow2 (backing "chain/mid.qcow2").
    std::fs::create_dir(cwd.join("chain")).unwrap();
    mk(cwd, "cluster_size=4k", "chain/base.qcow2", "4M");
    qio(cwd, "chain/base.qcow2", &["write -P 0xb0 0 4M"]);
    mk_overlay(cwd, "", "chain/mid.qcow2", "base.qcow2", "qcow2", None);
    qio(
        cwd,
        "chain/mid.qcow2",
        &["write -P 0xb1 64k 1M", "write -z 2M 64k"],
    );
    mk_overlay(
        cwd,
        "cluster_size=512",
        "top.qcow2",
        "chain/mid.qcow2",
        "qcow2",
        None,
    );
    qio(
        cwd,
        "top.qcow2",
        &[
            "write -P 0xb2 96k 64k",
            "write -P 0xb3 2M 2k",
            "write -z -u 3M 64k",
        ],
    );
    ("top.qcow2", "qcow2")
});

case!(backing_shorter_than_overlay, |cwd| {
    // Reads past the end of the backing file return zeros.
    mk(cwd, "", "base.qcow2", "1M");
    qio(cwd, "base.qcow2", &["write -P 0xc0 0 1M"]);
    mk_overlay(cwd, "", "top.qcow2", "base.qcow2", "qcow2", Some("4M"));
    qio(
        cwd,
        "top.qcow2",
        &["write -P 0xc1 960k 128k", "write -P 0xc2 3M 4k"],
    );
    ("top.qcow2", "qcow2")
});

case!(backing_unaligned_shorter, |cwd| {
    // Backing size not a multiple of the cluster size, and shorter than the overlay.
    mk(cwd, "", "base.qcow2", "1000k");
    qio(cwd, "base.qcow2", &["write -P 0xc0 0 1000k"]);
    mk_overlay(
        cwd,
        "cluster_size=4k",
        "mid.qcow2",
        "base.qcow2",
        "qcow2",
        Some("2M"),
    );
    mk_overlay(cwd, "", "top.qcow2", "mid.qcow2", "qcow2", Some("3M"));
    qio(cwd, "top.qcow2", &["write -P 0xc2 2M 4k"]);
    ("top.qcow2", "qcow2")
});

case!(backing_raw, |cwd| {
    write_pseudo_random(&cwd.join("base.raw"), 2 << 20, 3);
    mk_overlay(cwd, "", "top.qcow2", "base.raw", "raw", Some("4M"));
    qio(
        cwd,
        "top.qcow2",
        &["write -P 0xd1 64k 64k", "write -z 1M 64k"],
    );
    ("top.qcow2", "qcow2")
});

case!(backing_v2_chain, |cwd| {
    mk(cwd, "compat=0.10", "base.qcow2", "4M");
    qio(cwd, "base.qcow2", &["write -P 0xe0 0 3M"]);
    mk_overlay(cwd, "compat=0.10", "top.qcow2", "base.qcow2", "qcow2", None);
    qio(cwd, "top.qcow2", &["write -P 0xe1 1M 64k"]);
    ("top.qcow2", "qcow2")
});

case!(backing_format_unknown_extension, |cwd| {
    // The backing-format extension is replaced with an unknown extension type: the image has
    // a backing file without a format (probed), and an unknown extension that must be skipped.
    mk(cwd, "", "base.qcow2", "4M");
    qio(cwd, "base.qcow2", &["write -P 0xf0 0 2M"]);
    mk_overlay(cwd, "", "top.qcow2", "base.qcow2", "qcow2", None);
    qio(cwd, "top.qcow2", &["write -P 0xf1 1M 64k"]);
    let p = cwd.join("top.qcow2");
    let h = Qcow2Hdr::read(&p);
    let ext = h
        .extensions(&p)
        .into_iter()
        .find(|e| e.1 == 0xe2792aca)
        .expect("backing format ext");
    put_be32(&p, ext.0, 0x1234_5678);
    ("top.qcow2", "qcow2")
});

// ---- raw ---------------------------------------------------------------------------------

case!(raw_image, |cwd| {
    write_pseudo_random(&cwd.join("a.img"), 3 << 20, 11);
    io(cwd, "raw", "a.img", &["write -z 1M 64k"]);
    ("a.img", "raw")
});

case!(raw_sparse, |cwd| {
    qemu_img_ok(cwd, &["create", "-q", "-f", "raw", "a.img", "4M"]);
    io(
        cwd,
        "raw",
        "a.img",
        &["write -P 1 64k 64k", "write -P 2 3M 4k"],
    );
    ("a.img", "raw")
});

// ---- snapshots and bitmaps ---------------------------------------------------------------

case!(internal_snapshots, |cwd| {
    mk(cwd, "", "a.qcow2", "4M");
    qio(cwd, "a.qcow2", &["write -P 1 0 1M"]);
    qemu_img_ok(cwd, &["snapshot", "-c", "first", "a.qcow2"]);
    qio(cwd, "a.qcow2", &["write -P 2 512k 1M"]);
    qemu_img_ok(cwd, &["snapshot", "-c", "second", "a.qcow2"]);
    qio(cwd, "a.qcow2", &["write -P 3 3M 64k", "discard 0 64k"]);
    ("a.qcow2", "qcow2")
});

case!(internal_snapshots_v2, |cwd| {
    mk(cwd, "compat=0.10", "a.qcow2", "4M");
    qio(cwd, "a.qcow2", &["write -P 1 0 1M"]);
    qemu_img_ok(cwd, &["snapshot", "-c", "s1", "a.qcow2"]);
    qio(cwd, "a.qcow2", &["write -P 2 0 64k"]);
    ("a.qcow2", "qcow2")
});

case!(bitmaps, |cwd| {
    mk(cwd, "", "a.qcow2", "4M");
    qemu_img_ok(cwd, &["bitmap", "--add", "a.qcow2", "bm0"]);
    qemu_img_ok(cwd, &["bitmap", "--add", "-g", "4096", "a.qcow2", "b1"]);
    qio(cwd, "a.qcow2", MIXED);
    qemu_img_ok(cwd, &["bitmap", "--disable", "a.qcow2", "b1"]);
    ("a.qcow2", "qcow2")
});

case!(snapshots_and_bitmaps, |cwd| {
    mk(cwd, "", "a.qcow2", "4M");
    qio(cwd, "a.qcow2", &["write -P 1 0 1M"]);
    qemu_img_ok(cwd, &["snapshot", "-c", "s1", "a.qcow2"]);
    qemu_img_ok(cwd, &["bitmap", "--add", "a.qcow2", "bm0"]);
    qio(cwd, "a.qcow2", &["write -P 2 64k 64k"]);
    ("a.qcow2", "qcow2")
});

// ---- lazy refcounts, dirty and corrupt bits ------------------------------------------------

case!(lazy_refcounts, |cwd| {
    mk(cwd, "lazy_refcounts=on", "a.qcow2", "4M");
    qio(cwd, "a.qcow2", MIXED);
    ("a.qcow2", "qcow2")
});

case!(dirty_bit_set, |cwd| {
    // A lazy-refcounts image whose dirty bit is set (as after a crash): read-only opens work.
    mk(cwd, "lazy_refcounts=on", "a.qcow2", "4M");
    qio(cwd, "a.qcow2", MIXED);
    let p = cwd.join("a.qcow2");
    put_be64(&p, 72, be64(&p, 72) | 1);
    ("a.qcow2", "qcow2")
});

case!(corrupt_bit_set, |cwd| {
    // The corrupt bit alone does not stop read-only use.
    mk(cwd, "", "a.qcow2", "4M");
    qio(cwd, "a.qcow2", MIXED);
    let p = cwd.join("a.qcow2");
    put_be64(&p, 72, be64(&p, 72) | 2);
    ("a.qcow2", "qcow2")
});

case!(unknown_compatible_and_autoclear_bits, |cwd| {
    mk(cwd, "", "a.qcow2", "4M");
    qio(cwd, "a.qcow2", MIXED);
    let p = cwd.join("a.qcow2");
    put_be64(&p, 80, 1 << 40);
    put_be64(&p, 88, 1 << 33);
    ("a.qcow2", "qcow2")
});

// ---- preallocation -----------------------------------------------------------------------

macro_rules! prealloc_case {
    ($name:ident, $opts:expr) => {
        case!($name, |cwd| {
            mk(cwd, $opts, "a.qcow2", "4M");
            qio(cwd, "a.qcow2", &["write -P 1 64k 4k", "write -z 1M 64k"]);
            ("a.qcow2", "qcow2")
        });
    };
}

prealloc_case!(prealloc_metadata, "preallocation=metadata");
prealloc_case!(prealloc_falloc, "preallocation=falloc");
prealloc_case!(prealloc_full, "preallocation=full");
prealloc_case!(prealloc_metadata_v2, "compat=0.10,preallocation=metadata");
prealloc_case!(
    prealloc_metadata_extl2,
    "preallocation=metadata,extended_l2=on"
);

// ---- more header and metadata shapes -------------------------------------------------------

case!(header_length_120_unknown_trailing_bytes, |cwd| {
    // A longer v3 header (as a future version may write): 8 unknown bytes after byte 112,
    // extensions moved up accordingly.
    mk(cwd, "", "a.qcow2", "4M");
    qio(cwd, "a.qcow2", MIXED);
    let p = cwd.join("a.qcow2");
    let tail = read_at(&p, 112, 4096 - 120);
    write_at(&p, 120, &tail);
    write_at(&p, 112, &[0, 0, 0, 0, 0, 0, 0, 0x42]);
    put_be32(&p, 100, 120);
    ("a.qcow2", "qcow2")
});

case!(bitmap_in_use, |cwd| {
    // A bitmap whose in_use flag is set (not saved cleanly): reported, not trusted.
    mk(cwd, "", "a.qcow2", "4M");
    qemu_img_ok(cwd, &["bitmap", "--add", "a.qcow2", "bm0"]);
    qio(cwd, "a.qcow2", &["write -P 1 0 128k"]);
    let p = cwd.join("a.qcow2");
    let h = Qcow2Hdr::read(&p);
    let (off, _, _) = h
        .extensions(&p)
        .into_iter()
        .find(|e| e.1 == 0x2385_2875)
        .unwrap();
    let dir = be64(&p, off + 16 + 8);
    put_be32(&p, dir + 12, be32(&p, dir + 12) | 1);
    ("a.qcow2", "qcow2")
});

#[test]
fn internal_snapshot_reads() {
    // `convert -l` reads an internal snapshot; `snapshot -l` lists them.
    let t = Tmp::new("internal_snapshot_reads");
    let cwd = t.path();
    mk(cwd, "cluster_size=4k", "a.qcow2", "4M");
    qio(cwd, "a.qcow2", &["write -P 1 0 1M"]);
    qemu_img_ok(cwd, &["snapshot", "-c", "first", "a.qcow2"]);
    qio(cwd, "a.qcow2", &["write -P 2 512k 1M", "write -z 0 64k"]);
    qemu_img_ok(cwd, &["snapshot", "-c", "second", "a.qcow2"]);
    qio(cwd, "a.qcow2", &["write -P 3 3M 64k", "discard 512k 64k"]);
    assert_convert_raw_same(cwd, &[], "a.qcow2");
    assert_convert_raw_same(cwd, &["-l", "first"], "a.qcow2");
    assert_convert_raw_same(cwd, &["-l", "2"], "a.qcow2");
    assert_convert_raw_same(cwd, &["-l", "snapshot.name=second"], "a.qcow2");
    assert_convert_raw_same(cwd, &["-l", "snapshot.id=1"], "a.qcow2");
    assert_same(cwd, &["snapshot", "-l", "a.qcow2"]);
    assert_same(
        cwd,
        &["convert", "-l", "nosuch", "-O", "raw", "a.qcow2", "x.raw"],
    );
}

#[test]
fn read_with_force_share_and_image_opts() {
    let t = Tmp::new("force_share");
    let cwd = t.path();
    mk(cwd, "", "a.qcow2", "4M");
    qio(cwd, "a.qcow2", MIXED);
    assert_same(cwd, &["info", "-U", "a.qcow2"]);
    assert_same(cwd, &["map", "-U", "--output=json", "a.qcow2"]);
    assert_same(cwd, &["check", "-U", "a.qcow2"]);
    assert_same(
        cwd,
        &["info", "--image-opts", "driver=qcow2,file.filename=a.qcow2"],
    );
    assert_convert_raw_same(cwd, &["-U"], "a.qcow2");
}

#[test]
fn usage_errors() {
    // Usage errors of the read-only commands: same text (modulo program name), exit 1.
    let t = Tmp::new("usage_errors");
    let cwd = t.path();
    mk(cwd, "", "a.qcow2", "1M");
    for args in [
        &["info"][..],
        &["info", "--bogus", "a.qcow2"],
        &["info", "--output=xml", "a.qcow2"],
        &["info", "missing.qcow2"],
        &["info", "-f", "bogus", "a.qcow2"],
        &["map"],
        &["map", "--output=yaml", "a.qcow2"],
        &["map", "--start-offset", "-1", "a.qcow2"],
        &["map", "--max-length", "x", "a.qcow2"],
        &["map", "missing.qcow2"],
        &["convert", "a.qcow2"],
        &["convert", "-O", "raw", "missing.qcow2", "x.raw"],
        &["frob"],
    ] {
        let (ours, _) = assert_same(cwd, args);
        assert_ne!(ours.code(), Some(0), "{args:?}");
    }
    // A repeated option: the last one wins.
    assert_same(cwd, &["info", "-f", "raw", "-f", "qcow2", "a.qcow2"]);
}
