//! qimg's own header extensions: an image GUID and a key/value metadata section.
//!
//! # Layout
//!
//! Both are ordinary qcow2 header extensions (type `u32`, length `u32`, data padded with
//! zeros to a multiple of 8 bytes), with type codes QEMU does not use, so QEMU treats
//! them as unknown extensions: it opens the image, ignores them, and writes them back
//! whenever it rewrites the header. All integers are big-endian, like the rest of qcow2.
//!
//! * **GUID**, type [`GUID_EXT`] = `0x71676964` (ASCII `qgid`): exactly 16 bytes, an
//!   RFC 4122 UUID in its usual byte order (printed `8-4-4-4-12`).
//! * **Key/value metadata**, type [`KV_EXT`] = `0x716b766d` (ASCII `qkvm`):
//!
//!   | offset | size | field |
//!   |---|---|---|
//!   | 0 | 4 | format version, 1 ([`KV_VERSION`]) |
//!   | 4 | 4 | entry count |
//!   | 8 | … | entries, each: `u16` key length, `u32` value length, key bytes, value bytes |
//!
//!   Keys are UTF-8, non-empty, without `=` or control characters, unique, and the
//!   entries are sorted by key (byte order), so one map has exactly one encoding. Values
//!   are arbitrary bytes. Nothing may follow the last entry (inside the extension's
//!   length; the qcow2 padding after it is not part of the data).
//!
//! No feature bit is used: the data describes the image, not its contents, so it stays
//! true when a program that does not know it writes guest data. An autoclear bit would
//! be cleared by QEMU at every read-write open, telling readers to distrust data that is
//! still valid; an incompatible bit would stop QEMU from opening the image at all; and
//! without any bit an image without metadata stays byte for byte what qemu-img makes.
//!
//! QEMU keeps unknown extensions in a list it builds by prepending, so each header
//! rewrite by QEMU reverses their order; readers look them up by type, never by position.
//!
//! Decoding treats the bytes as untrusted: every length is checked against the bytes
//! that are really there before it is used, nothing is allocated from a count, and every
//! error names the field at fault.

use super::{be16, be32, put16, put32};
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::fmt;

/// Header extension type of the image GUID (ASCII `qgid`).
pub const GUID_EXT: u32 = 0x7167_6964;
/// Header extension type of the key/value metadata (ASCII `qkvm`).
pub const KV_EXT: u32 = 0x716b_766d;
/// The key/value encoding version this implementation reads and writes.
pub const KV_VERSION: u32 = 1;
/// Bytes before the first entry (version and count).
const KV_PREFIX: usize = 8;
/// Bytes of an entry's fixed part (key length and value length).
const ENTRY_FIXED: usize = 6;

/// Key/value metadata: keys in byte order, values as raw bytes.
pub type Metadata = BTreeMap<String, Vec<u8>>;

/// A 16-byte image GUID (an RFC 4122 UUID).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// A random (version 4) UUID from the kernel's random number generator.
    pub fn new_v4() -> Result<Guid> {
        let mut b = [0u8; 16];
        fill_random(&mut b)?;
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        Ok(Guid(b))
    }

    /// Parses the `8-4-4-4-12` hexadecimal form (either case).
    pub fn parse(s: &str) -> Result<Guid> {
        let bad = || {
            Error::InvalidArgument(format!(
                "Invalid GUID '{s}': expected the form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"
            ))
        };
        let groups: Vec<&str> = s.split('-').collect();
        let lens = [8, 4, 4, 4, 12];
        if groups.len() != 5 || groups.iter().zip(lens).any(|(g, n)| g.len() != n) {
            return Err(bad());
        }
        let hex: String = groups.concat();
        let mut b = [0u8; 16];
        for (i, out) in b.iter_mut().enumerate() {
            let pair = hex.get(2 * i..2 * i + 2).ok_or_else(bad)?;
            *out = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
        }
        // from_str_radix accepts a leading '+', which is not a hex digit.
        if !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad());
        }
        Ok(Guid(b))
    }

    /// Reads the data of a GUID extension.
    pub fn decode(data: &[u8]) -> Result<Guid> {
        let b: [u8; 16] = data.try_into().map_err(|_| {
            Error::invalid(format!(
                "image GUID extension: length {} (expected 16)",
                data.len()
            ))
        })?;
        Ok(Guid(b))
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Guid({self})")
    }
}

fn fill_random(buf: &mut [u8]) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                // Kernels before 3.17: the device gives the same bytes.
                Some(libc::ENOSYS) => {
                    use std::io::Read;
                    std::fs::File::open("/dev/urandom")
                        .and_then(|mut f| f.read_exact(&mut buf[done..]))
                        .map_err(|e| Error::io("Could not read random bytes", e))?;
                    return Ok(());
                }
                _ => return Err(Error::io("Could not read random bytes", e)),
            }
        }
        done += n as usize;
    }
    Ok(())
}

/// Checks that `key` may be stored: non-empty UTF-8 (guaranteed by `&str`), at most
/// 65535 bytes, without `=` (so that `KEY=VALUE` on a command line is unambiguous) and
/// without control characters (so that listings stay one line per key).
pub fn check_key(key: &str) -> Result<()> {
    let why = if key.is_empty() {
        "it is empty"
    } else if key.len() > u16::MAX as usize {
        "it is longer than 65535 bytes"
    } else if key.contains('=') {
        "it contains '='"
    } else if key.chars().any(char::is_control) {
        "it contains a control character"
    } else {
        return Ok(());
    };
    Err(Error::InvalidArgument(format!(
        "Invalid metadata key {}: {why}",
        quoted(key)
    )))
}

/// The key as it appears in messages: quoted, control characters escaped.
fn quoted(key: &str) -> String {
    format!("{:?}", key.chars().take(64).collect::<String>())
}

/// Bytes the encoding of `map` takes (the extension's data length, before padding).
pub fn kv_encoded_len(map: &Metadata) -> usize {
    KV_PREFIX
        + map
            .iter()
            .map(|(k, v)| ENTRY_FIXED + k.len() + v.len())
            .sum::<usize>()
}

/// Encodes `map` as the data of a key/value extension. Fails on keys [`check_key`]
/// refuses and on values of 4 GiB or more.
pub fn encode_kv(map: &Metadata) -> Result<Vec<u8>> {
    let mut out = vec![0u8; KV_PREFIX];
    put32(&mut out, 0, KV_VERSION);
    put32(&mut out, 4, map.len() as u32);
    for (k, v) in map {
        check_key(k)?;
        let vlen = u32::try_from(v.len()).map_err(|_| {
            Error::InvalidArgument(format!("Metadata value of {} is too long", quoted(k)))
        })?;
        let at = out.len();
        out.resize(at + ENTRY_FIXED, 0);
        put16(&mut out, at, k.len() as u16);
        put32(&mut out, at + 2, vlen);
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(v);
    }
    Ok(out)
}

/// Decodes the data of a key/value extension, refusing anything that
/// [`encode_kv`] would not have produced.
pub fn decode_kv(data: &[u8]) -> Result<Metadata> {
    let err = |what: String| Error::invalid(format!("key/value metadata extension: {what}"));
    if data.len() < KV_PREFIX {
        return Err(err(format!(
            "length {} is shorter than its 8-byte prefix",
            data.len()
        )));
    }
    let version = be32(data, 0);
    if version != KV_VERSION {
        return Err(Error::unsupported(format!(
            "key/value metadata extension: version {version} is not supported (only {KV_VERSION})"
        )));
    }
    let count = be32(data, 4) as u64;
    // Every entry takes at least its fixed part and one key byte.
    let room = ((data.len() - KV_PREFIX) / (ENTRY_FIXED + 1)) as u64;
    if count > room {
        return Err(err(format!(
            "entry count {count} does not fit in {} bytes",
            data.len()
        )));
    }
    let mut map = Metadata::new();
    let mut prev: Option<&str> = None;
    let mut off = KV_PREFIX;
    for i in 0..count {
        let left = data.len() - off;
        if left < ENTRY_FIXED {
            return Err(err(format!(
                "entry {i}: truncated ({left} bytes left, its lengths need 6)"
            )));
        }
        let klen = be16(data, off) as usize;
        let vlen = be32(data, off + 2) as u64;
        off += ENTRY_FIXED;
        let left = (data.len() - off) as u64;
        if klen == 0 {
            return Err(err(format!("entry {i}: key length is 0")));
        }
        if klen as u64 + vlen > left {
            return Err(err(format!(
                "entry {i}: key length {klen} and value length {vlen} exceed the {left} bytes left"
            )));
        }
        let key = std::str::from_utf8(&data[off..off + klen])
            .map_err(|_| err(format!("entry {i}: key is not valid UTF-8")))?;
        check_key(key).map_err(|e| err(format!("entry {i}: {e}")))?;
        if let Some(p) = prev {
            if p == key {
                return Err(err(format!("entry {i}: duplicate key {}", quoted(key))));
            }
            if p > key {
                return Err(err(format!(
                    "entry {i}: key {} is out of order (after {})",
                    quoted(key),
                    quoted(p)
                )));
            }
        }
        off += klen;
        let value = data[off..off + vlen as usize].to_vec();
        off += vlen as usize;
        map.insert(key.to_string(), value);
        prev = Some(key);
    }
    if off != data.len() {
        return Err(err(format!(
            "{} bytes after the last of {count} entries",
            data.len() - off
        )));
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &[u8])]) -> Metadata {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect()
    }

    #[test]
    fn kv_round_trip() {
        for m in [
            Metadata::new(),
            map(&[("a", b"")]),
            map(&[("owner", b"alice"), ("blob", &[0, 255, 1]), ("é", b"\n")]),
        ] {
            let enc = encode_kv(&m).unwrap();
            assert_eq!(enc.len(), kv_encoded_len(&m));
            assert_eq!(decode_kv(&enc).unwrap(), m);
        }
    }

    #[test]
    fn kv_exact_bytes() {
        let enc = encode_kv(&map(&[("b", b"xy"), ("a", b"")])).unwrap();
        assert_eq!(
            enc,
            [
                0, 0, 0, 1, 0, 0, 0, 2, // version, count
                0, 1, 0, 0, 0, 0, b'a', // "a" = ""
                0, 1, 0, 0, 0, 2, b'b', b'x', b'y', // "b" = "xy"
            ]
        );
    }

    #[test]
    fn kv_rejects_malformed() {
        let good = encode_kv(&map(&[("a", b"1"), ("b", b"2")])).unwrap();
        let mut cases: Vec<(Vec<u8>, &str)> = vec![
            (good[..7].to_vec(), "shorter than its 8-byte prefix"),
            (good[..good.len() - 1].to_vec(), "exceed the"),
            (good[..12].to_vec(), "entry count 2 does not fit"),
            ([good.clone(), vec![0]].concat(), "1 bytes after the last"),
        ];
        let mut b = good.clone();
        b[3] = 2;
        cases.push((b, "version 2 is not supported"));
        let mut b = good.clone();
        b[4..8].copy_from_slice(&[0xff; 4]);
        cases.push((b, "entry count 4294967295 does not fit"));
        let mut b = good.clone();
        b[8 + 6 + 2 + 6] = b'a'; // second key "b" -> "a"
        cases.push((b, "entry 1: duplicate key \"a\""));
        let mut b = good.clone();
        b[8 + 6] = b'c'; // first key "a" -> "c"
        cases.push((b, "entry 1: key \"b\" is out of order (after \"c\")"));
        let mut b = good.clone();
        b[8 + 6] = 0xff;
        cases.push((b, "entry 0: key is not valid UTF-8"));
        let mut b = good.clone();
        b[8 + 6] = b'=';
        cases.push((b, "entry 0: Invalid metadata key \"=\": it contains '='"));
        let mut b = good.clone();
        b[8..10].copy_from_slice(&[0, 0]);
        cases.push((b, "entry 0: key length is 0"));
        let mut b = good.clone();
        b[10..14].copy_from_slice(&[0xff; 4]);
        cases.push((b, "entry 0: key length 1 and value length 4294967295"));
        for (data, msg) in cases {
            let e = decode_kv(&data).unwrap_err().to_string();
            assert!(e.contains(msg), "{e:?} does not contain {msg:?}");
            assert!(e.starts_with("key/value metadata extension: "), "{e}");
            assert!(!e.contains('\n'));
        }
    }

    /// Random and mutated inputs never panic, and whatever decodes is the one canonical
    /// encoding of its map.
    #[test]
    fn kv_decode_is_total_and_canonical() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let base = encode_kv(&map(&[("a", b"1"), ("bb", b""), ("c", &[0xff; 9])])).unwrap();
        let (mut ok, mut bad) = (0, 0);
        for i in 0..20000 {
            let mut d = if i % 2 == 0 {
                base.clone()
            } else {
                (0..next() % 40).map(|_| next() as u8).collect()
            };
            for _ in 0..1 + next() % 3 {
                if d.is_empty() {
                    break;
                }
                let at = (next() as usize) % d.len();
                match next() % 4 {
                    0 => d[at] = next() as u8,
                    1 => d.truncate(at),
                    2 => d.insert(at, next() as u8),
                    _ => d[at] ^= 1,
                }
            }
            match decode_kv(&d) {
                Ok(m) => {
                    assert_eq!(encode_kv(&m).unwrap(), d);
                    ok += 1;
                }
                Err(e) => {
                    assert!(!e.to_string().contains('\n'));
                    bad += 1;
                }
            }
        }
        assert!(ok > 100 && bad > 100, "{ok} {bad}");
    }

    #[test]
    fn keys_checked_on_encode() {
        for k in ["", "a=b", "a\nb"] {
            assert!(encode_kv(&map(&[(k, b"v")])).is_err(), "{k:?}");
        }
    }

    #[test]
    fn guid_text_round_trip() {
        let s = "1b4e28ba-2fa1-41d2-883f-0016d3cca427";
        let g = Guid::parse(s).unwrap();
        assert_eq!(g.to_string(), s);
        assert_eq!(Guid::parse(&s.to_uppercase()).unwrap(), g);
        assert_eq!(Guid::decode(&g.0).unwrap(), g);
        for bad in [
            "",
            "1b4e28ba2fa141d2883f0016d3cca427",
            "1b4e28ba-2fa1-41d2-883f-0016d3cca42",
            "1b4e28ba-2fa1-41d2-883f-0016d3cca42g",
            "+b4e28ba-2fa1-41d2-883f-0016d3cca427",
            "1b4e28ba-2fa1-41d2-883f-0016d3cca4é",
        ] {
            assert!(Guid::parse(bad).is_err(), "{bad:?}");
        }
        assert!(Guid::decode(&[0; 15]).is_err());
        assert!(Guid::decode(&[0; 17]).is_err());
    }

    #[test]
    fn random_guids_are_v4() {
        let a = Guid::new_v4().unwrap();
        let b = Guid::new_v4().unwrap();
        assert_ne!(a, b);
        for g in [a, b] {
            assert_eq!(g.0[6] >> 4, 4);
            assert_eq!(g.0[8] >> 6, 2);
        }
    }
}
