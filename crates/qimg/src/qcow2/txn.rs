//! Metadata transactions: whole-image metadata changes (snapshot create/apply/delete,
//! resize, refcount width changes, zero-cluster expansion) that switch from the old state
//! to the new one with a single write inside the first 512-byte sector of the header.
//!
//! # Why not QEMU's in-place ordering
//! QEMU updates refcounts and the COPIED flags of live L2 tables in place. Between those
//! two writes a power cut leaves an entry whose COPIED flag disagrees with its refcount,
//! which `qemu-img check` counts as a corruption (exit 2), and the brief requires that
//! every cut leave an image check accepts. So a transaction never modifies a cluster the
//! old state uses:
//!
//! 1. every changed table (L1, L2, snapshot table) is written to clusters that are free in
//!    the old state;
//! 2. the refcount structure of the new state is built copy-on-write: every refcount
//!    block that changes gets a new cluster, and a new refcount table points to the new
//!    blocks and to the unchanged old ones;
//! 3. all of that is flushed, then the header fields that name the tables (size, L1,
//!    refcount table, snapshot table, refcount order: all within bytes 24..100) are
//!    written with one write inside sector 0, and flushed.
//!
//! A cut before step 3 leaves the old state untouched (new clusters are unreferenced and
//! have refcount 0, so they are not even leaks); after it the new state is complete and
//! exact: the clusters only the old state used have refcount 0 in the new structure.
//!
//! New clusters are only taken where both the old and the new refcount are 0, so a
//! cluster freed by the transaction is never reused by it.
//!
//! Memory: the refcount blocks that change are held in memory, like the engine's
//! refcount cache; table contents are streamed one L2 table at a time.

use super::Qcow2;
use crate::error::{Error, Result};
use crate::ondisk::header::Header;
use crate::ondisk::l2::{self, CompressedDesc, COMPRESSED, COPIED, OFFSET_MASK};
use crate::ondisk::refcount::{self as rc, REFTABLE_OFFSET_MASK};
use crate::ondisk::{be64, put32, put64, MAX_HOST_OFFSET};
use crate::storage::Storage;
use std::collections::{BTreeMap, HashMap};

/// Edits the words of the L2 table at an L1 index inside a transaction.
pub(crate) type TableEdit<'e> = dyn FnMut(&mut Txn, u64, &mut Vec<u64>) -> Result<()> + 'e;

/// The refcount state of the new image, as changes over the old one.
pub(crate) struct Txn<'a> {
    file: &'a dyn Storage,
    cluster_bits: u32,
    old_order: u32,
    old_per: u64,
    old_table: Vec<u64>,
    old_blocks: HashMap<u64, Vec<u8>>,
    order: u32,
    per: u64,
    /// Refcount blocks of the new state that differ from the old ones (new width).
    blocks: BTreeMap<u64, Vec<u8>>,
    /// Where each of `blocks` will be written (allocated at finalize).
    placed: HashMap<u64, u64>,
    /// Every old block is replaced (the refcount width changes).
    rebuild_all: bool,
    hint: u64,
    table_at: Option<(u64, u64)>,
    /// The old refcount table (offset, clusters).
    old_table_at: (u64, u64),
    /// Tables at or above this byte offset are moved even when unchanged (compaction).
    pub(crate) relocate_above: u64,
}

impl<'a> Txn<'a> {
    /// Starts a transaction over the image's current (flushed) refcount structure,
    /// producing refcounts `1 << order` bits wide.
    pub(crate) fn begin(file: &'a dyn Storage, h: &Header, order: u32) -> Result<Txn<'a>> {
        let cs = h.cluster_size();
        let len = h.refcount_table_clusters as u64 * cs;
        // Bounded by MAX_REFTABLE_BYTES at open.
        let mut buf = vec![0u8; len as usize];
        file.read_at(&mut buf, h.refcount_table_offset)?;
        let old_table: Vec<u64> = buf.chunks_exact(8).map(|c| be64(c, 0)).collect();
        let mut t = Txn {
            file,
            cluster_bits: h.cluster_bits,
            old_order: h.refcount_order,
            old_per: rc::entries_per_block(h.cluster_bits, h.refcount_order),
            old_table,
            old_blocks: HashMap::new(),
            order,
            per: rc::entries_per_block(h.cluster_bits, order),
            blocks: BTreeMap::new(),
            placed: HashMap::new(),
            rebuild_all: order != h.refcount_order,
            hint: 0,
            table_at: None,
            old_table_at: (h.refcount_table_offset, h.refcount_table_clusters as u64),
            relocate_above: u64::MAX,
        };
        if t.rebuild_all {
            // So are all old blocks.
            for e in t.old_table.clone() {
                let off = e & REFTABLE_OFFSET_MASK;
                if off != 0 {
                    t.add(off >> h.cluster_bits, -1)?;
                }
            }
        }
        Ok(t)
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount of cluster `c` in the old state.
    pub(crate) fn old_get(&mut self, c: u64) -> Result<u64> {
        let i = c / self.old_per;
        let Some(&e) = self.old_table.get(i as usize) else {
            return Ok(0);
        };
        let off = e & REFTABLE_OFFSET_MASK;
        if off == 0 {
            return Ok(0);
        }
        if off & (self.cs() - 1) != 0 {
            return Err(Error::Corrupt(format!(
                "Refblock offset {off:#x} unaligned (reftable index: {i:#x})"
            )));
        }
        if !self.old_blocks.contains_key(&i) {
            let mut b = vec![0u8; self.cs() as usize];
            self.file.read_at(&mut b, off)?;
            self.old_blocks.insert(i, b);
        }
        Ok(rc::get(
            &self.old_blocks[&i],
            self.old_order,
            (c % self.old_per) as usize,
        ))
    }

    /// Refcount of cluster `c` in the new state.
    pub(crate) fn get(&mut self, c: u64) -> Result<u64> {
        let i = c / self.per;
        if let Some(b) = self.blocks.get(&i) {
            return Ok(rc::get(b, self.order, (c % self.per) as usize));
        }
        self.old_get(c)
    }

    /// Makes block `i` of the new state a private copy.
    fn materialize(&mut self, i: u64) -> Result<()> {
        if self.blocks.contains_key(&i) {
            return Ok(());
        }
        let mut b = vec![0u8; self.cs() as usize];
        if self.rebuild_all {
            let first = i * self.per;
            for j in 0..self.per {
                let v = self.old_get(first + j)?;
                if v > rc::max(self.order) {
                    return Err(Error::InvalidArgument(format!(
                        "Cannot decrease refcount entry width to {} bits: Cluster at offset {:#x} has a refcount of {v}",
                        1u32 << self.order,
                        (first + j) << self.cluster_bits
                    )));
                }
                rc::set(&mut b, self.order, j as usize, v);
            }
            self.blocks.insert(i, b);
        } else {
            let old = self
                .old_table
                .get(i as usize)
                .map(|e| e & REFTABLE_OFFSET_MASK)
                .unwrap_or(0);
            if old != 0 {
                self.old_get(i * self.per)?;
                b.copy_from_slice(&self.old_blocks[&i]);
            }
            self.blocks.insert(i, b);
            // The old copy of this block is no longer referenced by the new table.
            if old != 0 {
                self.add(old >> self.cluster_bits, -1)?;
            }
        }
        Ok(())
    }

    /// Sets the new refcount of cluster `c`.
    pub(crate) fn set(&mut self, c: u64, v: u64) -> Result<()> {
        if v > rc::max(self.order) {
            return Err(Error::InvalidArgument(format!(
                "Refcount overflow for cluster offset {:#x}; try qemu-img amend -o refcount_bits=...",
                c << self.cluster_bits
            )));
        }
        if (c << self.cluster_bits) > MAX_HOST_OFFSET {
            return Err(Error::Corrupt(format!(
                "Cluster offset {:#x} out of range",
                c << self.cluster_bits
            )));
        }
        let i = c / self.per;
        self.materialize(i)?;
        let (order, per) = (self.order, self.per);
        let b = self.blocks.get_mut(&i).expect("materialized");
        rc::set(b, order, (c % per) as usize, v);
        Ok(())
    }

    /// Adds `delta` to the new refcount of cluster `c`.
    pub(crate) fn add(&mut self, c: u64, delta: i64) -> Result<()> {
        let v = self.get(c)?;
        let n = v as i128 + delta as i128;
        if n < 0 {
            return Err(Error::Corrupt(format!(
                "Refcount of cluster offset {:#x} would drop below zero",
                c << self.cluster_bits
            )));
        }
        if n > u64::MAX as i128 {
            return Err(Error::InvalidArgument("Refcount overflow".into()));
        }
        self.set(c, n as u64)
    }

    /// Allocates `n` contiguous clusters free in both states; returns the byte offset.
    pub(crate) fn alloc(&mut self, n: u64) -> Result<u64> {
        if n == 0 {
            return Ok(0);
        }
        let mut start = self.hint;
        'scan: loop {
            if (start + n) << self.cluster_bits > MAX_HOST_OFFSET {
                return Err(Error::InvalidArgument("Image file is full".into()));
            }
            for k in 0..n {
                let c = start + k;
                if self.old_get(c)? != 0 || self.get(c)? != 0 {
                    start = c + 1;
                    continue 'scan;
                }
            }
            break;
        }
        for k in 0..n {
            self.set(start + k, 1)?;
        }
        self.hint = start + n;
        Ok(start << self.cluster_bits)
    }

    /// Adds `delta` for every host cluster the L2 entry `e` references (data file images
    /// keep data elsewhere: pass `data_file`).
    pub(crate) fn entry_refs(&mut self, e: u64, data_file: bool, delta: i64) -> Result<()> {
        if data_file {
            return Ok(());
        }
        if e & COMPRESSED != 0 {
            let d = CompressedDesc::decode(e & !(COPIED | COMPRESSED), self.cluster_bits);
            let (a, b) = d.host_clusters(self.cluster_bits);
            for c in a..=b {
                self.add(c, delta)?;
            }
        } else {
            let off = e & OFFSET_MASK;
            if off != 0 {
                self.add(off >> self.cluster_bits, delta)?;
            }
        }
        Ok(())
    }

    /// Adds `delta` for each cluster of the range `[offset, offset+len)`.
    pub(crate) fn range_refs(&mut self, offset: u64, len: u64, delta: i64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let cs = self.cs();
        for c in offset / cs..(offset + len).div_ceil(cs) {
            self.add(c, delta)?;
        }
        Ok(())
    }

    /// Moves every refcount block stored at or above `limit` (compaction).
    pub(crate) fn relocate_blocks(&mut self, limit: u64) -> Result<()> {
        self.relocate_above = limit;
        let high: Vec<u64> = self
            .old_table
            .iter()
            .enumerate()
            .filter(|(_, e)| *e & REFTABLE_OFFSET_MASK >= limit)
            .map(|(i, _)| i as u64)
            .collect();
        for i in high {
            self.materialize(i)?;
        }
        if self.old_table_at.0 >= limit {
            // Forces a new table even if no block moves.
            self.materialize(0)?;
        }
        Ok(())
    }

    /// Places the new refcount blocks and table; returns (table offset, clusters).
    fn finalize(&mut self) -> Result<(u64, u64)> {
        if self.blocks.is_empty() && !self.rebuild_all {
            // Nothing changed: the old structure stays as it is.
            return Ok(self.old_table_at);
        }
        // The old refcount table is replaced.
        let (off, n) = self.old_table_at;
        self.range_refs(off, n << self.cluster_bits, -1)?;
        if self.rebuild_all {
            // Every cluster counted in the old state must be counted in the new one.
            let last = self
                .old_table
                .iter()
                .rposition(|e| e & REFTABLE_OFFSET_MASK != 0);
            if let Some(last) = last {
                let end = (last as u64 + 1) * self.old_per;
                for i in 0..end.div_ceil(self.per) {
                    self.materialize(i)?;
                }
            }
        }
        let cs = self.cs();
        loop {
            let mut changed = false;
            let pending: Vec<u64> = self
                .blocks
                .iter()
                .filter(|(i, b)| !self.placed.contains_key(i) && b.iter().any(|&x| x != 0))
                .map(|(i, _)| *i)
                .collect();
            for i in pending {
                let at = self.alloc(1)?;
                self.placed.insert(i, at);
                changed = true;
            }
            let last_new = self
                .blocks
                .iter()
                .filter(|(i, _)| self.placed.contains_key(i))
                .map(|(i, _)| *i + 1)
                .max()
                .unwrap_or(0);
            let last_old = if self.rebuild_all {
                0
            } else {
                self.old_table
                    .iter()
                    .rposition(|e| e & REFTABLE_OFFSET_MASK != 0)
                    .map(|p| p as u64 + 1)
                    .unwrap_or(0)
            };
            let entries = last_new.max(last_old).max(1);
            let clusters = (entries * 8).div_ceil(cs);
            if clusters * cs > super::MAX_REFTABLE_BYTES {
                return Err(Error::InvalidArgument(
                    "Reference count table too large".into(),
                ));
            }
            match self.table_at {
                Some((_, n)) if n >= clusters => {}
                Some((off, n)) => {
                    for c in off / cs..off / cs + n {
                        self.set(c, 0)?;
                    }
                    self.table_at = None;
                    changed = true;
                }
                None => {
                    // A little slack so that placing the table rarely needs another round.
                    let n = clusters + clusters / 8;
                    let off = self.alloc(n)?;
                    self.table_at = Some((off, n));
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        Ok(self.table_at.expect("placed"))
    }

    /// Writes the new refcount structure and returns the header that uses it.
    fn write_structure(&mut self, h: &mut Header) -> Result<()> {
        let (toff, tclusters) = self.finalize()?;
        if self.table_at.is_none() {
            return Ok(());
        }
        let cs = self.cs();
        let mut table = vec![0u64; (tclusters * cs / 8) as usize];
        if !self.rebuild_all {
            for (i, e) in self.old_table.iter().enumerate() {
                if i < table.len() {
                    table[i] = e & REFTABLE_OFFSET_MASK;
                }
            }
        }
        for (i, b) in &self.blocks {
            let Some(&at) = self.placed.get(i) else {
                // An all-zero block needs no cluster: the table entry stays empty.
                if let Some(t) = table.get_mut(*i as usize) {
                    *t = 0;
                }
                continue;
            };
            self.file.write_at(b, at)?;
            table[*i as usize] = at;
        }
        let mut buf = vec![0u8; table.len() * 8];
        for (i, e) in table.iter().enumerate() {
            put64(&mut buf, i * 8, *e);
        }
        self.file.write_at(&buf, toff)?;
        h.refcount_table_offset = toff;
        h.refcount_table_clusters = tclusters as u32;
        h.refcount_order = self.order;
        Ok(())
    }

    /// End (exclusive, in clusters) of the last cluster with a nonzero refcount in the
    /// new state; valid after the structure is placed.
    fn used_end(&mut self) -> Result<u64> {
        let mut cands: std::collections::BTreeSet<u64> = self.blocks.keys().copied().collect();
        if !self.rebuild_all {
            for (i, e) in self.old_table.iter().enumerate() {
                if e & REFTABLE_OFFSET_MASK != 0 {
                    cands.insert(i as u64);
                }
            }
        }
        for &i in cands.iter().rev() {
            for j in (0..self.per).rev() {
                if self.get(i * self.per + j)? != 0 {
                    return Ok(i * self.per + j + 1);
                }
            }
        }
        Ok(0)
    }
}

/// Writes the fixed header fields that differ between `old` and `new` with one write.
/// All of them lie in bytes 24..104, inside the first sector, so the switch is atomic.
pub(crate) fn switch_header(file: &dyn Storage, old: &Header, new: &Header) -> Result<()> {
    let enc = |h: &Header| {
        let mut b = [0u8; 104];
        put64(&mut b, 24, h.size);
        put32(&mut b, 32, h.crypt_method);
        put32(&mut b, 36, h.l1_size);
        put64(&mut b, 40, h.l1_table_offset);
        put64(&mut b, 48, h.refcount_table_offset);
        put32(&mut b, 56, h.refcount_table_clusters);
        put32(&mut b, 60, h.nb_snapshots);
        put64(&mut b, 64, h.snapshots_offset);
        put64(&mut b, 72, h.incompatible_features);
        put64(&mut b, 80, h.compatible_features);
        put64(&mut b, 88, h.autoclear_features);
        put32(&mut b, 96, h.refcount_order);
        put32(&mut b, 100, h.header_length);
        b
    };
    let (a, b) = (enc(old), enc(new));
    let end = if new.version >= 3 { 104 } else { 72 };
    let Some(lo) = (24..end).find(|&i| a[i] != b[i]) else {
        return Ok(());
    };
    let hi = (lo..end).rev().find(|&i| a[i] != b[i]).unwrap() + 1;
    file.write_at(&b[lo..hi], lo as u64)?;
    file.flush()
}

impl Qcow2 {
    /// Writes back everything cached and clears the dirty bit, so a transaction starts
    /// from an on-disk state that is complete.
    pub(crate) fn quiesce(&mut self) -> Result<()> {
        if self.ws.get_mut().unwrap().is_none() {
            return Err(Error::Permission("Image is read-only".into()));
        }
        self.flush_metadata(true)?;
        self.l2_cache.clear();
        Ok(())
    }

    /// Reads a table of `n` 64-bit words at `offset`.
    pub(crate) fn read_words(&self, offset: u64, n: u64) -> Result<Vec<u64>> {
        // Callers bound n: L2 tables are one cluster, L1 tables at most MAX_L1_BYTES.
        debug_assert!(n * 8 <= super::MAX_L1_BYTES.max(self.cluster_size()));
        let mut buf = vec![0u8; (n * 8) as usize];
        self.file.read_at(&mut buf, offset)?;
        Ok(buf.chunks_exact(8).map(|c| be64(c, 0)).collect())
    }

    /// Reads and validates an L2 table referenced from an L1 entry.
    pub(crate) fn read_l2(&self, l1e: u64) -> Result<Vec<u64>> {
        let off = l2::l1_offset(l1e);
        if off & (self.cluster_size() - 1) != 0 {
            return Err(Error::Corrupt(format!(
                "L2 table offset {off:#x} unaligned"
            )));
        }
        self.read_words(off, self.cluster_size() / 8)
    }

    /// Writes a table of words at `offset`.
    pub(crate) fn write_words(&self, offset: u64, words: &[u64]) -> Result<()> {
        let mut buf = vec![0u8; words.len() * 8];
        for (i, w) in words.iter().enumerate() {
            put64(&mut buf, i * 8, *w);
        }
        self.file.write_at(&buf, offset)
    }

    /// Words per L2 entry (2 with extended L2).
    pub(crate) fn step(&self) -> usize {
        if self.header.extended_l2() {
            2
        } else {
            1
        }
    }

    /// Adds `delta` to the refcounts of an L1 table's whole tree (L2 tables and every
    /// cluster they reference), as each L1 table counts once for what it reaches.
    pub(crate) fn tree_refs(&self, txn: &mut Txn, l1: &[u64], delta: i64) -> Result<()> {
        let df = self.header.has_data_file();
        for &e in l1 {
            let t = l2::l1_offset(e);
            if t == 0 {
                continue;
            }
            let words = self.read_l2(e)?;
            for w in words.iter().step_by(self.step()) {
                txn.entry_refs(*w, df, delta)?;
            }
            txn.add(t >> self.cluster_bits, delta)?;
        }
        Ok(())
    }

    /// Brings the active tree to its final form inside a transaction: `edit` may change
    /// the entries of each L2 table in `range` (a missing table reads as zeros); then,
    /// if `recompute`, COPIED flags are set from the new refcounts. A table that changes
    /// is written to a new cluster (never in place) and the L1 entry redirected.
    pub(crate) fn finish_active(
        &self,
        txn: &mut Txn,
        l1: &mut [u64],
        range: std::ops::Range<u64>,
        recompute: bool,
        edit: &mut TableEdit,
    ) -> Result<()> {
        let df = self.header.has_data_file();
        let step = self.step();
        let words_per_table = (self.cluster_size() / 8) as usize;
        for i in range {
            let Some(&e) = l1.get(i as usize) else { break };
            let t = l2::l1_offset(e);
            let mut words = if t != 0 {
                self.read_l2(e)?
            } else {
                vec![0u64; words_per_table]
            };
            let orig = words.clone();
            edit(txn, i, &mut words)?;
            if words.iter().all(|&w| w == 0) && (t == 0 || words != orig) {
                // An empty table is the same as none: drop it instead of copying it.
                if t != 0 {
                    txn.add(t >> self.cluster_bits, -1)?;
                    l1[i as usize] = 0;
                }
                continue;
            }
            if recompute && !df {
                for k in (0..words.len()).step_by(step) {
                    let w = words[k];
                    let off = w & OFFSET_MASK;
                    if w & COMPRESSED != 0 || off == 0 {
                        continue;
                    }
                    let want = txn.get(off >> self.cluster_bits)? == 1;
                    words[k] = if want { w | COPIED } else { w & !COPIED };
                }
            }
            if t == 0 || words != orig || t >= txn.relocate_above {
                let nt = txn.alloc(1)?;
                self.write_words(nt, &words)?;
                if t != 0 {
                    txn.add(t >> self.cluster_bits, -1)?;
                }
                l1[i as usize] = nt | COPIED;
            } else if recompute {
                let want = txn.get(t >> self.cluster_bits)? == 1;
                l1[i as usize] = if want { e | COPIED } else { e & !COPIED };
            }
        }
        Ok(())
    }

    /// Writes `l1` to new clusters when it differs from the active table (or when its
    /// size changes); updates `h` and frees the old table in the transaction.
    pub(crate) fn place_active_l1(&self, txn: &mut Txn, l1: &[u64], h: &mut Header) -> Result<()> {
        let old = self.l1.read().unwrap().clone();
        if old.as_slice() == l1
            && h.l1_size as usize == l1.len()
            && h.l1_table_offset < txn.relocate_above
        {
            return Ok(());
        }
        if l1.len() as u64 * 8 > super::MAX_L1_BYTES {
            return Err(Error::InvalidArgument("File too large".into()));
        }
        let cs = self.cluster_size();
        let n = (l1.len() as u64 * 8).div_ceil(cs);
        let at = txn.alloc(n)?;
        if n > 0 {
            self.write_words(at, l1)?;
        }
        txn.range_refs(self.header.l1_table_offset, old.len() as u64 * 8, -1)?;
        h.l1_table_offset = at;
        h.l1_size = l1.len() as u32;
        Ok(())
    }

    /// Writes the refcount structure, flushes, switches the header and adopts the new
    /// state in memory. Returns the end of the last used cluster (in bytes).
    pub(crate) fn commit(
        &mut self,
        mut txn: Txn,
        mut h: Header,
        l1: Vec<u64>,
        snapshots: Option<Vec<crate::ondisk::snapshot::Snapshot>>,
    ) -> Result<u64> {
        txn.write_structure(&mut h)?;
        let end = txn.used_end()? << self.cluster_bits;
        drop(txn);
        self.file.flush()?;
        switch_header(self.file.as_ref(), &self.header, &h)?;
        self.adopt(h, l1, snapshots)?;
        Ok(end)
    }

    /// Replaces the in-memory state after a switch.
    pub(crate) fn adopt(
        &mut self,
        h: Header,
        l1: Vec<u64>,
        snapshots: Option<Vec<crate::ondisk::snapshot::Snapshot>>,
    ) -> Result<()> {
        let refs = super::alloc::Refcounts::load(
            self.file.as_ref(),
            h.cluster_bits,
            h.refcount_order,
            h.refcount_table_offset,
            h.refcount_table_clusters,
        )?;
        if let Some(st) = self.ws.get_mut().unwrap().as_mut() {
            st.refs = refs;
            st.l1_dirty = false;
        }
        self.header = h;
        *self.l1.write().unwrap() = l1;
        if let Some(s) = snapshots {
            self.snapshots = s;
        }
        self.l2_cache.clear();
        *self.last_decompressed.lock().unwrap() = None;
        Ok(())
    }
}
