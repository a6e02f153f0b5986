//! `-B NAME`: the `qemu:dirty-bitmap:NAME` context of qimg-nbd against qemu-nbd. The same
//! writes go through a writable export of each server; then each image is exported
//! read-only by both servers and the bitmap is read with `qemu-img map` and
//! `x-dirty-bitmap` (iotest 223's method): all four maps must be equal.

mod common;

use common::*;
use std::path::Path;

fn qemu_img(args: &[&str]) -> String {
    ok(30, "qemu-img", args)
}

fn dirty_map(sock: &Path, bitmap: &str) -> String {
    let spec = format!(
        "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}",
        sock.display()
    );
    qemu_img(&["map", "--output=json", "--image-opts", &spec])
}

#[test]
fn dirty_bitmap_context_matches_qemu_nbd() {
    let t = tempfile::tempdir().unwrap();
    let sock = t.path().join("s");
    let mut images = Vec::new();
    for (n, srv) in [("qemu", "qemu-nbd"), ("qimg", qimg_nbd())] {
        let img = t.path().join(format!("{n}.qcow2"));
        let p = img.to_str().unwrap();
        qemu_img(&["create", "-q", "-f", "qcow2", p, "32M"]);
        qemu_img(&["bitmap", "--add", "-g", "4k", p, "fine"]);
        qemu_img(&["bitmap", "--add", p, "coarse"]);
        ok(30, "qemu-io", &["-f", "qcow2", "-c", "write 20M 1k", p]);
        {
            let s = Srv::start(srv, &sock, &["-f", "qcow2", "--discard=unmap", p]);
            ok(
                30,
                "qemu-io",
                &[
                    "-f",
                    "raw",
                    "-c",
                    "write 5000 3000",
                    "-c",
                    "write -z 1M 70k",
                    "-c",
                    "discard 3M 200k",
                    "-c",
                    "write 31M 1M",
                    &s.uri(""),
                ],
            );
            let mut s = s;
            assert_eq!(s.wait_exit(10), Some(0), "{srv} did not exit cleanly");
        }
        images.push(img);
    }
    for img in &images {
        let c = run(30, "qemu-img", &["check", img.to_str().unwrap()]);
        assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stdout));
        let info = qemu_img(&["info", img.to_str().unwrap()]);
        assert!(!info.contains("in-use"), "{info}");
    }
    for bitmap in ["fine", "coarse"] {
        let mut maps = Vec::new();
        for img in &images {
            for srv in ["qemu-nbd", qimg_nbd()] {
                let p = img.to_str().unwrap();
                let _s = Srv::start(srv, &sock, &["-r", "-f", "qcow2", "-B", bitmap, p]);
                maps.push((format!("{srv} {p}"), dirty_map(&sock, bitmap)));
            }
        }
        for m in &maps[1..] {
            assert_eq!(m.1, maps[0].1, "{bitmap}: {} vs {}", m.0, maps[0].0);
        }
        assert!(maps[0].1.contains("\"data\": false"));
    }
}

#[test]
fn bitmap_errors_match_qemu_nbd() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("i.qcow2");
    let p = img.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", p, "1M"]);
    qemu_img(&["bitmap", "--add", p, "b"]);
    let sock = t.path().join("s");
    let s = sock.to_str().unwrap();
    let a = run(10, "qemu-nbd", &["-k", s, "-B", "nope", p]);
    let b = run(10, qimg_nbd(), &["-k", s, "-B", "nope", p]);
    assert_eq!(a.status.code(), b.status.code());
    let strip = |o: &std::process::Output, prog: &str| {
        String::from_utf8_lossy(&o.stderr).replace(prog, "PROG")
    };
    assert_eq!(
        strip(&a, "qemu-nbd"),
        strip(
            &b,
            &std::path::Path::new(qimg_nbd())
                .file_name()
                .unwrap()
                .to_string_lossy()
        )
    );
    // Mark the bitmap in use (flags of the only directory entry).
    let data = std::fs::read(&img).unwrap();
    let mut d = data.clone();
    let dir = find_dir(&d);
    d[dir + 15] |= 1;
    std::fs::write(&img, &d).unwrap();
    let a = run(10, "qemu-nbd", &["-r", "-k", s, "-B", "b", p]);
    let b = run(10, qimg_nbd(), &["-r", "-k", s, "-B", "b", p]);
    assert_eq!(a.status.code(), b.status.code());
    assert!(strip(&b, "qimg-nbd").contains("Bitmap 'b' is inconsistent and cannot be used"));
    assert_eq!(strip(&a, "qemu-nbd"), strip(&b, "qimg-nbd"));
}

/// Offset of the bitmap directory, from the header extension.
fn find_dir(d: &[u8]) -> usize {
    let be32 = |o: usize| u32::from_be_bytes(d[o..o + 4].try_into().unwrap()) as usize;
    let be64 = |o: usize| u64::from_be_bytes(d[o..o + 8].try_into().unwrap()) as usize;
    let mut off = be32(100);
    loop {
        let (t, l) = (be32(off), be32(off + 4));
        assert_ne!(t, 0, "no bitmaps extension");
        if t == 0x2385_2875 {
            return be64(off + 24);
        }
        off += 8 + l.div_ceil(8) * 8;
    }
}
