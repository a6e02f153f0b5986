//! LUKS1 headers as QEMU stores them inside qcow2 (crypt_method 2): parsing with full
//! validation, unlocking a key slot, and creating a header with one active slot.
//!
//! Inside qcow2 the LUKS area starts at the crypto extension's offset; key-material
//! offsets are relative to it, and the payload offset is recorded but not used (guest
//! data lives in ordinary qcow2 clusters).

use super::{CipherAlg, CipherMode, HashAlg, IvGen, SectorCipher, SECTOR};
use crate::error::{Error, Result};
use crate::ondisk::{be16, be32, put32};
use zeroize::Zeroizing;

/// LUKS magic.
pub const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// Size of the LUKS1 header proper.
pub const HEADER_LEN: usize = 592;
/// Key slots in a LUKS1 header.
pub const SLOTS: usize = 8;
/// Anti-forensic stripes (QEMU accepts no other value).
pub const STRIPES: u32 = 4000;
/// `active` value of an enabled key slot.
pub const SLOT_ACTIVE: u32 = 0x00AC_71F3;
/// `active` value of a disabled key slot.
pub const SLOT_INACTIVE: u32 = 0x0000_DEAD;
/// Where the first key slot's material starts (bytes from the header start).
const KEY_SLOT_OFFSET: u64 = 4096;
/// Length of the master-key digest.
const DIGEST_LEN: usize = 20;
/// Salt length.
const SALT_LEN: usize = 32;

/// Upper bound on any PBKDF2 iteration count read from an image: 2^25 (33.5 million).
///
/// QEMU calibrates counts to `iter-time` (2 s by default), which gives a few million on
/// current CPUs, so real images stay far below. The bound exists because the count comes
/// from the (untrusted) file: with it, unlocking a hostile image costs at most 8 slot
/// derivations plus 8 digest checks of 2^25 iterations each (a couple of minutes), not
/// the hours a 2^32 count per slot would take.
pub const MAX_ITERATIONS: u32 = 1 << 25;

/// One key slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySlot {
    /// Enabled.
    pub active: bool,
    /// PBKDF2 iterations.
    pub iterations: u32,
    /// PBKDF2 salt.
    pub salt: [u8; SALT_LEN],
    /// Key material offset in 512-byte sectors from the header start.
    pub key_offset: u32,
    /// Anti-forensic stripes.
    pub stripes: u32,
}

/// A parsed and validated LUKS1 header.
#[derive(Debug, Clone)]
pub struct LuksHeader {
    /// Data cipher.
    pub cipher_alg: CipherAlg,
    /// Data cipher mode.
    pub cipher_mode: CipherMode,
    /// IV generator.
    pub ivgen: IvGen,
    /// PBKDF2 / splitter hash.
    pub hash: HashAlg,
    /// Payload offset in sectors (recorded, unused by qcow2).
    pub payload_offset: u32,
    /// Master key length in bytes.
    pub key_bytes: u32,
    /// PBKDF2 digest of the master key.
    pub mk_digest: [u8; DIGEST_LEN],
    /// Its salt.
    pub mk_digest_salt: [u8; SALT_LEN],
    /// Its iterations.
    pub mk_digest_iter: u32,
    /// UUID text.
    pub uuid: String,
    /// Key slots.
    pub slots: Vec<KeySlot>,
}

fn cstr(b: &[u8], what: &str) -> Result<String> {
    let end = b
        .iter()
        .position(|&c| c == 0)
        .ok_or_else(|| Error::invalid(format!("LUKS header {what} is not NUL terminated")))?;
    Ok(String::from_utf8_lossy(&b[..end]).into_owned())
}

/// Bytes of key material one slot holds, rounded up to whole sectors.
fn split_key_len(key_bytes: u32, stripes: u32) -> u64 {
    (key_bytes as u64 * stripes as u64).div_ceil(SECTOR as u64) * SECTOR as u64
}

impl LuksHeader {
    /// Parses and validates a header. `area_len` is the length of the LUKS area (the
    /// crypto extension's length): every key slot must lie inside it.
    pub fn parse(b: &[u8], area_len: u64) -> Result<LuksHeader> {
        if b.len() < HEADER_LEN || b[..6] != MAGIC {
            return Err(Error::invalid("Volume is not in LUKS format"));
        }
        let version = be16(b, 6);
        if version != 1 {
            return Err(Error::invalid(format!(
                "LUKS version {version} is not supported"
            )));
        }
        let cipher_name = cstr(&b[8..40], "cipher name")?;
        let cipher_mode = cstr(&b[40..72], "cipher mode")?;
        let hash_spec = cstr(&b[72..104], "hash spec")?;
        let payload_offset = be32(b, 104);
        let key_bytes = be32(b, 108);
        let hash = HashAlg::parse(&hash_spec).ok_or_else(|| {
            Error::unsupported(format!("Hash algorithm '{hash_spec}' is not supported"))
        })?;
        // "xts-plain64", "cbc-essiv:sha256", "ecb".
        let (mode_name, iv_spec) = match cipher_mode.split_once('-') {
            Some((m, i)) => (m, Some(i)),
            None => (cipher_mode.as_str(), None),
        };
        let mode = CipherMode::parse(mode_name).ok_or_else(|| {
            Error::unsupported(format!("Cipher mode '{mode_name}' is not supported"))
        })?;
        let ivgen = match (iv_spec, mode) {
            (None, CipherMode::Ecb) => IvGen::Plain64,
            (None, _) => return Err(Error::invalid("Missing IV generator in cipher mode")),
            (Some(s), _) => {
                let (name, ivhash) = match s.split_once(':') {
                    Some((n, h)) => (n, Some(h)),
                    None => (s, None),
                };
                match (name, ivhash) {
                    ("plain", None) => IvGen::Plain,
                    ("plain64", None) => IvGen::Plain64,
                    ("essiv", Some(h)) => IvGen::Essiv(HashAlg::parse(h).ok_or_else(|| {
                        Error::unsupported(format!("Hash algorithm '{h}' is not supported"))
                    })?),
                    ("essiv", None) => {
                        return Err(Error::invalid("Missing IV generator hash specification"))
                    }
                    _ => {
                        return Err(Error::unsupported(format!(
                            "IV generator '{s}' is not supported"
                        )))
                    }
                }
            }
        };
        let data_key = if mode == CipherMode::Xts {
            key_bytes / 2
        } else {
            key_bytes
        };
        let cipher_alg = match (cipher_name.as_str(), data_key) {
            ("aes", 16) => CipherAlg::Aes128,
            ("aes", 24) => CipherAlg::Aes192,
            ("aes", 32) => CipherAlg::Aes256,
            _ => {
                return Err(Error::unsupported(format!(
                    "Algorithm '{cipher_name}' with key size {data_key} bytes not supported"
                )))
            }
        };
        if mode == CipherMode::Xts && !key_bytes.is_multiple_of(2) {
            return Err(Error::invalid("Invalid XTS key size"));
        }
        let mk_digest_iter = be32(b, 164);
        if mk_digest_iter == 0 || mk_digest_iter > MAX_ITERATIONS {
            return Err(Error::invalid(format!(
                "LUKS master key digest iteration count {mk_digest_iter} out of range (1..{MAX_ITERATIONS})"
            )));
        }
        let uuid = cstr(&b[168..208], "UUID")?;
        let mut slots = Vec::with_capacity(SLOTS);
        for i in 0..SLOTS {
            let o = 208 + 48 * i;
            let active = match be32(b, o) {
                SLOT_ACTIVE => true,
                SLOT_INACTIVE => false,
                v => {
                    return Err(Error::invalid(format!(
                        "Keyslot {i} state {v:#x} is corrupted"
                    )))
                }
            };
            let s = KeySlot {
                active,
                iterations: be32(b, o + 4),
                salt: b[o + 8..o + 40].try_into().unwrap(),
                key_offset: be32(b, o + 40),
                stripes: be32(b, o + 44),
            };
            if s.stripes != STRIPES {
                return Err(Error::invalid(format!(
                    "Keyslot {i} is corrupted (stripes {} != {STRIPES})",
                    s.stripes
                )));
            }
            if (s.key_offset as u64 * SECTOR as u64) < KEY_SLOT_OFFSET {
                return Err(Error::invalid(format!(
                    "Keyslot {i} is overlapping with the LUKS header"
                )));
            }
            let end = s.key_offset as u64 * SECTOR as u64 + split_key_len(key_bytes, s.stripes);
            if end > payload_offset as u64 * SECTOR as u64 {
                return Err(Error::invalid(format!(
                    "Keyslot {i} is overlapping with the encrypted payload"
                )));
            }
            if end > area_len {
                return Err(Error::invalid(format!(
                    "Keyslot {i} lies outside the LUKS header area"
                )));
            }
            if s.active && (s.iterations == 0 || s.iterations > MAX_ITERATIONS) {
                return Err(Error::invalid(format!(
                    "Keyslot {i} iteration count {} out of range (1..{MAX_ITERATIONS})",
                    s.iterations
                )));
            }
            slots.push(s);
        }
        for i in 0..SLOTS {
            for j in i + 1..SLOTS {
                let len = split_key_len(key_bytes, STRIPES).div_ceil(SECTOR as u64);
                let (a, b2) = (slots[i].key_offset as u64, slots[j].key_offset as u64);
                if a < b2 + len && b2 < a + len {
                    return Err(Error::invalid(format!(
                        "Keyslots {i} and {j} are overlapping in the header"
                    )));
                }
            }
        }
        Ok(LuksHeader {
            cipher_alg,
            cipher_mode: mode,
            ivgen,
            hash,
            payload_offset,
            key_bytes,
            mk_digest: b[112..132].try_into().unwrap(),
            mk_digest_salt: b[132..164].try_into().unwrap(),
            mk_digest_iter,
            uuid,
            slots,
        })
    }

    /// The header's bytes.
    pub fn serialize(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b[..6].copy_from_slice(&MAGIC);
        b[6..8].copy_from_slice(&1u16.to_be_bytes());
        let put_str = |b: &mut [u8], s: &str| b[..s.len()].copy_from_slice(s.as_bytes());
        put_str(&mut b[8..40], "aes");
        put_str(&mut b[40..72], &self.mode_string());
        put_str(&mut b[72..104], self.hash.name());
        put32(&mut b, 104, self.payload_offset);
        put32(&mut b, 108, self.key_bytes);
        b[112..132].copy_from_slice(&self.mk_digest);
        b[132..164].copy_from_slice(&self.mk_digest_salt);
        put32(&mut b, 164, self.mk_digest_iter);
        put_str(&mut b[168..208], &self.uuid);
        for (i, s) in self.slots.iter().enumerate() {
            let o = 208 + 48 * i;
            put32(
                &mut b,
                o,
                if s.active { SLOT_ACTIVE } else { SLOT_INACTIVE },
            );
            put32(&mut b, o + 4, s.iterations);
            b[o + 8..o + 40].copy_from_slice(&s.salt);
            put32(&mut b, o + 40, s.key_offset);
            put32(&mut b, o + 44, s.stripes);
        }
        b
    }

    fn mode_string(&self) -> String {
        match (self.cipher_mode, self.ivgen) {
            (CipherMode::Ecb, _) => "ecb".into(),
            (m, IvGen::Essiv(h)) => format!("{}-essiv:{}", m.name(), h.name()),
            (m, iv) => format!("{}-{}", m.name(), iv.name()),
        }
    }

    /// The cipher that encrypts guest data (and, with a slot's key, key material).
    fn cipher(&self, key: &[u8]) -> Result<SectorCipher> {
        SectorCipher::new(self.cipher_mode, self.ivgen, key)
    }

    /// Finds the slot `password` opens and returns the data cipher.
    ///
    /// `read` reads bytes at an offset relative to the header start; slot positions were
    /// validated against the area by [`LuksHeader::parse`].
    pub fn unlock(
        &self,
        password: &[u8],
        read: &dyn Fn(&mut [u8], u64) -> Result<()>,
    ) -> Result<SectorCipher> {
        Ok(self.unlock_key(password, read)?.0)
    }

    /// Like [`LuksHeader::unlock`], also returning the master key (for key-slot changes).
    pub fn unlock_key(
        &self,
        password: &[u8],
        read: &dyn Fn(&mut [u8], u64) -> Result<()>,
    ) -> Result<(SectorCipher, Zeroizing<Vec<u8>>)> {
        for i in 0..SLOTS {
            if let Some(mk) = self.try_slot(i, password, read)? {
                return Ok((self.cipher(&mk)?, mk));
            }
        }
        Err(Error::Permission(
            "Invalid password, cannot unlock any keyslot".into(),
        ))
    }

    /// The active slots `password` opens.
    pub fn matching_slots(
        &self,
        password: &[u8],
        read: &dyn Fn(&mut [u8], u64) -> Result<()>,
    ) -> Result<Vec<usize>> {
        let mut out = Vec::new();
        for i in 0..SLOTS {
            if self.try_slot(i, password, read)?.is_some() {
                out.push(i);
            }
        }
        Ok(out)
    }

    /// The master key if `password` opens slot `i`.
    fn try_slot(
        &self,
        i: usize,
        password: &[u8],
        read: &dyn Fn(&mut [u8], u64) -> Result<()>,
    ) -> Result<Option<Zeroizing<Vec<u8>>>> {
        let kb = self.key_bytes as usize;
        let s = &self.slots[i];
        if s.active {
            let mut slot_key = Zeroizing::new(vec![0u8; kb]);
            self.hash
                .pbkdf2(password, &s.salt, s.iterations, &mut slot_key);
            let len = split_key_len(self.key_bytes, s.stripes) as usize;
            let mut material = Zeroizing::new(vec![0u8; len]);
            read(&mut material, s.key_offset as u64 * SECTOR as u64)?;
            // Key material is encrypted with sector numbers counted from 0.
            self.cipher(&slot_key)?.decrypt(&mut material, 0);
            let mk = af_merge(
                self.hash,
                &material[..kb * s.stripes as usize],
                kb,
                s.stripes,
            );
            let mut digest = [0u8; DIGEST_LEN];
            self.hash
                .pbkdf2(&mk, &self.mk_digest_salt, self.mk_digest_iter, &mut digest);
            if digest == self.mk_digest {
                return Ok(Some(mk));
            }
        }
        Ok(None)
    }

    /// Byte offset of slot `i`'s key material from the header start.
    pub fn material_offset(&self, i: usize) -> u64 {
        self.slots[i].key_offset as u64 * SECTOR as u64
    }

    /// Makes slot `i` open the master key `mk` with `password` (PBKDF2 calibrated to
    /// `iter_time_ms`); returns the slot's new key material.
    pub fn set_slot(
        &mut self,
        i: usize,
        password: &[u8],
        mk: &[u8],
        iter_time_ms: u64,
    ) -> Result<Vec<u8>> {
        let kb = self.key_bytes as usize;
        let per_sec = iterations_per_second(self.hash, kb);
        let iters = u32::try_from(per_sec.saturating_mul(iter_time_ms) / 1000)
            .map_err(|_| Error::invalid("PBKDF iterations too large"))?
            .clamp(1000, MAX_ITERATIONS);
        let mut salt = [0u8; SALT_LEN];
        super::random(&mut salt)?;
        let mut slot_key = Zeroizing::new(vec![0u8; kb]);
        self.hash.pbkdf2(password, &salt, iters, &mut slot_key);
        let split = af_split(self.hash, mk, STRIPES)?;
        let mut material =
            Zeroizing::new(vec![0u8; split_key_len(self.key_bytes, STRIPES) as usize]);
        material[..split.len()].copy_from_slice(&split);
        self.cipher(&slot_key)?.encrypt(&mut material, 0);
        let s = &mut self.slots[i];
        s.active = true;
        s.iterations = iters;
        s.salt = salt;
        Ok(material.to_vec())
    }

    /// Disables slot `i`; returns random bytes to overwrite its key material with.
    pub fn erase_slot(&mut self, i: usize) -> Result<Vec<u8>> {
        let mut junk = vec![0u8; split_key_len(self.key_bytes, STRIPES) as usize];
        super::random(&mut junk)?;
        let s = &mut self.slots[i];
        s.active = false;
        s.iterations = 0;
        s.salt = [0; SALT_LEN];
        Ok(junk)
    }
}

/// LUKS's diffusion: each digest-sized block of `buf` replaced by the hash of its index
/// (big endian) and itself, truncated to the block.
fn diffuse(hash: HashAlg, buf: &mut [u8]) {
    let ds = hash.digest_len();
    for (i, chunk) in buf.chunks_mut(ds).enumerate() {
        let d = hash.digest(&[&(i as u32).to_be_bytes(), chunk]);
        let n = chunk.len();
        chunk.copy_from_slice(&d[..n]);
    }
}

/// Anti-forensic merge of `stripes` blocks of `kb` bytes into one key.
fn af_merge(hash: HashAlg, split: &[u8], kb: usize, stripes: u32) -> Zeroizing<Vec<u8>> {
    let mut d = Zeroizing::new(vec![0u8; kb]);
    let stripes = stripes as usize;
    for i in 0..stripes - 1 {
        for (x, y) in d.iter_mut().zip(&split[i * kb..(i + 1) * kb]) {
            *x ^= y;
        }
        diffuse(hash, &mut d);
    }
    for (x, y) in d.iter_mut().zip(&split[(stripes - 1) * kb..stripes * kb]) {
        *x ^= y;
    }
    d
}

/// Anti-forensic split of `key` into `stripes` blocks (random but the last).
fn af_split(hash: HashAlg, key: &[u8], stripes: u32) -> Result<Zeroizing<Vec<u8>>> {
    let kb = key.len();
    let stripes = stripes as usize;
    let mut out = Zeroizing::new(vec![0u8; kb * stripes]);
    super::random(&mut out[..kb * (stripes - 1)])?;
    let mut d = Zeroizing::new(vec![0u8; kb]);
    for i in 0..stripes - 1 {
        for (x, y) in d.iter_mut().zip(&out[i * kb..(i + 1) * kb]) {
            *x ^= y;
        }
        diffuse(hash, &mut d);
    }
    for (k, (x, y)) in key.iter().zip(d.iter()).enumerate() {
        out[(stripes - 1) * kb + k] = x ^ y;
    }
    Ok(out)
}

/// Parameters of a new LUKS header (QEMU's `encrypt.*` create options).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksParams {
    /// `encrypt.cipher-alg` (default aes-256).
    pub cipher_alg: CipherAlg,
    /// `encrypt.cipher-mode` (default xts).
    pub cipher_mode: CipherMode,
    /// `encrypt.ivgen-alg` with `encrypt.ivgen-hash-alg` (default plain64).
    pub ivgen: IvGen,
    /// `encrypt.hash-alg` (default sha256).
    pub hash: HashAlg,
    /// `encrypt.iter-time` in milliseconds (default 2000).
    pub iter_time_ms: u64,
}

impl Default for LuksParams {
    fn default() -> Self {
        LuksParams {
            cipher_alg: CipherAlg::Aes256,
            cipher_mode: CipherMode::Xts,
            ivgen: IvGen::Plain64,
            hash: HashAlg::Sha256,
            iter_time_ms: 2000,
        }
    }
}

/// PBKDF2 iterations per second for this hash and output length, measured as QEMU's
/// `qcrypto_pbkdf2_count_iters` does (repeat a fixed count until enough time passed).
fn iterations_per_second(hash: HashAlg, out_len: usize) -> u64 {
    let mut out = Zeroizing::new(vec![0u8; out_len]);
    let step = 1u32 << 13;
    let mut done = 0u64;
    let start = std::time::Instant::now();
    loop {
        hash.pbkdf2(b"qimg-calibration", &[0u8; SALT_LEN], step, &mut out);
        done += step as u64;
        let el = start.elapsed();
        if el >= std::time::Duration::from_millis(100) {
            return (done as u128 * 1_000_000 / el.as_micros().max(1)) as u64;
        }
    }
}

/// Length of the LUKS area [`create`] makes for these parameters (header and all eight
/// key slots: the payload offset in bytes).
pub fn area_len(params: &LuksParams) -> u64 {
    let key_bytes = params.cipher_alg.key_len() as u32
        * if params.cipher_mode == CipherMode::Xts {
            2
        } else {
            1
        };
    let unit = KEY_SLOT_OFFSET / SECTOR as u64;
    let stride = (split_key_len(key_bytes, STRIPES) / SECTOR as u64).div_ceil(unit) * unit;
    (unit + SLOTS as u64 * stride) * SECTOR as u64
}

/// A new LUKS area: the bytes to store at the crypto extension's offset (header plus key
/// material, `len` = payload offset), and the data cipher.
pub struct NewLuks {
    /// The whole area (header, then key slots; unused slots zero).
    pub area: Vec<u8>,
    /// The data cipher with the new master key.
    pub cipher: SectorCipher,
}

/// Creates a LUKS area with slot 0 opened by `password`; keys and salts come from the
/// operating system's random number generator.
pub fn create(params: &LuksParams, password: &[u8]) -> Result<NewLuks> {
    if params.cipher_mode == CipherMode::Ecb && params.ivgen != IvGen::Plain64 {
        return Err(Error::invalid("ECB mode takes no IV generator"));
    }
    let key_bytes = params.cipher_alg.key_len()
        * if params.cipher_mode == CipherMode::Xts {
            2
        } else {
            1
        };
    if !(key_bytes * STRIPES as usize).is_multiple_of(SECTOR) {
        // QEMU asserts on key material that does not fill whole sectors (aes-192 with a
        // single key): refuse what QEMU could not open.
        return Err(Error::invalid(format!(
            "Cipher {} in mode {} is not supported for LUKS key slots (key material is not a multiple of {SECTOR} bytes)",
            params.cipher_alg.name(),
            params.cipher_mode.name()
        )));
    }
    let mut mk = Zeroizing::new(vec![0u8; key_bytes]);
    super::random(&mut mk)?;
    let mut h = LuksHeader {
        cipher_alg: params.cipher_alg,
        cipher_mode: params.cipher_mode,
        ivgen: params.ivgen,
        hash: params.hash,
        payload_offset: 0,
        key_bytes: key_bytes as u32,
        mk_digest: [0; DIGEST_LEN],
        mk_digest_salt: [0; SALT_LEN],
        mk_digest_iter: 0,
        uuid: String::new(),
        slots: Vec::new(),
    };
    // Validates the combination (ESSIV hash size) before spending time on PBKDF2.
    let cipher = h.cipher(&mk)?;
    super::random(&mut h.mk_digest_salt)?;
    let mut u = [0u8; 16];
    super::random(&mut u)?;
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    let hex: String = u.iter().map(|b| format!("{b:02x}")).collect();
    h.uuid = format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    );
    // As QEMU (and cryptsetup): the digest gets an eighth of the time, the slot all of it.
    let scale = |per_sec: u64| -> Result<u32> {
        let it = per_sec.saturating_mul(params.iter_time_ms) / 1000;
        u32::try_from(it).map_err(|_| Error::invalid("PBKDF iterations too large"))
    };
    h.mk_digest_iter =
        (scale(iterations_per_second(params.hash, DIGEST_LEN))? / 8).clamp(1000, MAX_ITERATIONS);
    h.hash
        .pbkdf2(&mk, &h.mk_digest_salt, h.mk_digest_iter, &mut h.mk_digest);
    let split_sectors = split_key_len(key_bytes as u32, STRIPES) / SECTOR as u64;
    let stride =
        split_sectors.div_ceil(KEY_SLOT_OFFSET / SECTOR as u64) * (KEY_SLOT_OFFSET / SECTOR as u64);
    let first = KEY_SLOT_OFFSET / SECTOR as u64;
    for i in 0..SLOTS as u64 {
        h.slots.push(KeySlot {
            active: false,
            iterations: 0,
            salt: [0; SALT_LEN],
            key_offset: (first + i * stride) as u32,
            stripes: STRIPES,
        });
    }
    h.payload_offset = (first + SLOTS as u64 * stride) as u32;
    let slot_iters =
        scale(iterations_per_second(params.hash, key_bytes))?.clamp(1000, MAX_ITERATIONS);
    let mut area = vec![0u8; h.payload_offset as usize * SECTOR];
    {
        let s = &mut h.slots[0];
        s.active = true;
        s.iterations = slot_iters;
        super::random(&mut s.salt)?;
    }
    let mut slot_key = Zeroizing::new(vec![0u8; key_bytes]);
    h.hash
        .pbkdf2(password, &h.slots[0].salt, slot_iters, &mut slot_key);
    let split = af_split(h.hash, &mk, STRIPES)?;
    let len = split_key_len(key_bytes as u32, STRIPES) as usize;
    let mut material = Zeroizing::new(vec![0u8; len]);
    material[..split.len()].copy_from_slice(&split);
    h.cipher(&slot_key)?.encrypt(&mut material, 0);
    let at = h.slots[0].key_offset as usize * SECTOR;
    area[at..at + len].copy_from_slice(&material);
    area[..HEADER_LEN].copy_from_slice(&h.serialize());
    Ok(NewLuks { area, cipher })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_unlock_round_trip() {
        let p = LuksParams {
            iter_time_ms: 1,
            ..Default::default()
        };
        let n = create(&p, b"pw").unwrap();
        let h = LuksHeader::parse(&n.area, n.area.len() as u64).unwrap();
        assert_eq!(n.area.len() as u64, area_len(&p));
        assert_eq!(h.payload_offset, 4040);
        assert_eq!(h.slots[1].key_offset, 512);
        let read = |buf: &mut [u8], off: u64| -> Result<()> {
            buf.copy_from_slice(&n.area[off as usize..off as usize + buf.len()]);
            Ok(())
        };
        let c = h.unlock(b"pw", &read).unwrap();
        let mut a = vec![7u8; 512];
        let mut b = a.clone();
        c.encrypt(&mut a, 5);
        n.cipher.encrypt(&mut b, 5);
        assert_eq!(a, b);
        assert!(h.unlock(b"nope", &read).is_err());
    }

    #[test]
    fn hostile_fields_refused() {
        let p = LuksParams {
            iter_time_ms: 1,
            ..Default::default()
        };
        let n = create(&p, b"pw").unwrap();
        let len = n.area.len() as u64;
        let mut b = n.area.clone();
        b[208 + 4..208 + 8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(LuksHeader::parse(&b, len).is_err());
        let mut b = n.area.clone();
        b[208 + 40..208 + 44].copy_from_slice(&0x7fff_ffffu32.to_be_bytes());
        assert!(LuksHeader::parse(&b, len).is_err());
        let mut b = n.area.clone();
        b[108..112].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(LuksHeader::parse(&b, len).is_err());
        assert!(LuksHeader::parse(&n.area, len - 4096).is_err());
    }
}
