//! Command-line errors read like qemu-nbd's: same text (with our program name) and the
//! same exit status, checked against qemu-nbd itself.

mod common;
use common::*;

#[test]
fn usage_errors_match_qemu_nbd() {
    if !have("qemu-nbd") {
        return;
    }
    let d = tempfile::Builder::new().prefix("qnbd").tempdir().unwrap();
    let raw = d.path().join("r.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let q = d.path().join("q.qcow2");
    ok(
        30,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", q.to_str().unwrap(), "1M"],
    );
    let r = raw.to_str().unwrap();
    let qq = q.to_str().unwrap();
    let long = "a".repeat(5000);
    let cases: Vec<Vec<&str>> = vec![
        vec![],
        vec![r, "extra"],
        vec!["-e", "-1", r],
        vec!["-e", "abc", r],
        vec!["-e", "2147483648", r],
        vec!["--discard=bad", r],
        vec!["--detect-zeroes=bad", r],
        vec!["--detect-zeroes=unmap", r],
        vec!["--cache=bad", r],
        vec!["--handshake-limit=x", r],
        vec!["--handshake-limit=-1", r],
        vec!["--aio=bad", r],
        vec!["-f", "raw", "-B", "bm", r],
        vec!["-B", "bm", qq],
        vec!["-l", "snap", qq],
        vec!["-f", "raw", "-x", &long, r],
        vec!["-f", "raw", "-D", &long, r],
        vec!["--bogus", r],
        vec!["-Z", r],
        vec!["-k"],
        vec!["--cache"],
        vec!["-f", "raw", "-p", "abc", r],
        vec!["-f", "qcow2", r],
        vec!["-f", "raw", "/nonexistent/x.raw"],
        vec!["-f", "raw", "-k", "/nonexistent/dir/s", r],
    ];
    for args in cases {
        let ours = run(10, qimg_nbd(), &args);
        let theirs = run(10, "qemu-nbd", &args);
        let norm = |o: &std::process::Output| {
            String::from_utf8_lossy(&o.stderr)
                .replace("qimg-nbd", "qemu-nbd")
                .replace("0.0.0.0", "127.0.0.1")
        };
        assert_eq!(ours.status.code(), theirs.status.code(), "{args:?}");
        assert_eq!(norm(&ours), norm(&theirs), "{args:?}");
    }
}

#[test]
fn help_and_version() {
    let h = ok(10, qimg_nbd(), &["--help"]);
    assert!(h.contains("--handshake-limit"));
    let v = ok(10, qimg_nbd(), &["-V"]);
    assert!(v.starts_with("qimg-nbd "));
}
