//! The image GUID and key/value metadata of a qcow2 image (layout in
//! [`crate::ondisk::meta`]).
//!
//! # Reading
//! Opening an image never looks inside the two extensions: like QEMU, the engine keeps
//! them as opaque header extensions, so a damaged one affects only [`Qcow2::guid`] and
//! [`Qcow2::metadata`], which report it, and not `info`, `check` or guest I/O.
//!
//! # Changing
//! [`Qcow2::update_metadata`] (on an open writable image) and [`update_header_metadata`]
//! (on the locked file alone, for `qimg meta`) apply a list of edits in memory and then
//! rewrite the header cluster once, the way `rebase -u` changes the backing file name:
//! pending metadata is flushed (fdatasync), the header as it is on disk is read back,
//! the two extensions are replaced (after every other extension), and the whole cluster
//! is written with one write and flushed again. Nothing else in the image changes: no
//! cluster is allocated or freed, and an edit that changes nothing writes nothing.
//!
//! # Space
//! The header, every extension and the backing file name share the first cluster, and
//! QEMU refuses a header that does not fit in it. QEMU also grows the header on its own:
//! `qemu-img bitmap --add` adds the 32-byte bitmaps extension, and upgrading a version 2
//! image to version 3 (`amend -o compat=1.1`) adds 40 header bytes, plus the 392-byte
//! feature name table for clusters over 4 KiB. Measured with qemu-img 10.0.2: with the
//! header cluster full, `bitmap --add` fails with "No space left on device" and
//! `rebase -u` with "No space left in the file header". So a change that grows the
//! header must leave that room free ([`Qcow2::metadata_space`]); a change that shrinks
//! it is always accepted. A longer backing file name is not reserved for.
//!
//! # Power cuts
//! Pending metadata is flushed first, so a cut can only ever affect the header cluster;
//! the image's tables and data are never touched (checked at every cut point, with
//! every combination of torn sectors, in `crates/qimg/tests/meta_crash.rs`).
//!
//! QEMU rewrites the whole header cluster with one write, which is atomic only when the
//! bytes that change lie in one 512-byte sector (storage is assumed to write sectors
//! atomically, as everywhere in the engine). qimg does the same single write in that
//! case: always with 512-byte clusters, and for small changes. A larger change is
//! staged (`Staged` below) so that no torn state is ever unreadable or names the wrong
//! backing file (which a single torn write can do: measured, a new first sector with
//! old later ones reads the backing file name from the wrong place):
//!
//! 1. the backing file name is copied to space neither header uses and the offset in
//!    the first sector switched to it (one 8-byte write);
//! 2. if the old extensions reach past the sector where the first changed extension
//!    starts, an end marker is written at that extension: the image is briefly without
//!    that extension and the ones after it;
//! 3. the new extension bytes after that sector are written (nothing references them);
//! 4. that sector is written last: the switch.
//!
//! Every step is flushed before the next, so after a cut the GUID and the keys are each
//! the old value, the new one or absent, and everything else reads as before. The name
//! stays where step 1 put it until QEMU's next header rewrite moves it back; QEMU reads
//! it wherever the offset points. Running the command again completes an interrupted
//! change (a `--remove` of a key that is then already gone reports it missing).
//!
//! When the header cluster has no room for the name past both the old and the new
//! extensions (a nearly full header), the change falls back to the single write.

use super::Qcow2;
use crate::error::{Error, Result};
use crate::ondisk::header::{Header, V2_HEADER_LEN, V3_HEADER_LEN};
use crate::ondisk::meta::{self, Guid, Metadata, GUID_EXT, KV_EXT};
use crate::storage::Storage;

/// Bytes the bitmaps header extension takes (8-byte extension header, 24 bytes of data).
const BITMAPS_EXT_BYTES: usize = 32;
/// Bytes the feature name table takes (8-byte extension header, 8 entries of 48 bytes).
const FEATURE_TABLE_BYTES: usize = 392;

/// One change to an image's GUID or key/value metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaEdit {
    /// Sets a key (inserted or replaced).
    Set(String, Vec<u8>),
    /// Removes a key; fails when the key does not exist.
    Remove(String),
    /// Removes every key, even from an extension that does not decode.
    Clear,
    /// Sets the GUID.
    SetGuid(Guid),
    /// Sets a new random (version 4) GUID.
    NewGuid,
    /// Removes the GUID.
    RemoveGuid,
}

/// How much header space metadata may use (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaSpace {
    /// Size of the header cluster.
    pub cluster_size: usize,
    /// Bytes of the header cluster in use now.
    pub used: usize,
    /// Bytes kept free for what QEMU may add to the header on its own.
    pub reserved: usize,
}

impl MetaSpace {
    /// Bytes a change may still add to the header.
    pub fn available(&self) -> usize {
        self.cluster_size
            .saturating_sub(self.used)
            .saturating_sub(self.reserved)
    }
}

/// The data of the one extension of type `typ` in `h`, if any; several copies of it
/// are an error, since which one holds the truth cannot be told.
fn single_ext(h: &Header, typ: u32, what: &str) -> Result<Option<Vec<u8>>> {
    let mut found = h.unknown_extensions.iter().filter(|(t, _)| *t == typ);
    let first = found.next();
    let more = found.count();
    if more > 0 {
        return Err(Error::invalid(format!(
            "{what} extension appears {} times in the header",
            more + 1
        )));
    }
    Ok(first.map(|(_, d)| d.clone()))
}

fn read_guid(h: &Header) -> Result<Option<Guid>> {
    single_ext(h, GUID_EXT, "image GUID")?
        .map(|d| Guid::decode(&d))
        .transpose()
}

fn read_kv(h: &Header) -> Result<Metadata> {
    match single_ext(h, KV_EXT, "key/value metadata")? {
        Some(d) => meta::decode_kv(&d),
        None => Ok(Metadata::new()),
    }
}

/// Room QEMU needs to grow header `h` by itself (see the module docs).
fn reserve_for(h: &Header) -> usize {
    let mut r = 0;
    if h.bitmaps.is_none() {
        r += BITMAPS_EXT_BYTES;
    }
    if h.version < 3 {
        r += (V3_HEADER_LEN - V2_HEADER_LEN) as usize;
        if h.cluster_size() > 4096 {
            r += FEATURE_TABLE_BYTES;
        }
    }
    r
}

impl Qcow2 {
    /// The image GUID, `None` when the image has none. Fails when the GUID extension is
    /// malformed (wrong length, or present more than once).
    pub fn guid(&self) -> Result<Option<Guid>> {
        read_guid(&self.header)
    }

    /// The key/value metadata (empty when the image has none). Fails, naming the field,
    /// when the extension is malformed.
    pub fn metadata(&self) -> Result<Metadata> {
        read_kv(&self.header)
    }

    /// How much header space is in use and how much a change may add.
    pub fn metadata_space(&self) -> MetaSpace {
        MetaSpace {
            cluster_size: self.cluster_size() as usize,
            used: self.header.serialized_len(),
            reserved: reserve_for(&self.header),
        }
    }

    /// Sets one key.
    pub fn set_metadata(&mut self, key: &str, value: &[u8]) -> Result<()> {
        self.update_metadata(&[MetaEdit::Set(key.to_string(), value.to_vec())])
            .map(|_| ())
    }

    /// Removes one key; fails when it does not exist.
    pub fn remove_metadata(&mut self, key: &str) -> Result<()> {
        self.update_metadata(&[MetaEdit::Remove(key.to_string())])
            .map(|_| ())
    }

    /// Sets the GUID, or removes it with `None`.
    pub fn set_guid(&mut self, guid: Option<Guid>) -> Result<()> {
        let edit = match guid {
            Some(g) => MetaEdit::SetGuid(g),
            None => MetaEdit::RemoveGuid,
        };
        self.update_metadata(&[edit]).map(|_| ())
    }

    /// Gives the image a new random GUID and returns it.
    pub fn generate_guid(&mut self) -> Result<Guid> {
        self.update_metadata(&[MetaEdit::NewGuid])?
            .ok_or_else(|| Error::Corrupt("GUID missing after it was set".into()))
    }

    /// Applies `edits` in order and rewrites the header once (module docs: space and
    /// power cuts). Either every edit is applied or, on error, the file is not touched.
    /// Returns the GUID the image has afterwards. Needs a writable image.
    pub fn update_metadata(&mut self, edits: &[MetaEdit]) -> Result<Option<Guid>> {
        if self.ws.get_mut().unwrap().is_none() {
            return Err(Error::Permission("Image is read-only".into()));
        }
        // Refcounts, tables and bitmap state reach the disk before the header changes,
        // so the header read back is the whole truth and a cut affects it alone.
        self.flush_metadata(false)?;
        let (new, guid) = update_header_metadata(self.file.as_ref(), edits)?;
        self.header.unknown_extensions = new.unknown_extensions;
        self.header.backing_file_offset = new.backing_file_offset;
        self.header.backing_file_size = new.backing_file_size;
        Ok(guid)
    }
}

/// Applies `edits` to the header of the qcow2 image in `file` and rewrites it once, as
/// [`Qcow2::update_metadata`] does, for callers that change nothing but the header and
/// so need no open engine (`qimg meta`): bitmaps stay as stored, a dirty image is not
/// repaired first. The caller holds the image's write lock and has validated the image
/// (by opening it read-only); nothing else may be writing to `file`.
///
/// Returns the header as written (as read when nothing changed) and the image's GUID.
pub fn update_header_metadata(
    file: &dyn Storage,
    edits: &[MetaEdit],
) -> Result<(Header, Option<Guid>)> {
    let mut first = vec![0u8; Header::min_read()];
    file.read_at(&mut first, 0)?;
    let bits = crate::ondisk::be32(&first, 20);
    if !(9..=21).contains(&bits) {
        Header::parse(&first)?;
        return Err(Error::invalid(format!(
            "Unsupported cluster size: 2^{bits}"
        )));
    }
    let cs = 1usize << bits;
    let mut buf = vec![0u8; cs];
    file.read_at(&mut buf, 0)?;
    let disk = Header::parse(&buf)?;

    // A damaged extension only matters to edits that need its contents.
    let mut guid: Result<Option<Guid>> = read_guid(&disk);
    let mut kv: Result<Metadata> = read_kv(&disk);
    for e in edits {
        match e {
            MetaEdit::Set(k, v) => {
                meta::check_key(k)?;
                kv.as_mut()
                    .map_err(|e| clone_err(e))?
                    .insert(k.clone(), v.clone());
            }
            MetaEdit::Remove(k) => {
                if kv.as_mut().map_err(|e| clone_err(e))?.remove(k).is_none() {
                    return Err(Error::NotFound(format!("Metadata key '{k}' not found")));
                }
            }
            MetaEdit::Clear => kv = Ok(Metadata::new()),
            MetaEdit::SetGuid(g) => guid = Ok(Some(*g)),
            MetaEdit::NewGuid => guid = Ok(Some(Guid::new_v4()?)),
            MetaEdit::RemoveGuid => guid = Ok(None),
        }
    }
    let old_of = |typ: u32| -> Vec<(u32, Vec<u8>)> {
        disk.unknown_extensions
            .iter()
            .filter(|(t, _)| *t == typ)
            .cloned()
            .collect()
    };
    // An extension no edit touched is kept byte for byte, even a damaged one, so that
    // editing the other one still works.
    let new_guid = match &guid {
        Ok(Some(g)) => vec![(GUID_EXT, g.0.to_vec())],
        Ok(None) => Vec::new(),
        Err(_) => old_of(GUID_EXT),
    };
    let new_kv = match &kv {
        Ok(m) if m.is_empty() => Vec::new(),
        Ok(m) => vec![(KV_EXT, meta::encode_kv(m)?)],
        Err(_) => old_of(KV_EXT),
    };
    let result = guid.ok().flatten();
    // QEMU may have reversed their order; only their contents count.
    if new_guid == old_of(GUID_EXT) && new_kv == old_of(KV_EXT) {
        return Ok((disk, result));
    }
    let mut new = disk.clone();
    new.unknown_extensions
        .retain(|(t, _)| *t != GUID_EXT && *t != KV_EXT);
    new.unknown_extensions.extend(new_guid);
    new.unknown_extensions.extend(new_kv);

    let old_len = disk.serialized_len();
    let new_len = new.serialized_len();
    let reserved = reserve_for(&disk);
    if new_len > old_len && new_len + reserved > cs {
        let avail = cs.saturating_sub(old_len).saturating_sub(reserved);
        return Err(Error::InvalidArgument(format!(
            "Metadata does not fit in the image header: the change needs {} more bytes, {avail} are free (header cluster {cs} bytes, {old_len} used, {reserved} kept free for QEMU)",
            new_len - old_len
        )));
    }
    // Whatever a writer left unflushed is durable before the header changes.
    file.flush()?;
    let canonical = new.serialize()?;
    let changed = (0..cs / SECTOR)
        .filter(|&i| buf[i * SECTOR..(i + 1) * SECTOR] != canonical[i * SECTOR..(i + 1) * SECTOR])
        .count();
    if changed > 1 {
        if let Some(plan) = Staged::plan(&disk, &buf, &new, &canonical) {
            plan.run(file)?;
            new.backing_file_offset = plan.name_at as u64;
            return Ok((new, result));
        }
    }
    // One changed sector: a single write is the atomic switch. (Or a staged change does
    // not fit: the plain rewrite QEMU itself would do.)
    file.write_at(&canonical, 0)?;
    file.flush()?;
    Ok((new, result))
}

/// The unit a device writes atomically, as the rest of the engine assumes.
const SECTOR: usize = 512;

/// Where the extension chain of the header cluster `buf` ends: the offset just past
/// the end marker (or `limit`, where extensions may run up to without one).
fn chain_end(buf: &[u8], start: usize, limit: usize) -> usize {
    let mut off = start;
    while off + 8 <= limit {
        let typ = crate::ondisk::be32(buf, off);
        let len = crate::ondisk::be32(buf, off + 4) as usize;
        if typ == 0 {
            return off + 8;
        }
        off = off.saturating_add(8 + len.div_ceil(8) * 8);
    }
    limit.min(off)
}

/// A header change spread over several sectors, done so that a power cut at any point
/// leaves the old metadata, the new metadata or none, and always the right backing file
/// name:
///
/// 1. the backing file name is written where neither header uses the space (unless it
///    can stay where it is), and the backing file offset switched to it with one small
///    write;
/// 2. unless the old extensions end within the sector where the first changed one starts,
///    an end marker is written there: the chain ends before qimg's extensions (metadata
///    briefly gone, everything else intact; so is, for this window, an extension of
///    another program that QEMU's reordering had put after them, and that the new
///    header puts before them);
/// 3. the sectors after that one get their new contents (nothing reads them now);
/// 4. that sector is written last: one sector, the switch.
///
/// Each step is flushed before the next. The name stays at its new place (QEMU reads it
/// wherever the offset points, and moves it back on its next header rewrite).
#[derive(Debug)]
struct Staged {
    /// Final contents of the header cluster.
    target: Vec<u8>,
    /// Current contents.
    current: Vec<u8>,
    /// Offset of the first extension that changes (an extension boundary in both).
    first: usize,
    /// Final offset of the backing file name.
    name_at: usize,
    /// The name and the offset it has now, if any.
    name: Option<(Vec<u8>, usize)>,
    /// Whether the old chain reaches past the sector of `first`.
    truncate: bool,
}

impl Staged {
    fn plan(old: &Header, current: &[u8], new: &Header, canonical: &[u8]) -> Option<Staged> {
        let cs = current.len();
        let fixed = if new.version >= 3 {
            new.header_length as usize
        } else {
            crate::ondisk::header::V2_HEADER_LEN as usize
        };
        // Walk the new chain to the first extension whose bytes differ from the old ones
        // at the same place: everything before it is shared by both chains.
        let new_end = chain_end(canonical, fixed, cs);
        let mut first = fixed;
        while first + 8 <= new_end {
            let len = crate::ondisk::be32(canonical, first + 4) as usize;
            let next = (first + 8 + len.div_ceil(8) * 8).min(new_end);
            if crate::ondisk::be32(canonical, first) == 0
                || current[first..next] != canonical[first..next]
            {
                break;
            }
            first = next;
        }
        let old_limit = if old.backing_file_offset != 0 {
            old.backing_file_offset as usize
        } else {
            cs
        };
        let old_chain_end = chain_end(current, fixed, old_limit.min(cs));
        let mut target = canonical.to_vec();
        let (name_at, name) = match &new.backing_file {
            None => (0, None),
            Some(n) => {
                let n = n.as_bytes().to_vec();
                let a = old.backing_file_offset as usize;
                let old_end = old_chain_end.max(a + old.backing_file_size as usize);
                let b = if a >= new_end && a + n.len() <= cs {
                    a
                } else {
                    old_end.max(new_end).div_ceil(8) * 8
                };
                if b + n.len() > cs {
                    return None;
                }
                let canon_at = new.backing_file_offset as usize;
                target[canon_at..canon_at + n.len()].fill(0);
                target[b..b + n.len()].copy_from_slice(&n);
                crate::ondisk::put64(&mut target, 8, b as u64);
                (b, Some((n, a)))
            }
        };
        let truncate = old_chain_end > (first / SECTOR + 1) * SECTOR;
        Some(Staged {
            target,
            current: current.to_vec(),
            first,
            name_at,
            name,
            truncate,
        })
    }

    fn run(&self, file: &dyn Storage) -> Result<()> {
        let sp = self.first / SECTOR;
        let mut cur = self.current.clone();
        let write = |cur: &mut Vec<u8>, from: usize, to: usize, bytes: &[u8]| -> Result<()> {
            cur[from..to].copy_from_slice(bytes);
            file.write_at(bytes, from as u64)?;
            file.flush()
        };
        if let Some((n, a)) = &self.name {
            let b = self.name_at;
            if b != *a {
                write(&mut cur, b, b + n.len(), n)?;
                let mut off = [0u8; 8];
                crate::ondisk::put64(&mut off, 0, b as u64);
                if sp == 0 && self.truncate {
                    // Offset and end marker in one sector write.
                    let mut s0 = cur[..SECTOR].to_vec();
                    s0[8..16].copy_from_slice(&off);
                    s0[self.first..self.first + 8].fill(0);
                    write(&mut cur, 0, SECTOR, &s0)?;
                } else {
                    write(&mut cur, 8, 16, &off)?;
                }
            }
        }
        if self.truncate && cur[self.first..self.first + 8] != [0u8; 8] {
            write(&mut cur, self.first, self.first + 8, &[0u8; 8])?;
        }
        // Nothing references the sectors after the switch sector now.
        let tail = (sp + 1) * SECTOR;
        let differs = |i: usize, cur: &[u8]| {
            cur[i * SECTOR..(i + 1) * SECTOR] != self.target[i * SECTOR..(i + 1) * SECTOR]
        };
        let n = cur.len() / SECTOR;
        if let Some(last) = (sp + 1..n).rev().find(|&i| differs(i, &cur)) {
            let end = (last + 1) * SECTOR;
            let bytes = self.target[tail..end].to_vec();
            write(&mut cur, tail, end, &bytes)?;
        }
        let bytes = self.target[sp * SECTOR..tail].to_vec();
        write(&mut cur, sp * SECTOR, tail, &bytes)?;
        debug_assert_eq!(cur, self.target);
        Ok(())
    }
}

/// Errors are not `Clone`; the decoding errors are all `Invalid` or `Unsupported`.
fn clone_err(e: &Error) -> Error {
    match e {
        Error::Unsupported(m) => Error::Unsupported(m.clone()),
        e => Error::Invalid(e.to_string()),
    }
}
