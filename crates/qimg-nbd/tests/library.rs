//! Embedding the server: a library user owns the listeners, serves exports, and stops the
//! server through its handle.

mod common;
use common::*;
use qimg::open::{open_image, OpenOptions};
use qimg_nbd::{Export, Server, ServerConfig};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

#[test]
fn embedded_tcp_and_unix_with_two_exports() {
    if !have("nbdinfo") || !have("qemu-io") {
        return;
    }
    let d = tempfile::Builder::new().prefix("qnbd").tempdir().unwrap();
    let a = d.path().join("a.raw");
    let b = d.path().join("b.raw");
    make_raw(&a, 2 << 20);
    make_raw(&b, 1 << 20);
    let open = |p: &std::path::Path, w: bool| {
        open_image(
            p,
            &OpenOptions {
                format: Some("raw".into()),
                writable: w,
                ..OpenOptions::default()
            },
        )
        .unwrap()
    };
    let mut ea = Export::new("a", open(&a, true));
    ea.description = Some("disk a".into());
    let mut eb = Export::new("b", open(&b, false));
    eb.read_only = true;
    eb.allocation_depth = true;
    let config = ServerConfig {
        max_connections: 0,
        ..ServerConfig::default()
    };
    let server = Server::new(vec![ea, eb], config).unwrap();
    assert_eq!(server.export_size("a"), Some(2 << 20));
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = tcp.local_addr().unwrap().port();
    let sock = d.path().join("s");
    let unix = UnixListener::bind(&sock).unwrap();
    let s1 = server.clone();
    let t1 = std::thread::spawn(move || s1.serve(tcp.into()));
    let s2 = server.clone();
    let t2 = std::thread::spawn(move || s2.serve(unix.into()));

    let list = ok(
        30,
        "nbdinfo",
        &["--list", &format!("nbd://127.0.0.1:{port}")],
    );
    assert!(
        list.contains("export=\"a\"") && list.contains("export=\"b\""),
        "{list}"
    );
    assert!(list.contains("disk a"));
    let u = format!("nbd+unix:///a?socket={}", sock.display());
    ok(
        30,
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x42 4096 4096", &u],
    );
    let r = ok(
        30,
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x42 4096 4096",
            &format!("nbd://127.0.0.1:{port}/a"),
        ],
    );
    assert!(!r.contains("failed"), "{r}");
    let ro = run(
        30,
        "nbdinfo",
        &["--can", "write", &format!("nbd://127.0.0.1:{port}/b")],
    );
    assert_eq!(ro.status.code(), Some(2));

    let t0 = Instant::now();
    server.shutdown_handle().shutdown();
    t1.join().unwrap().unwrap();
    t2.join().unwrap().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(server.active_connections(), 0);
}

#[test]
fn invalid_configurations_are_refused() {
    let st = std::sync::Arc::new(qimg::storage::MemStorage::new(vec![0; 4096]));
    let img: std::sync::Arc<dyn qimg::Image> =
        std::sync::Arc::new(qimg::raw::Raw::open(st, false).unwrap());
    let dup = Server::new(
        vec![Export::new("x", img.clone()), Export::new("x", img.clone())],
        ServerConfig::default(),
    );
    assert!(dup.is_err());
    let long = Server::new(
        vec![Export::new("n".repeat(5000), img)],
        ServerConfig::default(),
    );
    assert!(long.is_err());
}
