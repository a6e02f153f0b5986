//! Repair of a qcow2 image (`qemu-img check -r leaks|all`).
//!
//! A repair is a check pass that may change the image, run in QEMU's order so that its
//! stderr lines, counts and results are QEMU's (reference §3.1):
//!
//! 1. references are counted (repairing on the way a refcount block that lies past the
//!    end of the file, by growing the file, and an unaligned preallocated zero cluster,
//!    by dropping its host cluster);
//! 2. stored and computed refcounts are compared; with `All`, a refcount of zero where
//!    references exist, or an unusable refcount table entry, makes the whole refcount
//!    structure be rebuilt ("Rebuilding refcount structure"); otherwise every mismatch
//!    the mode allows is corrected in place;
//! 3. the COPIED flags of the active L1 and L2 tables are corrected from the refcounts;
//! 4. when nothing but leaks remains, the dirty and corrupt bits are cleared.
//!
//! # Crash safety
//! The principle of the write engine holds throughout: a stored refcount never drops
//! below the number of references on disk, so a power cut at any point leaves the image
//! as it was or better, with leaks at most added.
//!
//! - In-place refcount corrections move each stored value toward the computed one and
//!   never below it, so they may reach the disk in any order (and torn: entries never
//!   straddle a 512-byte sector). They are flushed before any flag that depends on them.
//! - COPIED flags are corrected only after the refcounts they are derived from are
//!   durable: a flag set on a cluster whose refcount 1 is not yet on disk could let a
//!   writer overwrite a shared cluster in place.
//! - A rebuilt refcount structure is written only to clusters that nothing references
//!   and that the old structure does not use, and is flushed before the header is
//!   switched to it with one 12-byte write (one sector, so it is never torn). Until the
//!   switch the old structure is in force; after it, the old structure's clusters are
//!   merely leaked, and the leak pass that follows frees them.
//! - The dirty and corrupt bits are cleared last, after a flush, in one 8-byte write.
//!
//! QEMU itself does not sync between its refcount blocks and the header switch; this
//! implementation does, and otherwise places the new structure exactly where QEMU does
//! (first fit over the computed refcounts), so image layouts and check figures match.
//! Unlike QEMU, the new structure never reuses a cluster named by the old refcount
//! table, where QEMU's overlap check would stop the repair (and mark the image corrupt).
//!
//! Internal snapshots and bitmaps are otherwise untouched: their clusters are references
//! like any other. The snapshot table is read from the header pointer; `-r all` drops
//! overhanging entries by lowering the header's count before the refcount pass (their
//! clusters then show as leaks and are freed), and writes the table anew after the
//! refcount pass when entries were fixed (extra data cut, v3 fields completed): the new
//! table goes to free clusters whose refcounts are raised first, the header switches to
//! it with one 12-byte write, and only then are the old table's clusters freed.

use super::check::{
    self, strerror, CheckReport, Checker, Counts, Fix, SnapInfo, SnapTable, Step, Stop,
};
use super::{Qcow2, Qcow2Options};
use crate::error::{Error, Result};
use crate::ondisk::header::incompat;
use crate::ondisk::snapshot::Snapshot;
use crate::ondisk::{put32, put64, refcount};
use crate::storage::Storage;
use std::collections::HashSet;
use std::sync::Arc;

/// What a repair may change (`qemu-img check -r leaks|all`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairMode {
    /// Only lower refcounts that are too high (leaked clusters), plus COPIED flags when
    /// nothing else is wrong.
    Leaks,
    /// Also raise refcounts that are too low, rebuild a broken refcount structure, and
    /// correct every COPIED flag.
    All,
}

impl RepairMode {
    fn fix(self) -> Fix {
        Fix {
            leaks: true,
            errors: self == RepairMode::All,
        }
    }
}

/// The outcome of [`repair`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// The repairing pass: its stderr lines (with the "Repairing ..." ones), what it could
    /// not repair, and how much it repaired (`leaks_fixed`, `corruptions_fixed`). When it
    /// failed (`failure` set), nothing else follows.
    pub pass: CheckReport,
    /// The check run again on the repaired image ("Double checking the fixed image
    /// now..."), present when the pass repaired anything.
    pub recheck: Option<CheckReport>,
}

impl RepairReport {
    /// Clusters whose too-high refcount was lowered.
    pub fn leaks_fixed(&self) -> u64 {
        self.pass.leaks_fixed
    }

    /// Corruptions repaired.
    pub fn corruptions_fixed(&self) -> u64 {
        self.pass.corruptions_fixed
    }

    /// The state of the image after the repair, as `qemu-img check -r` reports it: the
    /// re-check when there was one (carrying the pass's repair counts), else the pass.
    pub fn result(&self) -> CheckReport {
        match &self.recheck {
            Some(r) => {
                let mut r = r.clone();
                r.leaks_fixed = self.pass.leaks_fixed;
                r.corruptions_fixed = self.pass.corruptions_fixed;
                r
            }
            None => self.pass.clone(),
        }
    }

    /// `qemu-img check -r`'s exit status.
    pub fn exit_code(&self) -> i32 {
        match &self.recheck {
            Some(r) => r.exit_code(),
            None => self.pass.exit_code(),
        }
    }
}

/// Repairs `img` as `qemu-img check -r` does, then checks it again if anything changed.
///
/// The image must be open with [`Qcow2Options`] `{ writable: true, check: true }` on
/// storage opened for writing, and nothing else may use the file meanwhile. Problems in
/// the image are reported in the [`RepairReport`], never as `Err`; `Err` only means the
/// image was not opened for repair. The in-memory header of `img` is not refreshed (a
/// rebuild moves the refcount table): open the image again to use it further.
pub fn repair(img: &Qcow2, mode: RepairMode) -> Result<RepairReport> {
    let o = img.options();
    if !o.writable || !o.check {
        return Err(Error::InvalidArgument(
            "repair needs an image opened writable and for check".into(),
        ));
    }
    let pass = run_pass(img, mode.fix());
    let fixed = pass.leaks_fixed > 0 || pass.corruptions_fixed > 0;
    let recheck = if pass.failure.is_none() && fixed {
        Some(recheck(img.file().clone()))
    } else {
        None
    };
    Ok(RepairReport { pass, recheck })
}

/// Repairs a dirty (lazy refcounts) image before a writable open, as QEMU does: `-r all`
/// without output. Fails when the repair does not leave the refcounts consistent.
pub(super) fn repair_dirty(file: Arc<dyn Storage>) -> Result<()> {
    let img = Qcow2::open(
        file,
        Qcow2Options {
            writable: true,
            check: true,
            no_io: true,
            ..Default::default()
        },
    )?;
    let r = repair(&img, RepairMode::All)?.result();
    let why = if let Some(f) = r.failure {
        Some(f.strerror())
    } else if r.check_errors > 0 || r.corruptions > 0 {
        Some(format!(
            "{} corruptions and {} check errors remain",
            r.corruptions, r.check_errors
        ))
    } else {
        None
    };
    match why {
        Some(w) => Err(Error::Corrupt(format!("Could not repair dirty image: {w}"))),
        None => Ok(()),
    }
}

/// Checks the image as it is on disk now, through a fresh read-only open (the caller's
/// in-memory header may be stale after a rebuild).
fn recheck(file: Arc<dyn Storage>) -> CheckReport {
    let opened = Qcow2::open(
        file,
        Qcow2Options {
            writable: false,
            check: true,
            no_io: true,
            ..Default::default()
        },
    );
    let failed = |errno| CheckReport {
        check_errors: 1,
        failure: Some(check::CheckFailure { errno }),
        ..Default::default()
    };
    match opened {
        Ok(img) => check::check(&img).unwrap_or_else(|e| failed(e.errno())),
        Err(e) => failed(e.errno()),
    }
}

/// One repairing pass (QEMU's check with fix flags), including the final marking of the
/// image as clean and consistent.
fn run_pass(img: &Qcow2, fix: Fix) -> CheckReport {
    let (mut c, snapshots) = match Checker::start(img, fix) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    // QEMU keeps the snapshot table's findings apart from the refcount pass's, whose
    // repair decisions (COPIED flags with `-r leaks`, the rebuild's recount) must not
    // see them.
    let snapshot_corruptions = std::mem::take(&mut c.r.corruptions);
    let pass = refcount_pass(&mut c, &snapshots.entries, snapshots.len);
    c.r.corruptions += snapshot_corruptions;
    if let Err(Stop(errno)) = pass {
        c.fail(errno);
        return c.r;
    }
    if snapshots.to_rewrite > 0 {
        if let Err(Stop(errno)) = rewrite_snapshot_table(&mut c, &snapshots) {
            c.fail(errno);
            return c.r;
        }
        c.r.corruptions_fixed += snapshots.to_rewrite;
    }
    c.r.corruptions_fixed += snapshots.discarded;
    if c.r.check_errors == 0 && c.r.corruptions == 0 {
        if let Err(e) = mark_consistent(img) {
            c.fail(e.errno());
        }
    }
    c.r
}

/// QEMU's qcow2_check_refcounts in repair mode.
fn refcount_pass(c: &mut Checker<'_>, snapshots: &[SnapInfo], snap_size: u64) -> Step {
    c.calculate_refcounts(snapshots, snap_size)?;
    // A pass that only repairs in place runs the comparison again with fixes enabled,
    // from these counts.
    let pre_compare = c.r.counts();
    let mut highest = c.compare_refcounts(Fix::NONE);
    if c.rebuild && c.fix.errors {
        c.r.say("Rebuilding refcount structure".into());
        let old = c.r.counts();
        rebuild(c)?;
        c.r.corruptions = 0;
        c.r.leaks = 0;
        // The references are counted again against the new structure; the old one is
        // now leaked.
        c.rebuild = false;
        c.refs.clear();
        if let Err(e) = c.refresh_file_len() {
            c.r.check_errors += 1;
            return Err(e);
        }
        let fix = c.fix;
        c.fix = Fix::NONE;
        let recount = c.calculate_refcounts(snapshots, snap_size);
        c.fix = fix;
        recount?;
        let mut fresh_leaks = 0;
        if fix.leaks {
            // Leaks of the old structure are this repair's own doing: fixed, not counted.
            let saved = c.r.counts();
            c.r.set_counts(Counts::default());
            highest = c.compare_refcounts(Fix {
                leaks: true,
                errors: false,
            });
            if c.rebuild {
                c.r.say("ERROR rebuilt refcount structure is still broken".into());
            }
            fresh_leaks = c.r.leaks;
            c.r.set_counts(saved);
        }
        if c.r.corruptions < old.corruptions {
            c.r.corruptions_fixed += old.corruptions - c.r.corruptions;
        }
        if c.r.leaks < old.leaks {
            c.r.leaks_fixed += old.leaks - c.r.leaks;
        }
        c.r.leaks += fresh_leaks;
    } else if c.fix.any() {
        if c.rebuild {
            c.r.say("ERROR need to rebuild refcount structures".into());
            c.r.check_errors += 1;
            return Err(Stop(libc::EIO));
        }
        if c.r.leaks > 0 || c.r.corruptions > 0 {
            c.r.set_counts(pre_compare);
            highest = c.compare_refcounts(c.fix);
        }
    }
    if let Err(e) = c.write_refblocks() {
        c.r.check_errors += 1;
        return Err(Stop(e));
    }
    discard_freed(c);
    // With leaks only, COPIED flags are repaired when the refcounts are now known good.
    let repair_copied = c.fix.errors
        || (c.fix.leaks && c.r.check_errors == 0 && c.r.corruptions == 0 && c.r.leaks == 0);
    c.check_oflag_copied(repair_copied)?;
    c.r.image_end_offset = (highest + 1) * c.cs;
    Ok(())
}

/// Gives the space of clusters the repair freed back to the file system, as QEMU does.
/// They are referenced by nothing, so this is safe at any time; failures only cost space.
fn discard_freed(c: &mut Checker<'_>) {
    let end = c.file.len().unwrap_or(0);
    for cl in std::mem::take(&mut c.freed) {
        let off = cl << c.cluster_bits;
        if off < end {
            let _ = c.file.punch_hole(off, c.cs.min(end - off));
        }
    }
}

/// Clears the dirty and corrupt bits after making everything before durable (QEMU's
/// qcow2_mark_clean and qcow2_mark_consistent).
fn mark_consistent(img: &Qcow2) -> Result<()> {
    let h = img.header();
    if h.version < 3 {
        return Ok(());
    }
    // Read the field again: the open-time copy is what it was before this repair, and a
    // concurrent rewrite is excluded by the caller's contract anyway.
    let file = img.file();
    let mut b = [0u8; 8];
    file.read_at(&mut b, 72)?;
    let now = u64::from_be_bytes(b);
    let clean = now & !(incompat::DIRTY | incompat::CORRUPT);
    if clean == now {
        return Ok(());
    }
    file.flush()?;
    put64(&mut b, 0, clean);
    file.write_at(&b, 72)?;
    file.flush()
}

/// The refcount table and blocks being built by [`rebuild`].
struct NewStructure {
    /// Refcount table entries (refcount block offsets); always whole clusters' worth.
    table: Vec<u64>,
    /// Clusters the new structure must not take although nothing references them: those
    /// the old refcount table names (the old structure stays in force until the header
    /// switch, so it must not be overwritten).
    avoid: HashSet<u64>,
}

/// Builds a new refcount structure from the computed refcounts, writes it to clusters
/// that are free, and switches the header to it (QEMU's rebuild_refcount_structure,
/// same placement).
fn rebuild(c: &mut Checker<'_>) -> Step {
    let mut avoid = HashSet::new();
    for &e in &c.reftable {
        let off = e & refcount::REFTABLE_OFFSET_MASK;
        if off != 0 {
            // An unaligned entry touches two clusters.
            avoid.insert(off >> c.cluster_bits);
            avoid.insert((off + c.cs - 1) >> c.cluster_bits);
        }
    }
    let rt_first = c.reftable_offset >> c.cluster_bits;
    for k in 0..c.reftable_clusters {
        avoid.insert(rt_first + k);
    }
    let mut ns = NewStructure {
        table: Vec::new(),
        avoid,
    };
    let end = c.refs.len;
    write_new_refblocks(c, &mut ns, 0, end)?;
    // Placing the table changes the refcounts of the blocks covering it, and a larger
    // table may need more blocks: repeat until the table stops growing.
    let (offset, clusters) = loop {
        let clusters = (ns.table.len() as u64 * 8).div_ceil(c.cs);
        let mut first_free = 0;
        let first = alloc(c, &ns, clusters, &mut first_free)
            .map_err(|e| rebuild_error(c, "ERROR allocating reftable", e))?;
        if !write_new_refblocks(c, &mut ns, first, first + clusters)? {
            break (first << c.cluster_bits, clusters);
        }
    };
    let mut buf = vec![0u8; (clusters * c.cs) as usize];
    for (i, e) in ns.table.iter().enumerate() {
        put64(&mut buf, i * 8, *e);
    }
    c.file
        .write_at(&buf, offset)
        .map_err(|e| rebuild_error(c, "ERROR writing reftable", e.errno()))?;
    // The new structure must be complete on disk before the header points at it.
    c.file
        .flush()
        .map_err(|e| rebuild_error(c, "ERROR writing reftable", e.errno()))?;
    let mut hdr = [0u8; 12];
    put64(&mut hdr, 0, offset);
    put32(&mut hdr, 8, clusters as u32);
    c.file
        .write_at(&hdr, 48)
        .and_then(|()| c.file.flush())
        .map_err(|e| rebuild_error(c, "ERROR setting reftable", e.errno()))?;
    c.reftable_offset = offset;
    c.reftable_clusters = clusters;
    c.reftable = ns.table;
    c.refblocks.clear();
    Ok(())
}

/// Reports a failed rebuild step as QEMU does ("qemu-img: <what>: <strerror>").
fn rebuild_error(c: &mut Checker<'_>, what: &str, errno: i32) -> Stop {
    c.r.say_prefixed(format!("{what}: {}", strerror(errno)));
    c.r.check_errors += 1;
    Stop(errno)
}

/// Writes a refcount block for every block of clusters in `[first, end)` that holds a
/// non-zero computed refcount, allocating blocks that do not exist yet. Returns whether
/// the refcount table had to grow.
fn write_new_refblocks(
    c: &mut Checker<'_>,
    ns: &mut NewStructure,
    first: u64,
    end: u64,
) -> Step<bool> {
    let order = c.img.header().refcount_order;
    let block_bits = c.cluster_bits + 3 - order;
    let per_block = 1u64 << block_bits;
    let entries_per_cluster = (c.cs / 8) as usize;
    let mut grown = false;
    let mut first_free = 0u64;
    let mut end = end;
    let mut cluster = first;
    while cluster < end {
        if c.refs.get(cluster) == 0 {
            cluster += 1;
            continue;
        }
        let index = (cluster >> block_bits) as usize;
        let block_start = (index as u64) << block_bits;
        let existing = ns.table.get(index).copied().unwrap_or(0);
        let offset = if existing != 0 {
            existing
        } else {
            // A block already written must not gain refcounts it does not show.
            first_free = first_free.max(block_start);
            let at = alloc(c, ns, 1, &mut first_free)
                .map_err(|e| rebuild_error(c, "ERROR allocating refblock", e))?;
            if at >= end {
                // The block holding this block's own refcount must be written too.
                end = at + 1;
            }
            if ns.table.len() <= index {
                let len = (index + 1).div_ceil(entries_per_cluster) * entries_per_cluster;
                if len as u64 * 8 > super::MAX_REFTABLE_BYTES {
                    return Err(rebuild_error(c, "ERROR allocating refblock", libc::EFBIG));
                }
                ns.table.resize(len, 0);
                grown = true;
            }
            ns.table[index] = at << c.cluster_bits;
            at << c.cluster_bits
        };
        // The block is the computed array's bytes for its clusters.
        let cs = c.cs as usize;
        let mut block = vec![0u8; cs];
        let from = index * cs;
        if from < c.refs.data.len() {
            let to = (from + cs).min(c.refs.data.len());
            block[..to - from].copy_from_slice(&c.refs.data[from..to]);
        }
        c.file
            .write_at(&block, offset)
            .map_err(|e| rebuild_error(c, "ERROR writing refblock", e.errno()))?;
        cluster = block_start + per_block;
    }
    Ok(grown)
}

/// Allocates `n` contiguous clusters in the computed refcounts, first fit from
/// `*first_free` (which moves to the first free cluster seen), growing the array past
/// the end of the file when needed. Returns the first cluster index, or an errno.
fn alloc(
    c: &mut Checker<'_>,
    ns: &NewStructure,
    n: u64,
    first_free: &mut u64,
) -> std::result::Result<u64, i32> {
    let limit = crate::ondisk::MAX_HOST_OFFSET >> c.cluster_bits;
    let mut run = 0u64;
    let mut seen_free = false;
    let mut cluster = *first_free;
    while run < n {
        if cluster > limit {
            return Err(libc::EFBIG);
        }
        let free = c.refs.get(cluster) == 0 && !ns.avoid.contains(&cluster);
        if free {
            run += 1;
            if !seen_free {
                *first_free = cluster;
                seen_free = true;
            }
        } else {
            run = 0;
        }
        cluster += 1;
    }
    let start = cluster - n;
    c.refs.grow(cluster).map_err(|Stop(e)| e)?;
    for k in start..cluster {
        c.refs.set(k, 1);
    }
    Ok(start)
}

/// The entry as QEMU writes it back: fields missing from the stored extra data filled in
/// as QEMU fills them when it reads an entry (the current disk size, icount -1), unknown
/// extra data kept, ID and name byte for byte.
fn serialize_snapshot(e: &SnapInfo, disk_size: u64, out: &mut Vec<u8>) {
    let ex = &e.extra;
    let word = |at: usize| {
        (ex.len() >= at + 8).then(|| u64::from_be_bytes(ex[at..at + 8].try_into().unwrap()))
    };
    let s = Snapshot {
        l1_table_offset: e.l1_table_offset,
        l1_size: e.l1_size,
        id: String::new(),
        name: String::new(),
        date_sec: e.date_sec,
        date_nsec: e.date_nsec,
        vm_clock_nsec: e.vm_clock_nsec,
        vm_state_size: word(0).unwrap_or(e.vm_state_size32 as u64),
        disk_size: Some(word(8).unwrap_or(disk_size)),
        icount: word(16).filter(|&v| v != u64::MAX),
        unknown_extra: ex.get(24..).unwrap_or_default().to_vec(),
        extra_data_size: 0,
    };
    s.serialize_with_names(&e.id, &e.name, out);
}

/// Writes the snapshot table anew after `-r all` fixed entries while reading it, where
/// QEMU would place it (first fit over the stored refcounts), then frees the old one.
fn rewrite_snapshot_table(c: &mut Checker<'_>, t: &SnapTable) -> Step {
    let h = c.img.header().clone();
    let mut buf = Vec::new();
    for e in &t.entries {
        serialize_snapshot(e, h.size & !511, &mut buf);
    }
    let fail = |c: &mut Checker<'_>, errno: i32| {
        c.r.check_errors += 1;
        c.r.say(format!(
            "ERROR failed to update the snapshot table: {}",
            strerror(errno)
        ));
        Stop(errno)
    };
    let n = (buf.len() as u64).div_ceil(c.cs);
    let mut at = 0;
    if n > 0 {
        let first = find_free(c, 0, n).map_err(|Stop(e)| fail(c, e))?;
        let mut hint = first + n;
        for k in first..first + n {
            cover(c, k, &mut hint, 0).map_err(|Stop(e)| fail(c, e))?;
        }
        for k in first..first + n {
            c.set_stored_refcount(k, 1).map_err(|e| fail(c, e))?;
        }
        c.write_refblocks().map_err(|e| fail(c, e))?;
        at = first << c.cluster_bits;
        c.file
            .write_at(&buf, at)
            .and_then(|()| c.file.flush())
            .map_err(|e| fail(c, e.errno()))?;
    }
    let mut hdr = [0u8; 12];
    put32(&mut hdr, 0, t.entries.len() as u32);
    put64(&mut hdr, 4, at);
    c.file
        .write_at(&hdr, 60)
        .and_then(|()| c.file.flush())
        .map_err(|e| fail(c, e.errno()))?;
    // The old table is free from here on; failing to say so only leaks it.
    if t.len > 0 {
        let old_first = h.snapshots_offset >> c.cluster_bits;
        let old_end = (h.snapshots_offset + t.len).div_ceil(c.cs);
        let mut ok = true;
        for k in old_first..old_end {
            if c.stored_refcount(k).unwrap_or(0) == 0 {
                ok = false;
            }
        }
        if ok {
            for k in old_first..old_end {
                let v = c.stored_refcount(k).unwrap_or(0);
                if c.set_stored_refcount(k, v - 1).is_err() {
                    ok = false;
                    break;
                }
            }
        }
        if !ok || c.write_refblocks().is_err() {
            // QEMU's own wording when freeing clusters whose refcount is already 0.
            c.r.say(format!(
                "qcow2_free_clusters failed: {}",
                strerror(libc::EINVAL)
            ));
        }
        discard_freed(c);
    }
    Ok(())
}

/// The first run of `n` clusters at or after `from` that nothing counts or references.
fn find_free(c: &mut Checker<'_>, from: u64, n: u64) -> Step<u64> {
    let limit = crate::ondisk::MAX_HOST_OFFSET >> c.cluster_bits;
    let mut start = from;
    let mut k = from;
    while k < start + n {
        if k > limit {
            return Err(Stop(libc::EFBIG));
        }
        let stored = c.stored_refcount(k).map_err(Stop)?;
        let computed = if k < c.refs.len { c.refs.get(k) } else { 0 };
        if stored != 0 || computed != 0 {
            start = k + 1;
        }
        k += 1;
    }
    Ok(start)
}

/// Makes sure a refcount block covers `cluster`, adding one where QEMU's allocator
/// would (the first free cluster from `*hint`). A new block is written and flushed
/// before the refcount table entry names it, so a cut in between leaves nothing behind.
/// The refcount table itself is not grown.
fn cover(c: &mut Checker<'_>, cluster: u64, hint: &mut u64, depth: u32) -> Step {
    if c.refblock_for(cluster).map_err(Stop)?.is_some() {
        return Ok(());
    }
    let order = c.img.header().refcount_order;
    let block_bits = c.cluster_bits + 3 - order;
    let index = cluster >> block_bits;
    if index as usize >= c.reftable.len() || depth > 2 {
        return Err(Stop(libc::EFBIG));
    }
    let b = find_free(c, *hint, 1)?;
    *hint = b + 1;
    let mut block = vec![0u8; c.cs as usize];
    if b >> block_bits == index {
        // The block describes itself.
        refcount::set(&mut block, order, (b & ((1 << block_bits) - 1)) as usize, 1);
    } else {
        cover(c, b, hint, depth + 1)?;
        c.set_stored_refcount(b, 1).map_err(Stop)?;
        c.write_refblocks().map_err(Stop)?;
    }
    let at = b << c.cluster_bits;
    c.file
        .write_at(&block, at)
        .and_then(|()| c.file.flush())
        .map_err(|e| Stop(e.errno()))?;
    c.file
        .write_at(&at.to_be_bytes(), c.reftable_offset + index * 8)
        .and_then(|()| c.file.flush())
        .map_err(|e| Stop(e.errno()))?;
    c.reftable[index as usize] = at;
    c.refblocks.insert(at, block);
    Ok(())
}
