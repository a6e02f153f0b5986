//! Size estimates for `qemu-img measure`, computed by qemu's rules.
//!
//! A fully allocated qcow2 image holds: one header cluster, an L2 entry for every data
//! cluster (whole L2 tables), the L1 table rounded up to clusters, the refcount metadata
//! for all of that (the fixed point of [`refcount_metadata_clusters`]) and the data.
//! "Required" is the same metadata plus only the data clusters the source really uses.

use super::create::{refcount_metadata_clusters, Compat, CreateOptions, Preallocation};
use super::Qcow2;
use crate::error::{Error, Result};
use crate::image::{chain_status, Image};
use crate::storage::Storage;

/// What `qemu-img measure` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeasureInfo {
    /// Bytes the new image needs for the data that is present ("required size").
    pub required: u64,
    /// Bytes the new image needs when every cluster is allocated.
    pub fully_allocated: u64,
    /// Bytes persistent bitmaps of the source need in the target; `None` when qemu
    /// does not print the field (source without bitmap support, or a v2 target).
    pub bitmaps: Option<u64>,
}

/// What measure needs to know about a source image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceUsage {
    /// Virtual size of the source.
    pub size: u64,
    /// Bytes of target clusters that hold source data (see [`allocated_bytes`]).
    pub allocated: u64,
    /// Size persistent bitmaps of the source take in the target, when the source format
    /// supports persistent bitmaps (qcow2).
    pub bitmaps: Option<u64>,
}

/// The message qemu-img measure prints when the L1 table would exceed 32 MiB.
pub const MEASURE_TOO_LARGE: &str = "The image size is too large (try using a larger cluster size)";

/// Bytes of a fully preallocated qcow2 image of `size` bytes (qemu's
/// `qcow2_calc_prealloc_size`), or `None` on arithmetic overflow.
pub fn prealloc_size(
    size: u64,
    cluster_size: u64,
    refcount_order: u32,
    extended_l2: bool,
) -> Option<u64> {
    let cs = cluster_size;
    let entry = if extended_l2 { 16 } else { 8 };
    let data = size.checked_next_multiple_of(cs)?;
    let mut meta = cs; // header
    let l2_entries = (data / cs).checked_next_multiple_of(cs / entry)?;
    meta = meta.checked_add(l2_entries.checked_mul(entry)?)?;
    let l1_entries = (l2_entries * entry / cs).checked_next_multiple_of(cs / 8)?;
    meta = meta.checked_add(l1_entries.checked_mul(8)?)?;
    let clusters = meta.checked_add(data)? / cs;
    let (blocks, table) = refcount_metadata_clusters(clusters, cs, refcount_order, false);
    meta = meta.checked_add(blocks.checked_add(table)?.checked_mul(cs)?)?;
    meta.checked_add(data)
}

/// Checks the target options the way `qemu-img measure -O qcow2` does (it checks fewer
/// than `create`) and returns its message for the first violation.
pub fn validate_measure_options(size: u64, opts: &CreateOptions) -> Result<()> {
    let inval = |m: &str| Err(Error::InvalidArgument(m.to_string()));
    let cs = opts.cluster_size;
    if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
        return inval("Cluster size must be a power of two between 512 and 2048k");
    }
    if opts.extended_l2 && cs < 16384 {
        return inval(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
        );
    }
    if !opts.refcount_bits.is_power_of_two() || opts.refcount_bits > 64 {
        return inval("Refcount width must be a power of two and may not exceed 64 bits");
    }
    if opts.compat == Compat::V2 && opts.refcount_bits != 16 {
        return inval("Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)");
    }
    let entries = cs / if opts.extended_l2 { 16 } else { 8 };
    let too_large = match size.checked_next_multiple_of(cs) {
        None => true,
        Some(v) => (v / cs).div_ceil(entries) * 8 > 32 << 20,
    };
    if too_large {
        return inval(MEASURE_TOO_LARGE);
    }
    Ok(())
}

/// `qemu-img measure -O qcow2`: `source` is `None` for `--size`, else what
/// [`source_usage`] found in the source image (whose size then replaces `size`).
pub fn measure_qcow2(
    size: u64,
    opts: &CreateOptions,
    source: Option<&SourceUsage>,
) -> Result<MeasureInfo> {
    let size = source.map_or(size, |s| s.size);
    validate_measure_options(size, opts)?;
    let cs = opts.cluster_size;
    let order = opts.refcount_bits.trailing_zeros();
    let virtual_size = size
        .checked_next_multiple_of(cs)
        .ok_or_else(|| Error::InvalidArgument(MEASURE_TOO_LARGE.into()))?;
    let fully = prealloc_size(size, cs, order, opts.extended_l2)
        .ok_or_else(|| Error::InvalidArgument(MEASURE_TOO_LARGE.into()))?;
    let data = if matches!(
        opts.preallocation,
        Preallocation::Falloc | Preallocation::Full
    ) {
        virtual_size
    } else {
        match source {
            // A new backing file may share nothing with the source: count everything.
            Some(_) if opts.backing_file.is_some() => virtual_size,
            Some(s) => s.allocated,
            None => 0,
        }
    };
    let bitmaps = match source {
        Some(s) if opts.compat == Compat::V3 => s.bitmaps,
        _ => None,
    };
    Ok(MeasureInfo {
        required: fully - virtual_size + data,
        fully_allocated: fully,
        bitmaps,
    })
}

/// `qemu-img measure -O raw`: the whole virtual size either way (`size` rounded up to
/// 512 for `--size`; a source's exact length otherwise).
pub fn measure_raw(size: u64, source: Option<&SourceUsage>) -> Result<MeasureInfo> {
    let required = match source {
        Some(s) => s.size,
        None => super::create::size_rounded(size)
            .ok_or_else(|| Error::InvalidArgument("Image size too large".into()))?,
    };
    Ok(MeasureInfo {
        required,
        fully_allocated: required,
        bitmaps: None,
    })
}

fn check_cluster_size(cs: u64) -> Result<()> {
    if cs.is_power_of_two() && (512..=2 << 20).contains(&cs) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(
            "Cluster size must be a power of two between 512 and 2048k".into(),
        ))
    }
}

/// The layer `depth` steps down the backing chain of `top`.
fn layer_at(top: &dyn Image, depth: u32) -> Option<&dyn Image> {
    let mut l = top;
    for _ in 0..depth {
        l = l.backing()?.as_ref();
    }
    Some(l)
}

/// Bytes of target clusters (`cluster_size` each) that hold source data, counted as
/// qemu-img measure counts them: walking the block status of the whole backing chain,
/// every target cluster that intersects a range which is allocated data and not known
/// to read as zeros counts once. As in qemu, data clusters of a qcow2 layer whose host
/// range is a hole in its file (or lies past its end) read as zeros and do not count —
/// so metadata-preallocated sources count nothing.
pub fn allocated_bytes(img: &dyn Image, cluster_size: u64) -> Result<u64> {
    check_cluster_size(cluster_size)?;
    let size = img.len();
    let cs = cluster_size;
    let mut count = 0u64;
    // One past the last target cluster already counted.
    let mut counted_end = 0u64;
    let mut offset = 0u64;
    while offset < size {
        let e = chain_status(img, offset, size - offset)?;
        let len = e.len.max(1).min(size - offset);
        if e.data && !e.zero {
            for (s, l) in data_ranges(img, &e, offset, len)? {
                let first = (s / cs).max(counted_end);
                let last = (s + l - 1) / cs + 1;
                if last > first {
                    count += last - first;
                    counted_end = last;
                }
            }
        }
        offset += len;
    }
    Ok(count * cs)
}

/// The parts of a data extent `[offset, offset+len)` whose host storage is not a hole.
fn data_ranges(
    top: &dyn Image,
    e: &crate::image::ChainExtent,
    offset: u64,
    len: u64,
) -> Result<Vec<(u64, u64)>> {
    let whole = vec![(offset, len)];
    let (Some(host), false) = (e.offset, e.compressed) else {
        return Ok(whole);
    };
    let Some(q) = layer_at(top, e.depth).and_then(|l| l.as_any().downcast_ref::<Qcow2>()) else {
        return Ok(whole);
    };
    let file: &dyn Storage = match q.data_file() {
        Some(d) if q.header().has_data_file() => d.as_ref(),
        _ => q.file().as_ref(),
    };
    let flen = file.len()?;
    let mut out = Vec::new();
    let mut h = host;
    let end = host + len;
    while h < end {
        if h >= flen {
            break; // past EOF: zeros
        }
        match file.next_data(h)? {
            None => {
                out.push((offset + (h - host), end - h));
                break;
            }
            Some((d, hole)) => {
                if d >= end || d >= flen {
                    break;
                }
                let s = d.max(h);
                let t = hole.min(end).min(flen);
                if t > s {
                    out.push((offset + (s - host), t - s));
                }
                h = t.max(s + 1);
            }
        }
    }
    Ok(out)
}

/// Bytes the persistent bitmaps of a qcow2 source take in a target with `cluster_size`
/// clusters: per bitmap its data clusters and its table rounded up to clusters, plus the
/// directory rounded up to clusters.
pub fn bitmaps_size(q: &Qcow2, cluster_size: u64) -> u64 {
    let cs = cluster_size.max(1);
    let size = q.len();
    let mut total = 0u64;
    let mut dir = 0u64;
    for b in q.bitmaps() {
        let gran = 1u64 << b.granularity_bits.min(63);
        let bits = size.div_ceil(gran);
        let clusters = bits.div_ceil(8).div_ceil(cs);
        total += clusters * cs + (clusters * 8).div_ceil(cs) * cs;
        dir += (24 + b.name.len() as u64).div_ceil(8) * 8;
    }
    total + dir.div_ceil(cs) * cs
}

/// Everything measure needs from an open source image, for a target with
/// `cluster_size` clusters.
pub fn source_usage(img: &dyn Image, cluster_size: u64) -> Result<SourceUsage> {
    check_cluster_size(cluster_size)?;
    let bitmaps = img
        .as_any()
        .downcast_ref::<Qcow2>()
        // QEMU supports persistent bitmaps only in v3 images, so only those report them.
        .filter(|q| q.header().version >= 3)
        .map(|q| bitmaps_size(q, cluster_size));
    Ok(SourceUsage {
        size: img.len(),
        allocated: allocated_bytes(img, cluster_size)?,
        bitmaps,
    })
}
