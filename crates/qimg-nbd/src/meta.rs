//! Metadata contexts for `NBD_CMD_BLOCK_STATUS`.
//!
//! A context is an object answering "what is the status of the bytes from here on": the
//! server needs nothing else from it, so new sources plug in by implementing
//! [`MetaContext`]; persistent dirty bitmaps ([`DirtyBitmap`]) are listed in
//! [`crate::Export::bitmaps`].

use crate::proto::state;
use qimg::image::chain_status;
use qimg::Image;
use std::sync::Arc;

/// Name of the standard allocation context.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Name of QEMU's allocation-depth context.
pub const ALLOCATION_DEPTH: &str = "qemu:allocation-depth";
/// Prefix of QEMU's dirty-bitmap contexts.
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

/// A source of block-status descriptors for one metadata context.
pub trait MetaContext: Send + Sync + std::fmt::Debug {
    /// Full context name, e.g. `qemu:dirty-bitmap:bm0`.
    fn name(&self) -> &str;

    /// Appends `(length, flags)` descriptors for consecutive ranges starting at `offset`.
    ///
    /// The descriptors cover at most `len` bytes (`len > 0`, and `offset + len` lies inside
    /// the export), there are at most `max` of them (`max >= 1`), and at least one is
    /// appended on success. Lengths are non-zero. Consecutive descriptors should differ in
    /// flags, but the server merges equal neighbours anyway.
    fn extents(
        &self,
        offset: u64,
        len: u64,
        max: usize,
        out: &mut Vec<(u64, u32)>,
    ) -> qimg::Result<()>;
}

/// Pushes a descriptor, merging it into the previous one when the flags are equal.
pub(crate) fn push_extent(out: &mut Vec<(u64, u32)>, len: u64, flags: u32) {
    if let Some(last) = out.last_mut() {
        if last.1 == flags {
            last.0 += len;
            return;
        }
    }
    out.push((len, flags));
}

/// Walks the backing chain of `image` over `[offset, offset + len)` and reports, per run,
/// what `f` makes of the chain status. Bytes past the image's own length but inside the
/// export (the export size is rounded up to whole sectors, as QEMU does) read as zeros
/// and are reported as one unallocated run.
fn walk_chain(
    image: &dyn Image,
    offset: u64,
    len: u64,
    max: usize,
    out: &mut Vec<(u64, u32)>,
    f: impl Fn(&qimg::image::ChainExtent) -> u32,
    tail_flags: u32,
) -> qimg::Result<()> {
    let end = offset.saturating_add(len);
    let img_len = image.len();
    let mut pos = offset;
    let start_count = out.len();
    while pos < end {
        if pos >= img_len {
            push_extent(out, end - pos, tail_flags);
            break;
        }
        let want = (end - pos).min(img_len - pos);
        let e = chain_status(image, pos, want)?;
        // chain_status never returns an empty extent for a non-empty request, but a zero
        // here would loop forever, so treat it as "the rest of the range".
        let n = if e.len == 0 { want } else { e.len.min(want) };
        let flags = f(&e);
        // A run that would need a new descriptor beyond `max` ends the walk; stopping
        // early is allowed, the client asks again from where we stopped.
        let full = out.len() - start_count >= max;
        if full && out.last().map(|l| l.1) != Some(flags) {
            break;
        }
        push_extent(out, n, flags);
        pos += n;
    }
    if out.len() == start_count {
        // Never answer with nothing: describe the whole range as "unknown" (flags 0 is
        // always a safe status).
        out.push((len, 0));
    }
    Ok(())
}

/// `base:allocation` over the whole backing chain, as QEMU's server reports it:
/// `NBD_STATE_HOLE` unless the range reads from stored data, `NBD_STATE_ZERO` when it is
/// known to read as zeros.
#[derive(Debug)]
pub struct BaseAllocation {
    image: Arc<dyn Image>,
}

impl BaseAllocation {
    /// A context over `image` and its backing chain.
    pub fn new(image: Arc<dyn Image>) -> BaseAllocation {
        BaseAllocation { image }
    }
}

/// The `base:allocation` flags for one chain extent.
pub fn allocation_flags(e: &qimg::image::ChainExtent) -> u32 {
    let mut f = 0;
    if !e.data {
        f |= state::HOLE;
    }
    if e.zero {
        f |= state::ZERO;
    }
    f
}

impl MetaContext for BaseAllocation {
    fn name(&self) -> &str {
        BASE_ALLOCATION
    }

    fn extents(
        &self,
        offset: u64,
        len: u64,
        max: usize,
        out: &mut Vec<(u64, u32)>,
    ) -> qimg::Result<()> {
        walk_chain(
            self.image.as_ref(),
            offset,
            len,
            max,
            out,
            allocation_flags,
            state::HOLE | state::ZERO,
        )
    }
}

/// `qemu:allocation-depth`: 0 where no layer of the chain allocates the range, otherwise
/// the 1-based depth of the layer that does (1 = the exported image itself).
#[derive(Debug)]
pub struct AllocationDepth {
    image: Arc<dyn Image>,
}

impl AllocationDepth {
    /// A context over `image` and its backing chain.
    pub fn new(image: Arc<dyn Image>) -> AllocationDepth {
        AllocationDepth { image }
    }
}

impl MetaContext for AllocationDepth {
    fn name(&self) -> &str {
        ALLOCATION_DEPTH
    }

    fn extents(
        &self,
        offset: u64,
        len: u64,
        max: usize,
        out: &mut Vec<(u64, u32)>,
    ) -> qimg::Result<()> {
        walk_chain(
            self.image.as_ref(),
            offset,
            len,
            max,
            out,
            |e| if e.present { e.depth + 1 } else { 0 },
            0,
        )
    }
}

/// `qemu:dirty-bitmap:NAME`: `NBD_STATE_DIRTY` where the persistent bitmap has its bit
/// set. The bits are read live from the image, so writes through a writable export show
/// up at once (for enabled bitmaps), as in QEMU.
#[derive(Debug)]
pub struct DirtyBitmap {
    context: String,
    bitmap: String,
    image: Arc<dyn Image>,
}

impl DirtyBitmap {
    /// The context for bitmap `name`, found in `image` or, as QEMU searches, the first
    /// layer below it that has one by that name. Errors carry qemu-nbd's messages.
    pub fn new(image: Arc<dyn Image>, name: &str) -> Result<DirtyBitmap, String> {
        let mut layer = Some(image);
        while let Some(l) = layer {
            if let Some(q) = l.as_any().downcast_ref::<qimg::qcow2::Qcow2>() {
                match q.bitmap_usable(name) {
                    Ok(_) => {
                        return Ok(DirtyBitmap {
                            context: format!("{DIRTY_BITMAP_PREFIX}{name}"),
                            bitmap: name.to_string(),
                            image: l,
                        })
                    }
                    Err(qimg::Error::NotFound(_)) => {}
                    Err(e) => return Err(e.to_string()),
                }
            }
            layer = l.backing().cloned();
        }
        Err(format!("Bitmap '{name}' is not found"))
    }

    fn qcow2(&self) -> qimg::Result<&qimg::qcow2::Qcow2> {
        self.image
            .as_any()
            .downcast_ref::<qimg::qcow2::Qcow2>()
            .ok_or_else(|| qimg::Error::NotFound(format!("Bitmap '{}' is not found", self.bitmap)))
    }
}

impl MetaContext for DirtyBitmap {
    fn name(&self) -> &str {
        &self.context
    }

    fn extents(
        &self,
        offset: u64,
        len: u64,
        max: usize,
        out: &mut Vec<(u64, u32)>,
    ) -> qimg::Result<()> {
        let q = self.qcow2()?;
        let end = offset.saturating_add(len);
        let start_count = out.len();
        let mut pos = offset;
        while pos < end {
            // Past the bitmap (the export's sector round-up) the run reads as clean.
            let (n, dirty) = q.bitmap_run(&self.bitmap, pos, end - pos)?;
            let n = n.clamp(1, end - pos);
            let flags = if dirty { state::DIRTY } else { 0 };
            let full = out.len() - start_count >= max;
            if full && out.last().map(|l| l.1) != Some(flags) {
                break;
            }
            push_extent(out, n, flags);
            pos += n;
        }
        if out.len() == start_count {
            out.push((len, 0));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qimg::raw::Raw;
    use qimg::storage::MemStorage;

    #[test]
    fn raw_memory_is_all_data_up_to_the_sector_rounded_size() {
        // A raw image's size is rounded up to whole sectors, as in QEMU; storage without
        // hole information reports everything as data, the tail included.
        let st = Arc::new(MemStorage::new(vec![1u8; 1000]));
        let img: Arc<dyn Image> = Arc::new(Raw::open(st, false).unwrap());
        assert_eq!(img.len(), 1024);
        let ctx = BaseAllocation::new(img.clone());
        let mut out = Vec::new();
        ctx.extents(0, 1024, 16, &mut out).unwrap();
        assert_eq!(out, vec![(1024, 0)]);
        let d = AllocationDepth::new(img);
        out.clear();
        d.extents(0, 1024, 16, &mut out).unwrap();
        assert_eq!(out, vec![(1024, 1)]);
    }

    #[test]
    fn merging_and_limits() {
        let mut v = Vec::new();
        push_extent(&mut v, 5, 1);
        push_extent(&mut v, 5, 1);
        push_extent(&mut v, 5, 2);
        assert_eq!(v, vec![(10, 1), (5, 2)]);
    }
}
