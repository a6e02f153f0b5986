//! A hostile client on a raw socket: malformed handshakes and requests, oversized
//! lengths and strings, out-of-range offsets, truncated packets and many idle connections.
//! After each, the server must still serve a well-behaved client (nbdinfo, qemu-io).

mod common;
use common::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

const IHAVEOPT: &[u8; 8] = b"IHAVEOPT";

struct Raw {
    s: UnixStream,
}

impl Raw {
    fn connect(sock: &Path) -> Raw {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw { s }
    }

    /// Reads the greeting and sends client flags.
    fn hello(sock: &Path, flags: u32) -> Raw {
        let mut r = Raw::connect(sock);
        let mut g = [0u8; 18];
        r.s.read_exact(&mut g).unwrap();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], IHAVEOPT);
        r.send(&flags.to_be_bytes());
        r
    }

    fn send(&mut self, b: &[u8]) {
        // The server may already have hung up on us; that is what some tests expect.
        let _ = self.s.write_all(b);
    }

    fn opt(&mut self, o: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_vec();
        b.extend_from_slice(&o.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    /// Reads option replies up to the final one; returns (type, data) pairs.
    fn replies(&mut self) -> Vec<(u32, Vec<u8>)> {
        let mut v = Vec::new();
        loop {
            let mut h = [0u8; 20];
            self.s.read_exact(&mut h).unwrap();
            let t = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let l = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
            assert!(l < 1 << 20);
            let mut d = vec![0u8; l];
            self.s.read_exact(&mut d).unwrap();
            v.push((t, d));
            if t == 1 || t & 0x8000_0000 != 0 {
                return v;
            }
        }
    }

    /// True once the server has closed the connection (bounded wait).
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 256];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }

    /// Negotiates structured replies (or extended headers) and a context, then GO.
    fn go(sock: &Path, extended: bool, contexts: &[&str]) -> Raw {
        let mut r = Raw::hello(sock, 3);
        r.opt(if extended { 11 } else { 8 }, &[]);
        assert_eq!(r.replies().last().unwrap().0, 1);
        if !contexts.is_empty() {
            let mut d = 0u32.to_be_bytes().to_vec();
            d.extend_from_slice(&(contexts.len() as u32).to_be_bytes());
            for c in contexts {
                d.extend_from_slice(&(c.len() as u32).to_be_bytes());
                d.extend_from_slice(c.as_bytes());
            }
            r.opt(10, &d);
            assert_eq!(r.replies().len(), contexts.len() + 1);
        }
        r.opt(7, &[0, 0, 0, 0, 0, 0]);
        assert_eq!(r.replies().last().unwrap().0, 1);
        r
    }

    fn req(&mut self, ext: bool, flags: u16, typ: u16, cookie: u64, off: u64, len: u64) {
        let mut b = Vec::new();
        b.extend_from_slice(&(if ext { 0x21e4_1c71u32 } else { 0x2560_9513 }).to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&typ.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&off.to_be_bytes());
        if ext {
            b.extend_from_slice(&len.to_be_bytes());
        } else {
            b.extend_from_slice(&(len as u32).to_be_bytes());
        }
        self.send(&b);
    }

    /// Reads one reply message: (cookie, chunk type or u16::MAX for simple, flags,
    /// error, payload).
    fn reply(&mut self, ext: bool) -> (u64, u16, u16, u32, Vec<u8>) {
        let mut m = [0u8; 4];
        self.s.read_exact(&mut m).unwrap();
        let magic = u32::from_be_bytes(m);
        if magic == 0x6744_6698 {
            let mut h = [0u8; 12];
            self.s.read_exact(&mut h).unwrap();
            let err = u32::from_be_bytes(h[..4].try_into().unwrap());
            let cookie = u64::from_be_bytes(h[4..].try_into().unwrap());
            return (cookie, u16::MAX, 1, err, Vec::new());
        }
        let hl = if ext { 28 } else { 16 };
        assert_eq!(magic, if ext { 0x6e8a_278c } else { 0x668e_33ef });
        let mut h = vec![0u8; hl];
        self.s.read_exact(&mut h).unwrap();
        let flags = u16::from_be_bytes([h[0], h[1]]);
        let typ = u16::from_be_bytes([h[2], h[3]]);
        let cookie = u64::from_be_bytes(h[4..12].try_into().unwrap());
        let len = if ext {
            u64::from_be_bytes(h[20..28].try_into().unwrap()) as usize
        } else {
            u32::from_be_bytes(h[12..16].try_into().unwrap()) as usize
        };
        assert!(len <= 33 << 20);
        let mut p = vec![0u8; len];
        self.s.read_exact(&mut p).unwrap();
        let err = if typ & 0x8000 != 0 {
            u32::from_be_bytes(p[..4].try_into().unwrap())
        } else {
            0
        };
        (cookie, typ, flags, err, p)
    }

    /// Reads chunks until the DONE flag; returns the error (0 for success).
    fn result(&mut self, ext: bool, cookie: u64) -> u32 {
        let mut err = 0;
        loop {
            let (c, _t, f, e, _) = self.reply(ext);
            assert_eq!(c, cookie);
            if e != 0 {
                err = e;
            }
            if f & 1 != 0 {
                return err;
            }
        }
    }
}

fn healthy(srv: &Srv) {
    let size = ok(30, "nbdinfo", &["--size", &srv.uri("")]);
    assert_eq!(size.trim(), (4u64 << 20).to_string());
    let o = ok(
        30,
        "qemu-io",
        &["-f", "raw", "-r", "-c", "read -P 0 3M 4k", &srv.uri("")],
    );
    assert!(!o.contains("failed"), "{o}");
}

#[test]
fn hostile_handshakes() {
    if !have("nbdinfo") || !have("qemu-io") {
        return;
    }
    let d = tempfile::Builder::new().prefix("qnbd").tempdir().unwrap();
    let img = d.path().join("img.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let sock = d.path().join("s");
    let srv = Srv::start(
        qimg_nbd(),
        &sock,
        &[
            "-t",
            "-e",
            "0",
            "-A",
            "--handshake-limit=2",
            "-f",
            "raw",
            img.to_str().unwrap(),
        ],
    );

    // Unknown client flags: hang up.
    let mut r = Raw::hello(&sock, 0xffff_ffff);
    assert!(r.closed());
    // Bad option magic.
    let mut r = Raw::hello(&sock, 3);
    r.send(b"IHAVEOPX\0\0\0\x07\0\0\0\0");
    assert!(r.closed());
    // An option claiming 2 GiB of data: hang up without reading it.
    let mut r = Raw::hello(&sock, 3);
    r.send(
        &[
            IHAVEOPT.as_slice(),
            &7u32.to_be_bytes(),
            &0x7fff_ffffu32.to_be_bytes(),
        ]
        .concat(),
    );
    assert!(r.closed());
    // Without fixed newstyle only EXPORT_NAME is allowed.
    let mut r = Raw::hello(&sock, 0);
    r.opt(8, &[]);
    assert!(r.closed());
    // Unknown option with 1 MiB of junk: skipped and answered; the session continues.
    let mut r = Raw::hello(&sock, 3);
    r.opt(0xdead, &vec![0x5a; 1 << 20]);
    assert_eq!(r.replies()[0].0, 0x8000_0001);
    // GO with absurd name lengths, inconsistent request counts, unknown export.
    r.opt(7, &[0xff, 0xff, 0xff, 0xff, 0, 0]);
    assert_eq!(r.replies()[0].0, 0x8000_0003);
    r.opt(7, &[0, 0, 0, 1, b'x', 0, 9, 0, 1]);
    assert_eq!(r.replies()[0].0, 0x8000_0003);
    r.opt(6, &[0, 0, 0, 1, b'x', 0, 0]);
    assert_eq!(r.replies()[0].0, 0x8000_0006);
    // Meta context: 4 billion queries in 12 bytes, query longer than the option.
    r.opt(8, &[]);
    r.replies();
    r.opt(10, &[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 9]);
    assert_eq!(r.replies()[0].0, 0x8000_0003);
    r.opt(9, &[0, 0, 0, 0, 0, 0, 0, 1, 0x10, 0, 0, 0, b'b']);
    assert_eq!(r.replies()[0].0, 0x8000_0003);
    // A query longer than the string limit is ignored, not allocated.
    let mut q = vec![0, 0, 0, 0, 0, 0, 0, 1];
    q.extend_from_slice(&5000u32.to_be_bytes());
    q.extend(std::iter::repeat_n(b'q', 5000));
    r.opt(9, &q);
    assert_eq!(r.replies(), vec![(1, vec![])]);
    // ABORT is acknowledged and the connection closed.
    r.opt(2, &[]);
    assert_eq!(r.replies()[0].0, 1);
    assert!(r.closed());
    // EXPORT_NAME with a name over the limit, and with an unknown name.
    let mut r = Raw::hello(&sock, 3);
    r.opt(1, &vec![b'n'; 5000]);
    assert!(r.closed());
    let mut r = Raw::hello(&sock, 3);
    r.opt(1, b"nope");
    assert!(r.closed());
    // Truncated option, then vanish.
    let mut r = Raw::hello(&sock, 3);
    r.send(
        &[
            IHAVEOPT.as_slice(),
            &7u32.to_be_bytes(),
            &100u32.to_be_bytes(),
            b"abc",
        ]
        .concat(),
    );
    drop(r);
    // Half a greeting reply, then vanish.
    let mut r = Raw::connect(&sock);
    r.send(&[0, 0]);
    drop(r);
    healthy(&srv);

    // Many idle connections: each is cut at the handshake limit, and meanwhile a
    // well-behaved client is served.
    let t0 = Instant::now();
    let mut idle: Vec<Raw> = (0..64).map(|_| Raw::connect(&sock)).collect();
    healthy(&srv);
    for r in &mut idle {
        assert!(r.closed());
    }
    assert!(t0.elapsed() < Duration::from_secs(9), "{:?}", t0.elapsed());
    healthy(&srv);
}

#[test]
fn hostile_requests() {
    if !have("nbdinfo") || !have("qemu-io") {
        return;
    }
    let d = tempfile::Builder::new().prefix("qnbd").tempdir().unwrap();
    let img = d.path().join("img.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let sock = d.path().join("s");
    let srv = Srv::start(
        qimg_nbd(),
        &sock,
        &["-t", "-e", "0", "-A", "-f", "raw", img.to_str().unwrap()],
    );
    const EINVAL: u32 = 22;
    for ext in [false, true] {
        let mut r = Raw::go(&sock, ext, &[]);
        // Out of range, overflowing, oversized, unknown, bad flags.
        r.req(ext, 0, 0, 1, u64::MAX - 10, 100);
        assert_eq!(r.result(ext, 1), EINVAL);
        r.req(ext, 0, 0, 2, (4 << 20) - 512, 1024);
        assert_eq!(r.result(ext, 2), EINVAL);
        r.req(ext, 0, 0, 3, 0, if ext { 1 << 40 } else { 0xffff_ffff });
        assert_eq!(r.result(ext, 3), EINVAL);
        r.req(ext, 0, 99, 4, 0, 0);
        assert_eq!(r.result(ext, 4), EINVAL);
        r.req(ext, 0x80, 0, 5, 0, 512);
        assert_eq!(r.result(ext, 5), EINVAL);
        // No contexts were negotiated.
        r.req(ext, 0, 7, 6, 0, 512);
        assert_eq!(r.result(ext, 6), EINVAL);
        // Write past the end: the payload is consumed, the stream stays in step.
        r.req(ext, 0, 1, 7, 4 << 20, 512);
        r.send(&[0x77; 512]);
        assert_eq!(r.result(ext, 7), EINVAL);
        // Flush ignores offset and length.
        r.req(ext, 0, 3, 8, u64::MAX, 12345);
        assert_eq!(r.result(ext, 8), 0);
        // Trim/zero beyond the end.
        r.req(ext, 0, 4, 9, 1 << 40, 1);
        assert_eq!(r.result(ext, 9), EINVAL);
        // Many pipelined requests before reading any reply.
        for c in 100..600u64 {
            r.req(ext, 0, 0, c, (c % 64) * 4096, 4096);
        }
        let mut seen = std::collections::HashSet::new();
        while seen.len() < 500 {
            let (c, _, f, e, _) = r.reply(ext);
            assert_eq!(e, 0);
            if f & 1 != 0 {
                assert!(seen.insert(c));
            }
        }
        // A huge write payload: refused, then the server hangs up.
        r.req(ext, 0, 1, 10, 0, if ext { 1 << 33 } else { 0xffff_fff0 });
        assert_eq!(r.result(ext, 10), EINVAL);
        assert!(r.closed());
    }
    // Extended block status with malformed and valid context payloads.
    let mut r = Raw::go(&sock, true, &["base:allocation", "qemu:allocation-depth"]);
    r.req(true, 0x20, 7, 1, 0, 5);
    r.send(&[1, 2, 3, 4, 5]);
    assert_eq!(r.result(true, 1), EINVAL);
    let mut p = (1u64 << 20).to_be_bytes().to_vec();
    p.extend_from_slice(&9u32.to_be_bytes());
    r.req(true, 0x20, 7, 2, 0, p.len() as u64);
    r.send(&p);
    assert_eq!(r.result(true, 2), EINVAL);
    let mut p = (1u64 << 20).to_be_bytes().to_vec();
    p.extend_from_slice(&1u32.to_be_bytes());
    r.req(true, 0x20, 7, 3, 0, p.len() as u64);
    r.send(&p);
    let (c, t, f, e, pl) = r.reply(true);
    assert_eq!((c, t, f, e), (3, 6, 1, 0));
    assert_eq!(u32::from_be_bytes(pl[..4].try_into().unwrap()), 1);
    // Bad request magic ends the connection.
    r.send(&[0u8; 32]);
    assert!(r.closed());
    // Truncated request and payload, then vanish.
    let mut r = Raw::go(&sock, false, &[]);
    r.req(false, 0, 1, 1, 0, 4096);
    r.send(&[1; 100]);
    drop(r);
    // Read-only violations are refused with EPERM on a read-only export.
    let img2 = d.path().join("ro.raw");
    std::fs::File::create(&img2)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let ro = Srv::start(
        qimg_nbd(),
        &d.path().join("ro"),
        &["-t", "-r", "-f", "raw", img2.to_str().unwrap()],
    );
    let mut r = Raw::go(&ro.sock, false, &[]);
    r.req(false, 0, 1, 1, 0, 4);
    r.send(b"evil");
    assert_eq!(r.result(false, 1), 1);
    r.req(false, 0, 6, 2, 0, 4096);
    assert_eq!(r.result(false, 2), 1);
    r.req(false, 0, 4, 3, 0, 4096);
    assert_eq!(r.result(false, 3), 1);
    drop(r);
    assert_eq!(std::fs::read(&img2).unwrap(), vec![0u8; 1 << 20]);
    healthy(&srv);
}
