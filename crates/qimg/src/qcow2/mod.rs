//! The qcow2 format engine.
//!
//! Opening validates every header field and table location before use (reference §1.14);
//! reads are planned per run of clusters ([`Mapping`]) and the data I/O happens outside any
//! lock, so many threads can read one image at once.

mod alloc;
pub mod amend;
pub mod bitmaps;
mod cache;
pub mod check;
pub mod compress;
pub mod create;
pub mod measure;
pub mod meta;
pub mod repair;
mod reshape;
pub mod resize;
mod snapshot;
mod txn;
mod write;
pub mod writer;

use crate::error::{Error, Result};
use crate::image::{Extent, Image, Status};
use crate::ondisk::bitmap::{self, BitmapEntry};
use crate::ondisk::header::{self, Header};
use crate::ondisk::l2::{self, ClusterType, CompressedDesc};
use crate::ondisk::snapshot::{self as snapfmt, Snapshot};
use crate::ondisk::{be64, MAX_HOST_OFFSET};
use crate::storage::Storage;
use cache::SliceCache;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use write::WriteState;

/// Largest active L1 table QEMU accepts (32 MiB).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table QEMU accepts (8 MiB).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Default budget of the L2 cache.
pub const DEFAULT_L2_CACHE_BYTES: u64 = 32 << 20;

/// How an image is opened.
#[derive(Debug, Clone, Default)]
pub struct Qcow2Options {
    /// Open for writing.
    pub writable: bool,
    /// Open for `check`: tolerate a missing refcount table, corrupt and dirty images, and
    /// read the snapshot table leniently.
    pub check: bool,
    /// Open without doing guest I/O (`qemu-img info`): an encrypted image then needs no
    /// key, and reads fail.
    pub no_io: bool,
    /// `encrypt.*` open options (format check and the key's secret).
    pub encrypt: crate::crypto::EncryptOptions,
}

/// A LUKS key-slot change (`qemu-img amend -o encrypt.*`).
#[derive(Debug, Clone, Default)]
pub struct LuksAmend {
    /// `encrypt.state=active` (add a key) rather than `inactive` (erase keys).
    pub activate: bool,
    /// `encrypt.keyslot`.
    pub keyslot: Option<u64>,
    /// `encrypt.new-secret`: the passphrase to add.
    pub new_secret: Option<crate::crypto::Secret>,
    /// `encrypt.old-secret`: erase the slots this passphrase opens.
    pub old_secret: Option<crate::crypto::Secret>,
    /// `encrypt.iter-time` for a new slot (milliseconds).
    pub iter_time_ms: u64,
    /// `--force`: allow overwriting an active slot or erasing the last one.
    pub force: bool,
}

/// The most recently decompressed cluster: descriptor offset and data.
type DecompressedCluster = (u64, Arc<Vec<u8>>);

/// A run of guest bytes with one kind of storage, as the read planner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Data at this host offset in the data file (qcow2 file or external data file).
    Data(u64),
    /// Zeros; `Some` when a host cluster stays allocated.
    Zero(Option<u64>),
    /// Not allocated in this layer; `Some` when (extended L2) host space exists anyway.
    Unallocated(Option<u64>),
    /// One compressed cluster; the run covers part of it.
    Compressed(CompressedDesc),
}

/// An open qcow2 image.
pub struct Qcow2 {
    file: Arc<dyn Storage>,
    data_file: Option<Arc<dyn Storage>>,
    header: Header,
    cluster_bits: u32,
    l2_bits: u32,
    /// Subcluster bits (cluster_bits - 5 with extended L2, else cluster_bits).
    unit_bits: u32,
    l1: RwLock<Vec<u64>>,
    l2_cache: SliceCache,
    ws: Mutex<Option<WriteState>>,
    ws_cond: Condvar,
    flush_lock: Mutex<()>,
    io_gate: RwLock<()>,
    /// Set once a runtime inconsistency marked the image corrupt; writes then fail.
    corrupt: std::sync::atomic::AtomicBool,
    backing: Option<Arc<dyn Image>>,
    snapshots: Vec<Snapshot>,
    bitmaps: Vec<BitmapEntry>,
    /// Persistent bitmaps in memory (see `bitmaps.rs`; lock before `ws`).
    bm: Mutex<bitmaps::BitmapSet>,
    /// Some bitmap records writes (lets the write hook skip the lock otherwise).
    bm_active: std::sync::atomic::AtomicBool,
    /// Warnings QEMU would print when opening this image.
    warnings: Vec<String>,
    last_decompressed: Mutex<Option<DecompressedCluster>>,
    /// Whether the image looks metadata-preallocated (decided on first use).
    metadata_prealloc: std::sync::OnceLock<bool>,
    /// The data cipher of an encrypted image opened with its key.
    cipher: Option<Arc<crate::crypto::SectorCipher>>,
    /// The LUKS header of a LUKS-encrypted image.
    luks: Option<crate::crypto::luks::LuksHeader>,
    /// The LUKS master key, once unlocked (key-slot changes need it).
    master_key: Option<zeroize::Zeroizing<Vec<u8>>>,
    /// Serializes read-modify-write of partial sectors of an encrypted image, so two
    /// writes to different bytes of one sector cannot lose each other's update.
    rmw_lock: Mutex<()>,
    opts: Qcow2Options,
}

impl std::fmt::Debug for Qcow2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2")
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

fn aligned(v: u64, cs: u64) -> bool {
    v & (cs - 1) == 0
}

/// Reads `len` bytes of metadata at `offset`, refusing sizes that no valid image has.
fn read_meta(file: &dyn Storage, offset: u64, len: u64, what: &str) -> Result<Vec<u8>> {
    // Every caller bounds len by a QEMU limit of at most 64 MiB first.
    debug_assert!(len <= 64 << 20);
    let mut buf = vec![0u8; len as usize];
    file.read_at(&mut buf, offset).map_err(|e| match e {
        Error::RawIo(io) => Error::io(format!("Could not read {what}"), io),
        e => e,
    })?;
    Ok(buf)
}

impl Qcow2 {
    /// Opens a qcow2 image on `file`. Backing files and the external data file are
    /// attached afterwards by the caller ([`Qcow2::set_backing`], [`Qcow2::set_data_file`]),
    /// because where to find them is policy, not format.
    ///
    /// A writable (non-check) open of an image whose dirty bit is set (lazy refcounts,
    /// not closed cleanly) first repairs it silently, as QEMU does ([`repair`]).
    pub fn open(file: Arc<dyn Storage>, opts: Qcow2Options) -> Result<Qcow2> {
        if let Some(img) = Self::open_inner(file.clone(), opts.clone())? {
            return Ok(img);
        }
        repair::repair_dirty(file.clone())?;
        // The repair cleared the bit or failed; a bit still set is not retried.
        Self::open_inner(file, opts)?
            .ok_or_else(|| Error::Corrupt("Could not repair dirty image".into()))
    }

    /// Opens the image; `None` when a writable open finds the dirty bit set, which needs
    /// a repair first.
    fn open_inner(file: Arc<dyn Storage>, opts: Qcow2Options) -> Result<Option<Qcow2>> {
        let mut first = vec![0u8; header::Header::min_read()];
        file.read_at(&mut first, 0)?;
        if first.len() >= 4 && crate::ondisk::be32(&first, 0) != header::MAGIC {
            return Err(Error::invalid("Image is not in qcow2 format"));
        }
        // Validate the fixed part before trusting cluster_bits to size the next read.
        let cluster_bits = crate::ondisk::be32(&first, 20);
        let version = crate::ondisk::be32(&first, 4);
        if (2..=3).contains(&version) && (9..=21).contains(&cluster_bits) {
            let cs = 1usize << cluster_bits;
            if cs > first.len() {
                first = vec![0u8; cs];
                file.read_at(&mut first, 0)?;
            }
        }
        let h = Header::parse(&first)?;
        let cs = h.cluster_size();
        let file_len = file.len()?;
        if file_len < 72 {
            // A file shorter than the header read as zeros past EOF; report it as QEMU does.
            return Err(Error::invalid("Image is not in qcow2 format"));
        }
        if h.incompatible_features & header::incompat::CORRUPT != 0 && opts.writable && !opts.check
        {
            return Err(Error::Permission(
                "qcow2: Image is corrupt; cannot be opened read/write".into(),
            ));
        }
        let (cipher, luks, master_key) = Self::open_crypto(file.as_ref(), &h, &opts)?;
        if h.refcount_table_clusters == 0 && !opts.check {
            return Err(Error::invalid(
                "Image does not contain a reference count table",
            ));
        }
        if h.refcount_table_clusters as u64 * cs > MAX_REFTABLE_BYTES {
            return Err(Error::invalid("Reference count table too large"));
        }
        if !aligned(h.refcount_table_offset, cs)
            || h.refcount_table_offset
                .checked_add(h.refcount_table_clusters as u64 * cs)
                .is_none()
            || h.refcount_table_offset > i64::MAX as u64
        {
            return Err(Error::invalid("Reference count table offset invalid"));
        }
        if !opts.check {
            if h.nb_snapshots > snapfmt::MAX_SNAPSHOTS {
                return Err(Error::invalid("Snapshot table too large"));
            }
            if h.nb_snapshots > 0 && !aligned(h.snapshots_offset, cs) {
                return Err(Error::invalid("Snapshot table offset invalid"));
            }
        }
        if h.size > i64::MAX as u64 {
            return Err(Error::invalid(
                "Could not refresh total sector count: File too large",
            ));
        }
        let entry_size: u32 = if h.extended_l2() { 16 } else { 8 };
        let l2_bits = cluster_bits - entry_size.trailing_zeros();
        if h.l1_size as u64 * 8 > MAX_L1_BYTES {
            return Err(Error::invalid("Active L1 table too large"));
        }
        if !aligned(h.l1_table_offset, cs)
            || h.l1_table_offset
                .checked_add(h.l1_size as u64 * 8)
                .is_none()
            || h.l1_table_offset > MAX_HOST_OFFSET
        {
            return Err(Error::invalid("Active L1 table offset invalid"));
        }
        let shift = cluster_bits + l2_bits;
        let needed = h.size.div_ceil(1u64 << shift);
        if needed > i32::MAX as u64 {
            return Err(Error::invalid("Image is too big"));
        }
        if (h.l1_size as u64) < needed {
            return Err(Error::invalid("L1 table is too small"));
        }
        if h.has_data_file() && h.version < 3 {
            return Err(Error::invalid("External data file requires qcow2 v3"));
        }
        let l1_bytes = read_meta(
            file.as_ref(),
            h.l1_table_offset,
            h.l1_size as u64 * 8,
            "L1 table",
        )?;
        let l1: Vec<u64> = l1_bytes.chunks_exact(8).map(|c| be64(c, 0)).collect();

        let snapshots = if h.nb_snapshots > 0 {
            match Self::read_snapshots(file.as_ref(), &h) {
                Ok(s) => s,
                Err(e) if !opts.check => return Err(e),
                Err(_) => Vec::new(),
            }
        } else {
            Vec::new()
        };
        let mut warnings = Vec::new();
        let mut drop_bitmaps_ext = false;
        let (bitmaps, bm) = if h.bitmaps.is_some()
            && h.autoclear_features & header::autoclear::BITMAPS == 0
        {
            // Something that does not know bitmaps wrote the image since they were stored:
            // QEMU ignores the extension (bitmaps gone, their clusters leaked) and drops
            // it from the header once it writes.
            warnings.push("a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent".to_string());
            drop_bitmaps_ext = opts.writable && !opts.check;
            (Vec::new(), bitmaps::BitmapSet::default())
        } else {
            Self::validate_bitmaps_ext(&h)?;
            // QEMU refuses a broken bitmap directory even when opening for check.
            let bitmaps = Self::read_bitmaps(file.as_ref(), &h)?;
            let bm = if opts.check {
                bitmaps::BitmapSet::default()
            } else {
                bitmaps::load(file.as_ref(), &h, &bitmaps)?
            };
            (bitmaps, bm)
        };
        if drop_bitmaps_ext {
            let mut h2 = h.clone();
            h2.bitmaps = None;
            let out = h2.serialize()?;
            file.write_at(&out, 0)?;
            file.flush()?;
        }

        let ws = if opts.writable && !opts.check {
            if h.incompatible_features & header::incompat::DIRTY != 0 {
                // Refcounts may be stale: `open` repairs and comes back.
                return Ok(None);
            }
            Some(WriteState {
                refs: alloc::Refcounts::load(
                    file.as_ref(),
                    cluster_bits,
                    h.refcount_order,
                    h.refcount_table_offset,
                    h.refcount_table_clusters,
                )?,
                l1_dirty: false,
                in_flight: Default::default(),
                waiters: 0,
                marked_dirty: false,
                lazy: h.compatible_features & header::compat::LAZY_REFCOUNTS != 0,
                l2_clusters: l1
                    .iter()
                    .map(|e| l2::l1_offset(*e) >> cluster_bits)
                    .filter(|&c| c != 0)
                    .collect(),
                fixed_meta: Self::fixed_metadata(&h, &snapshots),
            })
        } else {
            None
        };
        let slice_bytes = 4096u64.min(cs).max(512);
        let l2_cache = SliceCache::new(slice_bytes as usize, DEFAULT_L2_CACHE_BYTES as usize);
        let unit_bits = if h.extended_l2() {
            cluster_bits - 5
        } else {
            cluster_bits
        };
        let q = Qcow2 {
            file,
            data_file: None,
            cluster_bits,
            l2_bits,
            unit_bits,
            l1: RwLock::new(l1),
            l2_cache,
            ws: Mutex::new(ws),
            ws_cond: Condvar::new(),
            flush_lock: Mutex::new(()),
            io_gate: RwLock::new(()),
            corrupt: std::sync::atomic::AtomicBool::new(false),
            backing: None,
            snapshots,
            bitmaps,
            bm: Mutex::new(bm),
            bm_active: Default::default(),
            warnings,
            last_decompressed: Mutex::new(None),
            metadata_prealloc: std::sync::OnceLock::new(),
            cipher,
            luks,
            master_key,
            rmw_lock: Mutex::new(()),
            header: h,
            opts,
        };
        q.bm_open()?;
        Ok(Some(q))
    }

    /// Validates the encryption header and, given the key, builds the data cipher
    /// (QEMU's order and messages: format check, extension presence, LUKS header, key).
    #[allow(clippy::type_complexity)]
    fn open_crypto(
        file: &dyn Storage,
        h: &Header,
        opts: &Qcow2Options,
    ) -> Result<(
        Option<Arc<crate::crypto::SectorCipher>>,
        Option<crate::crypto::luks::LuksHeader>,
        Option<zeroize::Zeroizing<Vec<u8>>>,
    )> {
        use crate::crypto::{luks, SectorCipher};
        let fmt = match h.crypt_method {
            0 => None,
            1 => Some("aes"),
            _ => Some("luks"),
        };
        if let Some(want) = opts.encrypt.format.as_deref() {
            match fmt {
                Some(f) if f != want => {
                    return Err(Error::invalid(format!(
                        "Header reported '{f}' encryption format but options specify '{want}'"
                    )))
                }
                None => {
                    return Err(Error::invalid(format!(
                        "Header reported 'none' encryption format but options specify '{want}'"
                    )))
                }
                _ => {}
            }
        }
        if h.crypto.is_some() && h.crypt_method != 2 {
            return Err(Error::invalid(
                "CRYPTO header extension only expected with LUKS encryption method",
            ));
        }
        let Some(fmt) = fmt else {
            return Ok((None, None, None));
        };
        let mut header = None;
        if fmt == "luks" {
            let ext = h
                .crypto
                .ok_or_else(|| Error::invalid("Missing CRYPTO header for crypt method 2"))?;
            let cs = h.cluster_size();
            if !aligned(ext.offset, cs) {
                return Err(Error::invalid(format!(
                    "Encryption header offset '{}' is not a multiple of cluster size '{cs}'",
                    ext.offset
                )));
            }
            if ext
                .offset
                .checked_add(ext.length)
                .is_none_or(|e| e > MAX_HOST_OFFSET)
            {
                return Err(Error::invalid("Encryption header length invalid"));
            }
            let mut b = vec![0u8; crate::crypto::luks::HEADER_LEN];
            if ext.length < b.len() as u64 {
                return Err(Error::invalid(
                    "Request for data outside of extension header",
                ));
            }
            file.read_at(&mut b, ext.offset)?;
            header = Some(luks::LuksHeader::parse(&b, ext.length)?);
        }
        if opts.no_io {
            // As QEMU with BDRV_O_NO_IO: the header is checked, the key not even tried.
            return Ok((None, header, None));
        }
        let key = opts.encrypt.key.as_ref().ok_or_else(|| {
            Error::InvalidArgument("Parameter 'encrypt.key-secret' is required for cipher".into())
        })?;
        let (cipher, mk) = match &header {
            Some(lh) => {
                let base = h.crypto.unwrap().offset;
                let (c, mk) =
                    lh.unlock_key(key.bytes(), &|buf, off| file.read_at(buf, base + off))?;
                (c, Some(mk))
            }
            None => (SectorCipher::legacy_aes(key.bytes())?, None),
        };
        Ok((Some(Arc::new(cipher)), header, mk))
    }

    /// The LUKS header of a LUKS-encrypted image.
    pub fn luks_header(&self) -> Option<&crate::crypto::luks::LuksHeader> {
        self.luks.as_ref()
    }

    /// Changes LUKS key slots as `qemu-img amend -o encrypt.*` does (QEMU's checks and
    /// messages). The image must be open writable with its key.
    pub fn luks_amend(&mut self, a: &LuksAmend) -> Result<()> {
        use crate::crypto::luks::SLOTS;
        let inval = |m: String| Err(Error::InvalidArgument(m));
        let (Some(mut lh), Some(ext)) = (self.luks.clone(), self.header.crypto) else {
            return inval("Amending encryption options needs a LUKS-encrypted image".into());
        };
        let Some(mk) = self.master_key.clone() else {
            return inval("Parameter 'encrypt.key-secret' is required for cipher".into());
        };
        let file = self.file.clone();
        let read = |buf: &mut [u8], off: u64| file.read_at(buf, ext.offset + off);
        let active =
            |lh: &crate::crypto::luks::LuksHeader| lh.slots.iter().filter(|s| s.active).count();
        if let Some(k) = a.keyslot {
            if k >= SLOTS as u64 {
                return inval(format!(
                    "Invalid keyslot {k} specified, must be between 0 and {}",
                    SLOTS - 1
                ));
            }
        }
        // Key material first when adding (a crash leaves the slot disabled), the header
        // first when erasing (a crash leaves the slot disabled, its material intact).
        let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
        if a.activate {
            let Some(new) = &a.new_secret else {
                return inval("'new-secret' is required to activate a keyslot".into());
            };
            if a.old_secret.is_some() {
                return inval("'old-secret' must not be given when activating keyslots".into());
            }
            let slot = match a.keyslot {
                Some(k) => k as usize,
                None => match lh.slots.iter().position(|s| !s.active) {
                    Some(i) => i,
                    None => return inval("Can't add a keyslot - all keyslots are in use".into()),
                },
            };
            if lh.slots[slot].active && !a.force {
                return inval(format!(
                    "Refusing to overwrite active keyslot {slot} - please erase it first"
                ));
            }
            let material = lh.set_slot(slot, new.bytes(), &mk, a.iter_time_ms)?;
            writes.push((lh.material_offset(slot), material));
            writes.push((0, lh.serialize()));
        } else {
            if a.new_secret.is_some() {
                return inval("'new-secret' must not be given when erasing keyslots".into());
            }
            let slots = match (a.keyslot, &a.old_secret) {
                (Some(k), _) => {
                    let k = k as usize;
                    if !lh.slots[k].active {
                        return inval(format!("Given keyslot {k} is already erased (inactive) "));
                    }
                    if active(&lh) == 1 && !a.force {
                        return inval(format!("Attempt to erase the only active keyslot {k} which will erase all the data in the image irreversibly - refusing operation"));
                    }
                    vec![k]
                }
                (None, Some(old)) => {
                    let m = lh.matching_slots(old.bytes(), &read)?;
                    if m.is_empty() {
                        return inval("No keyslots match given (old) password for erase operation".into());
                    }
                    if m.len() == active(&lh) && !a.force {
                        return inval("All the active keyslots match the (old) password that was given and erasing them will erase all the data in the image irreversibly - refusing operation".into());
                    }
                    m
                }
                (None, None) => return inval("To erase keyslot(s), either explicit keyslot index or the password currently contained in them must be given".into()),
            };
            let mut junk = Vec::new();
            for k in slots {
                junk.push((lh.material_offset(k), lh.erase_slot(k)?));
            }
            writes.push((0, lh.serialize()));
            writes.extend(junk);
        }
        for (off, data) in &writes {
            self.file.write_at(data, ext.offset + off)?;
            self.file.flush()?;
        }
        self.luks = Some(lh);
        Ok(())
    }

    /// Whether guest data is encrypted.
    pub fn encrypted(&self) -> bool {
        self.header.crypt_method != 0
    }

    /// The data cipher, when the image is encrypted; reads and writes of an encrypted
    /// image opened without its key fail here.
    fn cipher_for_io(&self) -> Result<Option<&crate::crypto::SectorCipher>> {
        if !self.encrypted() {
            return Ok(None);
        }
        match &self.cipher {
            Some(c) => Ok(Some(c)),
            None => Err(Error::InvalidArgument(
                "Parameter 'encrypt.key-secret' is required for cipher".into(),
            )),
        }
    }

    /// The sector number an encrypted sector's IV is made from: QEMU's LUKS uses the
    /// host offset, the legacy AES method the guest offset (verified on images QEMU
    /// wrote).
    fn iv_sector(&self, host: u64, guest: u64) -> u64 {
        if self.header.crypt_method == 2 {
            host / 512
        } else {
            guest / 512
        }
    }

    /// Reads data of an encrypted image at `host` (guest `guest`) and decrypts it; the
    /// range is widened to whole sectors, which never leaves the cluster.
    fn read_encrypted(
        &self,
        c: &crate::crypto::SectorCipher,
        out: &mut [u8],
        host: u64,
        guest: u64,
    ) -> Result<()> {
        let lead = (host & 511) as usize;
        let h0 = host - lead as u64;
        let total = (lead + out.len()).div_ceil(512) * 512;
        let storage = self.data_storage()?;
        if lead == 0 && total == out.len() {
            storage.read_at(out, h0)?;
            c.decrypt(out, self.iv_sector(h0, guest));
            return Ok(());
        }
        let mut buf = vec![0u8; total];
        storage.read_at(&mut buf, h0)?;
        c.decrypt(&mut buf, self.iv_sector(h0, guest - lead as u64));
        out.copy_from_slice(&buf[lead..lead + out.len()]);
        Ok(())
    }

    /// Encrypts `data` (whole sectors at host `host`, guest `guest`) into a new buffer.
    pub(crate) fn encrypt_copy(
        &self,
        c: &crate::crypto::SectorCipher,
        data: &[u8],
        host: u64,
        guest: u64,
    ) -> Vec<u8> {
        let mut b = data.to_vec();
        c.encrypt(&mut b, self.iv_sector(host, guest));
        b
    }

    /// Warnings QEMU prints when it opens this image (front ends show them).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    fn read_snapshots(file: &dyn Storage, h: &Header) -> Result<Vec<Snapshot>> {
        // Entry by entry, so memory follows what the table really holds; past the end of
        // the file entries read as zeros, as they do for QEMU.
        let mut out = Vec::new();
        let mut pos = h.snapshots_offset;
        for i in 0..h.nb_snapshots as usize {
            let mut head = [0u8; 40];
            file.read_at(&mut head, pos)?;
            let extra = crate::ondisk::be32(&head, 36).min(snapfmt::MAX_EXTRA_DATA + 1) as u64;
            let var = extra
                + crate::ondisk::be16(&head, 12) as u64
                + crate::ondisk::be16(&head, 14) as u64;
            let mut entry = vec![0u8; (40 + var) as usize];
            file.read_at(&mut entry, pos)?;
            let (s, len) = Snapshot::parse(&entry, i)?;
            // QEMU measures the table up to the end of the entry's name (padding only
            // comes before the next entry).
            if pos + 40 + var - h.snapshots_offset > snapfmt::MAX_TABLE_SIZE {
                return Err(Error::invalid(format!(
                    "Snapshot table is too big\nYou can force-remove all {} overhanging snapshots with qemu-img check -r all",
                    h.nb_snapshots as usize - i
                )));
            }
            pos += len as u64;
            out.push(s);
        }
        Ok(out)
    }

    /// The metadata ranges QEMU's overlap checks protect that do not move while the image
    /// is written: header, active L1, snapshot table and snapshot L1 tables, and the bitmap
    /// directory while the bitmaps extension is marked consistent.
    fn fixed_metadata(h: &Header, snapshots: &[Snapshot]) -> Vec<(u64, u64, &'static str)> {
        let cs = h.cluster_size();
        let mut v = vec![(0, cs, "main header")];
        v.push((
            h.l1_table_offset,
            h.l1_table_offset + (h.l1_size as u64 * 8).max(1),
            "active L1 table",
        ));
        if h.nb_snapshots > 0 {
            let mut len = 0u64;
            for s in snapshots {
                len += (40
                    + 24
                    + s.unknown_extra.len() as u64
                    + s.id.len() as u64
                    + s.name.len() as u64)
                    .div_ceil(8)
                    * 8;
                v.push((
                    s.l1_table_offset,
                    s.l1_table_offset + (s.l1_size as u64 * 8).max(1),
                    "inactive L1 table",
                ));
            }
            v.push((
                h.snapshots_offset,
                h.snapshots_offset + len.max(1),
                "snapshot table",
            ));
        }
        if let Some(b) = h.bitmaps {
            if h.autoclear_features & header::autoclear::BITMAPS != 0 {
                v.push((
                    b.directory_offset,
                    b.directory_offset + b.directory_size.max(1),
                    "bitmap directory",
                ));
            }
        }
        v
    }

    /// Checks the bitmaps header extension itself (QEMU does this at every open).
    fn validate_bitmaps_ext(h: &Header) -> Result<()> {
        let Some(ext) = h.bitmaps else {
            return Ok(());
        };
        if ext.nb_bitmaps == 0 {
            return Err(Error::invalid("found bitmaps extension with zero bitmaps"));
        }
        if ext.nb_bitmaps > 65535 {
            return Err(Error::invalid(format!(
                "bitmaps_ext: File has {} bitmaps, exceeding the QEMU supported maximum of 65535",
                ext.nb_bitmaps
            )));
        }
        if ext.reserved != 0 {
            return Err(Error::invalid("bitmaps_ext: Reserved field is not zero"));
        }
        if ext.directory_size > 1024 * 65535 {
            return Err(Error::invalid(format!(
                "bitmaps_ext: bitmap directory size ({}) exceeds the maximum supported size (67107840)",
                ext.directory_size
            )));
        }
        if !aligned(ext.directory_offset, h.cluster_size()) {
            return Err(Error::invalid(
                "bitmaps_ext: invalid bitmap directory offset",
            ));
        }
        Ok(())
    }

    /// Loads the bitmap directory (past the end of the file it reads as zeros, which then
    /// fails the entry checks as in QEMU).
    fn read_bitmaps(file: &dyn Storage, h: &Header) -> Result<Vec<BitmapEntry>> {
        let Some(ext) = h.bitmaps else {
            return Ok(Vec::new());
        };
        let cs = h.cluster_size();
        // Bounded by validate_bitmaps_ext (at most 64 MiB).
        let buf = read_meta(
            file,
            ext.directory_offset,
            ext.directory_size,
            "bitmap directory",
        )?;
        let entries = bitmap::parse_directory(&buf, ext.nb_bitmaps, cs)?;
        Ok(entries)
    }

    /// Attaches the backing image.
    pub fn set_backing(&mut self, backing: Option<Arc<dyn Image>>) {
        self.backing = backing;
    }

    /// Attaches the external data file.
    pub fn set_data_file(&mut self, data: Arc<dyn Storage>) {
        self.data_file = Some(data);
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The image file.
    pub fn file(&self) -> &Arc<dyn Storage> {
        &self.file
    }

    /// The external data file, once attached.
    pub fn data_file(&self) -> Option<&Arc<dyn Storage>> {
        self.data_file.as_ref()
    }

    /// Internal snapshots.
    pub fn snapshots(&self) -> &[Snapshot] {
        &self.snapshots
    }

    /// The bitmap directory as read at open (see [`Qcow2::bitmap_list`] for the live
    /// state).
    pub fn bitmaps(&self) -> &[BitmapEntry] {
        &self.bitmaps
    }

    /// The active L1 table.
    pub fn l1(&self) -> Vec<u64> {
        self.l1.read().unwrap().clone()
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        1 << self.l2_bits
    }

    /// Options the image was opened with.
    pub fn options(&self) -> &Qcow2Options {
        &self.opts
    }

    fn data_storage(&self) -> Result<&dyn Storage> {
        if self.header.has_data_file() {
            match &self.data_file {
                Some(d) => Ok(d.as_ref()),
                None => Err(Error::invalid("'data-file' is required for this image")),
            }
        } else {
            Ok(self.file.as_ref())
        }
    }

    /// Reads the L2 slice holding entry `index` of the L2 table at `l2_offset`; returns the
    /// raw words (two per entry with extended L2) and the first entry index it holds.
    fn l2_slice(&self, l2_offset: u64, index: u64) -> Result<(Arc<Vec<u64>>, u64)> {
        let entry_bytes = if self.header.extended_l2() { 16 } else { 8 };
        let slice_bytes = self.l2_cache.slice_bytes() as u64;
        let per_slice = slice_bytes / entry_bytes;
        let first = index / per_slice * per_slice;
        let host = l2_offset + first * entry_bytes;
        let slice = self.l2_cache.get_or_load(host, || {
            let buf = read_meta(self.file.as_ref(), host, slice_bytes, "L2 table")?;
            Ok(buf.chunks_exact(8).map(|c| be64(c, 0)).collect())
        })?;
        Ok((slice, first))
    }

    /// The L2 entry (and subcluster bitmap) for the guest cluster containing `offset`.
    pub fn l2_entry(&self, offset: u64) -> Result<(u64, u64)> {
        let l1_index = offset >> (self.cluster_bits + self.l2_bits);
        let Some(l1e) = self.l1.read().unwrap().get(l1_index as usize).copied() else {
            return Ok((0, 0));
        };
        let l2_offset = l2::l1_offset(l1e);
        if l2_offset == 0 {
            return Ok((0, 0));
        }
        self.check_l2_offset(l2_offset, l1_index)?;
        let index = (offset >> self.cluster_bits) & (self.l2_entries() - 1);
        let (slice, first) = self.l2_slice(l2_offset, index)?;
        let i = (index - first) as usize;
        Ok(if self.header.extended_l2() {
            (slice[2 * i], slice[2 * i + 1])
        } else {
            (slice[i], 0)
        })
    }

    fn check_l2_offset(&self, l2_offset: u64, l1_index: u64) -> Result<()> {
        if !aligned(l2_offset, self.cluster_size()) {
            return Err(Error::Corrupt(format!(
                "L2 table offset {l2_offset:#x} unaligned (L1 index: {l1_index:#x})"
            )));
        }
        Ok(())
    }

    /// Classifies one unit (cluster, or subcluster with extended L2) from its entry.
    fn unit_type(&self, entry: u64, bitmap: u64, offset: u64) -> Result<ClusterType> {
        let df = self.header.has_data_file();
        let t = if self.header.extended_l2() {
            let sc = ((offset >> self.unit_bits) & 31) as u32;
            l2::classify_subcluster(entry, bitmap, sc, df).ok_or_else(|| {
                Error::Corrupt(format!(
                    "Invalid cluster entry found (L2 entry: {entry:#x}, bitmap: {bitmap:#x})"
                ))
            })?
        } else {
            l2::classify(entry, false, df)
        };
        match t {
            ClusterType::ZeroPlain | ClusterType::ZeroAlloc(_) if self.header.version < 3 => {
                Err(Error::Corrupt("Zero cluster entry found in pre-v3 image".into()))
            }
            ClusterType::Compressed(_) if df => {
                Err(Error::Corrupt("Compressed cluster entry found in image with external data file".into()))
            }
            ClusterType::Normal(o) | ClusterType::ZeroAlloc(o) | ClusterType::UnallocatedAlloc(o)
                if !aligned(o, self.cluster_size()) =>
            {
                Err(Error::Corrupt(format!("Cluster allocation offset {o:#x} unaligned")))
            }
            ClusterType::Normal(o) if df && o != offset & !(self.cluster_size() - 1) => {
                Err(Error::Corrupt(format!(
                    "External data file host cluster offset {o:#x} does not match guest cluster offset: {:#x}",
                    offset & !(self.cluster_size() - 1)
                )))
            }
            t => Ok(t),
        }
    }

    /// Plans the run starting at guest `offset`: returns its length (at most `max`, never
    /// crossing an L2 slice) and how it is stored.
    pub fn map_run(&self, offset: u64, max: u64) -> Result<(u64, Mapping)> {
        let unit = 1u64 << self.unit_bits;
        let cs = self.cluster_size();
        let first_len = (unit - (offset & (unit - 1))).min(max);
        let (entry, bm) = self.l2_entry(offset)?;
        let t = self.unit_type(entry, bm, offset)?;
        let in_cluster = offset & (cs - 1);
        let mapping = match t {
            ClusterType::Unallocated => Mapping::Unallocated(None),
            ClusterType::UnallocatedAlloc(o) => Mapping::Unallocated(Some(o + in_cluster)),
            ClusterType::ZeroPlain => Mapping::Zero(None),
            ClusterType::ZeroAlloc(o) => Mapping::Zero(Some(o + in_cluster)),
            ClusterType::Normal(o) => Mapping::Data(o + in_cluster),
            ClusterType::Compressed(d) => {
                let desc = CompressedDesc::decode(d, self.cluster_bits);
                let len = (cs - in_cluster).min(max);
                return Ok((len, Mapping::Compressed(desc)));
            }
        };
        // Extend the run over following units while they continue it, within the slice
        // cached for this L2 table (one lock-free pass, no extra I/O).
        let mut len = first_len;
        let l1_index = offset >> (self.cluster_bits + self.l2_bits);
        while len < max {
            let next = offset + len;
            if next >> (self.cluster_bits + self.l2_bits) != l1_index {
                break;
            }
            let (e2, b2) = if next & (cs - 1) == 0 {
                if !self.same_slice(offset, next) {
                    break;
                }
                self.l2_entry(next)?
            } else {
                (entry, bm)
            };
            let t2 = self.unit_type(e2, b2, next)?;
            let in2 = next & (cs - 1);
            let cont = match (mapping, t2) {
                (Mapping::Unallocated(None), ClusterType::Unallocated) => true,
                (Mapping::Unallocated(Some(h)), ClusterType::UnallocatedAlloc(o)) => {
                    o + in2 == h + len
                }
                (Mapping::Zero(None), ClusterType::ZeroPlain) => true,
                (Mapping::Zero(Some(h)), ClusterType::ZeroAlloc(o)) => o + in2 == h + len,
                (Mapping::Data(h), ClusterType::Normal(o)) => o + in2 == h + len,
                _ => false,
            };
            if !cont {
                break;
            }
            len = (len + unit).min(max);
        }
        Ok((len, mapping))
    }

    fn same_slice(&self, a: u64, b: u64) -> bool {
        let entry_bytes = if self.header.extended_l2() { 16 } else { 8 };
        let per_slice = self.l2_cache.slice_bytes() as u64 / entry_bytes;
        (a >> self.cluster_bits) / per_slice == (b >> self.cluster_bits) / per_slice
    }

    /// Decompresses the cluster a descriptor points to.
    fn decompress(&self, desc: CompressedDesc) -> Result<Arc<Vec<u8>>> {
        if let Some((off, data)) = self.last_decompressed.lock().unwrap().as_ref() {
            if *off == desc.offset {
                return Ok(data.clone());
            }
        }
        let cs = self.cluster_size() as usize;
        let mut input = vec![0u8; desc.len as usize];
        self.file.read_at(&mut input, desc.offset)?;
        let out = compress::decompress(self.header.compression(), &input, cs)?;
        let out = Arc::new(out);
        *self.last_decompressed.lock().unwrap() = Some((desc.offset, out.clone()));
        Ok(out)
    }

    /// Reads from the backing chain, zero-filling past the backing image's end.
    fn read_backing(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match &self.backing {
            Some(b) => {
                let blen = b.len();
                if offset >= blen {
                    buf.fill(0);
                } else {
                    let n = ((blen - offset) as usize).min(buf.len());
                    b.read_at(&mut buf[..n], offset)?;
                    buf[n..].fill(0);
                }
            }
            None => buf.fill(0),
        }
        Ok(())
    }
}

impl Qcow2 {
    /// Whether far more clusters are in use by refcount than the file really allocates,
    /// which is what metadata preallocation leaves behind. Then, as QEMU does, block
    /// status asks the file where its holes are, because those clusters read as zeros.
    fn detect_metadata_prealloc(&self) -> Result<bool> {
        let cs = self.cluster_size();
        let file_len = self.file.len()?.div_ceil(512) * 512;
        let real = self.file.allocated_size()? / cs;
        let threshold = (real * 10 / 9).max(real + 2);
        let end = file_len.div_ceil(cs);
        let order = self.header.refcount_order;
        let per_block = crate::ondisk::refcount::entries_per_block(self.cluster_bits, order);
        let table_len = (self.header.refcount_table_clusters as u64 * cs) as usize;
        let table = read_meta(
            self.file.as_ref(),
            self.header.refcount_table_offset,
            table_len as u64,
            "refcount table",
        )?;
        let mut count = 0u64;
        let mut block = vec![0u8; cs as usize];
        let mut loaded = u64::MAX;
        let mut c = 0u64;
        while c < end && count < threshold {
            let i = c / per_block;
            if (i as usize) * 8 + 8 > table.len() {
                break;
            }
            let off = be64(&table, i as usize * 8) & crate::ondisk::refcount::REFTABLE_OFFSET_MASK;
            if off == 0 {
                c = (i + 1) * per_block;
                continue;
            }
            if loaded != i {
                self.file.read_at(&mut block, off)?;
                loaded = i;
            }
            if crate::ondisk::refcount::get(&block, order, (c % per_block) as usize) != 0 {
                count += 1;
            }
            c += 1;
        }
        Ok(count >= threshold)
    }

    /// Refines a data extent with the data file's holes (see `detect_metadata_prealloc`).
    fn refine_with_file(&self, host: u64, len: u64) -> Result<(u64, bool)> {
        let prealloc = match self.metadata_prealloc.get() {
            Some(p) => *p,
            None => *self
                .metadata_prealloc
                .get_or_init(|| self.detect_metadata_prealloc().unwrap_or(false)),
        };
        if !prealloc {
            return Ok((len, false));
        }
        let storage = self.data_storage()?;
        Ok(match storage.next_data(host)? {
            None => (len, false),
            Some((d, e)) if d <= host => (len.min(e - host), false),
            Some((d, _)) => (len.min(d - host), true),
        })
    }
}

impl Qcow2 {
    /// Switches a read-only image to the contents of internal snapshot `index` (as
    /// `qemu-img convert -l` and `qemu-nbd -l` read it).
    pub fn load_snapshot_readonly(&mut self, index: usize) -> Result<()> {
        if self.ws.lock().unwrap().is_some() {
            return Err(Error::InvalidArgument(
                "snapshots can only be loaded read-only".into(),
            ));
        }
        let s = self
            .snapshots
            .get(index)
            .ok_or_else(|| Error::NotFound("snapshot not found".into()))?
            .clone();
        if s.l1_size as u64 * 8 > MAX_L1_BYTES {
            return Err(Error::invalid("Snapshot L1 table too large"));
        }
        if !aligned(s.l1_table_offset, self.cluster_size()) {
            return Err(Error::invalid("Snapshot L1 table offset invalid"));
        }
        let buf = read_meta(
            self.file.as_ref(),
            s.l1_table_offset,
            s.l1_size as u64 * 8,
            "snapshot L1 table",
        )?;
        let size = s.disk_size.unwrap_or(self.header.size);
        let needed = size.div_ceil(1u64 << (self.cluster_bits + self.l2_bits));
        if (s.l1_size as u64) < needed {
            return Err(Error::invalid("Snapshot L1 table is too small"));
        }
        *self.l1.write().unwrap() = buf.chunks_exact(8).map(|c| be64(c, 0)).collect();
        self.header.size = size;
        self.l2_cache.clear();
        *self.last_decompressed.lock().unwrap() = None;
        Ok(())
    }

    /// Finds a snapshot as qemu-img's `-l` does: by ID first, then by name.
    pub fn find_snapshot(&self, id: Option<&str>, name: Option<&str>) -> Option<usize> {
        match (id, name) {
            (Some(i), Some(n)) => self.snapshots.iter().position(|s| s.id == i && s.name == n),
            (Some(i), None) => self.snapshots.iter().position(|s| s.id == i),
            (None, Some(n)) => self.snapshots.iter().position(|s| s.name == n),
            (None, None) => None,
        }
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        // Errors cannot be reported from drop; callers who care call close() first.
        let _ = self.bm_store();
        let _ = self.flush_metadata(true);
    }
}

impl Image for Qcow2 {
    fn format_name(&self) -> &'static str {
        "qcow2"
    }

    fn len(&self) -> u64 {
        // QEMU works in 512-byte sectors and silently drops a partial last sector.
        self.header.size & !511
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (n, m) = self.map_run(pos, (buf.len() - done) as u64)?;
            let n = n as usize;
            let out = &mut buf[done..done + n];
            match m {
                Mapping::Data(host) => match self.cipher_for_io()? {
                    Some(c) => self.read_encrypted(c, out, host, pos)?,
                    None => self.data_storage()?.read_at(out, host)?,
                },
                Mapping::Zero(_) => out.fill(0),
                Mapping::Unallocated(_) => self.read_backing(out, pos)?,
                Mapping::Compressed(desc) => {
                    let data = self.decompress(desc)?;
                    let start = (pos & (self.cluster_size() - 1)) as usize;
                    out.copy_from_slice(&data[start..start + n]);
                }
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.do_write(buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.do_write_zeroes(offset, len, may_unmap)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.do_discard(offset, len)
    }

    fn flush(&self) -> Result<()> {
        self.flush_metadata(false)
    }

    fn start_writeback(&self) {
        if let Ok(d) = self.data_storage() {
            d.start_writeback();
        }
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let (mut n, m) = self.map_run(offset, len)?;
        let status = match m {
            Mapping::Data(_) if self.encrypted() => Status {
                allocated: true,
                data: true,
                zero: false,
                offset: None,
                compressed: false,
            },
            Mapping::Data(h) => {
                let (n2, zero) = self.refine_with_file(h, n)?;
                n = n2;
                Status {
                    allocated: true,
                    data: true,
                    zero,
                    offset: Some(h),
                    compressed: false,
                }
            }
            Mapping::Zero(h) => Status {
                offset: h,
                ..Status::ZERO
            },
            Mapping::Unallocated(h) => Status {
                offset: h,
                ..Status::UNALLOCATED
            },
            Mapping::Compressed(_) => Status {
                allocated: true,
                data: true,
                zero: false,
                offset: None,
                compressed: true,
            },
        };
        // QEMU reports no host offset at all for encrypted images (the bytes there are
        // not the guest's), whatever the cluster type.
        let status = if self.encrypted() {
            Status {
                offset: None,
                ..status
            }
        } else {
            status
        };
        Ok(Extent {
            start: offset,
            len: n,
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
