//! A streaming writer for images being built by `convert`.
//!
//! Data clusters are appended (or overwritten in place where the target already maps a
//! cluster with refcount one, as after metadata preallocation); L2 tables are kept in
//! memory and the refcount structure is rebuilt from the references at [`Qcow2Writer::finish`].
//!
//! Ordering at finish: L2 tables and a complete new refcount structure (which already
//! counts every cluster the new L1 will reference) are written and flushed first; the
//! header switch to the new refcount table is one 12-byte write; the L1 table is written
//! last. A crash before the end therefore leaves at most leaked clusters behind the old
//! refcount structure, never a reference to a cluster counted as free.
//!
//! This writer is for targets that no one else uses while convert runs; guest writes to
//! live images go through the write engine.

use super::{Qcow2, Qcow2Options};
use crate::buf::is_zero;
use crate::error::{Error, Result};
use crate::ondisk::header::{CompressionType, Header};
use crate::ondisk::l2::{self, ClusterType, CompressedDesc, COPIED};
use crate::ondisk::{put32, put64, refcount};
use crate::storage::Storage;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

/// The non-zero blocks of a chunk, found by [`Qcow2Writer::plan_sparse`].
#[derive(Debug, Default)]
pub struct SparsePlan {
    /// (cluster index, start, end) relative to the chunk, in order.
    runs: Vec<(usize, usize, usize)>,
}

/// Where the blocks of a [`SparsePlan`] go on the host, from [`Qcow2Writer::place`].
#[derive(Debug, Default)]
pub struct Placement {
    /// (start, end) in the chunk and the host offset of `start`.
    writes: Vec<(usize, usize, u64)>,
}

impl Placement {
    /// (start, end) in the chunk and the host offset of `start`, for each stored range.
    pub fn writes(&self) -> &[(usize, usize, u64)] {
        &self.writes
    }
}

/// Appends data to a qcow2 image opened for conversion.
pub struct Qcow2Writer {
    file: Arc<dyn Storage>,
    data_file: Option<Arc<dyn Storage>>,
    header: Header,
    cluster_bits: u32,
    l2_bits: u32,
    ext_l2: bool,
    state: Mutex<State>,
}

impl std::fmt::Debug for Qcow2Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Writer")
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct State {
    next_free: u64,
    l1: Vec<u64>,
    /// L2 tables as raw words (two per entry with extended L2), by L1 index.
    l2: HashMap<u64, Vec<u64>>,
    dirty: BTreeSet<u64>,
    /// End of the last uncompressed cluster allocated: QEMU's file always covers the
    /// whole cluster, even when its tail was never written.
    data_end: u64,
    /// Where the next compressed stream may start (byte granular) and the end of the
    /// cluster it is in.
    compressed_pos: Option<(u64, u64)>,
}

impl Qcow2Writer {
    /// Takes over an open image (which must not have snapshots, bitmaps or encryption,
    /// since the refcount rebuild would not count them).
    pub fn new(img: Qcow2) -> Result<Qcow2Writer> {
        let h = img.header().clone();
        if h.nb_snapshots > 0 || h.bitmaps.is_some() || h.crypt_method != 0 {
            return Err(Error::unsupported(
                "converting into an image with snapshots, bitmaps or encryption is not supported yet",
            ));
        }
        let cs = img.cluster_size();
        let file = img.file().clone();
        let mut l2_tables = HashMap::new();
        for (i, &e) in img.l1().iter().enumerate() {
            let off = l2::l1_offset(e);
            if off != 0 {
                let mut buf = vec![0u8; cs as usize];
                file.read_at(&mut buf, off)?;
                l2_tables.insert(
                    i as u64,
                    buf.chunks_exact(8)
                        .map(|c| crate::ondisk::be64(c, 0))
                        .collect(),
                );
            }
        }
        let next_free = file.len()?.div_ceil(cs) * cs;
        Ok(Qcow2Writer {
            data_file: img.data_file().cloned(),
            file,
            cluster_bits: h.cluster_bits,
            l2_bits: img.l2_bits,
            ext_l2: h.extended_l2(),
            state: Mutex::new(State {
                next_free,
                l1: img.l1().to_vec(),
                l2: l2_tables,
                dirty: BTreeSet::new(),
                data_end: 0,
                compressed_pos: None,
            }),
            header: h,
        })
    }

    /// Opens `file` (and its data file) as a conversion target.
    pub fn open(
        file: Arc<dyn Storage>,
        data_file: Option<Arc<dyn Storage>>,
    ) -> Result<Qcow2Writer> {
        let mut img = Qcow2::open(
            file,
            Qcow2Options {
                writable: true,
                check: false,
                ..Default::default()
            },
        )?;
        if let Some(d) = data_file {
            img.set_data_file(d);
        } else if img.header().has_data_file() {
            return Err(Error::invalid("'data-file' is required for this image"));
        }
        Qcow2Writer::new(img)
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The image header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    fn entry_index(&self, guest: u64) -> (u64, usize) {
        let l1i = guest >> (self.cluster_bits + self.l2_bits);
        let l2i = ((guest >> self.cluster_bits) & ((1 << self.l2_bits) - 1)) as usize;
        (l1i, l2i)
    }

    fn words_per_entry(&self) -> usize {
        if self.ext_l2 {
            2
        } else {
            1
        }
    }

    /// Gets (creating in memory) the L2 table for an L1 index.
    fn table<'a>(&self, st: &'a mut State, l1i: u64) -> Result<&'a mut Vec<u64>> {
        if l1i as usize >= st.l1.len() {
            return Err(Error::InvalidArgument(
                "write beyond the end of the image".into(),
            ));
        }
        st.dirty.insert(l1i);
        // A new table gets its cluster now, before the data that needs it, which is where
        // QEMU puts it too (and keeps converted files as long as QEMU's).
        if l2::l1_offset(st.l1[l1i as usize]) == 0 {
            st.l1[l1i as usize] = st.next_free | COPIED;
            st.next_free += self.cluster_size();
        }
        let n = (self.cluster_size() / 8) as usize;
        Ok(st.l2.entry(l1i).or_insert_with(|| vec![0u64; n]))
    }

    /// Writes whole clusters starting at cluster-aligned guest offset `guest`; `data` is a
    /// multiple of the cluster size, except that the image's last cluster may be short.
    pub fn write_clusters(&self, guest: u64, data: &[u8]) -> Result<()> {
        let cs = self.cluster_size();
        debug_assert_eq!(guest % cs, 0);
        let n = (data.len() as u64).div_ceil(cs);
        let mut hosts = Vec::with_capacity(n as usize);
        {
            let mut st = self.state.lock().unwrap();
            for i in 0..n {
                let g = guest + i * cs;
                let (l1i, l2i) = self.entry_index(g);
                let w = self.words_per_entry();
                let ext = self.ext_l2;
                let has_df = self.data_file.is_some();
                self.table(&mut st, l1i)?;
                let mut next_free = st.next_free;
                let t = st.l2.get_mut(&l1i).expect("table() created it");
                let e = t[l2i * w];
                let host = match l2::classify(e, ext, has_df) {
                    ClusterType::Normal(h) | ClusterType::ZeroAlloc(h) if e & COPIED != 0 => h,
                    _ if has_df => g,
                    _ => {
                        let h = next_free;
                        next_free += cs;
                        h
                    }
                };
                if !has_df {
                    st.data_end = st.data_end.max(host + cs);
                }
                let t = st.l2.get_mut(&l1i).expect("table() created it");
                t[l2i * w] = host | COPIED;
                if ext {
                    // A short last cluster allocates only the subclusters it covers.
                    let len = (data.len() as u64 - i * cs).min(cs);
                    let subs = len.div_ceil(cs / 32);
                    t[l2i * w + 1] = if subs >= 32 {
                        0xffff_ffff
                    } else {
                        (1u64 << subs) - 1
                    };
                }
                st.next_free = next_free;
                hosts.push(host);
            }
        }
        let target = self.data_storage().as_ref();
        // One write per physically contiguous run.
        let mut i = 0usize;
        while i < hosts.len() {
            let mut j = i + 1;
            while j < hosts.len() && hosts[j] == hosts[j - 1] + cs {
                j += 1;
            }
            let start = i * cs as usize;
            let end = (j * cs as usize).min(data.len());
            target.write_at(&data[start..end], hosts[i])?;
            i = j;
        }
        Ok(())
    }

    /// Writes the non-zero parts of `data` (cluster-aligned at `guest`), detected in blocks
    /// of `gran` bytes within each cluster, onto a target that reads as zeros: clusters
    /// without data stay unallocated, and zero blocks inside a written cluster are left
    /// unwritten (holes in the file; unallocated subclusters with extended L2), as
    /// qemu-img's sparse convert leaves them.
    pub fn write_sparse(&self, guest: u64, data: &[u8], gran: usize) -> Result<()> {
        let plan = self.plan_sparse(data, gran);
        let placed = self.place(guest, &plan)?;
        self.write_placed(data, &placed)
    }

    /// A plan that stores exactly `ranges` (start, end) of a chunk, in order and not
    /// overlapping, whatever their content: `convert -C` decides what to store from the
    /// source's block status rather than by looking for zeros.
    pub fn plan_ranges(&self, ranges: &[(usize, usize)]) -> SparsePlan {
        let cs = self.cluster_size() as usize;
        let mut runs = Vec::new();
        for &(a, b) in ranges {
            let mut x = a;
            while x < b {
                let ci = x / cs;
                let y = b.min((ci + 1) * cs);
                runs.push((ci, x, y));
                x = y;
            }
        }
        SparsePlan { runs }
    }

    /// Where guest data goes: the external data file, or the image file.
    pub fn data_storage(&self) -> &Arc<dyn Storage> {
        self.data_file.as_ref().unwrap_or(&self.file)
    }

    /// The first step of [`Qcow2Writer::write_sparse`], which needs no lock: finds the
    /// non-zero blocks of `data`. Parallel converters run it before taking their turn.
    pub fn plan_sparse(&self, data: &[u8], gran: usize) -> SparsePlan {
        let cs = self.cluster_size() as usize;
        let gran = gran.clamp(1, cs);
        let mut runs: Vec<(usize, usize, usize)> = Vec::new();
        for (ci, cl) in data.chunks(cs).enumerate() {
            let base = ci * cs;
            let mut off = 0;
            while off < cl.len() {
                let end = (off + gran).min(cl.len());
                if !is_zero(&cl[off..end]) {
                    match runs.last_mut() {
                        Some((c, _, e)) if *c == ci && *e == base + off => *e = base + end,
                        _ => runs.push((ci, base + off, base + end)),
                    }
                }
                off = end;
            }
        }
        SparsePlan { runs }
    }

    /// The second step: allocates host clusters for a plan at cluster-aligned `guest` and
    /// records them in the in-memory L2 tables. Calls must come in guest order for the
    /// layout to match QEMU's; the data writes that follow need not.
    pub fn place(&self, guest: u64, plan: &SparsePlan) -> Result<Placement> {
        let cs = self.cluster_size() as usize;
        debug_assert_eq!(guest % cs as u64, 0);
        let runs = &plan.runs;
        let mut writes = Vec::new();
        if runs.is_empty() {
            return Ok(Placement { writes });
        }
        let sub = (cs / 32).max(1);
        let mut hosts: Vec<(usize, u64)> = Vec::new();
        {
            let mut st = self.state.lock().unwrap();
            let w = self.words_per_entry();
            let ext = self.ext_l2;
            let has_df = self.data_file.is_some();
            for &(ci, a, b) in runs {
                let g = guest + (ci * cs) as u64;
                let (l1i, l2i) = self.entry_index(g);
                self.table(&mut st, l1i)?;
                match hosts.last() {
                    Some(&(c, _)) if c == ci => {}
                    _ => {
                        let mut next_free = st.next_free;
                        let t = st.l2.get_mut(&l1i).expect("table() created it");
                        let e = t[l2i * w];
                        let h = match l2::classify(e, ext, has_df) {
                            ClusterType::Normal(h) | ClusterType::ZeroAlloc(h)
                                if e & COPIED != 0 =>
                            {
                                h
                            }
                            _ if has_df => g,
                            _ => {
                                let h = next_free;
                                next_free += cs as u64;
                                h
                            }
                        };
                        t[l2i * w] = h | COPIED;
                        if ext {
                            t[l2i * w + 1] = 0;
                        }
                        st.next_free = next_free;
                        if !has_df && !ext {
                            st.data_end = st.data_end.max(h + cs as u64);
                        }
                        hosts.push((ci, h));
                    }
                }
                if ext {
                    let t = st.l2.get_mut(&l1i).expect("table exists");
                    let (ra, rb) = (a - ci * cs, b - ci * cs);
                    for sc in ra / sub..rb.div_ceil(sub) {
                        t[l2i * w + 1] |= 1 << sc;
                    }
                }
            }
        }
        // Runs are in cluster order and `hosts` has one entry per cluster with a run, so
        // the host of a run is found by walking both together.
        let mut hi = 0;
        let mut host_of = |ci: usize| {
            while hosts[hi].0 != ci {
                hi += 1;
            }
            hosts[hi].1
        };
        // Coalesce runs that are contiguous both in the guest and on the host.
        let mut i = 0;
        while i < runs.len() {
            let (ci, a, mut b) = runs[i];
            let h = host_of(ci) + (a - ci * cs) as u64;
            let mut j = i + 1;
            while j < runs.len() {
                let (cj, aj, bj) = runs[j];
                if aj == b && host_of(cj) + (aj - cj * cs) as u64 == h + (b - a) as u64 {
                    b = bj;
                    j += 1;
                } else {
                    break;
                }
            }
            writes.push((a, b, h));
            i = j;
        }
        Ok(Placement { writes })
    }

    /// The last step: writes the data of a placed plan. Runs concurrently with other
    /// chunks' steps; the metadata pointing at these clusters is only written by `finish`.
    pub fn write_placed(&self, data: &[u8], placed: &Placement) -> Result<()> {
        let target = self.data_storage().as_ref();
        for &(a, b, h) in &placed.writes {
            // Reserving the run in one call is cheaper for the filesystem than the block
            // by block reservation of a buffered write into a hole (about a third of the
            // writing thread's time on ext4), and the allocation is the same.
            target.preallocate(h, (b - a) as u64);
            target.write_at(&data[a..b], h)?;
        }
        Ok(())
    }

    /// Stores one cluster compressed (or uncompressed when that is not smaller), packing
    /// compressed streams at byte granularity as QEMU does.
    pub fn write_compressed(
        &self,
        guest: u64,
        compressed: Option<&[u8]>,
        raw: &[u8],
    ) -> Result<()> {
        let Some(c) = compressed else {
            return self.write_clusters(guest, raw);
        };
        if self.data_file.is_some() {
            return Err(Error::unsupported(
                "Compression is not supported with an external data file",
            ));
        }
        let cs = self.cluster_size();
        let off = {
            let mut st = self.state.lock().unwrap();
            let (l1i, _) = self.entry_index(guest);
            self.table(&mut st, l1i)?;
            let (mut pos, mut end) = st.compressed_pos.unwrap_or((0, 0));
            let len = c.len() as u64;
            if pos == 0 || pos + len > end {
                // Streams are packed back to back and may run into the next cluster when
                // that is the next one allocated (as QEMU packs them); otherwise start a
                // fresh cluster.
                if pos == 0 || end != st.next_free {
                    pos = st.next_free;
                    end = pos;
                }
                while pos + len > end {
                    end += cs;
                }
                st.next_free = end;
            }
            let (l1i, l2i) = self.entry_index(guest);
            let w = self.words_per_entry();
            let bits = self.cluster_bits;
            let t = self.table(&mut st, l1i)?;
            t[l2i * w] = l2::COMPRESSED | CompressedDesc::encode(pos, c.len() as u64, bits);
            if self.ext_l2 {
                t[l2i * w + 1] = 0;
            }
            st.compressed_pos = Some((pos + c.len() as u64, end));
            pos
        };
        self.file.write_at(c, off)
    }

    /// Marks whole clusters as reading zeros. On a fresh image without a backing file
    /// nothing needs to change; otherwise v3 images get the zero flag and v2 images real
    /// zeros.
    pub fn zero_clusters(&self, guest: u64, len: u64) -> Result<()> {
        let cs = self.cluster_size();
        let backing = self.header.backing_file.is_some();
        let mut g = guest;
        let mut zeros_to_write = Vec::new();
        {
            let mut st = self.state.lock().unwrap();
            while g < guest + len {
                let (l1i, l2i) = self.entry_index(g);
                let w = self.words_per_entry();
                let ext = self.ext_l2;
                let v3 = self.header.version >= 3;
                let has_df = self.data_file.is_some();
                let present = st.l2.get(&l1i).map(|t| t[l2i * w]).unwrap_or(0);
                let kind = l2::classify(present, ext, has_df);
                if kind == ClusterType::Unallocated && !backing {
                    g += cs;
                    continue;
                }
                if !v3 || has_df {
                    zeros_to_write.push(g);
                    g += cs;
                    continue;
                }
                let t = self.table(&mut st, l1i)?;
                if ext {
                    t[l2i * w] &= COPIED | l2::OFFSET_MASK;
                    t[l2i * w + 1] = 0xffff_ffff_0000_0000;
                } else {
                    t[l2i * w] = match kind {
                        ClusterType::Normal(h) | ClusterType::ZeroAlloc(h) => h | COPIED | l2::ZERO,
                        _ => l2::ZERO,
                    };
                }
                g += cs;
            }
        }
        let zeros = vec![0u8; cs as usize];
        for g in zeros_to_write {
            self.write_clusters(g, &zeros)?;
        }
        Ok(())
    }

    /// Writes the L2 tables, rebuilds the refcount structure and writes the L1 table.
    ///
    /// With `sync`, the ordering described in the module docs is enforced with flushes;
    /// without (qemu-img convert's default cache mode `unsafe`), nothing is flushed.
    pub fn finish(self, sync: bool) -> Result<()> {
        let flush = |s: &dyn Storage| if sync { s.flush() } else { Ok(()) };
        let cs = self.cluster_size();
        let mut guard = self.state.lock().unwrap();
        let st = &mut *guard;
        // Every dirty table got its cluster when it was created (`table`).
        let dirty: Vec<u64> = st.dirty.iter().copied().collect();
        for &l1i in &dirty {
            let mut buf = vec![0u8; cs as usize];
            for (i, w) in st.l2[&l1i].iter().enumerate() {
                put64(&mut buf, i * 8, *w);
            }
            self.file
                .write_at(&buf, l2::l1_offset(st.l1[l1i as usize]))?;
        }

        // Count every reference the finished image will hold.
        let end_clusters = st.next_free / cs;
        let mut refs = vec![0u64; end_clusters as usize];
        let mut add = |cluster: u64| -> Result<()> {
            match refs.get_mut(cluster as usize) {
                Some(r) => {
                    *r += 1;
                    Ok(())
                }
                None => Err(Error::Corrupt(format!(
                    "reference to cluster {cluster} beyond the end"
                ))),
            }
        };
        add(0)?;
        let l1_clusters = (st.l1.len() as u64 * 8).div_ceil(cs);
        for c in 0..l1_clusters {
            add(self.header.l1_table_offset / cs + c)?;
        }
        let w = self.words_per_entry();
        for (l1i, e) in st.l1.iter().enumerate() {
            let off = l2::l1_offset(*e);
            if off == 0 {
                continue;
            }
            add(off / cs)?;
            let Some(t) = st.l2.get(&(l1i as u64)) else {
                continue;
            };
            for chunk in t.chunks_exact(w) {
                match l2::classify(chunk[0], self.ext_l2, self.data_file.is_some()) {
                    ClusterType::Compressed(d) => {
                        let desc = CompressedDesc::decode(d, self.cluster_bits);
                        let (a, b) = desc.host_clusters(self.cluster_bits);
                        for c in a..=b {
                            add(c)?;
                        }
                    }
                    ClusterType::Normal(h)
                    | ClusterType::ZeroAlloc(h)
                    | ClusterType::UnallocatedAlloc(h)
                        if self.data_file.is_none() =>
                    {
                        add(h / cs)?;
                    }
                    _ => {}
                }
            }
        }
        if let Some(c) = self.header.crypto {
            for k in 0..c.length.div_ceil(cs) {
                add(c.offset / cs + k)?;
            }
        }

        let order = self.header.refcount_order;
        let per_block = refcount::entries_per_block(self.cluster_bits, order);
        let max = refcount::max(order);
        let block_for = |refs: &[u64], b: u64| -> Result<Vec<u8>> {
            let mut block = vec![0u8; cs as usize];
            let first = b * per_block;
            for i in 0..per_block {
                let Some(&r) = refs.get((first + i) as usize) else {
                    break;
                };
                if r > max {
                    return Err(Error::invalid(format!(
                        "Cluster {} needs refcount {r}, more than refcount_bits={} allows",
                        first + i,
                        1u32 << order
                    )));
                }
                refcount::set(&mut block, order, i as usize, r);
            }
            Ok(block)
        };

        // Prefer the refcount structure the image already has (as qemu-img leaves it
        // after create): rewrite its blocks in place and append only missing blocks, so
        // the file ends up as long as QEMU's. Fall back to a new structure at the end
        // when the existing table is too small.
        let old_rt = self.header.refcount_table_offset;
        let old_rt_clusters = self.header.refcount_table_clusters as u64;
        let mut table_bytes = vec![0u8; (old_rt_clusters * cs) as usize];
        self.file.read_at(&mut table_bytes, old_rt)?;
        let old_table: Vec<u64> = table_bytes
            .chunks_exact(8)
            .map(|c| crate::ondisk::be64(c, 0) & refcount::REFTABLE_OFFSET_MASK)
            .collect();
        let usable = |off: u64| off != 0 && off.is_multiple_of(cs) && off / cs < end_clusters;
        let mut reuse_refs = refs.clone();
        for k in 0..old_rt_clusters {
            if let Some(r) = reuse_refs.get_mut((old_rt / cs + k) as usize) {
                *r += 1;
            }
        }
        for &off in &old_table {
            if usable(off) {
                reuse_refs[(off / cs) as usize] += 1;
            }
        }
        let mut new_blocks: Vec<u64> = Vec::new();
        let reuse_ok =
            old_rt.is_multiple_of(cs) && old_rt / cs + old_rt_clusters <= end_clusters && {
                loop {
                    let total = end_clusters + new_blocks.len() as u64;
                    let need = total.div_ceil(per_block);
                    if need > old_table.len() as u64 {
                        break false;
                    }
                    let missing: Vec<u64> = (0..need)
                        .filter(|&i| !usable(old_table[i as usize]))
                        .collect();
                    if missing.len() == new_blocks.len() {
                        new_blocks = missing;
                        break true;
                    }
                    new_blocks = missing;
                }
            };
        if reuse_ok {
            let mut refs = reuse_refs;
            refs.resize((end_clusters + new_blocks.len() as u64) as usize, 0);
            let mut table = old_table.clone();
            for (k, &i) in new_blocks.iter().enumerate() {
                let at = end_clusters + k as u64;
                refs[at as usize] += 1;
                table[i as usize] = at * cs;
            }
            let nb = (end_clusters + new_blocks.len() as u64).div_ceil(per_block);
            for b in 0..nb {
                self.file
                    .write_at(&block_for(&refs, b)?, table[b as usize])?;
            }
            for &i in &new_blocks {
                let mut e = [0u8; 8];
                put64(&mut e, 0, table[i as usize]);
                self.file.write_at(&e, old_rt + i * 8)?;
            }
            flush(self.file.as_ref())?;
            if let Some(d) = &self.data_file {
                flush(d.as_ref())?;
            }
        } else {
            // A new refcount structure at the end of the file that also covers itself.
            let (mut nb, mut rt) = (0u64, 0u64);
            loop {
                let total = end_clusters + nb + rt;
                let nb2 = total.div_ceil(per_block);
                let rt2 = (nb2 * 8).div_ceil(cs).max(1);
                if (nb2, rt2) == (nb, rt) {
                    break;
                }
                (nb, rt) = (nb2, rt2);
            }
            if rt * cs > super::MAX_REFTABLE_BYTES {
                return Err(Error::invalid("Reference count table too large"));
            }
            refs.resize((end_clusters + nb + rt) as usize, 0);
            for c in end_clusters..end_clusters + nb + rt {
                refs[c as usize] += 1;
            }
            let rb_start = end_clusters * cs;
            let rt_start = rb_start + nb * cs;
            let mut table = vec![0u8; (rt * cs) as usize];
            for b in 0..nb {
                self.file
                    .write_at(&block_for(&refs, b)?, rb_start + b * cs)?;
                put64(&mut table, (b * 8) as usize, rb_start + b * cs);
            }
            self.file.write_at(&table, rt_start)?;
            flush(self.file.as_ref())?;
            if let Some(d) = &self.data_file {
                flush(d.as_ref())?;
            }
            let mut hdr = [0u8; 12];
            put64(&mut hdr, 0, rt_start);
            put32(&mut hdr, 8, rt as u32);
            self.file.write_at(&hdr, 48)?;
            flush(self.file.as_ref())?;
        }
        if self.file.len()? < st.data_end {
            self.file.set_len(st.data_end)?;
        }
        let mut l1buf = vec![0u8; st.l1.len() * 8];
        for (i, e) in st.l1.iter().enumerate() {
            put64(&mut l1buf, i * 8, *e);
        }
        self.file.write_at(&l1buf, self.header.l1_table_offset)?;
        flush(self.file.as_ref())
    }

    /// The compression type new compressed clusters must use.
    pub fn compression(&self) -> CompressionType {
        self.header.compression()
    }
}
