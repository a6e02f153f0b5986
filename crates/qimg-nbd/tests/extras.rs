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
