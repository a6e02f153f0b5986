//! Consistency check of a qcow2 image (`qemu-img check`), detection only.
//!
//! The check rebuilds every cluster's reference count from the metadata that points at it
//! and compares the result with the refcounts stored on disk, then verifies the COPIED
//! flags of the active tables. It counts, words and orders its findings exactly as
//! `qemu-img check` 10.0.2 does, because scripts compare both the numbers and the stderr
//! lines (reference §3.1, §3.3).
//!
//! The pass order is QEMU's and is visible in the message order:
//! 1. the snapshot table is read again from the header pointer (the check-mode open does
//!    not trust it);
//! 2. references are counted: header, active L1/L2 (with allocation statistics), snapshot
//!    L1/L2, snapshot table, refcount table, crypto header, bitmaps, refcount blocks;
//! 3. computed and stored refcounts are compared for every cluster;
//! 4. COPIED flags of the active L1 and L2 entries are compared with the stored refcounts.
//!
//! Memory: the computed refcounts are kept packed at the image's refcount width, one entry
//! per cluster of the file (plus at most one past its end), as QEMU does; every table read
//! is bounded by a QEMU limit or by one cluster. No size read from the image is used to
//! allocate before it has been checked against the file size or such a limit.
//!
//! The same passes run in repair mode for [`super::repair`]: a [`Fix`] turns on QEMU's
//! in-pass repairs (a refcount block past the end of the file, an unaligned preallocated
//! zero cluster, refcount mismatches, COPIED flags) and the "Repairing" wording of their
//! messages. Refcount changes made in repair mode stay in the refcount block cache until
//! [`Checker::write_refblocks`] writes them.

use super::Qcow2;
use crate::error::Result;
use crate::ondisk::header::autoclear;
use crate::ondisk::l2::{self, ClusterType};
use crate::ondisk::{be16, be32, be64, refcount, snapshot};
use crate::storage::Storage;
use std::collections::{BTreeSet, HashMap};

/// Largest L1 table QEMU accepts for a snapshot (QCOW_MAX_L1_SIZE, in entries).
const MAX_SNAPSHOT_L1_ENTRIES: u64 = (32 << 20) / 8;
/// Reserved bits of a refcount table entry.
const REFT_RESERVED_MASK: u64 = 0x1ff;
/// Reserved bits of a bitmap table entry.
const BME_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// Offset bits of a bitmap table entry.
const BME_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Largest request QEMU's block layer accepts (BDRV_MAX_LENGTH): reads reaching past it
/// fail with EIO before they reach the file, and the check reports them as such.
const BDRV_MAX_LENGTH: u64 = (i64::MAX as u64) & !((1u64 << 30) - 1);
/// Most refcount blocks kept in memory while comparing (a bound, not a tuning knob).
const REFBLOCK_CACHE_BLOCKS: usize = 64;

/// One problem found, in a form a repair can act on. Every finding also produced one
/// stderr line in [`CheckReport::messages`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// The stored refcount differs from the number of references found. `stored > 0`
    /// and `stored > computed` is a leak; anything else is a corruption.
    RefcountMismatch {
        /// Host cluster index.
        cluster: u64,
        /// Refcount on disk.
        stored: u64,
        /// References found.
        computed: u64,
    },
    /// A reference would push the computed count past the refcount width.
    RefcountOverflow {
        /// Host byte offset of the cluster.
        offset: u64,
    },
    /// Metadata refers to a region that ends a cluster or more past the end of the file.
    BeyondEof {
        /// Start of the region.
        offset: u64,
        /// Length of the region.
        size: u64,
    },
    /// An L1 entry has reserved bits set.
    L1Reserved {
        /// The entry.
        entry: u64,
    },
    /// An L1 entry points to an unaligned L2 table.
    L2Unaligned {
        /// The L2 offset.
        l2_offset: u64,
    },
    /// An L2 entry has reserved bits set.
    L2Reserved {
        /// The entry.
        entry: u64,
    },
    /// A compressed L2 entry has the COPIED flag set.
    CompressedCopied {
        /// The entry.
        entry: u64,
    },
    /// A compressed L2 entry in an image with an external data file.
    CompressedWithDataFile {
        /// Index in its L2 table.
        index: u64,
        /// The entry.
        entry: u64,
    },
    /// A compressed L2 entry with a non-zero subcluster bitmap.
    CompressedWithBitmap {
        /// Index in its L2 table.
        index: u64,
        /// The entry.
        entry: u64,
    },
    /// An allocated cluster whose subcluster bitmap marks a subcluster both allocated and
    /// zero.
    BadSubclusterBitmap {
        /// Host offset of the cluster.
        offset: u64,
    },
    /// An unallocated cluster with allocation bits in its subcluster bitmap.
    UnallocatedWithBitmap,
    /// A data (or preallocated zero) cluster at an unaligned host offset.
    DataUnaligned {
        /// The offset.
        offset: u64,
        /// Whether the cluster holds data (otherwise it is a preallocated zero cluster,
        /// which a repair may simply drop).
        contains_data: bool,
    },
    /// A refcount table entry is unusable.
    BadRefblock {
        /// Refcount table index.
        index: u64,
        /// What is wrong.
        problem: RefblockProblem,
    },
    /// The COPIED flag of an active L1 entry disagrees with the L2 table's refcount.
    L1Copied {
        /// L1 index.
        l1_index: u64,
        /// The L1 entry.
        entry: u64,
        /// Stored refcount of the L2 table.
        refcount: u64,
    },
    /// The COPIED flag of an active L2 entry disagrees with the data cluster's refcount.
    L2Copied {
        /// L1 index of the L2 table.
        l1_index: u64,
        /// Index in the L2 table.
        l2_index: u64,
        /// The L2 entry.
        entry: u64,
        /// Stored refcount of the data cluster (1 with an external data file).
        refcount: u64,
    },
    /// Internal snapshots in an image with an external data file.
    SnapshotsWithDataFile,
    /// A snapshot's L1 table is unusable.
    BadSnapshotL1 {
        /// Snapshot table index.
        index: usize,
    },
    /// A v3 snapshot table entry lacks the 16 bytes of extra data v3 requires.
    SnapshotIncomplete {
        /// Snapshot table index.
        index: usize,
    },
    /// The bitmap directory or a bitmap table could not be used.
    BadBitmaps,
}

/// Why a refcount table entry is unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefblockProblem {
    /// Reserved bits are set.
    Reserved,
    /// The offset is not cluster aligned.
    Unaligned,
    /// The block lies past the end of the file.
    OutsideImage,
    /// The block's own cluster does not have exactly one reference.
    Refcount(u64),
}

/// Why the check stopped before finishing; `qemu-img check` then prints no result, only
/// "Check failed: <strerror(errno)>", and exits with 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckFailure {
    /// The errno QEMU's check returns.
    pub errno: i32,
}

impl CheckFailure {
    /// The system's text for the errno, as QEMU prints it after "Check failed: ".
    pub fn strerror(&self) -> String {
        strerror(self.errno)
    }
}

/// The result of [`check`], with the figures `qemu-img check --output=json` prints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Corruptions found (JSON `corruptions`).
    pub corruptions: u64,
    /// Leaked clusters found (JSON `leaks`).
    pub leaks: u64,
    /// Errors that kept the check from looking at something (JSON `check-errors`).
    pub check_errors: u64,
    /// Guest clusters of the virtual disk (JSON `total-clusters`).
    pub total_clusters: u64,
    /// Active L2 entries with a host cluster or compressed data (`allocated-clusters`).
    pub allocated_clusters: u64,
    /// Allocated clusters not following their predecessor in the same L2 table, plus
    /// every compressed cluster (`fragmented-clusters`).
    pub fragmented_clusters: u64,
    /// Compressed clusters in the active L2 tables (`compressed-clusters`).
    pub compressed_clusters: u64,
    /// End of the last cluster that is referenced or has a refcount (`image-end-offset`).
    pub image_end_offset: u64,
    /// The per-problem lines QEMU writes to stderr, in its order, without newlines.
    pub messages: Vec<String>,
    /// Indices into `messages` of the lines QEMU prints through its error reporter,
    /// which prefixes them with the program name and ": " (e.g. "qemu-img: ").
    pub prefixed: Vec<usize>,
    /// Problems in structured form, in the order found.
    pub findings: Vec<Finding>,
    /// QEMU would rebuild the refcount structure under `-r all` (a refcount of 0 where
    /// references exist, or an unusable refcount table entry).
    pub rebuild_needed: bool,
    /// Set when the check stopped early; the figures above are then incomplete and
    /// `qemu-img` prints none of them (allocation figures and the end offset stay 0).
    pub failure: Option<CheckFailure>,
    /// Leaked clusters repaired (JSON `leaks-fixed`); always 0 for a plain check.
    pub leaks_fixed: u64,
    /// Corruptions repaired (JSON `corruptions-fixed`); always 0 for a plain check.
    pub corruptions_fixed: u64,
}

/// The counters of a [`CheckReport`], which QEMU's repair saves and restores around its
/// passes (the messages are not part of them: every pass's lines are printed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Counts {
    pub(super) corruptions: u64,
    pub(super) leaks: u64,
    pub(super) check_errors: u64,
    pub(super) leaks_fixed: u64,
    pub(super) corruptions_fixed: u64,
}

/// Which repairs a pass may make (QEMU's BDRV_FIX_LEAKS / BDRV_FIX_ERRORS).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Fix {
    /// Lower refcounts that are too high.
    pub(super) leaks: bool,
    /// Raise refcounts that are too low and repair the other structures QEMU repairs.
    pub(super) errors: bool,
}

impl Fix {
    /// Detection only.
    pub(super) const NONE: Fix = Fix {
        leaks: false,
        errors: false,
    };

    pub(super) fn any(self) -> bool {
        self.leaks || self.errors
    }
}

impl CheckReport {
    /// The stderr lines as a program named `program` prints them.
    pub fn stderr_lines(&self, program: &str) -> Vec<String> {
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                if self.prefixed.contains(&i) {
                    format!("{program}: {m}")
                } else {
                    m.clone()
                }
            })
            .collect()
    }

    /// `qemu-img check`'s exit status for this result: 1 if the check failed or had
    /// errors, 2 for corruptions, 3 for leaks only, 0 when clean.
    pub fn exit_code(&self) -> i32 {
        if self.failure.is_some() || self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }

    pub(super) fn say(&mut self, msg: String) {
        self.messages.push(msg);
    }

    pub(super) fn say_prefixed(&mut self, msg: String) {
        self.prefixed.push(self.messages.len());
        self.messages.push(msg);
    }

    fn corrupt(&mut self, finding: Finding, msg: String) {
        self.corruptions += 1;
        self.findings.push(finding);
        self.messages.push(msg);
    }

    pub(super) fn counts(&self) -> Counts {
        Counts {
            corruptions: self.corruptions,
            leaks: self.leaks,
            check_errors: self.check_errors,
            leaks_fixed: self.leaks_fixed,
            corruptions_fixed: self.corruptions_fixed,
        }
    }

    pub(super) fn set_counts(&mut self, c: Counts) {
        self.corruptions = c.corruptions;
        self.leaks = c.leaks;
        self.check_errors = c.check_errors;
        self.leaks_fixed = c.leaks_fixed;
        self.corruptions_fixed = c.corruptions_fixed;
    }
}

/// The text of an errno, without Rust's " (os error N)" suffix.
pub(super) fn strerror(errno: i32) -> String {
    let s = std::io::Error::from_raw_os_error(errno).to_string();
    match s.rfind(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// A failure that ends the check, carrying QEMU's errno.
#[derive(Debug)]
pub(super) struct Stop(pub(super) i32);

pub(super) type Step<T = ()> = std::result::Result<T, Stop>;

/// One snapshot table entry as the check reads it, independently of the open-time parse.
/// The raw fields are kept so that `-r all` can write the entry back unchanged except
/// for what it repairs.
#[derive(Debug, Clone)]
pub(super) struct SnapInfo {
    pub(super) l1_table_offset: u64,
    pub(super) l1_size: u32,
    /// The extra data size as stored (before any truncation).
    extra_data_size: u32,
    pub(super) date_sec: u32,
    pub(super) date_nsec: u32,
    pub(super) vm_clock_nsec: u64,
    /// The 32-bit VM state size of the entry header.
    pub(super) vm_state_size32: u32,
    /// The extra data kept (at most 1024 bytes, QEMU's limit).
    pub(super) extra: Vec<u8>,
    pub(super) id: Vec<u8>,
    pub(super) name: Vec<u8>,
}

/// The snapshot table as the check read it.
pub(super) struct SnapTable {
    pub(super) entries: Vec<SnapInfo>,
    /// Length in bytes of the table as stored (up to the end of the last entry kept).
    pub(super) len: u64,
    /// Entries `-r all` fixed while reading (extra data cut, incomplete entries); the
    /// table must be written anew for the fixes to reach the disk.
    pub(super) to_rewrite: u64,
    /// Overhanging entries `-r all` dropped by lowering the header's count.
    pub(super) discarded: u64,
}

/// The computed refcounts, packed at the image's width (qemu's in-memory refcount table).
pub(super) struct RefArray {
    order: u32,
    max: u64,
    /// The packed entries; a refcount block's worth of them is a refcount block's bytes.
    pub(super) data: Vec<u8>,
    /// Number of entries (clusters) the array covers.
    pub(super) len: u64,
}

impl RefArray {
    fn bytes_for(order: u32, n: u64) -> u64 {
        (n << order).div_ceil(8)
    }

    fn new(order: u32, n: u64) -> Step<RefArray> {
        let mut a = RefArray {
            order,
            max: refcount::max(order),
            data: Vec::new(),
            len: 0,
        };
        a.grow(n)?;
        Ok(a)
    }

    /// Grows to cover `n` clusters; fails with ENOMEM like QEMU's realloc when the
    /// memory cannot be had.
    pub(super) fn grow(&mut self, n: u64) -> Step {
        if n <= self.len {
            return Ok(());
        }
        let bytes = Self::bytes_for(self.order, n);
        let bytes = usize::try_from(bytes).map_err(|_| Stop(libc::ENOMEM))?;
        if bytes > self.data.len() {
            self.data
                .try_reserve_exact(bytes - self.data.len())
                .map_err(|_| Stop(libc::ENOMEM))?;
            self.data.resize(bytes, 0);
        }
        self.len = n;
        Ok(())
    }

    pub(super) fn get(&self, i: u64) -> u64 {
        if i >= self.len {
            return 0;
        }
        refcount::get(&self.data, self.order, i as usize)
    }

    /// Sets entry `i`, which must be below `len`.
    pub(super) fn set(&mut self, i: u64, v: u64) {
        refcount::set(&mut self.data, self.order, i as usize, v);
    }

    /// Forgets every count, keeping the size.
    pub(super) fn clear(&mut self) {
        self.data.fill(0);
    }
}

/// One check (or repair) pass over an image: QEMU's check state.
pub(super) struct Checker<'a> {
    pub(super) img: &'a Qcow2,
    pub(super) file: &'a dyn Storage,
    pub(super) file_len: u64,
    pub(super) cluster_bits: u32,
    pub(super) cs: u64,
    extended: bool,
    data_file: bool,
    pub(super) refs: RefArray,
    /// Largest cluster index a legitimate reference can reach: references may end less
    /// than one cluster past EOF. Anything beyond comes from offsets that wrapped in
    /// QEMU's signed arithmetic, where QEMU's array growth fails with ENOMEM.
    max_index: u64,
    /// The refcount table in use; a rebuild switches these from the header's values.
    pub(super) reftable_offset: u64,
    pub(super) reftable_clusters: u64,
    pub(super) reftable: Vec<u64>,
    /// Cached refcount blocks by offset.
    pub(super) refblocks: HashMap<u64, Vec<u8>>,
    /// Cached refcount blocks changed by a repair and not yet written.
    dirty_refblocks: BTreeSet<u64>,
    /// Clusters whose refcount a repair dropped to zero (to be discarded, as QEMU does).
    pub(super) freed: Vec<u64>,
    signaled_corruption: bool,
    /// Repairs this pass may make.
    pub(super) fix: Fix,
    /// The refcount structure must be rebuilt (QEMU's `rebuild`).
    pub(super) rebuild: bool,
    pub(super) r: CheckReport,
}

/// Checks `img` as `qemu-img check` (without `-r`) does and reports what it finds.
///
/// Open the image with [`super::Qcow2Options::check`] set, so that broken snapshot and
/// bitmap metadata do not stop the open. Problems in the image are reported in the
/// returned [`CheckReport`], never as `Err`; the check itself does not fail on any input.
pub fn check(img: &Qcow2) -> Result<CheckReport> {
    let (mut c, snapshots) = match Checker::start(img, Fix::NONE) {
        Ok(x) => x,
        Err(r) => return Ok(*r),
    };
    if let Err(Stop(errno)) = c.run(&snapshots.entries, snapshots.len) {
        c.fail(errno);
    }
    c.r.rebuild_needed = c.rebuild;
    Ok(c.r)
}

impl<'a> Checker<'a> {
    /// Reads the snapshot table and sets up the computed refcount array; on failure
    /// returns the finished report (QEMU's check ends there).
    pub(super) fn start(
        img: &'a Qcow2,
        fix: Fix,
    ) -> std::result::Result<(Checker<'a>, SnapTable), Box<CheckReport>> {
        let file = img.file().as_ref();
        let mut r = CheckReport::default();
        let snapshots = match read_snapshot_table(img, &mut r, fix) {
            Ok(s) => s,
            Err(Stop(errno)) => {
                r.failure = Some(CheckFailure { errno });
                return Err(Box::new(r));
            }
        };
        let file_len = match file.len() {
            Ok(l) => l,
            Err(e) => {
                r.check_errors += 1;
                r.failure = Some(CheckFailure { errno: e.errno() });
                return Err(Box::new(r));
            }
        };
        let h = img.header();
        let cluster_bits = h.cluster_bits;
        let cs = h.cluster_size();
        let nb_clusters = file_len.div_ceil(cs);
        if nb_clusters > i32::MAX as u64 {
            r.check_errors += 1;
            r.failure = Some(CheckFailure { errno: libc::EFBIG });
            return Err(Box::new(r));
        }
        let refs = match RefArray::new(h.refcount_order, nb_clusters) {
            Ok(a) => a,
            Err(Stop(errno)) => {
                r.check_errors += 1;
                r.failure = Some(CheckFailure { errno });
                return Err(Box::new(r));
            }
        };
        // QEMU counts whole 512-byte sectors of the virtual size.
        r.total_clusters = (h.size & !511).div_ceil(cs);
        let c = Checker {
            img,
            file,
            file_len,
            cluster_bits,
            cs,
            extended: h.extended_l2(),
            data_file: h.has_data_file(),
            refs,
            max_index: (file_len + cs - 1) >> cluster_bits,
            reftable_offset: h.refcount_table_offset,
            reftable_clusters: h.refcount_table_clusters as u64,
            reftable: Vec::new(),
            refblocks: HashMap::new(),
            dirty_refblocks: BTreeSet::new(),
            freed: Vec::new(),
            signaled_corruption: false,
            fix,
            rebuild: false,
            r,
        };
        Ok((c, snapshots))
    }

    /// Records that the pass stopped with `errno`.
    pub(super) fn fail(&mut self, errno: i32) {
        self.r.failure = Some(CheckFailure { errno });
        // QEMU discards the allocation figures of a failed refcount check.
        self.r.allocated_clusters = 0;
        self.r.fragmented_clusters = 0;
        self.r.compressed_clusters = 0;
        self.r.total_clusters = 0;
        self.r.image_end_offset = 0;
    }
}

/// Reads metadata, failing as QEMU's block layer does for requests it refuses.
fn pread(file: &dyn Storage, offset: u64, len: usize) -> std::result::Result<Vec<u8>, i32> {
    if offset > BDRV_MAX_LENGTH || len as u64 > BDRV_MAX_LENGTH - offset {
        return Err(libc::EIO);
    }
    let mut buf = Vec::new();
    buf.try_reserve_exact(len).map_err(|_| libc::ENOMEM)?;
    buf.resize(len, 0);
    file.read_at(&mut buf, offset).map_err(|e| e.errno())?;
    Ok(buf)
}

/// Re-reads the snapshot table from the header pointer, as QEMU's check does; a table
/// that cannot be used ends the check, as in QEMU.
///
/// With `fix.errors` (`-r all`) it repairs as QEMU does: too many entries, or a table
/// longer than 64 MiB, lose their overhanging entries (the header's count is lowered at
/// once, which is safe: the dropped entries' clusters merely leak until the refcount
/// pass frees them); extra data over 1024 bytes is cut and incomplete v3 entries are
/// completed in memory, for [`super::repair`] to write the table anew.
fn read_snapshot_table(img: &Qcow2, r: &mut CheckReport, fix: Fix) -> Step<SnapTable> {
    let h = img.header();
    let file = img.file().as_ref();
    let mut n = h.nb_snapshots as u64;
    let offset = h.snapshots_offset;
    let max_entries = snapshot::MAX_SNAPSHOTS as u64;
    let mut discarded = 0;
    if n > max_entries && fix.errors {
        r.say(format!(
            "Discarding {} overhanging snapshots",
            n - max_entries
        ));
        set_snapshot_count(file, r, max_entries)?;
        discarded += n - max_entries;
        n = max_entries;
    }
    let invalid = if n > max_entries {
        Some(("snapshot table too large", libc::EFBIG))
    } else if (i64::MAX as u64) - n * 40 < offset || offset & (h.cluster_size() - 1) != 0 {
        Some(("snapshot table offset invalid", libc::EINVAL))
    } else {
        None
    };
    if let Some((msg, errno)) = invalid {
        r.check_errors += 1;
        r.say_prefixed(format!("ERROR {msg}"));
        if n > max_entries {
            r.say(format!(
                "You can force-remove all {} overhanging snapshots with qemu-img check -r all",
                n - max_entries
            ));
        }
        return Err(Stop(errno));
    }
    let mut out = Vec::new();
    let mut pos = offset;
    let mut to_rewrite = 0;
    let fail = |r: &mut CheckReport, msg: String, hint: Option<String>, errno: i32| {
        r.check_errors += 1;
        r.say_prefixed(format!("ERROR failed to read the snapshot table: {msg}"));
        if let Some(hint) = hint {
            r.say(hint);
        }
        Stop(errno)
    };
    let read_err = |errno: i32| format!("Failed to read snapshot table: {}", strerror(errno));
    for i in 0..n {
        let entry_start = pos;
        pos = pos.next_multiple_of(8);
        let hdr = pread(file, pos, 40).map_err(|e| fail(r, read_err(e), None, e))?;
        pos += 40;
        let extra = be32(&hdr, 36);
        let mut kept_extra = extra;
        if extra > snapshot::MAX_EXTRA_DATA {
            if !fix.errors {
                return Err(fail(
                    r,
                    format!("Too much extra metadata in snapshot table entry {i}"),
                    Some(
                        "You can force-remove this extra metadata with qemu-img check -r all"
                            .into(),
                    ),
                    libc::EFBIG,
                ));
            }
            r.say(format!(
                "Discarding too much extra metadata in snapshot table entry {i} ({extra} > {})",
                snapshot::MAX_EXTRA_DATA
            ));
            to_rewrite += 1;
            kept_extra = snapshot::MAX_EXTRA_DATA;
        }
        let id_len = be16(&hdr, 12) as usize;
        let name_len = be16(&hdr, 14) as usize;
        let ex =
            pread(file, pos, kept_extra as usize).map_err(|e| fail(r, read_err(e), None, e))?;
        pos += extra as u64;
        let names =
            pread(file, pos, id_len + name_len).map_err(|e| fail(r, read_err(e), None, e))?;
        pos += names.len() as u64;
        let table_len = pos - offset;
        if table_len > snapshot::MAX_TABLE_SIZE || table_len > i32::MAX as u64 {
            if !fix.errors {
                return Err(fail(
                    r,
                    "Snapshot table is too big".into(),
                    Some(format!(
                        "You can force-remove all {} overhanging snapshots with qemu-img check -r all",
                        n - i
                    )),
                    libc::EFBIG,
                ));
            }
            r.say(format!(
                "Discarding {} overhanging snapshots (snapshot table is too big)",
                n - i
            ));
            set_snapshot_count(file, r, i)?;
            discarded += n - i;
            pos = entry_start;
            break;
        }
        out.push(SnapInfo {
            l1_table_offset: be64(&hdr, 0),
            l1_size: be32(&hdr, 8),
            extra_data_size: extra,
            date_sec: be32(&hdr, 16),
            date_nsec: be32(&hdr, 20),
            vm_clock_nsec: be64(&hdr, 24),
            vm_state_size32: be32(&hdr, 32),
            extra: ex,
            id: names[..id_len].to_vec(),
            name: names[id_len..].to_vec(),
        });
    }
    if h.version >= 3 {
        for (i, s) in out.iter().enumerate() {
            if s.extra_data_size < 16 {
                if fix.errors {
                    r.say(format!("Repairing snapshot table entry {i} is incomplete"));
                    to_rewrite += 1;
                } else {
                    r.corrupt(
                        Finding::SnapshotIncomplete { index: i },
                        format!("ERROR snapshot table entry {i} is incomplete"),
                    );
                }
            }
        }
    }
    // The table ends where the last entry's name ends; only gaps between entries are
    // padded.
    Ok(SnapTable {
        entries: out,
        len: pos - offset,
        to_rewrite,
        discarded,
    })
}

/// Lowers the header's snapshot count (repair of overhanging entries) and makes it
/// durable before anything frees the clusters of the dropped entries.
fn set_snapshot_count(file: &dyn Storage, r: &mut CheckReport, n: u64) -> Step {
    let res = file
        .write_at(&(n as u32).to_be_bytes(), 60)
        .and_then(|()| file.flush());
    if let Err(e) = res {
        r.check_errors += 1;
        r.say(format!(
            "ERROR failed to update the number of snapshots in the image header: {}",
            strerror(e.errno())
        ));
        return Err(Stop(e.errno()));
    }
    Ok(())
}

/// C's `%#x`: like Rust's `{:#x}` except that zero prints as a bare "0".
fn alt_hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

/// A C string as QEMU prints it: up to the first NUL.
fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

impl Checker<'_> {
    fn run(&mut self, snapshots: &[SnapInfo], snap_size: u64) -> Step {
        self.calculate_refcounts(snapshots, snap_size)?;
        let highest = self.compare_refcounts(Fix::NONE);
        self.check_oflag_copied(false)?;
        self.r.image_end_offset = (highest + 1) * self.cs;
        Ok(())
    }

    /// Counts one reference to every cluster that `[offset, offset + size)` touches.
    fn inc(&mut self, offset: u64, size: u64) -> Step {
        if size == 0 {
            return Ok(());
        }
        // QEMU computes this in signed 64-bit arithmetic; the last cluster of an image
        // may legitimately be only partly present in the file.
        let excess = (offset as i64)
            .wrapping_add(size as i64)
            .wrapping_sub(self.file_len as i64);
        if excess >= self.cs as i64 {
            self.r.corrupt(
                Finding::BeyondEof { offset, size },
                format!(
                    "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {offset:#x} size {size:#x}"
                ),
            );
            return Ok(());
        }
        let first = offset >> self.cluster_bits;
        let last = offset.wrapping_add(size - 1) >> self.cluster_bits;
        if last < first {
            // The range wrapped around 2^64; QEMU's loop then counts nothing.
            return Ok(());
        }
        let mut k = first;
        loop {
            if k >= self.refs.len {
                if k > self.max_index {
                    // Only reachable through wrapped offsets: QEMU would try to grow its
                    // array to petabytes and fail.
                    self.r.check_errors += 1;
                    return Err(Stop(libc::ENOMEM));
                }
                if let Err(e) = self.refs.grow(k + 1) {
                    self.r.check_errors += 1;
                    return Err(e);
                }
            }
            let v = self.refs.get(k);
            if v == self.refs.max {
                let at = k << self.cluster_bits;
                self.r.corrupt(
                    Finding::RefcountOverflow { offset: at },
                    format!("ERROR: overflow cluster offset={at:#x}"),
                );
                self.r.say("Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing".into());
            } else {
                self.refs.set(k, v + 1);
            }
            if k >= last {
                break;
            }
            k += 1;
        }
        Ok(())
    }

    /// Counts every reference of the image into `refs` (QEMU's calculate_refcounts).
    pub(super) fn calculate_refcounts(&mut self, snapshots: &[SnapInfo], snap_size: u64) -> Step {
        let h = self.img.header().clone();
        self.inc(0, self.cs)?;
        let active: Vec<u64> = self.img.l1().to_vec();
        self.check_l1_entries(h.l1_table_offset, &active, true)?;

        if self.data_file && !snapshots.is_empty() {
            self.r.corrupt(
                Finding::SnapshotsWithDataFile,
                format!(
                    "ERROR {} snapshots in image with data file",
                    snapshots.len()
                ),
            );
        }
        for (i, sn) in snapshots.iter().enumerate() {
            if sn.l1_table_offset & (self.cs - 1) != 0 {
                self.r.corrupt(
                    Finding::BadSnapshotL1 { index: i },
                    format!(
                        "ERROR snapshot {} ({}) l1_offset={}: L1 table is not cluster aligned; snapshot table entry corrupted",
                        c_string(&sn.id), c_string(&sn.name), alt_hex(sn.l1_table_offset)
                    ),
                );
                continue;
            }
            if sn.l1_size as u64 > MAX_SNAPSHOT_L1_ENTRIES {
                self.r.corrupt(
                    Finding::BadSnapshotL1 { index: i },
                    format!(
                        "ERROR snapshot {} ({}) l1_size={}: L1 table is too large; snapshot table entry corrupted",
                        c_string(&sn.id), c_string(&sn.name), alt_hex(sn.l1_size as u64)
                    ),
                );
                continue;
            }
            self.check_l1(sn.l1_table_offset, sn.l1_size)?;
        }
        self.inc(h.snapshots_offset, snap_size)?;

        let reftable_entries = self.reftable_clusters << (self.cluster_bits - 3);
        self.inc(self.reftable_offset, reftable_entries * 8)?;

        if h.crypt_method == 2 {
            if let Some(c) = h.crypto {
                self.inc(c.offset, c.length)?;
            }
        }

        self.check_bitmaps()?;
        self.load_reftable(self.reftable_offset, reftable_entries);
        self.check_refblocks()
    }

    /// Reads a snapshot's L1 table and checks it (the active one is already in memory).
    fn check_l1(&mut self, offset: u64, size: u32) -> Step {
        if size == 0 {
            return Ok(());
        }
        let bytes = size as u64 * 8;
        self.inc(offset, bytes)?;
        let buf = match pread(self.file, offset, bytes as usize) {
            Ok(b) => b,
            Err(e) => {
                self.r.say("ERROR: I/O error in check_refcounts_l1".into());
                self.r.check_errors += 1;
                return Err(Stop(e));
            }
        };
        let l1: Vec<u64> = buf.chunks_exact(8).map(|c| be64(c, 0)).collect();
        self.walk_l1(&l1, false)
    }

    fn check_l1_entries(&mut self, offset: u64, l1: &[u64], active: bool) -> Step {
        if l1.is_empty() {
            return Ok(());
        }
        self.inc(offset, l1.len() as u64 * 8)?;
        self.walk_l1(l1, active)
    }

    fn walk_l1(&mut self, l1: &[u64], active: bool) -> Step {
        for &e in l1 {
            if e == 0 {
                continue;
            }
            if e & l2::L1_RESERVED != 0 {
                self.r.corrupt(
                    Finding::L1Reserved { entry: e },
                    format!("ERROR found L1 entry with reserved bits set: {e:x}"),
                );
            }
            let l2_offset = l2::l1_offset(e);
            self.inc(l2_offset, self.cs)?;
            if l2_offset & (self.cs - 1) != 0 {
                self.r.corrupt(
                    Finding::L2Unaligned { l2_offset },
                    format!(
                        "ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted"
                    ),
                );
            }
            self.check_l2(l2_offset, active)?;
        }
        Ok(())
    }

    /// Entry `i` and its subcluster bitmap (0 without extended L2).
    fn l2_at(&self, table: &[u8], i: usize) -> (u64, u64) {
        if self.extended {
            (be64(table, 16 * i), be64(table, 16 * i + 8))
        } else {
            (be64(table, 8 * i), 0)
        }
    }

    fn l2_count(&self) -> usize {
        (self.cs / if self.extended { 16 } else { 8 }) as usize
    }

    fn check_l2(&mut self, l2_offset: u64, active: bool) -> Step {
        let table = match pread(self.file, l2_offset, self.cs as usize) {
            Ok(b) => b,
            Err(e) => {
                self.r.say("ERROR: I/O error in check_refcounts_l2".into());
                self.r.check_errors += 1;
                return Err(Stop(e));
            }
        };
        // Fragmentation is judged within one L2 table, as QEMU does.
        let mut next_contiguous = 0u64;
        let csize_shift = 62 - (self.cluster_bits - 8);
        for i in 0..self.l2_count() {
            let (mut e, bitmap) = self.l2_at(&table, i);
            let t = l2::classify(e, self.extended, self.data_file);
            if !matches!(t, ClusterType::Compressed(_)) && e & l2::L2_RESERVED != 0 {
                self.r.corrupt(
                    Finding::L2Reserved { entry: e },
                    format!("ERROR found l2 entry with reserved bits set: {e:x}"),
                );
            }
            match t {
                ClusterType::Compressed(_) => {
                    let offset_mask = (1u64 << csize_shift) - 1;
                    if e & l2::COPIED != 0 {
                        self.r.corrupt(
                            Finding::CompressedCopied { entry: e },
                            format!(
                                "ERROR: coffset={:#x}: copied flag must never be set for compressed clusters",
                                e & offset_mask
                            ),
                        );
                        e &= !l2::COPIED;
                    }
                    if self.data_file {
                        self.r.corrupt(
                            Finding::CompressedWithDataFile {
                                index: i as u64,
                                entry: e,
                            },
                            format!("ERROR compressed cluster {i} with data file, entry={e:#x}"),
                        );
                        continue;
                    }
                    if bitmap != 0 {
                        self.r.corrupt(
                            Finding::CompressedWithBitmap {
                                index: i as u64,
                                entry: e,
                            },
                            format!(
                                "ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, entry={e:#x}"
                            ),
                        );
                        continue;
                    }
                    // Unlike the read path, QEMU's check does not mask the offset to 56
                    // bits, so a bad descriptor is reported with the offset it encodes.
                    let coffset = e & offset_mask;
                    let nsect = ((e >> csize_shift) & ((1u64 << (self.cluster_bits - 8)) - 1)) + 1;
                    let csize = nsect * 512 - (coffset & 511);
                    self.inc(coffset, csize)?;
                    if active {
                        self.r.allocated_clusters += 1;
                        self.r.compressed_clusters += 1;
                        // Compressed clusters count as fragmented by nature.
                        self.r.fragmented_clusters += 1;
                    }
                }
                ClusterType::Normal(_) | ClusterType::ZeroAlloc(_) => {
                    let offset = e & l2::OFFSET_MASK;
                    if (bitmap >> 32) & bitmap != 0 {
                        self.r.corrupt(
                            Finding::BadSubclusterBitmap { offset },
                            format!(
                                "ERROR offset={offset:x}: Allocated cluster has corrupted subcluster allocation bitmap"
                            ),
                        );
                    }
                    if offset & (self.cs - 1) != 0 {
                        let contains_data = if self.extended {
                            bitmap & 0xffff_ffff != 0
                        } else {
                            e & l2::ZERO == 0
                        };
                        let what = if contains_data {
                            "Data cluster is not properly aligned; L2 entry corrupted."
                        } else {
                            "Preallocated cluster is not properly aligned; L2 entry corrupted."
                        };
                        let repair = !contains_data && self.fix.errors;
                        let word = if repair { "Repairing" } else { "ERROR" };
                        self.r.corrupt(
                            Finding::DataUnaligned {
                                offset,
                                contains_data,
                            },
                            format!("{word} offset={offset:x}: {what}"),
                        );
                        // A zero cluster loses nothing by dropping its (bogus) host
                        // cluster; the reference goes, so at worst a cluster leaks.
                        if repair && self.drop_prealloc_zero(l2_offset, i)? {
                            continue;
                        }
                    }
                    if active {
                        self.r.allocated_clusters += 1;
                        if next_contiguous != 0 && offset != next_contiguous {
                            self.r.fragmented_clusters += 1;
                        }
                        next_contiguous = offset + self.cs;
                    }
                    // Data in an external data file is not refcounted.
                    if !self.data_file {
                        self.inc(offset, self.cs)?;
                    }
                }
                ClusterType::ZeroPlain => {}
                ClusterType::Unallocated | ClusterType::UnallocatedAlloc(_) => {
                    if bitmap & 0xffff_ffff != 0 {
                        self.r.corrupt(
                            Finding::UnallocatedWithBitmap,
                            "ERROR: Unallocated cluster has non-zero subcluster allocation map"
                                .into(),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Turns entry `i` of the L2 table at `l2_offset` into a plain zero cluster (repair
    /// of an unaligned preallocated zero cluster); returns whether it was rewritten.
    fn drop_prealloc_zero(&mut self, l2_offset: u64, i: usize) -> Step<bool> {
        let stride = if self.extended { 16 } else { 8 };
        let at = l2_offset + (stride * i) as u64;
        if self.overlaps_metadata(l2_offset).is_some() {
            self.r.say("ERROR: Overlap check failed".into());
            self.r.check_errors += 1;
            return Err(Stop(libc::EIO));
        }
        // With subclusters the bitmap already says "zero"; the entry just loses its
        // offset. Without, the zero flag alone remains.
        let entry = if self.extended { 0 } else { l2::ZERO };
        let mut b = [0u8; 8];
        crate::ondisk::put64(&mut b, 0, entry);
        let res = self.file.write_at(&b, at).and_then(|()| self.file.flush());
        match res {
            Ok(()) => {
                self.r.corruptions -= 1;
                self.r.corruptions_fixed += 1;
                self.r.findings.pop();
                Ok(true)
            }
            Err(e) => {
                self.r.say(format!(
                    "ERROR: Failed to overwrite L2 table entry: {}",
                    strerror(e.errno())
                ));
                self.r.check_errors += 1;
                Ok(false)
            }
        }
    }

    fn check_bitmaps(&mut self) -> Step {
        let h = self.img.header();
        // Without the autoclear bit QEMU ignores the extension at open, so the bitmap
        // clusters show up as leaks.
        let Some(ext) = h.bitmaps else {
            return Ok(());
        };
        if h.autoclear_features & autoclear::BITMAPS == 0 || ext.nb_bitmaps == 0 {
            return Ok(());
        }
        self.inc(ext.directory_offset, ext.directory_size)?;
        let bitmaps = self.img.bitmaps().to_vec();
        // The open tolerated a directory QEMU cannot load; QEMU's check then counts one
        // corruption and gives up.
        if bitmaps.len() as u64 != ext.nb_bitmaps as u64 {
            self.r.corruptions += 1;
            self.r.findings.push(Finding::BadBitmaps);
            return Err(Stop(libc::EINVAL));
        }
        for bm in &bitmaps {
            let bytes = bm.table_size as u64 * 8;
            self.inc(bm.table_offset, bytes)?;
            let table = match pread(self.file, bm.table_offset, bytes as usize) {
                Ok(t) => t,
                Err(e) => {
                    self.r.corruptions += 1;
                    self.r.findings.push(Finding::BadBitmaps);
                    return Err(Stop(e));
                }
            };
            let entries: Vec<u64> = table.chunks_exact(8).map(|c| be64(c, 0)).collect();
            // QEMU validates the whole table while loading it and stops at the first bad
            // entry, without a message.
            if entries.iter().any(|&e| !bitmap_entry_ok(e, self.cs)) {
                self.r.corruptions += 1;
                self.r.findings.push(Finding::BadBitmaps);
                return Err(Stop(libc::EINVAL));
            }
            for e in entries {
                let off = e & BME_OFFSET_MASK;
                if off != 0 {
                    self.inc(off, self.cs)?;
                }
            }
        }
        Ok(())
    }

    /// Loads the refcount table; entries past the end of the file read as zeros, as they
    /// do in QEMU. Its size is bounded by the 8 MiB limit enforced at open.
    fn load_reftable(&mut self, offset: u64, entries: u64) {
        let bytes = (entries * 8).min(super::MAX_REFTABLE_BYTES) as usize;
        let buf = pread(self.file, offset, bytes).unwrap_or_default();
        self.reftable = buf.chunks_exact(8).map(|c| be64(c, 0)).collect();
    }

    fn check_refblocks(&mut self) -> Step {
        for i in 0..self.reftable.len() {
            let e = self.reftable[i];
            let offset = e & refcount::REFTABLE_OFFSET_MASK;
            let cluster = offset >> self.cluster_bits;
            let idx = i as u64;
            if e & REFT_RESERVED_MASK != 0 {
                self.r.corrupt(
                    Finding::BadRefblock {
                        index: idx,
                        problem: RefblockProblem::Reserved,
                    },
                    format!("ERROR refcount table entry {i} has reserved bits set"),
                );
                self.rebuild = true;
                continue;
            }
            if offset & (self.cs - 1) != 0 {
                self.r.corrupt(
                    Finding::BadRefblock {
                        index: idx,
                        problem: RefblockProblem::Unaligned,
                    },
                    format!(
                        "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                    ),
                );
                self.rebuild = true;
                continue;
            }
            if cluster >= self.refs.len {
                let word = if self.fix.errors {
                    "Repairing"
                } else {
                    "ERROR"
                };
                self.r.corrupt(
                    Finding::BadRefblock {
                        index: idx,
                        problem: RefblockProblem::OutsideImage,
                    },
                    format!("{word} refcount block {i} is outside image"),
                );
                if self.fix.errors {
                    self.extend_file_for_refblock(offset)?;
                }
                continue;
            }
            if offset != 0 {
                self.inc(offset, self.cs)?;
                let n = self.refs.get(cluster);
                if n != 1 {
                    self.r.corrupt(
                        Finding::BadRefblock {
                            index: idx,
                            problem: RefblockProblem::Refcount(n),
                        },
                        format!("ERROR refcount block {i} refcount={n}"),
                    );
                    self.rebuild = true;
                }
            }
        }
        Ok(())
    }

    /// The refcount block holding `cluster`'s entry, loaded into the cache, and the
    /// entry's index in it; `None` when no block covers the cluster.
    pub(super) fn refblock_for(
        &mut self,
        cluster: u64,
    ) -> std::result::Result<Option<(u64, usize)>, i32> {
        let order = self.img.header().refcount_order;
        let block_bits = self.cluster_bits + 3 - order;
        let index = cluster >> block_bits;
        let Some(&e) = self.reftable.get(index as usize) else {
            return Ok(None);
        };
        let block = e & refcount::REFTABLE_OFFSET_MASK;
        if block == 0 {
            return Ok(None);
        }
        if block & (self.cs - 1) != 0 {
            self.signal_corruption(format!(
                "Refblock offset {} unaligned (reftable index: {})",
                alt_hex(block),
                alt_hex(index)
            ));
            return Err(libc::EIO);
        }
        if !self.refblocks.contains_key(&block) {
            let data = pread(self.file, block, self.cs as usize)?;
            if self.refblocks.len() >= REFBLOCK_CACHE_BLOCKS {
                // Changed blocks must reach the file before the cache forgets them.
                self.write_dirty_refblocks()?;
                self.refblocks.clear();
            }
            self.refblocks.insert(block, data);
        }
        let i = cluster & ((1u64 << block_bits) - 1);
        Ok(Some((block, i as usize)))
    }

    /// The refcount stored on disk for `cluster` (QEMU's qcow2_get_refcount), or the
    /// errno of the failure.
    pub(super) fn stored_refcount(&mut self, cluster: u64) -> std::result::Result<u64, i32> {
        let order = self.img.header().refcount_order;
        Ok(match self.refblock_for(cluster)? {
            Some((block, i)) => refcount::get(&self.refblocks[&block], order, i),
            None => 0,
        })
    }

    /// Changes the stored refcount of `cluster` in the cache (repair mode only). The
    /// cluster must be covered by a refcount block, which every caller knows because its
    /// stored refcount is not zero.
    pub(super) fn set_stored_refcount(
        &mut self,
        cluster: u64,
        value: u64,
    ) -> std::result::Result<(), i32> {
        let order = self.img.header().refcount_order;
        if value > refcount::max(order) {
            return Err(libc::EINVAL);
        }
        let Some((block, i)) = self.refblock_for(cluster)? else {
            return Err(libc::EINVAL);
        };
        if let Some(data) = self.refblocks.get_mut(&block) {
            refcount::set(data, order, i, value);
        }
        self.dirty_refblocks.insert(block);
        if value == 0 {
            self.freed.push(cluster);
        }
        Ok(())
    }

    /// Writes the refcount blocks a repair changed. Any order is safe: every change moves
    /// a stored refcount toward the number of references, never below it.
    fn write_dirty_refblocks(&mut self) -> std::result::Result<(), i32> {
        for block in std::mem::take(&mut self.dirty_refblocks) {
            if let Some(data) = self.refblocks.get(&block) {
                self.file.write_at(data, block).map_err(|e| e.errno())?;
            }
        }
        Ok(())
    }

    /// Writes the changed refcount blocks and makes them durable, so that flags which
    /// depend on the refcounts (COPIED) can follow.
    pub(super) fn write_refblocks(&mut self) -> std::result::Result<(), i32> {
        if self.dirty_refblocks.is_empty() {
            return Ok(());
        }
        self.write_dirty_refblocks()?;
        self.file.flush().map_err(|e| e.errno())
    }

    /// Grows the file so that a refcount block past its end exists (reading as zeros),
    /// as QEMU's repair does, and counts the block.
    fn extend_file_for_refblock(&mut self, offset: u64) -> Step {
        let end = match offset.checked_add(self.cs) {
            Some(e) if e <= i64::MAX as u64 => e,
            _ => return self.refblock_resize_failed(libc::EINVAL),
        };
        // Unlike QEMU, do not let an absurd table entry blow the file (and the computed
        // refcount array, sized by it) up to terabytes: such a block is left to the
        // rebuild instead.
        let grown = if end > self.file_len.saturating_mul(2).max(1 << 30) {
            Err(libc::EFBIG)
        } else {
            self.file.set_len(end).map_err(|e| e.errno())
        };
        if let Err(errno) = grown {
            // The file layer's own error line comes first, as in QEMU.
            self.r
                .say_prefixed(format!("Could not resize file: {}", strerror(errno)));
            return self.refblock_resize_failed(errno);
        }
        let len = match self.file.len() {
            Ok(l) => l,
            Err(e) => return self.refblock_resize_failed(e.errno()),
        };
        self.file_len = len;
        let n = len.div_ceil(self.cs);
        self.max_index = self.max_index.max(n);
        if let Err(e) = self.refs.grow(n) {
            self.r.check_errors += 1;
            return Err(e);
        }
        self.r.corruptions -= 1;
        self.r.corruptions_fixed += 1;
        self.r.findings.pop();
        self.inc(offset, self.cs)
    }

    /// Takes note of a file that grew (QEMU asks the file for its length every time).
    pub(super) fn refresh_file_len(&mut self) -> Step {
        let len = self.file.len().map_err(|e| Stop(e.errno()))?;
        self.file_len = len;
        self.max_index = self.max_index.max(len.div_ceil(self.cs));
        Ok(())
    }

    fn refblock_resize_failed(&mut self, errno: i32) -> Step {
        self.rebuild = true;
        self.r
            .say(format!("ERROR could not resize image: {}", strerror(errno)));
        Ok(())
    }

    /// QEMU's corruption signal on a read-only image: printed once, never fatal.
    fn signal_corruption(&mut self, msg: String) {
        if self.signaled_corruption {
            return;
        }
        self.signaled_corruption = true;
        self.r.say(format!(
            "qcow2: Image is corrupt: {msg}; further non-fatal corruption events will be suppressed"
        ));
    }

    /// Compares stored and computed refcounts, correcting what `fix` allows (in the
    /// refcount block cache); returns the highest cluster with a stored or computed
    /// refcount.
    pub(super) fn compare_refcounts(&mut self, fix: Fix) -> u64 {
        let mut highest = 0;
        for i in 0..self.refs.len {
            let stored = match self.stored_refcount(i) {
                Ok(v) => v,
                Err(e) => {
                    self.r.say(format!(
                        "Can't get refcount for cluster {i}: {}",
                        strerror(e)
                    ));
                    self.r.check_errors += 1;
                    continue;
                }
            };
            let computed = self.refs.get(i);
            if stored > 0 || computed > 0 {
                highest = i;
            }
            if stored != computed {
                // Only a refcount that exists can be corrected in place; a zero one may
                // sit in a missing refcount block, so the structure is rebuilt instead.
                let fixable = if stored == 0 {
                    self.rebuild = true;
                    false
                } else if stored > computed {
                    fix.leaks
                } else {
                    fix.errors
                };
                let word = if fixable {
                    "Repairing"
                } else if stored < computed {
                    "ERROR"
                } else {
                    "Leaked"
                };
                self.r.say(format!(
                    "{word} cluster {i} refcount={stored} reference={computed}"
                ));
                if fixable && self.set_stored_refcount(i, computed).is_ok() {
                    if stored > computed {
                        self.r.leaks_fixed += 1;
                    } else {
                        self.r.corruptions_fixed += 1;
                    }
                    continue;
                }
                self.r.findings.push(Finding::RefcountMismatch {
                    cluster: i,
                    stored,
                    computed,
                });
                if stored < computed {
                    self.r.corruptions += 1;
                } else {
                    self.r.leaks += 1;
                }
            }
        }
        highest
    }

    /// Compares the COPIED flags of the active tables with the stored refcounts (QEMU's
    /// check_oflag_copied); with `repair`, corrects them. Callers make the refcounts the
    /// flags are derived from durable first.
    pub(super) fn check_oflag_copied(&mut self, repair: bool) -> Step {
        let word = if repair { "Repairing" } else { "ERROR" };
        let l1: Vec<u64> = self.img.l1().to_vec();
        for (l1_index, &l1e) in l1.iter().enumerate() {
            let l2_offset = l2::l1_offset(l1e);
            if l2_offset == 0 {
                continue;
            }
            // A refcount that cannot be read skips the whole table, silently.
            let Ok(rc) = self.stored_refcount(l2_offset >> self.cluster_bits) else {
                continue;
            };
            if (rc == 1) != (l1e & l2::COPIED != 0) {
                self.r.corrupt(
                    Finding::L1Copied {
                        l1_index: l1_index as u64,
                        entry: l1e,
                        refcount: rc,
                    },
                    format!(
                        "{word} OFLAG_COPIED L2 cluster: l1_index={l1_index} l1_entry={l1e:x} refcount={rc}"
                    ),
                );
                if repair {
                    let fixed = if rc == 1 {
                        l1e | l2::COPIED
                    } else {
                        l1e & !l2::COPIED
                    };
                    if let Err(e) = self.write_l1_entry(l1_index, fixed) {
                        self.r.check_errors += 1;
                        return Err(Stop(e));
                    }
                    self.r.corruptions -= 1;
                    self.r.corruptions_fixed += 1;
                    self.r.findings.pop();
                }
            }
            let mut table = match pread(self.file, l2_offset, self.cs as usize) {
                Ok(t) => t,
                Err(e) => {
                    self.r
                        .say(format!("ERROR: Could not read L2 table: {}", strerror(e)));
                    self.r.check_errors += 1;
                    return Err(Stop(e));
                }
            };
            let mut l2_dirty = 0u64;
            let stride = if self.extended { 16 } else { 8 };
            for j in 0..self.l2_count() {
                let (e, _) = self.l2_at(&table, j);
                let t = l2::classify(e, self.extended, self.data_file);
                if !matches!(t, ClusterType::Normal(_) | ClusterType::ZeroAlloc(_)) {
                    continue;
                }
                let rc = if self.data_file {
                    1
                } else {
                    match self.stored_refcount((e & l2::OFFSET_MASK) >> self.cluster_bits) {
                        Ok(v) => v,
                        Err(_) => continue,
                    }
                };
                if (rc == 1) != (e & l2::COPIED != 0) {
                    self.r.corrupt(
                        Finding::L2Copied {
                            l1_index: l1_index as u64,
                            l2_index: j as u64,
                            entry: e,
                            refcount: rc,
                        },
                        format!("{word} OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}"),
                    );
                    if repair {
                        let fixed = if rc == 1 {
                            e | l2::COPIED
                        } else {
                            e & !l2::COPIED
                        };
                        crate::ondisk::put64(&mut table, stride * j, fixed);
                        l2_dirty += 1;
                    }
                }
            }
            if l2_dirty > 0 {
                if let Some(what) = self.overlaps_metadata(l2_offset) {
                    self.r.say(format!(
                        "ERROR: Could not write L2 table; metadata overlap check failed: {} (overlaps with {what})",
                        strerror(libc::EIO)
                    ));
                    self.r.check_errors += 1;
                    return Err(Stop(libc::EIO));
                }
                // Entries are independent 8-byte words, so a torn write leaves each
                // one either old or new, and either is safe once the refcounts are.
                if let Err(e) = self.file.write_at(&table, l2_offset) {
                    let e = e.errno();
                    self.r
                        .say(format!("ERROR: Could not write L2 table: {}", strerror(e)));
                    self.r.check_errors += 1;
                    return Err(Stop(e));
                }
                self.r.corruptions -= l2_dirty;
                self.r.corruptions_fixed += l2_dirty;
                for _ in 0..l2_dirty {
                    self.r.findings.pop();
                }
            }
        }
        Ok(())
    }

    /// Rewrites one active L1 entry on disk and in memory.
    fn write_l1_entry(&mut self, index: usize, entry: u64) -> std::result::Result<(), i32> {
        let mut b = [0u8; 8];
        crate::ondisk::put64(&mut b, 0, entry);
        let at = self.img.header().l1_table_offset + 8 * index as u64;
        self.file.write_at(&b, at).map_err(|e| e.errno())?;
        if let Some(slot) = self.img.l1.write().unwrap().get_mut(index) {
            *slot = entry;
        }
        Ok(())
    }

    /// Names the metadata (other than active L2 tables) that the cluster at `offset`
    /// holds, if any: a repair must never write an L2 table over it.
    pub(super) fn overlaps_metadata(&self, offset: u64) -> Option<&'static str> {
        let h = self.img.header();
        let c = offset >> self.cluster_bits;
        let within = |start: u64, bytes: u64| {
            bytes > 0 && c >= start >> self.cluster_bits && c < (start + bytes).div_ceil(self.cs)
        };
        if c == 0 {
            Some("qcow2_header")
        } else if within(h.l1_table_offset, h.l1_size as u64 * 8) {
            Some("active L1 table")
        } else if within(self.reftable_offset, self.reftable_clusters * self.cs) {
            Some("refcount table")
        } else if self.reftable.iter().any(|&e| {
            e & refcount::REFTABLE_OFFSET_MASK != 0
                && (e & refcount::REFTABLE_OFFSET_MASK) >> self.cluster_bits == c
        }) {
            Some("refcount block")
        } else {
            None
        }
    }
}

fn bitmap_entry_ok(e: u64, cs: u64) -> bool {
    if e & BME_RESERVED_MASK != 0 {
        return false;
    }
    let off = e & BME_OFFSET_MASK;
    off == 0 || (e & 1 == 0 && off.is_multiple_of(cs))
}
