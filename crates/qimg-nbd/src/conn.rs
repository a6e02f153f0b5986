//! One client connection: handshake, then the transmission phase.
//!
//! Transmission uses a leader/follower pool: workers take turns holding the read side,
//! each reads one request (header and payload), lets go, executes it and writes the reply
//! under the write lock. A worker that finds nobody else waiting to read starts another
//! worker (up to the configured limit), so a connection with one request in flight costs
//! one thread and a connection with 16 in flight executes them in parallel. Requests are
//! thus limited in number per connection, and each holds at most one 32 MiB payload.

use crate::handshake::{self, End, Session};
use crate::meta::MetaContext;
use crate::proto::{self, cmd, cmd_flags, errno, reply_flags, reply_type, Mode, Request};
use crate::proto::{MAX_PAYLOAD, SIMPLE_REPLY_MAGIC};
use crate::server::{DetectZeroes, Discard, ExportState, Inner};
use crate::stream::Stream;
use std::io::{self, BufReader, Read};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::Scope;

/// Most descriptors sent per context in one block-status reply (the specification asks
/// for at most 2^20; fewer keeps one request's work bounded, and clients simply ask again).
const MAX_EXTENTS: usize = 1 << 16;
/// Most content chunks in one sparse read before the rest is sent as data.
const MAX_READ_RUNS: usize = 1024;
/// Payload buffers larger than this are released after use instead of kept per worker.
const KEEP_BUFFER: usize = 1 << 20;

/// Runs a connection to its end.
pub(crate) fn run(inner: &Inner, stream: Stream) {
    stream.set_nodelay();
    let mut w = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let ctl = match stream.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    };
    let mut r = BufReader::with_capacity(256 << 10, stream);
    let session = match handshake::negotiate(inner, &mut r, &mut w) {
        Ok(s) => s,
        Err(End::Closed) => return,
        Err(End::Fail(msg)) => {
            inner.log(format_args!("option negotiation failed: {msg}"));
            let _ = ctl.shutdown(Shutdown::Both);
            return;
        }
    };
    // Transmission has no deadline: clear what the handshake set.
    r.get_mut().set_read_deadline(None);
    let _ = ctl.set_read_timeout(None);
    let _ = ctl.set_write_timeout(None);
    // Views are only handed to the kernel (a plain socket's send copies from them); TLS
    // encrypts in user space, where a file truncated under the server would raise SIGBUS.
    let views = (!w.is_tls()).then_some(&inner.exports[session.export].views);
    let c = Conn {
        inner,
        views,
        exp: &inner.exports[session.export],
        session,
        reader: Mutex::new(ReadSide { r, closed: false }),
        writer: Mutex::new(w),
        ctl,
        idle: AtomicUsize::new(0),
        workers: AtomicUsize::new(0),
        failed: AtomicBool::new(false),
    };
    std::thread::scope(|s| {
        c.idle.fetch_add(1, Ordering::SeqCst);
        c.workers.fetch_add(1, Ordering::SeqCst);
        worker(s, &c);
    });
    let mut w = lock(&c.writer);
    if w.is_tls() && !c.failed.load(Ordering::SeqCst) {
        // Say goodbye at the TLS level so the client sees a clean end of the session; a
        // client that stopped reading gets a moment, not a hung server thread.
        let _ = c
            .ctl
            .set_write_timeout(Some(std::time::Duration::from_secs(1)));
        let _ = w.close_notify();
    }
    drop(w);
    let _ = c.ctl.shutdown(Shutdown::Both);
}

struct ReadSide {
    r: BufReader<Stream>,
    closed: bool,
}

struct Conn<'a> {
    inner: &'a Inner,
    /// Zero-copy views of the export's data, when the connection may use them.
    views: Option<&'a qimg::mapped::MappedLayers>,
    exp: &'a ExportState,
    session: Session,
    reader: Mutex<ReadSide>,
    writer: Mutex<Stream>,
    ctl: Stream,
    /// Workers not executing a request (waiting for or holding the read side).
    idle: AtomicUsize,
    /// Workers alive.
    workers: AtomicUsize,
    /// The socket failed or the client broke the protocol; stop everything.
    failed: AtomicBool,
}

/// A request read off the wire, with its payload in the worker's buffer.
struct Job {
    req: Request,
    /// Bytes of payload read into the buffer.
    payload: usize,
    /// The payload was too large to read: answer with an error, then hang up.
    oversized: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Worker code does not panic while holding these locks by design; if it ever did,
    // the connection state is still a socket and a buffer, safe to keep using.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn worker<'s>(s: &'s Scope<'s, '_>, c: &'s Conn<'s>) {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let job = {
            let mut rs = lock(&c.reader);
            if rs.closed || c.failed.load(Ordering::SeqCst) {
                break;
            }
            match c.read_request(&mut rs.r, &mut buf) {
                Ok(Some(job)) => job,
                Ok(None) => {
                    // NBD_CMD_DISC or a clean hang-up: stop reading; requests already
                    // taken by other workers still complete and get their replies.
                    rs.closed = true;
                    break;
                }
                Err(msg) => {
                    rs.closed = true;
                    if let Some(m) = msg {
                        c.inner.log(format_args!("Disconnect client, due to: {m}"));
                    }
                    c.fail();
                    break;
                }
            }
        };
        let now_idle = c.idle.fetch_sub(1, Ordering::SeqCst) - 1;
        if now_idle == 0 && !job.oversized {
            let n = c.workers.load(Ordering::SeqCst);
            if n < c.inner.config.workers_per_connection {
                c.workers.fetch_add(1, Ordering::SeqCst);
                c.idle.fetch_add(1, Ordering::SeqCst);
                let spawned = std::thread::Builder::new()
                    .name("nbd-worker".into())
                    .spawn_scoped(s, move || worker(s, c));
                if spawned.is_err() {
                    c.workers.fetch_sub(1, Ordering::SeqCst);
                    c.idle.fetch_sub(1, Ordering::SeqCst);
                }
            }
        }
        c.execute(&job, &mut buf);
        if job.oversized {
            c.fail();
        }
        if buf.capacity() > KEEP_BUFFER {
            buf = Vec::new();
        }
        c.idle.fetch_add(1, Ordering::SeqCst);
    }
    c.workers.fetch_sub(1, Ordering::SeqCst);
}

/// Outcome of a command: success, or an NBD error with a message for the client.
type CmdResult = Result<(), (u32, String)>;

fn img_err(e: qimg::Error) -> (u32, String) {
    (errno::from_host(e.errno()), e.to_string())
}

impl Conn<'_> {
    fn mode(&self) -> Mode {
        self.session.mode
    }

    /// Stops the connection: no more reads, and writes fail fast.
    fn fail(&self) {
        self.failed.store(true, Ordering::SeqCst);
        let _ = self.ctl.shutdown(Shutdown::Both);
    }

    /// Reads the next request. `Ok(None)`: the client is done. `Err(Some(msg))`: protocol
    /// violation worth logging; `Err(None)`: the socket failed.
    fn read_request(
        &self,
        r: &mut BufReader<Stream>,
        buf: &mut Vec<u8>,
    ) -> Result<Option<Job>, Option<String>> {
        let mode = self.mode();
        let mut hb = [0u8; 32];
        let hsize = mode.request_size();
        match read_full(r, &mut hb[..hsize]) {
            Ok(true) => {}
            Ok(false) => return Ok(None),
            Err(_) => return Err(None),
        }
        let req = match Request::decode(mode, &hb[..hsize]) {
            Ok(req) => req,
            Err(bad) => return Err(Some(format!("invalid magic (got 0x{:x})", bad.0))),
        };
        if req.typ == cmd::DISC {
            return Ok(None);
        }
        // WRITE always carries `length` bytes of data. QEMU's client does not set
        // PAYLOAD_LEN on writes even with extended headers (the flag marks payloads on
        // other commands), so the flag is accepted on WRITE but not required.
        let payload_len = if req.typ == cmd::WRITE
            || (mode == Mode::Extended && req.flags & cmd_flags::PAYLOAD_LEN != 0)
        {
            req.length
        } else {
            0
        };
        if payload_len > u64::from(MAX_PAYLOAD) {
            // Reading (or skipping) up to 4 GiB for a request we will refuse would let a
            // client burn our bandwidth; answer and hang up, as QEMU does.
            return Ok(Some(Job {
                req,
                payload: 0,
                oversized: true,
            }));
        }
        let n = payload_len as usize;
        grow(buf, n);
        match read_full(r, &mut buf[..n]) {
            Ok(true) => {}
            _ if n == 0 => {}
            _ => return Err(None),
        }
        Ok(Some(Job {
            req,
            payload: n,
            oversized: false,
        }))
    }

    fn execute(&self, job: &Job, buf: &mut Vec<u8>) {
        let req = &job.req;
        if job.oversized {
            let msg = format!(
                "len ({}) is larger than max len ({MAX_PAYLOAD})",
                req.length
            );
            self.send_error(req, errno::EINVAL, &msg);
            return;
        }
        match self.check(req, job.payload, buf) {
            Ok(len) => {
                let res = match req.typ {
                    cmd::READ => {
                        // The read reply is sent by the handler itself.
                        self.read(req, len, buf);
                        return;
                    }
                    cmd::BLOCK_STATUS => {
                        self.block_status(req, len, &buf[..job.payload]);
                        return;
                    }
                    cmd::WRITE => self.write(req, &buf[..job.payload]),
                    cmd::FLUSH => self.flush(),
                    cmd::TRIM => self.trim(req, len),
                    cmd::CACHE => self.cache(req, len, buf),
                    cmd::WRITE_ZEROES => self.write_zeroes(req, len),
                    _ => Err((errno::EINVAL, "unreachable".into())),
                };
                match res {
                    Ok(()) => self.send_ok(req),
                    Err((e, msg)) => self.send_error(req, e, &msg),
                }
            }
            Err((e, msg)) => self.send_error(req, e, &msg),
        }
    }

    /// Validates flags, lengths and range; returns the effect length.
    fn check(&self, req: &Request, payload: usize, buf: &[u8]) -> Result<u64, (u32, String)> {
        let mode = self.mode();
        let ext = mode == Mode::Extended;
        let mut valid = cmd_flags::FUA;
        match req.typ {
            cmd::READ => {
                if mode >= Mode::Structured {
                    valid |= cmd_flags::DF;
                }
            }
            cmd::WRITE => {
                if ext {
                    valid |= cmd_flags::PAYLOAD_LEN;
                }
            }
            cmd::FLUSH | cmd::TRIM | cmd::CACHE => {}
            cmd::WRITE_ZEROES => valid |= cmd_flags::NO_HOLE | cmd_flags::FAST_ZERO,
            cmd::BLOCK_STATUS => {
                valid |= cmd_flags::REQ_ONE;
                if ext && !self.session.contexts.is_empty() {
                    valid |= cmd_flags::PAYLOAD_LEN;
                }
            }
            t => {
                return Err((
                    errno::EINVAL,
                    format!("invalid request type ({t}) received"),
                ))
            }
        }
        if req.flags & !valid != 0 {
            return Err((
                errno::EINVAL,
                format!(
                    "unsupported flags for command {} (got 0x{:x})",
                    cmd::name(req.typ),
                    req.flags
                ),
            ));
        }
        let has_payload = ext && req.flags & cmd_flags::PAYLOAD_LEN != 0;
        let len = if req.typ == cmd::WRITE {
            payload as u64
        } else if req.typ == cmd::BLOCK_STATUS && has_payload {
            // Payload: 64-bit effect length, then 32-bit context ids.
            if payload < 12 || !(payload - 8).is_multiple_of(4) {
                return Err((errno::EINVAL, "invalid block status payload".into()));
            }
            proto::be64(buf, 0)
        } else {
            req.length
        };
        if matches!(req.typ, cmd::READ | cmd::CACHE) && len > u64::from(MAX_PAYLOAD) {
            return Err((
                errno::EINVAL,
                format!("len ({len}) is larger than max len ({MAX_PAYLOAD})"),
            ));
        }
        if req.typ != cmd::FLUSH {
            let size = self.exp.size;
            if req.offset > size || len > size - req.offset {
                return Err((
                    errno::EINVAL,
                    format!(
                        "operation past EOF; From: {}, Len: {len}, Size: {size}",
                        req.offset
                    ),
                ));
            }
        }
        if self.exp.export.read_only
            && matches!(req.typ, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES)
        {
            return Err((errno::EPERM, "Export is read-only".into()));
        }
        if req.typ == cmd::BLOCK_STATUS {
            if self.session.contexts.is_empty() {
                return Err((errno::EINVAL, "no metadata contexts negotiated".into()));
            }
            if len == 0 {
                return Err((errno::EINVAL, "need non-zero length".into()));
            }
        }
        Ok(len)
    }

    /// Flushes when the request or the cache mode asks for it.
    fn maybe_flush(&self, req: &Request) -> CmdResult {
        let cache = self.inner.config.cache;
        if cache == crate::CacheMode::Unsafe {
            return Ok(());
        }
        if req.flags & cmd_flags::FUA != 0 || cache.write_through() {
            self.exp.export.image.flush().map_err(img_err)?;
        }
        Ok(())
    }

    fn write(&self, req: &Request, data: &[u8]) -> CmdResult {
        let img = &self.exp.export.image;
        let dz = self.inner.config.detect_zeroes;
        if dz != DetectZeroes::Off && !data.is_empty() && qimg::buf::is_zero(data) {
            let unmap = dz == DetectZeroes::Unmap && self.inner.config.discard == Discard::Unmap;
            img.write_zeroes(req.offset, data.len() as u64, unmap)
                .map_err(img_err)?;
        } else if !data.is_empty() {
            img.write_at(data, req.offset).map_err(img_err)?;
        }
        self.maybe_flush(req)
    }

    fn flush(&self) -> CmdResult {
        if self.inner.config.cache == crate::CacheMode::Unsafe {
            return Ok(());
        }
        self.exp.export.image.flush().map_err(img_err)
    }

    fn trim(&self, req: &Request, len: u64) -> CmdResult {
        // With --discard=ignore TRIM is a successful no-op, as in qemu-nbd.
        if self.inner.config.discard == Discard::Unmap && len > 0 {
            self.exp
                .export
                .image
                .discard(req.offset, len)
                .map_err(img_err)?;
            self.maybe_flush(req)?;
        }
        Ok(())
    }

    fn write_zeroes(&self, req: &Request, len: u64) -> CmdResult {
        let may_unmap =
            req.flags & cmd_flags::NO_HOLE == 0 && self.inner.config.discard == Discard::Unmap;
        if req.flags & cmd_flags::FAST_ZERO != 0 && !may_unmap {
            // Zeroing that must keep the space allocated may end up writing every byte;
            // the image layer cannot promise otherwise, so fail fast as the flag demands.
            return Err((errno::ENOTSUP, "fast zeroing is not possible here".into()));
        }
        if len > 0 {
            self.exp
                .export
                .image
                .write_zeroes(req.offset, len, may_unmap)
                .map_err(img_err)?;
        }
        self.maybe_flush(req)
    }

    fn cache(&self, req: &Request, len: u64, buf: &mut Vec<u8>) -> CmdResult {
        // Prefetch by reading: it warms the host page cache and the image's metadata
        // caches, which is what a later read will need.
        let chunk = (len as usize).min(1 << 20);
        grow(buf, chunk);
        let mut pos = 0u64;
        while pos < len {
            let n = ((len - pos) as usize).min(chunk);
            self.read_export(&mut buf[..n], req.offset + pos)
                .map_err(img_err)?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Reads export bytes; the part past the image's own length (inside the sector
    /// rounding of the export size) reads as zeros.
    fn read_export(&self, out: &mut [u8], offset: u64) -> qimg::Result<()> {
        let img = &self.exp.export.image;
        let img_len = img.len();
        let inside = img_len.saturating_sub(offset).min(out.len() as u64) as usize;
        if inside > 0 {
            img.read_at(&mut out[..inside], offset)?;
        }
        out[inside..].fill(0);
        Ok(())
    }

    /// The export's bytes at `[offset, offset+len)` straight from the mapped file, when
    /// they are stored there in one piece (see `qimg::mapped`).
    fn view(&self, offset: u64, len: u64) -> Option<&[u8]> {
        let v = self.views?;
        v.view(self.exp.export.image.as_ref(), offset, len)
            .ok()
            .flatten()
    }

    fn read(&self, req: &Request, len: u64, buf: &mut Vec<u8>) {
        let n = len as usize;
        let mode = self.mode();
        if mode == Mode::Simple {
            if let Some(v) = self.view(req.offset, len) {
                let mut h = Vec::with_capacity(16);
                proto::encode_simple_reply(&mut h, 0, req.cookie);
                self.send(&mut [&h, v]);
                return;
            }
        }
        grow(buf, n);
        if mode == Mode::Simple {
            match self.read_export(&mut buf[..n], req.offset) {
                Ok(()) => {
                    let mut h = Vec::with_capacity(16);
                    proto::encode_simple_reply(&mut h, 0, req.cookie);
                    self.send(&mut [&h, &buf[..n]]);
                }
                Err(e) => {
                    let (en, msg) = img_err(e);
                    self.send_error(req, en, &msg);
                }
            }
            return;
        }
        if n == 0 {
            self.send_none(req);
            return;
        }
        // Runs of (length, reads-as-zero); DF asks for a single data chunk.
        let mut runs: Vec<(u64, bool)> = Vec::new();
        if req.flags & cmd_flags::DF == 0 {
            let mut ext = Vec::new();
            // Context 0 is always the export's `base:allocation`.
            let ctx = &self.exp.contexts[0].1;
            if ctx
                .extents(req.offset, len, MAX_READ_RUNS, &mut ext)
                .is_ok()
            {
                let mut covered = 0;
                for (l, f) in ext {
                    let l = l.min(len - covered);
                    if l == 0 {
                        break;
                    }
                    let zero = f & proto::state::ZERO != 0;
                    match runs.last_mut() {
                        Some(last) if last.1 == zero => last.0 += l,
                        _ => runs.push((l, zero)),
                    }
                    covered += l;
                }
                if covered < len {
                    match runs.last_mut() {
                        Some(last) if !last.1 => last.0 += len - covered,
                        _ => runs.push((len - covered, false)),
                    }
                }
            }
        }
        if runs.is_empty() {
            runs.push((len, false));
        }
        // Read every data run before sending anything, so an error becomes a clean error
        // reply instead of a half-sent one (views are checked readable when taken).
        let mut pos = 0u64;
        let mut views: Vec<Option<&[u8]>> = Vec::with_capacity(runs.len());
        for &(l, zero) in &runs {
            let v = if zero {
                None
            } else {
                self.view(req.offset + pos, l)
            };
            views.push(v);
            if !zero && v.is_none() {
                let s = pos as usize;
                if let Err(e) = self.read_export(&mut buf[s..s + l as usize], req.offset + pos) {
                    let (en, msg) = img_err(e);
                    self.send_error(req, en, &msg);
                    return;
                }
            }
            pos += l;
        }
        let mut headers: Vec<u8> = Vec::with_capacity(runs.len() * 48);
        // Per chunk: its header's span in `headers`, and its data's span in `buf`.
        type Span = (usize, usize, Option<(usize, usize)>);
        let mut spans: Vec<Span> = Vec::new();
        pos = 0;
        for (i, &(l, zero)) in runs.iter().enumerate() {
            let flags = if i + 1 == runs.len() {
                reply_flags::DONE
            } else {
                0
            };
            let start = headers.len();
            let off = req.offset + pos;
            if zero {
                proto::encode_chunk_header(
                    &mut headers,
                    mode,
                    flags,
                    reply_type::OFFSET_HOLE,
                    req.cookie,
                    req.offset,
                    12,
                );
                headers.extend_from_slice(&off.to_be_bytes());
                headers.extend_from_slice(&(l as u32).to_be_bytes());
                spans.push((start, headers.len(), None));
            } else {
                proto::encode_chunk_header(
                    &mut headers,
                    mode,
                    flags,
                    reply_type::OFFSET_DATA,
                    req.cookie,
                    req.offset,
                    8 + l,
                );
                headers.extend_from_slice(&off.to_be_bytes());
                spans.push((
                    start,
                    headers.len(),
                    Some((pos as usize, (pos + l) as usize)),
                ));
            }
            pos += l;
        }
        let mut slices: Vec<&[u8]> = Vec::with_capacity(spans.len() * 2);
        for ((hs, he, data), v) in spans.into_iter().zip(views) {
            slices.push(&headers[hs..he]);
            if let Some((ds, de)) = data {
                slices.push(v.unwrap_or(&buf[ds..de]));
            }
        }
        self.send(&mut slices);
    }

    fn block_status(&self, req: &Request, len: u64, payload: &[u8]) {
        let mode = self.mode();
        // Which contexts: all negotiated ones, or the subset a payload names.
        let mut chosen: Vec<&(u32, Arc<dyn MetaContext>)> = Vec::new();
        if payload.len() >= 12 {
            for idb in payload[8..].chunks_exact(4) {
                let id = u32::from_be_bytes([idb[0], idb[1], idb[2], idb[3]]);
                match self.session.contexts.iter().find(|c| c.0 == id) {
                    Some(c) if !chosen.iter().any(|x| x.0 == id) => chosen.push(c),
                    Some(_) => {}
                    None => {
                        self.send_error(
                            req,
                            errno::EINVAL,
                            &format!("unknown metadata context id {id}"),
                        );
                        return;
                    }
                }
            }
        } else {
            chosen = self.session.contexts.iter().collect();
        }
        let max = if req.flags & cmd_flags::REQ_ONE != 0 {
            1
        } else {
            MAX_EXTENTS
        };
        let mut out = Vec::new();
        let mut ext = Vec::new();
        for (i, (id, ctx)) in chosen.iter().enumerate() {
            ext.clear();
            if let Err(e) = ctx.extents(req.offset, len, max, &mut ext) {
                let (en, msg) = img_err(e);
                self.send_error(req, en, &msg);
                return;
            }
            // Never describe more than asked for in one REQ_ONE descriptor, and keep
            // compact descriptors within 32 bits (the request length bounds them).
            let mut total = 0u64;
            let mut descs: Vec<(u64, u32)> = Vec::with_capacity(ext.len());
            for &(l, f) in &ext {
                let l = l.min(len - total);
                if l == 0 {
                    break;
                }
                descs.push((l, f));
                total += l;
                if descs.len() == max {
                    break;
                }
            }
            let done = if i + 1 == chosen.len() {
                reply_flags::DONE
            } else {
                0
            };
            if mode == Mode::Extended {
                let plen = 8 + 16 * descs.len() as u64;
                proto::encode_chunk_header(
                    &mut out,
                    mode,
                    done,
                    reply_type::BLOCK_STATUS_EXT,
                    req.cookie,
                    req.offset,
                    plen,
                );
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&(descs.len() as u32).to_be_bytes());
                for (l, f) in descs {
                    out.extend_from_slice(&l.to_be_bytes());
                    out.extend_from_slice(&0u32.to_be_bytes());
                    out.extend_from_slice(&f.to_be_bytes());
                }
            } else {
                let plen = 4 + 8 * descs.len() as u64;
                proto::encode_chunk_header(
                    &mut out,
                    mode,
                    done,
                    reply_type::BLOCK_STATUS,
                    req.cookie,
                    req.offset,
                    plen,
                );
                out.extend_from_slice(&id.to_be_bytes());
                for (l, f) in descs {
                    out.extend_from_slice(&(l as u32).to_be_bytes());
                    out.extend_from_slice(&f.to_be_bytes());
                }
            }
        }
        self.send(&mut [&out]);
    }

    /// Writes one whole reply; on failure the connection is finished.
    fn send(&self, bufs: &mut [&[u8]]) {
        if self.failed.load(Ordering::SeqCst) {
            return;
        }
        let mut w = lock(&self.writer);
        if w.write_all_vectored(bufs).is_err() {
            drop(w);
            self.fail();
        }
    }

    fn send_ok(&self, req: &Request) {
        if self.mode() == Mode::Extended {
            self.send_none(req);
        } else {
            let mut h = Vec::with_capacity(16);
            proto::encode_simple_reply(&mut h, 0, req.cookie);
            self.send(&mut [&h]);
        }
    }

    fn send_none(&self, req: &Request) {
        let mut h = Vec::with_capacity(32);
        proto::encode_chunk_header(
            &mut h,
            self.mode(),
            reply_flags::DONE,
            reply_type::NONE,
            req.cookie,
            req.offset,
            0,
        );
        self.send(&mut [&h]);
    }

    fn send_error(&self, req: &Request, error: u32, msg: &str) {
        let mut h = Vec::with_capacity(64 + msg.len().min(proto::MAX_STRING));
        if self.mode() == Mode::Simple {
            h.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
            h.extend_from_slice(&error.to_be_bytes());
            h.extend_from_slice(&req.cookie.to_be_bytes());
        } else {
            let mut p = Vec::new();
            proto::encode_error_payload(&mut p, error, msg);
            proto::encode_chunk_header(
                &mut h,
                self.mode(),
                reply_flags::DONE,
                reply_type::ERROR,
                req.cookie,
                req.offset,
                p.len() as u64,
            );
            h.extend_from_slice(&p);
        }
        self.send(&mut [&h]);
    }
}

/// Makes `buf` at least `n` bytes long. Only new bytes are zeroed: every caller
/// overwrites the prefix it uses, and zero-filling up to 32 MiB per request would cost as
/// much as the copy itself.
fn grow(buf: &mut Vec<u8>, n: usize) {
    if buf.len() < n {
        buf.resize(n, 0);
    }
}

/// Reads exactly `buf.len()` bytes. `Ok(false)` if the peer closed before the first byte.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) if done == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}
