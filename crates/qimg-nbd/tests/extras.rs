//! `-o/--offset`, `--image-opts`, `-L/--list` and raw-image details, with qemu-nbd as the
//! oracle: the same clients run against both servers and must see the same thing.

mod common;
use common::*;
use std::path::Path;

/// Output of a client run against `prog` serving `args` (plus `-k SOCK`).
fn against(prog: &str, dir: &Path, args: &[&str], client: impl Fn(&Srv) -> String) -> String {
    let srv = Srv::start(prog, &dir.join("s.sock"), args);
    client(&srv)
}

/// The same, for qemu-nbd and qimg-nbd, asserting equal outputs.
fn same(dir: &Path, args: &[&str], client: impl Fn(&Srv) -> String) -> String {
    let want = against("qemu-nbd", dir, args, &client);
    let got = against(qimg_nbd(), dir, args, &client);
    assert_eq!(got, want, "qimg-nbd {args:?} differs from qemu-nbd");
    got
}

fn maps(srv: &Srv) -> String {
    let u = srv.uri("");
    let mut s = ok(20, "nbdinfo", &["--size", &u]);
    s += &ok(20, "nbdinfo", &["--map", &u]);
    s += &ok(20, "nbdinfo", &["--map=qemu:allocation-depth", &u]);
    s
}

/// qemu-io output without its timing lines.
fn no_timings(s: String) -> String {
    s.lines()
        .filter(|l| !l.contains(" ops; "))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Error line without the program name.
fn err_of(prog: &str, args: &[&str]) -> (Option<i32>, String) {
    let o = run(10, prog, args);
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    let e = e.replace("qemu-nbd:", "P:").replace("qimg-nbd:", "P:");
    (o.status.code(), e)
}

#[test]
fn offset_matches_qemu_nbd() {
    if !have("qemu-nbd") || !have("nbdinfo") || !have("qemu-io") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let top = make_chain(d.path());
    let t = top.to_str().unwrap();
    // Reads and block status through the offset node (which hides the backing chain).
    for off in ["4096", "0x10000", "1048576", "4194304"] {
        same(
            d.path(),
            &["-t", "-r", "-A", "-f", "qcow2", "-o", off, t],
            maps,
        );
    }
    let out = same(
        d.path(),
        &["-t", "-r", "-f", "qcow2", "-o", "61440", t],
        |s| {
            no_timings(ok(
                20,
                "qemu-io",
                &[
                    "-r",
                    "-f",
                    "raw",
                    "-c",
                    "read -P 1 0 4096",
                    "-c",
                    "read -P 3 4096 64k",
                    "-c",
                    "read -P 2 0xf1000 64k",
                    "-c",
                    "read -P 0 0x1f1000 64k",
                    &s.uri(""),
                ],
            ))
        },
    );
    assert!(!out.contains("failed"), "{out}");

    // Writes land at image offset + export offset: run the same writes through both
    // servers on two copies of a raw image and compare the results.
    let raw = d.path().join("a.raw");
    make_raw(&raw, 4 << 20);
    let mut results = Vec::new();
    for prog in ["qemu-nbd", qimg_nbd()] {
        let copy = d.path().join(format!("w{}.raw", results.len()));
        std::fs::copy(&raw, &copy).unwrap();
        let c = copy.to_str().unwrap();
        let srv = Srv::start(
            prog,
            &d.path().join("w.sock"),
            &["-t", "-f", "raw", "-o", "3072", c],
        );
        let out = ok(
            20,
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 0x55 0 4096",
                "-c",
                "write -z 8192 12288",
                "-c",
                "write -P 0x66 0x3ff000 1024",
                "-c",
                "read -P 0x55 0 4096",
                &srv.uri(""),
            ],
        );
        assert!(!out.contains("failed"), "{out}");
        drop(srv);
        results.push(std::fs::read(&copy).unwrap());
    }
    assert!(results[0] == results[1], "images written through -o differ");

    // Option and open-time errors, word for word.
    let qimg = qimg_nbd();
    for off in [
        "-5",
        "-0x10",
        "1k",
        "0x",
        "",
        "08",
        "99999999",
        "18446744073709551616",
    ] {
        let sock = d.path().join("e.sock");
        let s = sock.to_str().unwrap();
        let args = ["-k", s, "-f", "qcow2", "-o", off, t];
        assert_eq!(err_of(qimg, &args), err_of("qemu-nbd", &args), "-o {off:?}");
    }
    let sock = d.path().join("e.sock");
    let s = sock.to_str().unwrap();
    ok(20, "qemu-img", &["bitmap", "--add", t, "bm"]);
    let args = ["-k", s, "-f", "qcow2", "-o", "512", "-B", "bm", t];
    assert_eq!(err_of(qimg, &args), err_of("qemu-nbd", &args));
}

#[test]
fn raw_zero_writes_keep_or_release_space_like_qemu_nbd() {
    if !have("qemu-nbd") || !have("qemu-io") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.raw");
    let b = base.to_str().unwrap();
    ok(20, "qemu-img", &["create", "-q", "-f", "raw", b, "4M"]);
    ok(20, "qemu-io", &["-f", "raw", "-c", "write -P 7 0 4M", b]);
    use std::os::unix::fs::MetadataExt;
    let mut blocks = Vec::new();
    for prog in ["qemu-nbd", qimg_nbd()] {
        for discard in ["ignore", "unmap"] {
            let copy = d.path().join("c.raw");
            std::fs::copy(&base, &copy).unwrap();
            let c = copy.to_str().unwrap();
            let dopt = format!("--discard={discard}");
            let srv = Srv::start(prog, &d.path().join("z.sock"), &["-f", "raw", &dopt, c]);
            // `write -z` sends NO_HOLE; `-u` allows unmapping.
            ok(
                20,
                "qemu-io",
                &[
                    "-f",
                    "raw",
                    "-c",
                    "write -z 0 1M",
                    "-c",
                    "write -z -u 1M 1M",
                    &srv.uri(""),
                ],
            );
            drop(srv);
            let md = std::fs::metadata(&copy).unwrap();
            let data = std::fs::read(&copy).unwrap();
            assert!(data[..2 << 20].iter().all(|&x| x == 0));
            blocks.push((discard, md.blocks()));
        }
    }
    assert_eq!(
        blocks[..2],
        blocks[2..],
        "allocation after zero writes differs"
    );
}

#[test]
fn unaligned_raw_size_matches_qemu_nbd() {
    if !have("qemu-nbd") || !have("nbdinfo") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("odd.raw");
    std::fs::write(&f, vec![0xabu8; 1000]).unwrap();
    let p = f.to_str().unwrap();
    same(d.path(), &["-t", "-r", "-A", "-f", "raw", p], maps);
    same(
        d.path(),
        &["-t", "-r", "-A", "-f", "raw", "-o", "512", p],
        maps,
    );
}

/// Runs a listing, retrying while the server is still starting up (its socket may exist
/// a moment before it listens).
fn list_until_up(client: &str, args: &[&str]) -> String {
    for _ in 0..100 {
        let o = run(10, client, args);
        if o.status.success() {
            return String::from_utf8_lossy(&o.stdout).into_owned();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    ok(10, client, args)
}

/// `qemu-nbd -L` and `qimg-nbd -L` print the same listing of the same server, whichever
/// of qemu-nbd and qimg-nbd that server is.
#[test]
fn list_matches_qemu_nbd() {
    if !have("qemu-nbd") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let top = make_chain(d.path());
    let t = top.to_str().unwrap();
    ok(20, "qemu-img", &["bitmap", "--add", t, "b0"]);
    let raw = d.path().join("odd.raw");
    std::fs::write(&raw, vec![1u8; 1000]).unwrap();
    let r = raw.to_str().unwrap();
    let configs: Vec<Vec<&str>> = vec![
        vec!["-f", "qcow2", t],
        vec![
            "-A",
            "-B",
            "b0",
            "-e",
            "3",
            "-D",
            "a description",
            "-x",
            "exp1",
            "-f",
            "qcow2",
            t,
        ],
        vec!["-r", "-f", "raw", r],
        vec!["-f", "qcow2", "-o", "4096", "-x", "off", t],
    ];
    let qimg = qimg_nbd();
    for cfg in &configs {
        let mut outs = Vec::new();
        for server in ["qemu-nbd", qimg] {
            let mut args = vec!["-t"];
            args.extend(cfg.iter().copied());
            let mut srv = Srv::start(server, &d.path().join("l.sock"), &args);
            if let Ok(Some(st)) = srv.child.try_wait() {
                let mut e = String::new();
                use std::io::Read;
                srv.child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut e)
                    .unwrap();
                panic!("{server} {args:?} exited: {st} {e}");
            }
            let s = srv.sock.to_str().unwrap();
            for client in ["qemu-nbd", qimg] {
                outs.push((server, client, list_until_up(client, &["-L", "-k", s])));
            }
            // A clean exit: a killed writer would leave the bitmap marked in use.
            srv.signal(libc::SIGTERM);
            srv.wait_exit(10);
        }
        for o in &outs[1..] {
            assert_eq!(o.2, outs[0].2, "{cfg:?}: {} -L against {}", o.1, o.0);
        }
        assert!(
            outs[0].2.starts_with("exports available: 1\n"),
            "{}",
            outs[0].2
        );
    }

    // Over TCP, with the listing taken from -b/-p.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port().to_string()
    };
    let mut child = std::process::Command::new(qimg)
        .args(["-t", "-b", "127.0.0.1", "-p", &port, "-r", "-f", "raw", r])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let got = list_until_up(qimg, &["-L", "-b", "127.0.0.1", "-p", &port]);
    let want = ok(10, "qemu-nbd", &["-L", "-b", "127.0.0.1", "-p", &port]);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(got, want);

    // Usage and connection errors, word for word.
    let none = d.path().join("none.sock");
    let n = none.to_str().unwrap();
    for args in [
        vec!["-L", "-k", n],
        vec!["-L", "-b", "127.0.0.1", "-p", "1"],
        vec!["-L", "img"],
        vec!["-L", "-x", "e"],
        vec!["-L", "-f", "raw"],
        vec!["-L", "-o", "5"],
        vec!["-L", "--cache=none"],
        vec!["-L", "--fork"],
        vec!["-L", "-r", "-s", "-k", n],
    ] {
        assert_eq!(err_of(qimg, &args), err_of("qemu-nbd", &args), "{args:?}");
    }
}

/// `--image-opts`: the same option strings give the same exports and the same errors.
#[test]
fn image_opts_match_qemu_nbd() {
    if !have("qemu-nbd") || !have("nbdinfo") || !have("qemu-io") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let top = make_chain(d.path());
    let t = top.to_str().unwrap();
    let raw = d.path().join("a.raw");
    make_raw(&raw, 4 << 20);
    let r = raw.to_str().unwrap();
    let q = format!("driver=qcow2,file.driver=file,file.filename={t}");
    let reads = |s: &Srv| {
        let mut out = maps(s);
        out += &no_timings(ok(
            20,
            "qemu-io",
            &[
                "-r",
                "-f",
                "raw",
                "-c",
                "read -P 1 0 64k",
                "-c",
                "read -P 3 64k 64k",
                "-c",
                "read -P 2 1M 64k",
                &s.uri(""),
            ],
        ));
        out
    };
    let out = same(d.path(), &["-t", "-r", "-A", "--image-opts", &q], reads);
    assert!(!out.contains("failed"), "{out}");
    let spec = format!("driver=raw,file.filename={r},offset=64k");
    same(d.path(), &["-t", "-r", "-A", "--image-opts", &spec], maps);
    let spec = format!("driver=file,filename={r}");
    same(d.path(), &["-t", "-r", "-A", "--image-opts", &spec], maps);
    let spec = format!("driver=qcow2,file.filename={t},force-share=on,read-only=on");
    same(d.path(), &["-t", "-r", "-A", "--image-opts", &spec], maps);

    let qimg = qimg_nbd();
    let sock = d.path().join("e.sock");
    let s = sock.to_str().unwrap();
    let missing = d.path().join("missing.qcow2");
    let m = missing.to_str().unwrap();
    for spec in [
        format!("driver=qcow2,file.filename={m}"),
        format!("driver=qcow2,file.filename={t},bogus=1"),
        format!("driver=bogus,file.filename={t}"),
        "driver=qcow2".to_string(),
        t.to_string(),
        format!("driver=qcow2,file.filename={t},read-only=on"),
        format!("driver=qcow2,file.filename={t},force-share=on"),
        format!("driver=raw,file.filename={r},offset=8M"),
        format!("driver=raw,file.filename={r},offset=-1"),
        format!("driver=raw,file.filename={r},offset=abc"),
        format!("driver=file,filename={r},offset=5"),
        format!(",driver=qcow2,file.filename={t}"),
    ] {
        let args = ["-k", s, "--image-opts", &spec];
        assert_eq!(err_of(qimg, &args), err_of("qemu-nbd", &args), "{spec}");
    }
    let args = ["-k", s, "--image-opts", "-f", "qcow2", &q];
    assert_eq!(err_of(qimg, &args), err_of("qemu-nbd", &args));
}
