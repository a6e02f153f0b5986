//! Engine-level checks against QEMU: images QEMU writes read back identically, and images
//! the convert writer builds pass `qemu-img check` and compare equal.

use qimg::image::Image;
use qimg::open::{open_image, OpenOptions};
use qimg::ops::convert::{convert, ConvertOptions, Target};
use qimg::qcow2::writer::Qcow2Writer;
use qimg::storage::FileStorage;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn read_all(img: &dyn Image) -> Vec<u8> {
    let mut buf = vec![0u8; img.len() as usize];
    // Read in odd-sized pieces to exercise run planning across cluster boundaries.
    let mut pos = 0;
    let mut step = 12345usize;
    while pos < buf.len() {
        let n = step.min(buf.len() - pos);
        img.read_at(&mut buf[pos..pos + n], pos as u64).unwrap();
        pos += n;
        step = step * 3 % 300_007 + 1;
    }
    buf
}

fn qemu_raw(path: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join("ref.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            path.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    std::fs::read(out).unwrap()
}

fn make(dir: &Path, name: &str, create_opts: &str, size: &str, io: &[&str]) -> std::path::PathBuf {
    let p = dir.join(name);
    let ps = p.to_str().unwrap();
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !create_opts.is_empty() {
        args.extend(["-o", create_opts]);
    }
    args.extend([ps, size]);
    run("qemu-img", &args);
    for c in io {
        run("qemu-io", &["-c", c, ps]);
    }
    p
}

const PATTERN: &[&str] = &[
    "write -P 0x11 0 64k",
    "write -P 0x22 100k 3k",
    "write -z 256k 128k",
    "write -c -P 0x33 1M 64k",
    "write -P 0x44 2M 1M",
    "discard 2M 64k",
    "write -P 0x55 3583k 1k",
];

#[test]
fn reads_match_qemu_for_variants() {
    let dir = tempfile::tempdir().unwrap();
    let variants = [
        "compat=0.10",
        "compat=1.1",
        "cluster_size=512",
        "cluster_size=4096,refcount_bits=1",
        "cluster_size=2M,refcount_bits=64",
        "extended_l2=on,cluster_size=32k",
        "compression_type=zstd",
        "lazy_refcounts=on",
    ];
    for v in variants {
        // A compressed write must cover whole clusters.
        let cs = if v.contains("2M") {
            "2M"
        } else if v.contains("32k") {
            "32k"
        } else {
            "64k"
        };
        let cw = format!("write -c -P 0x33 4M {cs}");
        let mut io: Vec<&str> = PATTERN
            .iter()
            .copied()
            .filter(|c| !(v.contains("0.10") && c.starts_with("write -z")))
            .filter(|c| !c.starts_with("write -c"))
            .collect();
        io.push(&cw);
        let p = make(dir.path(), "v.qcow2", v, "8M", &io);
        let img = open_image(&p, &OpenOptions::default()).unwrap();
        assert_eq!(
            read_all(img.as_ref()),
            qemu_raw(&p, dir.path()),
            "variant {v}"
        );
    }
}

#[test]
fn backing_chain_reads_match_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make(d, "base.qcow2", "", "2M", &["write -P 1 0 2M"]);
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            d.join("mid.qcow2").to_str().unwrap(),
            "4M",
        ],
    );
    run(
        "qemu-io",
        &[
            "-c",
            "write -P 2 1M 2M",
            d.join("mid.qcow2").to_str().unwrap(),
        ],
    );
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            d.join("top.qcow2").to_str().unwrap(),
            "6M",
        ],
    );
    run(
        "qemu-io",
        &[
            "-c",
            "write -P 3 1536k 64k",
            "-c",
            "write -z 0 64k",
            d.join("top.qcow2").to_str().unwrap(),
        ],
    );
    let top = d.join("top.qcow2");
    let img = open_image(&top, &OpenOptions::default()).unwrap();
    assert_eq!(read_all(img.as_ref()), qemu_raw(&top, d));
}

#[test]
fn convert_writer_output_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (opts, compress) in [
        ("", false),
        ("compat=0.10", false),
        ("cluster_size=4096,refcount_bits=1", false),
        ("extended_l2=on", false),
        ("", true),
        ("compression_type=zstd", true),
    ] {
        let src = make(d, "src.qcow2", "", "5M", PATTERN);
        let dst = d.join("dst.qcow2");
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([dst.to_str().unwrap(), "5M"]);
        run("qemu-img", &args);
        let s = open_image(&src, &OpenOptions::default()).unwrap();
        let w = Qcow2Writer::open(Arc::new(FileStorage::open(&dst, true).unwrap()), None).unwrap();
        let o = ConvertOptions {
            compress,
            ..Default::default()
        };
        convert(&[s], Target::Qcow2(Box::new(w)), &o).unwrap();
        run("qemu-img", &["check", dst.to_str().unwrap()]);
        run(
            "qemu-img",
            &["compare", src.to_str().unwrap(), dst.to_str().unwrap()],
        );
    }
}
