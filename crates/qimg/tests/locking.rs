//! QEMU-compatible image locking, both ways, with real QEMU processes.

use qimg::open::{open_image, OpenOptions};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn create(p: &std::path::Path) {
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(p)
        .arg("1M")
        .status()
        .unwrap();
    assert!(st.success());
}

/// Starts qemu-io holding the image (read-write unless `ro`) until killed.
fn hold(p: &std::path::Path, ro: bool) -> std::process::Child {
    let mut cmd = Command::new("qemu-io");
    if ro {
        cmd.arg("-r");
    }
    let child = cmd
        .args(["-c", "sleep 20000"])
        .arg(p)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until its locks are in place: a writable open starts failing.
    let start = Instant::now();
    while open_image(
        p,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .is_ok()
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "qemu-io took no locks"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

#[test]
fn qimg_respects_qemu_locks() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("l.qcow2");
    create(&p);
    let before = std::fs::read(&p).unwrap();
    let mut q = hold(&p, false);
    let w = open_image(
        &p,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    let r = open_image(&p, &OpenOptions::default())
        .unwrap_err()
        .to_string();
    let shared = open_image(
        &p,
        &OpenOptions {
            force_share: true,
            ..Default::default()
        },
    );
    q.kill().unwrap();
    q.wait().unwrap();
    let name = p.display();
    assert_eq!(
        w,
        format!("Failed to get \"write\" lock\nIs another process using the image [{name}]?")
    );
    assert_eq!(
        r,
        format!(
            "Failed to get shared \"write\" lock\nIs another process using the image [{name}]?"
        )
    );
    assert!(shared.is_ok(), "-U must coexist with a writer");
    drop(shared);
    assert_eq!(
        std::fs::read(&p).unwrap(),
        before,
        "a refused open must not touch the image"
    );
}

#[test]
fn qemu_respects_qimg_locks() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.qcow2");
    create(&p);
    let img = open_image(
        &p,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap();
    let out = Command::new("qemu-img")
        .arg("info")
        .arg(&p)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Failed to get shared \"write\" lock"));
    let out = Command::new("qemu-img")
        .args(["info", "-U"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img info -U must work beside a qimg writer"
    );
    drop(img);
    let out = Command::new("qemu-img")
        .arg("info")
        .arg(&p)
        .output()
        .unwrap();
    assert!(out.status.success(), "locks must go away with the image");
    // A qimg reader blocks QEMU writers but not QEMU readers.
    let ro = open_image(&p, &OpenOptions::default()).unwrap();
    let out = Command::new("qemu-io")
        .args(["-c", "write 0 512"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let out = Command::new("qemu-img")
        .arg("info")
        .arg(&p)
        .output()
        .unwrap();
    assert!(out.status.success());
    drop(ro);
}
