//! Long-running checks, run with `cargo test -p qimg-nbd -- --ignored`.

mod common;
use common::*;

/// fio random writes with verification over four connections for a minute, while
/// hostile connections come and go.
#[test]
#[ignore]
fn soak_fio_verify_multi_conn() {
    if !have("fio") {
        return;
    }
    let d = tempfile::Builder::new().prefix("qnbd").tempdir().unwrap();
    let img = d.path().join("img.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let sock = d.path().join("s");
    let srv = Srv::start(
        qimg_nbd(),
        &sock,
        &[
            "-t",
            "-e",
            "0",
            "--handshake-limit=1",
            "-f",
            "raw",
            img.to_str().unwrap(),
        ],
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let noise = {
        let stop = stop.clone();
        let sock = sock.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(mut s) = std::os::unix::net::UnixStream::connect(&sock) {
                    let _ = s.write_all(&n.to_be_bytes().repeat(8));
                }
                n += 1;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        })
    };
    let uri = srv.uri("");
    let out = run(
        180,
        "fio",
        &[
            "--name=soak",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randrw",
            "--bsrange=512-256k",
            "--iodepth=16",
            "--numjobs=4",
            "--size=64M",
            "--offset_increment=64M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--runtime=60",
            "--time_based",
        ],
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    noise.join().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let size = ok(30, "nbdinfo", &["--size", &uri]);
    assert_eq!(size.trim(), (256u64 << 20).to_string());
}
