//! qimg-nbd against real NBD clients (qemu-io, qemu-img, nbdinfo, nbdcopy), with
//! qemu-nbd serving the same image as the oracle where outputs are compared.

mod common;
use common::*;
use std::path::Path;

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("qnbd").tempdir().unwrap()
}

fn files_equal(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

/// The same qemu-io script applied to a raw file directly and through qimg-nbd must leave
/// identical bytes, and the patterns must read back through NBD.
#[test]
fn qemu_io_patterns_match_raw_reference() {
    if !have("qemu-io") {
        return;
    }
    let d = tmp();
    let reference = d.path().join("ref.raw");
    let img = d.path().join("img.raw");
    make_raw(&reference, 8 << 20);
    make_raw(&img, 8 << 20);
    let ops = [
        "write -P 0xaa 0 64k",
        "write -P 0x55 1048577 3000",
        "write -z 2M 128k",
        "write -z -u 3M 64k",
        "discard 4M 64k",
        // Two writes in flight at once; they must not overlap, since NBD (and qemu-io's
        // own aio on a file) may complete overlapping writes in either order.
        "aio_write -P 0x11 5238784 4k",
        "aio_write -P 0x22 5242881 4095",
        "aio_flush",
        "write -P 0x33 8388096 512",
        "flush",
    ];
    let mut args: Vec<&str> = vec!["-f", "raw"];
    for op in &ops {
        args.push("-c");
        args.push(op);
    }
    let mut direct = args.clone();
    let r = reference.to_str().unwrap();
    direct.push(r);
    ok(60, "qemu-io", &direct);

    let sock = d.path().join("s");
    let mut srv = Srv::start(
        qimg_nbd(),
        &sock,
        &["-t", "-f", "raw", "--discard=unmap", img.to_str().unwrap()],
    );
    let uri = srv.uri("");
    let mut via = args.clone();
    via.push(&uri);
    ok(60, "qemu-io", &via);
    let check = ok(
        60,
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0xaa 0 64k",
            "-c",
            "read -P 0x55 1048577 3000",
            "-c",
            "read -P 0 2M 128k",
            "-c",
            "read -P 0x22 5242881 4095",
            "-c",
            "read -P 0x33 8388096 512",
            &uri,
        ],
    );
    assert!(!check.contains("Pattern verification failed"), "{check}");
    srv.signal(libc::SIGTERM);
    assert_eq!(srv.wait_exit(10), Some(0));
    assert!(
        files_equal(&reference, &img),
        "NBD result differs from direct qemu-io"
    );
}

/// qemu-img map/info/compare/convert over NBD, compared with qemu-nbd on the same chain.
#[test]
fn qemu_img_over_nbd_matches_qemu_nbd() {
    if !have("qemu-img") || !have("qemu-nbd") {
        return;
    }
    let d = tmp();
    let top = make_chain(d.path());
    let t = top.to_str().unwrap();
    let ours = Srv::start(
        qimg_nbd(),
        &d.path().join("a"),
        &["-t", "-r", "-A", "-f", "qcow2", t],
    );
    let theirs = Srv::start(
        "qemu-nbd",
        &d.path().join("b"),
        &["-t", "-r", "-A", "-f", "qcow2", t],
    );
    let (u_ours, u_theirs) = (ours.uri(""), theirs.uri(""));
    let m1 = ok(
        30,
        "qemu-img",
        &["map", "--output=json", "-f", "raw", &u_ours],
    );
    let m2 = ok(
        30,
        "qemu-img",
        &["map", "--output=json", "-f", "raw", &u_theirs],
    );
    assert_eq!(m1, m2);
    let i1 = ok(
        30,
        "qemu-img",
        &["info", "--output=json", "-f", "raw", &u_ours],
    );
    assert!(i1.contains("\"virtual-size\": 4194304"), "{i1}");
    ok(
        30,
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", &u_ours, t],
    );
    let out = d.path().join("out.qcow2");
    ok(
        60,
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            &u_ours,
            out.to_str().unwrap(),
        ],
    );
    ok(30, "qemu-img", &["compare", out.to_str().unwrap(), t]);
    // qemu:allocation-depth read through QEMU's own client (extended headers).
    let opts = |s: &Path| {
        format!(
            "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:allocation-depth",
            s.display()
        )
    };
    let m1 = ok(
        30,
        "qemu-img",
        &["map", "--output=json", "--image-opts", &opts(&ours.sock)],
    );
    let m2 = ok(
        30,
        "qemu-img",
        &["map", "--output=json", "--image-opts", &opts(&theirs.sock)],
    );
    assert_eq!(m1, m2);
}

fn nbdinfo_all(uri: &str, sock: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let s = sock.display().to_string();
    let j = run(30, "nbdinfo", &["--json", uri]);
    out.push(String::from_utf8_lossy(&j.stdout).replace(&s, "SOCK"));
    let l = run(30, "nbdinfo", &["--list", "--json", uri]);
    out.push(String::from_utf8_lossy(&l.stdout).replace(&s, "SOCK"));
    for ctx in ["base:allocation", "qemu:allocation-depth"] {
        let m = run(30, "nbdinfo", &[&format!("--map={ctx}"), uri]);
        out.push(format!(
            "{ctx}: {} {}",
            m.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&m.stdout)
        ));
    }
    for can in [
        "cache",
        "df",
        "fast-zero",
        "flush",
        "fua",
        "multi-conn",
        "trim",
        "zero",
        "read",
        "write",
        "structured-reply",
    ] {
        let c = run(30, "nbdinfo", &["--can", can, uri]);
        out.push(format!("can {can}: {:?}", c.status.code()));
    }
    out
}

/// nbdinfo sees the same thing from qimg-nbd and qemu-nbd: flags, sizes, block sizes,
/// contexts, maps and `--can` answers, for several option sets and formats.
#[test]
fn nbdinfo_matches_qemu_nbd() {
    if !have("nbdinfo") || !have("qemu-nbd") {
        return;
    }
    let d = tmp();
    let top = make_chain(d.path());
    let raw = d.path().join("r.raw");
    make_raw(&raw, 3 << 20);
    let odd = d.path().join("odd.raw");
    make_raw(&odd, 1_000_000);
    let cases: Vec<(Vec<&str>, &Path, &str)> = vec![
        (vec!["-r", "-f", "qcow2", "-A"], &top, "qcow2"),
        (vec!["-f", "raw"], &raw, "raw"),
        (vec!["-r", "-e", "2", "-f", "raw", "-A"], &raw, "raw"),
        (
            vec!["-e", "4", "-A", "-D", "desc", "-x", "exp1", "-f", "raw"],
            &raw,
            "raw",
        ),
        (vec!["-r", "-f", "raw"], &odd, "raw"),
    ];
    for (i, (args, img, _fmt)) in cases.iter().enumerate() {
        let mut a = vec!["-t"];
        a.extend(args.iter());
        a.push(img.to_str().unwrap());
        let name = if args.contains(&"exp1") { "exp1" } else { "" };
        let sa = d.path().join(format!("a{i}"));
        let ours = Srv::start(qimg_nbd(), &sa, &a);
        let r1 = nbdinfo_all(&ours.uri(name), &sa);
        drop(ours);
        let theirs = Srv::start("qemu-nbd", &sa, &a);
        let r2 = nbdinfo_all(&theirs.uri(name), &sa);
        drop(theirs);
        assert_eq!(r1, r2, "case {args:?}");
    }
}

/// nbdcopy in both directions, with several connections and many requests in flight.
#[test]
fn nbdcopy_both_ways() {
    if !have("nbdcopy") || !have("qemu-img") {
        return;
    }
    let d = tmp();
    let img = d.path().join("img.raw");
    make_raw(&img, 16 << 20);
    let src = d.path().join("src.raw");
    {
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(16 << 20).unwrap();
        use std::os::unix::fs::FileExt;
        let v: Vec<u8> = (0..(3 << 20)).map(|i: u32| (i % 251) as u8).collect();
        f.write_all_at(&v, 5 << 20).unwrap();
    }
    let sock = d.path().join("s");
    let mut srv = Srv::start(
        qimg_nbd(),
        &sock,
        &[
            "-t",
            "-e",
            "4",
            "--discard=unmap",
            "-f",
            "raw",
            img.to_str().unwrap(),
        ],
    );
    let out = d.path().join("out.raw");
    ok(
        60,
        "nbdcopy",
        &["--connections=4", &srv.uri(""), out.to_str().unwrap()],
    );
    assert!(files_equal(&img, &out));
    ok(
        60,
        "nbdcopy",
        &[
            "--connections=4",
            "--requests=32",
            src.to_str().unwrap(),
            &srv.uri(""),
        ],
    );
    srv.signal(libc::SIGTERM);
    assert_eq!(srv.wait_exit(10), Some(0));
    assert!(files_equal(&img, &src));

    // A backing chain read whole through NBD equals qemu-img's own conversion.
    let top = make_chain(d.path());
    let s2 = Srv::start(
        qimg_nbd(),
        &d.path().join("s2"),
        &["-t", "-r", top.to_str().unwrap()],
    );
    let got = d.path().join("chain.raw");
    ok(60, "nbdcopy", &[&s2.uri(""), got.to_str().unwrap()]);
    let want = d.path().join("want.raw");
    ok(
        60,
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            top.to_str().unwrap(),
            want.to_str().unwrap(),
        ],
    );
    assert!(files_equal(&got, &want));
}

/// `-e 4`: four qemu-io processes write different regions at the same time.
#[test]
fn concurrent_writers_multi_conn() {
    if !have("qemu-io") {
        return;
    }
    let d = tmp();
    let img = d.path().join("img.raw");
    make_raw(&img, 8 << 20);
    let sock = d.path().join("s");
    let srv = Srv::start(
        qimg_nbd(),
        &sock,
        &["-t", "-e", "4", "-f", "raw", img.to_str().unwrap()],
    );
    let uri = srv.uri("");
    let handles: Vec<_> = (0..4u32)
        .map(|i| {
            let uri = uri.clone();
            std::thread::spawn(move || {
                let mut args = vec!["-f".to_string(), "raw".to_string()];
                for k in 0..16u32 {
                    args.push("-c".into());
                    let off = (i << 21) + k * 128 * 1024;
                    args.push(format!("aio_write -P {} {off} 128k", 0x10 + i));
                }
                args.push("-c".into());
                args.push("aio_flush".into());
                args.push(uri);
                let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
                ok(60, "qemu-io", &a)
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    for i in 0..4u32 {
        let pat = format!("read -P {} {} 2M", 0x10 + i, i << 21);
        let o = ok(60, "qemu-io", &["-f", "raw", "-r", "-c", &pat, &uri]);
        assert!(!o.contains("verification failed"), "{o}");
    }
}

/// A read-only export refuses writes (client side via the flag, and server side).
#[test]
fn read_only_export_refuses_writes() {
    if !have("qemu-io") {
        return;
    }
    let d = tmp();
    let img = d.path().join("img.raw");
    make_raw(&img, 1 << 20);
    let before = std::fs::read(&img).unwrap();
    let srv = Srv::start(
        qimg_nbd(),
        &d.path().join("s"),
        &["-t", "-r", "-f", "raw", img.to_str().unwrap()],
    );
    let o = run(
        30,
        "qemu-io",
        &["-f", "raw", "-c", "write -P 9 0 4k", &srv.uri("")],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        !o.status.success()
            || text.contains("failed")
            || text.contains("read-only")
            || text.contains("Read-only"),
        "{text}"
    );
    ok(
        30,
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read 0 4k", &srv.uri("")],
    );
    drop(srv);
    assert_eq!(std::fs::read(&img).unwrap(), before);
}

/// Without -t the server exits once its last client leaves; SIGTERM exits cleanly and
/// removes the socket.
#[test]
fn exits_after_last_client_and_on_sigterm() {
    if !have("nbdinfo") {
        return;
    }
    let d = tmp();
    let img = d.path().join("img.raw");
    make_raw(&img, 1 << 20);
    let sock = d.path().join("s");
    let mut srv = Srv::start(qimg_nbd(), &sock, &["-f", "raw", img.to_str().unwrap()]);
    ok(30, "nbdinfo", &["--size", &srv.uri("")]);
    assert_eq!(srv.wait_exit(10), Some(0));
    assert!(!sock.exists());

    let pid = d.path().join("pid");
    let mut srv = Srv::start(
        qimg_nbd(),
        &sock,
        &[
            "-t",
            "--pid-file",
            pid.to_str().unwrap(),
            "-f",
            "raw",
            img.to_str().unwrap(),
        ],
    );
    // A client stuck in the handshake must not hold up shutdown.
    let _idle = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    let p = std::fs::read_to_string(&pid).unwrap();
    assert_eq!(p.trim(), srv.child.id().to_string());
    srv.signal(libc::SIGTERM);
    assert_eq!(srv.wait_exit(10), Some(0));
    assert!(!sock.exists());
}

/// `--fork` returns once the server listens; the child keeps serving.
#[test]
fn fork_detaches_after_listening() {
    if !have("nbdinfo") {
        return;
    }
    let d = tmp();
    let img = d.path().join("img.raw");
    make_raw(&img, 1 << 20);
    let sock = d.path().join("s");
    let pid = d.path().join("pid");
    let o = run(
        20,
        qimg_nbd(),
        &[
            "--fork",
            "-k",
            sock.to_str().unwrap(),
            "--pid-file",
            pid.to_str().unwrap(),
            "-f",
            "raw",
            img.to_str().unwrap(),
        ],
    );
    assert!(o.status.success());
    assert!(sock.exists());
    let size = ok(
        30,
        "nbdinfo",
        &["--size", &format!("nbd+unix:///?socket={}", sock.display())],
    );
    assert_eq!(size.trim(), "1048576");
    // Not persistent: the child exits after that client.
    let t0 = std::time::Instant::now();
    while sock.exists() && t0.elapsed().as_secs() < 10 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(!sock.exists());
}

/// `-s`: writes go to a temporary overlay; the image is untouched, and the chain seen
/// through the export (maps, allocation depth) matches qemu-nbd's after the same writes.
#[test]
fn snapshot_mode_matches_qemu_nbd() {
    if !have("qemu-io") || !have("nbdinfo") || !have("qemu-nbd") {
        return;
    }
    let d = tmp();
    let top = make_chain(d.path());
    let before = std::fs::read(&top).unwrap();
    let mut maps = Vec::new();
    for prog in [qimg_nbd(), "qemu-nbd"] {
        let sock = d.path().join("s");
        let srv = Srv::start(
            prog,
            &sock,
            &["-t", "-s", "-A", "-f", "qcow2", top.to_str().unwrap()],
        );
        let u = srv.uri("");
        ok(
            30,
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 0x61 128k 64k",
                "-c",
                "write -P 0x62 1M 64k",
                "-c",
                "write -z 3M 64k",
                &u,
            ],
        );
        let r = ok(
            30,
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "read -P 0x61 128k 64k",
                "-c",
                "read -P 1 0 64k",
                "-c",
                "read -P 3 64k 64k",
                "-c",
                "read -P 0x62 1M 64k",
                "-c",
                "read -P 0 3M 64k",
                &u,
            ],
        );
        assert!(!r.contains("failed"), "{r}");
        let mut m = String::new();
        for ctx in ["base:allocation", "qemu:allocation-depth"] {
            m += &ok(30, "nbdinfo", &[&format!("--map={ctx}"), &u]);
        }
        maps.push(m);
        drop(srv);
    }
    assert_eq!(maps[0], maps[1]);
    assert_eq!(std::fs::read(&top).unwrap(), before);
}
