//! `check()` against `qemu-img check` 10.0.2: images are made with qemu-img/qemu-io,
//! damaged byte-wise, and the figures and stderr lines of both are compared. The oracle
//! runs at test time; nothing here is a recorded expectation.

use qimg::ondisk::refcount;
use qimg::qcow2::check::{check, CheckReport};
use qimg::qcow2::{Qcow2, Qcow2Options};
use qimg::storage::{FileStorage, MemStorage, Storage};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

const COPIED: u64 = 1 << 63;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().expect("run tool");
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn create(dir: &Path, name: &str, opts: &str, size: &str) -> PathBuf {
    let p = dir.join(name);
    let ps = p.to_str().unwrap();
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([ps, size]);
    run("qemu-img", &args);
    p
}

/// Runs qemu-io commands on an image.
fn io(p: &Path, cmds: &[&str]) {
    let mut args = Vec::new();
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(p.to_str().unwrap());
    run("qemu-io", &args);
}

fn r64(p: &Path, off: u64) -> u64 {
    let d = std::fs::read(p).unwrap();
    u64::from_be_bytes(d[off as usize..off as usize + 8].try_into().unwrap())
}

fn w64(p: &Path, off: u64, v: u64) {
    let mut d = std::fs::read(p).unwrap();
    d[off as usize..off as usize + 8].copy_from_slice(&v.to_be_bytes());
    std::fs::write(p, d).unwrap();
}

fn w32(p: &Path, off: u64, v: u32) {
    let mut d = std::fs::read(p).unwrap();
    d[off as usize..off as usize + 4].copy_from_slice(&v.to_be_bytes());
    std::fs::write(p, d).unwrap();
}

struct Geo {
    cluster_bits: u32,
    order: u32,
    l1: u64,
    reftable: u64,
    entry: u64,
}

fn geo(p: &Path) -> Geo {
    let d = std::fs::read(p).unwrap();
    let be32 = |o: usize| u32::from_be_bytes(d[o..o + 4].try_into().unwrap());
    let version = be32(4);
    let order = if version >= 3 { be32(96) } else { 4 };
    let incompat = if version >= 3 { r64(p, 72) } else { 0 };
    Geo {
        cluster_bits: be32(20),
        order,
        l1: r64(p, 40),
        reftable: r64(p, 48),
        entry: if incompat & 16 != 0 { 16 } else { 8 },
    }
}

/// File offset of the L2 entry for guest cluster `n` (inside the first L2 table).
fn l2_entry_at(p: &Path, n: u64) -> u64 {
    let g = geo(p);
    let l2 = r64(p, g.l1) & OFFSET_MASK;
    assert_ne!(l2, 0);
    l2 + n * g.entry
}

/// Sets the stored refcount of host cluster `cluster`.
fn set_refcount(p: &Path, cluster: u64, v: u64) {
    let g = geo(p);
    let per_block = refcount::entries_per_block(g.cluster_bits, g.order);
    let block = r64(p, g.reftable + cluster / per_block * 8) & !0x1ff;
    assert_ne!(block, 0);
    let cs = 1usize << g.cluster_bits;
    let mut d = std::fs::read(p).unwrap();
    let b = &mut d[block as usize..block as usize + cs];
    refcount::set(b, g.order, (cluster % per_block) as usize, v);
    std::fs::write(p, d).unwrap();
}

fn get_refcount(p: &Path, cluster: u64) -> u64 {
    let g = geo(p);
    let per_block = refcount::entries_per_block(g.cluster_bits, g.order);
    let block = r64(p, g.reftable + cluster / per_block * 8) & !0x1ff;
    let cs = 1usize << g.cluster_bits;
    let d = std::fs::read(p).unwrap();
    refcount::get(
        &d[block as usize..block as usize + cs],
        g.order,
        (cluster % per_block) as usize,
    )
}

struct Oracle {
    json: Option<serde_json::Value>,
    stderr: Vec<String>,
    code: i32,
}

fn qemu_check(p: &Path) -> Oracle {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", p.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    Oracle {
        json: serde_json::from_str(&stdout).ok(),
        stderr: String::from_utf8_lossy(&out.stderr)
            .lines()
            .map(str::to_string)
            .collect(),
        code: out.status.code().unwrap(),
    }
}

fn ours(p: &Path) -> CheckReport {
    let f: Arc<dyn Storage> = Arc::new(FileStorage::open(p, false).unwrap());
    let img = Qcow2::open(
        f,
        Qcow2Options {
            check: true,
            ..Default::default()
        },
    )
    .unwrap();
    check(&img).unwrap()
}

/// Compares `check()` with `qemu-img check` on the same file and returns our report.
fn same(p: &Path) -> CheckReport {
    let q = qemu_check(p);
    let r = ours(p);
    let mut want = r.stderr_lines("qemu-img");
    match (&r.failure, r.check_errors) {
        (Some(f), _) => want.push(format!("qemu-img: Check failed: {}", f.strerror())),
        (None, n) if n > 0 => want.push("qemu-img: Check failed".into()),
        _ => {}
    }
    assert_eq!(q.stderr, want, "stderr of {}", p.display());
    assert_eq!(q.code, r.exit_code(), "exit code of {}", p.display());
    if r.failure.is_some() {
        assert!(q.json.is_none(), "qemu printed a result for a failed check");
        return r;
    }
    let j = q.json.expect("qemu-img check printed JSON");
    let field = |k: &str| j.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    let got = [
        ("check-errors", r.check_errors),
        ("corruptions", r.corruptions),
        ("leaks", r.leaks),
        ("total-clusters", r.total_clusters),
        ("allocated-clusters", r.allocated_clusters),
        ("fragmented-clusters", r.fragmented_clusters),
        ("compressed-clusters", r.compressed_clusters),
        ("image-end-offset", r.image_end_offset),
    ];
    for (k, v) in got {
        assert_eq!(field(k), v, "{k} of {}", p.display());
    }
    r
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn clean_images_of_every_shape() {
    let d = tmp();
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "default.qcow2",
            "",
            &["write 0 64k", "write 1M 128k", "write 192k 64k"],
        ),
        (
            "v2.qcow2",
            "compat=0.10",
            &["write 0 64k", "write 2M 64k", "write 64k 64k"],
        ),
        (
            "c512.qcow2",
            "cluster_size=512",
            &["write 0 4k", "write 100k 3k", "write 1k 1k"],
        ),
        (
            "c2m.qcow2",
            "cluster_size=2M",
            &["write 0 64k", "write 2M 1M"],
        ),
        (
            "rb1.qcow2",
            "refcount_bits=1",
            &["write 0 64k", "write 1M 64k"],
        ),
        (
            "rb2.qcow2",
            "refcount_bits=2",
            &["write 0 64k", "write 1M 64k"],
        ),
        ("rb4.qcow2", "refcount_bits=4", &["write 0 64k"]),
        ("rb8.qcow2", "refcount_bits=8", &["write 0 64k"]),
        ("rb32.qcow2", "refcount_bits=32", &["write 0 64k"]),
        (
            "rb64.qcow2",
            "refcount_bits=64",
            &["write 0 64k", "write 3M 64k"],
        ),
        ("empty.qcow2", "", &[]),
        (
            "zero.qcow2",
            "",
            &["write 0 256k", "write -z 64k 64k", "write -z -u 128k 64k"],
        ),
        ("prealloc.qcow2", "preallocation=metadata", &["write 0 64k"]),
        ("lazy.qcow2", "lazy_refcounts=on", &["write 0 64k"]),
    ];
    for (name, opts, cmds) in cases {
        let p = create(d.path(), name, opts, "4M");
        if !cmds.is_empty() {
            io(&p, cmds);
        }
        let r = same(&p);
        assert_eq!(r.exit_code(), 0, "{name}");
    }
    // An odd virtual size: total-clusters counts whole sectors.
    let p = create(d.path(), "odd.qcow2", "", "1000000");
    io(&p, &["write 0 4k"]);
    same(&p);
}

#[test]
fn compressed_clusters() {
    let d = tmp();
    for (name, opts) in [
        ("zlib.qcow2", ""),
        ("zstd.qcow2", "compression_type=zstd"),
        ("c512z.qcow2", "cluster_size=512"),
        ("rb1z.qcow2", "refcount_bits=1"),
    ] {
        let p = create(d.path(), name, opts, "4M");
        io(
            &p,
            &[
                "write -c -P 1 0 64k",
                "write -c -P 2 64k 64k",
                "write -c 256k 64k",
                "write 512k 64k",
            ],
        );
        let r = same(&p);
        assert!(r.compressed_clusters > 0, "{name}");
    }
    // Compressed data written with convert packs many streams into shared clusters.
    let src = d.path().join("src.raw");
    std::fs::write(
        &src,
        (0..1u32 << 20).map(|i| (i / 7) as u8).collect::<Vec<u8>>(),
    )
    .unwrap();
    let p = d.path().join("conv.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            src.to_str().unwrap(),
            p.to_str().unwrap(),
        ],
    );
    same(&p);
    // COPIED on a compressed entry is an error of its own.
    let p = create(d.path(), "copied.qcow2", "", "4M");
    io(&p, &["write -c 0 64k", "write -c 64k 64k"]);
    let e = l2_entry_at(&p, 1);
    w64(&p, e, r64(&p, e) | COPIED);
    assert_eq!(same(&p).corruptions, 1);
    // A descriptor pointing past the end of the file.
    let p = create(d.path(), "far.qcow2", "", "4M");
    io(&p, &["write -c 0 64k"]);
    let e = l2_entry_at(&p, 0);
    w64(&p, e, r64(&p, e) | (1 << 40));
    same(&p);
}

#[test]
fn extended_l2() {
    let d = tmp();
    let p = create(
        d.path(),
        "ext.qcow2",
        "extended_l2=on,cluster_size=128k",
        "8M",
    );
    io(
        &p,
        &[
            "write 4k 4k",
            "write -z 64k 4k",
            "write 1M 128k",
            "write -z 2M 128k",
            "write 3M 12k",
        ],
    );
    same(&p);
    // A subcluster both allocated and zero.
    let e = l2_entry_at(&p, 0);
    w64(&p, e + 8, r64(&p, e + 8) | (1 << 33) | 2);
    // Allocation bits on an unallocated cluster.
    let e5 = l2_entry_at(&p, 5);
    w64(&p, e5 + 8, 1);
    let r = same(&p);
    assert_eq!(r.corruptions, 2);

    let p = create(d.path(), "extc.qcow2", "extended_l2=on", "8M");
    io(&p, &["write -c 0 64k", "write 64k 64k"]);
    same(&p);
    let e = l2_entry_at(&p, 0);
    w64(&p, e + 8, 1);
    assert_eq!(same(&p).corruptions, 1);
}

#[test]
fn snapshots() {
    let d = tmp();
    let p = create(d.path(), "snap.qcow2", "", "4M");
    io(&p, &["write 0 128k"]);
    run("qemu-img", &["snapshot", "-c", "s1", p.to_str().unwrap()]);
    io(&p, &["write 64k 64k", "write 1M 64k"]);
    run("qemu-img", &["snapshot", "-c", "s2", p.to_str().unwrap()]);
    io(&p, &["write 0 64k"]);
    let r = same(&p);
    assert_eq!(r.exit_code(), 0);

    let v2 = create(d.path(), "snapv2.qcow2", "compat=0.10", "4M");
    io(&v2, &["write 0 64k"]);
    run("qemu-img", &["snapshot", "-c", "s1", v2.to_str().unwrap()]);
    same(&v2);

    // Dropping a shared refcount to 1: the snapshot's reference becomes a corruption.
    let bad = d.path().join("bad.qcow2");
    std::fs::copy(&p, &bad).unwrap();
    let host = r64(&bad, l2_entry_at(&bad, 1)) & OFFSET_MASK;
    let g = geo(&bad);
    let snap_table = r64(&bad, 64);
    set_refcount(&bad, host >> g.cluster_bits, 1);
    same(&bad);

    // Unaligned snapshot L1 offset, and an L1 too large.
    let bad = d.path().join("badl1.qcow2");
    std::fs::copy(&p, &bad).unwrap();
    w64(&bad, snap_table, r64(&bad, snap_table) + 512);
    same(&bad);
    let bad = d.path().join("bigl1.qcow2");
    std::fs::copy(&p, &bad).unwrap();
    w32(&bad, snap_table + 8, 5 << 20);
    same(&bad);
    // v3 entries need 16 bytes of extra data (the last entry, so that shortening it
    // does not shift the next one).
    let one = create(d.path(), "one.qcow2", "", "4M");
    io(&one, &["write 0 64k"]);
    run("qemu-img", &["snapshot", "-c", "s1", one.to_str().unwrap()]);
    let table = r64(&one, 64);
    w32(&one, table + 36, 8);
    let r = same(&one);
    assert!(r.messages[0].contains("is incomplete"));
    // A snapshot L1 offset that wraps QEMU's signed arithmetic ends the check (ENOMEM).
    let bad = d.path().join("wrap.qcow2");
    std::fs::copy(&p, &bad).unwrap();
    w64(&bad, snap_table, 0x8000_0000_0000_0000);
    assert!(same(&bad).failure.is_some());
    // Problems that end QEMU's check before the refcounts are looked at.
    for (name, off, v) in [
        ("extra.qcow2", snap_table + 36, 2000u32),
        ("count.qcow2", 60, 70000),
    ] {
        let bad = d.path().join(name);
        std::fs::copy(&p, &bad).unwrap();
        w32(&bad, off, v);
        assert!(same(&bad).failure.is_some(), "{name}");
    }
    let bad = d.path().join("offset.qcow2");
    std::fs::copy(&p, &bad).unwrap();
    w64(&bad, 64, snap_table + 8);
    assert!(same(&bad).failure.is_some());
}

#[test]
fn bitmaps() {
    let d = tmp();
    let p = create(d.path(), "bm.qcow2", "", "4M");
    let ps = p.to_str().unwrap();
    run("qemu-img", &["bitmap", "--add", ps, "b0"]);
    run("qemu-img", &["bitmap", "--add", "-g", "512", ps, "b1"]);
    io(&p, &["write 0 64k", "write 2M 64k"]);
    let r = same(&p);
    assert_eq!(r.exit_code(), 0);
    // With the autoclear bit cleared QEMU ignores the bitmaps: their clusters leak.
    let leaky = d.path().join("noauto.qcow2");
    std::fs::copy(&p, &leaky).unwrap();
    w64(&leaky, 88, 0);
    let q = qemu_check(&leaky);
    let r = ours(&leaky);
    // QEMU's open prints warnings of its own first; the check lines follow.
    // (Its last warning lacks a newline, so compare the text, not the lines.)
    let want = r.stderr_lines("qemu-img").join("\n");
    let got = q.stderr.join("\n");
    assert!(got.ends_with(&want), "{got:?} vs {want:?}");
    assert_eq!(q.json.unwrap()["leaks"].as_u64().unwrap(), r.leaks);
    assert!(r.leaks > 0);

    // An in-use bitmap is not loaded at open, so a bad table entry reaches the check,
    // which then gives up.
    let bad = d.path().join("inuse.qcow2");
    std::fs::copy(&p, &bad).unwrap();
    let (dir, table) = {
        let f: Arc<dyn Storage> = Arc::new(FileStorage::open(&bad, false).unwrap());
        let img = Qcow2::open(f, Qcow2Options::default()).unwrap();
        (
            img.header().bitmaps.unwrap().directory_offset,
            img.bitmaps()[0].table_offset,
        )
    };
    w32(&bad, dir + 12, 3);
    w64(&bad, table, r64(&bad, table) | 2);
    let r = same(&bad);
    assert_eq!(r.corruptions, 1);
    assert!(r.failure.is_some());
}

#[test]
fn external_data_file() {
    let d = tmp();
    let df = d.path().join("data.raw");
    let p = create(
        d.path(),
        "df.qcow2",
        &format!("data_file={}", df.to_str().unwrap()),
        "4M",
    );
    io(&p, &["write 0 64k", "write 1M 128k", "write -z 2M 64k"]);
    same(&p);
    // Snapshots and compressed clusters are not allowed with a data file. The snapshot
    // table here is zeros past the end of the file.
    let bad = d.path().join("dfsnap.qcow2");
    std::fs::copy(&p, &bad).unwrap();
    let len = std::fs::metadata(&bad).unwrap().len();
    w32(&bad, 60, 1);
    w64(&bad, 64, len.next_multiple_of(65536));
    let e = l2_entry_at(&bad, 2);
    w64(&bad, e, (1 << 62) | 0x30000);
    let r = same(&bad);
    assert!(r.corruptions >= 3);
    // COPIED must be set on every allocated entry (guest cluster 0 would become
    // unallocated instead, since its host offset is 0).
    let e = l2_entry_at(&p, 16);
    w64(&p, e, r64(&p, e) & !COPIED);
    assert_eq!(same(&p).corruptions, 1);
}

#[test]
fn leaks_and_refcount_corruptions() {
    let d = tmp();
    for (name, opts) in [
        ("leak16.qcow2", ""),
        ("leak1.qcow2", "refcount_bits=1"),
        ("leak64.qcow2", "refcount_bits=64"),
    ] {
        let p = create(d.path(), name, opts, "4M");
        io(&p, &["write 0 64k", "write 64k 64k", "write 1M 64k"]);
        let g = geo(&p);
        let data = r64(&p, l2_entry_at(&p, 0)) & OFFSET_MASK;
        let data2 = r64(&p, l2_entry_at(&p, 1)) & OFFSET_MASK;
        let max = refcount::max(g.order);
        // A leak: refcount raised on an allocated cluster (not for 1-bit refcounts, which
        // cannot go higher), and on a cluster nobody references.
        if max > 1 {
            set_refcount(&p, data >> g.cluster_bits, max.min(1000));
        }
        // Only clusters inside the file are compared, so grow it by a free cluster.
        let len = std::fs::metadata(&p).unwrap().len();
        let free = len.div_ceil(1 << g.cluster_bits);
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len((free + 1) << g.cluster_bits).unwrap();
        set_refcount(&p, free, 1);
        // A corruption: refcount lowered to zero.
        set_refcount(&p, data2 >> g.cluster_bits, 0);
        let r = same(&p);
        assert!(r.leaks >= 1 && r.corruptions >= 1, "{name}");
        assert!(r.rebuild_needed);
    }
}

#[test]
fn shared_and_copied_flags() {
    let d = tmp();
    let base = create(d.path(), "base.qcow2", "", "4M");
    io(&base, &["write 0 64k", "write 64k 64k", "write 128k 64k"]);

    // Two L2 entries pointing at one cluster.
    let p = d.path().join("dup.qcow2");
    std::fs::copy(&base, &p).unwrap();
    let e0 = r64(&p, l2_entry_at(&p, 0));
    w64(&p, l2_entry_at(&p, 2), e0);
    let r = same(&p);
    assert!(r.corruptions >= 1 && r.leaks == 1);

    // Same with 1-bit refcounts: the second reference overflows.
    let p1 = create(d.path(), "dup1.qcow2", "refcount_bits=1", "4M");
    io(&p1, &["write 0 64k", "write 64k 64k"]);
    let e0 = r64(&p1, l2_entry_at(&p1, 0));
    w64(&p1, l2_entry_at(&p1, 1), e0);
    same(&p1);

    // COPIED cleared on a data entry and on the L1 entry.
    let p = d.path().join("copied.qcow2");
    std::fs::copy(&base, &p).unwrap();
    let e = l2_entry_at(&p, 1);
    w64(&p, e, r64(&p, e) & !COPIED);
    let l1 = geo(&p).l1;
    w64(&p, l1, r64(&p, l1) & !COPIED);
    assert_eq!(same(&p).corruptions, 2);

    // Reserved bits in L1 and L2 entries, an unaligned data offset, a v2-style zero flag.
    let p = d.path().join("reserved.qcow2");
    std::fs::copy(&base, &p).unwrap();
    w64(&p, l1, r64(&p, l1) | 0x100);
    let e = l2_entry_at(&p, 0);
    w64(&p, e, r64(&p, e) | 0x2);
    let e = l2_entry_at(&p, 1);
    w64(&p, e, r64(&p, e) | 0x1000);
    let e = l2_entry_at(&p, 7);
    w64(&p, e, 0x4);
    same(&p);

    // A v2 image with zero flags: QEMU's check does not object.
    let v2 = create(d.path(), "v2zero.qcow2", "compat=0.10", "4M");
    io(&v2, &["write 0 128k"]);
    let e = l2_entry_at(&v2, 0);
    w64(&v2, e, r64(&v2, e) | 1);
    w64(&v2, l2_entry_at(&v2, 5), 1);
    assert_eq!(same(&v2).exit_code(), 0);

    // An unaligned preallocated zero cluster, and an unaligned L2 table.
    let p = d.path().join("unaligned.qcow2");
    std::fs::copy(&base, &p).unwrap();
    let e = l2_entry_at(&p, 2);
    w64(&p, e, (r64(&p, e) | 1 | 0x200) & !COPIED);
    same(&p);
    let p = d.path().join("l2unaligned.qcow2");
    std::fs::copy(&base, &p).unwrap();
    w64(&p, l1, r64(&p, l1) + 0x400);
    same(&p);
}

#[test]
fn refcount_structure_damage() {
    let d = tmp();
    let base = create(d.path(), "base.qcow2", "", "4M");
    io(&base, &["write 0 64k"]);
    let g = geo(&base);
    let rt = g.reftable;
    let block = r64(&base, rt);
    let cases: Vec<(&str, u64, u64)> = vec![
        ("reserved.qcow2", rt, block | 1),
        ("unaligned.qcow2", rt, block + 0x200),
        ("outside.qcow2", rt, 1 << 40),
        ("second.qcow2", rt + 8, 1 << 30),
        ("zero.qcow2", rt, 0),
        ("shared.qcow2", rt + 8, block),
        ("eio.qcow2", rt, 0x7fff_ffff_ffff_0000),
    ];
    for (name, off, v) in cases {
        let p = d.path().join(name);
        std::fs::copy(&base, &p).unwrap();
        w64(&p, off, v);
        let r = same(&p);
        assert!(r.corruptions + r.check_errors > 0, "{name}");
    }
    // A refcount table far past the end of the file must not allocate anything big.
    let p = d.path().join("farrt.qcow2");
    std::fs::copy(&base, &p).unwrap();
    w64(&p, 48, 1 << 50);
    same(&p);
    // A truncated image: tables past the end read as zeros.
    let p = create(d.path(), "trunc.qcow2", "", "4M");
    io(&p, &["write 0 64k", "write 1M 64k"]);
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(len - 65536)
        .unwrap();
    same(&p);
    assert_eq!(get_refcount(&base, 0), 1);
}

/// Storage whose reads fail past a byte offset, to reach the I/O error paths that real
/// files (which read zeros past their end) never take.
#[derive(Debug)]
struct Failing {
    inner: MemStorage,
    fail_from: u64,
}

impl Storage for Failing {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> qimg::Result<()> {
        if offset + buf.len() as u64 > self.fail_from && offset > 0 {
            return Err(std::io::Error::from_raw_os_error(libc_eio()).into());
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> qimg::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> qimg::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> qimg::Result<()> {
        self.inner.set_len(len)
    }
    fn flush(&self) -> qimg::Result<()> {
        Ok(())
    }
}

fn libc_eio() -> i32 {
    5
}

#[test]
fn io_errors_become_check_errors() {
    let d = tmp();
    let p = create(d.path(), "io.qcow2", "", "4M");
    io(&p, &["write 0 64k"]);
    let l2 = r64(&p, geo(&p).l1) & OFFSET_MASK;
    let bytes = std::fs::read(&p).unwrap();
    let s: Arc<dyn Storage> = Arc::new(Failing {
        inner: MemStorage::new(bytes),
        fail_from: l2 + 1,
    });
    let img = Qcow2::open(
        s,
        Qcow2Options {
            check: true,
            ..Default::default()
        },
    )
    .unwrap();
    let r = check(&img).unwrap();
    assert_eq!(r.check_errors, 1);
    assert_eq!(r.failure.map(|f| f.errno), Some(5));
    assert_eq!(
        r.messages,
        vec!["ERROR: I/O error in check_refcounts_l2".to_string()]
    );
    assert_eq!(r.exit_code(), 1);
}
