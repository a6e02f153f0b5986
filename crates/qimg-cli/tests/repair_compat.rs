//! `check -r leaks|all` compared with qemu-img 10.0.2 on the same damaged images: each tool
//! repairs its own copy; stdout (human, JSON, quiet), stderr and exit codes must be equal,
//! `qemu-img check` must then see the same state in both copies, and a repaired image must
//! hold the data of a copy taken before the damage (`qemu-img compare`).
//!
//! Where qemu-img 10.0.2 is not a usable oracle the comparison is narrowed and said so:
//! after repairing an image with bitmaps, qemu-img stores the bitmaps anew on close (so
//! its copy ends elsewhere); on an image with snapshots *and* bitmaps it destroys the
//! snapshot table (reference, top); on a refcount table entry with reserved bits its
//! own overlap check stops the rebuild.

mod common;

use common::*;
use std::path::{Path, PathBuf};

const COPIED: u64 = 1 << 63;
const OFFSET: u64 = 0x00ff_ffff_ffff_fe00;

fn mk(cwd: &Path, opts: &str, name: &str, size: &str) -> PathBuf {
    let mut a = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        a.extend_from_slice(&["-o", opts]);
    }
    a.extend_from_slice(&[name, size]);
    qemu_img_ok(cwd, &a);
    cwd.join(name)
}

/// Data in guest clusters 0..4, a zero cluster at 4, data at 1 MiB (64 KiB clusters),
/// plus a pristine copy `<name>.orig` for data comparisons.
fn base(cwd: &Path, name: &str, opts: &str) -> PathBuf {
    let p = mk(cwd, opts, name, "4M");
    io(
        cwd,
        "qcow2",
        name,
        &[
            "write -P 1 0 256k",
            "write -z 256k 64k",
            "write -P 2 1M 64k",
        ],
    );
    keep_pristine(cwd, name);
    p
}

fn keep_pristine(cwd: &Path, name: &str) {
    std::fs::copy(cwd.join(name), cwd.join(format!("{name}.orig"))).unwrap();
}

fn refcount_bits_order(p: &Path) -> (u32, u32) {
    let h = Qcow2Hdr::read(p);
    (h.cluster_bits, h.refcount_order)
}

/// Sets the stored refcount of host cluster `c` (16- or 64-bit refcounts).
fn set_refcount(p: &Path, c: u64, v: u64) {
    let (cb, order) = refcount_bits_order(p);
    let per_block = (1u64 << (cb + 3)) >> order;
    let h = Qcow2Hdr::read(p);
    let block = be64(p, h.refcount_table_offset + c / per_block * 8) & !0x1ff;
    assert_ne!(block, 0);
    let i = c % per_block;
    match order {
        4 => write_at(p, block + 2 * i, &(v as u16).to_be_bytes()),
        6 => write_at(p, block + 8 * i, &v.to_be_bytes()),
        _ => panic!("helper handles 16- and 64-bit refcounts"),
    }
}

fn l2_entry_off(p: &Path, idx: u64) -> u64 {
    let h = Qcow2Hdr::read(p);
    (be64(p, h.l1_table_offset) & OFFSET) + 8 * idx
}

fn host_of(p: &Path, idx: u64) -> u64 {
    be64(p, l2_entry_off(p, idx)) & OFFSET
}

/// What to compare besides the repair's own output.
#[derive(Clone, Copy, PartialEq)]
enum After {
    /// qemu-img check of both copies must agree.
    Same,
    /// Only the repair output is comparable (qemu-img rewrites bitmaps on close).
    OutputOnly,
}

/// Runs `check -r MODE` with every output form on fresh copies through both tools.
#[track_caller]
fn repair_same(cwd: &Path, img: &str, mode: &str, after: After) {
    repair_same_forms(
        cwd,
        img,
        mode,
        after,
        &[&[][..], &["--output=json"][..], &["-q"][..]],
    );
}

/// [`repair_same`] with the given output forms only (large images).
#[track_caller]
fn repair_same_forms(cwd: &Path, img: &str, mode: &str, after: After, forms: &[&[&str]]) {
    for &form in forms {
        let q = cwd.join("rq");
        let t = cwd.join("rt");
        std::fs::create_dir_all(&q).unwrap();
        std::fs::create_dir_all(&t).unwrap();
        std::fs::copy(cwd.join(img), q.join(img)).unwrap();
        std::fs::copy(cwd.join(img), t.join(img)).unwrap();
        let mut args = vec!["check", "-r", mode];
        args.extend_from_slice(form);
        args.push(img);
        let theirs = qemu_img(&q, &args);
        let ours = qimg(&t, &args);
        assert_outputs_equal(&ours, &theirs, &|s| s.to_string());
        if after == After::Same {
            let after_q = qemu_img(&q, ["check", img]);
            let after_t = qemu_img(&t, ["check", img]);
            assert_eq!(
                after_t.stdout, after_q.stdout,
                "{img} -r {mode}: state after"
            );
            assert_eq!(
                after_t.stderr, after_q.stderr,
                "{img} -r {mode}: state after"
            );
            assert_eq!(after_t.code(), after_q.code());
            let snaps_q = qemu_img(&q, ["snapshot", "-l", img]);
            let snaps_t = qemu_img(&t, ["snapshot", "-l", img]);
            assert_eq!(
                snaps_t.stdout, snaps_q.stdout,
                "{img} -r {mode}: snapshots after"
            );
        }
        if ours.code() == Some(0) {
            assert_clean_and_same_data(cwd, &format!("rt/{img}"), img);
        }
    }
}

/// The image passes `qemu-img check` and holds the data of `<orig>.orig`.
#[track_caller]
fn assert_clean_and_same_data(cwd: &Path, path: &str, orig: &str) {
    let c = qemu_img(cwd, ["check", path]);
    assert_eq!(c.code(), Some(0), "{path}: {}", c.describe());
    let cmp = qemu_img(cwd, ["compare", &format!("{orig}.orig"), path]);
    assert_eq!(cmp.code(), Some(0), "{path}: data: {}", cmp.describe());
}

/// Repairs with qimg only and returns its output.
fn ours_only(cwd: &Path, img: &str, mode: &str) -> Out {
    let t = cwd.join("only");
    std::fs::create_dir_all(&t).unwrap();
    std::fs::copy(cwd.join(img), t.join(img)).unwrap();
    qimg(&t, ["check", "-r", mode, img])
}

#[test]
fn repair_leaks() {
    let t = Tmp::new("rep_leaks");
    let cwd = t.path();
    let p = base(cwd, "a.qcow2", "");
    set_refcount(&p, 0, 2);
    // And a cluster appended to the file with refcount 1 that nothing references.
    let end = file_len(&p).div_ceil(65536);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len((end + 2) * 65536)
        .unwrap();
    set_refcount(&p, end, 1);
    repair_same(cwd, "a.qcow2", "leaks", After::Same);
    repair_same(cwd, "a.qcow2", "all", After::Same);
}

#[test]
fn repair_refcount_zero_rebuilds() {
    let t = Tmp::new("rep_zero");
    let cwd = t.path();
    let p = base(cwd, "a.qcow2", "");
    set_refcount(&p, host_of(&p, 1) / 65536, 0);
    repair_same(cwd, "a.qcow2", "leaks", After::Same);
    repair_same(cwd, "a.qcow2", "all", After::Same);
    // Many refcount blocks, a refcount table of several clusters, 64-bit refcounts.
    let p = mk(cwd, "cluster_size=512,refcount_bits=64", "m.qcow2", "8M");
    io(
        cwd,
        "qcow2",
        "m.qcow2",
        &["write -P 3 0 3M", "write -c -P 4 6M 64k"],
    );
    keep_pristine(cwd, "m.qcow2");
    set_refcount(&p, host_of(&p, 7) / 512, 0);
    set_refcount(&p, 5, 3);
    repair_same(cwd, "m.qcow2", "all", After::Same);
}

#[test]
fn repair_double_reference() {
    let t = Tmp::new("rep_double");
    let cwd = t.path();
    let p = base(cwd, "a.qcow2", "");
    let e0 = be64(&p, l2_entry_off(&p, 0));
    put_be64(&p, l2_entry_off(&p, 3), e0);
    repair_same(cwd, "a.qcow2", "leaks", After::Same);
    // With -r all the image is consistent again but guest cluster 3 now shows cluster 0's
    // data: compare the two tools' copies with each other only.
    let q = cwd.join("dq");
    let o = cwd.join("dt");
    std::fs::create_dir_all(&q).unwrap();
    std::fs::create_dir_all(&o).unwrap();
    std::fs::copy(&p, q.join("a.qcow2")).unwrap();
    std::fs::copy(&p, o.join("a.qcow2")).unwrap();
    let theirs = qemu_img(&q, ["check", "-r", "all", "a.qcow2"]);
    let ours = qimg(&o, ["check", "-r", "all", "a.qcow2"]);
    assert_outputs_equal(&ours, &theirs, &|s| s.to_string());
    let cmp = qemu_img(cwd, ["compare", "dq/a.qcow2", "dt/a.qcow2"]);
    assert_eq!(cmp.code(), Some(0), "{}", cmp.describe());
}

#[test]
fn repair_copied_flags() {
    let t = Tmp::new("rep_copied");
    let cwd = t.path();
    let p = base(cwd, "a.qcow2", "");
    let off = l2_entry_off(&p, 2);
    put_be64(&p, off, be64(&p, off) & !COPIED);
    let l1 = Qcow2Hdr::read(&p).l1_table_offset;
    put_be64(&p, l1, be64(&p, l1) & !COPIED);
    repair_same(cwd, "a.qcow2", "leaks", After::Same);
    repair_same(cwd, "a.qcow2", "all", After::Same);
}

#[test]
fn repair_broken_refcount_table_entries() {
    let t = Tmp::new("rep_reftable");
    let cwd = t.path();
    for (name, how) in [("un.qcow2", 0), ("out.qcow2", 1), ("ov.qcow2", 2)] {
        let p = base(cwd, name, "");
        let rt = Qcow2Hdr::read(&p).refcount_table_offset;
        let v = match how {
            0 => 0x7fe00,                                               // unaligned
            1 => 100 << 16,                                             // past the end of the file
            _ => be64(&p, Qcow2Hdr::read(&p).l1_table_offset) & OFFSET, // an L2 table
        };
        put_be64(&p, rt + 8, v);
        repair_same(cwd, name, "leaks", After::Same);
        repair_same(cwd, name, "all", After::Same);
    }
    // Reserved bits in the only refcount block's entry: qemu-img 10.0.2's rebuild stops
    // on its own overlap check (and marks the image corrupt); qimg rebuilds.
    let p = base(cwd, "res.qcow2", "");
    let rt = Qcow2Hdr::read(&p).refcount_table_offset;
    put_be64(&p, rt, be64(&p, rt) | 1);
    repair_same(cwd, "res.qcow2", "leaks", After::Same);
    let ours = ours_only(cwd, "res.qcow2", "all");
    assert_eq!(ours.code(), Some(0), "{}", ours.describe());
    assert!(ours.stderr.contains("Rebuilding refcount structure"));
    assert_clean_and_same_data(cwd, "only/res.qcow2", "res.qcow2");
}

#[test]
fn repair_unaligned_preallocated_zero_cluster() {
    let t = Tmp::new("rep_prealloc");
    let cwd = t.path();
    let p = base(cwd, "a.qcow2", "");
    let host = host_of(&p, 1);
    put_be64(&p, l2_entry_off(&p, 20), COPIED | host | 0x200 | 1);
    repair_same(cwd, "a.qcow2", "all", After::Same);
}

#[test]
fn repair_dirty_lazy_image_and_corrupt_bit() {
    let t = Tmp::new("rep_dirty");
    let cwd = t.path();
    mk(cwd, "lazy_refcounts=on", "l.qcow2", "8M");
    // qemu-io's `abort` ends the process with SIGABRT, which the harness treats as a
    // misbehaving tool: run it directly.
    let o = std::process::Command::new("qemu-io")
        .args([
            "-c",
            "write -P 1 0 1M",
            "-c",
            "write -P 2 4M 128k",
            "-c",
            "flush",
        ])
        .args(["-c", "abort", "l.qcow2"])
        .current_dir(cwd)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert_eq!(be64(&cwd.join("l.qcow2"), 72) & 1, 1);
    // The data qemu-io wrote is what the image must keep.
    mk(cwd, "", "l.qcow2.orig", "8M");
    io(
        cwd,
        "qcow2",
        "l.qcow2.orig",
        &["write -P 1 0 1M", "write -P 2 4M 128k"],
    );
    repair_same(cwd, "l.qcow2", "leaks", After::Same);
    repair_same(cwd, "l.qcow2", "all", After::Same);

    let p = base(cwd, "c.qcow2", "");
    put_be64(&p, 72, 2);
    set_refcount(&p, 0, 2);
    repair_same(cwd, "c.qcow2", "leaks", After::Same);
    assert_eq!(be64(&cwd.join("rt/c.qcow2"), 72), 0);
}

#[test]
fn repair_with_snapshots() {
    let t = Tmp::new("rep_snap");
    let cwd = t.path();
    let p = base(cwd, "s.qcow2", "");
    qemu_img_ok(cwd, &["snapshot", "-c", "s1", "s.qcow2"]);
    io(cwd, "qcow2", "s.qcow2", &["write -P 5 0 64k"]);
    keep_pristine(cwd, "s.qcow2");
    // A leak, a shared cluster whose refcount lost one, another whose refcount is 0.
    set_refcount(&p, 0, 2);
    set_refcount(&p, host_of(&p, 2) / 65536, 1);
    repair_same(cwd, "s.qcow2", "leaks", After::Same);
    repair_same(cwd, "s.qcow2", "all", After::Same);
    set_refcount(&p, host_of(&p, 3) / 65536, 0);
    repair_same(cwd, "s.qcow2", "all", After::Same);
    let l = qemu_img(cwd, ["snapshot", "-l", "rt/s.qcow2"]);
    assert!(l.stdout.contains("s1"));
}

#[test]
fn repair_with_bitmaps() {
    let t = Tmp::new("rep_bitmap");
    let cwd = t.path();
    let p = base(cwd, "b.qcow2", "");
    qemu_img_ok(cwd, &["bitmap", "--add", "b.qcow2", "bm0"]);
    io(cwd, "qcow2", "b.qcow2", &["write -P 7 2M 64k"]);
    keep_pristine(cwd, "b.qcow2");
    set_refcount(&p, 0, 2);
    repair_same(cwd, "b.qcow2", "leaks", After::OutputOnly);
    set_refcount(&p, host_of(&p, 1) / 65536, 0);
    repair_same(cwd, "b.qcow2", "all", After::OutputOnly);
    let info = qemu_img(cwd, ["info", "rt/b.qcow2"]);
    assert!(info.stdout.contains("bm0"));
}

#[test]
fn repair_with_snapshots_and_bitmaps_keeps_the_snapshot_table() {
    // qemu-img 10.0.2 destroys the snapshot table here: qimg only, checked by qemu-img.
    let t = Tmp::new("rep_snap_bitmap");
    let cwd = t.path();
    let p = base(cwd, "sb.qcow2", "");
    qemu_img_ok(cwd, &["snapshot", "-c", "s1", "sb.qcow2"]);
    qemu_img_ok(cwd, &["bitmap", "--add", "sb.qcow2", "bm0"]);
    io(cwd, "qcow2", "sb.qcow2", &["write -P 5 0 64k"]);
    keep_pristine(cwd, "sb.qcow2");
    let snaps = qemu_img(cwd, ["snapshot", "-l", "sb.qcow2"]).stdout;
    set_refcount(&p, 0, 2);
    set_refcount(&p, host_of(&p, 2) / 65536, 0);
    for mode in ["leaks", "all"] {
        let o = ours_only(cwd, "sb.qcow2", mode);
        let l = qemu_img(cwd, ["snapshot", "-l", "only/sb.qcow2"]).stdout;
        assert_eq!(l, snaps, "-r {mode}");
        if mode == "all" {
            assert_eq!(o.code(), Some(0), "{}", o.describe());
            assert_clean_and_same_data(cwd, "only/sb.qcow2", "sb.qcow2");
            let raw = qemu_img(
                cwd,
                [
                    "convert",
                    "-l",
                    "s1",
                    "-O",
                    "raw",
                    "only/sb.qcow2",
                    "s1.raw",
                ],
            );
            assert!(raw.success());
            let base_raw = qemu_img(
                cwd,
                [
                    "convert",
                    "-l",
                    "s1",
                    "-O",
                    "raw",
                    "sb.qcow2.orig",
                    "s1o.raw",
                ],
            );
            assert!(base_raw.success());
            assert_files_equal(&cwd.join("s1.raw"), &cwd.join("s1o.raw"));
        }
    }
}

#[test]
fn repair_usage() {
    let t = Tmp::new("rep_usage");
    let cwd = t.path();
    base(cwd, "a.qcow2", "");
    assert_same(cwd, &["check", "-U", "-r", "all", "a.qcow2"]);
    qemu_img_ok(cwd, &["create", "-q", "-f", "raw", "r.img", "1M"]);
    assert_same(cwd, &["check", "-f", "raw", "-r", "leaks", "r.img"]);
    // A clean image: nothing to repair, plain result.
    assert_same(cwd, &["check", "-r", "all", "a.qcow2"]);
    assert_same(cwd, &["check", "-r", "all", "--output=json", "a.qcow2"]);
}

/// One snapshot table entry, raw, for building broken tables.
#[derive(Clone)]
struct SnapEntry {
    l1_offset: u64,
    l1_size: u32,
    /// Bytes 16..40 of the entry (dates, VM clock, 32-bit VM state size).
    times: [u8; 24],
    extra: Vec<u8>,
    id: Vec<u8>,
    name: Vec<u8>,
}

fn read_snapshots(p: &Path) -> Vec<SnapEntry> {
    let h = Qcow2Hdr::read(p);
    let mut pos = h.snapshots_offset;
    let mut v = Vec::new();
    for _ in 0..h.nb_snapshots {
        pos = pos.next_multiple_of(8);
        let e = read_at(p, pos, 40);
        let word = |a: usize, n: usize| e[a..a + n].iter().fold(0u64, |x, &b| x << 8 | b as u64);
        let (id_len, name_len, extra) = (word(12, 2), word(14, 2), word(36, 4));
        let rest = read_at(p, pos + 40, (extra + id_len + name_len) as usize);
        let (ex, names) = rest.split_at(extra as usize);
        v.push(SnapEntry {
            l1_offset: word(0, 8),
            l1_size: word(8, 4) as u32,
            times: e[16..40].try_into().unwrap(),
            extra: ex.to_vec(),
            id: names[..id_len as usize].to_vec(),
            name: names[id_len as usize..].to_vec(),
        });
        pos += 40 + extra + id_len + name_len;
    }
    v
}

/// Writes `entries` as the table at `offset` (the current one when `None`) and points
/// the header at it with `count` entries (their number when `None`).
fn write_snapshots(p: &Path, entries: &[SnapEntry], offset: Option<u64>, count: Option<u32>) {
    let at = offset.unwrap_or_else(|| Qcow2Hdr::read(p).snapshots_offset);
    let mut b = Vec::new();
    for e in entries {
        b.extend_from_slice(&e.l1_offset.to_be_bytes());
        b.extend_from_slice(&e.l1_size.to_be_bytes());
        b.extend_from_slice(&(e.id.len() as u16).to_be_bytes());
        b.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
        b.extend_from_slice(&e.times);
        let n = b.len();
        b[n - 4..].copy_from_slice(&(e.extra.len() as u32).to_be_bytes());
        b.extend_from_slice(&e.extra);
        b.extend_from_slice(&e.id);
        b.extend_from_slice(&e.name);
        b.resize(b.len().next_multiple_of(8), 0);
    }
    write_at(p, at, &b);
    put_be32(p, 60, count.unwrap_or(entries.len() as u32));
    put_be64(p, 64, at);
}

/// An image with three snapshots (the second sharing nothing with the active state) and
/// its pristine copy.
fn snap_base(cwd: &Path, name: &str, opts: &str) -> PathBuf {
    let p = mk(cwd, opts, name, "4M");
    io(cwd, "qcow2", name, &["write -P 1 0 256k"]);
    qemu_img_ok(cwd, &["snapshot", "-c", "s1", name]);
    io(cwd, "qcow2", name, &["write -P 2 0 64k"]);
    qemu_img_ok(cwd, &["snapshot", "-c", "s2", name]);
    qemu_img_ok(cwd, &["snapshot", "-c", "s3", name]);
    keep_pristine(cwd, name);
    p
}

/// Derives `name` from `src` with `edit` applied to its snapshot table (written in place).
fn snap_variant(cwd: &Path, src: &Path, name: &str, edit: impl FnOnce(&mut Vec<SnapEntry>)) {
    let p = cwd.join(name);
    std::fs::copy(src, &p).unwrap();
    std::fs::copy(
        cwd.join(format!(
            "{}.orig",
            src.file_name().unwrap().to_str().unwrap()
        )),
        cwd.join(format!("{name}.orig")),
    )
    .unwrap();
    let mut t = read_snapshots(&p);
    edit(&mut t);
    write_snapshots(&p, &t, None, None);
}

#[test]
fn repair_snapshot_table_entries() {
    let t = Tmp::new("rep_snaptable");
    let cwd = t.path();
    let p = snap_base(cwd, "s.qcow2", "");
    // v3 entries without the disk size: completed with the current size and icount -1.
    snap_variant(cwd, &p, "inc.qcow2", |t| {
        t[0].extra.truncate(8);
        t[2].extra.clear();
    });
    // Too much extra data: cut to 1024 bytes, the known fields kept.
    snap_variant(cwd, &p, "extra.qcow2", |t| t[1].extra.resize(2000, b'x'));
    // Unusable L1 tables: QEMU 10.0.2 reports them and frees what only they reference,
    // but keeps the entries.
    snap_variant(cwd, &p, "l1una.qcow2", |t| t[1].l1_offset += 0x200);
    snap_variant(cwd, &p, "l1big.qcow2", |t| t[1].l1_size = 0x40_0001);
    snap_variant(cwd, &p, "l1eof.qcow2", |t| t[1].l1_offset = 100 << 20);
    // All at once: the table is written anew where a freed leak was.
    snap_variant(cwd, &p, "mixed.qcow2", |t| {
        t[0].l1_offset += 0x200;
        t[1].extra.clear();
        t[2].l1_size = 0x40_0001;
    });
    for img in [
        "inc.qcow2",
        "extra.qcow2",
        "l1una.qcow2",
        "l1big.qcow2",
        "l1eof.qcow2",
        "mixed.qcow2",
    ] {
        assert_same(cwd, &["check", img]);
        repair_same(cwd, img, "leaks", After::Same);
        repair_same(cwd, img, "all", After::Same);
    }
    // Same bytes as QEMU's repair, new table included.
    for img in ["inc.qcow2", "extra.qcow2", "mixed.qcow2"] {
        assert_files_equal(&cwd.join("rq").join(img), &cwd.join("rt").join(img));
    }
    let l = qemu_img(cwd, ["snapshot", "-l", "rt/extra.qcow2"]);
    assert!(l.stdout.contains("s2"), "{}", l.describe());
    // A table pointer past the end of the file: entries read as zeros, and freeing the
    // old table fails as in QEMU ("qcow2_free_clusters failed").
    std::fs::copy(&p, cwd.join("eof.qcow2")).unwrap();
    std::fs::copy(cwd.join("s.qcow2.orig"), cwd.join("eof.qcow2.orig")).unwrap();
    put_be64(&cwd.join("eof.qcow2"), 64, 100 << 20);
    repair_same(cwd, "eof.qcow2", "all", After::Same);
    // Small clusters and a refcount rebuild in the same repair.
    let p = snap_base(cwd, "small.qcow2", "cluster_size=512");
    snap_variant(cwd, &p, "small2.qcow2", |t| t[0].extra.clear());
    set_refcount(
        &cwd.join("small2.qcow2"),
        host_of(&cwd.join("small2.qcow2"), 1) / 512,
        0,
    );
    repair_same(cwd, "small2.qcow2", "all", After::Same);
    // Opening such images for anything else fails as in QEMU.
    for img in ["extra.qcow2", "s.qcow2"] {
        assert_same_norm(cwd, &["info", img], &normalize_info_human);
    }
}

#[test]
fn repair_overhanging_snapshots() {
    let t = Tmp::new("rep_snapmany");
    let cwd = t.path();
    let p = snap_base(cwd, "s.qcow2", "");
    let orig = read_snapshots(&p);
    let cs = 65536u64;
    // Appends `entries` (sharing no clusters) as the table, with refcounts for it, so
    // that the only problem is the table itself.
    let append = |name: &str, entries: &[SnapEntry]| {
        let img = cwd.join(name);
        std::fs::copy(&p, &img).unwrap();
        std::fs::copy(cwd.join("s.qcow2.orig"), cwd.join(format!("{name}.orig"))).unwrap();
        let at = file_len(&img).next_multiple_of(cs);
        write_snapshots(&img, entries, Some(at), None);
        for c in at / cs..file_len(&img).div_ceil(cs) {
            set_refcount(&img, c, 1);
        }
    };
    let tmpl = SnapEntry {
        l1_offset: 0,
        l1_size: 0,
        ..orig[2].clone()
    };
    // More than 65536 entries: the header's count is cut, the table stays.
    let many: Vec<SnapEntry> = (0..65537u32)
        .map(|i| SnapEntry {
            id: (i + 1).to_string().into_bytes(),
            name: format!("n{i}").into_bytes(),
            ..tmpl.clone()
        })
        .collect();
    append("many.qcow2", &many);
    // A table over 64 MiB: the entries past the limit go, their clusters leak and are
    // freed.
    let mut big = orig.clone();
    big.extend((0..513u32).map(|i| {
        let mut id = (i + 10).to_string().into_bytes();
        id.resize(65535, b'i');
        let mut name = format!("n{i}").into_bytes();
        name.resize(65535, b'n');
        SnapEntry {
            id,
            name,
            ..tmpl.clone()
        }
    }));
    append("big.qcow2", &big);
    for img in ["many.qcow2", "big.qcow2"] {
        // A plain open fails with qemu-img's message and hint.
        assert_same_norm(cwd, &["info", img], &normalize_info_human);
        assert_same(cwd, &["check", img]);
        assert_same(cwd, &["check", "-r", "leaks", img]);
        repair_same_forms(cwd, img, "all", After::Same, &[&[][..]]);
        assert_files_equal(&cwd.join("rq").join(img), &cwd.join("rt").join(img));
    }
}

#[test]
fn repair_snapshot_table_needs_a_new_refcount_block() {
    // 512-byte clusters, the file ending exactly where the only refcount block's reach
    // ends: the rewritten table goes past it and needs a new block, placed where QEMU's
    // allocator puts it.
    let t = Tmp::new("rep_snaptable_block");
    let cwd = t.path();
    mk(cwd, "cluster_size=512", "c.qcow2", "1M");
    io(cwd, "qcow2", "c.qcow2", &["write -P 1 0 60k"]);
    qemu_img_ok(cwd, &["snapshot", "-c", "a", "c.qcow2"]);
    qemu_img_ok(cwd, &["snapshot", "-c", "b", "c.qcow2"]);
    let writes: Vec<String> = (0..124)
        .map(|i| format!("write -P 3 {} 512", 61440 + i * 512))
        .collect();
    let w: Vec<&str> = writes.iter().map(String::as_str).collect();
    io(cwd, "qcow2", "c.qcow2", &w);
    keep_pristine(cwd, "c.qcow2");
    let p = cwd.join("c.qcow2");
    let end = qemu_img(cwd, ["check", "c.qcow2"]).ok().stdout;
    assert!(end.contains("Image end offset: 131072"), "{end}");
    let mut s = read_snapshots(&p);
    s[0].extra.clear();
    write_snapshots(&p, &s, None, None);
    repair_same(cwd, "c.qcow2", "all", After::Same);
    assert_files_equal(&cwd.join("rq/c.qcow2"), &cwd.join("rt/c.qcow2"));
    let after = qemu_img(cwd, ["check", "rt/c.qcow2"]).ok().stdout;
    assert!(after.contains("Image end offset: 132096"), "{after}");
}
