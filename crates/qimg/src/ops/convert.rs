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

/// What `--salvage` reports: the target offset of a sector copied as zeros, and why.
pub type SalvageFn<'a> = dyn Fn(u64, &Error) + Sync + 'a;

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
    /// Map raw sources into memory instead of reading them into buffers, which saves one
    /// copy of every byte. Off by default: a source truncated by another process while
    /// mapped raises SIGBUS, so only callers that handle that signal should turn it on.
    pub map_sources: bool,
    /// `--salvage`: a source read that fails is retried sector by sector, and the sectors
    /// that still fail are copied as zeros instead of failing the conversion.
    pub salvage: bool,
    /// With `salvage`, called (in guest order) with the target offset and the error of
    /// every 512-byte sector replaced by zeros.
    pub on_salvaged: Option<&'a SalvageFn<'a>>,
    /// `-r`: at most this many bytes of the target per second (0: no limit).
    pub rate_limit: u64,
    /// `-C`: what to store comes from the sources' block status alone (no zero
    /// detection), and data stored uncompressed in a plain file is copied by the kernel
    /// (`copy_file_range`) into raw and qcow2 targets, as qemu-img's copy offloading.
    pub copy_range: bool,
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
            map_sources: false,
            salvage: false,
            on_salvaged: None,
            rate_limit: 0,
            copy_range: false,
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
            .field("map_sources", &self.map_sources)
            .field("salvage", &self.salvage)
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
    /// Per source, its layers' files mapped into memory (when asked for).
    maps: Vec<Option<crate::mapped::MappedLayers>>,
    /// The pace `-r` sets, shared by everything that commits chunks.
    pace: Pace,
}

/// `-r`: chunks are committed no faster than the rate allows. As in qemu-img, the first
/// request goes at once and each later one waits until the bytes before it fit the rate;
/// qemu-img's requests are 2 MiB, or one cluster when compressing.
struct Pace {
    rate: u64,
    start: std::time::Instant,
    dispatched: Mutex<u64>,
}

impl Pace {
    /// Waits until `len` more bytes, sent as requests of `granule` bytes, may go, then
    /// counts them.
    fn wait(&self, len: u64, granule: u64) {
        if self.rate == 0 {
            return;
        }
        let mut d = self.dispatched.lock().unwrap();
        let before_last = *d + len - granule.min(len);
        let due = std::time::Duration::from_secs_f64(before_last as f64 / self.rate as f64);
        let elapsed = self.start.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
        *d += len;
    }
}

impl<'a> Sources<'a> {
    fn new(images: &'a [Arc<dyn Image>], map: bool, rate: u64) -> Self {
        let mut starts = Vec::with_capacity(images.len());
        let mut maps = Vec::with_capacity(images.len());
        let mut total = 0;
        for i in images {
            starts.push(total);
            total += i.len();
            maps.push(map.then(|| crate::mapped::MappedLayers::new(i.as_ref())));
        }
        Sources {
            images,
            starts,
            total,
            maps,
            pace: Pace {
                rate,
                start: std::time::Instant::now(),
                dispatched: Mutex::new(0),
            },
        }
    }

    /// `[t, t+len)` straight from a mapped file, when one source stores it in one piece.
    fn borrow(&self, t: u64, len: u64) -> Result<Option<&[u8]>> {
        let (i, off) = self.locate(t);
        match &self.maps[i] {
            Some(m) => m.view(self.images[i].as_ref(), off, len),
            None => Ok(None),
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

    /// Reads `[t, t + buf.len())`. A failed read is retried in pieces (so a transient
    /// error or one bad cluster costs no more than it must); what still fails becomes an
    /// [`Error::Copy`] at the start of the failing source cluster (where qemu-img's
    /// request would start), or, with `salvage`, zeros recorded in `salvaged`.
    fn read(
        &self,
        buf: &mut [u8],
        t: u64,
        salvage: bool,
        salvaged: &mut Vec<(u64, Error)>,
    ) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let (i, off) = self.locate(t + done as u64);
            let img = self.images[i].as_ref();
            let n = ((img.len() - off) as usize).min(buf.len() - done);
            let piece = &mut buf[done..done + n];
            if img.read_at(piece, off).is_err() {
                let at = t + done as u64;
                if let Some((bad, e)) = retry_read(img, piece, off, at, salvage, salvaged) {
                    let unit = source_cluster(img);
                    let start = (bad - at + off) / unit * unit;
                    return Err(Error::Copy {
                        reading: true,
                        offset: at + start.saturating_sub(off),
                        source: Box::new(e),
                    });
                }
            }
            done += n;
        }
        Ok(())
    }
}

/// Sector size of `--salvage`, as qemu-img's.
const SECTOR: usize = 512;

/// Re-reads `buf` (image offset `off`, target offset `at`) in 64 KiB pieces, and a piece
/// that fails sector by sector. Returns the target offset and error of the first sector
/// that fails, unless `salvage`, which zeroes such sectors and records them instead.
fn retry_read(
    img: &dyn Image,
    buf: &mut [u8],
    off: u64,
    at: u64,
    salvage: bool,
    salvaged: &mut Vec<(u64, Error)>,
) -> Option<(u64, Error)> {
    const PIECE: usize = 64 << 10;
    for p in (0..buf.len()).step_by(PIECE) {
        let q = (p + PIECE).min(buf.len());
        if img.read_at(&mut buf[p..q], off + p as u64).is_ok() {
            continue;
        }
        for s in (p..q).step_by(SECTOR) {
            let e = (s + SECTOR).min(q);
            if let Err(err) = img.read_at(&mut buf[s..e], off + s as u64) {
                if !salvage {
                    return Some((at + s as u64, err));
                }
                buf[s..e].fill(0);
                salvaged.push((at + s as u64, err));
            }
        }
    }
    None
}

/// The unit a failed read is reported at: the image's cluster for qcow2, else a sector.
fn source_cluster(img: &dyn Image) -> u64 {
    match img.as_any().downcast_ref::<crate::qcow2::Qcow2>() {
        Some(q) => q.cluster_size(),
        None => SECTOR as u64,
    }
}

/// Marks a failed target write as such, at target offset `at` (errors that already say
/// which side failed pass through).
fn writing(at: u64) -> impl FnOnce(Error) -> Error {
    move |e| match e {
        e @ Error::Copy { .. } => e,
        e => Error::Copy {
            reading: false,
            offset: at,
            source: Box::new(e),
        },
    }
}

/// Reports salvaged sectors through the caller's callback.
fn report_salvaged(opts: &ConvertOptions, salvaged: &[(u64, Error)]) {
    if let Some(f) = opts.on_salvaged {
        for (at, e) in salvaged {
            f(*at, e);
        }
    }
}

/// Converts `sources` into `target`. The target must be at least as large as the sum of
/// the sources.
pub fn convert(sources: &[Arc<dyn Image>], target: Target, opts: &ConvertOptions) -> Result<()> {
    let src = Sources::new(sources, opts.map_sources, opts.rate_limit);
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
    let compressing = opts.compress && matches!(target, Target::Qcow2(_));
    if !compressing && !opts.top_only {
        return convert_pipelined(&src, target, opts, threads);
    }
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

/// A chunk's bytes on their way to the writer.
enum Bytes<'a> {
    /// Reads as zeros; nothing was read.
    Zero,
    /// Straight from a mapped source file.
    Borrowed(&'a [u8]),
    /// Read into a pool buffer (the first `usize` bytes are the chunk).
    Owned(crate::buf::AlignedBuf, usize),
}

impl Bytes<'_> {
    fn get(&self) -> &[u8] {
        match self {
            Bytes::Zero => &[],
            Bytes::Borrowed(b) => b,
            Bytes::Owned(b, n) => &b[..*n],
        }
    }
}

/// What the writer does with a chunk.
enum Plan {
    /// qcow2 target: place and write the non-zero blocks.
    Sparse(crate::qcow2::writer::SparsePlan),
    /// qcow2 target with `-S 0`: allocate and write every cluster.
    Clusters,
    /// Other targets: (start, end, zero) runs; data runs are written, zero runs are
    /// written as zeros unless the target already reads as zeros.
    Runs(Vec<(usize, usize, bool)>),
    /// `-C`: pieces as the sources' block status gives them.
    Copy(Vec<CopyPiece>),
}

/// A piece of a chunk under `convert -C`: (start, end) in the chunk and where it comes
/// from.
struct CopyPiece {
    a: usize,
    b: usize,
    from: Origin,
}

/// Where a `convert -C` piece comes from.
enum Origin {
    /// It reads as zeros.
    Zero,
    /// Read into the job's buffer (compressed data, or a layer that is not a plain file).
    Buffer,
    /// Stored as is in a layer's file at this offset: the kernel copies it.
    File(Arc<dyn crate::storage::Storage>, u64),
}

impl CopyPiece {
    /// Whether `next` (starting where this piece ends) continues it: same origin, and
    /// for file pieces the next bytes of the same file.
    fn continued_by(&self, next: &Origin) -> bool {
        match (&self.from, next) {
            (Origin::Zero, Origin::Zero) | (Origin::Buffer, Origin::Buffer) => true,
            (Origin::File(f, h), Origin::File(g, k)) => {
                Arc::ptr_eq(f, g) && h + (self.b - self.a) as u64 == *k
            }
            _ => false,
        }
    }
}

/// One prepared chunk.
struct Job<'a> {
    start: u64,
    bytes: Bytes<'a>,
    plan: Plan,
    /// Sectors `--salvage` replaced by zeros, reported when the job is written.
    salvaged: Vec<(u64, Error)>,
}

/// Gates how far readers may run ahead of the writer, and carries buffers back to them.
struct Window {
    state: Mutex<WindowState>,
    cv: std::sync::Condvar,
    size: u64,
}

#[derive(Default)]
struct WindowState {
    /// Chunks fully written.
    written: u64,
    /// Buffers free for reuse.
    free: Vec<crate::buf::AlignedBuf>,
    /// Written ranges of mapped sources, as (address, length), whose pages readers should
    /// release.
    release: Vec<(usize, usize)>,
    /// Readers waiting for the window to move: the writer only wakes anyone when there
    /// is someone to wake (a wake-up is a system call per chunk otherwise).
    waiting: usize,
}

/// `convert` for plain copies, as a pipeline: reader threads take chunks in order, read
/// them (or borrow them from a mapped source), find the zero blocks and hand the chunk
/// to this thread, which writes chunks in guest order.
///
/// One writer, because a filesystem serializes buffered writes to one file anyway
/// (Linux holds the inode lock across each write): several writing threads only queue on
/// that lock, and every time its holder is preempted they all stall. A single writer
/// that never waits for reads keeps the lock busy instead, while readers overlap with it.
fn convert_pipelined(
    src: &Sources,
    target: Target,
    opts: &ConvertOptions,
    threads: usize,
) -> Result<()> {
    let total = src.total;
    let chunks = total.div_ceil(CHUNK);
    let next = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let window = Window {
        state: Mutex::new(WindowState::default()),
        cv: std::sync::Condvar::new(),
        size: (threads as u64).max(2),
    };
    let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, Result<Job>)>(threads * 2);
    let mut result = Ok(());
    std::thread::scope(|s| {
        for _ in 0..threads {
            let tx = tx.clone();
            let (next, failed, window, target) = (&next, &failed, &window, &target);
            s.spawn(move || loop {
                let c = next.fetch_add(1, Ordering::Relaxed);
                if c >= chunks || failed.load(Ordering::Relaxed) {
                    return;
                }
                let (buf, written) = {
                    let mut st = window.state.lock().unwrap();
                    while c >= st.written + window.size && !failed.load(Ordering::Relaxed) {
                        st.waiting += 1;
                        st = window.cv.wait(st).unwrap();
                        st.waiting -= 1;
                    }
                    if failed.load(Ordering::Relaxed) {
                        return;
                    }
                    (st.free.pop(), std::mem::take(&mut st.release))
                };
                // Pages of a mapped source would otherwise stay in the page tables until
                // the end, counting the whole source as resident memory.
                for (addr, len) in written {
                    // SAFETY: (addr, len) came from a slice of a mapping in `src`, which
                    // outlives the workers.
                    let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, len) };
                    crate::storage::release_mapped(bytes);
                }
                let mut buf = buf;
                let job = prepare_chunk(src, target, opts, c, &mut buf);
                if let Some(b) = buf {
                    // Not needed for this chunk: back to the pool, since a fresh 2 MiB
                    // buffer costs page faults and zeroing on every use.
                    window.state.lock().unwrap().free.push(b);
                }
                if tx.send((c, job)).is_err() {
                    return;
                }
            });
        }
        drop(tx);
        result = write_jobs(src, &rx, &target, opts, chunks, &window, total);
        if result.is_err() {
            failed.store(true, Ordering::Relaxed);
            window.cv.notify_all();
            // Unblock readers waiting to send.
            while rx.recv().is_ok() {}
        }
    });
    result?;
    match target {
        Target::Image(img) if opts.flush => img.flush(),
        Target::Image(_) => Ok(()),
        Target::Qcow2(w) => w.finish(opts.flush),
    }
}

/// The writer's side of [`convert_pipelined`]: takes jobs, writes them in chunk order.
fn write_jobs(
    src: &Sources,
    rx: &std::sync::mpsc::Receiver<(u64, Result<Job>)>,
    target: &Target,
    opts: &ConvertOptions,
    chunks: u64,
    window: &Window,
    total: u64,
) -> Result<()> {
    let mut pending = std::collections::BTreeMap::new();
    let mut want = 0u64;
    let mut done = 0u64;
    while want < chunks {
        let job = match pending.remove(&want) {
            Some(j) => j,
            None => {
                let (c, j) = rx
                    .recv()
                    .map_err(|_| Error::InvalidArgument("conversion aborted".into()))?;
                if c != want {
                    pending.insert(c, j);
                    continue;
                }
                j
            }
        };
        let job: Job = job?;
        report_salvaged(opts, &job.salvaged);
        let len = CHUNK.min(total - job.start);
        src.pace.wait(len, len);
        write_job(target, opts, &job).map_err(writing(job.start))?;
        done += len;
        let mut st = window.state.lock().unwrap();
        st.written = want + 1;
        match job.bytes {
            Bytes::Owned(b, _) => st.free.push(b),
            Bytes::Borrowed(b) => st.release.push((b.as_ptr() as usize, b.len())),
            Bytes::Zero => {}
        }
        let wake = st.waiting > 0;
        drop(st);
        if wake {
            window.cv.notify_all();
        }
        want += 1;
        if let Some(p) = opts.progress {
            p(done.min(total), total);
        }
    }
    Ok(())
}

/// A reader's side of [`convert_pipelined`]: reads chunk `c` and plans its writes.
fn prepare_chunk<'a>(
    src: &'a Sources,
    target: &Target,
    opts: &ConvertOptions,
    c: u64,
    buf: &mut Option<crate::buf::AlignedBuf>,
) -> Result<Job<'a>> {
    let start = c * CHUNK;
    let len = CHUNK.min(src.total - start);
    let n = len as usize;
    if opts.copy_range {
        return prepare_copy(src, start, n, buf);
    }
    let mut salvaged = Vec::new();
    let bytes = if !src.may_have_data(start, len)? {
        if opts.sparse_size == 0 {
            // -S 0 writes what reads as zeros too, from a buffer.
            let mut b = buf
                .take()
                .unwrap_or_else(|| crate::buf::AlignedBuf::new(CHUNK as usize));
            b[..n].fill(0);
            Bytes::Owned(b, n)
        } else {
            Bytes::Zero
        }
    } else if let Some(b) = src.borrow(start, len)? {
        Bytes::Borrowed(b)
    } else {
        let mut b = buf
            .take()
            .unwrap_or_else(|| crate::buf::AlignedBuf::new(CHUNK as usize));
        src.read(&mut b[..n], start, opts.salvage, &mut salvaged)?;
        Bytes::Owned(b, n)
    };
    let data = bytes.get();
    let plan = match target {
        Target::Qcow2(_) if opts.sparse_size == 0 => Plan::Clusters,
        Target::Qcow2(w) => Plan::Sparse(w.plan_sparse(data, opts.sparse_size as usize)),
        Target::Image(_) if opts.sparse_size == 0 => Plan::Runs(vec![(0, n, false)]),
        Target::Image(_) if data.is_empty() => Plan::Runs(vec![(0, n, true)]),
        Target::Image(_) => {
            let g = opts.sparse_size as usize;
            let mut runs: Vec<(usize, usize, bool)> = Vec::new();
            let mut i = 0;
            while i < n {
                let j = (i + g).min(n);
                let zero = is_zero(&data[i..j]);
                match runs.last_mut() {
                    Some(r) if r.2 == zero => r.1 = j,
                    _ => runs.push((i, j, zero)),
                }
                i = j;
            }
            Plan::Runs(runs)
        }
    };
    Ok(Job {
        start,
        bytes,
        plan,
        salvaged,
    })
}

/// `prepare_chunk` for `convert -C`: pieces from the sources' block status; only what
/// the kernel cannot copy is read.
fn prepare_copy<'a>(
    src: &'a Sources,
    start: u64,
    n: usize,
    buf: &mut Option<crate::buf::AlignedBuf>,
) -> Result<Job<'a>> {
    let mut pieces: Vec<CopyPiece> = Vec::new();
    let mut pos = 0usize;
    while pos < n {
        let (i, off) = src.locate(start + pos as u64);
        let img = src.images[i].as_ref();
        let want = ((n - pos) as u64).min(img.len() - off);
        let e = chain_status(img, off, want)?;
        let len = (e.len.min(want) as usize).max(1);
        let from = if !e.data {
            Origin::Zero
        } else {
            match (e.compressed, e.offset, layer_file(img, e.depth)) {
                (false, Some(h), Some(f)) if f.raw_fd().is_some() => Origin::File(f, h),
                _ => Origin::Buffer,
            }
        };
        match pieces.last_mut() {
            Some(p) if p.continued_by(&from) => p.b += len,
            _ => pieces.push(CopyPiece {
                a: pos,
                b: pos + len,
                from,
            }),
        }
        pos += len;
    }
    let bytes = if pieces.iter().any(|p| matches!(p.from, Origin::Buffer)) {
        let mut b = buf
            .take()
            .unwrap_or_else(|| crate::buf::AlignedBuf::new(CHUNK as usize));
        let mut none = Vec::new();
        for p in pieces.iter().filter(|p| matches!(p.from, Origin::Buffer)) {
            src.read(&mut b[p.a..p.b], start + p.a as u64, false, &mut none)?;
        }
        Bytes::Owned(b, n)
    } else {
        Bytes::Zero
    };
    Ok(Job {
        start,
        bytes,
        plan: Plan::Copy(pieces),
        salvaged: Vec::new(),
    })
}

/// The file holding the guest data of layer `depth` under `img` (0 = `img`), when that
/// layer is raw or qcow2.
fn layer_file(img: &dyn Image, depth: u32) -> Option<Arc<dyn crate::storage::Storage>> {
    let mut layer = img;
    for _ in 0..depth {
        layer = layer.backing()?.as_ref();
    }
    crate::mapped::data_file(layer).cloned()
}

/// Stores the pieces `[x, y)` of a `convert -C` chunk at `host` (for `x`) in `dst`.
fn store_pieces(
    pieces: &[CopyPiece],
    data: &[u8],
    x: usize,
    y: usize,
    dst: &dyn crate::storage::Storage,
    host: u64,
) -> Result<()> {
    for p in pieces {
        let (a, b) = (p.a.max(x), p.b.min(y));
        if a >= b {
            continue;
        }
        let at = host + (a - x) as u64;
        match &p.from {
            // Only non-zero pieces are placed, so none falls in `[x, y)`.
            Origin::Zero => {}
            Origin::Buffer => dst.write_at(&data[a..b], at)?,
            Origin::File(f, h) => crate::storage::copy_range(
                f.as_ref(),
                h + (a - p.a) as u64,
                dst,
                at,
                (b - a) as u64,
            )?,
        }
    }
    Ok(())
}

/// Carries out one job on the target.
fn write_job(target: &Target, opts: &ConvertOptions, job: &Job) -> Result<()> {
    let data = job.bytes.get();
    match (&job.plan, target) {
        (Plan::Sparse(plan), Target::Qcow2(w)) => {
            let placed = w.place(job.start, plan)?;
            w.write_placed(data, &placed)
        }
        (Plan::Clusters, Target::Qcow2(w)) => w.write_clusters(job.start, data),
        (Plan::Runs(runs), Target::Image(img)) => {
            let raw = img.as_any().downcast_ref::<crate::raw::Raw>();
            for &(a, b, zero) in runs {
                if !zero {
                    if let Some(r) = raw {
                        // See Qcow2Writer::write_placed: one reservation per run.
                        r.file().preallocate(job.start + a as u64, (b - a) as u64);
                    }
                    img.write_at(&data[a..b], job.start + a as u64)?;
                } else if !opts.target_is_zero {
                    img.write_zeroes(job.start + a as u64, (b - a) as u64, true)?;
                }
            }
            Ok(())
        }
        (Plan::Copy(pieces), Target::Qcow2(w)) => {
            let ranges: Vec<(usize, usize)> = pieces
                .iter()
                .filter(|p| !matches!(p.from, Origin::Zero))
                .map(|p| (p.a, p.b))
                .collect();
            let placed = w.place(job.start, &w.plan_ranges(&ranges))?;
            for &(a, b, h) in placed.writes() {
                store_pieces(pieces, data, a, b, w.data_storage().as_ref(), h)?;
            }
            Ok(())
        }
        (Plan::Copy(pieces), Target::Image(img)) => {
            let raw = img.as_any().downcast_ref::<crate::raw::Raw>();
            for p in pieces {
                let at = job.start + p.a as u64;
                let len = (p.b - p.a) as u64;
                match (&p.from, raw) {
                    (Origin::Zero, _) if opts.target_is_zero => {}
                    (Origin::Zero, _) => img.write_zeroes(at, len, true)?,
                    (Origin::File(f, h), Some(r)) => {
                        crate::storage::copy_range(f.as_ref(), *h, r.file().as_ref(), at, len)?
                    }
                    (Origin::File(f, h), None) => {
                        let mut tmp = vec![0u8; p.b - p.a];
                        f.read_at(&mut tmp, *h)?;
                        img.write_at(&tmp, at)?;
                    }
                    (Origin::Buffer, _) => img.write_at(&data[p.a..p.b], at)?,
                }
            }
            Ok(())
        }
        _ => Err(Error::InvalidArgument(
            "convert plan does not fit the target".into(),
        )),
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
    let buf_len = buf.len() as u64;
    let granule = match target {
        Target::Qcow2(w) if opts.compress => w.cluster_size(),
        _ => buf_len,
    };
    let wait = || {
        if let Some((t, c)) = gate {
            t.wait(c, failed)?;
        }
        src.pace.wait(buf_len, granule);
        Ok(())
    };
    if opts.top_only {
        return copy_chunk_top_only(src, target, opts, start, buf, wait);
    }
    // Plain copies go through `convert_pipelined`; what is left here is compression.
    let Target::Qcow2(w) = target else {
        return Err(Error::InvalidArgument(
            "compression needs a qcow2 target".into(),
        ));
    };
    let len = buf.len() as u64;
    let has_data = src.may_have_data(start, len)?;
    let borrowed = if has_data {
        src.borrow(start, len)?
    } else {
        None
    };
    let mut salvaged = Vec::new();
    let buf: &[u8] = match borrowed {
        Some(b) => b,
        None => {
            if has_data {
                src.read(buf, start, opts.salvage, &mut salvaged)?;
            }
            buf
        }
    };
    let cs = w.cluster_size() as usize;
    // Compress every cluster holding data in parallel, then commit in order.
    let g = if opts.sparse_size == 0 {
        cs
    } else {
        (opts.sparse_size as usize).min(cs)
    };
    // Only compressed streams are kept until the commit; clusters that do not compress
    // are written from `buf` itself, so memory stays near one chunk.
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
    report_salvaged(opts, &salvaged);
    for (i, c) in prepared {
        let guest = start + (i * cs) as u64;
        let cl = &buf[i * cs..((i + 1) * cs).min(buf.len())];
        match c {
            Some(c) => w.write_compressed(guest, Some(&c), &[]),
            None => w.write_compressed(guest, None, &padded(cl)),
        }
        .map_err(writing(guest))?;
    }
    if let Some(b) = borrowed {
        // As in the pipeline: without this every page of a mapped source stays mapped
        // until the end and counts as this process's resident memory.
        crate::storage::release_mapped(b);
    }
    Ok(())
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
    let mut salvaged = Vec::new();
    for i in (0..buf.len()).step_by(g) {
        let n = g.min(buf.len() - i);
        let t = start + i as u64;
        if !src.top_allocated(t, n as u64)? {
            pieces.push(Piece::Skip);
            continue;
        }
        let b = &mut buf[i..i + n];
        if src.may_have_data(t, n as u64)? {
            src.read(b, t, opts.salvage, &mut salvaged)?;
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
    report_salvaged(opts, &salvaged);
    write_top_only(target, opts, start, buf, g, &pieces, compressed).map_err(writing(start))
}

/// The writing half of [`copy_chunk_top_only`].
fn write_top_only(
    target: &Target,
    opts: &ConvertOptions,
    start: u64,
    buf: &[u8],
    g: usize,
    pieces: &[Piece],
    compressed: Vec<(usize, Option<Vec<u8>>, Vec<u8>)>,
) -> Result<()> {
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
