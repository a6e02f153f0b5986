//! Changing format options of an existing qcow2 image (`qemu-img amend`).
//!
//! Applied in QEMU's order: upgrade to v3 first, then the refcount width, lazy
//! refcounts, `data_file_raw`, the external data file name, the size, and a downgrade
//! to v2 last. Every structural change is a metadata transaction (see `txn.rs`); a
//! version change then rewrites the header cluster tail first and the first sector last,
//! so that the switch itself is one sector write whenever the old header fits in it.

use super::txn::{switch_header, Txn};
use super::Qcow2;
use crate::error::{Error, Result};
use crate::ondisk::header::{autoclear, compat, incompat, Header, V2_HEADER_LEN, V3_HEADER_LEN};
use crate::ondisk::l2::{self, COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use std::collections::HashMap;

/// The options `amend` may change; `None` leaves an option as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AmendOptions {
    /// 2 (compat=0.10) or 3 (compat=1.1).
    pub version: Option<u32>,
    /// Lazy refcounts on or off.
    pub lazy_refcounts: Option<bool>,
    /// New refcount width in bits (a power of two up to 64).
    pub refcount_bits: Option<u32>,
    /// New virtual size.
    pub size: Option<u64>,
    /// `data_file_raw=off` (it can only be cleared).
    pub clear_data_file_raw: bool,
    /// New name of the external data file.
    pub data_file: Option<String>,
}

impl Qcow2 {
    /// Applies `o` to the image.
    pub fn amend(&mut self, o: &AmendOptions) -> Result<()> {
        let old_version = self.header.version;
        let version = o.version.unwrap_or(old_version);
        if o.data_file.is_some() && !self.header.has_data_file() {
            return Err(Error::InvalidArgument(
                "data-file can only be set for images that use an external data file".into(),
            ));
        }
        if let Some(bits) = o.refcount_bits {
            if !bits.is_power_of_two() || bits > 64 {
                return Err(Error::InvalidArgument(
                    "Refcount width must be a power of two and may not exceed 64 bits".into(),
                ));
            }
        }
        // QEMU refuses these before changing anything.
        if version < 3 {
            let current = self.header.refcount_bits();
            match o.refcount_bits.filter(|&b| b != current) {
                Some(b) if b != 16 => {
                    return Err(Error::InvalidArgument("Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)".into()));
                }
                None if current != 16 => {
                    return Err(Error::InvalidArgument(
                        "compat=0.10 requires refcount_bits=16".into(),
                    ));
                }
                _ => {}
            }
            if o.lazy_refcounts == Some(true) {
                return Err(Error::InvalidArgument("Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)".into()));
            }
        }
        self.quiesce()?;
        if version > old_version {
            self.upgrade()?;
        }
        if let Some(bits) = o.refcount_bits {
            if bits != self.header.refcount_bits() {
                // Going back to 16 bits on the way to v2 is what a downgrade needs.
                if version < 3 && bits != 16 {
                    return Err(Error::InvalidArgument("Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)".into()));
                }
                self.change_refcount_order(bits.trailing_zeros())?;
            }
        }
        if let Some(lazy) = o.lazy_refcounts {
            let on = self.header.compatible_features & compat::LAZY_REFCOUNTS != 0;
            if lazy && version < 3 {
                return Err(Error::InvalidArgument("Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)".into()));
            }
            if lazy != on {
                let mut h = self.header.clone();
                h.compatible_features ^= compat::LAZY_REFCOUNTS;
                switch_header(self.file.as_ref(), &self.header, &h)?;
                self.header = h;
                if let Some(st) = self.ws.get_mut().unwrap().as_mut() {
                    st.lazy = lazy;
                }
            }
        }
        if o.clear_data_file_raw && self.header.autoclear_features & autoclear::DATA_FILE_RAW != 0 {
            let mut h = self.header.clone();
            h.autoclear_features &= !autoclear::DATA_FILE_RAW;
            switch_header(self.file.as_ref(), &self.header, &h)?;
            self.header = h;
        }
        if let Some(name) = &o.data_file {
            let mut h = self.header.clone();
            h.data_file = Some(name.clone());
            self.rewrite_header(h)?;
        }
        if let Some(size) = o.size {
            self.resize(size, super::resize::Prealloc::Off)?;
        }
        if version < old_version {
            self.downgrade()?;
        }
        Ok(())
    }

    /// Writes a whole new header: everything past the first sector first, then the first
    /// sector, each flushed.
    fn rewrite_header(&mut self, mut h: Header) -> Result<()> {
        let bytes = h.serialize()?;
        let split = bytes.len().min(512);
        if bytes.len() > 512 {
            self.file.write_at(&bytes[512..], 512)?;
            self.file.flush()?;
        }
        self.file.write_at(&bytes[..split], 0)?;
        self.file.flush()?;
        self.header = h;
        Ok(())
    }

    /// Rebuilds the refcount structure with entries `1 << order` bits wide.
    fn change_refcount_order(&mut self, order: u32) -> Result<()> {
        let file = self.file.clone();
        let h = self.header.clone();
        let txn = Txn::begin(file.as_ref(), &self.header, order)?;
        let l1 = self.l1.read().unwrap().clone();
        self.commit(txn, h, l1, None)?;
        Ok(())
    }

    /// compat=0.10 → 1.1: snapshot entries get the extra data v3 requires, then the
    /// header is rewritten as v3.
    fn upgrade(&mut self) -> Result<()> {
        if self.snapshots.iter().any(|s| s.extra_data_size < 16) {
            let file = self.file.clone();
            let mut h = self.header.clone();
            let mut txn = Txn::begin(file.as_ref(), &self.header, h.refcount_order)?;
            let size = self.header.size;
            let list: Vec<_> = self
                .snapshots
                .iter()
                .map(|s| {
                    let mut s = s.clone();
                    s.disk_size.get_or_insert(size);
                    s
                })
                .collect();
            let (nb, off) = self.place_snapshot_table(&mut txn, &list)?;
            h.nb_snapshots = nb;
            h.snapshots_offset = off;
            let l1 = self.l1.read().unwrap().clone();
            self.commit(txn, h, l1, Some(list))?;
        }
        let mut h = self.header.clone();
        h.version = 3;
        h.header_length = V3_HEADER_LEN;
        h.refcount_order = 4;
        self.rewrite_header(h)
    }

    /// compat=1.1 → 0.10, with QEMU's refusals; zero clusters are expanded first.
    fn downgrade(&mut self) -> Result<()> {
        let h = &self.header;
        if h.refcount_order != 4 {
            return Err(Error::InvalidArgument(
                "compat=0.10 requires refcount_bits=16".into(),
            ));
        }
        if h.has_data_file() {
            return Err(Error::unsupported(
                "Cannot downgrade an image with a data file",
            ));
        }
        let size = h.size;
        if self
            .snapshots
            .iter()
            .any(|s| s.vm_state_size > u32::MAX as u64 || s.disk_size.is_some_and(|d| d != size))
        {
            return Err(Error::unsupported(
                "Internal snapshots prevent downgrade of image",
            ));
        }
        let bad = h.incompatible_features & !(incompat::COMPRESSION | incompat::DIRTY);
        if bad != 0 {
            return Err(Error::unsupported(format!(
                "Cannot downgrade an image with incompatible features {bad:#x} set"
            )));
        }
        if !self.bitmaps.is_empty() {
            return Err(Error::unsupported(
                "Cannot downgrade an image with persistent bitmaps",
            ));
        }
        self.expand_zero_clusters()?;
        if self.header.compression_type != 0 && self.has_compressed_clusters()? {
            return Err(Error::unsupported(
                "Cannot downgrade an image with a non-zlib compression type that has compressed clusters",
            ));
        }
        let mut h = self.header.clone();
        h.version = 2;
        h.header_length = V2_HEADER_LEN;
        h.incompatible_features = 0;
        h.compatible_features = 0;
        h.autoclear_features = 0;
        h.compression_type = 0;
        h.unknown_header_bytes.clear();
        h.feature_names.clear();
        h.bitmaps = None;
        self.rewrite_header(h)?;
        if let Some(st) = self.ws.get_mut().unwrap().as_mut() {
            st.lazy = false;
        }
        Ok(())
    }

    fn has_compressed_clusters(&self) -> Result<bool> {
        let mut l1s = vec![self.l1.read().unwrap().clone()];
        for s in &self.snapshots {
            l1s.push(self.read_words(s.l1_table_offset, s.l1_size as u64)?);
        }
        for l1 in &l1s {
            for &e in l1 {
                if l2::l1_offset(e) == 0 {
                    continue;
                }
                let t = self.read_l2(e)?;
                if t.iter().step_by(self.step()).any(|w| w & COMPRESSED != 0) {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Replaces every zero-flagged entry of every tree (active and snapshots) by a
    /// cluster of zeros (or by nothing, without a backing file), in one transaction.
    fn expand_zero_clusters(&mut self) -> Result<()> {
        let file = self.file.clone();
        let mut h = self.header.clone();
        let mut txn = Txn::begin(file.as_ref(), &self.header, h.refcount_order)?;
        let cs = self.cluster_size();
        let has_backing = self.header.backing_file.is_some();
        let zeros = vec![0u8; cs as usize];
        let mut remap: HashMap<u64, u64> = HashMap::new();
        let mut l1s = vec![self.l1.read().unwrap().clone()];
        let mut snaps = self.snapshots.clone();
        for s in &snaps {
            if s.l1_size as u64 * 8 > super::MAX_L1_BYTES {
                return Err(Error::invalid("Snapshot L1 table too large"));
            }
            l1s.push(self.read_words(s.l1_table_offset, s.l1_size as u64)?);
        }
        let mut changed = vec![false; l1s.len()];
        for (k, l1) in l1s.iter_mut().enumerate() {
            for e in l1.iter_mut() {
                let t = l2::l1_offset(*e);
                if t == 0 {
                    continue;
                }
                if let Some(&nt) = remap.get(&t) {
                    *e = nt;
                    changed[k] = true;
                    continue;
                }
                let mut words = self.read_l2(*e)?;
                if !words.iter().any(|w| w & ZERO != 0 && w & COMPRESSED == 0) {
                    continue;
                }
                let r = txn.get(t >> self.cluster_bits)?;
                for w in words.iter_mut() {
                    if *w & ZERO == 0 || *w & COMPRESSED != 0 {
                        continue;
                    }
                    let d = *w & OFFSET_MASK;
                    *w = if d != 0 && txn.get(d >> self.cluster_bits)? == r {
                        // Only this table reaches it: its old contents are never read.
                        self.file.write_at(&zeros, d)?;
                        d
                    } else if d != 0 || has_backing {
                        if d != 0 {
                            txn.add(d >> self.cluster_bits, -(r as i64))?;
                        }
                        let n = txn.alloc(1)?;
                        txn.set(n >> self.cluster_bits, r)?;
                        self.file.write_at(&zeros, n)?;
                        n
                    } else {
                        0
                    };
                }
                for w in words.iter_mut() {
                    let d = *w & OFFSET_MASK;
                    if d != 0 && *w & COMPRESSED == 0 {
                        let one = txn.get(d >> self.cluster_bits)? == 1;
                        *w = if one { *w | COPIED } else { *w & !COPIED };
                    }
                }
                let nt = txn.alloc(1)?;
                txn.set(nt >> self.cluster_bits, r)?;
                txn.set(t >> self.cluster_bits, 0)?;
                self.write_words(nt, &words)?;
                remap.insert(t, nt);
                *e = nt;
                changed[k] = true;
            }
        }
        // COPIED on the active L1 entries follows the tables' refcounts.
        let mut active = l1s[0].clone();
        for e in active.iter_mut() {
            let t = l2::l1_offset(*e);
            if t != 0 {
                let one = txn.get(t >> self.cluster_bits)? == 1;
                *e = if one { t | COPIED } else { t };
            }
        }
        self.place_active_l1(&mut txn, &active, &mut h)?;
        let mut snaps_changed = false;
        for (k, s) in snaps.iter_mut().enumerate() {
            if !changed[k + 1] {
                continue;
            }
            let l1: Vec<u64> = l1s[k + 1].iter().map(|e| e & !COPIED).collect();
            let n = (l1.len() as u64 * 8).div_ceil(cs);
            let at = txn.alloc(n)?;
            self.write_words(at, &l1)?;
            txn.range_refs(s.l1_table_offset, s.l1_size as u64 * 8, -1)?;
            s.l1_table_offset = at;
            snaps_changed = true;
        }
        if snaps_changed {
            let (nb, off) = self.place_snapshot_table(&mut txn, &snaps)?;
            h.nb_snapshots = nb;
            h.snapshots_offset = off;
        }
        self.commit(txn, h, active, Some(snaps))?;
        Ok(())
    }
}
