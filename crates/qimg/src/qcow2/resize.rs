//! Changing the virtual size of a qcow2 image (`qemu-img resize`, `amend -o size`).
//!
//! One metadata transaction (see `txn.rs`): the grown L1 table, any new or edited L2
//! tables and the refcount blocks go to clusters the old state does not use, and the size
//! and table pointers switch together in one header write. QEMU's own order (new L1
//! synced, 12-byte L1 switch, then the size) gives the same two visible states; here the
//! size and the L1 switch are the same write.
//!
//! - Growing: the L1 table grows to exactly what the new size needs. With a backing file
//!   longer than the old size the new area is made to read as zeros (zero flags for whole
//!   clusters, a private zero-padded copy of the cluster holding the old end), as QEMU
//!   does so that backing data never appears. Preallocation `metadata`, `falloc` and
//!   `full` allocate L2 tables and data clusters for the new area.
//! - Shrinking: clusters past the new end are fully discarded (entries cleared), L2 tables
//!   past the new end are freed (the L1 table keeps its size, as in QEMU), then the file
//!   is truncated after the last used cluster.
//! - Persistent bitmaps are resized as QEMU resizes them (new bits clear, bits past a new
//!   end dropped) and stored at close; they stay `in_use` on disk until then (see
//!   `bitmaps.rs` for tables that must grow first). Inconsistent bitmaps make the resize
//!   fail, as in QEMU.

use super::txn::Txn;
use super::Qcow2;
use crate::error::{Error, Result};
use crate::image::Image;
use crate::ondisk::l2::{COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use crate::storage::write_zeros;

/// Preallocation of the area a resize adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prealloc {
    /// Nothing: the new area is unallocated.
    Off,
    /// L2 tables and data clusters allocated; the file is extended sparsely.
    Metadata,
    /// As metadata; the data area is not fallocated by qimg (the file is extended).
    Falloc,
    /// As metadata, and zeros written to the data clusters.
    Full,
}

impl Qcow2 {
    /// Resizes the image to `size` bytes.
    pub fn resize(&mut self, size: u64, prealloc: Prealloc) -> Result<()> {
        let old = self.header.size;
        if !size.is_multiple_of(512) {
            return Err(Error::InvalidArgument(
                "The new size must be a multiple of 512".into(),
            ));
        }
        if !self.snapshots.is_empty() && self.header.version < 3 {
            return Err(Error::unsupported(
                "Can't resize a v2 image which has snapshots",
            ));
        }
        self.bm_resize_check()?;
        if size < old && prealloc != Prealloc::Off {
            return Err(Error::unsupported(
                "Preallocation can't be used for shrinking an image",
            ));
        }
        if size == old {
            return Ok(());
        }
        if size > i64::MAX as u64 {
            return Err(Error::InvalidArgument("File too large".into()));
        }
        let cs = self.cluster_size();
        let shift = self.cluster_bits + self.l2_bits;
        let needed = size.div_ceil(1u64 << shift);
        if needed * 8 > super::MAX_L1_BYTES {
            return Err(Error::InvalidArgument(
                "Failed to grow the L1 table: File too large".into(),
            ));
        }
        let backing_longer = match &self.backing {
            Some(b) => b.len() > old,
            None => self.header.backing_file.is_some(),
        };
        let zero_new = size > old && backing_longer && prealloc == Prealloc::Off;
        if zero_new && self.header.version < 3 {
            return Err(Error::unsupported(
                "Failed to zero out new clusters: Operation not supported",
            ));
        }
        if size > old {
            self.bm_resize(size)?;
        }
        self.quiesce()?;
        let file = self.file.clone();
        let file_len = file.len()?;
        let df = self.header.has_data_file();
        let ext = self.header.extended_l2();
        let step = self.step();
        let l2e = self.l2_entries();
        let mut h = self.header.clone();
        let mut txn = Txn::begin(file.as_ref(), &self.header, h.refcount_order)?;
        let mut l1 = self.l1.read().unwrap().clone();
        if (l1.len() as u64) < needed {
            l1.resize(needed as usize, 0);
        }
        // Guest clusters [first, end) are edited.
        let (first, end) = if size < old {
            (size.div_ceil(cs), old.div_ceil(cs))
        } else if prealloc != Prealloc::Off || zero_new {
            (old / cs, size.div_ceil(cs))
        } else {
            (0, 0)
        };
        // Data clusters preallocated: (host offset, count) runs, zero-filled afterwards
        // when they lie inside the old file (they may hold stale bytes) or for `full`.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        // The partial cluster at the old end when the new area must read as zeros.
        let partial = if zero_new && !old.is_multiple_of(cs) {
            let base = old / cs * cs;
            let mut buf = vec![0u8; cs as usize];
            let n = (old - base) as usize;
            self.read_at(&mut buf[..n], base)?;
            Some((old / cs, buf))
        } else {
            None
        };
        let shrinking = size < old;
        let mut edit = |txn: &mut Txn, i: u64, words: &mut Vec<u64>| -> Result<()> {
            let lo = (i * l2e).max(first);
            let hi = ((i + 1) * l2e).min(end);
            if lo >= hi {
                return Ok(());
            }
            let mut k = lo;
            while k < hi {
                let j = ((k - i * l2e) as usize) * step;
                let e = words[j];
                if shrinking {
                    txn.entry_refs(e, df, -1)?;
                    words[j] = 0;
                    if ext {
                        words[j + 1] = 0;
                    }
                    k += 1;
                } else if let Some((_, buf)) = partial.as_ref().filter(|p| p.0 == k) {
                    let at = if df { k * cs } else { txn.alloc(1)? };
                    self.data_storage()?.write_at(buf, at)?;
                    txn.entry_refs(e, df, -1)?;
                    words[j] = at | COPIED;
                    if ext {
                        words[j + 1] = u32::MAX as u64;
                    }
                    k += 1;
                } else if zero_new {
                    txn.entry_refs(e, df, -1)?;
                    if ext {
                        words[j] = 0;
                        words[j + 1] = 0xffff_ffff_0000_0000;
                    } else {
                        words[j] = ZERO;
                    }
                    k += 1;
                } else {
                    // Preallocation: a run of unallocated entries gets contiguous clusters.
                    let unalloc = |w: u64| w & (OFFSET_MASK | COMPRESSED) == 0;
                    if !unalloc(e) || (k * cs < old && self.backing.is_some()) {
                        k += 1;
                        continue;
                    }
                    let mut n = 1;
                    while k + n < hi && unalloc(words[((k + n - i * l2e) as usize) * step]) {
                        n += 1;
                    }
                    let at = if df { k * cs } else { txn.alloc(n)? };
                    for m in 0..n {
                        let jj = ((k + m - i * l2e) as usize) * step;
                        words[jj] = (at + m * cs) | COPIED;
                        if ext {
                            words[jj + 1] = u32::MAX as u64;
                        }
                    }
                    runs.push((at, n));
                    k += n;
                }
            }
            Ok(())
        };
        let range = (first / l2e)..end.div_ceil(l2e);
        self.finish_active(&mut txn, &mut l1, range, false, &mut edit)?;
        h.size = size;
        self.place_active_l1(&mut txn, &l1, &mut h)?;
        let storage = self.data_storage()?;
        for &(at, n) in &runs {
            if prealloc == Prealloc::Full || at < file_len || df {
                write_zeros(storage, at, n * cs)?;
            }
        }
        if let Some(&(at, n)) = runs.iter().max_by_key(|r| r.0 + r.1) {
            let end = at + n * cs;
            if storage.len()? < end {
                storage.set_len(end)?;
            }
        }
        let used = self.commit(txn, h, l1, None)?;
        if shrinking {
            self.bm_resize(size)?;
            // The transaction put the new tables past everything the old state used; now
            // that the discarded clusters are free, move those tables down into them.
            let used = if used > file_len {
                self.compact(file_len)?
            } else {
                used
            };
            if used < self.file.len()? {
                self.file.set_len(used)?;
                self.file.flush()?;
            }
        }
        if df
            && self.header.autoclear_features & crate::ondisk::header::autoclear::DATA_FILE_RAW != 0
        {
            // A raw data file must stay a valid raw image of the guest disk.
            let d = self.data_storage()?;
            d.set_len(size)?;
            d.flush()?;
        }
        Ok(())
    }
}

impl Qcow2 {
    /// Moves the active L1 and L2 tables and the refcount structure that lie at or above
    /// `limit` to free clusters (one more transaction); returns the new used end.
    fn compact(&mut self, limit: u64) -> Result<u64> {
        let file = self.file.clone();
        let mut h = self.header.clone();
        let mut txn = Txn::begin(file.as_ref(), &self.header, h.refcount_order)?;
        txn.relocate_blocks(limit)?;
        let mut l1 = self.l1.read().unwrap().clone();
        let n = l1.len() as u64;
        self.finish_active(&mut txn, &mut l1, 0..n, false, &mut |_, _, _| Ok(()))?;
        self.place_active_l1(&mut txn, &l1, &mut h)?;
        self.commit(txn, h, l1, None)
    }
}
