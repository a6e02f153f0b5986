//! `measure_qcow2` / `measure_raw` against `qemu-img measure --output=json`, run at test
//! time.

use qimg::ondisk::header::CompressionType;
use qimg::open::{open_image, OpenOptions};
use qimg::qcow2::create::{Compat, CreateOptions, Preallocation};
use qimg::qcow2::measure::{measure_qcow2, measure_raw, source_usage, MeasureInfo};
use std::path::Path;
use std::process::Command;

fn parse_size(s: &str) -> u64 {
    let (num, mult) = match s.chars().last().unwrap() {
        'k' => (&s[..s.len() - 1], 1u64 << 10),
        'M' => (&s[..s.len() - 1], 1 << 20),
        'G' => (&s[..s.len() - 1], 1 << 30),
        'T' => (&s[..s.len() - 1], 1 << 40),
        'P' => (&s[..s.len() - 1], 1 << 50),
        _ => (s, 1),
    };
    num.parse::<u64>().unwrap() * mult
}

fn options(o: &str) -> CreateOptions {
    let mut c = CreateOptions::default();
    for kv in o.split(',').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap();
        match k {
            "compat" => c.compat = Compat::parse(v).unwrap(),
            "cluster_size" => c.cluster_size = parse_size(v),
            "refcount_bits" => c.refcount_bits = v.parse().unwrap(),
            "extended_l2" => c.extended_l2 = v == "on",
            "preallocation" => c.preallocation = Preallocation::parse(v).unwrap(),
            "compression_type" => c.compression_type = CompressionType::Zstd,
            "backing_file" => c.backing_file = Some(v.into()),
            "data_file" => c.data_file = Some(v.into()),
            _ => panic!("unknown option {k}"),
        }
    }
    c
}

/// Runs qemu-img measure; `Err` holds its message without the "qemu-img: " prefix.
fn qemu_measure(fmt: &str, o: &str, what: &[&str]) -> Result<MeasureInfo, String> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["measure", "--output=json", "-O", fmt]);
    if !o.is_empty() {
        cmd.args(["-o", o]);
    }
    let out = cmd.args(what).output().unwrap();
    if !out.status.success() {
        let s = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(s.strip_prefix("qemu-img: ").unwrap_or(&s).to_string());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    Ok(MeasureInfo {
        required: v["required"].as_u64().unwrap(),
        fully_allocated: v["fully-allocated"].as_u64().unwrap(),
        bitmaps: v.get("bitmaps").map(|b| b.as_u64().unwrap()),
    })
}

fn check_size(fmt: &str, o: &str, size: &str) {
    let want = qemu_measure(fmt, o, &["--size", size]);
    let got = if fmt == "raw" {
        measure_raw(parse_size(size), None)
    } else {
        measure_qcow2(parse_size(size), &options(o), None)
    }
    .map_err(|e| e.to_string());
    assert_eq!(got, want, "-O {fmt} -o {o} --size {size}");
}

fn check_source(path: &Path, fmt: &str, o: &str) {
    let want = qemu_measure(fmt, o, &[path.to_str().unwrap()]);
    let img = open_image(path, &OpenOptions::default()).unwrap();
    let opts = options(o);
    let got = if fmt == "raw" {
        let u = source_usage(img.as_ref(), 512).unwrap();
        measure_raw(0, Some(&u))
    } else {
        let u = source_usage(img.as_ref(), opts.cluster_size).unwrap();
        measure_qcow2(0, &opts, Some(&u))
    }
    .map_err(|e| e.to_string());
    assert_eq!(got, want, "{} -O {fmt} -o {o}", path.display());
}

const TARGETS: &[&str] = &[
    "",
    "cluster_size=512",
    "cluster_size=4k",
    "cluster_size=2M",
    "cluster_size=512,refcount_bits=1",
    "refcount_bits=64",
    "extended_l2=on",
    "extended_l2=on,cluster_size=2M",
    "compat=0.10",
    "preallocation=metadata",
    "preallocation=falloc",
    "preallocation=full",
    "backing_file=b.qcow2",
    "data_file=x.raw",
    "compression_type=zstd",
];

#[test]
fn sizes() {
    for o in TARGETS {
        for size in [
            "0", "1", "511", "512", "65535", "65536", "1M", "1000000", "1G", "10G", "1T", "100T",
        ] {
            check_size("qcow2", o, size);
        }
    }
    for size in ["0", "1", "1000", "1G", "1T"] {
        check_size("raw", "", size);
    }
}

#[test]
fn option_errors_and_limits() {
    for (o, size) in [
        ("cluster_size=1000", "1G"),
        ("cluster_size=4M", "1G"),
        ("refcount_bits=3", "1G"),
        ("refcount_bits=128", "1G"),
        ("compat=0.10,refcount_bits=8", "1G"),
        ("extended_l2=on,cluster_size=8k", "1G"),
        ("compat=0.10,extended_l2=on", "1G"),
        ("cluster_size=1000,refcount_bits=3", "1G"),
        ("refcount_bits=3", "1025T"),
        ("cluster_size=512", "128G"),
        ("cluster_size=512", "129G"),
        ("cluster_size=512,refcount_bits=64", "128G"),
        ("extended_l2=on", "1025T"),
        ("", "2P"),
        ("", "2049T"),
        ("cluster_size=2M", "9223372036854775807"),
        ("cluster_size=2M", "8191P"),
    ] {
        check_size("qcow2", o, size);
    }
}

fn qemu_img(dir: &Path, args: &[&str]) {
    let st = Command::new("qemu-img")
        .current_dir(dir)
        .args(args)
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img {args:?}");
}

fn qemu_io(dir: &Path, file: &str, fmt: &str, cmds: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.current_dir(dir).args(["-f", fmt]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    let out = cmd.arg(file).output().unwrap();
    assert!(out.status.success(), "qemu-io {cmds:?}");
}

#[test]
fn source_images() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Sparse: nothing allocated.
    qemu_img(d, &["create", "-q", "-f", "qcow2", "empty.qcow2", "100M"]);
    // Mixed: partial clusters, zero clusters, compressed, data past a hole.
    qemu_img(d, &["create", "-q", "-f", "qcow2", "mixed.qcow2", "100M"]);
    qemu_io(
        d,
        "mixed.qcow2",
        "qcow2",
        &[
            "write 0 100k",
            "write 1M 512",
            "write 1052672 512",
            "write -z 2M 1M",
            "write -c 8M 64k",
            "write 16778216 10",
            "write 99M 1M",
        ],
    );
    // 512-byte clusters and a size that is not a multiple of the target cluster.
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "small.qcow2",
            "5000000",
        ],
    );
    qemu_io(
        d,
        "small.qcow2",
        "qcow2",
        &["write 0 1536", "write 4999000 1000"],
    );
    // Fully written.
    qemu_img(d, &["create", "-q", "-f", "qcow2", "full.qcow2", "8M"]);
    qemu_io(d, "full.qcow2", "qcow2", &["write -P 0x55 0 8M"]);
    // Metadata preallocated: data clusters are holes in the file.
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            "prealloc.qcow2",
            "32M",
        ],
    );
    qemu_io(d, "prealloc.qcow2", "qcow2", &["write 4M 64k"]);
    // A backing chain: base data shows through the overlay.
    qemu_img(d, &["create", "-q", "-f", "qcow2", "base.qcow2", "64M"]);
    qemu_io(d, "base.qcow2", "qcow2", &["write 0 4M", "write 40M 1M"]);
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "80M",
        ],
    );
    qemu_io(
        d,
        "top.qcow2",
        "qcow2",
        &["write 2M 4M", "write -z 40M 512k", "write 70M 64k"],
    );
    // Raw sources.
    std::fs::File::create(d.join("sparse.raw"))
        .unwrap()
        .set_len(50 << 20)
        .unwrap();
    qemu_io(d, "sparse.raw", "raw", &["write 1M 4k", "write 20M 3M"]);
    // Persistent bitmaps in the source.
    qemu_img(d, &["create", "-q", "-f", "qcow2", "bm.qcow2", "1G"]);
    qemu_img(d, &["bitmap", "--add", "bm.qcow2", "b1"]);
    qemu_img(
        d,
        &[
            "bitmap",
            "--add",
            "-g",
            "512",
            "bm.qcow2",
            "a-longer-bitmap-name",
        ],
    );
    qemu_io(d, "bm.qcow2", "qcow2", &["write 0 1M"]);
    // Extended L2 source with subclusters.
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "ext.qcow2",
            "10M",
        ],
    );
    qemu_io(
        d,
        "ext.qcow2",
        "qcow2",
        &["write 4k 4k", "write -z 64k 4k", "write 1M 8k"],
    );

    for name in [
        "empty.qcow2",
        "mixed.qcow2",
        "small.qcow2",
        "full.qcow2",
        "prealloc.qcow2",
        "top.qcow2",
        "sparse.raw",
        "bm.qcow2",
        "ext.qcow2",
    ] {
        for o in TARGETS {
            check_source(&d.join(name), "qcow2", o);
        }
        check_source(&d.join(name), "raw", "");
    }
}

#[test]
fn nonsense_arguments_are_errors_not_panics() {
    use qimg::qcow2::create::{l1_entries, refcount_metadata_clusters};
    use qimg::qcow2::measure::prealloc_size;
    for cs in [0, 1, 3, 1000, 1 << 40, u64::MAX] {
        let o = CreateOptions {
            cluster_size: cs,
            size: u64::MAX,
            ..Default::default()
        };
        assert!(measure_qcow2(u64::MAX, &o, None).is_err());
        assert!(o.validate().is_err());
        let _ = l1_entries(u64::MAX, cs, true);
        let _ = prealloc_size(u64::MAX, cs, 99, false);
        let _ = refcount_metadata_clusters(u64::MAX, cs, 99, true);
    }
    for rb in [0, 3, 128, u64::MAX] {
        let o = CreateOptions {
            refcount_bits: rb,
            ..Default::default()
        };
        assert!(o.validate().is_err());
        assert!(measure_qcow2(1 << 30, &o, None).is_err());
    }
    assert!(measure_raw(u64::MAX, None).is_err());
}
