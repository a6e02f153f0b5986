//! Refcounts and cluster allocation for writable images.
//!
//! Refcount blocks are cached in memory and written back at flush, before the L2 tables
//! that reference newly allocated clusters (see `write.rs` for the ordering). Structural
//! changes (a new refcount block, a larger refcount table) are written synchronously with
//! QEMU's ordering: new block written and flushed before the table entry that points to it;
//! a new table written and flushed before the header switches to it.
//!
//! Decrements are not applied when asked: they are queued and applied only after the flush
//! that makes the dropped references durable, so a cluster still referenced on disk is
//! never counted as free (crash leaves leaks at most) and is never reused too early.

use crate::error::{Error, Result};
use crate::ondisk::refcount::{self as rc, REFTABLE_OFFSET_MASK};
use crate::ondisk::{be64, put32, put64};
use crate::storage::Storage;
use std::collections::HashMap;

/// One cached refcount block.
#[derive(Debug)]
struct Block {
    data: Vec<u8>,
    /// Bumped on every change so a flush can tell whether it wrote the latest contents.
    gen: u64,
    written_gen: u64,
}

/// Refcount state of a writable image.
#[derive(Debug)]
pub(crate) struct Refcounts {
    cluster_bits: u32,
    order: u32,
    per_block: u64,
    pub(crate) table: Vec<u64>,
    pub(crate) table_offset: u64,
    blocks: HashMap<u64, Block>,
    free_hint: u64,
    /// `(hint, n)`: no run of `n` or more free clusters starts in `[free_hint, hint)`, so
    /// an allocation of at least `n` clusters may start its scan at `hint`. Hints only
    /// choose where scans start; every cluster is still checked before it is taken.
    run_hint: (u64, u64),
    pending_free: Vec<u64>,
    gen: u64,
    /// Where the next compressed cluster may start, inside a partly used host cluster
    /// (0: none), so compressed clusters are packed at byte granularity as QEMU packs them.
    free_byte: u64,
    /// Host clusters holding refcount blocks (for overlap checks).
    pub(crate) block_clusters: std::collections::HashSet<u64>,
}

/// A dirty refcount block captured for writing.
pub(crate) struct DirtyBlock {
    index: u64,
    offset: u64,
    data: Vec<u8>,
    gen: u64,
}

impl Refcounts {
    /// Loads the refcount table.
    pub(crate) fn load(
        file: &dyn Storage,
        cluster_bits: u32,
        order: u32,
        table_offset: u64,
        table_clusters: u32,
    ) -> Result<Refcounts> {
        let len = (table_clusters as u64) << cluster_bits;
        // Bounded by MAX_REFTABLE_BYTES at open.
        let mut buf = vec![0u8; len as usize];
        file.read_at(&mut buf, table_offset)?;
        let table: Vec<u64> = buf.chunks_exact(8).map(|c| be64(c, 0)).collect();
        let block_clusters = table
            .iter()
            .map(|e| (e & REFTABLE_OFFSET_MASK) >> cluster_bits)
            .filter(|&c| c != 0)
            .collect();
        Ok(Refcounts {
            block_clusters,
            cluster_bits,
            order,
            per_block: rc::entries_per_block(cluster_bits, order),
            table,
            table_offset,
            blocks: HashMap::new(),
            free_hint: 0,
            run_hint: (0, 0),
            pending_free: Vec::new(),
            gen: 0,
            free_byte: 0,
        })
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn block(&mut self, file: &dyn Storage, i: u64) -> Result<Option<&mut Block>> {
        let Some(&e) = self.table.get(i as usize) else {
            return Ok(None);
        };
        let off = e & REFTABLE_OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if off & (self.cs() - 1) != 0 {
            return Err(Error::Corrupt(format!(
                "Refblock offset {off:#x} unaligned (reftable index: {i:#x})"
            )));
        }
        if !self.blocks.contains_key(&i) {
            let mut data = vec![0u8; self.cs() as usize];
            file.read_at(&mut data, off)?;
            self.blocks.insert(
                i,
                Block {
                    data,
                    gen: 0,
                    written_gen: 0,
                },
            );
        }
        Ok(self.blocks.get_mut(&i))
    }

    /// Refcount of host cluster `c`.
    pub(crate) fn get(&mut self, file: &dyn Storage, c: u64) -> Result<u64> {
        let (i, j) = (c / self.per_block, (c % self.per_block) as usize);
        let order = self.order;
        Ok(match self.block(file, i)? {
            Some(b) => rc::get(&b.data, order, j),
            None => 0,
        })
    }

    /// Sets the refcount of `c`, creating the refcount block (and growing the table) when
    /// the cluster is not covered yet.
    fn set(&mut self, file: &dyn Storage, c: u64, v: u64) -> Result<()> {
        let i = c / self.per_block;
        self.ensure_block(file, i)?;
        let j = (c % self.per_block) as usize;
        let order = self.order;
        self.gen += 1;
        let gen = self.gen;
        let b = self
            .block(file, i)?
            .expect("block exists after ensure_block");
        rc::set(&mut b.data, order, j, v);
        b.gen = gen;
        Ok(())
    }

    /// Queues a decrement for after the next flush.
    pub(crate) fn free_later(&mut self, c: u64) {
        self.pending_free.push(c);
    }

    /// Takes the queued decrements (at flush time, before writing L2 tables).
    pub(crate) fn take_pending(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.pending_free)
    }

    /// Applies decrements whose dropped references are now durable.
    pub(crate) fn apply_frees(&mut self, file: &dyn Storage, frees: &[u64]) -> Result<()> {
        for &c in frees {
            let v = self.get(file, c)?;
            if v == 0 {
                return Err(Error::Corrupt(format!(
                    "Refcount of cluster offset {:#x} would drop below zero",
                    c << self.cluster_bits
                )));
            }
            self.set(file, c, v - 1)?;
            if v == 1 {
                self.free_hint = self.free_hint.min(c);
                // A run of `n` that now fits must include `c`, and the free clusters before
                // `c` in it were a shorter run already: it starts after `c - n`.
                let (h, n) = self.run_hint;
                self.run_hint.0 = h.min(c.saturating_sub(n));
            }
        }
        Ok(())
    }

    /// Makes sure refcount block `i` exists, creating it synchronously if needed.
    fn ensure_block(&mut self, file: &dyn Storage, i: u64) -> Result<()> {
        if i as usize >= self.table.len() {
            self.grow_table(file, i)?;
        }
        if self.table[i as usize] & REFTABLE_OFFSET_MASK != 0 {
            return Ok(());
        }
        // Every cluster this block would cover has refcount 0 (no block), so its first
        // cluster is free: put the block there, describing itself.
        let cs = self.cs();
        let b = i * self.per_block;
        // That holds only past the end of the file: in a consistent image every cluster
        // in the file is covered (the header by block 0 at least), so a missing block
        // for clusters the file holds means a damaged refcount table, and the cluster
        // may well be the header or a table. Never write over it.
        if b * cs < file.len()? {
            return Err(Error::Corrupt(format!(
                "Refcount block {i} is missing for clusters inside the image file"
            )));
        }
        let mut data = vec![0u8; cs as usize];
        rc::set(&mut data, self.order, 0, 1);
        file.write_at(&data, b * cs)?;
        file.flush()?;
        let mut e = [0u8; 8];
        put64(&mut e, 0, b * cs);
        file.write_at(&e, self.table_offset + i * 8)?;
        file.flush()?;
        self.table[i as usize] = b * cs;
        self.blocks.insert(
            i,
            Block {
                data,
                gen: 0,
                written_gen: 0,
            },
        );
        Ok(())
    }

    /// Replaces the refcount table with a larger one that covers block index `need`,
    /// placed with the refcount blocks describing it in a fresh area at `end_cluster`.
    fn grow_table(&mut self, file: &dyn Storage, need: u64) -> Result<()> {
        let cs = self.cs();
        let end = file.len()?.div_ceil(cs).max(self.free_hint);
        let entries_per_cluster = cs / 8;
        let old_len = self.table.len() as u64;
        let mut new_len = (need + 1)
            .max(old_len + old_len / 2)
            .div_ceil(entries_per_cluster)
            * entries_per_cluster;
        // Blocks for the area itself, at its start; the table after them.
        let (mut nb, mut tc) = (0u64, 0u64);
        let first_blk = end / self.per_block;
        let mut last_blk;
        loop {
            let area_end = end + nb + tc;
            last_blk = (area_end.max(end + 1) - 1) / self.per_block;
            let missing = (first_blk..=last_blk)
                .filter(|&k| k >= old_len || self.table[k as usize] & REFTABLE_OFFSET_MASK == 0)
                .count() as u64;
            new_len =
                new_len.max((last_blk + 1).div_ceil(entries_per_cluster) * entries_per_cluster);
            let tc2 = new_len * 8 / cs;
            if (missing, tc2) == (nb, tc) {
                break;
            }
            (nb, tc) = (missing, tc2);
        }
        if tc * cs > super::MAX_REFTABLE_BYTES {
            return Err(Error::InvalidArgument(
                "Reference count table too large".into(),
            ));
        }
        let mut table = self.table.clone();
        table.resize(new_len as usize, 0);
        let mut next = end;
        let mut new_blocks = Vec::new();
        for k in first_blk..=last_blk {
            if table[k as usize] & REFTABLE_OFFSET_MASK == 0 {
                table[k as usize] = next * cs;
                self.block_clusters.insert(next);
                new_blocks.push((k, next));
                next += 1;
            }
        }
        let table_start = next;
        // Fill in refcounts for the area (blocks + table), all within the new blocks or
        // existing ones.
        for (k, _) in &new_blocks {
            self.blocks.insert(
                *k,
                Block {
                    data: vec![0u8; cs as usize],
                    gen: 0,
                    written_gen: 0,
                },
            );
        }
        let old_table = std::mem::replace(&mut self.table, table);
        let old_offset = self.table_offset;
        for c in end..table_start + tc {
            let (i, j) = (c / self.per_block, (c % self.per_block) as usize);
            let order = self.order;
            let b = self
                .block(file, i)?
                .ok_or_else(|| Error::Corrupt("refcount area not covered".into()))?;
            rc::set(&mut b.data, order, j, 1);
        }
        for (k, at) in &new_blocks {
            let b = &self.blocks[k];
            file.write_at(&b.data, at * cs)?;
        }
        // Existing blocks that gained refcounts for the area are written too.
        for k in end / self.per_block..=(table_start + tc - 1) / self.per_block {
            if !new_blocks.iter().any(|(n, _)| *n == k) {
                let b = &self.blocks[&k];
                file.write_at(&b.data, self.table[k as usize] & REFTABLE_OFFSET_MASK)?;
            }
        }
        let mut buf = vec![0u8; (tc * cs) as usize];
        for (i, e) in self.table.iter().enumerate() {
            put64(&mut buf, i * 8, *e);
        }
        file.write_at(&buf, table_start * cs)?;
        file.flush()?;
        let mut hdr = [0u8; 12];
        put64(&mut hdr, 0, table_start * cs);
        put32(&mut hdr, 8, tc as u32);
        file.write_at(&hdr, 48)?;
        file.flush()?;
        self.table_offset = table_start * cs;
        self.free_hint = self.free_hint.max(table_start + tc);
        // The old table is referenced by nothing once the header switched.
        let old_clusters = (old_table.len() as u64 * 8).div_ceil(cs);
        for k in 0..old_clusters {
            self.pending_free.push(old_offset / cs + k);
        }
        Ok(())
    }

    /// Allocates `n` contiguous free clusters (refcount 1 each); returns the first.
    pub(crate) fn alloc(&mut self, file: &dyn Storage, n: u64) -> Result<u64> {
        let mut start = self.free_hint;
        // Runs: skip the gaps earlier scans found too short (otherwise, once the image has
        // holes smaller than the runs written, every allocation rescans the whole file).
        if n > 1 && self.run_hint.1 != 0 && n >= self.run_hint.1 {
            start = start.max(self.run_hint.0);
        }
        let from_hint = start == self.free_hint;
        // The scan covers every cluster from its start on, in order; remembering the first
        // free one lets the next allocation skip the used ones.
        let mut first_free = None;
        // A linear search for `n` consecutive free clusters, reading each refcount block
        // once per pass rather than looking it up for every cluster.
        let (order, per_block) = (self.order, self.per_block);
        let mut run = 0u64;
        loop {
            if (start + n) << self.cluster_bits > super::super::ondisk::MAX_HOST_OFFSET {
                return Err(Error::InvalidArgument("Image file is full".into()));
            }
            if run == n {
                break;
            }
            let c = start + run;
            let i = c / per_block;
            let covered = (i as usize) < self.table.len()
                && self.table[i as usize] & REFTABLE_OFFSET_MASK != 0;
            if !covered {
                // Creating a block takes the first cluster it covers: rescan the run.
                self.ensure_block(file, i)?;
                run = 0;
                continue;
            }
            let b = self
                .block(file, i)?
                .ok_or_else(|| Error::Corrupt(format!("refcount block {i} vanished")))?;
            let mut j = c % per_block;
            while run < n && j < per_block {
                if rc::get(&b.data, order, j as usize) != 0 {
                    start = i * per_block + j + 1;
                    run = 0;
                } else {
                    first_free.get_or_insert(i * per_block + j);
                    run += 1;
                }
                j += 1;
            }
        }
        for k in 0..n {
            self.set(file, start + k, 1)?;
        }
        if from_hint {
            self.free_hint = match first_free {
                Some(f) if f != start => f,
                _ => start + n,
            };
        }
        if n > 1 {
            self.run_hint = (start + n, n);
        }
        Ok(start << self.cluster_bits)
    }

    /// Allocates `size` bytes (less than a cluster) for a compressed cluster, QEMU's way:
    /// right after the previous compressed cluster when it fits there or the next host
    /// cluster is free, else at the start of a new cluster. Every host cluster the bytes
    /// touch gains one reference. Returns the byte offset.
    pub(crate) fn alloc_bytes(&mut self, file: &dyn Storage, size: u64) -> Result<u64> {
        let cs = self.cs();
        let mut offset = self.free_byte;
        if offset != 0 {
            // A cluster freed or full since cannot take more.
            let v = self.get(file, offset >> self.cluster_bits)?;
            if v == 0 || v >= rc::max(self.order) {
                offset = 0;
            }
        }
        let free_in_cluster = if offset == 0 {
            0
        } else {
            cs - (offset & (cs - 1))
        };
        if offset == 0 || free_in_cluster < size {
            let new = self.alloc(file, 1)?;
            if offset == 0 || offset.next_multiple_of(cs) != new {
                offset = new;
            } else {
                self.add_one(file, offset >> self.cluster_bits)?;
            }
        } else {
            self.add_one(file, offset >> self.cluster_bits)?;
        }
        self.free_byte = offset + size;
        if self.free_byte & (cs - 1) == 0 {
            self.free_byte = 0;
        }
        Ok(offset)
    }

    fn add_one(&mut self, file: &dyn Storage, c: u64) -> Result<()> {
        let v = self.get(file, c)?;
        if v >= rc::max(self.order) {
            return Err(Error::InvalidArgument("Refcount overflow".into()));
        }
        self.set(file, c, v + 1)
    }

    /// Captures dirty blocks for writing.
    pub(crate) fn dirty_blocks(&self) -> Vec<DirtyBlock> {
        let mut v: Vec<DirtyBlock> = self
            .blocks
            .iter()
            .filter(|(_, b)| b.gen != b.written_gen)
            .map(|(&i, b)| DirtyBlock {
                index: i,
                offset: self.table[i as usize] & REFTABLE_OFFSET_MASK,
                data: b.data.clone(),
                gen: b.gen,
            })
            .collect();
        v.sort_by_key(|d| d.offset);
        v
    }

    /// Writes captured blocks.
    pub(crate) fn write_blocks(file: &dyn Storage, blocks: &[DirtyBlock]) -> Result<()> {
        for b in blocks {
            file.write_at(&b.data, b.offset)?;
        }
        Ok(())
    }

    /// Records that captured blocks reached the disk.
    pub(crate) fn mark_written(&mut self, blocks: &[DirtyBlock]) {
        for d in blocks {
            if let Some(b) = self.blocks.get_mut(&d.index) {
                b.written_gen = b.written_gen.max(d.gen);
            }
        }
    }

    /// The host byte range of the refcount table.
    pub(crate) fn table_range(&self) -> (u64, u64) {
        let len = (self.table.len() as u64 * 8).div_ceil(self.cs()) * self.cs();
        (self.table_offset, self.table_offset + len)
    }

    /// Whether any block has unwritten changes.
    pub(crate) fn has_dirty(&self) -> bool {
        self.blocks.values().any(|b| b.gen != b.written_gen)
    }
}
