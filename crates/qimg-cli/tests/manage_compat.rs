//! `snapshot -c/-a/-d`, `resize` and `amend` compared with qemu-img, both ways: qimg
//! changes an image and QEMU's tools verify it (`snapshot -l`, `snapshot -a`, `check`,
//! `info`, `compare`), and qimg continues from images QEMU changed.

mod common;

use common::*;
use std::path::Path;

fn mk(cwd: &Path, opts: &str, name: &str, size: &str) {
    qemu_img_ok(
        cwd,
        &["create", "-q", "-f", "qcow2", "-o", opts, name, size],
    );
    io(
        cwd,
        "qcow2",
        name,
        &[
            "write -P 1 0 192k",
            "write -c -P 2 256k 64k",
            "write -P 3 400k 100k",
            "write -z 512k 64k",
        ],
    );
}

fn cp(cwd: &Path, a: &str, b: &str) {
    std::fs::copy(cwd.join(a), cwd.join(b)).unwrap();
}

#[track_caller]
fn check_clean(cwd: &Path, img: &str) {
    let o = qemu_img(cwd, ["check", img]);
    assert_eq!(o.code(), Some(0), "qemu-img check {img}:\n{}", o.describe());
}

#[track_caller]
fn same_content(cwd: &Path, a: &str, b: &str) {
    let o = qemu_img(cwd, ["compare", "-q", a, b]);
    assert_eq!(o.code(), Some(0), "{a} and {b} differ:\n{}", o.describe());
}

/// `snapshot -l` without the DATE column (and the program name).
fn listing(cwd: &Path, img: &str) -> String {
    let o = qemu_img(cwd, ["snapshot", "-l", img]).ok();
    o.stdout
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() >= 8 && f[0].chars().all(|c| c.is_ascii_digit()) {
                // ID TAG VM_SIZE(2 words) DATE(2 words) VM_CLOCK ICOUNT
                format!("{} {} {} {} {} {}", f[0], f[1], f[2], f[3], f[6], f[7])
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `qemu-img info` without what depends on layout or time.
fn info(cwd: &Path, img: &str) -> String {
    let o = qemu_img(cwd, ["info", img]).ok();
    o.stdout
        .lines()
        .filter(|l| {
            !(l.contains("disk size")
                || l.contains("file length")
                || l.starts_with("image:")
                || l.contains("filename:"))
        })
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() >= 8 && f[0].chars().all(|c| c.is_ascii_digit()) {
                format!("{} {} {} {} {} {}", f[0], f[1], f[2], f[3], f[6], f[7])
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs the same modifying command with qemu-img on `<img>.q` and with qimg on `<img>.m`
/// (copies of `img`); asserts equal outputs, then equal contents, `info` and snapshot
/// lists, and a clean `qemu-img check` of qimg's result.
#[track_caller]
fn both(cwd: &Path, img: &str, args: &[&str]) {
    let (q, m) = (format!("{img}.q"), format!("{img}.m"));
    cp(cwd, img, &q);
    cp(cwd, img, &m);
    let with = |f: &str| -> Vec<String> {
        args.iter()
            .map(|a| {
                if *a == "IMG" {
                    f.to_string()
                } else {
                    a.to_string()
                }
            })
            .collect()
    };
    let theirs = qemu_img(cwd, with(&q));
    let ours = qimg(cwd, with(&m));
    let norm = |s: &str| s.replace(&m, "IMG").replace(&q, "IMG");
    assert_eq!(
        ours.code(),
        theirs.code(),
        "{args:?}\n{}\n{}",
        ours.describe(),
        theirs.describe()
    );
    assert_eq!(norm(&ours.stdout), norm(&theirs.stdout), "{args:?}");
    assert_eq!(
        norm(&norm_ours(&ours.stderr)),
        norm(&norm_theirs(&theirs.stderr)),
        "{args:?}"
    );
    check_clean(cwd, &m);
    same_content(cwd, &q, &m);
    assert_eq!(info(cwd, &m), info(cwd, &q), "{args:?}: info differs");
}

#[test]
fn snapshot_create_verified_by_qemu() {
    let t = Tmp::new("snap_create");
    let d = t.path();
    for (i, opts) in [
        "compat=1.1",
        "compat=0.10",
        "cluster_size=4096,refcount_bits=8",
    ]
    .iter()
    .enumerate()
    {
        let img = format!("c{i}.qcow2");
        mk(d, opts, &img, "1M");
        cp(d, &img, "ref.qcow2");
        qimg(d, ["snapshot", "-c", "one", &img]).ok();
        io(
            d,
            "qcow2",
            &img,
            &["write -P 9 0 300k", "write -z 400k 64k"],
        );
        qimg(d, ["snapshot", "-c", "two", &img]).ok();
        qimg(d, ["snapshot", "-c", "one", &img]).ok();
        check_clean(d, &img);
        // The same sequence done by QEMU lists the same (dates aside).
        let q = format!("q{i}.qcow2");
        cp(d, "ref.qcow2", &q);
        qemu_img_ok(d, &["snapshot", "-c", "one", &q]);
        io(d, "qcow2", &q, &["write -P 9 0 300k", "write -z 400k 64k"]);
        qemu_img_ok(d, &["snapshot", "-c", "two", &q]);
        qemu_img_ok(d, &["snapshot", "-c", "one", &q]);
        assert_eq!(listing(d, &img), listing(d, &q));
        assert_eq!(info(d, &img), info(d, &q));
        // QEMU applies qimg's first snapshot and sees the original contents.
        qemu_img_ok(d, &["snapshot", "-a", "1", &img]);
        same_content(d, &img, "ref.qcow2");
        check_clean(d, &img);
        qemu_img_ok(d, &["snapshot", "-a", "two", &img]);
        same_content(d, &img, &q);
        qemu_img_ok(d, &["snapshot", "-d", "one", &img]);
        check_clean(d, &img);
    }
}

#[test]
fn snapshot_taken_by_qemu_applied_and_deleted_by_qimg() {
    let t = Tmp::new("snap_qemu");
    let d = t.path();
    for (i, opts) in [
        "compat=1.1",
        "compat=0.10",
        "extended_l2=on",
        "lazy_refcounts=on",
    ]
    .iter()
    .enumerate()
    {
        let img = format!("a{i}.qcow2");
        mk(d, opts, &img, "1M");
        cp(d, &img, "ref.qcow2");
        qemu_img_ok(d, &["snapshot", "-c", "base", &img]);
        io(
            d,
            "qcow2",
            &img,
            &["write -P 7 100k 500k", "write -z 0 64k"],
        );
        cp(d, &img, "later.qcow2");
        qimg(d, ["snapshot", "-a", "base", &img]).ok();
        check_clean(d, &img);
        same_content(d, &img, "ref.qcow2");
        // And continue: write, snapshot again with qimg, delete QEMU's snapshot.
        qimg(d, ["snapshot", "-c", "mine", &img]).ok();
        qimg(d, ["snapshot", "-d", "base", &img]).ok();
        check_clean(d, &img);
        same_content(d, &img, "ref.qcow2");
        let l = listing(d, &img);
        assert!(l.contains("mine") && !l.contains("base"), "{l}");
    }
}

#[test]
fn snapshot_apply_resizes_to_snapshot_size() {
    let t = Tmp::new("snap_size");
    let d = t.path();
    mk(d, "compat=1.1", "s.qcow2", "1M");
    qemu_img_ok(d, &["snapshot", "-c", "small", "s.qcow2"]);
    qemu_img_ok(d, &["resize", "s.qcow2", "3G"]);
    io(d, "qcow2", "s.qcow2", &["write -P 5 2G 64k"]);
    both(d, "s.qcow2", &["snapshot", "-a", "small", "IMG"]);
    both(d, "s.qcow2", &["snapshot", "-d", "small", "IMG"]);
}

#[test]
fn snapshot_errors_match() {
    let t = Tmp::new("snap_err");
    let d = t.path();
    mk(d, "compat=1.1", "e.qcow2", "1M");
    qemu_img_ok(d, &["snapshot", "-c", "x", "e.qcow2"]);
    both(d, "e.qcow2", &["snapshot", "-d", "nope", "IMG"]);
    both(d, "e.qcow2", &["snapshot", "-d", "1", "IMG"]);
    both(d, "e.qcow2", &["snapshot", "-a", "nope", "IMG"]);
    both(d, "e.qcow2", &["snapshot", "-a", "1", "IMG"]);
    qemu_img_ok(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=e.data",
            "df.qcow2",
            "1M",
        ],
    );
    for a in [["-c", "s"], ["-a", "s"], ["-d", "s"]] {
        let theirs = qemu_img(d, ["snapshot", a[0], a[1], "df.qcow2"]);
        let ours = qimg(d, ["snapshot", a[0], a[1], "df.qcow2"]);
        assert_outputs_equal(&ours, &theirs, &|s| s.to_string());
    }
    qemu_img_ok(d, &["create", "-q", "-f", "raw", "r.raw", "1M"]);
    for a in [["-c", "s"], ["-a", "s"], ["-d", "s"]] {
        let theirs = qemu_img(d, ["snapshot", "-f", "raw", a[0], a[1], "r.raw"]);
        let ours = qimg(d, ["snapshot", "-f", "raw", a[0], a[1], "r.raw"]);
        assert_outputs_equal(&ours, &theirs, &|s| s.to_string());
    }
}

#[test]
fn resize_matches_qemu() {
    let t = Tmp::new("resize");
    let d = t.path();
    mk(d, "compat=1.1", "r.qcow2", "1M");
    mk(d, "compat=0.10,cluster_size=4096", "v2.qcow2", "1M");
    mk(d, "extended_l2=on", "x.qcow2", "1M");
    for img in ["r.qcow2", "v2.qcow2", "x.qcow2"] {
        for args in [
            &["resize", "IMG", "4M"][..],
            &["resize", "IMG", "+3G"],
            &["resize", "-q", "IMG", "2M"],
            &["resize", "--shrink", "IMG", "448k"],
            &["resize", "--shrink", "IMG", "-512k"],
            &["resize", "IMG", "512k"],
            &["resize", "IMG", "1000"],
            &["resize", "IMG", "+1000"],
            &["resize", "IMG", "1M"],
            &["resize", "--preallocation=metadata", "IMG", "3M"],
            &["resize", "--preallocation=full", "IMG", "3M"],
            &[
                "resize",
                "--preallocation=metadata",
                "--shrink",
                "IMG",
                "512k",
            ],
            &["resize", "IMG", "64P"],
            &["resize", "--shrink", "IMG", "--", "-2M"],
        ] {
            both(d, img, args);
        }
    }
    // Shrinking gives the file back, as QEMU does.
    cp(d, "r.qcow2", "s.qcow2");
    cp(d, "r.qcow2", "sq.qcow2");
    qimg(d, ["resize", "--shrink", "s.qcow2", "200k"]).ok();
    qemu_img_ok(d, &["resize", "--shrink", "sq.qcow2", "200k"]);
    assert!(file_len(&d.join("s.qcow2")) <= file_len(&d.join("sq.qcow2")));
    // v2 images with snapshots cannot be resized.
    qemu_img_ok(d, &["snapshot", "-c", "s", "v2.qcow2"]);
    both(d, "v2.qcow2", &["resize", "IMG", "2M"]);
    // A backing file longer than the old size must not show through the new area.
    qemu_img_ok(d, &["create", "-q", "-f", "qcow2", "bk.qcow2", "4M"]);
    io(d, "qcow2", "bk.qcow2", &["write -P 8 0 4M"]);
    qemu_img_ok(
        d,
        &[
            "create", "-q", "-f", "qcow2", "-b", "bk.qcow2", "-F", "qcow2", "ov.qcow2", "1000k",
        ],
    );
    both(d, "ov.qcow2", &["resize", "IMG", "3M"]);
}

#[test]
fn resize_raw_matches_qemu() {
    let t = Tmp::new("resize_raw");
    let d = t.path();
    write_pseudo_random(&d.join("r.raw"), 100_000, 3);
    for args in [
        &["resize", "-f", "raw", "IMG", "200000"][..],
        &["resize", "-f", "raw", "IMG", "50000"],
        &["resize", "-f", "raw", "--shrink", "IMG", "50000"],
        &["resize", "-f", "raw", "--preallocation=full", "IMG", "1M"],
        &[
            "resize",
            "-f",
            "raw",
            "--preallocation=metadata",
            "IMG",
            "1M",
        ],
    ] {
        let (q, m) = ("r.raw.q", "r.raw.m");
        cp(d, "r.raw", q);
        cp(d, "r.raw", m);
        let sub = |f: &str| -> Vec<String> {
            args.iter()
                .map(|a| {
                    if *a == "IMG" {
                        f.to_string()
                    } else {
                        a.to_string()
                    }
                })
                .collect()
        };
        let theirs = qemu_img(d, sub(q));
        let ours = qimg(d, sub(m));
        assert_eq!(ours.code(), theirs.code(), "{args:?}");
        assert_eq!(
            norm_ours(&ours.stderr),
            norm_theirs(&theirs.stderr),
            "{args:?}"
        );
        assert_eq!(ours.stdout, theirs.stdout);
        assert_eq!(
            std::fs::read(d.join(q)).unwrap(),
            std::fs::read(d.join(m)).unwrap()
        );
    }
}

#[test]
fn amend_matches_qemu() {
    let t = Tmp::new("amend");
    let d = t.path();
    mk(d, "compat=1.1", "a.qcow2", "1M");
    mk(d, "compat=0.10", "v2.qcow2", "1M");
    mk(d, "compat=1.1", "s.qcow2", "1M");
    qemu_img_ok(d, &["snapshot", "-c", "s", "s.qcow2"]);
    io(
        d,
        "qcow2",
        "s.qcow2",
        &[
            "write -P 6 0 64k",
            "write -z 64k 64k",
            "write -z -u 192k 64k",
        ],
    );
    mk(d, "lazy_refcounts=on,refcount_bits=8", "l.qcow2", "1M");
    for img in ["a.qcow2", "v2.qcow2", "s.qcow2", "l.qcow2"] {
        for o in [
            "compat=0.10",
            "compat=1.1",
            "compat=v3,lazy_refcounts=on",
            "lazy_refcounts=off",
            "refcount_bits=8",
            "refcount_bits=64",
            "refcount_bits=1",
            "refcount_bits=2",
            "refcount_bits=3",
            "refcount_bits=x",
            "size=3M",
            "size=512k",
            "size=1000",
            "compat=0.10,refcount_bits=8",
            "compat=0.10,lazy_refcounts=on",
            "compat=2",
            "lazy_refcounts=maybe",
            "cluster_size=4096",
            "preallocation=full",
            "bogus=1",
            "backing_file=foo",
            "data_file=x",
            "data_file_raw=on",
            "data_file_raw=off",
        ] {
            both(d, img, &["amend", "-o", o, "IMG"]);
        }
    }
    // Downgrading expands zero clusters into something v2 QEMU reads the same.
    qemu_img_ok(
        d,
        &[
            "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "o.qcow2", "1M",
        ],
    );
    io(
        d,
        "qcow2",
        "o.qcow2",
        &[
            "write -z 0 128k",
            "write -P 4 128k 64k",
            "write -z 192k 64k",
        ],
    );
    both(d, "o.qcow2", &["amend", "-o", "compat=0.10", "IMG"]);
    // Raw images cannot be amended; help lists the options.
    qemu_img_ok(d, &["create", "-q", "-f", "raw", "r.raw", "1M"]);
    both(d, "a.qcow2", &["amend", "-o", "help", "IMG"]);
    let theirs = qemu_img(d, ["amend", "-f", "raw", "-o", "size=2M", "r.raw"]);
    let ours = qimg(d, ["amend", "-f", "raw", "-o", "size=2M", "r.raw"]);
    assert_outputs_equal(&ours, &theirs, &|s| s.to_string());
    // Data file images: clearing data_file_raw, renaming the data file.
    qemu_img_ok(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=d.data,data_file_raw=on",
            "d.qcow2",
            "1M",
        ],
    );
    both(d, "d.qcow2", &["amend", "-o", "data_file_raw=off", "IMG"]);
    both(d, "d.qcow2", &["amend", "-o", "compat=0.10", "IMG"]);
}

/// A stored bitmap: name, flags, and its set bits as runs `(first, count)`.
type StoredBitmap = (String, u32, Vec<(u64, u64)>);

/// Every persistent bitmap of a qcow2 file, read straight from its directory, with the
/// bits the virtual size needs.
fn stored_bitmaps(p: &Path) -> Vec<StoredBitmap> {
    let d = std::fs::read(p).unwrap();
    let u = |at: usize, n: usize| d[at..at + n].iter().fold(0u64, |x, &b| x << 8 | b as u64);
    let cs = 1u64 << u(20, 4);
    let size = u(24, 8);
    let mut ext = u(100, 4) as usize;
    let mut out = Vec::new();
    while ext + 8 <= cs as usize && u(ext, 4) != 0 {
        let len = u(ext + 4, 4) as usize;
        if u(ext, 4) == 0x2385_2875 {
            let (nb, dir) = (u(ext + 8, 4), u(ext + 24, 8) as usize);
            let mut p = dir;
            for _ in 0..nb {
                let (table, tsize, flags) = (u(p, 8), u(p + 8, 4), u(p + 12, 4) as u32);
                let gbits = u(p + 17, 1);
                let name_len = u(p + 18, 2) as usize;
                let name = String::from_utf8_lossy(&d[p + 24..p + 24 + name_len]).into_owned();
                let nbits = size.div_ceil(1 << gbits);
                assert_eq!(tsize, nbits.div_ceil(cs * 8), "{name}: table size");
                let mut runs: Vec<(u64, u64)> = Vec::new();
                for bit in 0..nbits {
                    let e = u(table as usize + 8 * (bit / (cs * 8)) as usize, 8);
                    let off = e & 0x00ff_ffff_ffff_fe00;
                    let k = bit % (cs * 8);
                    let set = if off == 0 {
                        e & 1 == 1
                    } else {
                        d[off as usize + (k / 8) as usize] >> (k % 8) & 1 == 1
                    };
                    if set {
                        match runs.last_mut() {
                            Some(r) if r.0 + r.1 == bit => r.1 += 1,
                            _ => runs.push((bit, 1)),
                        }
                    }
                }
                out.push((name, flags, runs));
                p = (p + 24 + name_len + u(p + 20, 4) as usize).next_multiple_of(8);
            }
        }
        ext += 8 + len.next_multiple_of(8);
    }
    out
}

#[test]
fn resize_with_bitmaps_matches_qemu() {
    let t = Tmp::new("resize_bitmaps");
    let d = t.path();
    for (name, opts) in [("b.qcow2", "compat=1.1"), ("s.qcow2", "cluster_size=4096")] {
        mk(d, opts, name, "4M");
        qemu_img_ok(d, &["bitmap", "--add", name, "en"]);
        qemu_img_ok(d, &["bitmap", "--add", "--disable", name, "dis"]);
        qemu_img_ok(d, &["bitmap", "--add", "-g", "1M", name, "big"]);
        qemu_img_ok(d, &["bitmap", "--add", "-g", "4k", name, "fine"]);
        io(d, "qcow2", name, &["write -P 5 0 1M", "write -P 6 3M 1M"]);
        qemu_img_ok(d, &["bitmap", "--merge", "en", name, "dis"]);
        for args in [
            &["resize", "IMG", "10M"][..],
            &["resize", "IMG", "+300M"],
            &["resize", "IMG", "3000001536"],
            &["resize", "--shrink", "IMG", "2M"],
            &["resize", "--shrink", "IMG", "3000k"],
            &["resize", "IMG", "3M"],
        ] {
            both(d, name, args);
            let (q, m) = (format!("{name}.q"), format!("{name}.m"));
            assert_eq!(
                stored_bitmaps(&d.join(&m)),
                stored_bitmaps(&d.join(&q)),
                "{args:?}: bitmaps differ"
            );
        }
    }
    // An inconsistent (in_use) bitmap: QEMU refuses; qimg too, leaving the image as it
    // was.
    let p = d.join("b.qcow2");
    let ext = {
        let h = Qcow2Hdr::read(&p);
        h.extensions(&p)
            .into_iter()
            .find(|e| e.1 == 0x2385_2875)
            .unwrap()
            .0
    };
    let dir = be64(&p, ext + 24);
    put_be32(&p, dir + 12, be32(&p, dir + 12) | 1);
    cp(d, "b.qcow2", "iu.qcow2");
    let ours = qimg(d, ["resize", "iu.qcow2", "8M"]);
    let theirs = qemu_img(d, ["resize", "b.qcow2", "8M"]);
    assert_outputs_equal(&ours, &theirs, &|s| s.replace("iu.qcow2", "b.qcow2"));
    assert!(!qemu_img(d, ["info", "iu.qcow2"])
        .ok()
        .stdout
        .contains("8 MiB"));
}

#[test]
fn amend_progress_matches_qemu() {
    let t = Tmp::new("amend_progress");
    let d = t.path();
    mk(d, "compat=0.10", "v2.qcow2", "64M");
    mk(d, "compat=1.1", "v3.qcow2", "64M");
    mk(d, "compat=1.1,refcount_bits=8", "r8.qcow2", "64M");
    // Many L1 entries (and a snapshot's) for the downgrade's per-entry reports.
    mk(d, "cluster_size=512", "small.qcow2", "64M");
    qemu_img_ok(d, &["snapshot", "-c", "s", "small.qcow2"]);
    for img in ["v2.qcow2", "v3.qcow2", "r8.qcow2", "small.qcow2"] {
        for o in [
            "compat=1.1",
            "compat=0.10",
            "refcount_bits=64",
            "compat=1.1,refcount_bits=8",
            "compat=0.10,refcount_bits=16",
            "lazy_refcounts=on",
            "size=128M",
            // Failures inside the driver (after the first report) and while parsing.
            "compat=2",
            "refcount_bits=3",
            "backing_file=x",
            "foo=1",
            "lazy_refcounts=maybe",
        ] {
            both(d, img, &["amend", "-p", "-o", o, "IMG"]);
        }
    }
    both(
        d,
        "v3.qcow2",
        &["amend", "-p", "-q", "-o", "compat=0.10", "IMG"],
    );
    both(
        d,
        "v3.qcow2",
        &["amend", "-p", "--force", "-o", "compat=0.10", "IMG"],
    );
    let ours = qimg(d, ["amend", "-p", "-o", "compat=1.1", "nosuch.qcow2"]);
    let theirs = qemu_img(d, ["amend", "-p", "-o", "compat=1.1", "nosuch.qcow2"]);
    assert_outputs_equal(&ours, &theirs, &|s| s.to_string());
}

#[test]
fn snapshot_apply_refused_with_bitmaps() {
    // qemu-img refuses to revert an image that has persistent bitmaps, enabled or not.
    let t = Tmp::new("snap_apply_bitmaps");
    let d = t.path();
    mk(d, "compat=1.1", "b.qcow2", "2M");
    qemu_img_ok(d, &["snapshot", "-c", "s", "b.qcow2"]);
    qemu_img_ok(d, &["bitmap", "--add", "b.qcow2", "bm"]);
    both(d, "b.qcow2", &["snapshot", "-a", "s", "IMG"]);
    both(d, "b.qcow2", &["snapshot", "-a", "nosuch", "IMG"]);
    qemu_img_ok(d, &["bitmap", "--disable", "b.qcow2", "bm"]);
    both(d, "b.qcow2", &["snapshot", "-a", "1", "IMG"]);
}
