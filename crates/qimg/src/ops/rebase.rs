//! Safe `rebase`: before an image's backing file changes, copy into the image every
//! cluster it does not allocate itself where the old and the new backing differ, so the
//! guest-visible content stays the same.
//!
//! The image's unallocated ranges come from its own block status; inside them, old and new
//! backing are compared one image cluster at a time (both sides' block status first, so
//! ranges that read as zeros on both sides are never read). A differing cluster is written
//! whole (clipped to the unallocated range), which is what QEMU does since it aligned
//! rebase to the cluster size. The work runs in guest order, so clusters are allocated in
//! the same order as qemu-img allocates them. Unlike qemu-img 10.0.2 there is no fixed
//! I/O buffer that a run can overflow: an image cluster larger than the old backing's
//! clusters (2 MiB over 1 MiB) is handled like any other.

use crate::error::{Error, Result};
use crate::image::{chain_status, Image};

/// Options of a safe rebase.
#[derive(Default)]
pub struct RebaseOptions<'a> {
    /// Called with (bytes done, bytes total) as the walk advances.
    pub progress: Option<&'a (dyn Fn(u64, u64) + Sync)>,
    /// Write the copied clusters compressed (`rebase -c`; qcow2 images only). Pieces
    /// that are not whole clusters are written uncompressed.
    pub compress: bool,
}

impl std::fmt::Debug for RebaseOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RebaseOptions").finish_non_exhaustive()
    }
}

/// Bytes compared per step (a multiple of every cluster size).
const STEP: u64 = 2 << 20;

/// Reads `buf.len()` bytes of `img` at `offset`, zeros past its end (or everywhere when
/// there is no image).
fn read_padded(img: Option<&dyn Image>, buf: &mut [u8], offset: u64) -> Result<()> {
    match img {
        Some(i) if offset < i.len() => {
            let n = ((i.len() - offset) as usize).min(buf.len());
            i.read_at(&mut buf[..n], offset)?;
            buf[n..].fill(0);
        }
        _ => buf.fill(0),
    }
    Ok(())
}

/// Whether `[offset, offset+len)` of `img` surely reads as zeros.
fn reads_zero(img: Option<&dyn Image>, offset: u64, len: u64) -> Result<bool> {
    let Some(i) = img else { return Ok(true) };
    let end = (offset + len).min(i.len());
    let mut pos = offset;
    while pos < end {
        let e = chain_status(i, pos, end - pos)?;
        if e.data || !e.zero {
            return Ok(false);
        }
        pos += e.len;
    }
    Ok(true)
}

/// Copies into `img` the clusters it does not allocate where `old` and `new` differ.
/// `img` must be writable; its backing file is still `old` while this runs (partial
/// cluster writes copy the rest of the cluster from it). Where there is no old backing,
/// differing ranges are written as zeros (zero clusters) rather than as data.
///
/// Returns the number of bytes written.
pub fn rebase_copy(
    img: &dyn Image,
    old: Option<&dyn Image>,
    new: Option<&dyn Image>,
    cluster_size: u64,
    opts: &RebaseOptions,
) -> Result<u64> {
    let len = img.len();
    let cs = cluster_size.max(512);
    if !STEP.is_multiple_of(cs) && !cs.is_multiple_of(STEP) {
        return Err(Error::InvalidArgument(format!(
            "unsupported cluster size {cs}"
        )));
    }
    let step = STEP.max(cs);
    let mut a = crate::buf::AlignedBuf::new(step as usize);
    let mut b = crate::buf::AlignedBuf::new(step as usize);
    let mut written = 0u64;
    let mut pos = 0u64;
    while pos < len {
        let chunk_end = (pos + step).min(len);
        let mut p = pos;
        while p < chunk_end {
            let e = img.block_status(p, chunk_end - p)?;
            let n = e.len.min(chunk_end - p);
            if n == 0 {
                return Err(Error::Corrupt(format!("empty block status at {p}")));
            }
            if !e.status.allocated {
                written += copy_run(img, old, new, p, n, cs, opts.compress, &mut a, &mut b)?;
            }
            p += n;
        }
        pos = chunk_end;
        if let Some(f) = opts.progress {
            f(pos, len);
        }
    }
    img.flush()?;
    Ok(written)
}

/// Handles one unallocated run `[start, start+len)` lying within one step: both sides
/// are read once, compared cluster by cluster, and consecutive differing clusters are
/// written with one request (one per cluster when compressing).
#[allow(clippy::too_many_arguments)]
fn copy_run(
    img: &dyn Image,
    old: Option<&dyn Image>,
    new: Option<&dyn Image>,
    start: u64,
    len: u64,
    cs: u64,
    compress: bool,
    a: &mut [u8],
    b: &mut [u8],
) -> Result<u64> {
    if reads_zero(old, start, len)? && reads_zero(new, start, len)? {
        return Ok(0);
    }
    let n = len as usize;
    read_padded(old, &mut a[..n], start)?;
    read_padded(new, &mut b[..n], start)?;
    let mut written = 0;
    let end = start + len;
    let mut p = start;
    // Start of the pending run of differing clusters.
    let mut run: Option<u64> = None;
    while p < end {
        let q = ((p / cs + 1) * cs).min(end);
        let (i, j) = ((p - start) as usize, (q - start) as usize);
        let differ = a[i..j] != b[i..j];
        if differ && run.is_none() {
            run = Some(p);
        }
        if let (false, Some(r)) = (differ, run) {
            written += write_back(
                img,
                old.is_none(),
                compress,
                cs,
                &a[(r - start) as usize..i],
                r,
            )?;
            run = None;
        }
        p = q;
    }
    if let Some(r) = run {
        written += write_back(
            img,
            old.is_none(),
            compress,
            cs,
            &a[(r - start) as usize..n],
            r,
        )?;
    }
    Ok(written)
}

fn write_back(
    img: &dyn Image,
    no_old: bool,
    compress: bool,
    cs: u64,
    data: &[u8],
    at: u64,
) -> Result<u64> {
    if no_old {
        img.write_zeroes(at, data.len() as u64, false)?;
    } else if compress {
        let q = img
            .as_any()
            .downcast_ref::<crate::qcow2::Qcow2>()
            .ok_or_else(|| Error::unsupported("Compression not supported"))?;
        // Whole clusters (and the image's last, partial one) go compressed, one by one.
        let end = at + data.len() as u64;
        let mut p = at;
        while p < end {
            let q_end = ((p / cs + 1) * cs).min(end);
            let piece = &data[(p - at) as usize..(q_end - at) as usize];
            if p.is_multiple_of(cs) && (q_end - p == cs || q_end == img.len()) {
                q.write_compressed(piece, p)?;
            } else {
                img.write_at(piece, p)?;
            }
            p = q_end;
        }
    } else {
        img.write_at(data, at)?;
    }
    Ok(data.len() as u64)
}
