//! `convert --bitmaps` copies persistent bitmaps like qemu-img: same list, same bits.

use std::path::Path;
use std::process::Command;

fn bin() -> String {
    std::env::var("QIMG_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_qimg").to_string())
}

fn run(dir: &Path, prog: &str, args: &[&str]) -> std::process::Output {
    Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn ok(dir: &Path, prog: &str, args: &[&str]) {
    let o = run(dir, prog, args);
    assert!(
        o.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The dirty ranges of every bitmap, read through the library.
fn bits(path: &Path) -> Vec<(String, Vec<(u64, u64)>)> {
    let img = qimg::open::open_image(path, &qimg::open::OpenOptions::default()).unwrap();
    let q = img.as_any().downcast_ref::<qimg::qcow2::Qcow2>().unwrap();
    q.bitmap_list()
        .into_iter()
        .map(|b| (b.name.clone(), q.bitmap_dirty_ranges(&b.name).unwrap()))
        .collect()
}

#[test]
fn convert_bitmaps_matches_qemu_img() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "s.qcow2", "8M"],
    );
    ok(d, "qemu-img", &["bitmap", "--add", "s.qcow2", "b1"]);
    ok(
        d,
        "qemu-io",
        &["-c", "write 0 64k", "-c", "write 3M 5k", "s.qcow2"],
    );
    ok(
        d,
        "qemu-img",
        &[
            "bitmap",
            "--add",
            "--disable",
            "-g",
            "4096",
            "s.qcow2",
            "b2",
        ],
    );
    ok(
        d,
        "qemu-img",
        &["bitmap", "--add", "-g", "512", "s.qcow2", "b3"],
    );
    ok(d, "qemu-io", &["-c", "write 7M 1k", "s.qcow2"]);
    ok(
        d,
        "qemu-img",
        &["convert", "--bitmaps", "-O", "qcow2", "s.qcow2", "q.qcow2"],
    );
    ok(
        d,
        &bin(),
        &["convert", "--bitmaps", "-O", "qcow2", "s.qcow2", "t.qcow2"],
    );
    ok(d, "qemu-img", &["check", "t.qcow2"]);
    assert_eq!(bits(&d.join("q.qcow2")), bits(&d.join("t.qcow2")));
    let info = |f: &str| {
        let o = run(d, "qemu-img", &["info", "--output=json", f]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["format-specific"]["data"]["bitmaps"].clone()
    };
    assert_eq!(info("q.qcow2"), info("t.qcow2"));
    // Raw targets cannot carry bitmaps: same message and exit code.
    let a = run(
        d,
        "qemu-img",
        &["convert", "--bitmaps", "-O", "raw", "s.qcow2", "q.raw"],
    );
    let b = run(
        d,
        &bin(),
        &["convert", "--bitmaps", "-O", "raw", "s.qcow2", "t.raw"],
    );
    assert_eq!(a.status.code(), b.status.code());
    let strip = |o: &std::process::Output| {
        String::from_utf8_lossy(&o.stderr)
            .split_once(": ")
            .map(|x| x.1.to_string())
    };
    assert_eq!(strip(&a), strip(&b));
}
