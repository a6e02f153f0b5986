//! add-cow images end to end: created by `qimg create`, written by QEMU's own NBD client
//! through `qimg serve`, read back by `convert`, `compare`, `dd`, `map` and `info`, and
//! compared with a raw reference that qemu-io wrote with the same commands. QEMU has no
//! add-cow driver, so the oracle is always a raw file QEMU's tools produced.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const M: u64 = 1 << 20;

/// A `qimg serve` process on a unix socket, killed on drop if still running.
struct Serve {
    child: Child,
    sock: PathBuf,
}

impl Serve {
    fn start(cwd: &Path, args: &[&str]) -> Serve {
        let sock = cwd.join("nbd.sock");
        let _ = std::fs::remove_file(&sock);
        let child = Command::new(bin_under_test())
            .arg("serve")
            .arg("-k")
            .arg(&sock)
            .args(args)
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start qimg serve");
        let mut s = Serve { child, sock };
        let t0 = Instant::now();
        while !s.sock.exists() {
            if let Ok(Some(st)) = s.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = s.child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                panic!("qimg serve exited early ({st}): {err}");
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "qimg serve did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(30));
        s
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }

    /// Waits for the server to leave on its own (it does when its last client has gone,
    /// after flushing the image) and requires a clean exit.
    fn finish(mut self) {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                assert!(st.success(), "qimg serve exited with {st}");
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "qimg serve did not exit"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs qemu-io commands on the add-cow image through `qimg serve`, and the same commands
/// on the raw reference directly.
fn write_both(cwd: &Path, addcow: &str, reference: &str, cmds: &[String]) {
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let srv = Serve::start(cwd, &["-f", "add-cow", addcow]);
    io_opts(cwd, &["-f", "raw"], &srv.uri(), &cmds);
    srv.finish();
    io(cwd, "raw", reference, &cmds);
}

fn compare_raw(cwd: &Path, a: &str, b: &str) {
    let o = qemu_img(cwd, ["compare", "-f", "raw", "-F", "raw", a, b]);
    assert_eq!(o.code(), Some(0), "{a} and {b} differ: {}", o.describe());
}

fn json(cwd: &Path, args: &[&str]) -> serde_json::Value {
    parse_json(&qimg(cwd, args).ok().stdout)
}

/// A qcow2 backing file with known patterns, zero clusters and holes.
fn make_backing(cwd: &Path) {
    qemu_img_ok(cwd, &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    io(
        cwd,
        "qcow2",
        "base.qcow2",
        &[
            "write -P 0x11 0 1M",
            "write -P 0x22 1M 512k",
            "write -P 0x33 3M 64k",
            "write -z 2M 64k",
            "write -P 0x44 3500000 12345",
        ],
    );
}

#[test]
fn nbd_writes_match_qemu_reference() {
    if testing_qemu_img_itself() {
        return;
    }
    let t = Tmp::new("addcow");
    let cwd = t.path();
    make_backing(cwd);
    let base_before = std::fs::read(t.join("base.qcow2")).unwrap();
    // 5 MiB over a 4 MiB backing file: the last MiB reads as zeros until written.
    let o = qimg(
        cwd,
        [
            "create",
            "-f",
            "add-cow",
            "-o",
            "backing_file=base.qcow2,backing_fmt=qcow2,image_file=x.raw",
            "x.add-cow",
            "5M",
        ],
    )
    .ok();
    assert!(o
        .stdout
        .starts_with("Formatting 'x.add-cow', fmt=add-cow size=5242880"));
    assert_eq!(file_len(&t.join("x.raw")), 5 * M);
    qemu_img_ok(
        cwd,
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            "base.qcow2",
            "ref.raw",
        ],
    );
    qemu_img_ok(cwd, &["resize", "-q", "-f", "raw", "ref.raw", "5M"]);
    // Before any write the add-cow image reads as its backing file.
    let o = qimg(cwd, ["compare", "x.add-cow", "ref.raw"]);
    assert_eq!(o.code(), Some(0), "{}", o.describe());

    let info = json(cwd, &["info", "--output=json", "x.add-cow"]);
    assert_eq!(info["format"], "add-cow");
    assert_eq!(info["virtual-size"], 5 * M);
    assert_eq!(info["cluster-size"], 65536);
    assert_eq!(info["backing-filename"], "base.qcow2");
    assert_eq!(info["backing-filename-format"], "qcow2");
    assert_eq!(info["format-specific"]["data"]["image-file"], "x.raw");
    let human = qimg(cwd, ["info", "x.add-cow"]).ok().stdout;
    assert!(human.contains("file format: add-cow\n"), "{human}");
    assert!(human.contains("backing file: base.qcow2\n"), "{human}");

    // Unaligned, multi-cluster, zero and whole-cluster writes, across the backing end.
    let cmds: Vec<String> = [
        "write -P 0xaa 1000 3000",
        "write -P 0xbb 100000 200000",
        "write -z 300000 70000",
        "write -z 1M 64k",
        "write -P 0xcc 4000000 300000",
        "write -P 0xdd 5177344 65536",
        "write -z 3100000 5000",
        "write -P 0xee 65536 65536",
        "write -z 2097152 131072",
        "aio_write -P 0x66 700000 9000",
        "aio_write -P 0x67 709000 9000",
        "aio_flush",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    write_both(cwd, "x.add-cow", "ref.raw", &cmds);
    assert_eq!(
        std::fs::read(t.join("base.qcow2")).unwrap(),
        base_before,
        "backing file changed"
    );

    qimg(cwd, ["convert", "-O", "raw", "x.add-cow", "out.raw"]).ok();
    compare_raw(cwd, "out.raw", "ref.raw");
    qimg(
        cwd,
        [
            "convert",
            "-f",
            "add-cow",
            "-O",
            "qcow2",
            "x.add-cow",
            "out.qcow2",
        ],
    )
    .ok();
    let o = qemu_img(cwd, ["compare", "-F", "raw", "out.qcow2", "ref.raw"]);
    assert_eq!(o.code(), Some(0), "{}", o.describe());
    let o = qimg(
        cwd,
        [
            "compare",
            "-f",
            "add-cow",
            "-F",
            "raw",
            "x.add-cow",
            "ref.raw",
        ],
    );
    assert_eq!(o.code(), Some(0), "{}", o.describe());
    qimg(
        cwd,
        [
            "dd",
            "-f",
            "add-cow",
            "-O",
            "raw",
            "bs=64k",
            "if=x.add-cow",
            "of=dd.raw",
        ],
    )
    .ok();
    compare_raw(cwd, "dd.raw", "ref.raw");

    // Reads, zero detection and block status through the NBD server too.
    let srv = Serve::start(cwd, &["-r", "-t", "-f", "add-cow", "x.add-cow"]);
    let o = qemu_img(
        cwd,
        ["compare", "-f", "raw", "-F", "raw", &srv.uri(), "ref.raw"],
    );
    assert_eq!(o.code(), Some(0), "{}", o.describe());
    drop(srv);

    // map: copied clusters at depth 0 with host offset = guest offset in the image
    // file, the rest from the backing file (depth 1) or zeros past its end.
    let map = json(cwd, &["map", "--output=json", "x.add-cow"]);
    let entries = map.as_array().unwrap();
    let total: u64 = entries.iter().map(|e| e["length"].as_u64().unwrap()).sum();
    assert_eq!(total, 5 * M);
    let at = |off: u64| {
        entries
            .iter()
            .find(|e| {
                let s = e["start"].as_u64().unwrap();
                s <= off && off < s + e["length"].as_u64().unwrap()
            })
            .unwrap()
            .clone()
    };
    let e = at(1000);
    assert_eq!(
        (e["depth"].as_u64(), e["data"].as_bool()),
        (Some(0), Some(true))
    );
    assert_eq!(e["offset"].as_u64(), Some(e["start"].as_u64().unwrap()));
    let e = at(1_200_000);
    assert_eq!(
        (e["depth"].as_u64(), e["present"].as_bool()),
        (Some(1), Some(true))
    );
    let human = qimg(cwd, ["map", "x.add-cow"]).ok().stdout;
    assert!(human.contains("x.raw"), "{human}");
    assert!(human.contains("base.qcow2"), "{human}");

    // Write into every cluster: afterwards the image file alone is the disk.
    let cmds: Vec<String> = (0..80u64)
        .map(|c| format!("write -P 0x5a {} 100", c * 65536 + 7000))
        .collect();
    write_both(cwd, "x.add-cow", "ref.raw", &cmds);
    compare_raw(cwd, "x.raw", "ref.raw");
    let info = json(cwd, &["info", "--output=json", "x.add-cow"]);
    assert_eq!(info["format-specific"]["data"]["copied-clusters"], 80);
    let map = json(cwd, &["map", "--output=json", "x.add-cow"]);
    assert!(map
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["depth"].as_u64() == Some(0)));
    assert_eq!(
        std::fs::read(t.join("base.qcow2")).unwrap(),
        base_before,
        "backing file changed"
    );
}

#[test]
fn create_sizes_and_small_clusters() {
    if testing_qemu_img_itself() {
        return;
    }
    let t = Tmp::new("addcow-create");
    let cwd = t.path();
    make_backing(cwd);
    // Without SIZE the backing file's size is used; the image file is sparse.
    qimg(
        cwd,
        [
            "create",
            "-q",
            "-f",
            "add-cow",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "-o",
            "image_file=y.raw,cluster_size=4k",
            "y.add-cow",
        ],
    )
    .ok();
    assert_eq!(file_len(&t.join("y.raw")), 4 * M);
    let info = json(cwd, &["info", "--output=json", "y.add-cow"]);
    assert_eq!(info["virtual-size"], 4 * M);
    assert_eq!(info["cluster-size"], 4096);
    qemu_img_ok(
        cwd,
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            "base.qcow2",
            "ref.raw",
        ],
    );
    let cmds: Vec<String> = [
        "write -P 0x71 4095 2",
        "write -P 0x72 12288 4096",
        "write -z 20000 30000",
        "write -P 0x73 4190000 4304",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    write_both(cwd, "y.add-cow", "ref.raw", &cmds);
    qimg(cwd, ["convert", "-O", "raw", "y.add-cow", "out.raw"]).ok();
    compare_raw(cwd, "out.raw", "ref.raw");

    // An existing, larger image file gives the size.
    std::fs::File::create(t.join("big.raw"))
        .unwrap()
        .set_len(6 * M)
        .unwrap();
    qimg(
        cwd,
        [
            "create",
            "-q",
            "-f",
            "add-cow",
            "-o",
            "backing_file=base.qcow2,backing_fmt=qcow2,image_file=big.raw",
            "big.add-cow",
        ],
    )
    .ok();
    let info = json(cwd, &["info", "--output=json", "big.add-cow"]);
    assert_eq!(info["virtual-size"], 6 * M);

    // Errors: one line, exit 1, nothing created.
    let bad = |args: &[&str], needle: &str| {
        let o = qimg(cwd, args);
        assert_eq!(o.code(), Some(1), "{}", o.describe());
        assert_eq!(o.stderr.trim_end().lines().count(), 1, "{}", o.describe());
        assert!(o.stderr.contains(needle), "{}", o.describe());
    };
    bad(
        &["create", "-f", "add-cow", "e1.add-cow", "1M"],
        "image_file",
    );
    bad(
        &[
            "create",
            "-f",
            "add-cow",
            "-o",
            "image_file=e.raw,image_fmt=qcow2",
            "e2.add-cow",
            "1M",
        ],
        "only raw",
    );
    bad(
        &[
            "create",
            "-f",
            "add-cow",
            "-o",
            "image_file=e.raw,cluster_size=1000",
            "e3.add-cow",
            "1M",
        ],
        "Cluster size",
    );
    bad(
        &[
            "create",
            "-f",
            "add-cow",
            "-o",
            "image_file=big.raw",
            "e4.add-cow",
            "1M",
        ],
        "larger",
    );
    bad(
        &[
            "create",
            "-f",
            "add-cow",
            "-o",
            "image_file=none.raw",
            "e5.add-cow",
        ],
        "size",
    );
    bad(
        &[
            "create",
            "-f",
            "add-cow",
            "-o",
            "image_file=e7.add-cow",
            "e7.add-cow",
            "1M",
        ],
        "add-cow file itself",
    );
    assert!(!t.join("e7.add-cow").exists());
    bad(
        &[
            "create",
            "-f",
            "add-cow",
            "-o",
            "image_file=./ref.raw,backing_file=ref.raw,backing_fmt=raw",
            "e8.add-cow",
        ],
        "backing file",
    );
    assert!(!t.join("e.raw").exists());
}

/// A way to damage a copy of a good add-cow file.
type Damage = Box<dyn Fn(&Path)>;

fn put_le32(p: &Path, off: u64, v: u32) {
    write_at(p, off, &v.to_le_bytes());
}

#[test]
fn malformed_headers_fail_cleanly() {
    if testing_qemu_img_itself() {
        return;
    }
    let t = Tmp::new("addcow-bad");
    let cwd = t.path();
    qimg(
        cwd,
        [
            "create",
            "-q",
            "-f",
            "add-cow",
            "-o",
            "image_file=i.raw",
            "good.add-cow",
            "1M",
        ],
    )
    .ok();
    qimg(cwd, ["info", "good.add-cow"]).ok();
    let good = std::fs::read(t.join("good.add-cow")).unwrap();
    // New files use max(4096, cluster size) as the header size: 64 KiB here.
    let hs = u32::from_le_bytes(good[40..44].try_into().unwrap());
    assert_eq!(hs, 65536);
    let hs64 = hs as u64;
    let cases: Vec<(&str, Damage, &str)> = vec![
        (
            "magic",
            Box::new(|p: &Path| write_at(p, 0, b"XCOW")),
            "magic",
        ),
        (
            "truncated",
            Box::new(|p: &Path| {
                std::fs::File::options()
                    .write(true)
                    .open(p)
                    .unwrap()
                    .set_len(40)
                    .unwrap()
            }),
            "truncated",
        ),
        (
            "short-header",
            Box::new(|p: &Path| {
                std::fs::File::options()
                    .write(true)
                    .open(p)
                    .unwrap()
                    .set_len(2000)
                    .unwrap()
            }),
            "truncated",
        ),
        (
            "bitmap",
            Box::new(move |p: &Path| {
                std::fs::File::options()
                    .write(true)
                    .open(p)
                    .unwrap()
                    .set_len(hs64 + 1)
                    .unwrap()
            }),
            "COW bitmap is truncated",
        ),
        (
            "image-offset",
            Box::new(|p: &Path| put_le32(p, 12, 5000)),
            "image file name",
        ),
        (
            "image-offset-low",
            Box::new(|p: &Path| put_le32(p, 12, 8)),
            "image file name",
        ),
        (
            "image-size",
            Box::new(|p: &Path| put_le32(p, 16, 0xffff_fff0)),
            "image file name",
        ),
        (
            "backing-offset",
            Box::new(move |p: &Path| {
                put_le32(p, 4, hs - 10);
                put_le32(p, 8, 100);
            }),
            "backing file name",
        ),
        (
            "backing-size-only",
            Box::new(|p: &Path| put_le32(p, 8, 7)),
            "backing file name",
        ),
        (
            "cluster-bits",
            Box::new(|p: &Path| put_le32(p, 20, 40)),
            "cluster bits",
        ),
        (
            "header-size",
            Box::new(|p: &Path| put_le32(p, 40, u32::MAX)),
            "header size",
        ),
        (
            "features",
            Box::new(|p: &Path| write_at(p, 24, &[1])),
            "features",
        ),
        (
            "image-format",
            Box::new(|p: &Path| write_at(p, 60, b"qcow2\0")),
            "only raw",
        ),
        (
            "image-missing",
            Box::new(|p: &Path| write_at(p, 80, b"j")),
            "j.raw",
        ),
    ];
    for (name, damage, needle) in &cases {
        let f = format!("{name}.add-cow");
        let p = t.join(&f);
        std::fs::write(&p, &good).unwrap();
        damage(&p);
        for args in [
            vec!["info", "-f", "add-cow", f.as_str()],
            vec!["map", "-f", "add-cow", f.as_str()],
            vec![
                "convert",
                "-f",
                "add-cow",
                "-O",
                "raw",
                f.as_str(),
                "out.raw",
            ],
        ] {
            let o = qimg(cwd, &args);
            assert_eq!(o.code(), Some(1), "{name}: {}", o.describe());
            assert_eq!(
                o.stderr.trim_end().lines().count(),
                1,
                "{name}: {}",
                o.describe()
            );
            assert!(o.stderr.contains(needle), "{name}: {}", o.describe());
        }
    }
}

/// A qcow2 overlay on top of an add-cow image on top of a qcow2 base: writes through
/// `qimg serve` at the top copy-on-write from the whole chain, the add-cow layer and the
/// base stay unchanged, and `convert` flattens the three layers like the reference.
#[test]
fn qcow2_overlay_over_addcow() {
    if testing_qemu_img_itself() {
        return;
    }
    let t = Tmp::new("addcow-chain");
    let cwd = t.path();
    make_backing(cwd);
    let sub = t.subdir("mid");
    // The add-cow layer lives in a subdirectory: its names resolve from there.
    qimg(
        &sub,
        [
            "create",
            "-q",
            "-f",
            "add-cow",
            "-o",
            "backing_file=../base.qcow2,backing_fmt=qcow2,image_file=mid.raw",
            "mid.add-cow",
        ],
    )
    .ok();
    qemu_img_ok(
        cwd,
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            "base.qcow2",
            "ref.raw",
        ],
    );
    let cmds: Vec<String> = ["write -P 0x91 60000 10000", "write -z 3000000 100000"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    write_both(cwd, "mid/mid.add-cow", "ref.raw", &cmds);
    qimg(
        cwd,
        [
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "mid/mid.add-cow",
            "-F",
            "add-cow",
            "top.qcow2",
        ],
    )
    .ok();
    let mid_before = std::fs::read(sub.join("mid.raw")).unwrap();
    let meta_before = std::fs::read(sub.join("mid.add-cow")).unwrap();
    let cmds = ["write -P 0x92 65000 1000", "write -P 0x93 3050000 200000"];
    let srv = Serve::start(cwd, &["-f", "qcow2", "top.qcow2"]);
    io_opts(cwd, &["-f", "raw"], &srv.uri(), &cmds);
    srv.finish();
    io(cwd, "raw", "ref.raw", &cmds);
    assert_eq!(std::fs::read(sub.join("mid.raw")).unwrap(), mid_before);
    assert_eq!(std::fs::read(sub.join("mid.add-cow")).unwrap(), meta_before);
    qimg(cwd, ["convert", "-O", "raw", "top.qcow2", "flat.raw"]).ok();
    compare_raw(cwd, "flat.raw", "ref.raw");
    let info = json(
        cwd,
        &["info", "--backing-chain", "--output=json", "top.qcow2"],
    );
    let formats: Vec<&str> = info
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["format"].as_str().unwrap())
        .collect();
    assert_eq!(formats, ["qcow2", "add-cow", "qcow2"]);
    let map = json(cwd, &["map", "--output=json", "top.qcow2"]);
    let depths: std::collections::BTreeSet<u64> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["present"].as_bool() == Some(true))
        .map(|e| e["depth"].as_u64().unwrap())
        .collect();
    assert_eq!(depths, [0, 1, 2].into_iter().collect());
}
