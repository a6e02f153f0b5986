//! `convert`: copies one or more sources (concatenated) into a target image.
//!
//! The work is split into fixed chunks of the target; worker threads take chunks in
//! order, ask the sources' block status first (so unallocated and zero ranges are never
//! read), read what holds data, detect zeros at the sparse granularity and write the rest.
//! Compression runs on the worker threads too, so it uses every core.

use crate::buf::is_zero;
use crate::error::{Error, Result};
use crate::image::{chain_status, Image};
use crate::qcow2::compress;
use crate::qcow2::writer::Qcow2Writer;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Where converted data goes.
#[derive(Debug)]
pub enum Target {
    /// Any image with a working write path (raw files).
    Image(Arc<dyn Image>),
    /// A qcow2 image being built.
    Qcow2(Box<Qcow2Writer>),
}

impl Target {
    fn len(&self) -> u64 {
        match self {
            Target::Image(i) => i.len(),
            Target::Qcow2(w) => w.header().size & !511,
        }
    }
}

/// Options of a conversion.
pub struct ConvertOptions<'a> {
    /// Zero-detection granularity in bytes (`-S`); 0 disables detection and writes every
    /// byte, as qemu-img's `-S 0`.
    pub sparse_size: u64,
    /// The target already reads as zeros everywhere (fresh image or `--target-is-zero`).
    pub target_is_zero: bool,
    /// Compress data clusters (qcow2 targets only).
    pub compress: bool,
    /// Worker threads.
    pub threads: usize,
    /// Flush the target at the end (qemu-img's `-t` modes other than `unsafe`, its
    /// default for convert).
    pub flush: bool,
    /// Called with (bytes done, bytes total) as chunks complete.
    pub progress: Option<&'a (dyn Fn(u64, u64) + Sync)>,
    /// The target has a backing file (`convert -B`): copy only what each source's top
    /// layer allocates (what the source inherits stays unallocated, to be read from the
    /// target's backing file), and write zeros explicitly, since the target does not
    /// read as zeros where its backing file has data.
    pub top_only: bool,
}

impl Default for ConvertOptions<'_> {
    fn default() -> Self {
        ConvertOptions {
            sparse_size: 4096,
            target_is_zero: true,
            compress: false,
            threads: 4,
            flush: false,
            progress: None,
            top_only: false,
        }
    }
}

impl std::fmt::Debug for ConvertOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConvertOptions")
            .field("sparse_size", &self.sparse_size)
            .field("target_is_zero", &self.target_is_zero)
            .field("compress", &self.compress)
            .field("threads", &self.threads)
            .finish()
    }
}

/// Bytes per work item; a multiple of every cluster size.
const CHUNK: u64 = 2 << 20;

/// The sources laid end to end.
struct Sources<'a> {
    images: &'a [Arc<dyn Image>],
    starts: Vec<u64>,
    total: u64,
}

impl<'a> Sources<'a> {
    fn new(images: &'a [Arc<dyn Image>]) -> Self {
        let mut starts = Vec::with_capacity(images.len());
        let mut total = 0;
        for i in images {
            starts.push(total);
            total += i.len();
        }
        Sources {
            images,
            starts,
            total,
        }
    }

    /// The source holding target offset `t`, and the offset within it.
    fn locate(&self, t: u64) -> (usize, u64) {
        let i = self.starts.partition_point(|&s| s <= t) - 1;
        (i, t - self.starts[i])
    }

    /// Whether `[t, t+len)` may hold non-zero data (false: it surely reads as zeros).
    fn may_have_data(&self, t: u64, len: u64) -> Result<bool> {
        let mut pos = t;
        let end = t + len;
        while pos < end {
            let (i, off) = self.locate(pos);
            let img = self.images[i].as_ref();
            let n = (end - pos).min(img.len() - off);
            let e = chain_status(img, off, n)?;
            if e.data || !e.zero {
                return Ok(true);
            }
            pos += e.len;
        }
        Ok(false)
    }

    /// Whether the top layer of some source allocates part of `[t, t+len)`.
    fn top_allocated(&self, t: u64, len: u64) -> Result<bool> {
        let mut pos = t;
        let end = t + len;
        while pos < end {
            let (i, off) = self.locate(pos);
            let img = self.images[i].as_ref();
            let n = (end - pos).min(img.len() - off);
            let e = img.block_status(off, n)?;
            if e.status.allocated {
                return Ok(true);
            }
            pos += e.len.clamp(1, n);
        }
        Ok(false)
    }

    fn read(&self, buf: &mut [u8], t: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let (i, off) = self.locate(t + done as u64);
            let img = self.images[i].as_ref();
            let n = ((img.len() - off) as usize).min(buf.len() - done);
            img.read_at(&mut buf[done..done + n], off)?;
            done += n;
        }
        Ok(())
    }
}

/// Converts `sources` into `target`. The target must be at least as large as the sum of
/// the sources.
pub fn convert(sources: &[Arc<dyn Image>], target: Target, opts: &ConvertOptions) -> Result<()> {
    let src = Sources::new(sources);
    if target.len() < src.total {
        return Err(Error::InvalidArgument(
            "The target is smaller than the source".into(),
        ));
    }
    let total = src.total;
    let chunks = total.div_ceil(CHUNK);
    let next = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let threads = opts.threads.clamp(1, 64).min(chunks.max(1) as usize);
    // qcow2 targets commit chunks in guest order (reading, zero detection and
    // compression still run in parallel), so clusters are allocated in the same order as
    // qemu-img allocates them and the layout does not depend on thread timing.
    let ordered = match &target {
        Target::Qcow2(_) => true,
        Target::Image(i) => i.format_name() == "qcow2",
    };
    let turn = Turn {
        next: Mutex::new(0),
        cv: std::sync::Condvar::new(),
    };
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut buf = crate::buf::AlignedBuf::new(CHUNK as usize);
                loop {
                    if failed.load(Ordering::Relaxed) {
                        return;
                    }
                    let c = next.fetch_add(1, Ordering::Relaxed);
                    if c >= chunks {
                        return;
                    }
                    let start = c * CHUNK;
                    let len = CHUNK.min(total - start);
                    let gate = if ordered { Some((&turn, c)) } else { None };
                    if let Err(e) = copy_chunk(
                        &src,
                        &target,
                        opts,
                        start,
                        &mut buf[..len as usize],
                        gate,
                        &failed,
                    ) {
                        turn.skip();
                        failed.store(true, Ordering::Relaxed);
                        first_error.lock().unwrap().get_or_insert(e);
                        return;
                    }
                    let d = done.fetch_add(len, Ordering::Relaxed) + len;
                    if let Some(p) = opts.progress {
                        p(d, total);
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap() {
        return Err(e);
    }
    match target {
        Target::Image(img) if opts.flush => img.flush(),
        Target::Image(_) => Ok(()),
        Target::Qcow2(w) => w.finish(opts.flush),
    }
}

/// Hands out commit turns in chunk order.
struct Turn {
    next: Mutex<u64>,
    cv: std::sync::Condvar,
}

impl Turn {
    /// Waits until chunk `c` may commit (or the conversion failed).
    fn wait(&self, c: u64, failed: &AtomicBool) -> Result<()> {
        let mut n = self.next.lock().unwrap();
        while *n != c {
            if failed.load(Ordering::Relaxed) {
                return Err(Error::InvalidArgument("conversion aborted".into()));
            }
            n = self
                .cv
                .wait_timeout(n, std::time::Duration::from_millis(50))
                .unwrap()
                .0;
        }
        Ok(())
    }

    /// Passes the turn to chunk `c + 1`.
    fn done(&self, c: u64) {
        let mut n = self.next.lock().unwrap();
        if *n == c {
            *n = c + 1;
        }
        self.cv.notify_all();
    }

    /// Releases waiters after a failure.
    fn skip(&self) {
        self.cv.notify_all();
    }
}

#[allow(clippy::too_many_arguments)]
fn copy_chunk(
    src: &Sources,
    target: &Target,
    opts: &ConvertOptions,
    start: u64,
    buf: &mut [u8],
    gate: Option<(&Turn, u64)>,
    failed: &AtomicBool,
) -> Result<()> {
    let r = copy_chunk_inner(src, target, opts, start, buf, gate, failed);
    if let (Ok(()), Some((t, c))) = (&r, gate) {
        t.done(c);
    }
    r
}

fn copy_chunk_inner(
    src: &Sources,
    target: &Target,
    opts: &ConvertOptions,
    start: u64,
    buf: &mut [u8],
    gate: Option<(&Turn, u64)>,
    failed: &AtomicBool,
) -> Result<()> {
    let wait = || match gate {
        Some((t, c)) => t.wait(c, failed),
        None => Ok(()),
    };
    if opts.top_only {
        return copy_chunk_top_only(src, target, opts, start, buf, wait);
    }
    let len = buf.len() as u64;
    let has_data = src.may_have_data(start, len)?;
    if has_data {
        src.read(buf, start)?;
    } else {
        buf.fill(0);
    }
    match target {
        Target::Image(img) => {
            wait()?;
            if opts.sparse_size == 0 {
                return img.write_at(buf, start);
            }
            let g = opts.sparse_size as usize;
            let mut i = 0usize;
            while i < buf.len() {
                let zero = !has_data || is_zero(&buf[i..(i + g).min(buf.len())]);
                let mut j = i;
                while j < buf.len()
                    && (!has_data || is_zero(&buf[j..(j + g).min(buf.len())])) == zero
                {
                    j = (j + g).min(buf.len());
                }
                if !zero {
                    img.write_at(&buf[i..j], start + i as u64)?;
                } else if !opts.target_is_zero {
                    img.write_zeroes(start + i as u64, (j - i) as u64, true)?;
                }
                i = j;
            }
            Ok(())
        }
        Target::Qcow2(w) => {
            let cs = w.cluster_size() as usize;
            if opts.compress {
                // Compress every cluster holding data in parallel, then commit in order.
                let g = if opts.sparse_size == 0 {
                    cs
                } else {
                    (opts.sparse_size as usize).min(cs)
                };
                // Only compressed streams are kept until the commit; clusters that do not
                // compress are written from `buf` itself, so memory stays near one chunk.
                let mut prepared: Vec<(usize, Option<Vec<u8>>)> = Vec::new();
                let padded = |cl: &[u8]| {
                    let mut full = cl.to_vec();
                    full.resize(cs, 0);
                    full
                };
                if has_data {
                    for (i, cl) in buf.chunks(cs).enumerate() {
                        if opts.sparse_size != 0 && cl.chunks(g).all(is_zero) {
                            continue;
                        }
                        let c = if cl.len() == cs {
                            compress::compress(w.compression(), cl)?
                        } else {
                            compress::compress(w.compression(), &padded(cl))?
                        };
                        prepared.push((i, c));
                    }
                }
                wait()?;
                for (i, c) in prepared {
                    let guest = start + (i * cs) as u64;
                    let cl = &buf[i * cs..((i + 1) * cs).min(buf.len())];
                    match c {
                        Some(c) => w.write_compressed(guest, Some(&c), &[])?,
                        None => w.write_compressed(guest, None, &padded(cl))?,
                    }
                }
                return Ok(());
            }
            wait()?;
            if opts.sparse_size == 0 {
                // -S 0: allocate everything, zeros included.
                w.write_clusters(start, buf)
            } else if has_data {
                w.write_sparse(start, buf, opts.sparse_size as usize)
            } else {
                Ok(())
            }
        }
    }
}

/// What `convert -B` does with one target cluster.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Piece {
    /// The source's top layer does not allocate it: leave it to the target's backing.
    Skip,
    /// Reads as zeros: zero cluster.
    Zero,
    /// Holds data.
    Data,
}

/// `copy_chunk_inner` for a target with a backing file: cluster by cluster, only what the
/// sources' top layers allocate. A cluster that the top layer allocates only in part (a
/// smaller source cluster size, or extended L2) is read whole from the source chain; the
/// rest of it is the inherited content the new backing file must hold anyway.
fn copy_chunk_top_only(
    src: &Sources,
    target: &Target,
    opts: &ConvertOptions,
    start: u64,
    buf: &mut [u8],
    wait: impl Fn() -> Result<()>,
) -> Result<()> {
    let g = match target {
        Target::Qcow2(w) => w.cluster_size(),
        Target::Image(i) => match i.as_any().downcast_ref::<crate::qcow2::Qcow2>() {
            Some(q) => q.cluster_size(),
            None => 64 << 10,
        },
    } as usize;
    let mut pieces = Vec::with_capacity(buf.len().div_ceil(g));
    for i in (0..buf.len()).step_by(g) {
        let n = g.min(buf.len() - i);
        let t = start + i as u64;
        if !src.top_allocated(t, n as u64)? {
            pieces.push(Piece::Skip);
            continue;
        }
        let b = &mut buf[i..i + n];
        if src.may_have_data(t, n as u64)? {
            src.read(b, t)?;
            pieces.push(if opts.sparse_size != 0 && is_zero(b) {
                Piece::Zero
            } else {
                Piece::Data
            });
        } else if opts.sparse_size == 0 {
            b.fill(0);
            pieces.push(Piece::Data);
        } else {
            pieces.push(Piece::Zero);
        }
    }
    // Prepare compressed clusters before taking the commit turn.
    let mut compressed = Vec::new();
    if let (true, Target::Qcow2(w)) = (opts.compress, target) {
        for (k, p) in pieces.iter().enumerate() {
            if *p == Piece::Data {
                let i = k * g;
                let mut full = buf[i..(i + g).min(buf.len())].to_vec();
                full.resize(g, 0);
                compressed.push((k, compress::compress(w.compression(), &full)?, full));
            }
        }
    }
    wait()?;
    match target {
        Target::Qcow2(w) => {
            if opts.compress {
                for (k, c, full) in compressed {
                    w.write_compressed(start + (k * g) as u64, c.as_deref(), &full)?;
                }
            }
            // Runs of equal pieces, written with one call each.
            let mut k = 0;
            while k < pieces.len() {
                let p = pieces[k];
                let mut e = k + 1;
                while e < pieces.len() && pieces[e] == p {
                    e += 1;
                }
                let (i, j) = (k * g, (e * g).min(buf.len()));
                let at = start + i as u64;
                match p {
                    Piece::Skip => {}
                    Piece::Zero => w.zero_clusters(at, (j - i) as u64)?,
                    Piece::Data if opts.compress => {}
                    // qemu-img writes whole clusters here: no holes inside a cluster
                    // whose backing may not read as zeros.
                    Piece::Data => w.write_clusters(at, &buf[i..j])?,
                }
                k = e;
            }
            Ok(())
        }
        Target::Image(img) => {
            for (k, p) in pieces.iter().enumerate() {
                let (i, j) = (k * g, ((k + 1) * g).min(buf.len()));
                let at = start + i as u64;
                match p {
                    Piece::Skip => {}
                    Piece::Zero => img.write_zeroes(at, (j - i) as u64, true)?,
                    Piece::Data => img.write_at(&buf[i..j], at)?,
                }
            }
            Ok(())
        }
    }
}
