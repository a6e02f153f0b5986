//! Creating qcow2 (and raw) images laid out as `qemu-img create` lays them out.
//!
//! QEMU does not compute a layout up front: it writes a three-cluster skeleton (header,
//! a one-cluster refcount table, one refcount block), opens it, and then grows the image
//! through its ordinary allocator (first-fit from a free-cluster hint, refcount blocks
//! allocated on demand, the refcount table relocated to the end of the file when it is
//! full). Where the L1 table, the L2 tables, extra refcount blocks and relocated refcount
//! tables end up — and which stale bytes a relocated table leaves behind — is a product of
//! that sequence. To be byte-identical we therefore replay the same sequence on an
//! in-memory model ([`Sim`]): the set of allocated clusters (every refcount is 0 or 1
//! while an image is being created, so an interval set is enough) and the refcount
//! table. Refcount blocks are generated from the interval set when the image is written,
//! so memory stays bounded by the refcount table (at most 8 MiB) and the L1 table (at
//! most 32 MiB), never by the virtual size.
//!
//! Error messages are the texts `qemu-img create` prints after `qemu-img: <image>: `
//! (see [`CreateOptions::validate`]).

use crate::error::{Error, Result};
use crate::ondisk::header::{self, CompressionType, Header};
use crate::ondisk::l2::COPIED;
use crate::ondisk::{put64, refcount, MAX_HOST_OFFSET};
use crate::storage::{write_zeros, FileStorage, Storage};
use std::collections::BTreeMap;
use std::path::Path;

/// Default cluster size of new qcow2 images.
pub const DEFAULT_CLUSTER_SIZE: u64 = 65536;
/// Largest refcount table QEMU opens (bytes).
const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Largest L1 table QEMU accepts (bytes).
const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest single request of QEMU's block layer (BDRV_REQUEST_MAX_BYTES).
const REQUEST_MAX_BYTES: u64 = (i32::MAX as u64) & !511;
/// Largest image length QEMU's block layer accepts (BDRV_MAX_LENGTH).
const MAX_LENGTH: u64 = (i64::MAX as u64) & !((1u64 << 30) - 1);

/// The message QEMU prints when a qcow2 image cannot be that large.
pub const TOO_LARGE: &str =
    "The image size is too large for file format 'qcow2' (try using a larger cluster size)";

/// Preallocation modes (`-o preallocation=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Sparse: only the skeleton and the L1 table.
    #[default]
    Off,
    /// Every L2 table and data cluster is allocated in the metadata; data is sparse.
    Metadata,
    /// Like metadata, and the data area is reserved with `posix_fallocate`.
    Falloc,
    /// Like metadata, and the data area is written with zeros.
    Full,
}

impl Preallocation {
    /// The option value as qemu-img spells it.
    pub fn name(self) -> &'static str {
        match self {
            Preallocation::Off => "off",
            Preallocation::Metadata => "metadata",
            Preallocation::Falloc => "falloc",
            Preallocation::Full => "full",
        }
    }

    /// Parses an option value; the error is qemu-img's message.
    pub fn parse(s: &str) -> Result<Preallocation> {
        match s {
            "off" => Ok(Preallocation::Off),
            "metadata" => Ok(Preallocation::Metadata),
            "falloc" => Ok(Preallocation::Falloc),
            "full" => Ok(Preallocation::Full),
            _ => Err(Error::InvalidArgument(format!(
                "Parameter 'preallocation' does not accept value '{s}'"
            ))),
        }
    }
}

/// qcow2 version (`-o compat=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compat {
    /// Version 2 (`compat=0.10`).
    V2,
    /// Version 3 (`compat=1.1`), the default.
    #[default]
    V3,
}

impl Compat {
    /// Parses `0.10`/`v2`/`1.1`/`v3`; the error is qemu-img's message.
    pub fn parse(s: &str) -> Result<Compat> {
        match s {
            "0.10" | "v2" => Ok(Compat::V2),
            "1.1" | "v3" => Ok(Compat::V3),
            _ => Err(Error::InvalidArgument(format!(
                "Parameter 'version' does not accept value '{s}'"
            ))),
        }
    }

    /// Header version number.
    pub fn version(self) -> u32 {
        match self {
            Compat::V2 => 2,
            Compat::V3 => 3,
        }
    }
}

/// Options of `qemu-img create -f qcow2` (`-o help` lists them), with qemu's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size in bytes; rounded up to a multiple of 512 as qemu-img does.
    pub size: u64,
    /// Image version.
    pub compat: Compat,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Refcount entry width in bits.
    pub refcount_bits: u64,
    /// 128-bit L2 entries with subclusters.
    pub extended_l2: bool,
    /// Set the lazy refcounts compatible feature.
    pub lazy_refcounts: bool,
    /// Preallocation mode.
    pub preallocation: Preallocation,
    /// Compression type recorded in the header.
    pub compression_type: CompressionType,
    /// Backing file name, stored verbatim (not opened here).
    pub backing_file: Option<String>,
    /// Backing file format, stored in the backing-format extension.
    pub backing_fmt: Option<String>,
    /// External data file name; created (or truncated) next to the image.
    pub data_file: Option<String>,
    /// Mark the data file as a valid raw image (forces metadata preallocation).
    pub data_file_raw: bool,
    /// Encrypt guest data.
    pub encryption: Option<CreateEncryption>,
}

/// How a new image is encrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateEncryption {
    /// Legacy AES (crypt_method 1), keyed by the secret.
    Aes(crate::crypto::Secret),
    /// LUKS (crypt_method 2) with these parameters, slot 0 opened by the secret.
    Luks(crate::crypto::luks::LuksParams, crate::crypto::Secret),
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            compat: Compat::V3,
            cluster_size: DEFAULT_CLUSTER_SIZE,
            refcount_bits: 16,
            extended_l2: false,
            lazy_refcounts: false,
            preallocation: Preallocation::Off,
            compression_type: CompressionType::Zlib,
            backing_file: None,
            backing_fmt: None,
            data_file: None,
            data_file_raw: false,
            encryption: None,
        }
    }
}

/// Rounds a requested size up to the 512-byte granularity qemu-img uses (`None` on
/// overflow past `u64`).
pub fn size_rounded(size: u64) -> Option<u64> {
    size.checked_add(511).map(|s| s & !511)
}

/// Bytes of one L2 entry.
fn l2_entry_bytes(extended_l2: bool) -> u64 {
    if extended_l2 {
        16
    } else {
        8
    }
}

/// Number of L1 entries qemu gives an image of `size` bytes (`size_to_l1`); `u64::MAX`
/// for a cluster size that is not a power of two of at least 512 bytes.
pub fn l1_entries(size: u64, cluster_size: u64, extended_l2: bool) -> u64 {
    if !cluster_size.is_power_of_two() || cluster_size < 512 {
        return u64::MAX;
    }
    let l2_entries = cluster_size / l2_entry_bytes(extended_l2);
    match cluster_size.checked_mul(l2_entries) {
        Some(per_entry) => size.div_ceil(per_entry),
        None => u64::from(size > 0),
    }
}

/// Refcount blocks and refcount table clusters needed to count `clusters` clusters plus
/// themselves: the smallest fixed point, found by iteration as the format requires
/// (every refcount structure also needs a refcount). With `generous`, room for half a
/// table more is added once, as QEMU does when it grows a refcount table.
///
/// Returns `(refcount blocks, refcount table clusters)`.
pub fn refcount_metadata_clusters(
    clusters: u64,
    cluster_size: u64,
    refcount_order: u32,
    generous: bool,
) -> (u64, u64) {
    // Clamped so that nonsensical arguments give nonsense, not a panic.
    let per_table_cluster = (cluster_size / 8).max(1);
    let per_block = (cluster_size.saturating_mul(8) >> refcount_order.min(63)).max(1);
    let mut clusters = clusters;
    let mut generous = generous;
    let (mut blocks, mut table) = (0u64, 0u64);
    let mut n = 0u64;
    loop {
        let last = n;
        blocks = clusters
            .saturating_add(table)
            .saturating_add(blocks)
            .div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters.saturating_add(blocks).saturating_add(table);
        if n == last {
            if generous {
                clusters = clusters.saturating_add(table.div_ceil(2));
                generous = false;
                n = 0;
                continue;
            }
            return (blocks, table);
        }
    }
}

impl CreateOptions {
    fn cluster_bits(&self) -> u32 {
        self.cluster_size.trailing_zeros()
    }

    /// The virtual size after qemu-img's rounding, or its error for sizes beyond what the
    /// block layer accepts.
    pub fn rounded_size(&self) -> Result<u64> {
        let s = size_rounded(self.size).filter(|&s| s <= i64::MAX as u64);
        match s {
            None => Err(Error::InvalidArgument(
                "Could not resize image: Image size cannot be negative".into(),
            )),
            Some(s) if s > MAX_LENGTH => Err(Error::InvalidArgument(format!(
                "Could not resize image: offset({s}) exceeds maximum({MAX_LENGTH})"
            ))),
            Some(s) => Ok(s),
        }
    }

    /// The preallocation actually applied (data_file_raw forces metadata).
    pub fn effective_preallocation(&self) -> Preallocation {
        if self.data_file_raw && self.preallocation == Preallocation::Off {
            Preallocation::Metadata
        } else {
            self.preallocation
        }
    }

    /// Checks the options in the order `qemu-img create` does and returns its message for
    /// the first violation.
    ///
    /// Contract: qemu-img prints every one of these as `qemu-img: <image>: <message>`,
    /// where `<image>` is the file name as given. None of them carries a
    /// `Could not create '...'` prefix: that prefix only appears on I/O errors creating a
    /// file (see [`create_qcow2`]). Size errors that qemu reports from its resize step
    /// carry `Could not resize image: `, and backing-name errors read
    /// `Could not assign backing file '<name>' with format '<fmt>': <strerror>`.
    /// Option-value parse errors (`Parameter 'x' does not accept value 'y'`) come from
    /// [`Compat::parse`] / [`Preallocation::parse`].
    pub fn validate(&self) -> Result<()> {
        let inval = |m: &str| Err(Error::InvalidArgument(m.to_string()));
        let v3 = self.compat == Compat::V3;
        if self.extended_l2 && !v3 {
            return inval("Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)");
        }
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
            return inval("Cluster size must be a power of two between 512 and 2048k");
        }
        if self.extended_l2 && cs < 16384 {
            return inval(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            );
        }
        if self.backing_file.is_some()
            && self.preallocation != Preallocation::Off
            && !self.extended_l2
        {
            return inval("Backing file and preallocation can only be used at the same time if extended_l2 is on");
        }
        if self.backing_fmt.is_some() && self.backing_file.is_none() {
            return inval("Backing format cannot be used without backing file");
        }
        if self.lazy_refcounts && !v3 {
            return inval("Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)");
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return inval("Refcount width must be a power of two and may not exceed 64 bits");
        }
        if !v3 && self.refcount_bits != 16 {
            return inval("Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)");
        }
        if self.data_file_raw && self.data_file.is_none() {
            return inval("data-file-raw requires data-file");
        }
        if self.data_file_raw && self.backing_file.is_some() {
            return inval("Backing file and data-file-raw cannot be used at the same time");
        }
        if self.data_file.is_some() && !v3 {
            return inval("External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)");
        }
        if self.compression_type != CompressionType::Zlib && !v3 {
            return inval("Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)");
        }
        let size = self.rounded_size()?;
        if l1_entries(size, cs, self.extended_l2) * 8 > MAX_L1_BYTES {
            return inval(TOO_LARGE);
        }
        // The header (with the backing name) must fit in the first cluster.
        self.final_header(size, 0, 0, 0, 0, None)?;
        Ok(())
    }

    /// The header qemu leaves in the image once every step has run.
    fn final_header(
        &self,
        size: u64,
        l1_size: u64,
        l1_offset: u64,
        reftable_offset: u64,
        reftable_clusters: u64,
        crypto: Option<header::CryptoExt>,
    ) -> Result<Vec<u8>> {
        let mut h = Header::new(self.compat.version(), self.cluster_bits(), size);
        match &self.encryption {
            None => {}
            Some(CreateEncryption::Aes(_)) => h.crypt_method = 1,
            Some(CreateEncryption::Luks(..)) => {
                h.crypt_method = 2;
                h.crypto = crypto;
            }
        }
        h.l1_size = l1_size as u32;
        h.l1_table_offset = l1_offset;
        h.refcount_table_offset = reftable_offset;
        h.refcount_table_clusters = reftable_clusters as u32;
        h.refcount_order = self.refcount_bits.trailing_zeros();
        if self.data_file.is_some() {
            h.incompatible_features |= header::incompat::DATA_FILE;
        }
        if self.compression_type == CompressionType::Zstd {
            h.incompatible_features |= header::incompat::COMPRESSION;
            h.compression_type = 1;
        }
        if self.extended_l2 {
            h.incompatible_features |= header::incompat::EXTL2;
        }
        if self.lazy_refcounts {
            h.compatible_features |= header::compat::LAZY_REFCOUNTS;
        }
        if self.data_file_raw {
            h.autoclear_features |= header::autoclear::DATA_FILE_RAW;
        }
        h.data_file = self.data_file.clone();
        let Some(name) = &self.backing_file else {
            return h.serialize();
        };
        // QEMU writes the header without the backing name first, then assigns the
        // backing file; only that second step can fail, with these errno values.
        let body = h.serialize()?;
        let assign_err = |errno: i32| {
            let what = match &self.backing_fmt {
                Some(f) => format!("Could not assign backing file '{name}' with format '{f}'"),
                None => format!("Could not assign backing file '{name}'"),
            };
            Error::io(what, std::io::Error::from_raw_os_error(errno))
        };
        if name.len() > 1023 || self.backing_fmt.as_ref().is_some_and(|f| f.len() >= 16) {
            return Err(assign_err(libc::EINVAL));
        }
        h.backing_file = Some(name.clone());
        h.backing_format = self.backing_fmt.clone();
        match h.serialize() {
            Ok(b) => Ok(b),
            Err(_) => {
                drop(body);
                Err(assign_err(libc::ENOSPC))
            }
        }
    }
}

/// A set of cluster indices, kept as disjoint half-open intervals `start -> end`.
#[derive(Debug, Default)]
struct Ranges(BTreeMap<u64, u64>);

impl Ranges {
    fn contains(&self, x: u64) -> bool {
        self.0.range(..=x).next_back().is_some_and(|(_, &e)| x < e)
    }

    /// The first `p >= from` with `[p, p + n)` free: QEMU's cluster-by-cluster scan from its
    /// free-cluster hint, which restarts after every used cluster it meets.
    fn first_fit(&self, from: u64, n: u64) -> u64 {
        let mut p = from;
        if let Some((_, &e)) = self.0.range(..=p).next_back() {
            p = p.max(e);
        }
        loop {
            match self.0.range(p..).next() {
                Some((&s, &e)) if s < p.saturating_add(n) => p = e,
                _ => return p,
            }
        }
    }

    /// How many clusters from `from` on (at most `max`) are free.
    fn free_run(&self, from: u64, max: u64) -> u64 {
        if self.contains(from) {
            return 0;
        }
        match self.0.range(from..).next() {
            Some((&s, _)) => (s - from).min(max),
            None => max,
        }
    }

    fn insert(&mut self, mut s: u64, mut e: u64) {
        if s >= e {
            return;
        }
        if let Some((&ps, &pe)) = self.0.range(..=s).next_back() {
            if pe >= s {
                s = ps;
                e = e.max(pe);
                self.0.remove(&ps);
            }
        }
        while let Some((&ns, &ne)) = self.0.range(s..).next() {
            if ns > e {
                break;
            }
            e = e.max(ne);
            self.0.remove(&ns);
        }
        self.0.insert(s, e);
    }

    fn remove(&mut self, s: u64, e: u64) {
        if s >= e {
            return;
        }
        let mut pieces = Vec::new();
        if let Some((&ps, &pe)) = self.0.range(..s).next_back() {
            if pe > s {
                pieces.push((ps, pe));
            }
        }
        pieces.extend(self.0.range(s..e).map(|(&a, &b)| (a, b)));
        for (a, b) in pieces {
            self.0.remove(&a);
            if a < s {
                self.0.insert(a, s);
            }
            if b > e {
                self.0.insert(e, b);
            }
        }
    }

    fn last(&self) -> Option<u64> {
        self.0.iter().next_back().map(|(_, &e)| e - 1)
    }

    /// Intervals intersecting `[s, e)`, clipped to it.
    fn within(&self, s: u64, e: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        if let Some((_, &pe)) = self.0.range(..s).next_back() {
            if pe > s {
                out.push((s, pe.min(e)));
            }
        }
        out.extend(self.0.range(s..e).map(|(&a, &b)| (a, b.min(e))));
        out
    }
}

/// Why a simulated refcount update stopped.
enum SimErr {
    /// QEMU's -EAGAIN: new refcount metadata was placed; the caller restarts its search.
    Again,
    /// A real error.
    Fatal(Error),
}

impl From<Error> for SimErr {
    fn from(e: Error) -> Self {
        SimErr::Fatal(e)
    }
}

fn fatal(r: std::result::Result<(), SimErr>) -> Result<()> {
    match r {
        Ok(()) => Ok(()),
        Err(SimErr::Fatal(e)) => Err(e),
        Err(SimErr::Again) => Err(Error::invalid("refcount update did not settle")),
    }
}

fn too_large() -> Error {
    Error::InvalidArgument(TOO_LARGE.into())
}

/// Replays QEMU's allocator while the image is created (see the module docs).
struct Sim<'a> {
    file: &'a dyn Storage,
    cluster_bits: u32,
    cs: u64,
    order: u32,
    /// log2 of refcount entries per block.
    rb_bits: u32,
    /// Refcount table entries (byte offsets of refcount blocks).
    reftable: Vec<u64>,
    /// Cluster index of the refcount table.
    reftable_at: u64,
    reftable_clusters: u64,
    /// Clusters whose refcount is 1.
    used: Ranges,
    /// QEMU's free-cluster hint.
    free_index: u64,
    /// Length of the file once everything written so far is on disk.
    file_len: u64,
    /// L2 table cluster index per L1 entry (0: none).
    l1: Vec<u64>,
    l2_bits: u32,
    entry_bytes: u64,
    data_file: bool,
    /// The L2 table being filled: cluster index and contents.
    open_l2: Option<(u64, Vec<u8>)>,
}

impl<'a> Sim<'a> {
    fn new(file: &'a dyn Storage, opts: &CreateOptions, l1_len: u64) -> Sim<'a> {
        let cluster_bits = opts.cluster_bits();
        let cs = opts.cluster_size;
        let order = opts.refcount_bits.trailing_zeros();
        let entry_bytes = l2_entry_bytes(opts.extended_l2);
        // The skeleton: header, a one-cluster refcount table whose entry 0 points at the
        // refcount block in cluster 2.
        let mut reftable = vec![0u64; (cs / 8) as usize];
        reftable[0] = 2 * cs;
        Sim {
            file,
            cluster_bits,
            cs,
            order,
            rb_bits: cluster_bits + 3 - order,
            reftable,
            reftable_at: 1,
            reftable_clusters: 1,
            used: Ranges::default(),
            free_index: 0,
            file_len: 3 * cs,
            // Bounded: validate() limits the L1 table to 32 MiB.
            l1: vec![0; l1_len as usize],
            l2_bits: cluster_bits - entry_bytes.trailing_zeros(),
            entry_bytes,
            data_file: opts.data_file.is_some(),
            open_l2: None,
        }
    }

    fn grow_file(&mut self, end: u64) {
        self.file_len = self.file_len.max(end);
    }

    /// First-fit allocation without touching refcounts (`alloc_clusters_noref`).
    fn alloc_noref(&mut self, n: u64) -> Result<u64> {
        let p = self.used.first_fit(self.free_index, n);
        let end = p.checked_add(n).ok_or_else(too_large)?;
        if end - 1 > MAX_HOST_OFFSET >> self.cluster_bits {
            return Err(too_large());
        }
        self.free_index = end;
        Ok(p)
    }

    /// Allocates `n` contiguous clusters (`qcow2_alloc_clusters`).
    fn alloc(&mut self, n: u64) -> Result<u64> {
        loop {
            let p = self.alloc_noref(n)?;
            match self.update(p, n, true) {
                Ok(()) => return Ok(p),
                Err(SimErr::Again) => continue,
                Err(SimErr::Fatal(e)) => return Err(e),
            }
        }
    }

    /// Allocates up to `n` clusters exactly at `p`; returns how many were free there
    /// (`qcow2_alloc_clusters_at`).
    fn alloc_at(&mut self, p: u64, n: u64) -> Result<u64> {
        loop {
            let k = self.used.free_run(p, n);
            match self.update(p, k, true) {
                Ok(()) => return Ok(k),
                Err(SimErr::Again) => continue,
                Err(SimErr::Fatal(e)) => return Err(e),
            }
        }
    }

    /// Sets (or clears) the refcount of `[start, start + n)`, allocating refcount blocks
    /// on the way (`update_refcount`). On failure the part already done is undone.
    fn update(&mut self, start: u64, n: u64, inc: bool) -> std::result::Result<(), SimErr> {
        let end = start + n;
        let mut c = start;
        while c < end {
            let seg_end = end.min(((c >> self.rb_bits) + 1) << self.rb_bits);
            if let Err(e) = self.ensure_block(c) {
                if matches!(e, SimErr::Again) && self.free_index > start {
                    self.free_index = start;
                }
                if inc {
                    self.used.remove(start, c);
                    self.free_index = self.free_index.min(start);
                } else {
                    self.used.insert(start, c);
                }
                return Err(e);
            }
            if inc {
                self.used.insert(c, seg_end);
            } else {
                self.used.remove(c, seg_end);
                self.free_index = self.free_index.min(c);
            }
            c = seg_end;
        }
        Ok(())
    }

    /// Makes sure a refcount block covers cluster `c` (`alloc_refcount_block`).
    fn ensure_block(&mut self, c: u64) -> std::result::Result<(), SimErr> {
        let ti = c >> self.rb_bits;
        if (ti as usize) < self.reftable.len() && self.reftable[ti as usize] != 0 {
            return Ok(());
        }
        let nb = self.alloc_noref(1)?;
        if nb == 0 {
            return Err(Error::Corrupt(
                "Preventing invalid allocation of refcount block at offset 0".into(),
            )
            .into());
        }
        if nb >> self.rb_bits == ti {
            // The new block describes itself.
            self.used.insert(nb, nb + 1);
        } else {
            self.update(nb, 1, true)?;
        }
        self.grow_file((nb + 1) * self.cs);
        if (ti as usize) < self.reftable.len() {
            self.reftable[ti as usize] = nb * self.cs;
            return Err(SimErr::Again);
        }
        // The table is full: build new refcount structures past everything in use.
        let per_block = 1u64 << self.rb_bits;
        let blocks_used = (c + 1).max(nb + 1).div_ceil(per_block);
        let meta = blocks_used.checked_mul(per_block).ok_or_else(too_large)?;
        self.refcount_area(meta, 0, false, Some((ti, nb)))?;
        Err(SimErr::Again)
    }

    /// Places refcount blocks and a new refcount table at cluster `start` that cover
    /// everything up to `start + additional` clusters and themselves, switches to the new
    /// table and frees the old one (`qcow2_refcount_area`). Returns the first cluster
    /// after the new structures.
    fn refcount_area(
        &mut self,
        start: u64,
        additional: u64,
        exact: bool,
        new_block: Option<(u64, u64)>,
    ) -> Result<u64> {
        let epc = self.cs / 8;
        let (total, _) = refcount_metadata_clusters(
            start.saturating_add(additional),
            self.cs,
            self.order,
            !exact,
        );
        let area_ti = start >> self.rb_bits;
        let mut tsize = if exact {
            total
        } else {
            total + total.div_ceil(2)
        };
        tsize = tsize.div_ceil(epc) * epc;
        if tsize * 8 > MAX_REFTABLE_BYTES {
            return Err(too_large());
        }
        let tclusters = tsize / epc;
        let mut table = vec![0u64; tsize as usize];
        let keep = self.reftable.len().min(table.len());
        table[..keep].copy_from_slice(&self.reftable[..keep]);
        if let Some((ti, nb)) = new_block {
            if ti >= total {
                return Err(Error::invalid(
                    "refcount block outside the new refcount table",
                ));
            }
            table[ti as usize] = nb * self.cs;
        }
        let missing = (area_ti..total).filter(|&i| table[i as usize] == 0).count() as u64;
        let table_at = start + missing;
        let end = table_at + tclusters;
        let mut next_block = start;
        for i in area_ti..total {
            if table[i as usize] == 0 {
                table[i as usize] = next_block * self.cs;
                next_block += 1;
            }
            let first = i << self.rb_bits;
            if first < end {
                let lo = first.max(start);
                let hi = end.min(first + (1 << self.rb_bits));
                self.used.insert(lo, hi);
            }
        }
        // The old table stays on disk as it was when it was abandoned; later allocations
        // may reuse its clusters and overwrite it.
        self.write_table(&self.reftable, self.reftable_at)?;
        self.grow_file(end * self.cs);
        let (old_at, old_n) = (self.reftable_at, self.reftable_clusters);
        self.reftable = table;
        self.reftable_at = table_at;
        self.reftable_clusters = tclusters;
        fatal(self.update(old_at, old_n, false))?;
        Ok(end)
    }

    fn write_table(&self, table: &[u64], at: u64) -> Result<()> {
        let mut buf = vec![0u8; table.len() * 8];
        for (i, e) in table.iter().enumerate() {
            put64(&mut buf, i * 8, *e);
        }
        self.file.write_at(&buf, at * self.cs)
    }

    /// The L2 table for guest cluster `g`, allocated if missing (`get_cluster_table`).
    fn l2_table(&mut self, g: u64) -> Result<u64> {
        let t = (g >> self.l2_bits) as usize;
        let Some(&cur) = self.l1.get(t) else {
            return Err(Error::invalid("guest cluster beyond the L1 table"));
        };
        if cur != 0 {
            return Ok(cur);
        }
        let c = self.alloc(1)?;
        self.flush_l2()?;
        self.l1[t] = c;
        self.open_l2 = Some((c, vec![0u8; self.cs as usize]));
        self.grow_file((c + 1) * self.cs);
        Ok(c)
    }

    /// Points guest clusters `[g, g + n)` at host clusters `[h, h + n)` (or at themselves
    /// in an external data file), with COPIED set, as preallocation does.
    fn link(&mut self, g: u64, h: u64, n: u64) -> Result<()> {
        let mut i = 0;
        while i < n {
            let table = self.l2_table(g + i)?;
            let per_table = 1u64 << self.l2_bits;
            let idx = (g + i) & (per_table - 1);
            let run = (per_table - idx).min(n - i);
            let Some((open, buf)) = self.open_l2.as_mut() else {
                return Err(Error::invalid("L2 table not loaded"));
            };
            if *open != table {
                return Err(Error::invalid("L2 tables linked out of order"));
            }
            for k in 0..run {
                let host = if self.data_file { g + i + k } else { h + i + k };
                let off = ((idx + k) * self.entry_bytes) as usize;
                put64(buf, off, (host << self.cluster_bits) | COPIED);
            }
            i += run;
        }
        Ok(())
    }

    fn flush_l2(&mut self) -> Result<()> {
        if let Some((c, buf)) = self.open_l2.take() {
            self.file.write_at(&buf, c * self.cs)?;
        }
        Ok(())
    }

    /// One `qcow2_alloc_host_offset` call: allocates host clusters for as much of the
    /// guest range `[start, start + bytes)` as can be made contiguous; returns the guest
    /// bytes covered and the first host cluster. Links them, as preallocation does.
    fn alloc_host_run(&mut self, start: u64, bytes: u64) -> Result<(u64, u64)> {
        let cs = self.cs;
        let per_table = 1u64 << self.l2_bits;
        let mut pos = start;
        let mut remaining = bytes;
        let mut host_start: Option<u64> = None;
        let mut expected: Option<u64> = None;
        while remaining > 0 {
            let g = pos >> self.cluster_bits;
            let in_cluster = pos & (cs - 1);
            self.l2_table(g)?;
            let mut n = (in_cluster + remaining).div_ceil(cs);
            n = n.min(REQUEST_MAX_BYTES >> self.cluster_bits);
            n = n.min(per_table - (g & (per_table - 1)));
            let h = if self.data_file {
                g
            } else {
                match expected {
                    None => self.alloc(n)?,
                    Some(e) => {
                        n = self.alloc_at(e, n)?;
                        if n == 0 {
                            break;
                        }
                        e
                    }
                }
            };
            self.link(g, h, n)?;
            host_start.get_or_insert(h);
            let covered = (n * cs - in_cluster).min(remaining);
            pos += covered;
            remaining -= covered;
            expected = Some(h + n);
        }
        match host_start {
            Some(h) => Ok((bytes - remaining, h)),
            None => Err(Error::invalid("preallocation made no progress")),
        }
    }

    /// Metadata preallocation of `[0, size)` (`preallocate_co`); returns the file length
    /// qemu truncates the (data) file to: the end of the last allocation unit (`unit`
    /// bytes: a subcluster with extended L2, else a cluster).
    fn preallocate(&mut self, size: u64, unit: u64) -> Result<u64> {
        let max_chunk = (i32::MAX as u64) & !(self.cs - 1);
        let mut offset = 0;
        let mut end = 0;
        while offset < size {
            let cur = (size - offset).min(max_chunk);
            let (got, host) = self.alloc_host_run(offset, cur)?;
            end = host * self.cs + got;
            offset += got;
        }
        // The file ends at the last allocated unit (subcluster with extended L2).
        Ok(end.div_ceil(unit) * unit)
    }

    /// Writes the refcount blocks, the refcount table and the L1 table as they stand.
    fn finish(&mut self, l1_at: u64) -> Result<()> {
        self.flush_l2()?;
        let per_block = 1u64 << self.rb_bits;
        for (i, &off) in self.reftable.iter().enumerate() {
            if off == 0 {
                continue;
            }
            let mut block = vec![0u8; self.cs as usize];
            let first = i as u64 * per_block;
            for (a, b) in self.used.within(first, first + per_block) {
                for c in a..b {
                    refcount::set(&mut block, self.order, (c - first) as usize, 1);
                }
            }
            self.file.write_at(&block, off)?;
        }
        self.write_table(&self.reftable, self.reftable_at)?;
        if !self.l1.is_empty() {
            let mut buf = vec![0u8; self.l1.len() * 8];
            for (i, &c) in self.l1.iter().enumerate() {
                if c != 0 {
                    put64(&mut buf, i * 8, (c << self.cluster_bits) | COPIED);
                }
            }
            self.file.write_at(&buf, l1_at * self.cs)?;
        }
        Ok(())
    }
}

/// Reserves `[offset, offset + len)` of a file with `posix_fallocate`.
fn fallocate(file: &FileStorage, offset: u64, len: u64) -> Result<()> {
    use std::os::fd::AsRawFd;
    if len == 0 {
        return Ok(());
    }
    let (Ok(o), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(too_large());
    };
    // SAFETY: posix_fallocate on a valid, open file descriptor with plain integers.
    let r = unsafe { libc::posix_fallocate(file.file().as_raw_fd(), o, l) };
    if r != 0 {
        return Err(Error::io(
            "Could not preallocate data",
            std::io::Error::from_raw_os_error(r),
        ));
    }
    Ok(())
}

/// Grows `file` (currently `from` bytes long) to `to` bytes with a preallocation mode, as
/// QEMU's file driver does on truncate.
fn grow_with(file: &FileStorage, from: u64, to: u64, mode: Preallocation) -> Result<()> {
    if to <= from {
        return Ok(());
    }
    match mode {
        Preallocation::Off | Preallocation::Metadata => file.set_len(to),
        Preallocation::Falloc => fallocate(file, from, to - from),
        Preallocation::Full => write_zeros(file, from, to - from),
    }
}

/// Writes zeros over the first block of a freshly created non-empty file, as QEMU's
/// file driver does so that later alignment probing finds allocated storage.
fn allocate_first_block(file: &FileStorage, size: u64) -> Result<()> {
    let n = if size >= 4096 { 4096 } else { 512 };
    file.write_at(&vec![0u8; n], 0)
}

/// Creates (or truncates) a raw image of `size` bytes (rounded up to 512, as qemu-img
/// does): `Off` leaves it sparse (only the first block is written), `Falloc` reserves
/// it with `posix_fallocate`, `Full` writes zeros; `Metadata` is not a raw mode and is
/// treated as `Off`.
pub fn create_raw(path: &Path, size: u64, prealloc: Preallocation) -> Result<()> {
    let size = size_rounded(size)
        .filter(|&s| s <= i64::MAX as u64)
        .ok_or_else(|| {
            Error::InvalidArgument("Could not resize image: Image size cannot be negative".into())
        })?;
    let file = FileStorage::create(path)?;
    match prealloc {
        Preallocation::Off | Preallocation::Metadata => {
            file.set_len(size)?;
            if size > 0 {
                allocate_first_block(&file, size)?;
            }
        }
        Preallocation::Falloc => fallocate(&file, 0, size)?,
        Preallocation::Full => write_zeros(&file, 0, size)?,
    }
    Ok(())
}

/// Creates a qcow2 image at `path` byte-identical to `qemu-img create -f qcow2` with the
/// same options (the data area's host allocation follows the preallocation mode).
///
/// The options are validated first ([`CreateOptions::validate`]); nothing is touched
/// when they are invalid. An external data file is resolved relative to the image's
/// directory, created (or truncated) and sized as qemu does. If a later step fails, the
/// files created are removed again, as qemu-img does. I/O errors creating a file read
/// `Could not create '<path>': <strerror>`.
pub fn create_qcow2(path: &Path, opts: &CreateOptions) -> Result<()> {
    opts.validate()?;
    let file = FileStorage::create(path)?;
    let data_path = opts
        .data_file
        .as_ref()
        .map(|d| crate::open::resolve_relative(path, d));
    let data = match &data_path {
        Some(p) => match FileStorage::create(p) {
            Ok(f) => Some(f),
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(e);
            }
        },
        None => None,
    };
    let r = build(&file, data.as_ref(), opts);
    if r.is_err() {
        let _ = std::fs::remove_file(path);
        if let Some(p) = &data_path {
            let _ = std::fs::remove_file(p);
        }
    }
    r
}

fn build(file: &FileStorage, data: Option<&FileStorage>, opts: &CreateOptions) -> Result<()> {
    let size = opts.rounded_size()?;
    let cs = opts.cluster_size;
    let l1_len = l1_entries(size, cs, opts.extended_l2);
    let mut sim = Sim::new(file, opts, l1_len);
    // Clusters 0-2 (header, refcount table, refcount block) are allocated first.
    let first = sim.alloc(3)?;
    if first != 0 {
        return Err(Error::invalid("skeleton not at the start of the file"));
    }
    // Growing to the virtual size allocates the L1 table first.
    let l1_at = if l1_len > 0 {
        let at = sim.alloc((l1_len * 8).div_ceil(cs))?;
        sim.grow_file(at * cs + l1_len * 8);
        at
    } else {
        0
    };
    let prealloc = opts.effective_preallocation();
    let unit = if opts.extended_l2 { cs / 32 } else { cs };
    // What the data area still needs once the metadata is on disk:
    // (file, from, to, mode).
    let mut data_fill: Option<(u64, u64, Preallocation)> = None;
    match (prealloc, data) {
        (Preallocation::Off, _) => {}
        (Preallocation::Metadata, _) | (_, Some(_)) => {
            let end = sim.preallocate(size, unit)?;
            if data.is_none() {
                sim.grow_file(end);
            }
        }
        (mode, None) => {
            let old_end = sim.used.last().map_or(0, |c| c + 1);
            let nd = size.div_ceil(cs);
            let nl2 = nd.div_ceil(1u64 << sim.l2_bits);
            let start = sim.refcount_area(old_end, nd + nl2, true, None)?;
            if sim.alloc_at(start, nd)? != nd {
                return Err(Error::invalid("could not allocate the data area"));
            }
            let from = sim.file_len;
            let to = (start + nd) * cs;
            sim.grow_file(to);
            data_fill = Some((from, to, mode));
            // Link the data clusters, one L2 table at a time.
            let per_table = 1u64 << sim.l2_bits;
            let mut g = 0;
            while g < nd {
                let n = (per_table - (g & (per_table - 1))).min(nd - g);
                sim.link(g, start + g, n)?;
                g += n;
            }
        }
    }
    // QEMU sets up encryption last: the LUKS area takes the next free clusters.
    let luks = match &opts.encryption {
        Some(CreateEncryption::Luks(params, secret)) => {
            let area = crate::crypto::luks::create(params, secret.bytes())?.area;
            let n = (area.len() as u64).div_ceil(cs);
            let at = sim.alloc(n)?;
            sim.grow_file((at + n) * cs);
            Some((at * cs, area))
        }
        _ => None,
    };
    sim.finish(l1_at)?;
    let header = opts.final_header(
        size,
        l1_len,
        l1_at * cs,
        sim.reftable_at * cs,
        sim.reftable_clusters,
        luks.as_ref().map(|(at, area)| header::CryptoExt {
            offset: *at,
            length: area.len() as u64,
        }),
    )?;
    if let Some((at, area)) = &luks {
        file.write_at(area, *at)?;
    }
    file.write_at(&header, 0)?;
    if let Some((from, to, mode)) = data_fill {
        grow_with(file, from, to, mode)?;
    }
    if file.len()? < sim.file_len {
        file.set_len(sim.file_len)?;
    }
    if let Some(d) = data {
        if prealloc == Preallocation::Off {
            grow_with(d, 0, size, Preallocation::Off)?;
            if size > 0 {
                allocate_first_block(d, size)?;
            }
        } else {
            grow_with(d, 0, size.div_ceil(unit) * unit, prealloc)?;
        }
    }
    Ok(())
}
