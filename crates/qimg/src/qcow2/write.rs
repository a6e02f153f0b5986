//! Guest writes, zero writes, discards and flush for qcow2.
//!
//! # Ordering (crash consistency)
//! Metadata changes live in memory (L2 slices in the slice cache, refcount blocks in
//! [`Refcounts`], the L1 table) until a flush, which writes them in dependency order:
//!
//! 1. the external data file is synced (guest data must be durable before the L2 entries
//!    that point to it);
//! 2. refcount blocks (increments only) are written and the image file synced — every
//!    cluster a new reference will point to is counted on disk first;
//! 3. L2 slices are written and synced;
//! 4. the L1 table is written and synced;
//! 5. only now are the queued decrements applied (the references they drop are gone on
//!    disk), and the refcount blocks they touched are written and synced.
//!
//! All of 2–4 is captured under one lock hold, so an L2 entry captured in step 3 never
//! points to a cluster whose increment missed step 2. Guest data for a newly allocated
//! cluster is written before its L2 entry changes in memory, so it precedes the sync of
//! step 2. A crash at any point leaves either the old or the new metadata, plus leaked
//! clusters at worst.
//!
//! With lazy refcounts the dirty bit is set (and synced) before the first L2 change that
//! reaches the disk, and refcount blocks are written only when the image is closed.
//!
//! # Concurrency
//! Metadata decisions are serialized by one mutex; data I/O runs outside it. A guest
//! cluster being allocated is marked in flight, and other writers to the same cluster
//! wait, so two writers never allocate the same cluster twice.

use super::alloc::Refcounts;
use super::Qcow2;
use crate::error::{Error, Result};
use crate::image::Image;
use crate::ondisk::header::incompat;
use crate::ondisk::l2::{self, ClusterType, CompressedDesc, COPIED, ZERO};
use crate::ondisk::{be64, put64};
use crate::storage::Storage;
use std::collections::HashSet;

/// Mutable metadata state of a writable image.
#[derive(Debug)]
pub(crate) struct WriteState {
    pub(crate) refs: Refcounts,
    pub(crate) l1_dirty: bool,
    pub(crate) in_flight: HashSet<u64>,
    /// Writers waiting in `claim` for a cluster in flight: releases wake them only when
    /// there are some (a condition variable's wake is a system call even with nobody
    /// waiting, once per cluster written otherwise).
    pub(crate) waiters: usize,
    /// The dirty bit is set on disk (lazy refcounts).
    pub(crate) marked_dirty: bool,
    pub(crate) lazy: bool,
    /// Host clusters of the active L2 tables (for overlap checks).
    pub(crate) l2_clusters: HashSet<u64>,
    /// Fixed metadata ranges (header, L1, snapshot table and L1s, bitmap directory),
    /// by name, as QEMU's overlap checks name them.
    pub(crate) fixed_meta: Vec<(u64, u64, &'static str)>,
}

/// What phase 1 of a cluster write decided.
enum Plan {
    /// Overwrite data in place at this host cluster.
    InPlace(u64),
    /// Write `region` of the cluster at `host`, then link it.
    Link {
        host: u64,
        region: (u64, u64),
        entry: u64,
        bitmap: u64,
        /// `host` was newly allocated (the old entry's clusters are freed after linking).
        fresh: bool,
        /// Extended L2: only the touched subclusters become allocated.
        extend: bool,
    },
}

/// Maximum dirty L2 slices before a write triggers a flush by itself.
const MAX_DIRTY_SLICES: usize = 4096;

impl Qcow2 {
    /// Which metadata structure `[host, host+len)` would overwrite, if any (QEMU's
    /// "cached" overlap checks: everything but inactive L2 tables). `except` names a
    /// structure the write legitimately targets.
    pub(crate) fn overlap(
        &self,
        st: &WriteState,
        host: u64,
        len: u64,
        except: Option<&str>,
    ) -> Option<&'static str> {
        let end = host + len.max(1);
        for &(a, b, name) in &st.fixed_meta {
            if host < b && a < end && except != Some(name) {
                return Some(name);
            }
        }
        let (ra, rb) = st.refs.table_range();
        if host < rb && ra < end {
            return Some("refcount table");
        }
        let (c0, c1) = (host >> self.cluster_bits, (end - 1) >> self.cluster_bits);
        for c in c0..=c1 {
            if st.refs.block_clusters.contains(&c) && except != Some("refcount block") {
                return Some("refcount block");
            }
            if st.l2_clusters.contains(&c) && except != Some("active L2 table") {
                return Some("active L2 table");
            }
        }
        None
    }

    /// Marks the image corrupt (header bit, synced) and makes further writes fail, as
    /// QEMU does on a runtime inconsistency in a writable image.
    pub(crate) fn signal_corruption(&self, msg: &str) -> Error {
        use std::sync::atomic::Ordering;
        if !self.corrupt.swap(true, Ordering::SeqCst) {
            eprintln!(
                "qcow2: Marking image as corrupt: {msg}; further corruption events will be suppressed"
            );
            let mut b = [0u8; 8];
            put64(
                &mut b,
                0,
                self.header.incompatible_features | incompat::CORRUPT,
            );
            let _ = self.file.write_at(&b, 72).and_then(|()| self.file.flush());
        }
        Error::io(
            "Image is corrupt",
            std::io::Error::from_raw_os_error(libc::EIO),
        )
    }

    /// Fails writes once the image was marked corrupt; turns runtime corruption found by
    /// a write into the corrupt bit.
    fn guard<T>(&self, r: impl FnOnce() -> Result<T>) -> Result<T> {
        if self.corrupt.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::io(
                "Image is corrupt",
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        match r() {
            Err(Error::Corrupt(m)) => Err(self.signal_corruption(&m)),
            other => other,
        }
    }

    fn ws(&self) -> Result<std::sync::MutexGuard<'_, Option<WriteState>>> {
        let g = self.ws.lock().unwrap();
        if g.is_none() {
            return Err(Error::Permission("Image is read-only".into()));
        }
        Ok(g)
    }

    fn entry_bytes(&self) -> u64 {
        if self.header.extended_l2() {
            16
        } else {
            8
        }
    }

    /// Reads the whole L2 entry (and bitmap) for guest cluster `gc` with the lock held.
    fn entry_locked(&self, gc: u64) -> Result<(u64, u64)> {
        self.l2_entry(gc << self.cluster_bits)
    }

    /// Makes the L2 table covering L1 index `l1i` exist and be exclusively ours (COPIED),
    /// allocating or copying it as needed. Returns its host offset.
    fn l2_writable(&self, st: &mut WriteState, l1i: u64) -> Result<u64> {
        let cs = self.cluster_size();
        let e = {
            let l1 = self.l1.read().unwrap();
            *l1.get(l1i as usize).ok_or_else(|| {
                Error::InvalidArgument("write beyond the end of the L1 table".into())
            })?
        };
        let old = l2::l1_offset(e);
        if old != 0 && e & COPIED != 0 {
            return Ok(old);
        }
        let file = self.file.as_ref();
        let new = st.refs.alloc(file, 1)?;
        let slice_bytes = self.l2_cache.slice_bytes() as u64;
        let words = (slice_bytes / 8) as usize;
        for s in 0..cs / slice_bytes {
            let contents = if old == 0 {
                vec![0u64; words]
            } else {
                let host = old + s * slice_bytes;
                let slice = self.l2_cache.get_or_load(host, || {
                    let mut buf = vec![0u8; slice_bytes as usize];
                    file.read_at(&mut buf, host)?;
                    Ok(buf.chunks_exact(8).map(|c| be64(c, 0)).collect())
                })?;
                // Entries of a shared table are shared too: drop COPIED in the copy.
                let mut v = slice.as_ref().clone();
                if !self.header.has_data_file() {
                    let step = if self.header.extended_l2() { 2 } else { 1 };
                    for w in v.iter_mut().step_by(step) {
                        *w &= !COPIED;
                    }
                }
                v
            };
            self.l2_cache.put_dirty(new + s * slice_bytes, contents);
        }
        if old != 0 {
            st.refs.free_later(old >> self.cluster_bits);
            st.l2_clusters.remove(&(old >> self.cluster_bits));
        }
        st.l2_clusters.insert(new >> self.cluster_bits);
        self.l1.write().unwrap()[l1i as usize] = new | COPIED;
        st.l1_dirty = true;
        Ok(new)
    }

    /// Rewrites the L2 entry (and bitmap) of guest cluster `gc`.
    fn set_entry(&self, st: &mut WriteState, gc: u64, entry: u64, bitmap: u64) -> Result<()> {
        if !st.marked_dirty && st.lazy {
            self.set_dirty_bit()?;
            st.marked_dirty = true;
        }
        let l1i = gc >> self.l2_bits;
        let table = self.l2_writable(st, l1i)?;
        let index = gc & (self.l2_entries() - 1);
        let slice_bytes = self.l2_cache.slice_bytes() as u64;
        let per_slice = slice_bytes / self.entry_bytes();
        let first = index / per_slice * per_slice;
        let host = table + first * self.entry_bytes();
        let (slice, _) = self.l2_slice(table, index)?;
        let mut v = slice.as_ref().clone();
        let i = (index - first) as usize;
        if self.header.extended_l2() {
            v[2 * i] = entry;
            v[2 * i + 1] = bitmap;
        } else {
            v[i] = entry;
        }
        self.l2_cache.put_dirty(host, v);
        Ok(())
    }

    fn set_dirty_bit(&self) -> Result<()> {
        let mut b = [0u8; 8];
        put64(
            &mut b,
            0,
            self.header.incompatible_features | incompat::DIRTY,
        );
        self.file.write_at(&b, 72)?;
        self.file.flush()
    }

    /// Queues the host clusters an entry references for freeing.
    fn free_entry(&self, st: &mut WriteState, entry: u64) {
        if self.header.has_data_file() {
            return;
        }
        match l2::classify(entry, self.header.extended_l2(), false) {
            ClusterType::Compressed(d) => {
                let desc = CompressedDesc::decode(d, self.cluster_bits);
                let (a, b) = desc.host_clusters(self.cluster_bits);
                for c in a..=b {
                    st.refs.free_later(c);
                }
            }
            ClusterType::Normal(h)
            | ClusterType::ZeroAlloc(h)
            | ClusterType::UnallocatedAlloc(h) => st.refs.free_later(h >> self.cluster_bits),
            _ => {}
        }
    }

    /// Waits until no other writer is allocating guest cluster `gc`, then claims it.
    fn claim<'a>(
        &'a self,
        mut g: std::sync::MutexGuard<'a, Option<WriteState>>,
        gc: u64,
    ) -> std::sync::MutexGuard<'a, Option<WriteState>> {
        while g.as_ref().unwrap().in_flight.contains(&gc) {
            g.as_mut().unwrap().waiters += 1;
            g = self.ws_cond.wait(g).unwrap();
            g.as_mut().unwrap().waiters -= 1;
        }
        g.as_mut().unwrap().in_flight.insert(gc);
        g
    }

    fn release(&self, g: &mut Option<WriteState>, gc: u64) {
        let st = g.as_mut().unwrap();
        st.in_flight.remove(&gc);
        self.wake(st);
    }

    /// Wakes the writers waiting for clusters in flight, if any.
    fn wake(&self, st: &WriteState) {
        if st.waiters > 0 {
            self.ws_cond.notify_all();
        }
    }

    /// Writes `data` at guest `offset`, which lies within one cluster.
    ///
    /// Three phases: decide and allocate under the lock (claiming the guest cluster),
    /// do the data I/O without it, then link the new mapping under the lock.
    fn write_in_cluster(&self, data: &[u8], offset: u64) -> Result<()> {
        let cs = self.cluster_size();
        let gc = offset >> self.cluster_bits;
        let guest_base = gc << self.cluster_bits;
        let a = offset & (cs - 1);
        let b = a + data.len() as u64;
        let ext = self.header.extended_l2();
        let df = self.header.has_data_file();
        let storage: &dyn Storage = self.data_storage()?;
        let unit = 1u64 << self.unit_bits;
        let (ua, ub) = (a / unit * unit, b.div_ceil(unit) * unit);
        let mask = {
            let (s, e) = ((ua / unit) as u32, (ub / unit) as u32);
            if e - s >= 32 {
                u32::MAX as u64
            } else {
                (((1u32 << (e - s)) - 1) << s) as u64
            }
        };

        // Phase 1.
        let g = self.ws()?;
        let mut g = self.claim(g, gc);
        let plan = (|| -> Result<Plan> {
            let (entry, bitmap) = self.entry_locked(gc)?;
            let kind = l2::classify(entry, ext, df);
            let copied = entry & COPIED != 0;
            if let ClusterType::Normal(h) = kind {
                if copied {
                    if !ext || bitmap & mask == mask {
                        return Ok(Plan::InPlace(h));
                    }
                    return Ok(Plan::Link {
                        host: h,
                        region: (ua, ub),
                        entry,
                        bitmap,
                        fresh: false,
                        extend: true,
                    });
                }
            }
            let reuse = match kind {
                ClusterType::ZeroAlloc(h) if copied => Some(h),
                _ => None,
            };
            let host = if df {
                guest_base
            } else if let Some(h) = reuse {
                h
            } else {
                // The L2 table first, then the data cluster: QEMU's allocation order, so
                // sequential writes get contiguous data clusters.
                let st = g.as_mut().unwrap();
                self.l2_writable(st, gc >> self.l2_bits)?;
                st.refs.alloc(self.file.as_ref(), 1)?
            };
            // With extended L2 and nothing to carry over, only the touched subclusters
            // need data; otherwise the whole cluster.
            let partial = ext && matches!(kind, ClusterType::Unallocated | ClusterType::ZeroPlain);
            let region = if partial { (ua, ub) } else { (0, cs) };
            Ok(Plan::Link {
                host,
                region,
                entry,
                bitmap,
                fresh: reuse.is_none() && !df,
                extend: partial,
            })
        })();
        let plan = match plan {
            Ok(p) => p,
            Err(e) => {
                self.release(&mut g, gc);
                return Err(e);
            }
        };
        // Data must never land on metadata, whatever the L2 entry says.
        let target = match plan {
            Plan::InPlace(h) if !df => Some((h + a, data.len() as u64)),
            Plan::Link { host, region, .. } if !df => Some((host + region.0, region.1 - region.0)),
            _ => None,
        };
        if let Some((at, len)) = target {
            if let Some(what) = self.overlap(g.as_ref().unwrap(), at, len, None) {
                self.release(&mut g, gc);
                return Err(Error::Corrupt(format!(
                    "Preventing invalid write on metadata (overlaps with {what})"
                )));
            }
        }
        if let Plan::InPlace(h) = plan {
            // Hold the I/O gate so a concurrent discard cannot free and reuse the cluster
            // before this write lands.
            let gate = self.io_gate.read().unwrap();
            self.release(&mut g, gc);
            drop(g);
            let r = match self.cipher_for_io()? {
                Some(c) => storage.write_at(&self.encrypt_copy(c, data, h + a, offset), h + a),
                None => storage.write_at(data, h + a),
            };
            drop(gate);
            return r;
        }
        let Plan::Link {
            host,
            region,
            entry,
            bitmap,
            fresh,
            extend,
        } = plan
        else {
            unreachable!()
        };
        drop(g);

        // Phase 2.
        let io = self
            .fill_region(guest_base, region.0, region.1, a, data)
            .and_then(|mut buf| {
                // Copy-on-write data is plaintext here (read through the cipher) and is
                // encrypted for its new host position.
                if let Some(c) = self.cipher_for_io()? {
                    buf = self.encrypt_copy(c, &buf, host + region.0, guest_base + region.0);
                }
                storage.write_at(&buf, host + region.0)
            });

        // Phase 3.
        let mut g = self.ws.lock().unwrap();
        let r = io.and_then(|()| {
            let st = g.as_mut().unwrap();
            let new_bitmap = if !ext {
                0
            } else if extend {
                (bitmap | mask) & !(mask << 32)
            } else {
                u32::MAX as u64
            };
            let new_entry = if extend && entry & COPIED != 0 {
                entry
            } else {
                host | COPIED
            };
            self.set_entry(st, gc, new_entry, new_bitmap)?;
            if fresh {
                self.free_entry(st, entry);
            }
            Ok(())
        });
        if r.is_err() && fresh {
            g.as_mut()
                .unwrap()
                .refs
                .free_later(host >> self.cluster_bits);
        }
        self.release(&mut g, gc);
        drop(g);
        r?;
        self.maybe_flush()
    }

    /// The bytes `[ra, rb)` of cluster `guest_base` as the guest sees them now, with
    /// `data` laid over `[a, a+len)`.
    fn fill_region(
        &self,
        guest_base: u64,
        ra: u64,
        rb: u64,
        a: u64,
        data: &[u8],
    ) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; (rb - ra) as usize];
        let end = a + data.len() as u64;
        if !(a == ra && end == rb) {
            // Clip to the virtual size: the tail of the last cluster reads as zeros.
            let vlen = self.header.size;
            let from = guest_base + ra;
            let n = (rb - ra).min(vlen.saturating_sub(from));
            if n > 0 {
                self.read_at(&mut buf[..n as usize], from)?;
            }
        }
        buf[(a - ra) as usize..(end - ra) as usize].copy_from_slice(data);
        Ok(buf)
    }

    fn maybe_flush(&self) -> Result<()> {
        if self.l2_cache.dirty_count() > MAX_DIRTY_SLICES {
            self.flush_metadata(false)?;
        }
        Ok(())
    }

    /// Writes the guest cluster at `offset` (cluster aligned) compressed with the
    /// image's compression type, as QEMU's compressed writes do: `data` is the whole
    /// cluster, or the rest of the image when the cluster is the last and partial. The
    /// cluster must not be allocated yet (compression never overwrites). Data that does
    /// not compress is written normally.
    ///
    /// Ordering as for every write: the compressed bytes are written before the L2 entry
    /// changes in memory, and the flush writes the refcounts before the L2 table.
    pub fn write_compressed(&self, data: &[u8], offset: u64) -> Result<()> {
        self.guard(|| self.write_compressed_inner(data, offset))
    }

    fn write_compressed_inner(&self, data: &[u8], offset: u64) -> Result<()> {
        let cs = self.cluster_size();
        self.check_range(offset, data.len() as u64)?;
        if self.encrypted() {
            // Compressed clusters are never encrypted (QEMU reads them as they are and,
            // with `convert -c -n`, even writes them so): that would put guest data on
            // disk in clear, so qimg refuses.
            return Err(Error::unsupported(
                "Compression is not supported for encrypted images",
            ));
        }
        if offset & (cs - 1) != 0
            || (data.len() as u64 != cs && offset + data.len() as u64 != self.len())
            || data.len() as u64 > cs
        {
            return Err(Error::InvalidArgument(
                "Compressed writes must cover one whole cluster".into(),
            ));
        }
        if self.header.has_data_file() {
            return Err(Error::unsupported(
                "Compression is not supported with external data files",
            ));
        }
        let mut full = data.to_vec();
        full.resize(cs as usize, 0);
        let Some(packed) = super::compress::compress(self.header.compression(), &full)? else {
            return self.do_write(data, offset);
        };
        self.bm_note_write(offset, data.len() as u64)?;
        let gc = offset >> self.cluster_bits;
        let ext = self.header.extended_l2();
        let len = packed.len() as u64;
        let g = self.ws()?;
        let mut g = self.claim(g, gc);
        let host = (|| -> Result<u64> {
            let (entry, _) = self.entry_locked(gc)?;
            if !matches!(
                l2::classify(entry, ext, false),
                ClusterType::Unallocated | ClusterType::ZeroPlain
            ) {
                return Err(Error::InvalidArgument(
                    "Compression can't overwrite anything".into(),
                ));
            }
            let st = g.as_mut().unwrap();
            // The L2 table first, then the bytes: QEMU's allocation order.
            self.l2_writable(st, gc >> self.l2_bits)?;
            let host = st.refs.alloc_bytes(self.file.as_ref(), len)?;
            if let Some(what) = self.overlap(st, host, len, None) {
                return Err(Error::Corrupt(format!(
                    "Preventing invalid write on metadata (overlaps with {what})"
                )));
            }
            Ok(host)
        })();
        let host = match host {
            Ok(h) => h,
            Err(e) => {
                self.release(&mut g, gc);
                return Err(e);
            }
        };
        drop(g);
        let io = self.file.write_at(&packed, host);
        let entry = l2::COMPRESSED | CompressedDesc::encode(host, len, self.cluster_bits);
        let mut g = self.ws.lock().unwrap();
        let r = io.and_then(|()| self.set_entry(g.as_mut().unwrap(), gc, entry, 0));
        if r.is_err() {
            // The references the allocation took go again.
            self.free_entry(g.as_mut().unwrap(), entry);
        }
        self.release(&mut g, gc);
        drop(g);
        r?;
        self.maybe_flush()
    }

    pub(crate) fn do_write(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.guard(|| self.do_write_inner(buf, offset))
    }

    fn do_write_inner(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        if self.cipher_for_io()?.is_some() && !(offset | buf.len() as u64).is_multiple_of(512) {
            // Encryption works on whole sectors: merge a partial one with what it holds.
            let _rmw = self.rmw_lock.lock().unwrap();
            let a = offset & !511;
            let b = (offset + buf.len() as u64).div_ceil(512) * 512;
            let mut whole = vec![0u8; (b - a) as usize];
            // check_range keeps the request inside len(), a multiple of 512, so b is too.
            self.read_at(&mut whole, a)?;
            whole[(offset - a) as usize..(offset - a) as usize + buf.len()].copy_from_slice(buf);
            return self.do_write_inner(&whole, a);
        }
        // Dirty bitmaps record the request before any of it can reach the disk.
        self.bm_note_write(offset, buf.len() as u64)?;
        let cs = self.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            // Whole clusters that all need new space go in one allocation and one write.
            if pos & (cs - 1) == 0 && buf.len() - done >= 2 * cs as usize {
                let whole = (buf.len() - done) / cs as usize;
                let n = self.write_fresh_run(&buf[done..done + whole * cs as usize], pos)?;
                if n > 0 {
                    done += n * cs as usize;
                    continue;
                }
            }
            // Clusters already ours and contiguous on the host: one write for the run.
            let n = self.write_inplace_run(&buf[done..], pos)?;
            if n > 0 {
                done += n;
                continue;
            }
            let n = ((cs - (pos & (cs - 1))) as usize).min(buf.len() - done);
            self.write_in_cluster(&buf[done..done + n], pos)?;
            done += n;
        }
        Ok(())
    }

    /// Writes the longest prefix of `data` (at guest `offset`) that lands in clusters
    /// overwritable in place (allocated, exclusively ours, and with extended L2 the touched
    /// subclusters allocated) and contiguous on the host, with one write. Returns the
    /// bytes written (0: the first cluster needs the general path).
    ///
    /// The decision is taken under the metadata lock, as `write_in_cluster` does for one
    /// cluster; the I/O gate is then held across the write so that no cluster of the run
    /// can be freed and reused before the data lands.
    fn write_inplace_run(&self, data: &[u8], offset: u64) -> Result<usize> {
        let cs = self.cluster_size();
        let ext = self.header.extended_l2();
        let df = self.header.has_data_file();
        let unit = 1u64 << self.unit_bits;
        let end = offset + data.len() as u64;
        let g = self.ws()?;
        let st = g.as_ref().unwrap();
        let mut start_host = None;
        let mut pos = offset;
        while pos < end {
            let gc = pos >> self.cluster_bits;
            if st.in_flight.contains(&gc) {
                break;
            }
            let (entry, bitmap) = self.entry_locked(gc)?;
            let ClusterType::Normal(h) = l2::classify(entry, ext, df) else {
                break;
            };
            if entry & COPIED == 0 {
                break;
            }
            let a = pos & (cs - 1);
            let b = (a + (end - pos)).min(cs);
            if ext {
                let (s, e) = ((a / unit) as u32, (b.div_ceil(unit)) as u32);
                let mask = if e - s >= 32 {
                    u32::MAX as u64
                } else {
                    (((1u32 << (e - s)) - 1) << s) as u64
                };
                if bitmap & mask != mask {
                    break;
                }
            }
            match start_host {
                None => start_host = Some(h + a),
                Some(s0) if s0 + (pos - offset) == h + a => {}
                Some(_) => break,
            }
            pos += b - a;
        }
        let Some(host) = start_host else {
            return Ok(0);
        };
        let len = pos - offset;
        if !df {
            if let Some(what) = self.overlap(st, host, len, None) {
                return Err(Error::Corrupt(format!(
                    "Preventing invalid write on metadata (overlaps with {what})"
                )));
            }
        }
        let gate = self.io_gate.read().unwrap();
        drop(g);
        let r = match self.cipher_for_io()? {
            Some(c) => self.data_storage()?.write_at(
                &self.encrypt_copy(c, &data[..len as usize], host, offset),
                host,
            ),
            None => self.data_storage()?.write_at(&data[..len as usize], host),
        };
        drop(gate);
        r?;
        Ok(len as usize)
    }

    /// Writes a prefix of `data` (whole clusters at cluster-aligned `offset`) whose
    /// clusters all need a fresh host cluster, within one L2 table: one contiguous
    /// allocation, one data write, then all L2 entries at once. Returns the number of
    /// clusters written (0: the first cluster needs the general path).
    fn write_fresh_run(&self, data: &[u8], offset: u64) -> Result<usize> {
        let cs = self.cluster_size();
        let df = self.header.has_data_file();
        if df {
            return Ok(0);
        }
        let ext = self.header.extended_l2();
        let gc0 = offset >> self.cluster_bits;
        let max = (data.len() as u64 / cs).min(self.l2_entries() - (gc0 & (self.l2_entries() - 1)));
        // Phase 1: claim the clusters that qualify and allocate space for them.
        let mut g = self.ws()?;
        let mut olds = Vec::new();
        for k in 0..max {
            let gc = gc0 + k;
            let st = g.as_ref().unwrap();
            if st.in_flight.contains(&gc) {
                break;
            }
            let (entry, _) = self.entry_locked(gc)?;
            let fresh = match l2::classify(entry, ext, false) {
                ClusterType::Normal(_) | ClusterType::ZeroAlloc(_) => entry & COPIED == 0,
                _ => true,
            };
            if !fresh {
                break;
            }
            olds.push(entry);
        }
        let n = olds.len() as u64;
        if n < 2 {
            return Ok(0);
        }
        let host = {
            let st = g.as_mut().unwrap();
            for k in 0..n {
                st.in_flight.insert(gc0 + k);
            }
            let r = self
                .l2_writable(st, gc0 >> self.l2_bits)
                .and_then(|_| st.refs.alloc(self.file.as_ref(), n));
            match r {
                Ok(h) => h,
                Err(e) => {
                    for k in 0..n {
                        st.in_flight.remove(&(gc0 + k));
                    }
                    self.wake(st);
                    return Err(e);
                }
            }
        };
        if let Some(what) = self.overlap(g.as_ref().unwrap(), host, n * cs, None) {
            let st = g.as_mut().unwrap();
            for k in 0..n {
                st.in_flight.remove(&(gc0 + k));
            }
            self.wake(st);
            return Err(Error::Corrupt(format!(
                "Preventing invalid write on metadata (overlaps with {what})"
            )));
        }
        drop(g);
        // Phase 2: the data, in one write.
        let io = match self.cipher_for_io() {
            Ok(Some(c)) => self.file.write_at(
                &self.encrypt_copy(c, &data[..(n * cs) as usize], host, offset),
                host,
            ),
            Ok(None) => self.file.write_at(&data[..(n * cs) as usize], host),
            Err(e) => Err(e),
        };
        // Phase 3: link every cluster, one slice copy per L2 slice.
        let mut g = self.ws.lock().unwrap();
        let st = g.as_mut().unwrap();
        let r = io.and_then(|()| {
            let entries: Vec<(u64, u64, u64)> = (0..n)
                .map(|k| {
                    (
                        gc0 + k,
                        (host + k * cs) | COPIED,
                        if ext { u32::MAX as u64 } else { 0 },
                    )
                })
                .collect();
            self.set_entries(st, &entries)?;
            for e in &olds {
                self.free_entry(st, *e);
            }
            Ok(())
        });
        if r.is_err() {
            for k in 0..n {
                st.refs.free_later((host >> self.cluster_bits) + k);
            }
        }
        for k in 0..n {
            st.in_flight.remove(&(gc0 + k));
        }
        self.wake(st);
        drop(g);
        r?;
        self.maybe_flush()?;
        Ok(n as usize)
    }

    /// Rewrites several L2 entries of one L2 table, copying each cached slice once.
    fn set_entries(&self, st: &mut WriteState, entries: &[(u64, u64, u64)]) -> Result<()> {
        let mut i = 0;
        while i < entries.len() {
            let gc = entries[i].0;
            self.set_entry(st, gc, entries[i].1, entries[i].2)?;
            // The rest of this slice: patch the copy set_entry just installed.
            let l1i = gc >> self.l2_bits;
            let table = self.l2_writable(st, l1i)?;
            let slice_bytes = self.l2_cache.slice_bytes() as u64;
            let per_slice = slice_bytes / self.entry_bytes();
            let index = gc & (self.l2_entries() - 1);
            let first = index / per_slice * per_slice;
            let (slice, _) = self.l2_slice(table, index)?;
            let mut v = slice.as_ref().clone();
            let mut j = i + 1;
            while j < entries.len() {
                let (gj, ej, bj) = entries[j];
                let ij = gj & (self.l2_entries() - 1);
                if gj >> self.l2_bits != l1i || ij / per_slice * per_slice != first {
                    break;
                }
                let k = (ij - first) as usize;
                if self.header.extended_l2() {
                    v[2 * k] = ej;
                    v[2 * k + 1] = bj;
                } else {
                    v[k] = ej;
                }
                j += 1;
            }
            if j > i + 1 {
                self.l2_cache
                    .put_dirty(table + first * self.entry_bytes(), v);
            }
            i = j;
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > self.len()) {
            return Err(Error::InvalidArgument(format!(
                "Request out of range: offset {offset} length {len} (image size {})",
                self.len()
            )));
        }
        Ok(())
    }

    /// Zeroes or discards whole clusters `[first, first+count)`.
    fn zero_clusters(&self, first: u64, count: u64, unmap: bool, discard: bool) -> Result<()> {
        self.zero_clusters_mode(first, count, unmap, discard, false)
    }

    /// Clears the L2 entries of clusters `[first, first+count)` to 0 ("full discard", as
    /// QEMU's `make_empty` does when it cannot rebuild the image): the clusters read from
    /// the backing file again.
    pub(crate) fn clear_entries(&self, first: u64, count: u64) -> Result<()> {
        self.zero_clusters_mode(first, count, true, true, true)
    }

    fn zero_clusters_mode(
        &self,
        first: u64,
        count: u64,
        unmap: bool,
        discard: bool,
        full: bool,
    ) -> Result<()> {
        let ext = self.header.extended_l2();
        let df = self.header.has_data_file();
        let v3 = self.header.version >= 3;
        for gc in first..first + count {
            let g = self.ws()?;
            let mut g = self.claim(g, gc);
            let r = (|| -> Result<()> {
                let (entry, bitmap) = self.entry_locked(gc)?;
                let kind = l2::classify(entry, ext, df);
                let st = g.as_mut().unwrap();
                let copied = entry & COPIED != 0;
                let keep = v3
                    && !unmap
                    && !discard
                    && copied
                    && matches!(kind, ClusterType::Normal(_) | ClusterType::ZeroAlloc(_));
                let (new, nb) = if full {
                    (0, 0)
                } else if !v3 {
                    // v2 has no zero flag: deallocate (callers only get here without a
                    // backing file, or for discard, where exposing the backing is allowed).
                    (0, 0)
                } else if ext {
                    if keep {
                        (entry, 0xffff_ffff_0000_0000)
                    } else {
                        (0, 0xffff_ffff_0000_0000)
                    }
                } else if keep {
                    (entry | ZERO, 0)
                } else {
                    (ZERO, 0)
                };
                if (new, nb) == (entry, bitmap) {
                    return Ok(());
                }
                self.set_entry(st, gc, new, nb)?;
                if !keep {
                    self.free_entry(st, entry);
                }
                Ok(())
            })();
            self.release(&mut g, gc);
            r?;
        }
        self.maybe_flush()
    }

    pub(crate) fn do_write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.guard(|| self.do_write_zeroes_inner(offset, len, may_unmap))
    }

    fn do_write_zeroes_inner(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check_range(offset, len)?;
        self.bm_note_write(offset, len)?;
        let raw_df =
            self.header.autoclear_features & crate::ondisk::header::autoclear::DATA_FILE_RAW != 0;
        let cs = self.cluster_size();
        let end = offset + len;
        // A raw data file must always hold the guest view: write the zeros there.
        let v2_backed = self.header.version < 3 && self.backing.is_some();
        if raw_df || v2_backed {
            return self.write_real_zeroes(offset, len);
        }
        let first_full = offset.div_ceil(cs);
        let last_full = end / cs;
        // The last cluster of an image may be short: treat it as whole when the range
        // reaches the end of the image.
        let last_full = if end == self.len() && !end.is_multiple_of(cs) {
            last_full + 1
        } else {
            last_full
        };
        if first_full >= last_full {
            return self.write_real_zeroes(offset, len);
        }
        if offset < first_full * cs {
            self.write_real_zeroes(offset, first_full * cs - offset)?;
        }
        self.zero_clusters(first_full, last_full - first_full, may_unmap, false)?;
        let tail = (last_full * cs).min(end);
        if tail < end {
            self.write_real_zeroes(tail, end - tail)?;
        }
        Ok(())
    }

    fn write_real_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64);
            self.do_write(&zeros[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }

    pub(crate) fn do_discard(&self, offset: u64, len: u64) -> Result<()> {
        self.guard(|| self.do_discard_inner(offset, len))
    }

    fn do_discard_inner(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        // QEMU marks the whole requested range, even the parts too small to discard.
        self.bm_note_write(offset, len)?;
        let cs = self.cluster_size();
        let end = offset + len;
        let first = offset.div_ceil(cs);
        let last = if end == self.len() {
            end.div_ceil(cs)
        } else {
            end / cs
        };
        if first >= last {
            return Ok(());
        }
        self.zero_clusters(first, last - first, true, true)?;
        if let Some(d) = &self.data_file {
            d.punch_hole(first * cs, (last - first) * cs)?;
        }
        Ok(())
    }

    /// Writes all cached metadata in dependency order (module docs) and syncs.
    pub(crate) fn flush_metadata(&self, closing: bool) -> Result<()> {
        let _f = self.flush_lock.lock().unwrap();
        let file = self.file.as_ref();
        let (blocks, slices, l1, frees, lazy) = {
            let mut g = self.ws.lock().unwrap();
            let Some(st) = g.as_mut() else { return Ok(()) };
            let lazy = st.lazy && !closing;
            let blocks = if lazy {
                Vec::new()
            } else {
                st.refs.dirty_blocks()
            };
            let slices = self.l2_cache.dirty_snapshot();
            let l1 = if st.l1_dirty {
                st.l1_dirty = false;
                Some(self.l1.read().unwrap().clone())
            } else {
                None
            };
            let slice_bytes = self.l2_cache.slice_bytes() as u64;
            for (host, _) in &slices {
                if let Some(what) = self.overlap(st, *host, slice_bytes, Some("active L2 table")) {
                    let msg =
                        format!("Preventing invalid write on metadata (overlaps with {what})");
                    drop(g);
                    return Err(self.signal_corruption(&msg));
                }
            }
            (blocks, slices, l1, st.refs.take_pending(), lazy)
        };
        if let Some(d) = &self.data_file {
            d.flush()?;
        }
        Refcounts::write_blocks(file, &blocks)?;
        file.flush()?;
        let entry_bytes = self.l2_cache.slice_bytes();
        for (host, words) in &slices {
            let mut buf = vec![0u8; entry_bytes];
            for (i, w) in words.iter().enumerate() {
                put64(&mut buf, i * 8, *w);
            }
            file.write_at(&buf, *host)?;
        }
        if !slices.is_empty() {
            file.flush()?;
        }
        if let Some(l1) = &l1 {
            let mut buf = vec![0u8; l1.len() * 8];
            for (i, e) in l1.iter().enumerate() {
                put64(&mut buf, i * 8, *e);
            }
            file.write_at(&buf, self.header.l1_table_offset)?;
            file.flush()?;
        }
        self.l2_cache.mark_clean(&slices);
        let mut g = self.ws.lock().unwrap();
        let st = g.as_mut().unwrap();
        st.refs.mark_written(&blocks);
        if !frees.is_empty() {
            // Wait for in-place writers that may still target clusters being freed.
            drop(self.io_gate.write().unwrap());
            st.refs.apply_frees(file, &frees)?;
            if !lazy {
                let more = st.refs.dirty_blocks();
                Refcounts::write_blocks(file, &more)?;
                file.flush()?;
                st.refs.mark_written(&more);
            }
        }
        if closing && st.marked_dirty && !st.refs.has_dirty() {
            let mut b = [0u8; 8];
            put64(
                &mut b,
                0,
                self.header.incompatible_features & !incompat::DIRTY,
            );
            file.write_at(&b, 72)?;
            file.flush()?;
            st.marked_dirty = false;
        }
        Ok(())
    }

    /// Flushes everything and clears the dirty bit; call before dropping a writable image
    /// to see errors (drop does the same but can only ignore them).
    pub fn close(&self) -> Result<()> {
        // Bitmaps first: storing them allocates clusters, whose refcounts the final
        // flush writes (QEMU's qcow2_inactivate order).
        self.bm_store()?;
        self.flush_metadata(true)
    }
}
