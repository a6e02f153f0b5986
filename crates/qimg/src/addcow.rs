//! add-cow images: a raw image file with a backing file, tracked by a sidecar file.
//!
//! An add-cow image is two files. The *image file* is a plain raw file that will, once
//! every cluster has been written, be the whole disk on its own. The *add-cow file*
//! (`X.add-cow`) holds a header naming the image file and the backing file, and a COW
//! bitmap with one bit per cluster: set means the cluster has been copied into (or
//! written in) the image file, clear means it still reads from the backing file. QEMU never
//! merged the format; the layout follows the last specification posted to qemu-devel
//! (`docs/specs/add-cow.txt`, V19/V20 of Dong Xu Wang's series).
//!
//! # On-disk layout (all numbers little-endian)
//!
//! | bytes | field |
//! |---|---|
//! | 0–3 | magic, the four bytes `ACOW` |
//! | 4–7 | offset of the backing file name in the add-cow file (0: no backing file) |
//! | 8–11 | length of the backing file name (0 exactly when the offset is 0) |
//! | 12–15 | offset of the image file name (never 0) |
//! | 16–19 | length of the image file name (never 0) |
//! | 20–23 | cluster bits (9..=21: 512 B to 2 MiB clusters) |
//! | 24–31 | incompatible features (none defined: any bit set refuses the image) |
//! | 32–39 | compatible features (bit 0, "all allocated": every cluster reads from the image file) |
//! | 40–43 | header size: the COW bitmap starts here |
//! | 44–59 | backing file format, NUL-terminated, zero-padded |
//! | 60–75 | image file format, NUL-terminated, zero-padded |
//! | 76–header size | the two names (not NUL-terminated), zeros elsewhere |
//!
//! Provenance: the stored copies of the V19/V20 posts available while writing this held
//! the general part of the text (little-endian numbers, `image_fmt` defaulting to raw,
//! backing format probed when absent, the image file possibly larger than the backing
//! file and then giving the size) and the changelogs (magic shortened from 8 to 4 bytes in
//! V14, version field dropped in V18, header size `max(cluster size, 4096)` in V18, format
//! fields NUL-terminated in V19); the V10/V12 header (8-byte magic, version, then the name
//! offset/length pairs relative to the add-cow file, 0 meaning no backing file) and its
//! review fixed the rules for the name fields. The byte positions from the cluster bits on
//! follow the V18+ field order as remembered, not a verified copy of the table: if a real
//! V20 file disagrees, this table and [`AddCowHeader::parse`] are the one place to change.
//!
//! The COW bitmap follows at `header size`: bit `n % 8` (least significant first) of
//! byte `n / 8` stands for cluster `n`. The virtual size is not stored: it is the image
//! file's length (rounded up to 512-byte sectors, as for raw images), so the bitmap
//! needs `ceil(ceil(size / cluster) / 8)` bytes; the file may hold more (ignored).
//!
//! # Decisions where the specification is silent or ambiguous
//!
//! - The magic is the byte string `ACOW` (the text calls it a string; a C driver storing
//!   a host-order integer would have written it reversed).
//! - Names may start anywhere from byte 76 (the end of the fixed fields) and must end
//!   inside the header; qimg writes them from byte 80, which also satisfies readers that
//!   reserve bytes 76–79. Names must be UTF-8 without NUL bytes, at most 4096 bytes.
//! - The header size must lie between 76 and 2 MiB. New files use the larger of 4096 and
//!   the cluster size (the V18 rule), grown to a 4 KiB multiple when long names need it.
//! - Format fields must be NUL-terminated (so at most 15 characters) with zeros after the
//!   terminator (V19). An empty image format means raw; any other than raw is refused. An
//!   empty backing format with a backing file means "probe", as for qcow2 images without
//!   a recorded backing format; `qimg create` always records one.
//! - Bits past the last cluster in the last bitmap byte are ignored and kept as found.
//! - `discard` cannot clear bits (a cleared bit on disk over data written after it would
//!   lose that data after a crash), so it does not return space to the backing file: in
//!   copied clusters it punches holes in the image file (they then read as zeros, which
//!   discard allows), in clusters still on the backing file it does nothing.
//!
//! # Crash ordering
//!
//! A bit must never be durable before the data of its cluster. Writes go to the image file
//! first; only when a write has returned is its cluster's bit set, and only in memory (and
//! the bitmap byte marked dirty). [`AddCow::flush`] then (1) takes the set of dirty bytes
//! with their values at that moment — every bit in them belongs to a completed write —,
//! (2) flushes the image file, (3) writes those bytes to the add-cow file and (4) flushes
//! the add-cow file. A power cut anywhere leaves each bit either clear (the cluster reads
//! from the backing file, as before the write: the write was not acknowledged as durable)
//! or set over durable data. Bits are never cleared on disk.
//!
//! # Concurrency
//!
//! The first write into a cluster not yet copied must merge the backing file's data with
//! the new bytes and write the whole cluster. Such writes take a per-cluster lock, so two
//! writers copying the same cluster cannot overwrite each other's bytes with backing data;
//! writes into copied clusters go straight to the image file.

use crate::error::{Error, Result};
use crate::image::{Extent, Image, Status};
use crate::storage::{FileStorage, Storage};
use std::collections::{BTreeSet, HashSet};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// The magic bytes at the start of every add-cow file.
pub const MAGIC: [u8; 4] = *b"ACOW";
/// Length of the fixed header fields; names may start here.
pub const FIXED_LEN: u32 = 76;
/// Where qimg writes the names in new files.
pub const NAMES_START: u32 = 80;
/// Smallest cluster size, as a power of two (512 bytes).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster size, as a power of two (2 MiB, QEMU's limit for qcow2 too).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Default cluster size of new files (64 KiB, as the V20 patches default to).
pub const DEFAULT_CLUSTER_BITS: u32 = 16;
/// Largest header accepted.
pub const MAX_HEADER_SIZE: u32 = 2 << 20;
/// Longest file name accepted (PATH_MAX).
pub const MAX_NAME_LEN: u32 = 4096;
/// Compatible feature bit 0: every cluster has been copied into the image file.
pub const COMPAT_ALL_ALLOCATED: u64 = 1;
/// Length of each format field.
const FMT_LEN: usize = 16;

/// A parsed add-cow header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddCowHeader {
    /// Backing file name, relative to the add-cow file's directory unless absolute.
    pub backing_file: Option<String>,
    /// Backing file format (`None`: probe it).
    pub backing_format: Option<String>,
    /// Image file name, relative to the add-cow file's directory unless absolute.
    pub image_file: String,
    /// Image file format (always `raw` after parsing).
    pub image_format: String,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Incompatible feature bits (always 0 after parsing).
    pub features: u64,
    /// Compatible feature bits, unknown ones kept as found.
    pub compatible_features: u64,
    /// Offset of the COW bitmap in the add-cow file.
    pub header_size: u32,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn bad(msg: String) -> Error {
    Error::invalid(format!("Invalid add-cow header: {msg}"))
}

/// Reads a NUL-terminated, zero-padded format field.
fn parse_fmt(field: &[u8], what: &str) -> Result<Option<String>> {
    let Some(nul) = field.iter().position(|&b| b == 0) else {
        return Err(bad(format!("{what} is not NUL-terminated")));
    };
    if field[nul..].iter().any(|&b| b != 0) {
        return Err(bad(format!("{what} has bytes after its terminator")));
    }
    let s = &field[..nul];
    if !s.iter().all(|b| b.is_ascii_graphic()) {
        return Err(bad(format!("{what} is not printable ASCII")));
    }
    Ok((!s.is_empty()).then(|| String::from_utf8_lossy(s).into_owned()))
}

/// Checks one (offset, length) name pair against the header and returns the name.
fn parse_name(h: &[u8], header_size: u32, off: u32, len: u32, what: &str) -> Result<String> {
    if len == 0 || len > MAX_NAME_LEN {
        return Err(bad(format!(
            "{what} length {len} is out of range (1..={MAX_NAME_LEN})"
        )));
    }
    let end = off.saturating_add(len);
    if off < FIXED_LEN || end > header_size {
        return Err(bad(format!(
            "{what} at {off}+{len} lies outside the name area ({FIXED_LEN}..{header_size})"
        )));
    }
    let bytes = &h[off as usize..end as usize];
    if bytes.contains(&0) {
        return Err(bad(format!("{what} contains a NUL byte")));
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| bad(format!("{what} is not valid UTF-8")))
}

impl AddCowHeader {
    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Reads the header size from the first [`FIXED_LEN`] bytes, after checking the magic:
    /// the caller then reads that many bytes for [`AddCowHeader::parse`].
    pub fn header_size_of(fixed: &[u8]) -> Result<u32> {
        if fixed.len() < FIXED_LEN as usize {
            return Err(bad(format!(
                "file is truncated ({} bytes, the fixed fields need {FIXED_LEN})",
                fixed.len()
            )));
        }
        if fixed[..4] != MAGIC {
            return Err(bad("bad magic (not an add-cow file)".into()));
        }
        let hs = le32(fixed, 40);
        if !(FIXED_LEN..=MAX_HEADER_SIZE).contains(&hs) {
            return Err(bad(format!(
                "header size {hs} is out of range ({FIXED_LEN}..={MAX_HEADER_SIZE})"
            )));
        }
        Ok(hs)
    }

    /// Parses and validates a whole header (`h` holds at least the header size's bytes).
    pub fn parse(h: &[u8]) -> Result<AddCowHeader> {
        let header_size = Self::header_size_of(h)?;
        if h.len() < header_size as usize {
            return Err(bad(format!(
                "file is truncated ({} bytes, the header size is {header_size})",
                h.len()
            )));
        }
        let cluster_bits = le32(h, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(bad(format!(
                "cluster bits {cluster_bits} out of range ({MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS})"
            )));
        }
        let features = le64(h, 24);
        if features != 0 {
            return Err(Error::unsupported(format!(
                "Unsupported add-cow features: 0x{features:x}"
            )));
        }
        let compatible_features = le64(h, 32);
        let (boff, blen) = (le32(h, 4), le32(h, 8));
        let backing_file = match (boff, blen) {
            (0, 0) => None,
            (0, n) => {
                return Err(bad(format!(
                    "backing file name length {n} without a name offset"
                )))
            }
            (o, n) => Some(parse_name(h, header_size, o, n, "backing file name")?),
        };
        let (ioff, ilen) = (le32(h, 12), le32(h, 16));
        if ioff == 0 {
            return Err(bad("no image file name".into()));
        }
        let image_file = parse_name(h, header_size, ioff, ilen, "image file name")?;
        let backing_format = parse_fmt(&h[44..60], "backing file format")?;
        if backing_format.is_some() && backing_file.is_none() {
            return Err(bad("backing file format without a backing file".into()));
        }
        let image_format =
            parse_fmt(&h[60..76], "image file format")?.unwrap_or_else(|| "raw".into());
        if image_format != "raw" {
            return Err(Error::unsupported(format!(
                "add-cow image file format '{image_format}' is not supported (only raw)"
            )));
        }
        Ok(AddCowHeader {
            backing_file,
            backing_format,
            image_file,
            image_format,
            cluster_bits,
            features,
            compatible_features,
            header_size,
        })
    }

    /// Serializes the header into exactly `header_size` bytes, names from
    /// [`NAMES_START`], after checking that the result parses back.
    pub fn serialize(&self) -> Result<Vec<u8>> {
        let hs = self.header_size;
        if !(FIXED_LEN..=MAX_HEADER_SIZE).contains(&hs) {
            return Err(Error::InvalidArgument(format!(
                "add-cow header size {hs} is out of range"
            )));
        }
        let mut h = vec![0u8; hs as usize];
        h[..4].copy_from_slice(&MAGIC);
        let mut pos = NAMES_START as usize;
        let mut place = |h: &mut Vec<u8>, name: &str, at: usize| -> Result<()> {
            let end = pos + name.len();
            if end > h.len() {
                return Err(Error::InvalidArgument(
                    "add-cow file names do not fit in the header".into(),
                ));
            }
            h[pos..end].copy_from_slice(name.as_bytes());
            h[at..at + 4].copy_from_slice(&(pos as u32).to_le_bytes());
            h[at + 4..at + 8].copy_from_slice(&(name.len() as u32).to_le_bytes());
            pos = end;
            Ok(())
        };
        if let Some(b) = &self.backing_file {
            place(&mut h, b, 4)?;
        }
        place(&mut h, &self.image_file, 12)?;
        h[20..24].copy_from_slice(&self.cluster_bits.to_le_bytes());
        h[24..32].copy_from_slice(&self.features.to_le_bytes());
        h[32..40].copy_from_slice(&self.compatible_features.to_le_bytes());
        h[40..44].copy_from_slice(&hs.to_le_bytes());
        for (at, f) in [
            (44, &self.backing_format),
            (60, &Some(self.image_format.clone())),
        ] {
            if let Some(f) = f {
                if f.len() >= FMT_LEN {
                    return Err(Error::InvalidArgument(format!(
                        "format name '{f}' is too long for an add-cow header"
                    )));
                }
                h[at..at + f.len()].copy_from_slice(f.as_bytes());
            }
        }
        Self::parse(&h).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        Ok(h)
    }

    /// Bytes of COW bitmap needed for an image file of `virtual_size` bytes.
    pub fn bitmap_len(&self, virtual_size: u64) -> u64 {
        virtual_size.div_ceil(self.cluster_size()).div_ceil(8)
    }
}

/// Reads and validates the header of an add-cow file.
pub fn read_header(meta: &dyn Storage) -> Result<AddCowHeader> {
    let flen = meta.len()?;
    let mut fixed = vec![0u8; (FIXED_LEN as u64).min(flen) as usize];
    meta.read_at(&mut fixed, 0)?;
    let hs = AddCowHeader::header_size_of(&fixed)?;
    if flen < hs as u64 {
        return Err(bad(format!(
            "file is truncated ({flen} bytes, the header size is {hs})"
        )));
    }
    let mut h = vec![0u8; hs as usize];
    meta.read_at(&mut h, 0)?;
    AddCowHeader::parse(&h)
}

/// The virtual size of an image file of `file_len` bytes (whole 512-byte sectors, as
/// for raw images).
pub fn virtual_size(file_len: u64) -> u64 {
    file_len
        .checked_add(511)
        .map_or(file_len & !511, |v| v & !511)
}

/// The in-memory COW bitmap: the current bits and which bytes differ from the disk.
#[derive(Debug)]
struct Bitmap {
    bits: Vec<u8>,
    dirty: BTreeSet<usize>,
}

/// An open add-cow image.
#[derive(Debug)]
pub struct AddCow {
    meta: Arc<dyn Storage>,
    image: Arc<dyn Storage>,
    backing: Option<Arc<dyn Image>>,
    header: AddCowHeader,
    len: u64,
    cluster_bits: u32,
    all_allocated: bool,
    writable: bool,
    bitmap: Mutex<Bitmap>,
    /// Clusters whose first write (copy from the backing file) is in progress.
    copying: Mutex<HashSet<u64>>,
    copied_cv: Condvar,
    /// Serializes flushes, so two cannot write the same bitmap bytes out of order.
    flush_lock: Mutex<()>,
}

/// Releases a cluster's copy lock when dropped (also on errors).
struct CopyGuard<'a> {
    img: &'a AddCow,
    cluster: u64,
}

impl Drop for CopyGuard<'_> {
    fn drop(&mut self) {
        let mut set = self.img.copying.lock().unwrap();
        set.remove(&self.cluster);
        drop(set);
        self.img.copied_cv.notify_all();
    }
}

impl AddCow {
    /// Opens an add-cow image from its two files and (optionally) its backing image.
    /// `header` is what [`read_header`] returned for `meta`. The bitmap is loaded whole;
    /// its size comes from the image file's length and is checked against the add-cow
    /// file's before anything is allocated.
    pub fn open(
        meta: Arc<dyn Storage>,
        header: AddCowHeader,
        image: Arc<dyn Storage>,
        backing: Option<Arc<dyn Image>>,
        writable: bool,
    ) -> Result<AddCow> {
        let len = virtual_size(image.len()?);
        let need = header.bitmap_len(len);
        let have = meta.len()?.saturating_sub(header.header_size as u64);
        if have < need {
            return Err(Error::invalid(format!(
                "Invalid add-cow file: COW bitmap is truncated ({have} bytes, {need} needed for a {len}-byte image file)"
            )));
        }
        let need =
            usize::try_from(need).map_err(|_| Error::invalid("add-cow COW bitmap is too large"))?;
        let mut bits = vec![0u8; need];
        meta.read_at(&mut bits, header.header_size as u64)?;
        Ok(AddCow {
            meta,
            image,
            backing,
            cluster_bits: header.cluster_bits,
            all_allocated: header.compatible_features & COMPAT_ALL_ALLOCATED != 0,
            header,
            len,
            writable,
            bitmap: Mutex::new(Bitmap {
                bits,
                dirty: BTreeSet::new(),
            }),
            copying: Mutex::new(HashSet::new()),
            copied_cv: Condvar::new(),
            flush_lock: Mutex::new(()),
        })
    }

    /// The parsed header.
    pub fn header(&self) -> &AddCowHeader {
        &self.header
    }

    /// The add-cow file (header and bitmap).
    pub fn meta_file(&self) -> &Arc<dyn Storage> {
        &self.meta
    }

    /// The image file holding copied clusters at their guest offsets.
    pub fn image_file(&self) -> &Arc<dyn Storage> {
        &self.image
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Number of clusters whose bit is set (in memory, durable or not).
    pub fn copied_clusters(&self) -> u64 {
        let n = self.len.div_ceil(self.cluster_size());
        if self.all_allocated {
            return n;
        }
        let bm = self.bitmap.lock().unwrap();
        // Whole bytes by population count; the last byte's bits past the end are ignored.
        let full = (n / 8) as usize;
        let whole: u64 = bm.bits[..full].iter().map(|b| b.count_ones() as u64).sum();
        whole + (full as u64 * 8..n).filter(|&c| bit(&bm.bits, c)).count() as u64
    }

    fn check_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::Permission("Image is read-only".into()))
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::InvalidArgument(format!(
                "Request {offset}+{len} lies beyond the end of the image ({})",
                self.len
            ))),
        }
    }

    fn is_copied(&self, cluster: u64) -> bool {
        self.all_allocated || bit(&self.bitmap.lock().unwrap().bits, cluster)
    }

    /// From `offset`, how many bytes (at most `len`, at least 1 when `len > 0`) share one
    /// copied state, and that state.
    fn run(&self, offset: u64, len: u64) -> (bool, u64) {
        if self.all_allocated {
            return (true, len);
        }
        let cb = self.cluster_bits;
        let end = offset + len;
        let last = (end - 1) >> cb;
        let bm = self.bitmap.lock().unwrap();
        let first = offset >> cb;
        let state = bit(&bm.bits, first);
        let mut c = first + 1;
        while c <= last {
            // Whole bytes equal to the run's state are skipped eight clusters at a time.
            if c.is_multiple_of(8) && c + 8 <= last + 1 {
                let byte = bm.bits[(c / 8) as usize];
                if byte == if state { 0xff } else { 0 } {
                    c += 8;
                    continue;
                }
            }
            if bit(&bm.bits, c) != state {
                break;
            }
            c += 1;
        }
        let run_end = (c << cb).min(end);
        (state, run_end - offset)
    }

    fn set_copied(&self, cluster: u64) {
        let mut bm = self.bitmap.lock().unwrap();
        let (byte, mask) = ((cluster / 8) as usize, 1u8 << (cluster % 8));
        if bm.bits[byte] & mask == 0 {
            bm.bits[byte] |= mask;
            bm.dirty.insert(byte);
        }
    }

    /// Reads guest data from the backing file (zeros past its end or without one).
    fn read_backing(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let n = match &self.backing {
            Some(b) if offset < b.len() => {
                let n = (buf.len() as u64).min(b.len() - offset) as usize;
                b.read_at(&mut buf[..n], offset)?;
                n
            }
            _ => 0,
        };
        buf[n..].fill(0);
        Ok(())
    }

    /// Whether a cluster not yet copied reads as zeros (nothing of the backing file
    /// under it).
    fn backing_is_zero_at(&self, cstart: u64) -> bool {
        self.backing.as_ref().is_none_or(|b| cstart >= b.len())
    }

    /// The guest range of a cluster (the last one may be short).
    fn cluster_range(&self, cluster: u64) -> (u64, u64) {
        let start = cluster << self.cluster_bits;
        (start, (start + self.cluster_size()).min(self.len))
    }

    /// Takes the copy lock of `cluster`, waiting while another writer holds it.
    fn lock_cluster(&self, cluster: u64) -> CopyGuard<'_> {
        let mut set = self.copying.lock().unwrap();
        while set.contains(&cluster) {
            set = self.copied_cv.wait(set).unwrap();
        }
        set.insert(cluster);
        CopyGuard { img: self, cluster }
    }

    /// Writes into one cluster that was not copied when the caller looked: under the
    /// cluster's lock, either it has been copied meanwhile (plain write) or the new bytes
    /// are merged with the backing file's and the whole cluster is written, then its bit
    /// is set. `data: None` writes zeros.
    fn write_uncopied(
        &self,
        cluster: u64,
        pos: u64,
        len: u64,
        data: Option<&[u8]>,
        may_unmap: bool,
    ) -> Result<()> {
        let _guard = self.lock_cluster(cluster);
        let (cstart, cend) = self.cluster_range(cluster);
        if self.is_copied(cluster) {
            return match data {
                Some(d) => self.image.write_at(d, pos),
                None => self.zero_image(pos, len, may_unmap),
            };
        }
        if pos == cstart && pos + len == cend {
            match data {
                Some(d) => self.image.write_at(d, pos)?,
                None => self.zero_image(pos, len, may_unmap)?,
            }
        } else {
            let mut buf = vec![0u8; (cend - cstart) as usize];
            self.read_backing(&mut buf, cstart)?;
            let at = (pos - cstart) as usize;
            match data {
                Some(d) => buf[at..at + d.len()].copy_from_slice(d),
                None => buf[at..at + len as usize].fill(0),
            }
            self.image.write_at(&buf, cstart)?;
        }
        self.set_copied(cluster);
        Ok(())
    }

    fn zero_image(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        if may_unmap {
            self.image.punch_hole(offset, len)
        } else {
            self.image.zero_range(offset, len)
        }
    }

    /// Writes the dirty bitmap bytes after making the image file durable (see the
    /// module documentation for why in this order).
    fn flush_bitmap(&self) -> Result<()> {
        let _f = self.flush_lock.lock().unwrap();
        let runs = {
            let mut bm = self.bitmap.lock().unwrap();
            let dirty = std::mem::take(&mut bm.dirty);
            let mut runs: Vec<(usize, Vec<u8>)> = Vec::new();
            for i in dirty {
                match runs.last_mut() {
                    Some((s, v)) if *s + v.len() == i => v.push(bm.bits[i]),
                    _ => runs.push((i, vec![bm.bits[i]])),
                }
            }
            runs
        };
        let requeue = |runs: &[(usize, Vec<u8>)]| {
            let mut bm = self.bitmap.lock().unwrap();
            for (s, v) in runs {
                bm.dirty.extend(*s..*s + v.len());
            }
        };
        let r = (|| {
            self.image.flush()?;
            if runs.is_empty() {
                return Ok(());
            }
            for (s, v) in &runs {
                self.meta
                    .write_at(v, self.header.header_size as u64 + *s as u64)?;
            }
            self.meta.flush()
        })();
        if r.is_err() {
            requeue(&runs);
        }
        r
    }

    fn lock_bitmap(&self) -> MutexGuard<'_, Bitmap> {
        self.bitmap.lock().unwrap()
    }
}

fn bit(bits: &[u8], cluster: u64) -> bool {
    bits[(cluster / 8) as usize] & (1 << (cluster % 8)) != 0
}

impl Drop for AddCow {
    fn drop(&mut self) {
        // Errors cannot be reported from drop; callers who care flush first.
        let dirty = !self.lock_bitmap().dirty.is_empty();
        if self.writable && dirty {
            let _ = self.flush_bitmap();
        }
    }
}

impl Image for AddCow {
    fn format_name(&self) -> &'static str {
        "add-cow"
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (copied, n) = self.run(pos, (buf.len() - done) as u64);
            let out = &mut buf[done..done + n as usize];
            if copied {
                self.image.read_at(out, pos)?;
            } else {
                self.read_backing(out, pos)?;
            }
            done += n as usize;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (copied, n) = self.run(pos, (buf.len() - done) as u64);
            if copied {
                self.image.write_at(&buf[done..done + n as usize], pos)?;
                done += n as usize;
                continue;
            }
            // Uncopied clusters one at a time, each under its own lock.
            let end = pos + n;
            let mut p = pos;
            while p < end {
                let cluster = p >> self.cluster_bits;
                let cend = self.cluster_range(cluster).1.min(end);
                let d = &buf[(p - offset) as usize..(cend - offset) as usize];
                self.write_uncopied(cluster, p, cend - p, Some(d), false)?;
                p = cend;
            }
            done += n as usize;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let (copied, n) = self.run(pos, end - pos);
            if copied {
                self.zero_image(pos, n, may_unmap)?;
                pos += n;
                continue;
            }
            let rend = pos + n;
            while pos < rend {
                let cluster = pos >> self.cluster_bits;
                let (cstart, cend) = self.cluster_range(cluster);
                let cend = cend.min(rend);
                // A cluster still on the backing file where the backing file has nothing
                // already reads as zeros: leave it alone.
                if !self.backing_is_zero_at(cstart) {
                    self.write_uncopied(cluster, pos, cend - pos, None, may_unmap)?;
                }
                pos = cend;
            }
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let (copied, n) = self.run(pos, end - pos);
            if copied {
                self.image.punch_hole(pos, n)?;
            }
            pos += n;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.flush_bitmap()
    }

    fn start_writeback(&self) {
        self.image.start_writeback()
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let len = len.min(self.len.saturating_sub(offset));
        if len == 0 {
            return Ok(Extent {
                start: offset,
                len: 0,
                status: Status::UNALLOCATED,
            });
        }
        let (copied, n) = self.run(offset, len);
        if !copied {
            return Ok(Extent {
                start: offset,
                len: n,
                status: Status::UNALLOCATED,
            });
        }
        // Copied clusters are refined by the image file's holes, as for raw images.
        let mut status = Status {
            allocated: true,
            data: true,
            zero: false,
            offset: Some(offset),
            compressed: false,
        };
        let n = match self.image.next_data(offset)? {
            None => n,
            Some((d, h)) if d <= offset => (h - offset).min(n),
            Some((d, _)) => {
                status.data = false;
                status.zero = true;
                (d - offset).min(n)
            }
        };
        Ok(Extent {
            start: offset,
            len: n.max(1),
            status,
        })
    }

    fn backing(&self) -> Option<&Arc<dyn Image>> {
        self.backing.as_ref()
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Whether two paths name the same file, for files that may not exist yet (then their
/// directories are compared).
fn same_file(a: &Path, b: &Path) -> bool {
    let canon = |p: &Path| {
        std::fs::canonicalize(p).ok().or_else(|| {
            let dir = match p.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            Some(std::fs::canonicalize(dir).ok()?.join(p.file_name()?))
        })
    };
    match (canon(a), canon(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// What `qimg create -f add-cow` asks for.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Virtual size (rounded up to 512 bytes); `None`: the existing image file's size.
    pub size: Option<u64>,
    /// Image file name as recorded (relative to the add-cow file's directory).
    pub image_file: String,
    /// Backing file name as recorded.
    pub backing_file: Option<String>,
    /// Backing file format as recorded.
    pub backing_format: Option<String>,
    /// Cluster size in bytes (`None`: 64 KiB).
    pub cluster_size: Option<u64>,
}

/// The header size new files get: the larger of 4096 and the cluster size, grown to a
/// 4 KiB multiple when the names need more room.
pub fn new_header_size(cluster_size: u64, names_len: u64) -> u64 {
    let need = (NAMES_START as u64 + names_len).next_multiple_of(4096);
    need.max(4096).max(cluster_size)
}

/// Creates an add-cow file at `path`. The image file (resolved relative to `path`'s
/// directory) is created sparse when missing; an existing one is kept, and extended when
/// it is shorter than the requested size (a longer one is an error: its size is the
/// virtual size). The new bitmap is all clear: every cluster reads from the backing file.
pub fn create(path: &Path, o: &CreateOptions) -> Result<()> {
    let cs = o.cluster_size.unwrap_or(1 << DEFAULT_CLUSTER_BITS);
    if !cs.is_power_of_two() || !((1 << MIN_CLUSTER_BITS)..=(1 << MAX_CLUSTER_BITS)).contains(&cs) {
        return Err(Error::InvalidArgument(
            "Cluster size must be a power of two between 512 and 2048k".into(),
        ));
    }
    if o.image_file.is_empty() {
        return Err(Error::InvalidArgument(
            "add-cow images need an image file (-o image_file=NAME)".into(),
        ));
    }
    let names_len =
        o.image_file.len() as u64 + o.backing_file.as_ref().map_or(0, |b| b.len() as u64);
    let header = AddCowHeader {
        backing_file: o.backing_file.clone(),
        backing_format: o.backing_format.clone(),
        image_file: o.image_file.clone(),
        image_format: "raw".into(),
        cluster_bits: cs.trailing_zeros(),
        features: 0,
        compatible_features: 0,
        header_size: u32::try_from(new_header_size(cs, names_len))
            .map_err(|_| Error::InvalidArgument("add-cow file names are too long".into()))?,
    };
    let hbytes = header.serialize()?;
    let ipath = crate::open::resolve_relative(path, &o.image_file);
    if same_file(&ipath, path) {
        return Err(Error::InvalidArgument(
            "The image file cannot be the add-cow file itself".into(),
        ));
    }
    if let Some(b) = &o.backing_file {
        let bpath = crate::open::resolve_relative(path, b);
        if same_file(&ipath, &bpath) {
            return Err(Error::InvalidArgument(
                "The image file cannot be the backing file".into(),
            ));
        }
        if same_file(path, &bpath) {
            return Err(Error::InvalidArgument(
                "The add-cow file cannot be its own backing file".into(),
            ));
        }
    }
    let max = (i64::MAX as u64) & !511;
    let size = match o.size {
        Some(s) if s > max => return Err(Error::InvalidArgument("Image size is too large".into())),
        Some(s) => Some(virtual_size(s)),
        None => None,
    };
    let image = if ipath.exists() {
        let f = FileStorage::open(&ipath, true)?;
        let cur = virtual_size(f.len()?);
        if let Some(s) = size {
            if cur > s {
                return Err(Error::InvalidArgument(format!(
                    "Image file '{}' is larger ({cur} bytes) than the requested size ({s} bytes)",
                    o.image_file
                )));
            }
            if cur < s {
                f.set_len(s)?;
            }
        }
        f
    } else {
        let Some(s) = size else {
            return Err(Error::InvalidArgument(
                "Image creation needs a size parameter".into(),
            ));
        };
        let f = FileStorage::create(&ipath)?;
        f.set_len(s)?;
        f
    };
    let vsize = virtual_size(image.len()?);
    image.flush()?;
    let meta = FileStorage::create(path)?;
    meta.write_at(&hbytes, 0)?;
    meta.set_len(hbytes.len() as u64 + header.bitmap_len(vsize))?;
    meta.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn hdr() -> AddCowHeader {
        AddCowHeader {
            backing_file: Some("base.qcow2".into()),
            backing_format: Some("qcow2".into()),
            image_file: "disk.raw".into(),
            image_format: "raw".into(),
            cluster_bits: 16,
            features: 0,
            compatible_features: 0,
            header_size: 4096,
        }
    }

    #[test]
    fn round_trip() {
        let h = hdr();
        let b = h.serialize().unwrap();
        assert_eq!(b.len(), 4096);
        assert_eq!(&b[..4], b"ACOW");
        assert_eq!(le32(&b, 4), 80);
        assert_eq!(le32(&b, 8), 10);
        assert_eq!(le32(&b, 12), 90);
        assert_eq!(&b[44..50], b"qcow2\0");
        assert_eq!(AddCowHeader::parse(&b).unwrap(), h);
        let mut nb = h.clone();
        nb.backing_file = None;
        nb.backing_format = None;
        let b = nb.serialize().unwrap();
        assert_eq!(AddCowHeader::parse(&b).unwrap(), nb);
    }

    fn err(b: &[u8]) -> String {
        let e = AddCowHeader::parse(b).unwrap_err().to_string();
        assert!(!e.contains('\n'), "{e}");
        e
    }

    #[test]
    fn rejects_bad_fields() {
        let good = hdr().serialize().unwrap();
        let with = |at: usize, v: &[u8]| {
            let mut b = good.clone();
            b[at..at + v.len()].copy_from_slice(v);
            b
        };
        assert!(err(&with(0, b"QFI\xfb")).contains("magic"));
        assert!(err(&good[..50]).contains("truncated"));
        assert!(err(&good[..1000]).contains("truncated"));
        assert!(err(&with(40, &10u32.to_le_bytes())).contains("header size"));
        assert!(err(&with(40, &u32::MAX.to_le_bytes())).contains("header size"));
        assert!(err(&with(20, &8u32.to_le_bytes())).contains("cluster bits"));
        assert!(err(&with(20, &22u32.to_le_bytes())).contains("cluster bits"));
        assert!(err(&with(24, &1u64.to_le_bytes())).contains("features"));
        assert!(err(&with(4, &4090u32.to_le_bytes())).contains("backing file name"));
        assert!(err(&with(4, &10u32.to_le_bytes())).contains("backing file name"));
        assert!(err(&with(4, &0u32.to_le_bytes())).contains("without a name offset"));
        assert!(err(&with(8, &0u32.to_le_bytes())).contains("length 0"));
        assert!(err(&with(12, &0u32.to_le_bytes())).contains("no image file name"));
        assert!(err(&with(16, &u32::MAX.to_le_bytes())).contains("image file name"));
        assert!(err(&with(12, &u32::MAX.to_le_bytes())).contains("image file name"));
        assert!(err(&with(80, b"\0")).contains("NUL"));
        assert!(err(&with(80, b"\xff")).contains("UTF-8"));
        assert!(err(&with(44, b"qcow2qcow2qcow2q")).contains("NUL-terminated"));
        assert!(err(&with(50, b"x")).contains("terminator"));
        assert!(err(&with(60, b"qcow2\0")).contains("only raw"));
        let mut nb = hdr();
        nb.backing_file = None;
        nb.backing_format = None;
        let b = nb.serialize().unwrap();
        let mut b2 = b.clone();
        b2[44..49].copy_from_slice(b"qcow2");
        assert!(err(&b2).contains("without a backing file"));
        // Compatible features are ignored; an empty image format means raw.
        let mut b3 = with(32, &(1u64 << 40).to_le_bytes());
        b3[60..64].fill(0);
        assert_eq!(AddCowHeader::parse(&b3).unwrap().image_format, "raw");
    }

    fn image(size: u64, cs_bits: u32, backing: Option<Vec<u8>>) -> AddCow {
        let mut h = hdr();
        h.cluster_bits = cs_bits;
        if backing.is_none() {
            h.backing_file = None;
            h.backing_format = None;
        }
        let mut meta = h.serialize().unwrap();
        meta.resize(meta.len() + h.bitmap_len(size) as usize, 0);
        let meta = Arc::new(MemStorage::new(meta));
        let img = Arc::new(MemStorage::new(vec![0u8; size as usize]));
        let b = backing.map(|d| {
            Arc::new(crate::raw::Raw::open(Arc::new(MemStorage::new(d)), false).unwrap())
                as Arc<dyn Image>
        });
        AddCow::open(meta, h, img, b, true).unwrap()
    }

    #[test]
    fn cow_and_status() {
        let back: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8 + 1).collect();
        let a = image(16384, 12, Some(back.clone()));
        let mut got = vec![0u8; 16384];
        a.read_at(&mut got, 0).unwrap();
        assert_eq!(&got[..8192], &back[..]);
        assert!(got[8192..].iter().all(|&b| b == 0));
        a.write_at(&[0xaa; 100], 5000).unwrap();
        a.read_at(&mut got, 0).unwrap();
        assert_eq!(&got[4096..5000], &back[4096..5000]);
        assert!(got[5000..5100].iter().all(|&b| b == 0xaa));
        assert_eq!(&got[5100..8192], &back[5100..8192]);
        let e = a.block_status(0, 16384).unwrap();
        assert_eq!((e.len, e.status.allocated), (4096, false));
        let e = a.block_status(4096, 16384 - 4096).unwrap();
        assert_eq!(
            (e.len, e.status.allocated, e.status.offset),
            (4096, true, Some(4096))
        );
        // Zeroing a cluster past the backing file's end changes nothing on disk.
        a.write_zeroes(12288, 4096, false).unwrap();
        assert_eq!(a.copied_clusters(), 1);
        a.write_zeroes(0, 10, true).unwrap();
        a.read_at(&mut got, 0).unwrap();
        assert!(got[..10].iter().all(|&b| b == 0));
        assert_eq!(&got[10..4096], &back[10..4096]);
        assert_eq!(a.copied_clusters(), 2);
        // Bits reach the add-cow file only on flush.
        let hs = a.header().header_size as usize;
        let meta_bits = |a: &AddCow| {
            let mut b = [0u8; 1];
            a.meta_file().read_at(&mut b, hs as u64).unwrap();
            b[0]
        };
        assert_eq!(meta_bits(&a), 0);
        a.flush().unwrap();
        assert_eq!(meta_bits(&a), 0b11);
    }
}
