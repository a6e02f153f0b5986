//! The image trait every format implements, and the extents that describe allocation.

use crate::error::Result;
use std::sync::Arc;

/// What one layer of an image says about a guest range.
///
/// The flags follow QEMU's block-status semantics so that `map` output and the NBD
/// `base:allocation` context can be derived from them directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// This layer decides the content (false: the content comes from the backing chain).
    pub allocated: bool,
    /// The range reads from stored data (possibly compressed).
    pub data: bool,
    /// The range is known to read as zeros.
    pub zero: bool,
    /// Where the range starts in the layer's data file, when it has one.
    pub offset: Option<u64>,
    /// The range is stored compressed.
    pub compressed: bool,
}

impl Status {
    /// A range this layer does not allocate.
    pub const UNALLOCATED: Status = Status {
        allocated: false,
        data: false,
        zero: false,
        offset: None,
        compressed: false,
    };
    /// A range this layer defines as zeros without storing data.
    pub const ZERO: Status = Status {
        allocated: true,
        data: false,
        zero: true,
        offset: None,
        compressed: false,
    };

    /// Whether `other` describes a range that continues this one (same flags, host offset
    /// contiguous after `len` bytes).
    pub fn continues(&self, len: u64, other: &Status) -> bool {
        self.allocated == other.allocated
            && self.data == other.data
            && self.zero == other.zero
            && self.compressed == other.compressed
            && match (self.offset, other.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a.checked_add(len) == Some(b),
                _ => false,
            }
    }
}

/// A guest range with one status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Guest offset where the extent starts.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// What the layer says about it.
    pub status: Status,
}

/// A disk image as guests see it: a fixed-length array of bytes, positional and thread-safe.
///
/// Every format (qcow2, raw, add-cow) implements this, and every operation (convert, map,
/// compare, the NBD server) is written against it.
pub trait Image: Send + Sync + std::fmt::Debug {
    /// Short format name as QEMU prints it (`qcow2`, `raw`).
    fn format_name(&self) -> &'static str;
    /// Virtual size in bytes.
    fn len(&self) -> u64;
    /// Whether the image has zero length.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Reads `buf.len()` bytes at guest offset `offset`; the range must lie inside the image.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Writes `buf` at guest offset `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Makes a range read as zeros; with `may_unmap` the space may be released.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()>;
    /// Tells the image a range is no longer needed (contents afterwards are format-defined).
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<()>;
    /// Starts writing data back to the device without waiting (a hint for long copies,
    /// see [`Storage::start_writeback`](crate::storage::Storage::start_writeback)).
    fn start_writeback(&self) {}
    /// The status of the range starting at `offset`: the returned extent starts at
    /// `offset` and is at most `len` bytes long (and at least 1 byte when `len > 0`).
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent>;
    /// The backing image, if any.
    fn backing(&self) -> Option<&Arc<dyn Image>> {
        None
    }
    /// For downcasting to the concrete format (e.g. to print qcow2-specific `info`).
    fn as_any(&self) -> &dyn std::any::Any;
}

/// Walks `[offset, offset+len)` of one layer and returns its extents, merged where
/// consecutive extents continue each other.
pub fn layer_extents(img: &dyn Image, offset: u64, len: u64) -> Result<Vec<Extent>> {
    let mut out: Vec<Extent> = Vec::new();
    let end = offset + len;
    let mut pos = offset;
    while pos < end {
        let e = img.block_status(pos, end - pos)?;
        debug_assert!(e.len > 0);
        if let Some(last) = out.last_mut() {
            if last.status.continues(last.len, &e.status) {
                last.len += e.len;
                pos += e.len;
                continue;
            }
        }
        pos += e.len;
        out.push(e);
    }
    Ok(out)
}

/// An extent of the whole backing chain, as `qemu-img map` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainExtent {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// Index of the layer that decides the content (0 = top); equals the chain length when
    /// no layer allocates the range.
    pub depth: u32,
    /// Some layer allocates the range.
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Reads from stored data.
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset in the deciding layer's file.
    pub offset: Option<u64>,
}

/// The status of `[offset, offset+len)` through the whole backing chain, one extent at a
/// time starting at `offset` (at most `len` bytes).
pub fn chain_status(top: &dyn Image, offset: u64, len: u64) -> Result<ChainExtent> {
    let mut layer: &dyn Image = top;
    let mut depth = 0u32;
    let mut len = len.min(top.len().saturating_sub(offset)).max(1);
    loop {
        let e = layer.block_status(offset, len)?;
        len = e.len;
        if e.status.allocated {
            return Ok(ChainExtent {
                start: offset,
                len,
                depth,
                present: true,
                zero: e.status.zero,
                data: e.status.data,
                compressed: e.status.compressed,
                offset: e.status.offset,
            });
        }
        match layer.backing() {
            // A backing file shorter than its overlay reads as zeros past its end; QEMU
            // reports that range at the depth of the overlay.
            Some(b) if offset < b.len() => {
                len = len.min(b.len() - offset);
                layer = b.as_ref();
                depth += 1;
            }
            _ => {
                return Ok(ChainExtent {
                    start: offset,
                    len,
                    depth,
                    present: false,
                    zero: true,
                    data: false,
                    compressed: false,
                    offset: e.status.offset,
                });
            }
        }
    }
}

/// Extents of the whole chain over `[offset, offset+len)`, merged as `qemu-img map`
/// merges them (same flags and depth, contiguous host offsets).
pub fn chain_extents(top: &dyn Image, offset: u64, len: u64) -> Result<Vec<ChainExtent>> {
    let mut out: Vec<ChainExtent> = Vec::new();
    let end = offset + len;
    let mut pos = offset;
    while pos < end {
        let e = chain_status(top, pos, end - pos)?;
        pos += e.len;
        if let Some(last) = out.last_mut() {
            let contiguous = match (last.offset, e.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + last.len == b,
                _ => false,
            };
            if contiguous
                && last.depth == e.depth
                && last.present == e.present
                && last.zero == e.zero
                && last.data == e.data
                && last.compressed == e.compressed
            {
                last.len += e.len;
                continue;
            }
        }
        out.push(e);
    }
    Ok(out)
}
