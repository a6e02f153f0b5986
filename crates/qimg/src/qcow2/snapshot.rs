//! Internal snapshots: create, apply (goto) and delete.
//!
//! Each operation is one metadata transaction (see `txn.rs`): the new snapshot table,
//! L1 and L2 tables and refcount blocks go to clusters the old state does not use, and
//! one header write switches over. Semantics follow qemu-img:
//! - create: ID = highest numeric ID + 1, date = now (microseconds), VM clock 0, VM state
//!   0, icount 0 (as `qemu-img snapshot -c` records it), extra data with the disk size;
//! - apply: by ID first, then by name; the image takes the snapshot's disk size;
//! - delete: by name, first match.
//!
//! Refcounts: every L1 table (active or snapshot) counts once for each L2 table and each
//! data cluster it reaches, as `qemu-img check` counts them. On create the snapshot keeps
//! the current L2 tables and the active L1 gets private copies of those whose COPIED flags
//! change, so no live table is ever rewritten in place.

use super::txn::Txn;
use super::{Qcow2, MAX_L1_BYTES};
use crate::error::{Error, Result};
use crate::ondisk::l2::COPIED;
use crate::ondisk::snapshot::{self, Snapshot};
use crate::ondisk::{be16, be32, MAX_HOST_OFFSET};

/// Parses the leading decimal digits of an ID as `strtoul` would (0 when none).
fn numeric_id(id: &str) -> u64 {
    let digits: String = id
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().unwrap_or(0)
}

impl Qcow2 {
    /// Length in bytes of the snapshot table as stored (entries may carry more or less
    /// extra data than this implementation writes).
    pub(crate) fn snapshot_table_len(&self) -> Result<u64> {
        let mut pos = self.header.snapshots_offset;
        for _ in 0..self.header.nb_snapshots {
            let mut head = [0u8; 40];
            self.file.read_at(&mut head, pos)?;
            let len = 40 + be32(&head, 36) as u64 + be16(&head, 12) as u64 + be16(&head, 14) as u64;
            pos += len.div_ceil(8) * 8;
            if pos - self.header.snapshots_offset > snapshot::MAX_TABLE_SIZE {
                return Err(Error::invalid("Snapshot table is too big"));
            }
        }
        Ok(pos - self.header.snapshots_offset)
    }

    /// Writes `list` as a new snapshot table inside `txn` and frees the old one; returns
    /// (count, offset) for the header.
    pub(crate) fn place_snapshot_table(
        &self,
        txn: &mut Txn,
        list: &[Snapshot],
    ) -> Result<(u32, u64)> {
        let mut buf = Vec::new();
        for s in list {
            s.serialize(&mut buf);
        }
        if buf.len() as u64 > snapshot::MAX_TABLE_SIZE {
            return Err(Error::InvalidArgument("Snapshot table is too big".into()));
        }
        let old_len = if self.header.nb_snapshots > 0 {
            self.snapshot_table_len()?
        } else {
            0
        };
        txn.range_refs(self.header.snapshots_offset, old_len, -1)?;
        if list.is_empty() {
            return Ok((0, 0));
        }
        let at = txn.alloc((buf.len() as u64).div_ceil(self.cluster_size()))?;
        self.file.write_at(&buf, at)?;
        Ok((list.len() as u32, at))
    }

    /// Reads a snapshot's L1 table after QEMU's checks.
    fn snapshot_l1(&self, s: &Snapshot) -> Result<Vec<u64>> {
        if s.l1_size as u64 * 8 > MAX_L1_BYTES {
            return Err(Error::invalid("Snapshot L1 table too large"));
        }
        if s.l1_table_offset & (self.cluster_size() - 1) != 0
            || s.l1_table_offset + s.l1_size as u64 * 8 > MAX_HOST_OFFSET
        {
            return Err(Error::invalid("Snapshot L1 table offset invalid"));
        }
        self.read_words(s.l1_table_offset, s.l1_size as u64)
    }

    /// Creates an internal snapshot of the current state named `name`.
    ///
    /// `now` is the creation time (seconds, nanoseconds since the epoch).
    pub fn snapshot_create(&mut self, name: &str, now: (u32, u32)) -> Result<()> {
        if self.header.has_data_file() {
            return Err(Error::unsupported("Operation not supported"));
        }
        if self.snapshots.len() as u64 >= snapshot::MAX_SNAPSHOTS as u64 {
            return Err(Error::InvalidArgument("File too large".into()));
        }
        if name.len() > u16::MAX as usize {
            return Err(Error::InvalidArgument("Snapshot name is too long".into()));
        }
        self.quiesce()?;
        let id = self
            .snapshots
            .iter()
            .map(|s| numeric_id(&s.id))
            .max()
            .unwrap_or(0)
            .saturating_add(1);
        let mut h = self.header.clone();
        let file = self.file.clone();
        let mut txn = Txn::begin(file.as_ref(), &self.header, h.refcount_order)?;
        let cur = self.l1.read().unwrap().clone();
        // The snapshot's references.
        self.tree_refs(&mut txn, &cur, 1)?;
        let snap_l1: Vec<u64> = cur.iter().map(|e| e & !COPIED).collect();
        let n = (snap_l1.len() as u64 * 8).div_ceil(self.cluster_size());
        let snap_at = txn.alloc(n)?;
        if n > 0 {
            self.write_words(snap_at, &snap_l1)?;
        }
        let mut l1 = cur.clone();
        let n = l1.len() as u64;
        self.finish_active(&mut txn, &mut l1, 0..n, true, &mut |_, _, _| Ok(()))?;
        self.place_active_l1(&mut txn, &l1, &mut h)?;
        let mut list = self.snapshots.clone();
        list.push(Snapshot {
            l1_table_offset: snap_at,
            l1_size: snap_l1.len() as u32,
            id: id.to_string(),
            name: name.to_string(),
            date_sec: now.0,
            date_nsec: now.1 / 1000 * 1000,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(self.header.size),
            icount: Some(0),
            unknown_extra: Vec::new(),
            extra_data_size: 24,
        });
        let (nb, off) = self.place_snapshot_table(&mut txn, &list)?;
        h.nb_snapshots = nb;
        h.snapshots_offset = off;
        self.commit(txn, h, l1, Some(list))?;
        Ok(())
    }

    /// Reverts the active state to a snapshot found by ID, else by name.
    ///
    /// Refused while the image has persistent bitmaps, as QEMU refuses it: their bits
    /// would not describe the reverted contents.
    pub fn snapshot_apply(&mut self, id_or_name: &str) -> Result<()> {
        if self.header.has_data_file() {
            return Err(Error::unsupported("Operation not supported"));
        }
        if !self.bitmap_list().is_empty() {
            return Err(Error::InvalidArgument(
                "Device has active dirty bitmaps".into(),
            ));
        }
        let idx = self
            .find_snapshot(Some(id_or_name), None)
            .or_else(|| self.find_snapshot(None, Some(id_or_name)))
            .ok_or_else(|| Error::NotFound("No such file or directory".into()))?;
        let sn = self.snapshots[idx].clone();
        let sn_l1 = self.snapshot_l1(&sn)?;
        let size = sn.disk_size.unwrap_or(self.header.size);
        if size != self.header.size && self.header.version < 3 {
            return Err(Error::unsupported(
                "Can't resize a v2 image which has snapshots",
            ));
        }
        self.quiesce()?;
        let mut h = self.header.clone();
        let needed = size.div_ceil(1u64 << (self.cluster_bits + self.l2_bits));
        let cur = self.l1.read().unwrap().clone();
        let len = (cur.len() as u64).max(sn_l1.len() as u64).max(needed);
        if len * 8 > MAX_L1_BYTES {
            return Err(Error::InvalidArgument("File too large".into()));
        }
        let file = self.file.clone();
        let mut txn = Txn::begin(file.as_ref(), &self.header, h.refcount_order)?;
        self.tree_refs(&mut txn, &sn_l1, 1)?;
        self.tree_refs(&mut txn, &cur, -1)?;
        let mut l1: Vec<u64> = sn_l1.iter().map(|e| e & !COPIED).collect();
        l1.resize(len as usize, 0);
        self.finish_active(&mut txn, &mut l1, 0..len, true, &mut |_, _, _| Ok(()))?;
        h.size = size;
        self.place_active_l1(&mut txn, &l1, &mut h)?;
        self.commit(txn, h, l1, None)?;
        Ok(())
    }

    /// Deletes the first snapshot named `name`.
    pub fn snapshot_delete(&mut self, name: &str) -> Result<()> {
        let idx = self
            .find_snapshot(None, Some(name))
            .ok_or_else(|| Error::NotFound("snapshot not found".into()))?;
        if self.header.has_data_file() {
            return Err(Error::unsupported("Operation not supported"));
        }
        let sn = self.snapshots[idx].clone();
        let sn_l1 = self.snapshot_l1(&sn)?;
        self.quiesce()?;
        let mut h = self.header.clone();
        let file = self.file.clone();
        let mut txn = Txn::begin(file.as_ref(), &self.header, h.refcount_order)?;
        self.tree_refs(&mut txn, &sn_l1, -1)?;
        txn.range_refs(sn.l1_table_offset, sn.l1_size as u64 * 8, -1)?;
        let mut list = self.snapshots.clone();
        list.remove(idx);
        let (nb, off) = self.place_snapshot_table(&mut txn, &list)?;
        h.nb_snapshots = nb;
        h.snapshots_offset = off;
        let mut l1 = self.l1.read().unwrap().clone();
        let n = l1.len() as u64;
        self.finish_active(&mut txn, &mut l1, 0..n, true, &mut |_, _, _| Ok(()))?;
        self.place_active_l1(&mut txn, &l1, &mut h)?;
        self.commit(txn, h, l1, Some(list))?;
        Ok(())
    }
}
