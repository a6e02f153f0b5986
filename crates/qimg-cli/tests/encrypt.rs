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
        // With a key (even an unknown one: info does no I/O) QEMU names the image by
        // its options.
        for sp in [
            spec.clone(),
            spec.replace("sec0", "nope"),
            format!("driver=qcow2,file.filename={img},encrypt.format=luks"),
        ] {
            for secret in [SECRET, "secret,id=sec0,data=wrong"] {
                assert_same(
                    cwd,
                    &[
                        "info",
                        "--output",
                        out,
                        "--object",
                        secret,
                        "--image-opts",
                        &sp,
                    ],
                );
            }
        }
    }
    for out in ["human", "json"] {
        assert_same(
            cwd,
            &[
                "check",
                "--output",
                out,
                "--object",
                SECRET,
                "--image-opts",
                &spec,
            ],
        );
    }
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

/// `qemu-img create` output and resulting layout, without the random parts: the LUKS
/// header's salts, digests, keys, UUID and calibrated iteration counts.
fn info_without_random(cwd: &Path, img: &str) -> serde_json::Value {
    let o = qemu_img_ok(cwd, &["info", "--output=json", img]);
    let mut v = parse_json(&o.stdout);
    if let Some(e) = v["format-specific"]["data"]["encrypt"].as_object_mut() {
        e.remove("uuid");
        e.remove("master-key-iters");
        if let Some(slots) = e.get_mut("slots").and_then(|s| s.as_array_mut()) {
            for s in slots {
                s.as_object_mut().unwrap().remove("iters");
            }
        }
    }
    v["filename"] = serde_json::Value::Null;
    v["children"] = serde_json::Value::Null;
    v["actual-size"] = serde_json::Value::Null;
    v
}

#[test]
fn create_luks_and_aes_as_qemu() {
    let t = Tmp::new("enc-create");
    let ours = t.subdir("ours");
    let theirs = t.subdir("theirs");
    for (i, o) in [
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,cluster_size=4096,compat=0.10",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha1",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,encrypt.cipher-alg=aes-192,encrypt.ivgen-alg=plain,encrypt.hash-alg=sha512,extended_l2=on,cluster_size=32k",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,preallocation=metadata",
        "encrypt.format=aes,encrypt.key-secret=sec0",
        "encryption=on,encrypt.key-secret=sec0",
    ]
    .iter()
    .enumerate()
    {
        let img = format!("c{i}.qcow2");
        let args = ["create", "-f", "qcow2", "--object", SECRET, "-o", o, &img, "3M"];
        let a = qimg(&ours, args);
        let b = qemu_img(&theirs, args);
        assert_outputs_equal(&a, &b, &|s| s.to_string());
        assert_eq!(
            info_without_random(&ours, &img),
            info_without_random(&theirs, &img),
            "{o}"
        );
        assert_eq!(file_len(&ours.join(&img)), file_len(&theirs.join(&img)), "{o}");
        if o.contains("aes,") || o.contains("encryption=on") {
            // Nothing random in a legacy AES image.
            assert_files_equal(&ours.join(&img), &theirs.join(&img));
        }
        let spec = opts(&img);
        let c = qemu_img_ok(&ours, &["check", "--object", SECRET, "--image-opts", &spec]);
        assert!(c.stdout.contains("No errors were found"), "{}", c.describe());
        // (Preallocated clusters of an encrypted image read as noise, in QEMU too: only
        // the written range is checked.)
        qio(&ours, &img, &["write -P 0x6b 4k 70k", "read -P 0x6b 4k 70k"]);
        same_reads(&ours, &img);
    }
}

#[test]
fn convert_compressed_encrypted_refused() {
    let t = Tmp::new("enc-conv-c");
    let ours = t.subdir("ours");
    let theirs = t.subdir("theirs");
    for d in [&ours, &theirs] {
        std::fs::write(d.join("s.raw"), vec![1u8; 65536]).unwrap();
    }
    for o in [
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        "encryption=on,encrypt.key-secret=sec0",
    ] {
        let args = [
            "convert", "-c", "-O", "qcow2", "--object", SECRET, "-o", o, "s.raw", "t.qcow2",
        ];
        let a = qimg(&ours, args);
        let b = qemu_img(&theirs, args);
        assert_outputs_equal(&a, &b, &|s| s.to_string());
        assert_eq!(
            ours.join("t.qcow2").exists(),
            theirs.join("t.qcow2").exists()
        );
    }
    // QEMU itself writes (unencrypted) compressed clusters into an encrypted image with
    // -n; qimg reads them as QEMU does.
    let cwd = &theirs;
    mk(cwd, "c.qcow2", "encrypt.format=luks", "", "1M");
    let spec = opts("c.qcow2");
    qemu_img_ok(
        cwd,
        &[
            "convert",
            "-c",
            "-n",
            "--object",
            SECRET,
            "--target-image-opts",
            "s.raw",
            &spec,
        ],
    );
    same_reads(cwd, "c.qcow2");
}

#[test]
fn create_errors_as_qemu() {
    let t = Tmp::new("enc-create-err");
    let ours = t.subdir("ours");
    let theirs = t.subdir("theirs");
    for o in [
        "encrypt.format=luks",
        "encrypt.format=luks,encrypt.key-secret=nope",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-alg=des",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-alg=foo",
        "encrypt.format=xx,encrypt.key-secret=sec0",
        "encrypt.key-secret=sec0",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=abc",
    ] {
        let args = [
            "create", "-f", "qcow2", "--object", SECRET, "-o", o, "e.qcow2", "1M",
        ];
        let a = qimg(&ours, args);
        let b = qemu_img(&theirs, args);
        assert_outputs_equal(&a, &b, &|s| s.to_string());
        assert_eq!(
            ours.join("e.qcow2").exists(),
            theirs.join("e.qcow2").exists()
        );
    }
}

/// A pseudo-random but reproducible buffer.
fn noise(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[test]
fn convert_into_encrypted_read_by_qemu() {
    let t = Tmp::new("enc-conv");
    let cwd = t.path();
    let mut src = vec![0u8; 4 << 20];
    src[..100_000].copy_from_slice(&noise(100_000, 1));
    src[1 << 20..(1 << 20) + 4096].fill(0x44);
    src[3 << 20..].copy_from_slice(&noise(1 << 20, 2));
    std::fs::write(cwd.join("src.raw"), &src).unwrap();
    for (i, enc) in [
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv",
        "encrypt.format=aes,encrypt.key-secret=sec0",
    ]
    .iter()
    .enumerate()
    {
        let img = format!("t{i}.qcow2");
        let o = qimg(
            cwd,
            ["convert", "-O", "qcow2", "--object", SECRET, "-o", enc, "src.raw", &img],
        );
        assert!(o.success(), "{}", o.describe());
        let spec = opts(&img);
        let c = qemu_img_ok(
            cwd,
            &["compare", "--object", SECRET, "--image-opts", "driver=raw,file.filename=src.raw", &spec],
        );
        assert!(c.stdout.contains("identical"), "{}", c.describe());
        let c = qemu_img_ok(cwd, &["check", "--object", SECRET, "--image-opts", &spec]);
        assert!(c.stdout.contains("No errors"), "{}", c.describe());
        // Same layout as qemu-img's conversion.
        let theirs = format!("q{i}.qcow2");
        qemu_img_ok(
            cwd,
            &["convert", "-O", "qcow2", "--object", SECRET, "-o", enc, "src.raw", &theirs],
        );
        let m = |f: &str| {
            qemu_img_ok(
                cwd,
                &["map", "--output=json", "--object", SECRET, "--image-opts", &opts(f)],
            )
            .stdout
        };
        assert_eq!(m(&img), m(&theirs));
        assert_eq!(file_len(&cwd.join(&img)), file_len(&cwd.join(&theirs)));
        if enc.contains("aes,") {
            assert_files_equal(&cwd.join(&img), &cwd.join(&theirs));
        }
    }
}

/// Guest writes through the library on images QEMU made (unaligned, across clusters,
/// zeroes, copy-on-write from a plain backing file); QEMU must read what the model says.
#[test]
fn engine_writes_read_by_qemu() {
    use qimg::crypto::{EncryptOptions, Secret};
    use qimg::open::{open_image, OpenOptions};
    let t = Tmp::new("enc-write");
    let cwd = t.path();
    qemu_img_ok(cwd, &["create", "-q", "-f", "qcow2", "base.qcow2", "2M"]);
    io(cwd, "qcow2", "base.qcow2", &["write -P 0x99 0 2M"]);
    for (i, enc) in ["encrypt.format=luks", "encrypt.format=aes"]
        .iter()
        .enumerate()
    {
        let img = format!("w{i}.qcow2");
        let mut o = format!("encrypt.key-secret=sec0,{enc}");
        if enc.contains("luks") {
            o.push_str(",encrypt.iter-time=10,cluster_size=4096");
        }
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
                &o,
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                &img,
                "2M",
            ],
        );
        qio(cwd, &img, &["write -P 0x12 64k 64k"]);
        let mut model = vec![0x99u8; 2 << 20];
        model[64 << 10..128 << 10].fill(0x12);
        {
            let opts = OpenOptions {
                format: Some("qcow2".into()),
                writable: true,
                encrypt: EncryptOptions {
                    format: None,
                    key: Some(Secret::new(b"abc".to_vec())),
                },
                ..Default::default()
            };
            let im = open_image(&cwd.join(&img), &opts).unwrap();
            let mut put = |off: usize, data: &[u8]| {
                im.write_at(data, off as u64).unwrap();
                model[off..off + data.len()].copy_from_slice(data);
            };
            put(777, &noise(1000, 3));
            put(65535, &noise(3, 4));
            put(100_000, &noise(70_000, 5));
            put(1 << 20, &noise(512, 6));
            put((1 << 20) + 5, &noise(1, 7));
            im.write_zeroes(300 << 10, 128 << 10, true).unwrap();
            model[300 << 10..428 << 10].fill(0);
            im.write_zeroes(500_001, 10, false).unwrap();
            model[500_001..500_011].fill(0);
            let mut back = vec![0u8; model.len()];
            im.read_at(&mut back, 0).unwrap();
            assert!(back == model, "qimg reads back what it wrote");
            im.flush().unwrap();
        }
        std::fs::write(cwd.join("model.raw"), &model).unwrap();
        let spec = opts(&img);
        let c = qemu_img_ok(
            cwd,
            &[
                "compare",
                "--object",
                SECRET,
                "--image-opts",
                "driver=raw,file.filename=model.raw",
                &spec,
            ],
        );
        assert!(c.stdout.contains("identical"), "{}", c.describe());
        let c = qemu_img_ok(cwd, &["check", "--object", SECRET, "--image-opts", &spec]);
        assert!(c.stdout.contains("No errors"), "{}", c.describe());
        qio(cwd, &img, &["read -P 0 300k 128k"]);
    }
}

/// `qimg serve` exports an encrypted image opened with its key; byte-granular writes from
/// an NBD client land encrypted, and QEMU reads them back.
#[test]
fn serve_encrypted_image() {
    let t = Tmp::new("enc-nbd");
    let cwd = t.path();
    mk(cwd, "n.qcow2", "encrypt.format=luks", "", "4M");
    let sock = cwd.join("n.sock");
    let sock_s = sock.display().to_string();
    let spec = opts("n.qcow2");
    let o = qimg(
        cwd,
        [
            "serve",
            "--fork",
            "--object",
            SECRET,
            "--image-opts",
            "-k",
            &sock_s,
            &spec,
        ],
    );
    assert!(o.success(), "{}", o.describe());
    let uri = format!("nbd+unix:///?socket={sock_s}");
    io_opts(
        cwd,
        &["-f", "raw"],
        &uri,
        &[
            "write -P 0x55 1000 3000",
            "write -P 0x66 65000 1000",
            "write -z 200k 70k",
        ],
    );
    // The server exits when its only client leaves.
    for _ in 0..100 {
        if !sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    qio(
        cwd,
        "n.qcow2",
        &[
            "read -P 0 0 1000",
            "read -P 0x55 1000 3000",
            "read -P 0 4000 61000",
            "read -P 0x66 65000 1000",
            "read -P 0 66000 100k",
            "read -P 0 200k 70k",
        ],
    );
    let c = qemu_img_ok(cwd, &["check", "--object", SECRET, "--image-opts", &spec]);
    assert!(c.stdout.contains("No errors"), "{}", c.describe());
    // A wrong key or an unknown secret: qemu-nbd's messages.
    for (obj, sp) in [
        ("secret,id=sec0,data=bad", spec.clone()),
        (SECRET, spec.replace("sec0", "sec1")),
    ] {
        let ours = qimg(
            cwd,
            ["serve", "--object", obj, "--image-opts", "-k", &sock_s, &sp],
        );
        let theirs = run_with(
            Path::new("qemu-nbd"),
            ["--object", obj, "--image-opts", "-k", &sock_s, &sp],
            cwd,
            Limits::default(),
        );
        assert!(!ours.success() && !theirs.success());
        assert_eq!(
            ours.stderr.split_once(": ").unwrap().1,
            theirs.stderr.split_once(": ").unwrap().1
        );
    }
}

#[test]
fn measure_with_encryption_as_qemu() {
    let t = Tmp::new("enc-measure");
    let cwd = t.path();
    mk(cwd, "l.qcow2", "encrypt.format=luks", "", "4M");
    qio(cwd, "l.qcow2", PATTERN);
    let spec = opts("l.qcow2");
    for o in [
        "encrypt.format=luks",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-alg=aes-128,cluster_size=4k,encrypt.iter-time=10",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.iter-time=10",
        "encrypt.format=luks,encrypt.key-secret=nope",
        "encrypt.format=aes",
    ] {
        // (QEMU builds a throw-away LUKS header to measure, calibrating PBKDF2 for a couple
        // of seconds whatever iter-time says: one output format per source keeps this short.)
        assert_same(
            cwd,
            &["measure", "--output", "json", "--object", SECRET, "-O", "qcow2", "-o", o, "--size", "1G"],
        );
        assert_same(
            cwd,
            &["measure", "--object", SECRET, "-O", "qcow2", "-o", o, "--image-opts", &spec],
        );
    }
}

/// `rebase -b ""` copies the backing data into an encrypted overlay (encrypted for its new
/// clusters); `commit` reads an encrypted overlay into a plain base.
#[test]
fn rebase_and_commit_encrypted_overlay() {
    let t = Tmp::new("enc-chain");
    let cwd = t.path();
    for base in ["b1.qcow2", "b2.qcow2"] {
        qemu_img_ok(cwd, &["create", "-q", "-f", "qcow2", base, "1M"]);
        io(cwd, "qcow2", base, &["write -P 0x21 0 1M"]);
    }
    for (top, base) in [("t1.qcow2", "b1.qcow2"), ("t2.qcow2", "b2.qcow2")] {
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
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
                "-b",
                base,
                "-F",
                "qcow2",
                top,
            ],
        );
        qio(cwd, top, &["write -P 0x31 4k 4k"]);
    }
    let o = qimg(
        cwd,
        [
            "rebase",
            "--object",
            SECRET,
            "-b",
            "",
            "--image-opts",
            &opts("t1.qcow2"),
        ],
    );
    assert!(o.success(), "{}", o.describe());
    qio(
        cwd,
        "t1.qcow2",
        &[
            "read -P 0x21 0 4k",
            "read -P 0x31 4k 4k",
            "read -P 0x21 8k 1016k",
        ],
    );
    let info = qemu_img_ok(cwd, &["info", "t1.qcow2"]);
    assert!(!info.stdout.contains("backing file"), "{}", info.stdout);
    let o = qimg(
        cwd,
        [
            "commit",
            "--object",
            SECRET,
            "--image-opts",
            &opts("t2.qcow2"),
        ],
    );
    assert!(o.success(), "{}", o.describe());
    io(
        cwd,
        "qcow2",
        "b2.qcow2",
        &[
            "read -P 0x21 0 4k",
            "read -P 0x31 4k 4k",
            "read -P 0x21 8k 1016k",
        ],
    );
}

/// Inconsistent encryption fields in the qcow2 header: the same message as qemu-img.
#[test]
fn bad_encryption_header_fields_as_qemu() {
    let t = Tmp::new("enc-hdr");
    let cwd = t.path();
    mk(cwd, "l.qcow2", "encrypt.format=luks", "", "1M");
    mk(cwd, "a.qcow2", "encrypt.format=aes", "", "1M");
    let l = cwd.join("l.qcow2");
    assert_eq!(be32(&l, 0x70), 0x0537_be77);
    let cases: [(&str, &str, u64, u64, bool); 6] = [
        (
            "AES method with a crypto extension",
            "l.qcow2",
            32,
            1,
            false,
        ),
        ("LUKS method without the extension", "a.qcow2", 32, 2, false),
        ("unknown method", "l.qcow2", 32, 3, false),
        (
            "header past the end of the file",
            "l.qcow2",
            0x78,
            0x1000_0000,
            true,
        ),
        ("unaligned header offset", "l.qcow2", 0x78, 0x40200, true),
        (
            "extension shorter than the header",
            "l.qcow2",
            0x80,
            100,
            true,
        ),
    ];
    for (what, src, off, val, wide) in cases {
        std::fs::copy(cwd.join(src), cwd.join("bad.qcow2")).unwrap();
        let p = cwd.join("bad.qcow2");
        if wide {
            put_be64(&p, off, val);
        } else {
            put_be32(&p, off, val as u32);
        }
        let spec = opts("bad.qcow2");
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
            let (ours, _) = assert_same(cwd, &args);
            assert!(!ours.success(), "{what}");
        }
    }
}

/// `amend -o encrypt.*`: LUKS key slots added and erased as qemu-img does (same messages,
/// same slot states), and QEMU opens the image with the new keys only.
#[test]
fn amend_key_slots_as_qemu() {
    let t = Tmp::new("enc-amend");
    let ours = t.subdir("ours");
    let theirs = t.subdir("theirs");
    let objs = [
        "--object",
        SECRET,
        "--object",
        "secret,id=sec1,data=new",
        "--object",
        "secret,id=sec2,data=third",
    ];
    mk(&theirs, "base.qcow2", "encrypt.format=luks", "", "1M");
    qio(&theirs, "base.qcow2", &["write -P 0x5c 0 64k"]);
    let mut a = vec!["amend"];
    a.extend_from_slice(&objs);
    let spec = opts("base.qcow2");
    a.extend_from_slice(&[
        "-o",
        "encrypt.state=active,encrypt.new-secret=sec1,encrypt.keyslot=3,encrypt.iter-time=10",
        "--image-opts",
        &spec,
    ]);
    qemu_img_ok(&theirs, &a);
    let slots = |cwd: &Path| -> Vec<bool> {
        let o = qemu_img_ok(cwd, &["info", "--output=json", "am.qcow2"]);
        parse_json(&o.stdout)["format-specific"]["data"]["encrypt"]["slots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["active"].as_bool().unwrap())
            .collect()
    };
    let spec = opts("am.qcow2");
    for (o, force) in [
        ("encrypt.state=active", false),
        (
            "encrypt.state=active,encrypt.new-secret=sec1,encrypt.keyslot=0",
            false,
        ),
        (
            "encrypt.state=active,encrypt.new-secret=sec1,encrypt.keyslot=9",
            false,
        ),
        (
            "encrypt.state=active,encrypt.new-secret=sec2,encrypt.iter-time=10",
            false,
        ),
        (
            "encrypt.state=active,encrypt.new-secret=sec2,encrypt.keyslot=3,encrypt.iter-time=10",
            true,
        ),
        ("encrypt.state=inactive", false),
        ("encrypt.state=inactive,encrypt.old-secret=sec2", false),
        ("encrypt.state=inactive,encrypt.keyslot=5", false),
        ("encrypt.state=inactive,encrypt.new-secret=sec1", false),
        (
            "encrypt.state=active,encrypt.new-secret=sec1,encrypt.old-secret=sec0",
            false,
        ),
        ("encrypt.state=bogus", false),
        ("encrypt.state=inactive,encrypt.old-secret=sec1", false),
        ("encrypt.state=inactive,encrypt.keyslot=0", false),
        ("encrypt.state=inactive,encrypt.keyslot=3", true),
        ("encrypt.state=inactive,encrypt.old-secret=sec0", false),
        ("encrypt.state=active,encrypt.new-secret=nope", false),
    ] {
        for d in [&ours, &theirs] {
            std::fs::copy(theirs.join("base.qcow2"), d.join("am.qcow2")).unwrap();
        }
        let mut a = vec!["amend"];
        a.extend_from_slice(&objs);
        if force {
            a.push("--force");
        }
        a.extend_from_slice(&["-o", o, "--image-opts", &spec]);
        let x = qimg(&ours, &a);
        let y = qemu_img(&theirs, &a);
        assert_outputs_equal(&x, &y, &|s| s.to_string());
        assert_eq!(slots(&ours), slots(&theirs), "{o}");
        // Whatever keys the slots now hold open the data for QEMU too.
        if x.success() {
            for (sec, id) in [("abc", "sec0"), ("new", "sec1"), ("third", "sec2")] {
                let obj = format!("secret,id={id},data={sec}");
                let sp = format!("driver=qcow2,file.filename=am.qcow2,encrypt.key-secret={id}");
                let q = qemu_io(
                    &ours,
                    [
                        "--object",
                        &obj,
                        "--image-opts",
                        "-c",
                        "read -P 0x5c 0 64k",
                        &sp,
                    ],
                );
                let t2 = qemu_io(
                    &theirs,
                    [
                        "--object",
                        &obj,
                        "--image-opts",
                        "-c",
                        "read -P 0x5c 0 64k",
                        &sp,
                    ],
                );
                assert_eq!(
                    q.success() && !q.stderr.contains("Invalid password"),
                    t2.success() && !t2.stderr.contains("Invalid password"),
                    "{o} {id}\n{}\n{}",
                    q.describe(),
                    t2.describe()
                );
                assert!(!q.stdout.contains("verification failed"), "{o} {id}");
            }
        }
    }
}
