//! NBD protocol constants and wire types, as defined by the NBD protocol specification
//! (`doc/proto.md` of the NetworkBlockDevice project, including the extended-headers
//! extension).
//!
//! This module only encodes and decodes; it does no I/O, so it can be unit-tested and
//! reused by other front ends. All integers on the wire are big-endian.

/// `NBDMAGIC`: first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second server magic in newstyle negotiation, and the magic of every option
/// the client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply the server sends.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Compact request magic (`NBD_REQUEST_MAGIC`).
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Extended request magic (`NBD_EXTENDED_REQUEST_MAGIC`).
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Simple reply magic (`NBD_SIMPLE_REPLY_MAGIC`).
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Structured reply chunk magic (`NBD_STRUCTURED_REPLY_MAGIC`).
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Extended reply chunk magic (`NBD_EXTENDED_REPLY_MAGIC`).
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Longest string (export name, description, context name, error message) on the wire.
pub const MAX_STRING: usize = 4096;
/// Largest payload accepted or sent in one message (QEMU's `NBD_MAX_BUFFER_SIZE`), and
/// the largest option length before the server gives up on the client.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Handshake flags (server, 16 bits).
pub mod handshake_flags {
    /// The server speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// The server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (32 bits), sent in reply to the handshake flags.
pub mod client_flags {
    /// The client speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    /// The client does not want the 124 zero bytes.
    pub const NO_ZEROES: u32 = 1 << 1;
    /// Every flag this server understands.
    pub const KNOWN: u32 = FIXED_NEWSTYLE | NO_ZEROES;
}

/// Transmission flags (16 bits), describing what the export supports.
pub mod tx_flags {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// The export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_CMD_FLUSH` is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_FUA` is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// Rotational medium (never set by QEMU or by us).
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `NBD_CMD_TRIM` is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_CMD_WRITE_ZEROES` (and `NO_HOLE`) is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_CMD_FLAG_DF` is supported (only with structured replies).
    pub const SEND_DF: u16 = 1 << 7;
    /// Several connections see one coherent cache.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_CMD_RESIZE` (experimental; never set).
    pub const SEND_RESIZE: u16 = 1 << 9;
    /// `NBD_CMD_CACHE` is supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `NBD_CMD_FLAG_FAST_ZERO` is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
    /// `NBD_CMD_BLOCK_STATUS` accepts a payload selecting contexts (extended headers).
    pub const BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;
}

/// Option types (`NBD_OPT_*`).
pub mod opt {
    /// Choose an export and enter transmission (no error reporting possible).
    pub const EXPORT_NAME: u32 = 1;
    /// End negotiation.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// Withdrawn `PEEK_EXPORT`.
    pub const PEEK_EXPORT: u32 = 4;
    /// Upgrade to TLS.
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe an export and enter transmission.
    pub const GO: u32 = 7;
    /// Use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
    /// Use 32-byte extended request and reply headers.
    pub const EXTENDED_HEADERS: u32 = 11;

    /// The name QEMU uses for an option in messages (unknown options are `<unknown>`).
    pub fn name(o: u32) -> &'static str {
        match o {
            EXPORT_NAME => "export name",
            ABORT => "abort",
            LIST => "list",
            STARTTLS => "starttls",
            INFO => "info",
            GO => "go",
            STRUCTURED_REPLY => "structured reply",
            LIST_META_CONTEXT => "list meta context",
            SET_META_CONTEXT => "set meta context",
            EXTENDED_HEADERS => "extended headers",
            _ => "<unknown>",
        }
    }
}

/// Option reply types (`NBD_REP_*`).
pub mod rep {
    /// Success, end of a reply list.
    pub const ACK: u32 = 1;
    /// One export in reply to `NBD_OPT_LIST`.
    pub const SERVER: u32 = 2;
    /// One information item for `NBD_OPT_INFO`/`NBD_OPT_GO`.
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    /// Bit set in every error reply.
    pub const ERR_BIT: u32 = 1 << 31;
    /// Unknown option.
    pub const ERR_UNSUP: u32 = ERR_BIT + 1;
    /// Forbidden by policy.
    pub const ERR_POLICY: u32 = ERR_BIT + 2;
    /// Syntactically or semantically invalid.
    pub const ERR_INVALID: u32 = ERR_BIT + 3;
    /// Not supported on this platform.
    pub const ERR_PLATFORM: u32 = ERR_BIT + 4;
    /// TLS required first.
    pub const ERR_TLS_REQD: u32 = ERR_BIT + 5;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = ERR_BIT + 6;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR_BIT + 7;
    /// The client must ask for block sizes first.
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR_BIT + 8;
    /// Request or reply too large.
    pub const ERR_TOO_BIG: u32 = ERR_BIT + 9;
    /// Extended headers are required (or already in use).
    pub const ERR_EXT_HEADER_REQD: u32 = ERR_BIT + 10;
}

/// Information types in `NBD_REP_INFO` (`NBD_INFO_*`).
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Canonical export name.
    pub const NAME: u16 = 1;
    /// Human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Commands (`NBD_CMD_*`).
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write (with payload).
    pub const WRITE: u16 = 1;
    /// Disconnect (no reply).
    pub const DISC: u16 = 2;
    /// Flush to stable storage.
    pub const FLUSH: u16 = 3;
    /// Discard.
    pub const TRIM: u16 = 4;
    /// Prefetch.
    pub const CACHE: u16 = 5;
    /// Write zeroes without payload.
    pub const WRITE_ZEROES: u16 = 6;
    /// Query metadata contexts.
    pub const BLOCK_STATUS: u16 = 7;
    /// Experimental resize (unsupported).
    pub const RESIZE: u16 = 8;

    /// The name QEMU uses for a command in messages.
    pub fn name(c: u16) -> &'static str {
        match c {
            READ => "read",
            WRITE => "write",
            DISC => "disconnect",
            FLUSH => "flush",
            TRIM => "trim",
            CACHE => "cache",
            WRITE_ZEROES => "write zeroes",
            BLOCK_STATUS => "block status",
            RESIZE => "resize",
            _ => "<unknown>",
        }
    }
}

/// Command flags (`NBD_CMD_FLAG_*`).
pub mod cmd_flags {
    /// Force unit access: persist before replying.
    pub const FUA: u16 = 1 << 0;
    /// Write zeroes: do not create holes.
    pub const NO_HOLE: u16 = 1 << 1;
    /// Read: do not fragment the reply.
    pub const DF: u16 = 1 << 2;
    /// Block status: one extent per context.
    pub const REQ_ONE: u16 = 1 << 3;
    /// Write zeroes: fail fast unless cheap.
    pub const FAST_ZERO: u16 = 1 << 4;
    /// Extended headers: the length field is a payload length.
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Reply chunk flags.
pub mod reply_flags {
    /// Last chunk of a reply.
    pub const DONE: u16 = 1 << 0;
}

/// Structured/extended reply chunk types (`NBD_REPLY_TYPE_*`).
pub mod reply_type {
    /// No payload; final chunk.
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// A range reading as zeros.
    pub const OFFSET_HOLE: u16 = 2;
    /// Compact block-status descriptors (32-bit lengths).
    pub const BLOCK_STATUS: u16 = 5;
    /// Extended block-status descriptors (64-bit lengths).
    pub const BLOCK_STATUS_EXT: u16 = 6;
    /// Error for the whole request.
    pub const ERROR: u16 = (1 << 15) + 1;
    /// Error at an offset.
    pub const ERROR_OFFSET: u16 = (1 << 15) + 2;
}

/// Error values on the wire (`NBD_E*`); only these may be sent.
pub mod errno {
    /// Operation not permitted.
    pub const EPERM: u32 = 1;
    /// Input/output error.
    pub const EIO: u32 = 5;
    /// Cannot allocate memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space left on device.
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Operation not supported.
    pub const ENOTSUP: u32 = 95;
    /// Server shutting down.
    pub const ESHUTDOWN: u32 = 108;

    /// Maps a host errno to the closest value the protocol allows.
    pub fn from_host(e: i32) -> u32 {
        match e {
            libc::EPERM | libc::EROFS | libc::EACCES => EPERM,
            libc::ENOMEM => ENOMEM,
            libc::EINVAL => EINVAL,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ENOSPC,
            libc::EOVERFLOW => EOVERFLOW,
            libc::ENOTSUP => ENOTSUP,
            libc::ESHUTDOWN => ESHUTDOWN,
            // Everything else is a failure of the storage below, which the client can only
            // treat as an I/O error.
            _ => EIO,
        }
    }
}

/// Metadata context status flags.
pub mod state {
    /// `base:allocation`: not allocated.
    pub const HOLE: u32 = 1 << 0;
    /// `base:allocation`: reads as zeros.
    pub const ZERO: u32 = 1 << 1;
    /// `qemu:dirty-bitmap:*`: dirty.
    pub const DIRTY: u32 = 1 << 0;
}

/// Reads a big-endian u16 at `at`.
pub fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Reads a big-endian u32 at `at`.
pub fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Reads a big-endian u64 at `at`.
pub fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// The initial server greeting of fixed newstyle negotiation (18 bytes).
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    let f = handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES;
    b[16..].copy_from_slice(&f.to_be_bytes());
    b
}

/// An option header sent by the client (16 bytes after the magic check).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// `IHAVEOPT` if the client is well-behaved.
    pub magic: u64,
    /// Option type.
    pub option: u32,
    /// Length of the option data that follows.
    pub length: u32,
}

impl OptionHeader {
    /// Size on the wire.
    pub const SIZE: usize = 16;

    /// Decodes the header.
    pub fn decode(b: &[u8; 16]) -> OptionHeader {
        OptionHeader {
            magic: be64(b, 0),
            option: be32(b, 8),
            length: be32(b, 12),
        }
    }

    /// Encodes the header (for tests and clients).
    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.magic.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// Appends an option reply header and its data to `out`.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    // Every reply we build is bounded far below 4 GiB (strings <= 4096, fixed info items).
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Which headers the transmission phase uses, as negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    /// Compact requests, simple replies only.
    Simple,
    /// Compact requests, structured replies allowed.
    Structured,
    /// Extended requests and extended reply chunks only.
    Extended,
}

impl Mode {
    /// Size of one request header in this mode.
    pub fn request_size(self) -> usize {
        match self {
            Mode::Extended => 32,
            _ => 28,
        }
    }
}

/// A request header, compact or extended, decoded into one shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub typ: u16,
    /// Client's cookie (handle), echoed in replies.
    pub cookie: u64,
    /// Offset in the export.
    pub offset: u64,
    /// Effect length, or payload length when `PAYLOAD_LEN` is set (or the command is a
    /// compact `WRITE`).
    pub length: u64,
}

/// A request header whose magic was wrong: the stream is no longer trustworthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadMagic(pub u32);

impl Request {
    /// Decodes a header of `mode.request_size()` bytes.
    pub fn decode(mode: Mode, b: &[u8]) -> Result<Request, BadMagic> {
        let magic = be32(b, 0);
        let want = if mode == Mode::Extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        };
        if magic != want {
            return Err(BadMagic(magic));
        }
        let length = if mode == Mode::Extended {
            be64(b, 24)
        } else {
            u64::from(be32(b, 24))
        };
        Ok(Request {
            flags: be16(b, 4),
            typ: be16(b, 6),
            cookie: be64(b, 8),
            offset: be64(b, 16),
            length,
        })
    }

    /// Encodes the header in `mode` (for tests and clients).
    pub fn encode(&self, mode: Mode) -> Vec<u8> {
        let mut b = Vec::with_capacity(32);
        let magic = if mode == Mode::Extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        };
        b.extend_from_slice(&magic.to_be_bytes());
        b.extend_from_slice(&self.flags.to_be_bytes());
        b.extend_from_slice(&self.typ.to_be_bytes());
        b.extend_from_slice(&self.cookie.to_be_bytes());
        b.extend_from_slice(&self.offset.to_be_bytes());
        if mode == Mode::Extended {
            b.extend_from_slice(&self.length.to_be_bytes());
        } else {
            b.extend_from_slice(&(self.length as u32).to_be_bytes());
        }
        b
    }
}

/// Appends a simple reply header (16 bytes).
pub fn encode_simple_reply(out: &mut Vec<u8>, error: u32, cookie: u64) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Appends a structured (20 bytes) or extended (32 bytes) chunk header, depending on `mode`.
/// `offset` is the request's offset (only carried by extended headers).
pub fn encode_chunk_header(
    out: &mut Vec<u8>,
    mode: Mode,
    flags: u16,
    typ: u16,
    cookie: u64,
    offset: u64,
    payload_len: u64,
) {
    if mode == Mode::Extended {
        out.extend_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&typ.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&payload_len.to_be_bytes());
    } else {
        out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&typ.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        // Structured chunk payloads are bounded by MAX_PAYLOAD plus small headers.
        out.extend_from_slice(&(payload_len as u32).to_be_bytes());
    }
}

/// Appends the payload of an `NBD_REPLY_TYPE_ERROR` chunk (message truncated to the
/// string limit).
pub fn encode_error_payload(out: &mut Vec<u8>, error: u32, msg: &str) {
    let m = truncate_str(msg, MAX_STRING);
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(m.len() as u16).to_be_bytes());
    out.extend_from_slice(m.as_bytes());
}

/// The longest prefix of `s` that is at most `max` bytes and ends on a char boundary.
pub fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magics_spell_their_names() {
        assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    }

    #[test]
    fn request_roundtrip_both_modes() {
        let r = Request {
            flags: 3,
            typ: cmd::WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            length: 4096,
        };
        for mode in [Mode::Structured, Mode::Extended] {
            let b = r.encode(mode);
            assert_eq!(b.len(), mode.request_size());
            assert_eq!(Request::decode(mode, &b), Ok(r));
        }
        let b = r.encode(Mode::Structured);
        assert_eq!(
            Request::decode(Mode::Extended, &[b.as_slice(), &[0; 4]].concat()),
            Err(BadMagic(REQUEST_MAGIC))
        );
    }

    #[test]
    fn chunk_header_sizes() {
        let mut v = Vec::new();
        encode_chunk_header(&mut v, Mode::Structured, 1, 0, 7, 9, 0);
        assert_eq!(v.len(), 20);
        v.clear();
        encode_chunk_header(&mut v, Mode::Extended, 1, 0, 7, 9, 0);
        assert_eq!(v.len(), 32);
        assert_eq!(be64(&v, 16), 9);
    }

    #[test]
    fn truncation_respects_utf8() {
        let s = "é".repeat(3000);
        let t = truncate_str(&s, MAX_STRING);
        assert!(t.len() <= MAX_STRING && t.len().is_multiple_of(2));
    }

    #[test]
    fn errno_mapping_stays_in_protocol_set() {
        for e in 0..200 {
            let v = errno::from_host(e);
            assert!([1, 5, 12, 22, 28, 75, 95, 108].contains(&v), "{e} -> {v}");
        }
    }
}
