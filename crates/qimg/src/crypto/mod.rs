//! Encryption of qcow2 guest data: sector ciphers, the LUKS1 header ([`luks`]) and the
//! legacy AES method.
//!
//! Only guest data is encrypted, in 512-byte sectors, each with its own IV. The block
//! cipher is AES (the `aes` crate, which picks AES-NI at run time); the modes (XTS, CBC,
//! ECB) and IV generators (plain, plain64, ESSIV) are implemented here because each is a
//! few lines over the block cipher and QEMU's exact conventions (XTS key halves, IV
//! widths, ESSIV key size) are easier to match and test directly.

pub mod luks;

use crate::error::{Error, Result};
use aes::cipher::{generic_array::GenericArray, BlockDecrypt, BlockEncrypt, KeyInit};
use std::sync::Arc;
use zeroize::Zeroizing;

/// Size of one encryption sector (QEMU's `QCRYPTO_BLOCK_*_SECTOR_SIZE`).
pub const SECTOR: usize = 512;

/// A secret's bytes (a passphrase), wiped from memory when dropped.
#[derive(Clone)]
pub struct Secret(Arc<Zeroizing<Vec<u8>>>);

impl Secret {
    /// Wraps secret bytes.
    pub fn new(bytes: Vec<u8>) -> Secret {
        Secret(Arc::new(Zeroizing::new(bytes)))
    }

    /// The secret's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl Secret {
    /// A `secret` object's value from its `data`, `file` and `format` (raw or base64)
    /// properties, with QEMU's messages.
    pub fn from_object(
        data: Option<&str>,
        file: Option<&str>,
        format: Option<&str>,
    ) -> std::result::Result<Secret, String> {
        use base64::Engine;
        let raw = Zeroizing::new(match (data, file) {
            (Some(_), Some(_)) => return Err("'file' and 'data' are mutually exclusive".into()),
            (None, None) => return Err("Either 'file' or 'data' must be provided".into()),
            (Some(d), None) => d.as_bytes().to_vec(),
            (None, Some(f)) => std::fs::read(f).map_err(|e| {
                format!(
                    "Unable to read {f}: Failed to open file \u{201c}{f}\u{201d}: {}",
                    crate::error::strerror(&e)
                )
            })?,
        });
        let bytes = match format {
            None | Some("raw") => raw.to_vec(),
            Some("base64") => base64::engine::general_purpose::STANDARD
                .decode(&raw[..])
                .map_err(|_| "Base64 data contains invalid characters".to_string())?,
            Some(other) => {
                return Err(format!(
                    "Parameter 'format' does not accept value '{other}'"
                ))
            }
        };
        Ok(Secret::new(bytes))
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Secret) -> bool {
        self.bytes() == other.bytes()
    }
}

impl Eq for Secret {}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// What the opener knows about an image's encryption (qemu's `encrypt.*` open options).
#[derive(Debug, Clone, Default)]
pub struct EncryptOptions {
    /// `encrypt.format`: must match the header's method when given.
    pub format: Option<String>,
    /// The secret named by `encrypt.key-secret`.
    pub key: Option<Secret>,
}

/// AES key sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherAlg {
    /// AES with a 16-byte key.
    Aes128,
    /// AES with a 24-byte key.
    Aes192,
    /// AES with a 32-byte key.
    Aes256,
}

impl CipherAlg {
    /// QEMU's name (`aes-256`).
    pub fn name(self) -> &'static str {
        match self {
            CipherAlg::Aes128 => "aes-128",
            CipherAlg::Aes192 => "aes-192",
            CipherAlg::Aes256 => "aes-256",
        }
    }

    /// Parses QEMU's name.
    pub fn parse(s: &str) -> Option<CipherAlg> {
        Some(match s {
            "aes-128" => CipherAlg::Aes128,
            "aes-192" => CipherAlg::Aes192,
            "aes-256" => CipherAlg::Aes256,
            _ => return None,
        })
    }

    /// Key length in bytes.
    pub fn key_len(self) -> usize {
        match self {
            CipherAlg::Aes128 => 16,
            CipherAlg::Aes192 => 24,
            CipherAlg::Aes256 => 32,
        }
    }

    fn from_key_len(n: usize) -> Option<CipherAlg> {
        Some(match n {
            16 => CipherAlg::Aes128,
            24 => CipherAlg::Aes192,
            32 => CipherAlg::Aes256,
            _ => return None,
        })
    }
}

/// Block cipher modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherMode {
    /// XTS (the key is two cipher keys: data, then tweak).
    Xts,
    /// CBC, chained within one sector.
    Cbc,
    /// ECB (no IV).
    Ecb,
}

impl CipherMode {
    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            CipherMode::Xts => "xts",
            CipherMode::Cbc => "cbc",
            CipherMode::Ecb => "ecb",
        }
    }

    /// Parses QEMU's name.
    pub fn parse(s: &str) -> Option<CipherMode> {
        Some(match s {
            "xts" => CipherMode::Xts,
            "cbc" => CipherMode::Cbc,
            "ecb" => CipherMode::Ecb,
            _ => return None,
        })
    }
}

/// Hash algorithms (PBKDF2, the anti-forensic splitter, ESSIV).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlg {
    /// SHA-1.
    Sha1,
    /// SHA-224.
    Sha224,
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

impl HashAlg {
    /// QEMU's (and LUKS's) name.
    pub fn name(self) -> &'static str {
        match self {
            HashAlg::Sha1 => "sha1",
            HashAlg::Sha224 => "sha224",
            HashAlg::Sha256 => "sha256",
            HashAlg::Sha384 => "sha384",
            HashAlg::Sha512 => "sha512",
        }
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Option<HashAlg> {
        Some(match s {
            "sha1" => HashAlg::Sha1,
            "sha224" => HashAlg::Sha224,
            "sha256" => HashAlg::Sha256,
            "sha384" => HashAlg::Sha384,
            "sha512" => HashAlg::Sha512,
            _ => return None,
        })
    }

    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            HashAlg::Sha1 => 20,
            HashAlg::Sha224 => 28,
            HashAlg::Sha256 => 32,
            HashAlg::Sha384 => 48,
            HashAlg::Sha512 => 64,
        }
    }

    /// Hash of the concatenation of `parts`.
    pub fn digest(self, parts: &[&[u8]]) -> Zeroizing<Vec<u8>> {
        use sha2::Digest;
        fn run<D: Digest>(parts: &[&[u8]]) -> Zeroizing<Vec<u8>> {
            let mut d = D::new();
            for p in parts {
                d.update(p);
            }
            Zeroizing::new(d.finalize().to_vec())
        }
        match self {
            HashAlg::Sha1 => run::<sha1::Sha1>(parts),
            HashAlg::Sha224 => run::<sha2::Sha224>(parts),
            HashAlg::Sha256 => run::<sha2::Sha256>(parts),
            HashAlg::Sha384 => run::<sha2::Sha384>(parts),
            HashAlg::Sha512 => run::<sha2::Sha512>(parts),
        }
    }

    /// PBKDF2-HMAC with this hash, filling `out`.
    pub fn pbkdf2(self, password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
        use hmac::Hmac;
        // Hmac never rejects a key length, so the result can be ignored.
        let _ = match self {
            HashAlg::Sha1 => pbkdf2::pbkdf2::<Hmac<sha1::Sha1>>(password, salt, iterations, out),
            HashAlg::Sha224 => {
                pbkdf2::pbkdf2::<Hmac<sha2::Sha224>>(password, salt, iterations, out)
            }
            HashAlg::Sha256 => {
                pbkdf2::pbkdf2::<Hmac<sha2::Sha256>>(password, salt, iterations, out)
            }
            HashAlg::Sha384 => {
                pbkdf2::pbkdf2::<Hmac<sha2::Sha384>>(password, salt, iterations, out)
            }
            HashAlg::Sha512 => {
                pbkdf2::pbkdf2::<Hmac<sha2::Sha512>>(password, salt, iterations, out)
            }
        };
    }
}

/// IV generators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IvGen {
    /// The sector number truncated to 32 bits, little endian.
    Plain,
    /// The sector number, 64 bits little endian.
    Plain64,
    /// plain64 encrypted with a key that is the hash of the data key.
    Essiv(HashAlg),
}

impl IvGen {
    /// QEMU's name of the generator (`plain64`, `essiv`).
    pub fn name(self) -> &'static str {
        match self {
            IvGen::Plain => "plain",
            IvGen::Plain64 => "plain64",
            IvGen::Essiv(_) => "essiv",
        }
    }
}

/// One AES key schedule of any size.
enum Aes {
    A128(Box<aes::Aes128>),
    A192(Box<aes::Aes192>),
    A256(Box<aes::Aes256>),
}

impl Aes {
    fn new(key: &[u8]) -> Result<Aes> {
        Ok(match key.len() {
            16 => Aes::A128(Box::new(aes::Aes128::new(GenericArray::from_slice(key)))),
            24 => Aes::A192(Box::new(aes::Aes192::new(GenericArray::from_slice(key)))),
            32 => Aes::A256(Box::new(aes::Aes256::new(GenericArray::from_slice(key)))),
            n => return Err(Error::invalid(format!("Invalid AES key length {n}"))),
        })
    }

    fn encrypt(&self, blocks: &mut [aes::Block]) {
        match self {
            Aes::A128(c) => c.encrypt_blocks(blocks),
            Aes::A192(c) => c.encrypt_blocks(blocks),
            Aes::A256(c) => c.encrypt_blocks(blocks),
        }
    }

    fn decrypt(&self, blocks: &mut [aes::Block]) {
        match self {
            Aes::A128(c) => c.decrypt_blocks(blocks),
            Aes::A192(c) => c.decrypt_blocks(blocks),
            Aes::A256(c) => c.decrypt_blocks(blocks),
        }
    }
}

/// Multiplies an XTS tweak by the primitive element α of GF(2^128) (little endian).
fn xts_double(t: &mut [u8; 16]) {
    let v = u128::from_le_bytes(*t);
    let carry = (v >> 127) as u8;
    let v = (v << 1) ^ (0x87 * carry as u128);
    *t = v.to_le_bytes();
}

/// A data cipher: algorithm, mode and IV generator with their keys, encrypting whole
/// 512-byte sectors.
pub struct SectorCipher {
    alg: CipherAlg,
    mode: CipherMode,
    ivgen: IvGen,
    data: Aes,
    /// XTS: the tweak key.
    tweak: Option<Aes>,
    /// ESSIV: the IV key.
    essiv: Option<Aes>,
}

impl std::fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SectorCipher")
            .field("alg", &self.alg)
            .field("mode", &self.mode)
            .field("ivgen", &self.ivgen)
            .finish_non_exhaustive()
    }
}

impl SectorCipher {
    /// Builds a cipher from its full key (for XTS, both halves: data key first).
    pub fn new(mode: CipherMode, ivgen: IvGen, key: &[u8]) -> Result<SectorCipher> {
        let (data_key, tweak_key) = if mode == CipherMode::Xts {
            if !key.len().is_multiple_of(2) {
                return Err(Error::invalid("Invalid XTS key length"));
            }
            let (a, b) = key.split_at(key.len() / 2);
            (a, Some(b))
        } else {
            (key, None)
        };
        let alg = CipherAlg::from_key_len(data_key.len())
            .ok_or_else(|| Error::invalid(format!("Invalid AES key length {}", data_key.len())))?;
        let essiv = match ivgen {
            // The ESSIV key is the hash of the whole key; its length picks the AES size.
            IvGen::Essiv(h) => {
                if h.digest_len() > 32 || CipherAlg::from_key_len(h.digest_len()).is_none() {
                    return Err(Error::invalid(format!(
                        "Hash algorithm {} is unsuitable for ESSIV with AES",
                        h.name()
                    )));
                }
                Some(Aes::new(&h.digest(&[key]))?)
            }
            _ => None,
        };
        Ok(SectorCipher {
            alg,
            mode,
            ivgen,
            data: Aes::new(data_key)?,
            tweak: tweak_key.map(Aes::new).transpose()?,
            essiv,
        })
    }

    /// The legacy qcow2 AES method: AES-128-CBC, plain64 IVs, key = the passphrase's
    /// first 16 bytes, zero-padded.
    pub fn legacy_aes(passphrase: &[u8]) -> Result<SectorCipher> {
        let mut key = Zeroizing::new([0u8; 16]);
        let n = passphrase.len().min(16);
        key[..n].copy_from_slice(&passphrase[..n]);
        SectorCipher::new(CipherMode::Cbc, IvGen::Plain64, &key[..])
    }

    /// The cipher's algorithm.
    pub fn alg(&self) -> CipherAlg {
        self.alg
    }

    fn iv(&self, sector: u64) -> [u8; 16] {
        let mut iv = [0u8; 16];
        match self.ivgen {
            IvGen::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
            IvGen::Plain64 => iv[..8].copy_from_slice(&sector.to_le_bytes()),
            IvGen::Essiv(_) => {
                iv[..8].copy_from_slice(&sector.to_le_bytes());
                let b = GenericArray::from_mut_slice(&mut iv);
                self.essiv
                    .as_ref()
                    .unwrap()
                    .encrypt(std::slice::from_mut(b));
            }
        }
        iv
    }

    /// Encrypts `buf` (whole sectors) in place; its first sector is number `sector`.
    pub fn encrypt(&self, buf: &mut [u8], sector: u64) {
        self.run(buf, sector, true)
    }

    /// Decrypts `buf` (whole sectors) in place; its first sector is number `sector`.
    pub fn decrypt(&self, buf: &mut [u8], sector: u64) {
        self.run(buf, sector, false)
    }

    fn run(&self, buf: &mut [u8], first: u64, enc: bool) {
        debug_assert!(buf.len().is_multiple_of(SECTOR));
        for (i, s) in buf.chunks_exact_mut(SECTOR).enumerate() {
            let sector = first.wrapping_add(i as u64);
            // One copy into block form keeps this free of unsafe reinterpretation; 512
            // bytes of memcpy are noise next to the cipher.
            let mut arr = [aes::Block::default(); SECTOR / 16];
            for (b, c) in arr.iter_mut().zip(s.chunks_exact(16)) {
                b.copy_from_slice(c);
            }
            let blocks = &mut arr[..];
            match self.mode {
                CipherMode::Ecb => {
                    if enc {
                        self.data.encrypt(blocks)
                    } else {
                        self.data.decrypt(blocks)
                    }
                }
                CipherMode::Cbc => {
                    let iv = self.iv(sector);
                    if enc {
                        let mut prev = iv;
                        for b in blocks.iter_mut() {
                            for (x, p) in b.iter_mut().zip(prev.iter()) {
                                *x ^= p;
                            }
                            self.data.encrypt(std::slice::from_mut(b));
                            prev.copy_from_slice(b);
                        }
                    } else {
                        let mut prevs = [[0u8; 16]; SECTOR / 16];
                        prevs[0] = iv;
                        for k in 1..blocks.len() {
                            prevs[k].copy_from_slice(&blocks[k - 1]);
                        }
                        self.data.decrypt(blocks);
                        for (b, p) in blocks.iter_mut().zip(prevs.iter()) {
                            for (x, q) in b.iter_mut().zip(p.iter()) {
                                *x ^= q;
                            }
                        }
                    }
                }
                CipherMode::Xts => {
                    let mut t = self.iv(sector);
                    let tb = GenericArray::from_mut_slice(&mut t);
                    self.tweak
                        .as_ref()
                        .unwrap()
                        .encrypt(std::slice::from_mut(tb));
                    let mut tweaks = [[0u8; 16]; SECTOR / 16];
                    for tw in tweaks.iter_mut() {
                        *tw = t;
                        xts_double(&mut t);
                    }
                    let xor = |blocks: &mut [aes::Block]| {
                        for (b, tw) in blocks.iter_mut().zip(tweaks.iter()) {
                            for (x, q) in b.iter_mut().zip(tw.iter()) {
                                *x ^= q;
                            }
                        }
                    };
                    xor(blocks);
                    if enc {
                        self.data.encrypt(blocks)
                    } else {
                        self.data.decrypt(blocks)
                    }
                    xor(blocks);
                }
            }
            for (b, c) in arr.iter().zip(s.chunks_exact_mut(16)) {
                c.copy_from_slice(b);
            }
        }
    }
}

/// Fills `buf` from the operating system's random number generator.
pub fn random(buf: &mut [u8]) -> Result<()> {
    getrandom::getrandom(buf)
        .map_err(|e| Error::invalid(format!("Unable to read random bytes: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xts_ieee_vector() {
        // IEEE 1619 vector 1: all-zero keys, tweak 0, 32 zero bytes (first two blocks
        // of a sector; the rest follows the same chain).
        let c = SectorCipher::new(CipherMode::Xts, IvGen::Plain64, &[0u8; 32]).unwrap();
        let mut s = vec![0u8; 512];
        c.encrypt(&mut s, 0);
        assert_eq!(
            &s[..32],
            &[
                0x91, 0x7c, 0xf6, 0x9e, 0xbd, 0x68, 0xb2, 0xec, 0x9b, 0x9f, 0xe9, 0xa3, 0xea, 0xdd,
                0xa6, 0x92, 0xcd, 0x43, 0xd2, 0xf5, 0x95, 0x98, 0xed, 0x85, 0x8c, 0x02, 0xc2, 0x65,
                0x2f, 0xbf, 0x92, 0x2e
            ]
        );
        c.decrypt(&mut s, 0);
        assert!(s.iter().all(|&b| b == 0));
    }

    #[test]
    fn round_trips() {
        for (mode, iv, klen) in [
            (CipherMode::Cbc, IvGen::Plain64, 16),
            (CipherMode::Cbc, IvGen::Essiv(HashAlg::Sha256), 32),
            (CipherMode::Ecb, IvGen::Plain, 24),
            (CipherMode::Xts, IvGen::Plain, 64),
        ] {
            let key: Vec<u8> = (0..klen as u8).collect();
            let c = SectorCipher::new(mode, iv, &key).unwrap();
            let orig: Vec<u8> = (0..2048u32).map(|i| (i * 7) as u8).collect();
            let mut b = orig.clone();
            c.encrypt(&mut b, 99);
            assert_ne!(b, orig);
            c.decrypt(&mut b, 99);
            assert_eq!(b, orig);
        }
    }
}
