//! Fixed newstyle negotiation, option by option, as QEMU's server answers it.
//!
//! Option data is consumed as a stream with a byte budget (the option length): nothing is
//! ever allocated from a length the client sent, strings are capped at 4096 bytes, and
//! whatever an option carries beyond what we understand is skipped through a fixed buffer
//! so the stream stays in step. The handshake as a whole runs against a deadline
//! (`--handshake-limit`): every socket read and write gets the time that is left.
//!
//! With TLS configured, only `NBD_OPT_STARTTLS` is served until the TLS handshake is done
//! (other options get `NBD_REP_ERR_TLS_REQD`, as qemu-nbd answers); the handshake then
//! swaps the plain streams for TLS ones and negotiation carries on over them.

use crate::meta::MetaContext;
use crate::proto::{self, client_flags, info, opt, rep, Mode, OptionHeader, MAX_PAYLOAD};
use crate::proto::{IHAVEOPT, MAX_STRING};
use crate::server::Inner;
use crate::stream::Stream;
use std::io::{self, BufReader, Read, Write};
use std::sync::Arc;
use std::time::Instant;

/// What the handshake agreed on, for the transmission phase.
pub(crate) struct Session {
    /// Index of the export in the server's list.
    pub(crate) export: usize,
    /// Header style.
    pub(crate) mode: Mode,
    /// Selected contexts, with their ids.
    pub(crate) contexts: Vec<(u32, Arc<dyn MetaContext>)>,
}

/// Why the handshake ended without a session.
pub(crate) enum End {
    /// The client went away, aborted, or ran out of time.
    Closed,
    /// The client broke the protocol; the message says how (for the log).
    Fail(String),
}

impl From<io::Error> for End {
    fn from(_: io::Error) -> End {
        End::Closed
    }
}

/// Socket I/O bounded by the handshake deadline.
struct Io<'a> {
    r: &'a mut BufReader<Stream>,
    w: &'a mut Stream,
    deadline: Option<Instant>,
}

impl Io<'_> {
    fn arm(&self) -> io::Result<()> {
        if let Some(d) = self.deadline {
            let now = Instant::now();
            if now >= d {
                return Err(io::ErrorKind::TimedOut.into());
            }
            self.w.set_read_timeout(Some(d - now))?;
            self.w.set_write_timeout(Some(d - now))?;
        }
        Ok(())
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            // Re-arm before every read so a client trickling bytes cannot stretch the
            // handshake past the deadline.
            self.arm()?;
            match self.r.read(&mut buf[done..]) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.arm()?;
        self.w.write_all(buf)
    }
}

/// Reads one option's data within its declared length.
struct Opt<'a, 'b> {
    io: &'a mut Io<'b>,
    left: u32,
}

impl Opt<'_, '_> {
    /// Fills `buf` if the option has that many bytes left; `Ok(false)` otherwise.
    fn take(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        if (buf.len() as u64) > u64::from(self.left) {
            return Ok(false);
        }
        self.io.read_exact(buf)?;
        self.left -= buf.len() as u32;
        Ok(true)
    }

    fn u16(&mut self) -> io::Result<Option<u16>> {
        let mut b = [0u8; 2];
        Ok(self.take(&mut b)?.then(|| u16::from_be_bytes(b)))
    }

    fn u32(&mut self) -> io::Result<Option<u32>> {
        let mut b = [0u8; 4];
        Ok(self.take(&mut b)?.then(|| u32::from_be_bytes(b)))
    }

    /// Reads a string of `len <= MAX_STRING` bytes.
    fn string(&mut self, len: u32) -> io::Result<Option<Vec<u8>>> {
        debug_assert!(len as usize <= MAX_STRING);
        let mut v = vec![0u8; len as usize];
        Ok(self.take(&mut v)?.then_some(v))
    }

    fn skip(&mut self, mut n: u32) -> io::Result<()> {
        n = n.min(self.left);
        let mut scratch = [0u8; 4096];
        while n > 0 {
            let k = (n as usize).min(scratch.len());
            self.io.read_exact(&mut scratch[..k])?;
            n -= k as u32;
            self.left -= k as u32;
        }
        Ok(())
    }

    fn skip_rest(&mut self) -> io::Result<()> {
        self.skip(self.left)
    }
}

/// Negotiation state between options.
struct State<'s> {
    inner: &'s Inner,
    mode: Mode,
    /// Contexts chosen by the last `NBD_OPT_SET_META_CONTEXT`, with the export they were
    /// chosen for; they only apply if the client then goes to that export.
    meta: Option<(usize, Vec<usize>)>,
}

fn reply(io: &mut Io<'_>, option: u32, typ: u32, data: &[u8]) -> io::Result<()> {
    let mut out = Vec::with_capacity(20 + data.len());
    proto::encode_option_reply(&mut out, option, typ, data);
    io.write_all(&out)
}

/// Skips what is left of the option, then sends an error reply with a message.
fn reply_err(o: &mut Opt<'_, '_>, option: u32, typ: u32, msg: &str) -> io::Result<()> {
    o.skip_rest()?;
    reply(
        o.io,
        option,
        typ,
        proto::truncate_str(msg, MAX_STRING).as_bytes(),
    )
}

/// Runs the handshake on a fresh connection. `Ok(session)` means transmission starts.
pub(crate) fn negotiate(
    inner: &Inner,
    r: &mut BufReader<Stream>,
    w: &mut Stream,
) -> Result<Session, End> {
    let deadline = inner.config.handshake_limit.map(|d| Instant::now() + d);
    let mut io = Io { r, w, deadline };
    io.write_all(&proto::greeting())?;
    let mut cf = [0u8; 4];
    io.read_exact(&mut cf)?;
    let cflags = u32::from_be_bytes(cf);
    if cflags & !client_flags::KNOWN != 0 {
        return Err(End::Fail(format!(
            "Unknown client flags 0x{:x} received",
            cflags & !client_flags::KNOWN
        )));
    }
    let fixed = cflags & client_flags::FIXED_NEWSTYLE != 0;
    let no_zeroes = cflags & client_flags::NO_ZEROES != 0;
    let mut st = State {
        inner,
        mode: Mode::Simple,
        meta: None,
    };
    // With TLS configured, nothing but STARTTLS is served until the session is encrypted.
    let mut tls_pending = inner.config.tls.is_some();
    loop {
        let mut hb = [0u8; OptionHeader::SIZE];
        io.read_exact(&mut hb)?;
        let h = OptionHeader::decode(&hb);
        if h.magic != IHAVEOPT {
            return Err(End::Fail("Bad magic received".into()));
        }
        if h.length > MAX_PAYLOAD {
            return Err(End::Fail(format!(
                "len ({}) is larger than max len ({MAX_PAYLOAD})",
                h.length
            )));
        }
        if inner.shutting_down() {
            let mut o = Opt {
                io: &mut io,
                left: h.length,
            };
            reply_err(
                &mut o,
                h.option,
                rep::ERR_SHUTDOWN,
                "Server is shutting down",
            )?;
            return Err(End::Closed);
        }
        if !fixed && (h.option != opt::EXPORT_NAME || tls_pending) {
            return Err(End::Fail(format!(
                "Unsupported option {} ({})",
                h.option,
                opt::name(h.option)
            )));
        }
        let mut o = Opt {
            io: &mut io,
            left: h.length,
        };
        if tls_pending {
            // Before TLS only STARTTLS is allowed. EXPORT_NAME cannot be answered with an
            // error, so it ends the connection; ABORT gets the error and ends it too.
            match h.option {
                opt::STARTTLS if h.length != 0 => {
                    // A client that cannot start TLS correctly is not given another try.
                    reply_err(
                        &mut o,
                        h.option,
                        rep::ERR_INVALID,
                        "option 'starttls' has unexpected length",
                    )?;
                    return Err(End::Fail("option 'starttls' has unexpected length".into()));
                }
                opt::STARTTLS => {
                    reply(o.io, h.option, rep::ACK, &[])?;
                    start_tls(&mut io, inner)?;
                    tls_pending = false;
                    continue;
                }
                opt::EXPORT_NAME => {
                    return Err(End::Fail(format!(
                        "Option 0x{:x} not permitted before TLS",
                        h.option
                    )));
                }
                other => {
                    let msg = format!("Option 0x{other:x} not permitted before TLS");
                    // The client may hang up right after ABORT; that is fine.
                    let sent = reply_err(&mut o, other, rep::ERR_TLS_REQD, &msg);
                    if other == opt::ABORT {
                        return Err(End::Closed);
                    }
                    sent?;
                    continue;
                }
            }
        }
        match h.option {
            opt::EXPORT_NAME => {
                if h.length as usize > MAX_STRING {
                    return Err(End::Fail("export name too long".into()));
                }
                let name = o.string(h.length)?.unwrap_or_default();
                let idx = match inner.find_export(&name) {
                    Some(i) => i,
                    None => return Err(End::Fail("export not found".into())),
                };
                let contexts = st.selected_for(idx);
                let e = &inner.exports[idx];
                let mut out = Vec::with_capacity(134);
                out.extend_from_slice(&e.size.to_be_bytes());
                let flags = e.tx_flags(&inner.config, st.mode, contexts.len());
                out.extend_from_slice(&flags.to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                io.write_all(&out)?;
                return Ok(Session {
                    export: idx,
                    mode: st.mode,
                    contexts,
                });
            }
            opt::ABORT => {
                o.skip_rest()?;
                // The client may already have closed; that is fine.
                let _ = reply(o.io, h.option, rep::ACK, &[]);
                return Err(End::Closed);
            }
            opt::LIST => {
                if h.length != 0 {
                    reply_err(
                        &mut o,
                        h.option,
                        rep::ERR_INVALID,
                        "option 'list' has unexpected length",
                    )?;
                    continue;
                }
                for e in &inner.exports {
                    let name = e.export.name.as_bytes();
                    let mut d = Vec::with_capacity(4 + name.len());
                    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    d.extend_from_slice(name);
                    if let Some(desc) = &e.export.description {
                        d.extend_from_slice(desc.as_bytes());
                    }
                    reply(o.io, h.option, rep::SERVER, &d)?;
                }
                reply(o.io, h.option, rep::ACK, &[])?;
            }
            opt::STARTTLS => {
                let (typ, msg) = if h.length != 0 {
                    (rep::ERR_INVALID, "option 'starttls' has unexpected length")
                } else if inner.config.tls.is_some() {
                    (rep::ERR_INVALID, "TLS already enabled")
                } else {
                    (rep::ERR_POLICY, "TLS not configured")
                };
                reply_err(&mut o, h.option, typ, msg)?;
            }
            opt::INFO | opt::GO => {
                if let Some(s) = st.info(&mut o, h.option)? {
                    return Ok(s);
                }
            }
            opt::STRUCTURED_REPLY => {
                let (typ, msg) = if h.length != 0 {
                    (
                        rep::ERR_INVALID,
                        "option 'structured reply' has unexpected length",
                    )
                } else if st.mode == Mode::Extended {
                    (
                        rep::ERR_EXT_HEADER_REQD,
                        "extended headers already negotiated",
                    )
                } else if st.mode == Mode::Structured {
                    (rep::ERR_INVALID, "structured reply already negotiated")
                } else {
                    st.mode = Mode::Structured;
                    (rep::ACK, "")
                };
                reply_err(&mut o, h.option, typ, msg)?;
            }
            opt::EXTENDED_HEADERS => {
                let (typ, msg) = if h.length != 0 {
                    (
                        rep::ERR_INVALID,
                        "option 'extended headers' has unexpected length",
                    )
                } else if st.mode == Mode::Extended {
                    (rep::ERR_INVALID, "extended headers already negotiated")
                } else {
                    st.mode = Mode::Extended;
                    (rep::ACK, "")
                };
                reply_err(&mut o, h.option, typ, msg)?;
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => st.meta_context(&mut o, h.option)?,
            other => {
                let msg = format!("Unsupported option {other} ({})", opt::name(other));
                reply_err(&mut o, other, rep::ERR_UNSUP, &msg)?;
            }
        }
    }
}

/// Runs the TLS handshake after the STARTTLS acknowledgement and moves the rest of the
/// negotiation (and then the transmission phase) onto the encrypted stream.
fn start_tls(io: &mut Io<'_>, inner: &Inner) -> Result<(), End> {
    let Some(tls) = &inner.config.tls else {
        return Err(End::Fail("TLS not configured".into()));
    };
    if io.w.is_tls() {
        return Err(End::Fail("TLS already enabled".into()));
    }
    // Bytes the client sent right behind STARTTLS are already in our read buffer: they
    // are the start of its ClientHello and must reach the TLS layer, not be dropped.
    let early = io.r.buffer().to_vec();
    let sock = io.w.try_clone()?;
    let stream = tls.accept(sock, &early, io.deadline).map_err(End::Fail)?;
    let mut reader = Stream::Tls(stream.try_clone()?);
    reader.set_read_deadline(io.deadline);
    *io.r = BufReader::with_capacity(io.r.capacity(), reader);
    *io.w = Stream::Tls(stream);
    Ok(())
}

impl State<'_> {
    fn selected_for(&self, export: usize) -> Vec<(u32, Arc<dyn MetaContext>)> {
        match &self.meta {
            Some((e, sel)) if *e == export => sel
                .iter()
                .map(|&i| self.inner.exports[export].contexts[i].clone())
                .collect(),
            _ => Vec::new(),
        }
    }

    /// `NBD_OPT_INFO` / `NBD_OPT_GO`. Returns a session when GO succeeded.
    fn info(&mut self, o: &mut Opt<'_, '_>, option: u32) -> io::Result<Option<Session>> {
        const INCONSISTENT: &str = "Inconsistent lengths in option info";
        let namelen = match o.u32()? {
            Some(n) => n,
            None => {
                reply_err(o, option, rep::ERR_INVALID, INCONSISTENT)?;
                return Ok(None);
            }
        };
        if namelen as usize > MAX_STRING {
            let msg = format!("Invalid name length: {namelen}");
            reply_err(o, option, rep::ERR_INVALID, &msg)?;
            return Ok(None);
        }
        if u64::from(namelen) + 2 > u64::from(o.left) {
            reply_err(o, option, rep::ERR_INVALID, INCONSISTENT)?;
            return Ok(None);
        }
        let name = o.string(namelen)?.unwrap_or_default();
        let nreq = o.u16()?.unwrap_or(0);
        if u32::from(nreq) * 2 != o.left {
            reply_err(o, option, rep::ERR_INVALID, INCONSISTENT)?;
            return Ok(None);
        }
        let (mut want_name, mut _want_bs) = (false, false);
        for _ in 0..nreq {
            match o.u16()?.unwrap_or(u16::MAX) {
                info::NAME => want_name = true,
                info::BLOCK_SIZE => _want_bs = true,
                _ => {}
            }
        }
        let idx = match self.inner.find_export(&name) {
            Some(i) => i,
            None => {
                let msg = format!("export '{}' not present", String::from_utf8_lossy(&name));
                reply_err(o, option, rep::ERR_UNKNOWN, &msg)?;
                return Ok(None);
            }
        };
        let e = &self.inner.exports[idx];
        if want_name {
            let mut d = info::NAME.to_be_bytes().to_vec();
            d.extend_from_slice(e.export.name.as_bytes());
            reply(o.io, option, rep::INFO, &d)?;
        }
        if let Some(desc) = &e.export.description {
            let mut d = info::DESCRIPTION.to_be_bytes().to_vec();
            d.extend_from_slice(desc.as_bytes());
            reply(o.io, option, rep::INFO, &d)?;
        }
        // Images are byte-addressable through the library, so the minimum is 1 whether
        // or not the client promised to honour block sizes.
        let mut bs = info::BLOCK_SIZE.to_be_bytes().to_vec();
        bs.extend_from_slice(&1u32.to_be_bytes());
        bs.extend_from_slice(&4096u32.to_be_bytes());
        bs.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
        reply(o.io, option, rep::INFO, &bs)?;
        let contexts = self.selected_for(idx);
        let mut ex = info::EXPORT.to_be_bytes().to_vec();
        ex.extend_from_slice(&e.size.to_be_bytes());
        // QEMU advertises BLOCK_STATUS_PAYLOAD in INFO replies whatever was negotiated:
        // contexts may still be set before GO. Its `-L` listing shows the flag.
        let n_contexts = if option == opt::INFO {
            contexts.len().max(1)
        } else {
            contexts.len()
        };
        ex.extend_from_slice(
            &e.tx_flags(&self.inner.config, self.mode, n_contexts)
                .to_be_bytes(),
        );
        reply(o.io, option, rep::INFO, &ex)?;
        reply(o.io, option, rep::ACK, &[])?;
        if option == opt::GO {
            return Ok(Some(Session {
                export: idx,
                mode: self.mode,
                contexts,
            }));
        }
        Ok(None)
    }

    /// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
    fn meta_context(&mut self, o: &mut Opt<'_, '_>, option: u32) -> io::Result<()> {
        let list = option == opt::LIST_META_CONTEXT;
        if !list {
            // Setting replaces the previous selection even when it fails.
            self.meta = None;
            if self.mode == Mode::Simple {
                let msg = format!(
                    "request option '{}' when structured reply is not negotiated",
                    opt::name(option)
                );
                return reply_err(o, option, rep::ERR_INVALID, &msg);
            }
        }
        const BAD: &str = "Invalid meta context request length";
        let namelen = match o.u32()? {
            Some(n) if n as usize <= MAX_STRING && n <= o.left => n,
            Some(n) if n as usize > MAX_STRING => {
                let msg = format!("Invalid name length: {n}");
                return reply_err(o, option, rep::ERR_INVALID, &msg);
            }
            _ => return reply_err(o, option, rep::ERR_INVALID, BAD),
        };
        let name = o.string(namelen)?.unwrap_or_default();
        let nq = match o.u32()? {
            Some(n) => n,
            None => return reply_err(o, option, rep::ERR_INVALID, BAD),
        };
        let idx = match self.inner.find_export(&name) {
            Some(i) => i,
            None => {
                let msg = format!("export '{}' not present", String::from_utf8_lossy(&name));
                return reply_err(o, option, rep::ERR_UNKNOWN, &msg);
            }
        };
        let ctxs = &self.inner.exports[idx].contexts;
        let mut sel = vec![false; ctxs.len()];
        if nq == 0 && list {
            sel.iter_mut().for_each(|s| *s = true);
        }
        for _ in 0..nq {
            let qlen = match o.u32()? {
                Some(n) if n <= o.left => n,
                _ => return reply_err(o, option, rep::ERR_INVALID, BAD),
            };
            if qlen as usize > MAX_STRING {
                // Longer than any context name can be: it cannot match, so ignore it.
                o.skip(qlen)?;
                continue;
            }
            let q = o.string(qlen)?.unwrap_or_default();
            self.inner.exports[idx].match_query(&q, list, &mut sel);
        }
        if o.left != 0 {
            return reply_err(o, option, rep::ERR_INVALID, BAD);
        }
        let mut chosen = Vec::new();
        for (i, (id, ctx)) in ctxs.iter().enumerate() {
            if !sel[i] {
                continue;
            }
            // The id is reserved (and zero) in list replies.
            let id = if list { 0 } else { *id };
            let mut d = id.to_be_bytes().to_vec();
            d.extend_from_slice(ctx.name().as_bytes());
            reply(o.io, option, rep::META_CONTEXT, &d)?;
            chosen.push(i);
        }
        reply(o.io, option, rep::ACK, &[])?;
        if !list {
            self.meta = Some((idx, chosen));
        }
        Ok(())
    }
}
