//! Operations that rewrite the header or the image's top-level structure: changing the
//! backing file (`rebase`), growing the virtual size (`commit` into a smaller backing
//! file) and emptying an overlay (`commit` without `-d`).
//!
//! They take `&mut self` (or `self`) because they change fields that every reader of the
//! image depends on; nothing else may use the image meanwhile.

use super::Qcow2;
use crate::error::{Error, Result};
use crate::image::Image;
use crate::ondisk::header::incompat;
use crate::ondisk::refcount;
use crate::ondisk::{put32, put64};

impl Qcow2 {
    fn require_writable(&self) -> Result<()> {
        if self.ws.lock().unwrap().is_none() {
            return Err(Error::Permission("Image is read-only".into()));
        }
        Ok(())
    }

    /// Records a new backing file name and format (`None` removes the backing file).
    ///
    /// The whole header cluster is serialized and written with one write, as QEMU does,
    /// so a crash leaves either the old or the new header (a sector-atomic device is
    /// assumed for the first 512 bytes, where the offsets live). Fails with ENOSPC when
    /// the header, its extensions and the name do not fit in the first cluster.
    pub fn set_backing_file(&mut self, name: Option<&str>, format: Option<&str>) -> Result<()> {
        self.require_writable()?;
        // Metadata written later must not race with the header write.
        self.flush_metadata(false)?;
        let mut h = self.header.clone();
        h.backing_file = name.map(str::to_string);
        h.backing_format = match name {
            Some(_) => format.map(str::to_string),
            None => None,
        };
        if self
            .ws
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|s| s.marked_dirty)
        {
            h.incompatible_features |= incompat::DIRTY;
        }
        let buf = h
            .serialize()
            .map_err(|_| Error::RawIo(std::io::Error::from_raw_os_error(libc::ENOSPC)))?;
        self.file.write_at(&buf, 0)?;
        self.file.flush()?;
        h.incompatible_features = self.header.incompatible_features;
        self.header = h;
        Ok(())
    }

    /// Grows the virtual size to `new_size` (a multiple of 512). The L1 table is grown to
    /// exactly the size needed, as QEMU's truncate does: the new table is written and its
    /// refcounts made durable before the header points at it, and the old table is freed
    /// only after that.
    pub fn grow(&mut self, new_size: u64) -> Result<()> {
        self.require_writable()?;
        if new_size < self.header.size {
            return Err(Error::InvalidArgument(
                "qcow2 images can only be grown here".into(),
            ));
        }
        if !new_size.is_multiple_of(512) {
            return Err(Error::InvalidArgument(
                "The new size must be a multiple of 512".into(),
            ));
        }
        let cs = self.cluster_size();
        let needed = new_size.div_ceil(cs << self.l2_bits);
        if needed > super::MAX_L1_BYTES / 8 {
            return Err(Error::InvalidArgument("L1 table too large".into()));
        }
        self.flush_metadata(false)?;
        if needed > self.header.l1_size as u64 {
            let old_offset = self.header.l1_table_offset;
            let old_clusters = (self.header.l1_size as u64 * 8).div_ceil(cs);
            let new_clusters = (needed * 8).div_ceil(cs);
            let new_offset = {
                let mut g = self.ws.lock().unwrap();
                let st = g
                    .as_mut()
                    .ok_or_else(|| Error::Permission("read-only".into()))?;
                st.refs.alloc(self.file.as_ref(), new_clusters)?
            };
            let mut l1 = self.l1.read().unwrap().clone();
            l1.resize(needed as usize, 0);
            let mut buf = vec![0u8; (new_clusters * cs) as usize];
            for (i, e) in l1.iter().enumerate() {
                put64(&mut buf, i * 8, *e);
            }
            self.file.write_at(&buf, new_offset)?;
            // Writes the refcount blocks that count the new table, and syncs.
            self.flush_metadata(false)?;
            self.file.flush()?;
            let mut hb = [0u8; 12];
            put32(&mut hb, 0, needed as u32);
            put64(&mut hb, 4, new_offset);
            self.file.write_at(&hb, 36)?;
            self.file.flush()?;
            *self.l1.write().unwrap() = l1;
            self.header.l1_size = needed as u32;
            self.header.l1_table_offset = new_offset;
            if old_offset != 0 {
                let mut g = self.ws.lock().unwrap();
                if let Some(st) = g.as_mut() {
                    for k in 0..old_clusters {
                        st.refs.free_later(old_offset / cs + k);
                    }
                }
            }
        }
        let mut sb = [0u8; 8];
        put64(&mut sb, 0, new_size);
        self.file.write_at(&sb, 24)?;
        self.file.flush()?;
        self.header.size = new_size;
        self.flush_metadata(false)
    }

    /// Empties the image: afterwards every cluster reads from the backing file again.
    ///
    /// v3 images without snapshots, bitmaps, encryption or external data file are reset
    /// to the layout of a fresh image (header, refcount table, one refcount block, L1
    /// table) and the file is truncated after it, as QEMU's `make_empty` does; the dirty
    /// bit is set for the duration, so a crash part-way leaves an image that
    /// `check -r all` repairs. Other images get every L2 entry cleared instead.
    pub fn make_empty(self) -> Result<()> {
        self.require_writable()?;
        self.flush_metadata(false)?;
        let cs = self.cluster_size();
        let h = &self.header;
        let l1_clusters = (h.l1_size as u64 * 8).div_ceil(cs);
        let per_block = refcount::entries_per_block(self.cluster_bits, h.refcount_order);
        let fast = h.version >= 3
            && self.snapshots.is_empty()
            && h.bitmaps.is_none()
            && h.crypto.is_none()
            && h.crypt_method == 0
            && !h.has_data_file()
            && 3 + l1_clusters <= per_block;
        if !fast {
            let clusters = self.len().div_ceil(cs);
            self.clear_entries(0, clusters)?;
            return self.close();
        }
        // From here on the in-memory state is stale; stop it from being written back.
        *self.ws.lock().unwrap() = None;
        let file = self.file.as_ref();
        let mut b = [0u8; 8];
        put64(&mut b, 0, h.incompatible_features | incompat::DIRTY);
        file.write_at(&b, 72)?;
        file.flush()?;
        // Drop every reference to data first, then rebuild the refcounts.
        file.write_at(&vec![0u8; h.l1_size as usize * 8], h.l1_table_offset)?;
        file.flush()?;
        let mut reftable = vec![0u8; cs as usize];
        put64(&mut reftable, 0, 2 * cs);
        let mut block = vec![0u8; cs as usize];
        for c in 0..3 + l1_clusters {
            refcount::set(&mut block, h.refcount_order, c as usize, 1);
        }
        file.write_at(&block, 2 * cs)?;
        file.write_at(&reftable, cs)?;
        file.write_at(&vec![0u8; (l1_clusters * cs) as usize], 3 * cs)?;
        file.flush()?;
        let mut hb = [0u8; 8];
        put64(&mut hb, 0, 3 * cs);
        file.write_at(&hb, 40)?;
        let mut rb = [0u8; 12];
        put64(&mut rb, 0, cs);
        put32(&mut rb, 8, 1);
        file.write_at(&rb, 48)?;
        file.flush()?;
        file.set_len((3 + l1_clusters) * cs)?;
        file.flush()?;
        put64(&mut b, 0, h.incompatible_features & !incompat::DIRTY);
        file.write_at(&b, 72)?;
        file.flush()
    }
}
