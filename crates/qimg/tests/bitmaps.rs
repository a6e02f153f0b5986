//! Persistent dirty bitmaps: bits recorded by library writes compared with what QEMU
//! records for the same requests, and crash cut points over in_use marking, add, merge,
//! clear and the store at close.

use qimg::fault::FaultStorage;
use qimg::image::Image;
use qimg::qcow2::{Qcow2, Qcow2Options};
use qimg::storage::{FileStorage, MemStorage};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

fn qemu_img(args: &[&str]) -> String {
    let o = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        o.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn qemu_io(path: &Path, cmds: &[String]) {
    let mut c = Command::new("qemu-io");
    // discard=unmap: without it QEMU drops discards before they reach the bitmaps.
    c.args(["-f", "qcow2", "-d", "unmap"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let o = c.arg(path).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// The "bitmaps" part of `qemu-img info --output=json`.
fn info_bitmaps(path: &Path) -> String {
    let s = qemu_img(&["info", "--output=json", path.to_str().unwrap()]);
    let a = s.find("\"bitmaps\"").map(|i| &s[i..]).unwrap_or("");
    // The list ends where the next field of the format-specific data starts.
    a[..a.find("\"refcount-bits\"").unwrap_or(0)].to_string()
}

fn open(path: &Path, writable: bool) -> Qcow2 {
    let st = Arc::new(FileStorage::open(path, writable).unwrap());
    Qcow2::open(
        st,
        Qcow2Options {
            writable,
            check: false,
            ..Default::default()
        },
    )
    .unwrap()
}

fn check_clean(path: &Path) {
    let o = Command::new("qemu-img")
        .args(["check", "-q"])
        .arg(path)
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
}

#[derive(Clone, Copy)]
enum Op {
    Write(u64, u64),
    Zero(u64, u64, bool),
    Discard(u64, u64),
}

fn ops() -> Vec<Op> {
    vec![
        Op::Write(5000, 3000),
        Op::Write(1 << 20, 64 << 10),
        Op::Zero(3 << 20, 200_000, true),
        Op::Zero(7 << 20, 4096, false),
        Op::Discard(9 << 20, 300 << 10),
        Op::Discard(12 << 20, 1000),
        Op::Write((16 << 20) - 512, 512),
    ]
}

#[test]
fn library_writes_match_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("qemu.qcow2");
    let b = dir.path().join("qimg.qcow2");
    for p in [&a, &b] {
        let p = p.to_str().unwrap();
        qemu_img(&["create", "-q", "-f", "qcow2", p, "16M"]);
        qemu_img(&["bitmap", "--add", "-g", "4k", p, "fine"]);
        qemu_img(&["bitmap", "--add", p, "coarse"]);
        qemu_img(&["bitmap", "--add", "-g", "512", p, "sector"]);
        qemu_img(&["bitmap", "--add", p, "off"]);
        qemu_img(&["bitmap", "--disable", p, "off"]);
    }
    let cmds: Vec<String> = ops()
        .iter()
        .map(|o| match *o {
            Op::Write(x, n) => format!("write {x} {n}"),
            Op::Zero(x, n, true) => format!("write -z -u {x} {n}"),
            Op::Zero(x, n, false) => format!("write -z {x} {n}"),
            Op::Discard(x, n) => format!("discard {x} {n}"),
        })
        .collect();
    qemu_io(&a, &cmds);
    {
        let img = open(&b, true);
        for o in ops() {
            match o {
                Op::Write(x, n) => img.write_at(&vec![0x5a; n as usize], x).unwrap(),
                Op::Zero(x, n, u) => img.write_zeroes(x, n, u).unwrap(),
                Op::Discard(x, n) => img.discard(x, n).unwrap(),
            }
        }
        // While open, the stored bitmaps are marked in use (QEMU shows the same).
        assert!(info_bitmaps_forced(&b).contains("in-use"));
        img.close().unwrap();
    }
    assert_eq!(info_bitmaps(&a), info_bitmaps(&b));
    check_clean(&b);
    let (qa, qb) = (open(&a, false), open(&b, false));
    for name in ["fine", "coarse", "sector", "off"] {
        let ra = qa.bitmap_dirty_ranges(name).unwrap();
        let rb = qb.bitmap_dirty_ranges(name).unwrap();
        assert_eq!(ra, rb, "bitmap {name}");
        if name == "off" {
            assert!(ra.is_empty());
        } else {
            assert!(!ra.is_empty());
        }
    }
}

/// `qemu-img info -U` while the image is open for writing.
fn info_bitmaps_forced(path: &Path) -> String {
    let s = qemu_img(&["info", "-U", "--output=json", path.to_str().unwrap()]);
    s
}

#[test]
fn autoclear_bit_clear_drops_bitmaps_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.qcow2");
    let ps = p.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", ps, "1M"]);
    qemu_img(&["bitmap", "--add", ps, "b"]);
    let mut d = std::fs::read(&p).unwrap();
    d[88..96].fill(0);
    std::fs::write(&p, &d).unwrap();
    let img = open(&p, false);
    assert!(img.bitmap_list().is_empty());
    assert_eq!(img.warnings().len(), 1);
    drop(img);
    drop(open(&p, true));
    assert_eq!(info_bitmaps(&p), "");
}

/// Bits of every bitmap of an image (None for inconsistent ones), by name.
type Snapshot = Vec<(String, Option<Vec<(u64, u64)>>)>;

fn snapshot(img: &Qcow2) -> Snapshot {
    let mut v: Snapshot = img
        .bitmap_list()
        .into_iter()
        .map(|b| {
            let bits = (!b.inconsistent).then(|| img.bitmap_dirty_ranges(&b.name).unwrap());
            (b.name, bits)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn crash_points_over_bitmap_updates() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let bs = base.to_str().unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        bs,
        "8M",
    ]);
    qemu_img(&["bitmap", "--add", "-g", "4k", bs, "a"]);
    qemu_img(&["bitmap", "--add", "-g", "64k", bs, "b"]);
    qemu_io(&base, &["write 0 100k".into(), "write 5M 8k".into()]);
    let bytes = std::fs::read(&base).unwrap();
    let before = snapshot(
        &Qcow2::open(
            Arc::new(MemStorage::new(bytes.clone())),
            Qcow2Options::default(),
        )
        .unwrap(),
    );
    let fs = Arc::new(FaultStorage::new(bytes));
    let after = {
        let img = Qcow2::open(
            fs.clone(),
            Qcow2Options {
                writable: true,
                check: false,
                ..Default::default()
            },
        )
        .unwrap();
        img.bitmap_add("c", 65536, false).unwrap();
        img.write_at(&[7u8; 3000], 2 << 20).unwrap();
        img.flush().unwrap();
        let src = img.bitmap_dirty_ranges("a").unwrap();
        img.bitmap_merge_ranges("c", &src).unwrap();
        img.bitmap_clear("b").unwrap();
        img.discard(6 << 20, 64 << 10).unwrap();
        img.bitmap_remove("a").unwrap();
        img.close().unwrap();
        let s = snapshot(&img);
        std::mem::forget(img);
        s
    };
    let n = fs.journal_len();
    assert!(n > 10);
    let check_path = dir.path().join("cut.qcow2");
    let mut seeds = 1u64;
    let mut saw_in_use = false;
    for cut in 0..=n {
        let disk = fs.crash_image(cut, |_, _| {
            seeds ^= seeds << 13;
            seeds ^= seeds >> 7;
            seeds ^= seeds << 17;
            seeds & 1 == 0
        });
        let img = Qcow2::open(
            Arc::new(MemStorage::new(disk.clone())),
            Qcow2Options::default(),
        )
        .unwrap_or_else(|e| panic!("cut {cut}: open failed: {e}"));
        // Every consistent bitmap holds exactly the bits it had before or after the
        // session; nothing in between is ever presented as valid.
        for (name, bits) in snapshot(&img) {
            let Some(bits) = bits else {
                saw_in_use = true;
                continue;
            };
            let old = before
                .iter()
                .find(|x| x.0 == name)
                .and_then(|x| x.1.clone());
            let new = after.iter().find(|x| x.0 == name).and_then(|x| x.1.clone());
            assert!(
                Some(&bits) == old.as_ref() || Some(&bits) == new.as_ref(),
                "cut {cut}: bitmap {name} has {bits:?}, before {old:?}, after {new:?}"
            );
        }
        if cut % 3 == 0 || cut == n {
            std::fs::write(&check_path, &disk).unwrap();
            let o = Command::new("qemu-img")
                .args(["check", "-q"])
                .arg(&check_path)
                .output()
                .unwrap();
            let code = o.status.code().unwrap_or(-1);
            assert!(
                code == 0 || code == 3,
                "cut {cut}: qemu-img check exit {code}: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
    assert!(saw_in_use);
    // The final image is what QEMU sees too, with no leaks.
    std::fs::write(&check_path, fs.crash_image(n, |_, _| true)).unwrap();
    check_clean(&check_path);
    let s = info_bitmaps(&check_path);
    assert!(
        s.contains("\"b\"") && s.contains("\"c\"") && !s.contains("\"a\""),
        "{s}"
    );
    assert!(!s.contains("in-use"), "{s}");
}

/// Resizes an image with bitmaps over fault-injecting storage; at every cut the image
/// opens with the old or the new size, every consistent bitmap holds the bits it had
/// before or after, and `qemu-img check` finds no corruption.
fn crash_resize_case(new_size: u64) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let bs = base.to_str().unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        bs,
        "8M",
    ]);
    qemu_img(&["bitmap", "--add", "-g", "4k", bs, "a"]);
    qemu_img(&["bitmap", "--add", "-g", "64k", "--disable", bs, "b"]);
    qemu_io(&base, &["write 0 100k".into(), "write 7M 1M".into()]);
    qemu_img(&["bitmap", "--enable", bs, "b"]);
    qemu_io(&base, &["write 6M 8k".into()]);
    let bytes = std::fs::read(&base).unwrap();
    let before = snapshot(
        &Qcow2::open(
            Arc::new(MemStorage::new(bytes.clone())),
            Qcow2Options::default(),
        )
        .unwrap(),
    );
    let fs = Arc::new(FaultStorage::new(bytes));
    let after = {
        let mut img = Qcow2::open(
            fs.clone(),
            Qcow2Options {
                writable: true,
                check: false,
                ..Default::default()
            },
        )
        .unwrap();
        img.resize(new_size, qimg::qcow2::resize::Prealloc::Off)
            .unwrap();
        img.close().unwrap();
        let s = snapshot(&img);
        std::mem::forget(img);
        s
    };
    let n = fs.journal_len();
    let check_path = dir.path().join("cut.qcow2");
    let mut seeds = 7u64;
    for cut in 0..=n {
        let disk = fs.crash_image(cut, |_, _| {
            seeds ^= seeds << 13;
            seeds ^= seeds >> 7;
            seeds ^= seeds << 17;
            seeds & 1 == 0
        });
        let img = Qcow2::open(
            Arc::new(MemStorage::new(disk.clone())),
            Qcow2Options::default(),
        )
        .unwrap_or_else(|e| panic!("cut {cut}: open failed: {e}"));
        assert!(img.len() == 8 << 20 || img.len() == new_size, "cut {cut}");
        for (name, bits) in snapshot(&img) {
            let Some(bits) = bits else { continue };
            let old = before
                .iter()
                .find(|x| x.0 == name)
                .and_then(|x| x.1.clone());
            let new = after.iter().find(|x| x.0 == name).and_then(|x| x.1.clone());
            assert!(
                Some(&bits) == old.as_ref() || Some(&bits) == new.as_ref(),
                "cut {cut}: bitmap {name} has {bits:?}, before {old:?}, after {new:?}"
            );
        }
        std::fs::write(&check_path, &disk).unwrap();
        let o = Command::new("qemu-img")
            .args(["check", "-q"])
            .arg(&check_path)
            .output()
            .unwrap();
        let code = o.status.code().unwrap_or(-1);
        assert!(
            code == 0 || code == 3,
            "cut {cut}: qemu-img check exit {code}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    std::fs::write(&check_path, fs.crash_image(n, |_, _| true)).unwrap();
    check_clean(&check_path);
    let s = info_bitmaps(&check_path);
    assert!(
        s.contains("\"a\"") && s.contains("\"b\"") && !s.contains("in-use"),
        "{s}"
    );
}

#[test]
fn crash_points_over_resize_with_bitmaps() {
    // Grows past what one bitmap table entry covers (128 MiB at 4 KiB granularity and
    // 4 KiB clusters): the tables are stored anew before the size changes.
    crash_resize_case(300 << 20);
    crash_resize_case(12 << 20);
    crash_resize_case(6 << 20 | 512);
}
