//! Encrypted qcow2 images (LUKS and legacy AES) against QEMU: images QEMU wrote read by
//! qimg, images qimg made read by QEMU, error messages, and hostile LUKS headers.
//!
//! Images are made with `encrypt.iter-time=10` so that PBKDF2 stays fast.

mod common;

use common::*;
use std::path::Path;

const SECRET: &str = "secret,id=sec0,data=abc";

fn opts(img: &str) -> String {
    format!("driver=qcow2,file.filename={img},encrypt.key-secret=sec0")
}

/// Creates an encrypted image with qemu-img.
fn mk(cwd: &Path, name: &str, enc: &str, extra: &str, size: &str) {
    let mut o = format!("encrypt.key-secret=sec0,{enc}");
    if enc.contains("luks") {
        o.push_str(",encrypt.iter-time=10");
    }
    if !extra.is_empty() {
        o.push(',');
        o.push_str(extra);
    }
    qemu_img_ok(
        cwd,
        &[
            "create", "-q", "-f", "qcow2", "--object", SECRET, "-o", &o, name, size,
        ],
    );
}

/// Writes guest data with qemu-io through the key.
fn qio(cwd: &Path, img: &str, cmds: &[&str]) {
    let spec = opts(img);
    io_opts(cwd, &["--object", SECRET, "--image-opts"], &spec, cmds);
}

const PATTERN: &[&str] = &[
    "write -P 0x5a 0 64k",
    "write -P 0x33 100k 3k",
    "write -P 0x77 200k 512",
    "write -z 1M 64k",
    "write -P 0x11 2M 1M",
];

/// Every read-only command prints what qemu-img prints for the image.
fn same_reads(cwd: &Path, img: &str) {
    let spec = opts(img);
    for out in ["human", "json"] {
        assert_same(cwd, &["info", "--output", out, img]);
    }
    assert_same(cwd, &["check", "--object", SECRET, "--image-opts", &spec]);
    for out in ["human", "json"] {
        assert_same(
            cwd,
            &[
                "map",
                "--output",
                out,
                "--object",
                SECRET,
                "--image-opts",
                &spec,
            ],
        );
    }
    assert_convert_raw_same(cwd, &["--object", SECRET, "--image-opts"], &spec);
    // Without a key only `info` works.
    for cmd in [["check"], ["map"]] {
        let mut a: Vec<&str> = cmd.to_vec();
        a.push(img);
        assert_same(cwd, &a);
    }
}

#[test]
fn luks_images_from_qemu() {
    let t = Tmp::new("enc-luks");
    let cwd = t.path();
    for (i, (enc, extra)) in [
        ("encrypt.format=luks", ""),
        ("encrypt.format=luks", "cluster_size=4096"),
        (
            "encrypt.format=luks,encrypt.cipher-alg=aes-128,encrypt.hash-alg=sha1",
            "",
        ),
        (
            "encrypt.format=luks,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256",
            "",
        ),
        (
            "encrypt.format=luks,encrypt.cipher-alg=aes-192,encrypt.ivgen-alg=plain,encrypt.hash-alg=sha512",
            "extended_l2=on,cluster_size=32k",
        ),
        (
            "encrypt.format=luks,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain64",
            "compat=0.10",
        ),
    ]
    .iter()
    .enumerate()
    {
        let img = format!("l{i}.qcow2");
        mk(cwd, &img, enc, extra, "8M");
        qio(cwd, &img, PATTERN);
        same_reads(cwd, &img);
    }
}

#[test]
fn aes_images_from_qemu() {
    let t = Tmp::new("enc-aes");
    let cwd = t.path();
    mk(cwd, "a.qcow2", "encrypt.format=aes", "", "8M");
    qio(cwd, "a.qcow2", PATTERN);
    same_reads(cwd, "a.qcow2");
    // The deprecated spelling makes the same kind of image.
    qemu_img_ok(
        cwd,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            SECRET,
            "-o",
            "encryption=on,encrypt.key-secret=sec0",
            "b.qcow2",
            "1M",
        ],
    );
    qio(cwd, "b.qcow2", &["write -P 0x42 4k 8k"]);
    same_reads(cwd, "b.qcow2");
}

#[test]
fn compare_encrypted_with_plain() {
    let t = Tmp::new("enc-cmp");
    let cwd = t.path();
    mk(cwd, "l.qcow2", "encrypt.format=luks", "", "4M");
    qio(cwd, "l.qcow2", PATTERN[..3].as_ref());
    qemu_img_ok(cwd, &["create", "-q", "-f", "qcow2", "p.qcow2", "4M"]);
    io(cwd, "qcow2", "p.qcow2", &PATTERN[..3]);
    let spec = opts("l.qcow2");
    let p = "driver=qcow2,file.filename=p.qcow2".to_string();
    assert_same(
        cwd,
        &["compare", "--object", SECRET, "--image-opts", &spec, &p],
    );
    io(cwd, "qcow2", "p.qcow2", &["write -P 1 3M 512"]);
    assert_same(
        cwd,
        &["compare", "--object", SECRET, "--image-opts", &spec, &p],
    );
}

#[test]
fn key_errors_as_qemu() {
    let t = Tmp::new("enc-err");
    let cwd = t.path();
    mk(cwd, "l.qcow2", "encrypt.format=luks", "", "1M");
    mk(cwd, "a.qcow2", "encrypt.format=aes", "", "1M");
    let l = opts("l.qcow2");
    for args in [
        vec![
            "convert",
            "-O",
            "raw",
            "--object",
            "secret,id=sec0,data=wrong",
            "--image-opts",
            &l,
            "o.raw",
        ],
        vec![
            "convert",
            "-O",
            "raw",
            "--object",
            SECRET,
            "--image-opts",
            "driver=qcow2,file.filename=l.qcow2,encrypt.key-secret=sec1",
            "o.raw",
        ],
        vec!["convert", "-O", "raw", "l.qcow2", "o.raw"],
        vec![
            "convert",
            "-O",
            "raw",
            "--object",
            SECRET,
            "--image-opts",
            "driver=qcow2,file.filename=a.qcow2,encrypt.key-secret=sec0,encrypt.format=luks",
            "o.raw",
        ],
        vec!["check", "--object", "secret,id=sec0", "l.qcow2"],
        vec!["check", "--object", "secret,data=x", "l.qcow2"],
        vec![
            "check",
            "--object",
            "secret,id=sec0,data=x,file=y",
            "l.qcow2",
        ],
        vec![
            "check",
            "--object",
            "secret,id=sec0,data=@@,format=base64",
            "l.qcow2",
        ],
        vec!["map", "a.qcow2"],
        vec![
            "check",
            "--object",
            "secret,id=sec0,data=YWJj,format=base64",
            "--image-opts",
            &l,
        ],
    ] {
        assert_same(cwd, &args);
    }
    std::fs::write(cwd.join("pw"), "abc").unwrap();
    assert_same(
        cwd,
        &[
            "check",
            "--object",
            "secret,id=sec0,file=pw",
            "--image-opts",
            &l,
        ],
    );
}

/// Hostile LUKS header fields: qimg fails with one clear line, quickly, without a panic.
#[test]
fn malformed_luks_headers() {
    let t = Tmp::new("enc-bad");
    let cwd = t.path();
    mk(cwd, "base.qcow2", "encrypt.format=luks", "", "1M");
    let base = cwd.join("base.qcow2");
    let ext_off = be64(&base, 0x70 + 8);
    assert_eq!(be32(&base, 0x70), 0x0537_be77);
    let luks = ext_off;
    let slot0 = luks + 208;
    type Corrupt = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Corrupt)> = vec![
        ("magic", Box::new(move |p: &Path| put_be32(p, luks, 0))),
        (
            "version",
            Box::new(move |p: &Path| write_at(p, luks + 6, &[0, 9])),
        ),
        (
            "cipher",
            Box::new(move |p: &Path| write_at(p, luks + 8, b"twofish\0")),
        ),
        (
            "mode",
            Box::new(move |p: &Path| write_at(p, luks + 40, b"ctr-plain64\0")),
        ),
        (
            "hash",
            Box::new(move |p: &Path| write_at(p, luks + 72, b"md5\0")),
        ),
        (
            "unterminated",
            Box::new(move |p: &Path| write_at(p, luks + 72, &[b'a'; 32])),
        ),
        (
            "key bytes",
            Box::new(move |p: &Path| put_be32(p, luks + 108, 0xffff_fff0)),
        ),
        (
            "mk iters",
            Box::new(move |p: &Path| put_be32(p, luks + 164, u32::MAX)),
        ),
        (
            "mk iters 0",
            Box::new(move |p: &Path| put_be32(p, luks + 164, 0)),
        ),
        (
            "slot iters",
            Box::new(move |p: &Path| put_be32(p, slot0 + 4, u32::MAX)),
        ),
        (
            "slot state",
            Box::new(move |p: &Path| put_be32(p, slot0, 7)),
        ),
        (
            "stripes",
            Box::new(move |p: &Path| put_be32(p, slot0 + 44, u32::MAX)),
        ),
        (
            "key offset",
            Box::new(move |p: &Path| put_be32(p, slot0 + 40, u32::MAX)),
        ),
        (
            "key offset 0",
            Box::new(move |p: &Path| put_be32(p, slot0 + 40, 0)),
        ),
        (
            "overlap",
            Box::new(move |p: &Path| put_be32(p, slot0 + 48 + 40, 9)),
        ),
        (
            "payload",
            Box::new(move |p: &Path| put_be32(p, luks + 104, 16)),
        ),
        (
            "ext length",
            Box::new(|p: &Path| put_be64(p, 0x70 + 16, 4096)),
        ),
        (
            "ext offset",
            Box::new(|p: &Path| put_be64(p, 0x70 + 8, 0x40001)),
        ),
        (
            "ext offset huge",
            Box::new(|p: &Path| put_be64(p, 0x70 + 8, 1u64 << 62)),
        ),
    ];
    let spec = opts("bad.qcow2");
    for (what, f) in cases {
        std::fs::copy(&base, cwd.join("bad.qcow2")).unwrap();
        f(&cwd.join("bad.qcow2"));
        let start = std::time::Instant::now();
        for args in [
            vec!["info", "bad.qcow2"],
            vec![
                "convert",
                "-O",
                "raw",
                "--object",
                SECRET,
                "--image-opts",
                &spec,
                "o.raw",
            ],
        ] {
            let o = qimg(cwd, &args);
            assert!(!o.success(), "{what}: accepted\n{}", o.describe());
            assert_eq!(o.stderr.lines().count(), 1, "{what}: {}", o.describe());
            assert!(
                o.stderr.contains("Could not open"),
                "{what}: {}",
                o.describe()
            );
        }
        assert!(start.elapsed().as_secs() < 20, "{what}: too slow");
    }
}
