//! `qemu-nbd -o OFFSET`: exporting an image from a byte offset on.
//!
//! qemu-nbd applies the offset to the disk the image presents (it stacks a `raw` node
//! with an `offset` on top of the opened format), not to the image file: with a qcow2
//! image, export byte 0 is guest byte OFFSET. That `raw` node is not a filter and has no
//! backing file, which shows in block status: only the top layer's allocation is
//! visible, ranges the top layer leaves to its backing file read as data but are
//! reported as `NBD_STATE_HOLE` without `NBD_STATE_ZERO`, `qemu:allocation-depth` is
//! 0 or 1, and persistent bitmaps cannot be found. [`OffsetImage`] and the two contexts
//! here reproduce that.

use crate::meta::{push_extent, MetaContext, ALLOCATION_DEPTH, BASE_ALLOCATION};
use crate::proto::state;
use qimg::image::{Extent, Image, Status};
use qimg::{Error, Result};
use std::sync::Arc;

/// An image seen from `offset` on: byte `x` of this image is byte `offset + x` of the
/// inner one.
#[derive(Debug)]
pub struct OffsetImage {
    inner: Arc<dyn Image>,
    offset: u64,
    len: u64,
}

impl OffsetImage {
    /// Wraps `inner`; fails with qemu-nbd's message when `offset` lies past its end.
    pub fn new(inner: Arc<dyn Image>, offset: u64) -> std::result::Result<OffsetImage, String> {
        let size = inner.len();
        if offset > size {
            return Err(format!(
                "Offset ({offset}) cannot be greater than size of the containing file ({size})"
            ));
        }
        Ok(OffsetImage {
            len: size - offset,
            inner,
            offset,
        })
    }

    /// The image below.
    pub fn inner(&self) -> &Arc<dyn Image> {
        &self.inner
    }

    /// The byte offset into the inner image.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Maps `[offset, offset + len)` of this image to the inner one, refusing ranges past
    /// the end (the export's sector round-up is handled by the server, which reads it as
    /// zeros).
    fn map(&self, offset: u64, len: u64) -> Result<u64> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(self.offset + offset),
            _ => Err(Error::RawIo(std::io::Error::from_raw_os_error(libc::EIO))),
        }
    }

    /// Status of the inner image's top layer at `offset` of this image, at most `len`
    /// bytes, with its flags as NBD shows them through the offset node.
    fn top_status(&self, offset: u64, len: u64) -> Result<(u64, Status)> {
        let len = len.min(self.len.saturating_sub(offset));
        if len == 0 {
            return Ok((0, Status::ZERO));
        }
        let e = self.inner.block_status(self.offset + offset, len)?;
        Ok((e.len.clamp(1, len), e.status))
    }

    /// Walks the top layer over `[offset, offset + len)` and appends what `f` makes of each
    /// run; `tail` is the value of the range past the end of the image.
    fn walk(
        &self,
        offset: u64,
        len: u64,
        max: usize,
        out: &mut Vec<(u64, u32)>,
        f: impl Fn(&Status) -> u32,
        tail: u32,
    ) -> Result<()> {
        let end = offset.saturating_add(len);
        let start_count = out.len();
        let mut pos = offset;
        while pos < end {
            if pos >= self.len {
                push_extent(out, end - pos, tail);
                break;
            }
            let (n, st) = self.top_status(pos, end - pos)?;
            let flags = f(&st);
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

impl Image for OffsetImage {
    fn format_name(&self) -> &'static str {
        "raw"
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let at = self.map(offset, buf.len() as u64)?;
        self.inner.read_at(buf, at)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let at = self.map(offset, buf.len() as u64)?;
        self.inner.write_at(buf, at)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        let at = self.map(offset, len)?;
        self.inner.write_zeroes(at, len, may_unmap)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let at = self.map(offset, len)?;
        self.inner.discard(at, len)
    }

    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let (n, mut status) = self.top_status(offset, len)?;
        // The offset node decides everything itself (it has no backing file): what the
        // top layer leaves unallocated reads from below, so it is data of unknown content.
        if !status.allocated {
            status = Status {
                allocated: true,
                data: self.inner.backing().is_some(),
                zero: self.inner.backing().is_none(),
                offset: None,
                compressed: false,
            };
        }
        Ok(Extent {
            start: offset,
            len: n.max(1),
            status,
        })
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Finds the [`OffsetImage`] behind an export's image.
fn as_offset(image: &Arc<dyn Image>) -> Option<&OffsetImage> {
    image.as_any().downcast_ref::<OffsetImage>()
}

/// `base:allocation` of an [`OffsetImage`], as qemu-nbd reports it through its offset
/// node: the top layer's flags, and `NBD_STATE_HOLE` alone where the top layer defers to
/// a backing file.
#[derive(Debug)]
pub struct OffsetAllocation(Arc<dyn Image>);

impl OffsetAllocation {
    /// The context for `image` if it is an [`OffsetImage`].
    pub fn new(image: Arc<dyn Image>) -> Option<OffsetAllocation> {
        as_offset(&image)?;
        Some(OffsetAllocation(image))
    }
}

impl MetaContext for OffsetAllocation {
    fn name(&self) -> &str {
        BASE_ALLOCATION
    }

    fn extents(&self, offset: u64, len: u64, max: usize, out: &mut Vec<(u64, u32)>) -> Result<()> {
        let Some(o) = as_offset(&self.0) else {
            out.push((len, 0));
            return Ok(());
        };
        let has_backing = o.inner.backing().is_some();
        o.walk(
            offset,
            len,
            max,
            out,
            |s| {
                if s.allocated {
                    let mut f = 0;
                    if !s.data {
                        f |= state::HOLE;
                    }
                    if s.zero {
                        f |= state::ZERO;
                    }
                    f
                } else if has_backing {
                    state::HOLE
                } else {
                    state::HOLE | state::ZERO
                }
            },
            state::HOLE | state::ZERO,
        )
    }
}

/// `qemu:allocation-depth` of an [`OffsetImage`]: 1 where the top layer allocates, 0
/// elsewhere (the offset node hides the backing chain).
#[derive(Debug)]
pub struct OffsetDepth(Arc<dyn Image>);

impl OffsetDepth {
    /// The context for `image` if it is an [`OffsetImage`].
    pub fn new(image: Arc<dyn Image>) -> Option<OffsetDepth> {
        as_offset(&image)?;
        Some(OffsetDepth(image))
    }
}

impl MetaContext for OffsetDepth {
    fn name(&self) -> &str {
        ALLOCATION_DEPTH
    }

    fn extents(&self, offset: u64, len: u64, max: usize, out: &mut Vec<(u64, u32)>) -> Result<()> {
        let Some(o) = as_offset(&self.0) else {
            out.push((len, 0));
            return Ok(());
        };
        o.walk(offset, len, max, out, |s| u32::from(s.allocated), 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qimg::raw::Raw;
    use qimg::storage::MemStorage;

    #[test]
    fn shifts_and_bounds() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i / 512) as u8).collect();
        let st = Arc::new(MemStorage::new(data));
        let img: Arc<dyn Image> = Arc::new(Raw::open(st, true).unwrap());
        let o = OffsetImage::new(img.clone(), 1024).unwrap();
        assert_eq!(o.len(), 3072);
        let mut b = [0u8; 512];
        o.read_at(&mut b, 0).unwrap();
        assert!(b.iter().all(|&x| x == 2));
        assert!(o.read_at(&mut b, 3072 - 256).is_err());
        assert!(o.write_at(&b, u64::MAX - 10).is_err());
        o.write_at(&[9; 512], 512).unwrap();
        img.read_at(&mut b, 1536).unwrap();
        assert!(b.iter().all(|&x| x == 9));
        assert_eq!(
            OffsetImage::new(img.clone(), 4097).unwrap_err(),
            "Offset (4097) cannot be greater than size of the containing file (4096)"
        );
        assert_eq!(OffsetImage::new(img, 4096).unwrap().len(), 0);
    }
}
