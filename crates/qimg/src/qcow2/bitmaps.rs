//! Persistent dirty bitmaps of an open qcow2 image (reference §1.10, §2).
//!
//! # Memory
//! A bitmap's bits live in chunks of one data cluster each (`8 * cluster_size` bits).
//! Chunks are read from the image only when a write, a query or a merge needs them, and
//! a chunk that a write covers completely is held as "all ones" without its bytes. The
//! bitmap table (bounded by QEMU's 512 MiB-of-data limit, so at most 8 MiB) is validated
//! and held at open; its size must be exactly what the virtual size and granularity
//! need, so no allocation is sized by anything else the file says.
//!
//! # Crash consistency
//! The bits on disk are only trusted while the directory entry's `in_use` flag is clear
//! and autoclear bit 0 is set. So:
//! - a writable open marks every consistent bitmap `in_use` in the directory *in place*
//!   before anything can change: autoclear bit 0 is cleared and synced, the directory is
//!   rewritten and synced, then the bit is set again and synced. A cut anywhere leaves
//!   either the bit clear (QEMU then ignores all bitmaps) or the entries `in_use`;
//! - a clean close stores the bitmaps: data clusters and tables go to newly allocated
//!   clusters, then a new directory, then the refcounts are synced, then the header is
//!   switched to the new directory (with `in_use` clear) and synced, and only then are
//!   the old directory, tables and data clusters freed. A cut before the header switch
//!   leaves the old `in_use` directory; after it, leaked clusters at worst;
//! - a write that arrives after a store (the image stays usable after `close`) first
//!   marks the stored bitmaps `in_use` again.
//!
//! Lock order: the bitmap lock, then the write-state lock; write paths call the hook
//! before they take the write-state lock.

use super::Qcow2;
use crate::error::{Error, Result};
use crate::ondisk::be64;
use crate::ondisk::bitmap::{self, BitmapEntry, FLAG_AUTO, FLAG_IN_USE};
use crate::ondisk::header::{autoclear, BitmapsExt, Header};
use crate::ondisk::put64;
use crate::storage::Storage;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

/// Largest number of persistent bitmaps in one image (QEMU's limit).
pub const MAX_BITMAPS: usize = 65535;
/// Largest bitmap directory (QEMU's limit).
pub const MAX_DIRECTORY_BYTES: u64 = 1024 * 65535;
/// Largest amount of bitmap data one bitmap may need on disk (QEMU's BME_MAX_PHYS_SIZE).
pub const MAX_PHYS_SIZE: u64 = 512 << 20;
/// Upper bound on bitmap tables held in memory for one image.
const MAX_TABLES_BYTES: u64 = 256 << 20;

/// One cluster's worth of bits.
#[derive(Debug, Clone)]
enum Chunk {
    /// Every bit set.
    Ones,
    /// The bits, LSB first.
    Bytes(Box<[u8]>),
}

/// A read-only view of one chunk.
enum View<'a> {
    Zero,
    Ones,
    Bytes(&'a [u8]),
}

/// The bitmap table a bitmap had on disk.
#[derive(Debug, Clone)]
struct DiskTable {
    offset: u64,
    size: u32,
    entries: Vec<u64>,
}

/// One persistent bitmap held in memory.
#[derive(Debug)]
struct Bm {
    name: String,
    granularity_bits: u8,
    enabled: bool,
    /// Loaded with `in_use` set: its bits are unusable and it is written back unchanged.
    inconsistent: bool,
    nbits: u64,
    /// The stored table, if the bitmap has one on disk.
    disk: Option<DiskTable>,
    /// Whether chunks missing from `mem` come from `disk` (false after a clear).
    use_disk: bool,
    /// Chunks at or past this index are never read from `disk` (a shrink cut them off,
    /// and a later grow must find zeros there).
    disk_limit: u64,
    mem: BTreeMap<u64, Chunk>,
    /// Bits or flags changed since the last store (else the stored table is kept).
    modified: bool,
    /// The directory entry as read; written back verbatim for inconsistent bitmaps.
    entry: Option<BitmapEntry>,
}

/// What one persistent bitmap looks like (for listings and front ends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// Name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// Records writes (`auto`).
    pub enabled: bool,
    /// Was not saved cleanly (`in_use` on disk); its contents cannot be used.
    pub inconsistent: bool,
}

/// All persistent bitmaps of an image.
#[derive(Debug, Default)]
pub(crate) struct BitmapSet {
    list: Vec<Bm>,
    /// Directory referenced by the header: offset and size.
    dir: Option<(u64, u64)>,
    /// The directory on disk has `in_use` set on every consistent entry.
    marked: bool,
    /// Something must be stored at close.
    changed: bool,
    /// Host clusters (offsets) of removed bitmaps, freed after the next store.
    to_free: Vec<u64>,
    /// The directory as it is on disk.
    disk_entries: Vec<BitmapEntry>,
}

fn not_found(name: &str) -> Error {
    Error::NotFound(format!("Dirty bitmap '{name}' not found"))
}

/// The message QEMU gives for using an inconsistent bitmap (without its hint line).
pub fn inconsistent_msg(name: &str) -> String {
    format!("Bitmap '{name}' is inconsistent and cannot be used")
}

impl Bm {
    fn chunk_bits(cs: u64) -> u64 {
        cs * 8
    }

    fn info(&self) -> BitmapInfo {
        BitmapInfo {
            name: self.name.clone(),
            granularity: 1 << self.granularity_bits,
            enabled: self.enabled,
            inconsistent: self.inconsistent,
        }
    }

    /// Brings chunk `c` into memory if it is stored on disk; returns nothing when the
    /// chunk is all zeros.
    fn load(&mut self, file: &dyn Storage, cs: u64, c: u64) -> Result<()> {
        if self.mem.contains_key(&c) || !self.use_disk || c >= self.disk_limit {
            return Ok(());
        }
        let Some(t) = &self.disk else { return Ok(()) };
        let e = t.entries.get(c as usize).copied().unwrap_or(0);
        let off = e & bitmap::TABLE_OFFSET_MASK;
        if off != 0 {
            let mut b = vec![0u8; cs as usize].into_boxed_slice();
            file.read_at(&mut b, off).map_err(|e| match e {
                Error::RawIo(io) => Error::io(
                    format!("Could not read bitmap '{}' from image", self.name),
                    io,
                ),
                e => e,
            })?;
            self.mem.insert(c, Chunk::Bytes(b));
        } else if e & bitmap::TABLE_ALL_ONES != 0 {
            self.mem.insert(c, Chunk::Ones);
        }
        Ok(())
    }

    fn view(&mut self, file: &dyn Storage, cs: u64, c: u64) -> Result<View<'_>> {
        self.load(file, cs, c)?;
        Ok(match self.mem.get(&c) {
            None => View::Zero,
            Some(Chunk::Ones) => View::Ones,
            Some(Chunk::Bytes(b)) => View::Bytes(b),
        })
    }

    /// Sets bits `[a, b)` (clipped to the bitmap).
    fn set_bits(&mut self, file: &dyn Storage, cs: u64, a: u64, b: u64) -> Result<()> {
        let b = b.min(self.nbits);
        if a >= b {
            return Ok(());
        }
        let cb = Self::chunk_bits(cs);
        for c in a / cb..=(b - 1) / cb {
            let (lo, hi) = (c * cb, (c + 1) * cb);
            let (s, e) = (a.max(lo), b.min(hi));
            if s == lo && e == hi {
                self.mem.insert(c, Chunk::Ones);
                continue;
            }
            self.load(file, cs, c)?;
            let chunk = self
                .mem
                .entry(c)
                .or_insert_with(|| Chunk::Bytes(vec![0u8; cs as usize].into_boxed_slice()));
            let Chunk::Bytes(bytes) = chunk else { continue };
            set_range(bytes, s - lo, e - lo);
        }
        self.modified = true;
        Ok(())
    }

    /// Length (in bits, at most `max`) and value of the run of equal bits at `bit`.
    fn run(&mut self, file: &dyn Storage, cs: u64, bit: u64, max: u64) -> Result<(u64, bool)> {
        let cb = Self::chunk_bits(cs);
        let end = bit.saturating_add(max).min(self.nbits);
        let mut pos = bit;
        let mut value = None;
        while pos < end {
            let c = pos / cb;
            let chunk_end = ((c + 1) * cb).min(end);
            let (n, v) = match self.view(file, cs, c)? {
                View::Zero => (chunk_end - pos, false),
                View::Ones => (chunk_end - pos, true),
                View::Bytes(b) => {
                    let local = pos - c * cb;
                    let n = same_run(b, local, chunk_end - c * cb);
                    (n, get_bit(b, local))
                }
            };
            match value {
                None => value = Some(v),
                Some(x) if x != v => break,
                _ => {}
            }
            pos += n;
            if n == 0 {
                break;
            }
        }
        Ok(((pos - bit).max(1).min(max.max(1)), value.unwrap_or(false)))
    }

    /// The bytes of chunk `c` as they must be stored (tail bits past the bitmap cleared),
    /// or `None` when all zero.
    fn stored_chunk(&mut self, file: &dyn Storage, cs: u64, c: u64) -> Result<Option<Vec<u8>>> {
        let cb = Self::chunk_bits(cs);
        let nbits = self.nbits;
        let mut out = match self.view(file, cs, c)? {
            View::Zero => return Ok(None),
            View::Ones => vec![0xffu8; cs as usize],
            View::Bytes(b) => {
                if b.iter().all(|&x| x == 0) {
                    return Ok(None);
                }
                b.to_vec()
            }
        };
        let valid = nbits.saturating_sub(c * cb).min(cb);
        if valid < cb {
            clear_from(&mut out, valid);
            if out.iter().all(|&x| x == 0) {
                return Ok(None);
            }
        }
        Ok(Some(out))
    }

    /// Gives the bitmap `nbits` bits, as QEMU does on a resize: bits past the old end
    /// read as clear after a grow, bits past the new end are gone after a shrink.
    fn truncate(&mut self, file: &dyn Storage, cs: u64, nbits: u64) -> Result<()> {
        let cb = Self::chunk_bits(cs);
        let keep = nbits.min(self.nbits);
        if !keep.is_multiple_of(cb) {
            let c = keep / cb;
            self.load(file, cs, c)?;
            match self.mem.get_mut(&c) {
                Some(Chunk::Bytes(b)) => clear_from(b, keep % cb),
                Some(chunk @ Chunk::Ones) => {
                    let mut b = vec![0xffu8; cs as usize].into_boxed_slice();
                    clear_from(&mut b, keep % cb);
                    *chunk = Chunk::Bytes(b);
                }
                None => {}
            }
        }
        let first_gone = keep.div_ceil(cb);
        self.mem.retain(|&c, _| c < first_gone);
        self.disk_limit = self.disk_limit.min(first_gone);
        self.nbits = nbits;
        self.modified = true;
        Ok(())
    }

    /// Host clusters the stored table and its data occupy.
    fn disk_clusters(&self, cs: u64) -> Vec<u64> {
        let Some(t) = &self.disk else {
            return Vec::new();
        };
        let mut v: Vec<u64> = t
            .entries
            .iter()
            .map(|e| e & bitmap::TABLE_OFFSET_MASK)
            .filter(|&o| o != 0)
            .collect();
        let n = (t.size as u64 * 8).div_ceil(cs);
        v.extend((0..n).map(|k| t.offset + k * cs));
        v
    }
}

fn get_bit(b: &[u8], i: u64) -> bool {
    b[(i / 8) as usize] & (1 << (i % 8)) != 0
}

/// Sets bits `[s, e)` of `b` (LSB-first layout).
fn set_range(b: &mut [u8], mut s: u64, e: u64) {
    while s < e && !s.is_multiple_of(8) {
        b[(s / 8) as usize] |= 1 << (s % 8);
        s += 1;
    }
    let full = (e - s) / 8;
    b[(s / 8) as usize..(s / 8 + full) as usize].fill(0xff);
    s += full * 8;
    while s < e {
        b[(s / 8) as usize] |= 1 << (s % 8);
        s += 1;
    }
}

/// Clears every bit from `s` on.
fn clear_from(b: &mut [u8], s: u64) {
    let byte = (s / 8) as usize;
    if !s.is_multiple_of(8) {
        b[byte] &= (1u8 << (s % 8)) - 1;
        b[byte + 1..].fill(0);
    } else {
        b[byte..].fill(0);
    }
}

/// How many bits from `s` (before `e`) equal bit `s`.
fn same_run(b: &[u8], s: u64, e: u64) -> u64 {
    let v = get_bit(b, s);
    let whole = if v { 0xff } else { 0 };
    let mut i = s;
    while i < e {
        if i.is_multiple_of(8) && i + 8 <= e && b[(i / 8) as usize] == whole {
            i += 8;
            continue;
        }
        if get_bit(b, i) != v {
            break;
        }
        i += 1;
    }
    i - s
}

/// Loads every bitmap of the directory. In-use bitmaps become inconsistent without their
/// table being read, as QEMU does; the others must have a valid table of exactly the
/// size the image needs.
pub(crate) fn load(file: &dyn Storage, h: &Header, entries: &[BitmapEntry]) -> Result<BitmapSet> {
    let cs = h.cluster_size();
    let mut set = BitmapSet {
        dir: h.bitmaps.map(|e| (e.directory_offset, e.directory_size)),
        disk_entries: entries.to_vec(),
        ..Default::default()
    };
    let mut table_bytes = 0u64;
    for e in entries {
        let nbits = h.size.div_ceil(1 << e.granularity_bits);
        let mut bm = Bm {
            name: e.name.clone(),
            granularity_bits: e.granularity_bits,
            enabled: e.flags & FLAG_AUTO != 0,
            inconsistent: e.flags & FLAG_IN_USE != 0,
            nbits,
            disk: None,
            use_disk: true,
            disk_limit: u64::MAX,
            mem: BTreeMap::new(),
            modified: false,
            entry: Some(e.clone()),
        };
        if !bm.inconsistent {
            // Bounded by the directory constraints (table_size * cs <= 512 MiB).
            let bytes = e.table_size as u64 * 8;
            table_bytes += bytes;
            if table_bytes > MAX_TABLES_BYTES {
                return Err(Error::invalid("Bitmap tables too large"));
            }
            let mut buf = vec![0u8; bytes as usize];
            let bad_table = || {
                Error::invalid(format!(
                    "Could not read bitmap_table table from image for bitmap '{}': Invalid argument",
                    e.name
                ))
            };
            file.read_at(&mut buf, e.table_offset)
                .map_err(|_| bad_table())?;
            let entries: Vec<u64> = buf.chunks_exact(8).map(|c| be64(c, 0)).collect();
            if !entries.iter().all(|&x| bitmap::table_entry_ok(x, cs)) {
                return Err(bad_table());
            }
            if bitmap::table_size_for(h.size, e.granularity_bits, cs) != e.table_size as u64 {
                return Err(Error::invalid(format!(
                    "Could not read bitmap '{}' from image: Invalid argument",
                    e.name
                )));
            }
            bm.disk = Some(DiskTable {
                offset: e.table_offset,
                size: e.table_size,
                entries,
            });
        }
        set.list.push(bm);
    }
    Ok(set)
}

impl Qcow2 {
    fn bm_file(&self) -> &dyn Storage {
        self.file.as_ref()
    }

    /// Recomputes whether any bitmap records writes (the write hook's fast path).
    fn bm_refresh_active(&self, set: &BitmapSet) {
        let active = set.list.iter().any(|b| b.enabled && !b.inconsistent);
        self.bm_active.store(active, Ordering::Release);
    }

    fn write_autoclear(&self, value: u64) -> Result<()> {
        let mut b = [0u8; 8];
        put64(&mut b, 0, value);
        self.file.write_at(&b, 88)?;
        self.file.flush()
    }

    /// Marks every consistent stored bitmap `in_use`, rewriting the directory in place
    /// (module docs). Called at a writable open and before changing bits after a store.
    fn bm_mark_in_use(&self, set: &mut BitmapSet) -> Result<()> {
        if set.marked || self.header.version < 3 {
            return Ok(());
        }
        let Some((dir_off, dir_size)) = set.dir else {
            set.marked = true;
            return Ok(());
        };
        let mut dir = Vec::new();
        let mut any = false;
        for e in &set.disk_entries {
            let mut e = e.clone();
            any |= e.flags & FLAG_IN_USE == 0;
            e.flags |= FLAG_IN_USE;
            e.serialize(&mut dir);
        }
        if !any {
            set.marked = true;
            return Ok(());
        }
        // Only flags change, so the directory keeps its size and place.
        if dir.len() as u64 != dir_size {
            return Err(Error::Corrupt(
                "bitmap directory does not match its header extension".into(),
            ));
        }
        let _g = self.ws.lock().unwrap();
        let ac = self.header.autoclear_features | autoclear::BITMAPS;
        self.write_autoclear(ac & !autoclear::BITMAPS)?;
        self.file.write_at(&dir, dir_off)?;
        self.file.flush()?;
        self.write_autoclear(ac)?;
        for e in set.disk_entries.iter_mut() {
            e.flags |= FLAG_IN_USE;
        }
        set.marked = true;
        set.changed = true;
        Ok(())
    }

    /// Sets up the bitmaps of a freshly opened image; a writable open marks them in use.
    pub(super) fn bm_open(&self) -> Result<()> {
        let mut set = self.bm.lock().unwrap();
        self.bm_refresh_active(&set);
        if self.ws.lock().unwrap().is_some() {
            self.bm_mark_in_use(&mut set)?;
        }
        Ok(())
    }

    /// The write hook: sets the bits of every enabled bitmap for guest bytes
    /// `[offset, offset+len)`. Writes, zero writes and discards call it before they
    /// change anything.
    pub(super) fn bm_note_write(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 || !self.bm_active.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut set = self.bm.lock().unwrap();
        self.bm_mark_in_use(&mut set)?;
        let cs = self.cluster_size();
        let file = self.bm_file();
        let end = offset.saturating_add(len);
        for b in set.list.iter_mut().filter(|b| b.enabled && !b.inconsistent) {
            let g = b.granularity_bits;
            b.set_bits(file, cs, offset >> g, ((end - 1) >> g) + 1)?;
        }
        set.changed = true;
        Ok(())
    }

    /// The persistent bitmaps, in directory order (bitmaps added since the open last).
    pub fn bitmap_list(&self) -> Vec<BitmapInfo> {
        self.bm.lock().unwrap().list.iter().map(Bm::info).collect()
    }

    fn writable_bm(&self) -> Result<()> {
        if self.ws.lock().unwrap().is_none() {
            return Err(Error::Permission("Image is read-only".into()));
        }
        Ok(())
    }

    /// Creates a persistent bitmap, enabled unless `disabled`, with QEMU's checks and
    /// messages (`Can't make bitmap ... persistent` failures included).
    pub fn bitmap_add(&self, name: &str, granularity: u64, disabled: bool) -> Result<()> {
        self.writable_bm()?;
        let mut set = self.bm.lock().unwrap();
        if set.list.iter().any(|b| b.name == name) {
            return Err(Error::InvalidArgument(format!(
                "Bitmap already exists: {name}"
            )));
        }
        if granularity < 512 || !granularity.is_power_of_two() || granularity > 1 << 31 {
            return Err(Error::InvalidArgument(
                "Granularity must be power of 2 and at least 512".into(),
            ));
        }
        let persist = |m: &str| {
            Error::InvalidArgument(format!(
                "Can't make bitmap '{name}' persistent in '{}': {m}",
                self.node_name()
            ))
        };
        if self.header.version < 3 {
            return Err(persist("Cannot store dirty bitmaps in qcow2 v2 files"));
        }
        if name.len() > 1023 {
            return Err(persist("Name length exceeds maximum (1023 characters)"));
        }
        let gbits = granularity.trailing_zeros() as u8;
        let cs = self.cluster_size();
        let tsize = bitmap::table_size_for(self.header.size, gbits, cs);
        if tsize > 0x800_0000 || tsize * cs > MAX_PHYS_SIZE {
            return Err(persist(
                "Too much space will be occupied by the bitmap. Use larger granularity",
            ));
        }
        if set.list.len() >= MAX_BITMAPS {
            return Err(persist(
                "Maximum number of persistent bitmaps is already reached",
            ));
        }
        let dir_bytes: u64 = set
            .list
            .iter()
            .map(|b| (24 + b.name.len() as u64).div_ceil(8) * 8)
            .sum::<u64>()
            + (24 + name.len() as u64).div_ceil(8) * 8;
        if dir_bytes > MAX_DIRECTORY_BYTES {
            return Err(persist("Not enough space in the bitmap directory"));
        }
        set.list.push(Bm {
            name: name.to_string(),
            granularity_bits: gbits,
            enabled: !disabled,
            inconsistent: false,
            nbits: self.header.size.div_ceil(granularity),
            disk: None,
            use_disk: false,
            disk_limit: u64::MAX,
            mem: BTreeMap::new(),
            modified: true,
            entry: None,
        });
        set.changed = true;
        self.bm_refresh_active(&set);
        Ok(())
    }

    fn node_name(&self) -> String {
        // QEMU names the anonymous node `#blockNNN`; there is no such node here.
        "#block0".to_string()
    }

    fn find(set: &BitmapSet, name: &str) -> Result<usize> {
        set.list
            .iter()
            .position(|b| b.name == name)
            .ok_or_else(|| not_found(name))
    }

    fn find_usable(set: &BitmapSet, name: &str) -> Result<usize> {
        let i = Self::find(set, name)?;
        if set.list[i].inconsistent {
            return Err(Error::InvalidArgument(inconsistent_msg(name)));
        }
        Ok(i)
    }

    /// Removes a bitmap (inconsistent ones too); its clusters are freed at the next store.
    pub fn bitmap_remove(&self, name: &str) -> Result<()> {
        self.writable_bm()?;
        let mut set = self.bm.lock().unwrap();
        let i = Self::find(&set, name)?;
        let b = set.list.remove(i);
        let cs = self.cluster_size();
        let mut free = b.disk_clusters(cs);
        if b.inconsistent {
            // Its table was never loaded: read and check it now, and free only what it
            // validly points to (a broken table is leaked rather than trusted).
            if let Some(e) = &b.entry {
                let bytes = e.table_size as u64 * 8;
                let mut buf = vec![0u8; bytes as usize];
                if self.file.read_at(&mut buf, e.table_offset).is_ok() {
                    let ents: Vec<u64> = buf.chunks_exact(8).map(|c| be64(c, 0)).collect();
                    if ents.iter().all(|&x| bitmap::table_entry_ok(x, cs)) {
                        free.extend(
                            ents.iter()
                                .map(|x| x & bitmap::TABLE_OFFSET_MASK)
                                .filter(|&o| o != 0),
                        );
                        free.extend((0..bytes.div_ceil(cs)).map(|k| e.table_offset + k * cs));
                    }
                }
            }
        }
        set.to_free.extend(free);
        set.changed = true;
        self.bm_refresh_active(&set);
        Ok(())
    }

    /// Resets every bit of a bitmap.
    pub fn bitmap_clear(&self, name: &str) -> Result<()> {
        self.writable_bm()?;
        let mut set = self.bm.lock().unwrap();
        let i = Self::find_usable(&set, name)?;
        self.bm_mark_in_use(&mut set)?;
        let b = &mut set.list[i];
        b.mem.clear();
        b.use_disk = false;
        b.modified = true;
        set.changed = true;
        Ok(())
    }

    /// Starts (`true`) or stops recording writes.
    pub fn bitmap_set_enabled(&self, name: &str, enabled: bool) -> Result<()> {
        self.writable_bm()?;
        let mut set = self.bm.lock().unwrap();
        let i = Self::find_usable(&set, name)?;
        self.bm_mark_in_use(&mut set)?;
        let b = &mut set.list[i];
        b.enabled = enabled;
        b.modified = true;
        set.changed = true;
        self.bm_refresh_active(&set);
        Ok(())
    }

    /// Checks that bitmap `name` exists and is consistent (QEMU's messages).
    pub fn bitmap_usable(&self, name: &str) -> Result<BitmapInfo> {
        let set = self.bm.lock().unwrap();
        let i = Self::find_usable(&set, name)?;
        Ok(set.list[i].info())
    }

    /// The run of guest bytes starting at `offset` (at most `len`, at least one byte)
    /// whose bits in bitmap `name` are equal, and whether they are set.
    pub fn bitmap_run(&self, name: &str, offset: u64, len: u64) -> Result<(u64, bool)> {
        let mut set = self.bm.lock().unwrap();
        let i = Self::find_usable(&set, name)?;
        let cs = self.cluster_size();
        let file = self.bm_file();
        let b = &mut set.list[i];
        let g = b.granularity_bits;
        let bit = offset >> g;
        if bit >= b.nbits {
            return Ok((len.max(1), false));
        }
        let end = offset.saturating_add(len.max(1));
        let want_bits = ((end - 1) >> g) - bit + 1;
        let (n, v) = b.run(file, cs, bit, want_bits)?;
        let run_end = ((bit + n) << g).min(end);
        Ok((run_end - offset, v))
    }

    /// Every set range of bitmap `name` as guest byte ranges `(offset, len)`.
    pub fn bitmap_dirty_ranges(&self, name: &str) -> Result<Vec<(u64, u64)>> {
        let size = self.header.size;
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < size {
            let (n, v) = self.bitmap_run(name, pos, size - pos)?;
            if v {
                out.push((pos, n));
            }
            pos += n;
        }
        Ok(out)
    }

    /// ORs `ranges` (guest byte ranges, e.g. another bitmap's
    /// [`Qcow2::bitmap_dirty_ranges`]) into bitmap `name`, whatever its granularity.
    pub fn bitmap_merge_ranges(&self, name: &str, ranges: &[(u64, u64)]) -> Result<()> {
        self.writable_bm()?;
        let mut set = self.bm.lock().unwrap();
        let i = Self::find_usable(&set, name)?;
        self.bm_mark_in_use(&mut set)?;
        let cs = self.cluster_size();
        let file = self.bm_file();
        let b = &mut set.list[i];
        let g = b.granularity_bits;
        for &(o, l) in ranges {
            if l > 0 {
                b.set_bits(file, cs, o >> g, ((o.saturating_add(l) - 1) >> g) + 1)?;
            }
        }
        b.modified = true;
        set.changed = true;
        Ok(())
    }

    /// Writes the bitmaps back (module docs). Runs at close; a no-op when nothing changed.
    pub(super) fn bm_store(&self) -> Result<()> {
        self.bm_store_as(self.header.size, false)
    }

    /// Stores the bitmaps with tables sized for a virtual size of `size` bytes, marked
    /// `in_use` when `in_use` (their bits stay untrusted on disk, and the set must be
    /// stored again at close).
    fn bm_store_as(&self, size: u64, in_use: bool) -> Result<()> {
        let mut set = self.bm.lock().unwrap();
        if !set.changed || self.ws.lock().unwrap().is_none() {
            return Ok(());
        }
        let cs = self.cluster_size();
        let file = self.bm_file();
        let alloc = |n: u64| -> Result<u64> {
            let mut g = self.ws.lock().unwrap();
            let st = g
                .as_mut()
                .ok_or_else(|| Error::Permission("Image is read-only".into()))?;
            st.refs.alloc(file, n)
        };
        let mut frees = std::mem::take(&mut set.to_free);
        let mut entries = Vec::new();
        let mut new_tables = Vec::new();
        for b in set.list.iter_mut() {
            let mut e = b.entry.clone().unwrap_or(BitmapEntry {
                table_offset: 0,
                table_size: 0,
                flags: 0,
                typ: 1,
                granularity_bits: b.granularity_bits,
                extra: Vec::new(),
                name: b.name.clone(),
            });
            if b.inconsistent {
                entries.push(e);
                new_tables.push(None);
                continue;
            }
            e.flags = if b.enabled { FLAG_AUTO } else { 0 };
            if in_use {
                e.flags |= FLAG_IN_USE;
            }
            if b.modified || b.disk.is_none() {
                let tsize = bitmap::table_size_for(size, b.granularity_bits, cs);
                let mut table = vec![0u8; (tsize * 8) as usize];
                for c in 0..tsize {
                    if let Some(data) = b.stored_chunk(file, cs, c)? {
                        let off = alloc(1)?;
                        file.write_at(&data, off)?;
                        put64(&mut table, (c * 8) as usize, off);
                    }
                }
                let toff = alloc((tsize * 8).div_ceil(cs))?;
                file.write_at(&table, toff)?;
                frees.extend(b.disk_clusters(cs));
                e.table_offset = toff;
                e.table_size = tsize as u32;
                new_tables.push(Some(DiskTable {
                    offset: toff,
                    size: tsize as u32,
                    entries: table.chunks_exact(8).map(|c| be64(c, 0)).collect(),
                }));
            } else {
                new_tables.push(None);
            }
            entries.push(e);
        }
        let mut dir = Vec::new();
        for e in &entries {
            e.serialize(&mut dir);
        }
        let new_dir = if entries.is_empty() {
            None
        } else {
            let off = alloc((dir.len() as u64).div_ceil(cs))?;
            file.write_at(&dir, off)?;
            Some((off, dir.len() as u64))
        };
        // Refcounts of everything just written reach the disk (with a sync) before the
        // header points at it.
        self.flush_metadata(true)?;
        {
            let _g = self.ws.lock().unwrap();
            let mut buf = vec![0u8; cs as usize];
            file.read_at(&mut buf, 0)?;
            let mut h = Header::parse(&buf)?;
            match new_dir {
                Some((off, size)) => {
                    h.bitmaps = Some(BitmapsExt {
                        nb_bitmaps: entries.len() as u32,
                        reserved: 0,
                        directory_size: size,
                        directory_offset: off,
                    });
                    h.autoclear_features |= autoclear::BITMAPS;
                }
                None => {
                    h.bitmaps = None;
                    h.autoclear_features &= !autoclear::BITMAPS;
                }
            }
            let out = h.serialize()?;
            file.write_at(&out, 0)?;
            file.flush()?;
        }
        if let Some((off, size)) = set.dir {
            frees.extend((0..size.div_ceil(cs)).map(|k| off + k * cs));
        }
        {
            let mut g = self.ws.lock().unwrap();
            if let Some(st) = g.as_mut() {
                for f in frees {
                    st.refs.free_later(f / cs);
                }
            }
        }
        self.flush_metadata(true)?;
        set.disk_entries = entries.clone();
        for ((b, e), t) in set.list.iter_mut().zip(entries).zip(new_tables) {
            if let Some(t) = t {
                b.disk = Some(t);
                b.use_disk = true;
                b.disk_limit = u64::MAX;
                b.mem.clear();
            }
            b.modified = false;
            b.entry = Some(e);
        }
        set.dir = new_dir;
        set.changed = in_use;
        set.marked = in_use;
        Ok(())
    }

    /// Refuses a resize QEMU refuses: an inconsistent bitmap cannot be resized.
    pub(super) fn bm_resize_check(&self) -> Result<()> {
        let set = self.bm.lock().unwrap();
        match set.list.iter().find(|b| b.inconsistent) {
            Some(b) => Err(Error::InvalidArgument(inconsistent_msg(&b.name))),
            None => Ok(()),
        }
    }

    /// Gives every bitmap the bits a virtual size of `size` bytes needs (see
    /// [`Bm::truncate`]), to be stored at close. A growing resize calls this before the
    /// size changes on disk: a bitmap table that must grow is then stored anew at the
    /// larger size first, still `in_use`, because QEMU rejects a directory whose tables
    /// do not cover the virtual size. A shrinking resize calls it after the size
    /// changed (tables larger than needed are accepted), so a resize that fails keeps
    /// every bit.
    pub(super) fn bm_resize(&self, size: u64) -> Result<()> {
        let cs = self.cluster_size();
        let grows = {
            let mut set = self.bm.lock().unwrap();
            if set.list.is_empty() {
                return Ok(());
            }
            let file = self.bm_file();
            let mut grows = false;
            for b in set.list.iter_mut() {
                let have = b.disk.as_ref().map(|t| t.size as u64).unwrap_or(0);
                grows |= bitmap::table_size_for(size, b.granularity_bits, cs) > have;
                b.truncate(file, cs, size.div_ceil(1 << b.granularity_bits))?;
            }
            set.changed = true;
            grows
        };
        if grows && size > self.header.size {
            self.bm_store_as(size, true)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_helpers() {
        let mut b = vec![0u8; 8];
        set_range(&mut b, 3, 21);
        assert_eq!(b[0], 0xf8);
        assert_eq!(b[1], 0xff);
        assert_eq!(b[2], 0x1f);
        assert_eq!(same_run(&b, 0, 64), 3);
        assert_eq!(same_run(&b, 3, 64), 18);
        assert_eq!(same_run(&b, 21, 64), 43);
        clear_from(&mut b, 10);
        assert_eq!(&b[..3], &[0xf8, 0x03, 0]);
    }
}
