//! TLS for the NBD server (`NBD_OPT_STARTTLS`), built on rustls with the `ring` provider.
//!
//! Credentials come from a directory laid out as QEMU's `tls-creds-x509` object expects
//! (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`), and the error messages for a bad
//! directory are QEMU's, so a `qemu-nbd` command line behaves the same.
//!
//! A TLS session is one state machine for both directions, but the connection code reads
//! requests and writes replies from different threads at the same time. [`TlsStream`]
//! therefore keeps the rustls state behind a mutex that is only held while records are
//! decrypted or encrypted, never across a blocking socket call: a reader waiting for the
//! client's next request must not stop a worker from sending a reply (the client may
//! itself be waiting for that reply before it sends more).

use crate::stream::Stream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConnection};
use std::io::{self, IoSlice, Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// Largest credential file read (certificates and keys are a few KiB; this only stops a
/// misdirected path such as a device from being read without end).
const MAX_CRED_FILE: u64 = 16 << 20;
/// Ciphertext read from the socket at a time: one maximal TLS record and its overhead.
const READ_CHUNK: usize = 16 * 1024 + 2048;
/// Plaintext encrypted per socket write. Bigger means fewer system calls for large read
/// replies; it bounds the per-connection output buffer.
const WRITE_LIMIT: usize = 256 * 1024;

/// Server-side TLS settings: a rustls configuration and, optionally, the client identity
/// allowed in (QEMU's `authz-simple`).
#[derive(Debug, Clone)]
pub struct TlsConfig {
    config: Arc<rustls::ServerConfig>,
    /// Distinguished name a client certificate must carry, in the form QEMU prints
    /// (`C=GB,O=Example,CN=client`). Only checked when client certificates are verified,
    /// as in QEMU, where `tls-authz` has no effect with `verify-peer=off`.
    authz: Option<String>,
    verify_peer: bool,
}

/// Why a credential directory could not be used; the message is QEMU's wording.
#[derive(Debug)]
pub struct TlsError(pub String);

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsError {}

/// Rust's `io::Error` text without the " (os error N)" suffix, as `strerror` prints it.
fn os_msg(e: &io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) if s.ends_with(')') => s[..i].to_string(),
        _ => s,
    }
}

fn read_cred(path: &Path) -> Result<Vec<u8>, TlsError> {
    let access = |e: io::Error| {
        TlsError(format!(
            "Unable to access credentials {}: {}",
            path.display(),
            os_msg(&e)
        ))
    };
    let f = std::fs::File::open(path).map_err(access)?;
    let mut data = Vec::new();
    f.take(MAX_CRED_FILE)
        .read_to_end(&mut data)
        .map_err(access)?;
    Ok(data)
}

impl TlsConfig {
    /// Loads `ca-cert.pem`, `server-cert.pem` and `server-key.pem` from `dir` (QEMU's
    /// names; a `dh-params.pem` there is ignored: rustls only offers ECDHE key exchange).
    /// With `verify_peer`, clients must present a certificate signed by one of the CAs in
    /// `ca-cert.pem`; without it they are not asked for one.
    pub fn from_dir(dir: &Path, verify_peer: bool) -> Result<TlsConfig, TlsError> {
        let ca_path = dir.join("ca-cert.pem");
        let cert_path = dir.join("server-cert.pem");
        let key_path = dir.join("server-key.pem");
        // QEMU checks that all three files exist before parsing any of them.
        let ca = read_cred(&ca_path)?;
        let cert = read_cred(&cert_path)?;
        let key = read_cred(&key_path)?;

        let bad_ca = || {
            TlsError(format!(
                "Unable to import CA certificate list {}",
                ca_path.display()
            ))
        };
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&ca) {
            roots.add(c.map_err(|_| bad_ca())?).map_err(|_| bad_ca())?;
        }
        if roots.is_empty() {
            return Err(bad_ca());
        }

        let mut chain = Vec::new();
        for c in CertificateDer::pem_slice_iter(&cert) {
            chain.push(c.map_err(|e| {
                TlsError(format!(
                    "Unable to import server certificate {}: {e}",
                    cert_path.display()
                ))
            })?);
        }
        if chain.is_empty() {
            return Err(TlsError(format!(
                "Unable to import server certificate {}: no certificate found",
                cert_path.display()
            )));
        }
        let pair_err = |why: String| {
            TlsError(format!(
                "Cannot load certificate '{}' & key '{}': {why}",
                cert_path.display(),
                key_path.display()
            ))
        };
        let key = PrivateKeyDer::from_pem_slice(&key).map_err(|e| pair_err(e.to_string()))?;

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(e.to_string()))?;
        let builder = if verify_peer {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder.with_single_cert(chain, key).map_err(|e| {
            pair_err(match e {
                rustls::Error::InconsistentKeys(_) => {
                    "The certificate and the given key do not match.".to_string()
                }
                other => other.to_string(),
            })
        })?;
        Ok(TlsConfig {
            config: Arc::new(config),
            authz: None,
            verify_peer,
        })
    }

    /// Uses a rustls configuration built by the caller (a library user with its own
    /// certificate handling). `verify_peer` says whether it verifies client certificates,
    /// which decides whether [`TlsConfig::with_authz`] applies.
    pub fn from_rustls(config: Arc<rustls::ServerConfig>, verify_peer: bool) -> TlsConfig {
        TlsConfig {
            config,
            authz: None,
            verify_peer,
        }
    }

    /// Only lets in clients whose certificate subject is `identity`, written as QEMU prints
    /// distinguished names: attributes in certificate order, comma-separated, e.g.
    /// `C=GB,O=Example,CN=client`. Like QEMU, this only applies with peer verification.
    pub fn with_authz(mut self, identity: impl Into<String>) -> TlsConfig {
        self.authz = Some(identity.into());
        self
    }

    /// Runs the server side of a TLS handshake on `sock`, which must be a plain socket.
    /// `early` is ciphertext the client already sent and the caller already read (a
    /// client may pipeline its ClientHello right behind `NBD_OPT_STARTTLS`). Every socket
    /// operation is bounded by `deadline`.
    pub(crate) fn accept(
        &self,
        sock: Stream,
        early: &[u8],
        deadline: Option<Instant>,
    ) -> Result<TlsStream, String> {
        let mut conn = ServerConnection::new(self.config.clone()).map_err(|e| e.to_string())?;
        conn.set_buffer_limit(Some(WRITE_LIMIT));
        let mut early = early;
        let mut sock = sock;
        let arm = |s: &Stream| -> Result<(), String> {
            if let Some(d) = deadline {
                let now = Instant::now();
                if now >= d {
                    return Err("TLS handshake timed out".into());
                }
                s.set_read_timeout(Some(d - now))
                    .and_then(|_| s.set_write_timeout(Some(d - now)))
                    .map_err(|e| os_msg(&e))?;
            }
            Ok(())
        };
        let fail = |conn: &mut ServerConnection, sock: &mut Stream, e: rustls::Error| {
            // Tell the client why (an alert is queued), as far as the socket lets us.
            let _ = conn.write_tls(sock);
            format!("TLS handshake failed: {e}")
        };
        while conn.is_handshaking() {
            while conn.wants_write() {
                arm(&sock)?;
                conn.write_tls(&mut sock).map_err(|e| os_msg(&e))?;
            }
            if !conn.is_handshaking() {
                break;
            }
            if !conn.wants_read() {
                return Err("TLS handshake stalled".into());
            }
            let n = if !early.is_empty() {
                conn.read_tls(&mut early).map_err(|e| os_msg(&e))?
            } else {
                arm(&sock)?;
                match conn.read_tls(&mut sock) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(format!("TLS handshake failed: {}", os_msg(&e))),
                }
            };
            if n == 0 {
                return Err("TLS handshake failed: client closed the connection".into());
            }
            if let Err(e) = conn.process_new_packets() {
                return Err(fail(&mut conn, &mut sock, e));
            }
        }
        // Session tickets and the like queued at the end of the handshake.
        while conn.wants_write() {
            arm(&sock)?;
            conn.write_tls(&mut sock).map_err(|e| os_msg(&e))?;
        }
        if self.verify_peer {
            if let Some(want) = &self.authz {
                let dn = conn
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| subject_dn(c.as_ref()))
                    .unwrap_or_default();
                if &dn != want {
                    return Err(format!("TLS x509 authz check for {dn} is denied"));
                }
            }
        }
        // Ciphertext that arrived with the last handshake flight stays inside rustls
        // (read_tls buffers it), so nothing read so far is lost.
        let rest = early.to_vec();
        Ok(TlsStream {
            sock: Box::new(sock),
            conn: Arc::new(Mutex::new(conn)),
            rend: rest.len(),
            rbuf: rest,
            rpos: 0,
            wbuf: Vec::new(),
            deadline: None,
        })
    }
}

/// One handle on a TLS connection over a TCP or unix socket. Handles made by
/// [`TlsStream::try_clone`] share the session; each has its own buffers, so one handle
/// should read and one write (as the connection code does).
#[derive(Debug)]
pub struct TlsStream {
    /// The plain socket underneath (never itself a TLS stream).
    sock: Box<Stream>,
    conn: Arc<Mutex<ServerConnection>>,
    /// Ciphertext read from the socket and not yet handed to rustls (`rbuf[rpos..rend]`).
    rbuf: Vec<u8>,
    rpos: usize,
    rend: usize,
    /// Records encrypted under the lock, written to the socket after it is released.
    wbuf: Vec<u8>,
    /// During the handshake phase: every socket read gets the time left until then, so a
    /// client trickling a record byte by byte cannot stretch the deadline.
    deadline: Option<Instant>,
}

fn lock(m: &Mutex<ServerConnection>) -> MutexGuard<'_, ServerConnection> {
    // A panic while holding the lock leaves a session whose next operation fails with a
    // TLS error at worst; that ends the connection, which is what should happen.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl TlsStream {
    /// A second handle on the same session and socket.
    pub fn try_clone(&self) -> io::Result<TlsStream> {
        Ok(TlsStream {
            sock: Box::new(self.sock.try_clone()?),
            conn: self.conn.clone(),
            rbuf: Vec::new(),
            rpos: 0,
            rend: 0,
            wbuf: Vec::new(),
            deadline: None,
        })
    }

    /// Bounds each socket read by `deadline` (`None`: reads wait as the socket's own
    /// timeout says).
    pub(crate) fn set_read_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
    }

    /// The plain socket underneath (timeouts and shutdown act on it).
    pub(crate) fn socket(&self) -> &Stream {
        &self.sock
    }

    /// Sends a `close_notify` alert so the client sees a clean end of the session.
    pub fn close_notify(&mut self) -> io::Result<()> {
        self.wbuf.clear();
        {
            let mut c = lock(&self.conn);
            c.send_close_notify();
            while c.wants_write() {
                c.write_tls(&mut self.wbuf)?;
            }
        }
        self.sock.write_all(&self.wbuf)
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            {
                let mut c = lock(&self.conn);
                loop {
                    match c.reader().read(buf) {
                        // 0: the client sent close_notify.
                        Ok(n) => return Ok(n),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                        Err(e) => return Err(e),
                    }
                    // No plaintext: decrypt what we have, without touching the socket.
                    if self.rpos >= self.rend {
                        break;
                    }
                    let n = c.read_tls(&mut &self.rbuf[self.rpos..self.rend])?;
                    if n == 0 {
                        // rustls took nothing although its plaintext buffer is empty: the
                        // peer is not speaking TLS records we can make progress on.
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "TLS record not accepted",
                        ));
                    }
                    self.rpos += n;
                    c.process_new_packets().map_err(tls_err)?;
                }
            }
            // Wait for more ciphertext with the lock released, so writers can go on.
            if self.rbuf.len() < READ_CHUNK {
                self.rbuf.resize(READ_CHUNK, 0);
            }
            self.rpos = 0;
            self.rend = 0;
            if let Some(d) = self.deadline {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                self.sock.set_read_timeout(Some(left))?;
            }
            let n = self.sock.read(&mut self.rbuf)?;
            self.rend = n;
            if n == 0 {
                // The socket closed without close_notify; NBD frames its own messages, so
                // a truncated stream is caught there and this is just end of input.
                return Ok(0);
            }
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.wbuf.clear();
        let n = {
            let mut c = lock(&self.conn);
            let n = c.writer().write_vectored(bufs)?;
            while c.wants_write() {
                c.write_tls(&mut self.wbuf)?;
            }
            n
        };
        // The lock is released: a blocked socket write stalls only this writer.
        self.sock.write_all(&self.wbuf)?;
        if self.wbuf.capacity() > 2 * WRITE_LIMIT {
            self.wbuf = Vec::new();
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Distinguished names, for authz-simple.

/// A DER element: tag, contents, and what follows it.
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&l0, rest) = rest.split_first()?;
    let (len, rest) = if l0 < 0x80 {
        (usize::from(l0), rest)
    } else {
        let k = usize::from(l0 & 0x7f);
        if k == 0 || k > 4 || rest.len() < k {
            return None;
        }
        let len = rest[..k]
            .iter()
            .fold(0usize, |a, &b| (a << 8) | usize::from(b));
        (len, &rest[k..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// Short names GnuTLS prints for the attribute types (OID contents bytes).
fn attr_name(oid: &[u8]) -> Option<&'static str> {
    Some(match oid {
        [0x55, 0x04, 0x03] => "CN",
        [0x55, 0x04, 0x04] => "SN",
        [0x55, 0x04, 0x05] => "serialNumber",
        [0x55, 0x04, 0x06] => "C",
        [0x55, 0x04, 0x07] => "L",
        [0x55, 0x04, 0x08] => "ST",
        [0x55, 0x04, 0x09] => "street",
        [0x55, 0x04, 0x0a] => "O",
        [0x55, 0x04, 0x0b] => "OU",
        [0x55, 0x04, 0x0c] => "title",
        [0x55, 0x04, 0x2a] => "GN",
        [0x55, 0x04, 0x2b] => "initials",
        [0x55, 0x04, 0x2c] => "generationQualifier",
        [0x55, 0x04, 0x2e] => "dnQualifier",
        [0x55, 0x04, 0x41] => "pseudonym",
        [0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19] => "DC",
        [0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x01] => "UID",
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01] => "EMAIL",
        _ => return None,
    })
}

/// Dotted form of an OID's contents, for attribute types without a short name.
fn dotted(oid: &[u8]) -> String {
    let mut parts: Vec<u64> = Vec::new();
    let mut v: u64 = 0;
    for &b in oid {
        // Absurdly long components wrap instead of overflowing: the name is then wrong,
        // which only means no identity matches it.
        v = v.wrapping_shl(7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if parts.is_empty() {
                let first = (v / 40).min(2);
                parts.push(first);
                parts.push(v - first * 40);
            } else {
                parts.push(v);
            }
            v = 0;
        }
    }
    parts
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(".")
}

/// An attribute value as text (RFC 4514 escaping), or `#` and the hex of the whole
/// element for types that are not strings.
fn attr_value(tag: u8, body: &[u8], whole: &[u8]) -> String {
    let text: Option<String> = match tag {
        // UTF8String, PrintableString, IA5String, VisibleString, NumericString
        0x0c | 0x13 | 0x16 | 0x1a | 0x12 => std::str::from_utf8(body).ok().map(str::to_string),
        // TeletexString: in practice Latin-1.
        0x14 => Some(body.iter().map(|&b| char::from(b)).collect()),
        // BMPString: UCS-2 big-endian.
        0x1e if body.len().is_multiple_of(2) => {
            char::decode_utf16(body.chunks(2).map(|c| u16::from_be_bytes([c[0], c[1]])))
                .collect::<Result<String, _>>()
                .ok()
        }
        _ => None,
    };
    let Some(s) = text else {
        let mut h = String::from("#");
        for b in whole {
            h.push_str(&format!("{b:02x}"));
        }
        return h;
    };
    let n = s.chars().count();
    let mut out = String::with_capacity(s.len());
    for (i, ch) in s.chars().enumerate() {
        let special = matches!(ch, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (ch == '#' || ch == ' '))
            || (i + 1 == n && ch == ' ');
        if ch == '\0' {
            out.push_str("\\00");
            continue;
        }
        if special {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

/// The subject of a DER certificate as QEMU's authz sees it: RDNs in certificate order,
/// joined by `,` (multi-valued RDNs by `+`). `None` if the certificate does not parse.
pub fn subject_dn(cert: &[u8]) -> Option<String> {
    let (_, certificate, _) = der(cert)?;
    let (_, tbs, _) = der(certificate)?;
    let mut rest = tbs;
    // Optional explicit version [0].
    let (tag, _, after) = der(rest)?;
    if tag == 0xa0 {
        rest = after;
    }
    // serialNumber, signature, issuer, validity, then subject.
    for _ in 0..4 {
        rest = der(rest)?.2;
    }
    let (tag, mut name, _) = der(rest)?;
    if tag != 0x30 {
        return None;
    }
    let mut rdns = Vec::new();
    while !name.is_empty() {
        let (tag, mut set, next) = der(name)?;
        name = next;
        if tag != 0x31 {
            return None;
        }
        let mut avas = Vec::new();
        while !set.is_empty() {
            let (tag, ava, next) = der(set)?;
            set = next;
            if tag != 0x30 {
                return None;
            }
            let (otag, oid, vrest) = der(ava)?;
            if otag != 0x06 {
                return None;
            }
            let (vtag, vbody, _) = der(vrest)?;
            let key = attr_name(oid)
                .map(str::to_string)
                .unwrap_or_else(|| dotted(oid));
            avas.push(format!("{key}={}", attr_value(vtag, vbody, vrest)));
        }
        rdns.push(avas.join("+"));
    }
    Some(rdns.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        if body.len() < 0x80 {
            v.push(body.len() as u8);
        } else {
            v.push(0x82);
            v.extend_from_slice(&(body.len() as u16).to_be_bytes());
        }
        v.extend_from_slice(body);
        v
    }

    fn rdn(oid: &[u8], vtag: u8, value: &[u8]) -> Vec<u8> {
        let mut ava = tlv(0x06, oid);
        ava.extend(tlv(vtag, value));
        tlv(0x31, &tlv(0x30, &ava))
    }

    /// A certificate skeleton: only the fields `subject_dn` walks through are real.
    fn cert(subject: &[u8]) -> Vec<u8> {
        let mut tbs = tlv(0xa0, &tlv(0x02, &[2]));
        tbs.extend(tlv(0x02, &[1]));
        tbs.extend(tlv(0x30, &[]));
        tbs.extend(tlv(0x30, &rdn(&[0x55, 4, 3], 0x0c, b"CA")));
        tbs.extend(tlv(0x30, &[]));
        tbs.extend(tlv(0x30, subject));
        tlv(0x30, &tlv(0x30, &tbs))
    }

    #[test]
    fn subject_in_certificate_order_with_escapes() {
        let mut name = rdn(&[0x55, 4, 6], 0x13, b"GB");
        name.extend(rdn(&[0x55, 4, 10], 0x0c, b"a,b+c"));
        name.extend(rdn(&[0x55, 4, 3], 0x0c, b" lead#"));
        name.extend(rdn(&[0x2a, 3, 4], 0x02, &[5]));
        assert_eq!(
            subject_dn(&cert(&name)).unwrap(),
            "C=GB,O=a\\,b\\+c,CN=\\ lead#,1.2.3.4=#020105"
        );
        // Multi-valued RDN, BMPString.
        let mut ava1 = tlv(0x06, &[0x55, 4, 11]);
        ava1.extend(tlv(0x1e, &[0, b'x', 0, b'y']));
        let mut ava2 = tlv(0x06, &[0x55, 4, 3]);
        ava2.extend(tlv(0x16, b"z"));
        let mut set = tlv(0x30, &ava1);
        set.extend(tlv(0x30, &ava2));
        assert_eq!(subject_dn(&cert(&tlv(0x31, &set))).unwrap(), "OU=xy+CN=z");
    }

    #[test]
    fn hostile_certificates_do_not_panic() {
        let mut name = rdn(&[0x55, 4, 3], 0x0c, b"client");
        name.extend(rdn(
            &[
                0x81, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
            ],
            0x0c,
            b"x",
        ));
        let good = cert(&name);
        assert!(subject_dn(&good).is_some());
        for cut in 0..good.len() {
            let _ = subject_dn(&good[..cut]);
        }
        let mut rng = 0x1234_5678_u32;
        for _ in 0..2000 {
            let mut c = good.clone();
            rng = rng.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let i = (rng >> 8) as usize % c.len();
            c[i] = (rng >> 20) as u8;
            let _ = subject_dn(&c);
        }
        for junk in [
            &[][..],
            &[0x30, 0x84, 0xff, 0xff, 0xff, 0xff][..],
            &[0x30, 0x85, 1][..],
        ] {
            assert!(subject_dn(junk).is_none());
        }
    }
}
