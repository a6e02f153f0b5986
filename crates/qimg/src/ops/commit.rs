//! `commit`: copies what the upper layers of a backing chain allocate into a lower one.
//!
//! Only ranges that some layer above the base allocates are touched (found with block
//! status, never by reading); each is rounded out to the base's cluster size so the base
//! gets whole clusters, as QEMU's commit job (a mirror with cluster granularity) does.
//! Ranges that read as zeros become zero writes that may unmap, ranges with data are
//! copied. The work is spread over threads in fixed chunks; the write engine below
//! serializes only its metadata updates.

use crate::error::{Error, Result};
use crate::image::{chain_status, Image};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Options of a commit.
pub struct CommitOptions<'a> {
    /// Worker threads.
    pub threads: usize,
    /// Called with (bytes done, bytes total) as work completes.
    pub progress: Option<&'a (dyn Fn(u64, u64) + Sync)>,
}

impl Default for CommitOptions<'_> {
    fn default() -> Self {
        CommitOptions {
            threads: 4,
            progress: None,
        }
    }
}

impl std::fmt::Debug for CommitOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommitOptions")
            .field("threads", &self.threads)
            .finish_non_exhaustive()
    }
}

/// Largest piece one worker copies at a time.
const CHUNK: u64 = 2 << 20;

/// Bytes copied between two write-back hints to the base.
const WRITEBACK_STEP: u64 = 16 << 20;

/// The layer `depth` levels below `top` (0 = `top` itself).
pub fn layer_at(top: &dyn Image, depth: usize) -> Option<&dyn Image> {
    let mut l = top;
    for _ in 0..depth {
        l = l.backing()?.as_ref();
    }
    Some(l)
}

/// Whether some layer above `depth` decides the content of the range at `offset`:
/// returns that answer and how far it holds (at most `len`).
///
/// A range past the end of a shorter intermediate layer counts as allocated, because the
/// overlay reads zeros there whatever the base holds.
pub fn allocated_above(
    top: &dyn Image,
    depth: usize,
    offset: u64,
    len: u64,
) -> Result<(bool, u64)> {
    let mut n = len;
    let mut layer = top;
    for _ in 0..depth {
        let e = layer.block_status(offset, n)?;
        if e.status.allocated {
            return Ok((true, e.len));
        }
        n = e.len;
        let Some(next) = layer.backing() else {
            return Ok((true, n));
        };
        if offset >= next.len() {
            return Ok((true, n));
        }
        n = n.min(next.len() - offset);
        layer = next.as_ref();
    }
    Ok((false, n))
}

/// The ranges (offset, length) that layers above `depth` allocate, rounded out to
/// `granule` and merged.
pub fn ranges_above(top: &dyn Image, depth: usize, granule: u64) -> Result<Vec<(u64, u64)>> {
    let len = top.len();
    let g = granule.max(512);
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0;
    while pos < len {
        let (alloc, n) = allocated_above(top, depth, pos, len - pos)?;
        if n == 0 {
            return Err(Error::Corrupt(format!("empty block status at {pos}")));
        }
        if alloc {
            let s = pos / g * g;
            let e = (pos + n).div_ceil(g).saturating_mul(g).min(len);
            match out.last_mut() {
                Some(last) if last.0 + last.1 >= s => last.1 = e.max(last.0 + last.1) - last.0,
                _ => out.push((s, e - s)),
            }
        }
        pos += n;
    }
    Ok(out)
}

/// Copies everything layers of `top`'s chain above depth `depth` allocate into the
/// layer at that depth, which must be open for writing and at least as long as `top`.
/// Returns the number of bytes copied or zeroed.
pub fn commit(top: &dyn Image, depth: usize, opts: &CommitOptions) -> Result<u64> {
    if depth == 0 {
        return Err(Error::InvalidArgument(
            "cannot commit an image into itself".into(),
        ));
    }
    let base = layer_at(top, depth)
        .ok_or_else(|| Error::InvalidArgument("Image does not have a backing file".into()))?;
    if base.len() < top.len() {
        return Err(Error::InvalidArgument(
            "the base image is smaller than the image to commit".into(),
        ));
    }
    let granule = match base.as_any().downcast_ref::<crate::qcow2::Qcow2>() {
        Some(q) => q.cluster_size(),
        None => 64 << 10,
    };
    // Items are cut at CHUNK boundaries, so a granule must divide CHUNK.
    let granule = granule.clamp(512, CHUNK);
    let ranges = ranges_above(top, depth, granule)?;
    // Work items: the ranges cut at CHUNK boundaries.
    let mut items = Vec::new();
    for (s, l) in ranges {
        let mut p = s;
        while p < s + l {
            let e = ((p / CHUNK + 1) * CHUNK).min(s + l);
            items.push((p, e - p));
            p = e;
        }
    }
    let total: u64 = items.iter().map(|i| i.1).sum();
    // Zero writes go first and are flushed, so the clusters they release (the engine
    // frees only after a flush) can hold the data copied next: the base ends up as
    // compact as QEMU, whose commit frees at once, leaves it.
    run_items(top, base, &items, granule, true, opts.threads, &|_| {})?;
    base.flush()?;
    let done = AtomicU64::new(0);
    let on_done = |len: u64| {
        let d = done.fetch_add(len, Ordering::Relaxed) + len;
        // Start the write-back of what was copied so far: the final flush then waits for
        // the tail only instead of the whole copy (the page cache would otherwise hold
        // everything until it).
        if d / WRITEBACK_STEP != (d - len) / WRITEBACK_STEP {
            base.start_writeback();
        }
        if let Some(p) = opts.progress {
            p(d, total);
        }
    };
    run_items(top, base, &items, granule, false, opts.threads, &on_done)?;
    base.flush()?;
    Ok(total)
}

/// Runs `items` on worker threads: with `zeros`, only the zero writes, otherwise only
/// the data copies.
fn run_items(
    top: &dyn Image,
    base: &dyn Image,
    items: &[(u64, u64)],
    granule: u64,
    zeros: bool,
    threads: usize,
    on_done: &(dyn Fn(u64) + Sync),
) -> Result<()> {
    let next = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let threads = threads.clamp(1, 64).min(items.len().max(1));
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                // The zero pass needs no buffer; zeroing 2 MiB per thread is not free.
                let mut buf = crate::buf::AlignedBuf::new(if zeros { 0 } else { CHUNK as usize });
                loop {
                    if failed.load(Ordering::Relaxed) {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(&(off, len)) = items.get(i) else {
                        return;
                    };
                    if let Err(e) = copy_item(top, base, off, len, granule, &mut buf, zeros) {
                        failed.store(true, Ordering::Relaxed);
                        first_error.lock().unwrap().get_or_insert(e);
                        return;
                    }
                    on_done(len);
                }
            });
        }
    });
    match first_error.into_inner().unwrap() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Splits `[off, off+len)` (granule-aligned except at the image end) into the pieces
/// the base gets: whole granules that read as zeros, and data spans that cover every
/// other granule completely.
///
/// A granule is never split between a zero write and a data write: two writes to one
/// cluster of the base would allocate it with the first and overwrite it in place with
/// the second, and a crash between them could leave a cluster the base did not store
/// before half old, half new. One write per cluster keeps QEMU's property that a fresh
/// cluster reads wholly old or wholly new.
fn plan_item(top: &dyn Image, off: u64, len: u64, granule: u64) -> Result<Vec<(u64, u64, bool)>> {
    let end = off + len;
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    let mut push = |s: u64, e: u64, zero: bool| {
        if s >= e {
            return;
        }
        match out.last_mut() {
            Some(last) if last.2 == zero && last.0 + last.1 == s => last.1 = e - last.0,
            _ => out.push((s, e - s, zero)),
        }
    };
    let mut pos = off;
    while pos < end {
        let e = chain_status(top, pos, end - pos)?;
        let n = e.len.min(end - pos);
        if n == 0 {
            return Err(Error::Corrupt(format!("empty block status at {pos}")));
        }
        if e.zero && !e.data {
            let zs = pos.div_ceil(granule) * granule;
            let ze = if pos + n == end {
                end
            } else {
                (pos + n) / granule * granule
            };
            if zs < ze {
                push(pos, zs, false);
                push(zs, ze, true);
                push(ze, pos + n, false);
            } else {
                push(pos, pos + n, false);
            }
        } else {
            push(pos, pos + n, false);
        }
        pos += n;
    }
    Ok(out)
}

fn copy_item(
    top: &dyn Image,
    base: &dyn Image,
    off: u64,
    len: u64,
    granule: u64,
    buf: &mut [u8],
    zeros: bool,
) -> Result<()> {
    for (pos, n, zero) in plan_item(top, off, len, granule)? {
        if zero {
            if zeros {
                base.write_zeroes(pos, n, true)?;
            }
        } else if !zeros {
            let b = &mut buf[..n as usize];
            top.read_at(b, pos)?;
            base.write_at(b, pos)?;
        }
    }
    Ok(())
}
