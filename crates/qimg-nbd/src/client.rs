//! A minimal NBD client for `qemu-nbd -L/--list`: negotiate, list the exports, ask each
//! one for its size, flags, block sizes and metadata contexts, and leave without entering
//! transmission.
//!
//! The server is not trusted: every reply is checked against the option it answers,
//! lengths are bounded before anything is allocated, the total amount kept is capped,
//! and the whole exchange runs against a deadline so a stalled server cannot hang us.

use crate::proto::{self, client_flags, handshake_flags, info, opt, rep, Mode, OptionHeader};
use crate::proto::{IHAVEOPT, MAX_STRING, NBDMAGIC, OPTION_REPLY_MAGIC};
use crate::stream::Stream;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

/// Second magic of an oldstyle server (no options, one export described at once).
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Longest option reply accepted: an `NBD_REP_SERVER` with a maximal name and
/// description, with room to spare.
const MAX_REPLY: u32 = 3 * MAX_STRING as u32;
/// Most bytes of names, descriptions and context names kept for one listing.
const MAX_KEPT: usize = 16 << 20;
/// Most exports or contexts accepted in one listing.
const MAX_ITEMS: usize = 1 << 16;
/// Time the whole listing may take.
const DEADLINE: Duration = Duration::from_secs(60);

/// What the server told us about one export.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export name, as listed.
    pub name: String,
    /// Description from the listing (empty when none).
    pub description: String,
    /// Size in bytes (from `NBD_INFO_EXPORT`).
    pub size: u64,
    /// Transmission flags (0 when the server did not describe the export).
    pub flags: u16,
    /// Minimum, preferred and maximum block size, when the server sent them.
    pub block_sizes: Option<(u32, u32, u32)>,
    /// Metadata contexts the export offers, in the server's order.
    pub contexts: Vec<String>,
}

/// The result of listing a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// Headers the server agreed to (extended headers mean 64-bit transactions).
    pub mode: Mode,
    /// The exports, in the server's order.
    pub exports: Vec<ExportInfo>,
}

/// Socket I/O against the listing deadline.
struct Io {
    s: Stream,
    deadline: Instant,
    /// Bytes kept so far (names, descriptions, contexts).
    kept: usize,
}

fn protocol(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl Io {
    fn arm(&self) -> io::Result<()> {
        let now = Instant::now();
        if now >= self.deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "server did not answer in time",
            ));
        }
        self.s.set_read_timeout(Some(self.deadline - now))?;
        self.s.set_write_timeout(Some(self.deadline - now))
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            // Re-armed before every read so a trickling server cannot pass the deadline.
            self.arm()?;
            match self.s.read(&mut buf[done..]) {
                Ok(0) => return Err(protocol("Unexpected end-of-file before all data were read")),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.arm()?;
        self.s.write_all(buf)
    }

    fn send_option(&mut self, option: u32, data: &[u8]) -> io::Result<()> {
        let h = OptionHeader {
            magic: IHAVEOPT,
            option,
            length: data.len() as u32,
        };
        let mut b = h.encode().to_vec();
        b.extend_from_slice(data);
        self.write_all(&b)
    }

    /// Reads one reply to `option`: its type and payload (bounded by [`MAX_REPLY`]).
    fn reply(&mut self, option: u32) -> io::Result<(u32, Vec<u8>)> {
        let mut h = [0u8; 20];
        self.read_exact(&mut h)?;
        if proto::be64(&h, 0) != OPTION_REPLY_MAGIC {
            return Err(protocol("Unexpected option reply magic"));
        }
        let (o, typ, len) = (proto::be32(&h, 8), proto::be32(&h, 12), proto::be32(&h, 16));
        if o != option {
            return Err(protocol(format!(
                "Unexpected option type {o} ({}), expected {option} ({})",
                opt::name(o),
                opt::name(option)
            )));
        }
        if len > MAX_REPLY {
            return Err(protocol(format!(
                "server's reply of {len} bytes is too long"
            )));
        }
        let mut data = vec![0u8; len as usize];
        self.read_exact(&mut data)?;
        Ok((typ, data))
    }

    /// Accounts for `n` more bytes kept, refusing listings that grow without bound.
    fn keep(&mut self, n: usize) -> io::Result<()> {
        self.kept += n;
        if self.kept > MAX_KEPT {
            return Err(protocol("server's export list is too large"));
        }
        Ok(())
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `name` as option data: a 32-bit length then the bytes.
fn name_data(name: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(8 + name.len());
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d
}

/// Message for an error reply, with the server's text when it sent one.
fn rep_error(typ: u32, option: u32, data: &[u8]) -> io::Error {
    let what = match typ {
        rep::ERR_UNSUP => "Unsupported",
        rep::ERR_POLICY => "Denied by server",
        rep::ERR_INVALID => "Invalid parameters",
        rep::ERR_PLATFORM => "Server lacks support",
        rep::ERR_TLS_REQD => "TLS negotiation required before option",
        rep::ERR_UNKNOWN => "Export unknown",
        rep::ERR_SHUTDOWN => "Server shutting down",
        rep::ERR_BLOCK_SIZE_REQD => "Server requires INFO_BLOCK_SIZE",
        _ => "Unknown error",
    };
    let mut m = format!("{what} for option {option} ({})", opt::name(option));
    if !data.is_empty() {
        m.push_str(&format!(": {}", text(&data[..data.len().min(MAX_STRING)])));
    }
    protocol(m)
}

/// Lists the exports of the server at the other end of `s`.
pub fn list(s: Stream) -> io::Result<Listing> {
    let mut io = Io {
        s,
        deadline: Instant::now() + DEADLINE,
        kept: 0,
    };
    let mut g = [0u8; 18];
    io.read_exact(&mut g)?;
    if proto::be64(&g, 0) != NBDMAGIC {
        return Err(protocol("Bad initial magic received"));
    }
    let magic = proto::be64(&g, 8);
    if magic == OLDSTYLE_MAGIC {
        // An oldstyle server has one nameless export and describes it at once: size,
        // 32-bit flags (the upper half must be clear), then 124 reserved bytes.
        let mut rest = [0u8; 8 + 4 + 124 - 2];
        io.read_exact(&mut rest)?;
        let mut b = [0u8; 12];
        b[..2].copy_from_slice(&g[16..]);
        b[2..].copy_from_slice(&rest[..10]);
        let flags = proto::be32(&b, 8);
        if flags > u32::from(u16::MAX) {
            return Err(protocol(format!("Unexpected export flags {flags:#x}")));
        }
        let _ = io.s.shutdown(std::net::Shutdown::Both);
        return Ok(Listing {
            mode: Mode::Simple,
            exports: vec![ExportInfo {
                size: proto::be64(&b, 0),
                flags: flags as u16,
                ..ExportInfo::default()
            }],
        });
    }
    if magic != IHAVEOPT {
        return Err(protocol(format!("Bad server magic received: {magic:#x}")));
    }
    let sflags = proto::be16(&g, 16);
    if sflags & handshake_flags::FIXED_NEWSTYLE == 0 {
        return Err(protocol("Server does not support export lists"));
    }
    let mut cflags = client_flags::FIXED_NEWSTYLE;
    if sflags & handshake_flags::NO_ZEROES != 0 {
        cflags |= client_flags::NO_ZEROES;
    }
    io.write_all(&cflags.to_be_bytes())?;

    // The richest headers the server speaks: extended, else structured, else simple.
    let mut mode = Mode::Simple;
    for (option, m) in [
        (opt::EXTENDED_HEADERS, Mode::Extended),
        (opt::STRUCTURED_REPLY, Mode::Structured),
    ] {
        io.send_option(option, &[])?;
        let (typ, _) = io.reply(option)?;
        if typ == rep::ACK {
            mode = m;
            break;
        }
    }

    let mut exports = Vec::new();
    io.send_option(opt::LIST, &[])?;
    loop {
        let (typ, d) = io.reply(opt::LIST)?;
        match typ {
            rep::ACK => break,
            rep::SERVER => {
                if d.len() < 4 {
                    return Err(protocol("incorrect option length"));
                }
                let n = proto::be32(&d, 0) as usize;
                if n > d.len() - 4 || n > MAX_STRING {
                    return Err(protocol("incorrect option name length"));
                }
                if exports.len() >= MAX_ITEMS {
                    return Err(protocol("server's export list is too large"));
                }
                io.keep(d.len())?;
                exports.push(ExportInfo {
                    name: text(&d[4..4 + n]),
                    description: text(&d[4 + n..]),
                    ..ExportInfo::default()
                });
            }
            // A server without listing has just the default export.
            rep::ERR_UNSUP if exports.is_empty() => {
                exports.push(ExportInfo::default());
                break;
            }
            t if t & rep::ERR_BIT != 0 => return Err(rep_error(t, opt::LIST, &d)),
            t => {
                return Err(protocol(format!(
                    "Unexpected reply type {t} for option list"
                )))
            }
        }
    }

    for e in &mut exports {
        describe(&mut io, e, mode)?;
    }
    // Leave politely; whatever the server answers no longer matters.
    let _ = io.send_option(opt::ABORT, &[]);
    let _ = io.s.shutdown(std::net::Shutdown::Both);
    Ok(Listing { mode, exports })
}

/// Fills in size, flags, block sizes and contexts of one export.
fn describe(io: &mut Io, e: &mut ExportInfo, mode: Mode) -> io::Result<()> {
    let mut d = name_data(&e.name);
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    io.send_option(opt::INFO, &d)?;
    loop {
        let (typ, d) = io.reply(opt::INFO)?;
        match typ {
            rep::ACK => break,
            rep::INFO if d.len() >= 2 => match (proto::be16(&d, 0), d.len()) {
                (info::EXPORT, 12) => {
                    e.size = proto::be64(&d, 2);
                    e.flags = proto::be16(&d, 10);
                }
                (info::BLOCK_SIZE, 14) => {
                    e.block_sizes =
                        Some((proto::be32(&d, 2), proto::be32(&d, 6), proto::be32(&d, 10)));
                }
                // Names, descriptions and unknown items are not shown.
                _ => {}
            },
            rep::INFO => return Err(protocol("incorrect option length")),
            // The export went away between the listing and now: show what we have.
            t if t & rep::ERR_BIT != 0 => return Ok(()),
            t => {
                return Err(protocol(format!(
                    "Unexpected reply type {t} for option info"
                )))
            }
        }
    }
    if mode < Mode::Structured {
        return Ok(());
    }
    let mut d = name_data(&e.name);
    d.extend_from_slice(&0u32.to_be_bytes());
    io.send_option(opt::LIST_META_CONTEXT, &d)?;
    loop {
        let (typ, d) = io.reply(opt::LIST_META_CONTEXT)?;
        match typ {
            rep::ACK => break,
            rep::META_CONTEXT if d.len() >= 4 && d.len() - 4 <= MAX_STRING => {
                if e.contexts.len() >= MAX_ITEMS {
                    return Err(protocol("server's context list is too large"));
                }
                io.keep(d.len())?;
                e.contexts.push(text(&d[4..]));
            }
            rep::META_CONTEXT => return Err(protocol("incorrect option length")),
            t if t & rep::ERR_BIT != 0 => return Ok(()),
            t => {
                return Err(protocol(format!(
                    "Unexpected reply type {t} for option list meta context"
                )))
            }
        }
    }
    Ok(())
}

/// Names of the transmission flags, by bit, as qemu-nbd's listing prints them.
const FLAG_NAMES: [&str; 13] = [
    "",
    "readonly",
    "flush",
    "fua",
    "rotational",
    "trim",
    "zeroes",
    "df",
    "multi",
    "resize",
    "cache",
    "fast-zero",
    "block-status-payload",
];

/// The listing in qemu-nbd's `-L` format.
pub fn format_listing(l: &Listing) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "exports available: {}", l.exports.len());
    for e in &l.exports {
        let _ = writeln!(s, " export: '{}'", e.name);
        if !e.description.is_empty() {
            let _ = writeln!(s, "  description: {}", e.description);
        }
        if e.flags & proto::tx_flags::HAS_FLAGS != 0 {
            let _ = writeln!(s, "  size:  {}", e.size);
            let _ = write!(s, "  flags: 0x{:x} (", e.flags);
            for (bit, name) in FLAG_NAMES.iter().enumerate() {
                if !name.is_empty() && e.flags & (1 << bit) != 0 {
                    let _ = write!(s, " {name}");
                }
            }
            s.push_str(" )\n");
        }
        if let Some((min, opt, max)) = e.block_sizes.filter(|b| b.0 != 0) {
            let _ = writeln!(s, "  min block: {min}");
            let _ = writeln!(s, "  opt block: {opt}");
            let _ = writeln!(s, "  max block: {max}");
        }
        let bits = if l.mode == Mode::Extended { 64 } else { 32 };
        let _ = writeln!(s, "  transaction size: {bits}-bit");
        if !e.contexts.is_empty() {
            let _ = writeln!(s, "  available meta contexts: {}", e.contexts.len());
            for c in &e.contexts {
                let _ = writeln!(s, "   {c}");
            }
        }
    }
    s
}

/// `-L`: connects to a unix socket (`socket`) or to `host:port`, prints the listing and
/// returns the exit status; errors are printed with `prog` in front.
pub fn main_list(prog: &str, socket: Option<&str>, host: &str, port: &str) -> i32 {
    let (stream, addr) = match socket {
        Some(p) => (
            std::os::unix::net::UnixStream::connect(p).map(Stream::Unix),
            p.to_string(),
        ),
        None => {
            let addr = format!("{host}:{port}");
            let h = host.trim_start_matches('[').trim_end_matches(']');
            let s = match port.parse::<u16>() {
                Ok(p) => std::net::TcpStream::connect((h, p)).map(Stream::Tcp),
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "Servname not supported for ai_socktype",
                )),
            };
            (s, addr)
        }
    };
    let stream = match stream {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{prog}: Failed to connect to '{addr}': {}", strip_os(&e));
            return 1;
        }
    };
    stream.set_nodelay();
    match list(stream) {
        Ok(l) => {
            print!("{}", format_listing(&l));
            0
        }
        Err(e) => {
            eprintln!("{prog}: {}", strip_os(&e));
            1
        }
    }
}

/// An I/O error as QEMU words it (`strerror` text without Rust's "(os error N)").
fn strip_os(e: &io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) if s.ends_with(')') => s[..i].to_string(),
        _ => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_matches_qemu_nbd_layout() {
        let l = Listing {
            mode: Mode::Extended,
            exports: vec![ExportInfo {
                name: "exp1".into(),
                description: "a desc".into(),
                size: 1048576,
                flags: 0x1ded,
                block_sizes: Some((1, 4096, 33554432)),
                contexts: vec!["base:allocation".into()],
            }],
        };
        assert_eq!(
            format_listing(&l),
            "exports available: 1\n export: 'exp1'\n  description: a desc\n  size:  1048576\n  \
             flags: 0x1ded ( flush fua trim zeroes df multi cache fast-zero block-status-payload )\n  \
             min block: 1\n  opt block: 4096\n  max block: 33554432\n  transaction size: 64-bit\n  \
             available meta contexts: 1\n   base:allocation\n"
        );
    }
}
