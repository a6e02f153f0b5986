//! `convert` maps raw and qcow2 sources into memory (one copy less than reading them). A
//! source that shrinks under a running conversion then raises SIGBUS; the CLI turns that into
//! qemu-img's kind of failure: a one-line error and exit status 1, never a signal death.

mod common;

use common::*;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Sources that shrink while being converted: the process must end with 0 (it finished
/// first) or 1 with the message, whatever the timing; over a few timings, at least one run
/// must have seen the shrink.
#[test]
fn shrinking_source_is_an_error_not_a_crash() {
    if testing_qemu_img_itself() {
        return;
    }
    let t = Tmp::new("convert-mapped");
    let dir = t.path();
    let mut saw_error = false;
    for (i, delay_ms) in [0u64, 5, 20, 60].iter().enumerate() {
        let src = dir.join(format!("src{i}.raw"));
        // Non-zero data everywhere, so every chunk is read.
        let block: Vec<u8> = (0..1 << 20).map(|b: u32| (b % 251 + 1) as u8).collect();
        let mut data = Vec::with_capacity(128 << 20);
        for _ in 0..128 {
            data.extend_from_slice(&block);
        }
        std::fs::write(&src, &data).unwrap();
        drop(data);
        let dst = dir.join(format!("dst{i}.qcow2"));
        let child = Command::new(bin_under_test())
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&src)
            .arg(&dst)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(*delay_ms));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&src)
            .unwrap()
            .set_len(4096)
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.signal(),
            None,
            "convert died of a signal; stderr: {err}"
        );
        match out.status.code() {
            Some(0) => {}
            Some(1) => {
                assert_eq!(err.lines().count(), 1, "one line expected: {err}");
                // SIGBUS in a reader thread says "error while reading"; a write from the
                // lost pages fails in the kernel instead (EFAULT), "error while writing".
                assert!(err.contains("error while"), "{err}");
                saw_error = true;
            }
            c => panic!("unexpected exit {c:?}: {err}"),
        }
    }
    assert!(
        saw_error,
        "no run saw the source shrink; the test does not test anything"
    );
}
