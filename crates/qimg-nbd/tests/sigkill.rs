//! SIGKILL of the server under a write load, many times, on a qcow2 export: after every
//! kill the image must pass `qemu-img check` (leaks allowed) and every write the client
//! saw flushed must read back.

mod common;
use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn sigkill_under_write_load_keeps_flushed_data() {
    if !have("qemu-io") || !have("qemu-img") {
        return;
    }
    let d = tempfile::Builder::new()
        .prefix("qnbd-kill")
        .tempdir()
        .unwrap();
    let img = d.path().join("img.qcow2");
    let ip = img.to_str().unwrap();
    ok(
        30,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            ip,
            "32M",
        ],
    );
    for round in 0..8u64 {
        let sock = d.path().join(format!("s{round}"));
        let mut srv = Srv::start(qimg_nbd(), &sock, &["-t", "-f", "qcow2", ip]);
        let uri = srv.uri("");
        // A flushed pattern for this round, in its own 1 MiB region.
        let pat = 0x10 + round as u8;
        let region = round * (2 << 20);
        ok(
            60,
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                &format!("write -P {pat} {region} 1M"),
                "-c",
                "flush",
                &uri,
            ],
        );
        // Then a stream of unflushed writes all over the disk, killed part-way.
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw"]);
        for k in 0..400u64 {
            let off = (k * 7919 * 4096 + round * 12288) % ((32 << 20) - 65536);
            // Never touch the flushed regions of this or earlier rounds.
            let off = if off < (round + 1) * (2 << 20) {
                off + (round + 1) * (2 << 20)
            } else {
                off
            };
            let off = off.min((32 << 20) - 65536);
            cmd.args(["-c", &format!("write -P 0xee {off} 5000")]);
        }
        cmd.arg(&uri).stdout(Stdio::null()).stderr(Stdio::null());
        let mut writer = cmd.spawn().unwrap();
        std::thread::sleep(Duration::from_millis(20 + round * 15));
        srv.signal(libc::SIGKILL);
        srv.wait_exit(10);
        let _ = writer.kill();
        let _ = writer.wait();
        let out = run(60, "qemu-img", &["check", ip]);
        let code = out.status.code();
        assert!(
            code == Some(0) || code == Some(3),
            "round {round}: qemu-img check: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // Every earlier flushed region is intact.
        for r in 0..=round {
            let p = 0x10 + r as u8;
            let out = run(
                30,
                "qemu-io",
                &["-r", "-c", &format!("read -P {p} {} 1M", r * (2 << 20)), ip],
            );
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && !text.contains("Pattern verification failed"),
                "round {round}: flushed region {r} lost: {text}"
            );
        }
    }
}
