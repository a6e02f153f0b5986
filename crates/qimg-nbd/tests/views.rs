//! Read replies are sent straight from the image file mapped into memory. A file that
//! shrinks under the server (someone truncates it behind the lock's back) must not kill the
//! server: reads of the lost range end that client's reply or read as zeros, and the server
//! keeps serving.

mod common;
use common::*;
use std::time::{Duration, Instant};

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("qnbdv").tempdir().unwrap()
}

#[test]
fn truncated_file_under_readers_does_not_kill_the_server() {
    if !have("nbdcopy") || !have("qemu-io") {
        return;
    }
    let d = tmp();
    let img = d.path().join("img.raw");
    let block: Vec<u8> = (0..1u32 << 20).map(|i| (i % 253 + 1) as u8).collect();
    let mut data = Vec::new();
    for _ in 0..64 {
        data.extend_from_slice(&block);
    }
    std::fs::write(&img, &data).unwrap();
    let sock = d.path().join("s");
    let mut srv = Srv::start(
        qimg_nbd(),
        &sock,
        &["-t", "-e", "4", "-f", "raw", img.to_str().unwrap()],
    );
    let uri = srv.uri("");
    // Readers copying the whole export while the file loses most of its length.
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let uri = uri.clone();
            std::thread::spawn(move || {
                let t0 = Instant::now();
                while t0.elapsed() < Duration::from_secs(2) {
                    let _ = run(20, "nbdcopy", &[&uri, "null:"]);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    for r in readers {
        r.join().unwrap();
    }
    assert_eq!(srv.child.try_wait().unwrap(), None, "the server died");
    // Still serving: what is left of the file reads back.
    ok(20, "qemu-io", &["-f", "raw", "-c", "read -P 1 0 1", &uri]);
    assert_eq!(srv.child.try_wait().unwrap(), None, "the server died");
    drop(srv);
    drop(data);
}
