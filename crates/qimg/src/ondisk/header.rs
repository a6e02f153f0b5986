//! The qcow2 header, its extensions and feature bits (spec: "Header" and "Header
//! extensions"; limits as in `shared/qcow2-reference.md` §1.1–1.4).

use super::{be32, be64, put32, put64};
use crate::error::{Error, Result};

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Length of a version 2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Length of the version 3 header QEMU writes (with the compression type byte and padding).
pub const V3_HEADER_LEN: u32 = 112;

/// Incompatible feature bits (header offset 72).
pub mod incompat {
    /// Refcounts may be stale (lazy refcounts in use).
    pub const DIRTY: u64 = 1 << 0;
    /// Metadata may be corrupt.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in an external data file.
    pub const DATA_FILE: u64 = 1 << 2;
    /// The compression type field is non-zero.
    pub const COMPRESSION: u64 = 1 << 3;
    /// 128-bit L2 entries with subclusters.
    pub const EXTL2: u64 = 1 << 4;
    /// Every bit this implementation understands.
    pub const KNOWN: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION | EXTL2;
}

/// Compatible feature bits (header offset 80).
pub mod compat {
    /// Refcount updates may be postponed while the dirty bit is set.
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Autoclear feature bits (header offset 88).
pub mod autoclear {
    /// The bitmaps extension is consistent.
    pub const BITMAPS: u64 = 1 << 0;
    /// The external data file is a valid raw image on its own.
    pub const DATA_FILE_RAW: u64 = 1 << 1;
    /// Every bit this implementation understands.
    pub const KNOWN: u64 = BITMAPS | DATA_FILE_RAW;
}

/// Header extension type codes.
pub mod ext {
    /// End of the extension area.
    pub const END: u32 = 0;
    /// Backing file format name.
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    /// Feature name table.
    pub const FEATURE_TABLE: u32 = 0x6803_f857;
    /// Persistent bitmaps.
    pub const BITMAPS: u32 = 0x2385_2875;
    /// Full disk encryption header pointer.
    pub const CRYPTO: u32 = 0x0537_be77;
    /// External data file name.
    pub const DATA_FILE: u32 = 0x4441_5441;
}

/// Compression type codes (header byte 104).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (QEMU calls it zlib).
    Zlib,
    /// Zstandard.
    Zstd,
}

impl CompressionType {
    /// The name `qemu-img info` prints.
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// Kind of a feature-name-table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureKind {
    /// Incompatible feature.
    Incompatible = 0,
    /// Compatible feature.
    Compatible = 1,
    /// Autoclear feature.
    Autoclear = 2,
}

/// One entry of the feature name table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// Raw kind byte (0 incompatible, 1 compatible, 2 autoclear; others kept as read).
    pub kind: u8,
    /// Bit number 0..63.
    pub bit: u8,
    /// Name, at most 46 bytes.
    pub name: String,
}

/// The feature name table QEMU writes into every v3 image.
pub fn standard_feature_table() -> Vec<FeatureName> {
    let e = |kind: FeatureKind, bit: u8, name: &str| FeatureName {
        kind: kind as u8,
        bit,
        name: name.to_string(),
    };
    vec![
        e(FeatureKind::Incompatible, 0, "dirty bit"),
        e(FeatureKind::Incompatible, 1, "corrupt bit"),
        e(FeatureKind::Incompatible, 2, "external data file"),
        e(FeatureKind::Incompatible, 3, "compression type"),
        e(FeatureKind::Incompatible, 4, "extended L2 entries"),
        e(FeatureKind::Compatible, 0, "lazy refcounts"),
        e(FeatureKind::Autoclear, 0, "bitmaps"),
        e(FeatureKind::Autoclear, 1, "raw external data"),
    ]
}

/// The bitmaps header extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Number of bitmaps in the directory.
    pub nb_bitmaps: u32,
    /// Reserved, must be zero.
    pub reserved: u32,
    /// Size of the bitmap directory in bytes.
    pub directory_size: u64,
    /// Offset of the bitmap directory.
    pub directory_offset: u64,
}

/// The full disk encryption header pointer extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CryptoExt {
    /// Offset of the encryption header.
    pub offset: u64,
    /// Length of the encryption header.
    pub length: u64,
}

/// A parsed qcow2 header with its extensions.
///
/// Unknown trailing header bytes and unknown extensions are kept so that a rewrite
/// preserves them, as the specification requires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name (0: none).
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Number of active L1 entries.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Size of the refcount table in clusters.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Length of the header (72 for v2).
    pub header_length: u32,
    /// Compression type byte (0 when absent).
    pub compression_type: u8,
    /// Header bytes past the 112 this implementation knows, kept verbatim.
    pub unknown_header_bytes: Vec<u8>,
    /// Backing file format extension.
    pub backing_format: Option<String>,
    /// Feature name table as found in the image.
    pub feature_names: Vec<FeatureName>,
    /// Bitmaps extension.
    pub bitmaps: Option<BitmapsExt>,
    /// Crypto header pointer extension.
    pub crypto: Option<CryptoExt>,
    /// External data file name extension.
    pub data_file: Option<String>,
    /// Extensions this implementation does not know, as (type, data).
    pub unknown_extensions: Vec<(u32, Vec<u8>)>,
    /// Backing file name.
    pub backing_file: Option<String>,
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

impl Header {
    /// A fresh header with QEMU's defaults for a new image; tables are placed by the
    /// caller.
    pub fn new(version: u32, cluster_bits: u32, size: u64) -> Header {
        Header {
            version,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits,
            size,
            crypt_method: 0,
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: 0,
            refcount_table_clusters: 0,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: if version >= 3 {
                V3_HEADER_LEN
            } else {
                V2_HEADER_LEN
            },
            compression_type: 0,
            unknown_header_bytes: Vec::new(),
            backing_format: None,
            feature_names: Vec::new(),
            bitmaps: None,
            crypto: None,
            data_file: None,
            unknown_extensions: Vec::new(),
            backing_file: None,
        }
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Whether L2 entries are 128 bits wide.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & incompat::EXTL2 != 0
    }

    /// The compression type, validated at parse time.
    pub fn compression(&self) -> CompressionType {
        if self.compression_type == 1 {
            CompressionType::Zstd
        } else {
            CompressionType::Zlib
        }
    }

    /// Whether an external data file holds the guest data.
    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & incompat::DATA_FILE != 0
    }

    /// Parses the fixed part of the header from its first bytes (at least 104, or the
    /// whole header when longer) and checks the fields that do not depend on the file.
    ///
    /// `buf` should hold the whole first cluster when available; [`Header::min_read`]
    /// tells how many bytes are needed to learn the cluster size.
    pub fn parse(buf: &[u8]) -> Result<Header> {
        if buf.len() < 8 || be32(buf, 0) != MAGIC {
            return Err(Error::invalid("Image is not in qcow2 format"));
        }
        let version = be32(buf, 4);
        if !(2..=3).contains(&version) {
            return Err(Error::unsupported(format!(
                "Unsupported qcow2 version {version}"
            )));
        }
        if buf.len() < V2_HEADER_LEN as usize {
            return Err(Error::invalid("qcow2 header too short"));
        }
        let cluster_bits = be32(buf, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(Error::invalid(format!(
                "Unsupported cluster size: 2^{cluster_bits}"
            )));
        }
        let cs = 1u64 << cluster_bits;
        let mut h = Header::new(version, cluster_bits, be64(buf, 24));
        h.backing_file_offset = be64(buf, 8);
        h.backing_file_size = be32(buf, 16);
        h.crypt_method = be32(buf, 32);
        h.l1_size = be32(buf, 36);
        h.l1_table_offset = be64(buf, 40);
        h.refcount_table_offset = be64(buf, 48);
        h.refcount_table_clusters = be32(buf, 56);
        h.nb_snapshots = be32(buf, 60);
        h.snapshots_offset = be64(buf, 64);
        if version >= 3 {
            if buf.len() < 104 {
                return Err(Error::invalid("qcow2 header too short"));
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < 104 {
                return Err(Error::invalid("qcow2 header too short"));
            }
            if h.header_length as u64 > cs {
                return Err(Error::invalid("qcow2 header exceeds cluster size"));
            }
            if buf.len() < h.header_length as usize {
                return Err(Error::invalid("qcow2 header too short"));
            }
            if h.header_length > 104 {
                h.compression_type = buf[104];
            }
            if h.header_length > V3_HEADER_LEN {
                h.unknown_header_bytes =
                    buf[V3_HEADER_LEN as usize..h.header_length as usize].to_vec();
            }
        }
        if h.backing_file_offset > cs {
            return Err(Error::invalid("Invalid backing file offset"));
        }
        h.validate_compression_type()?;
        h.parse_extensions(buf)?;
        let unknown = h.incompatible_features & !incompat::KNOWN;
        if unknown != 0 {
            return Err(Error::unsupported(h.unknown_incompat_message(unknown)));
        }
        if h.extended_l2() && cluster_bits < 14 {
            return Err(Error::invalid(format!(
                "Unsupported subcluster size: {}",
                (1u64 << cluster_bits) / 32
            )));
        }
        if h.refcount_order > 6 {
            return Err(Error::invalid(
                "Reference count entry width too large; may not exceed 64 bits",
            ));
        }
        if h.crypt_method > 2 {
            return Err(Error::invalid(format!(
                "Unsupported encryption method {}",
                h.crypt_method
            )));
        }
        if h.backing_file_offset != 0 {
            let off = h.backing_file_offset as usize;
            let len = h.backing_file_size as usize;
            if len > 1023 || (len as u64) > cs - h.backing_file_offset {
                return Err(Error::invalid("Backing file name too long"));
            }
            if off + len > buf.len() {
                return Err(Error::invalid("Backing file name too long"));
            }
            h.backing_file = Some(lossy(&buf[off..off + len]));
        }
        Ok(h)
    }

    fn validate_compression_type(&self) -> Result<()> {
        match self.compression_type {
            0 if self.incompatible_features & incompat::COMPRESSION != 0 => Err(Error::invalid(
                "qcow2: Compression type incompatible feature bit must not be set",
            )),
            1 if self.incompatible_features & incompat::COMPRESSION == 0 => Err(Error::invalid(
                "qcow2: Compression type incompatible feature bit must be set",
            )),
            0 | 1 => Ok(()),
            t => Err(Error::unsupported(format!(
                "qcow2: unknown compression type: {t}"
            ))),
        }
    }

    /// QEMU's message for unknown incompatible bits, naming them from the image's own
    /// feature-name table where it has an entry.
    fn unknown_incompat_message(&self, unknown: u64) -> String {
        let mut parts = Vec::new();
        let mut rest = unknown;
        for f in &self.feature_names {
            if f.kind == FeatureKind::Incompatible as u8 && f.bit < 64 && rest & (1 << f.bit) != 0 {
                parts.push(f.name.clone());
                rest &= !(1 << f.bit);
            }
        }
        if rest != 0 {
            parts.push(format!("Unknown incompatible feature: {rest:x}"));
        }
        format!("Unsupported qcow2 feature(s): {}", parts.join(", "))
    }

    fn parse_extensions(&mut self, buf: &[u8]) -> Result<()> {
        let cs = self.cluster_size();
        let ext_end = if self.backing_file_offset != 0 {
            self.backing_file_offset
        } else {
            cs
        };
        let ext_end = ext_end.min(buf.len() as u64);
        let mut off = self.header_length as u64;
        let mut seen = Vec::new();
        loop {
            if off + 8 > ext_end {
                // Extensions may simply run up to the end of the area without a marker.
                if off >= ext_end {
                    break;
                }
                return Err(Error::invalid("Header extension too large"));
            }
            let typ = be32(buf, off as usize);
            let len = be32(buf, off as usize + 4) as u64;
            off += 8;
            // QEMU checks the length before looking at the type, even for the end marker.
            if len > ext_end - off {
                return Err(Error::invalid("Header extension too large"));
            }
            if typ == ext::END {
                break;
            }
            let data = &buf[off as usize..(off + len) as usize];
            // QEMU keeps every copy of an extension it does not know (qimg's own GUID and
            // key/value extensions among them); their readers judge duplicates.
            let known = matches!(
                typ,
                ext::BACKING_FORMAT | ext::BITMAPS | ext::CRYPTO | ext::DATA_FILE
            );
            if known && seen.contains(&typ) {
                return Err(Error::invalid(format!(
                    "Duplicate header extension {typ:#x}"
                )));
            }
            seen.push(typ);
            match typ {
                ext::BACKING_FORMAT => {
                    if len >= 16 {
                        return Err(Error::invalid(format!(
                            "ERROR: ext_backing_format: len={len} too large (>=16)"
                        )));
                    }
                    self.backing_format = Some(lossy(data));
                }
                ext::FEATURE_TABLE => {
                    for e in data.chunks_exact(48) {
                        let name_bytes = &e[2..48];
                        let n = name_bytes.iter().position(|&c| c == 0).unwrap_or(46);
                        self.feature_names.push(FeatureName {
                            kind: e[0],
                            bit: e[1],
                            name: lossy(&name_bytes[..n]),
                        });
                    }
                }
                ext::BITMAPS => {
                    if len != 24 {
                        return Err(Error::invalid("bitmaps_ext: Invalid extension length"));
                    }
                    self.bitmaps = Some(BitmapsExt {
                        nb_bitmaps: be32(data, 0),
                        reserved: be32(data, 4),
                        directory_size: be64(data, 8),
                        directory_offset: be64(data, 16),
                    });
                }
                ext::CRYPTO => {
                    if len != 16 {
                        return Err(Error::invalid(format!(
                            "Unable to read CRYPTO header extension: length {len} invalid"
                        )));
                    }
                    self.crypto = Some(CryptoExt {
                        offset: be64(data, 0),
                        length: be64(data, 8),
                    });
                }
                ext::DATA_FILE => self.data_file = Some(lossy(data)),
                _ => self.unknown_extensions.push((typ, data.to_vec())),
            }
            off += len.div_ceil(8) * 8;
        }
        Ok(())
    }

    /// Serializes the header, its extensions and the backing file name into one cluster,
    /// in the order QEMU writes them, and updates `backing_file_offset`/`_size`.
    ///
    /// Unknown autoclear bits are the caller's business (a writer clears them before
    /// calling). Fails when everything does not fit in the first cluster.
    pub fn serialize(&mut self) -> Result<Vec<u8>> {
        let cs = self.cluster_size() as usize;
        let mut b = vec![0u8; cs];
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, self.version);
        put32(&mut b, 20, self.cluster_bits);
        put64(&mut b, 24, self.size);
        put32(&mut b, 32, self.crypt_method);
        put32(&mut b, 36, self.l1_size);
        put64(&mut b, 40, self.l1_table_offset);
        put64(&mut b, 48, self.refcount_table_offset);
        put32(&mut b, 56, self.refcount_table_clusters);
        put32(&mut b, 60, self.nb_snapshots);
        put64(&mut b, 64, self.snapshots_offset);
        let mut off;
        if self.version >= 3 {
            self.header_length = V3_HEADER_LEN + self.unknown_header_bytes.len() as u32;
            put64(&mut b, 72, self.incompatible_features);
            put64(&mut b, 80, self.compatible_features);
            put64(&mut b, 88, self.autoclear_features);
            put32(&mut b, 96, self.refcount_order);
            put32(&mut b, 100, self.header_length);
            b[104] = self.compression_type;
            off = V3_HEADER_LEN as usize;
            let extra = &self.unknown_header_bytes;
            b[off..off + extra.len()].copy_from_slice(extra);
            off += extra.len();
        } else {
            self.header_length = V2_HEADER_LEN;
            off = V2_HEADER_LEN as usize;
        }
        let exts = self.extension_list();
        let too_big = || Error::invalid("Header does not fit in the first cluster");
        for (typ, data) in &exts {
            let padded = data.len().div_ceil(8) * 8;
            if off + 8 + padded > cs {
                return Err(too_big());
            }
            put32(&mut b, off, *typ);
            put32(&mut b, off + 4, data.len() as u32);
            b[off + 8..off + 8 + data.len()].copy_from_slice(data);
            off += 8 + padded;
        }
        if off + 8 > cs {
            return Err(too_big());
        }
        off += 8; // end marker, already zero
        match &self.backing_file {
            Some(name) => {
                if off + name.len() > cs {
                    return Err(too_big());
                }
                b[off..off + name.len()].copy_from_slice(name.as_bytes());
                self.backing_file_offset = off as u64;
                self.backing_file_size = name.len() as u32;
                put64(&mut b, 8, self.backing_file_offset);
                put32(&mut b, 16, self.backing_file_size);
            }
            None => {
                self.backing_file_offset = 0;
                self.backing_file_size = 0;
            }
        }
        Ok(b)
    }

    /// Bytes of the first cluster that [`Header::serialize`] fills: the header, every
    /// extension with its padding, the end marker and the backing file name. The rest of
    /// the cluster is what header extensions may still grow into.
    pub fn serialized_len(&self) -> usize {
        let fixed = if self.version >= 3 {
            V3_HEADER_LEN as usize + self.unknown_header_bytes.len()
        } else {
            V2_HEADER_LEN as usize
        };
        let exts: usize = self
            .extension_list()
            .iter()
            .map(|(_, d)| 8 + d.len().div_ceil(8) * 8)
            .sum();
        fixed + exts + 8 + self.backing_file.as_ref().map_or(0, |n| n.len())
    }

    /// The extensions [`Header::serialize`] writes, in QEMU's order.
    fn extension_list(&self) -> Vec<(u32, Vec<u8>)> {
        let cs = self.cluster_size() as usize;
        let mut exts: Vec<(u32, Vec<u8>)> = Vec::new();
        if let Some(f) = &self.backing_format {
            exts.push((ext::BACKING_FORMAT, f.as_bytes().to_vec()));
        }
        if let Some(f) = &self.data_file {
            exts.push((ext::DATA_FILE, f.as_bytes().to_vec()));
        }
        if let Some(c) = &self.crypto {
            let mut d = vec![0u8; 16];
            put64(&mut d, 0, c.offset);
            put64(&mut d, 8, c.length);
            exts.push((ext::CRYPTO, d));
        }
        if self.version >= 3 && cs > 4096 {
            let table = standard_feature_table();
            let mut d = vec![0u8; 48 * table.len()];
            for (i, f) in table.iter().enumerate() {
                d[i * 48] = f.kind;
                d[i * 48 + 1] = f.bit;
                d[i * 48 + 2..i * 48 + 2 + f.name.len()].copy_from_slice(f.name.as_bytes());
            }
            exts.push((ext::FEATURE_TABLE, d));
        }
        if let Some(bm) = &self.bitmaps {
            let mut d = vec![0u8; 24];
            put32(&mut d, 0, bm.nb_bitmaps);
            put32(&mut d, 4, bm.reserved);
            put64(&mut d, 8, bm.directory_size);
            put64(&mut d, 16, bm.directory_offset);
            exts.push((ext::BITMAPS, d));
        }
        exts.extend(self.unknown_extensions.iter().cloned());
        exts
    }

    /// Number of bytes to read first: enough for the fixed fields of either version.
    pub fn min_read() -> usize {
        V3_HEADER_LEN as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        let mut h = Header::new(3, 16, 1 << 30);
        h.l1_size = 2;
        h.l1_table_offset = 0x30000;
        h.refcount_table_offset = 0x10000;
        h.refcount_table_clusters = 1;
        h
    }

    #[test]
    fn roundtrip_v3_with_everything() {
        let mut h = sample();
        h.backing_file = Some("base.qcow2".into());
        h.backing_format = Some("qcow2".into());
        h.data_file = Some("data.raw".into());
        h.unknown_header_bytes = vec![1, 2, 3, 4, 5, 6, 7, 8];
        h.unknown_extensions = vec![(0x1234_5678, vec![9, 9, 9])];
        h.bitmaps = Some(BitmapsExt {
            nb_bitmaps: 1,
            reserved: 0,
            directory_size: 40,
            directory_offset: 0x50000,
        });
        let buf = h.serialize().unwrap();
        let mut p = Header::parse(&buf).unwrap();
        assert_eq!(p.feature_names, standard_feature_table());
        p.feature_names.clear();
        assert_eq!(p, h);
    }

    #[test]
    fn roundtrip_v2() {
        let mut h = Header::new(2, 16, 8 << 20);
        h.backing_file = Some("b".into());
        let buf = h.serialize().unwrap();
        assert_eq!(Header::parse(&buf).unwrap(), h);
        assert_eq!(h.backing_file_offset, 80);
    }

    #[test]
    fn rejects_bad_fields() {
        let good = sample().serialize().unwrap();
        let cases: Vec<(usize, Vec<u8>, &str)> = vec![
            (0, vec![0, 0, 0, 0], "not in qcow2 format"),
            (4, vec![0, 0, 0, 4], "Unsupported qcow2 version 4"),
            (4, vec![0, 0, 0, 1], "Unsupported qcow2 version 1"),
            (20, vec![0, 0, 0, 22], "Unsupported cluster size: 2^22"),
            (20, vec![0, 0, 0, 8], "Unsupported cluster size: 2^8"),
            (96, vec![0, 0, 0, 7], "may not exceed 64 bits"),
            (100, vec![0, 0, 0, 64], "header too short"),
            (100, vec![0, 2, 0, 0], "exceeds cluster size"),
            (79, vec![0x20], "Unknown incompatible feature: 20"),
            (104, vec![2], "unknown compression type: 2"),
            (
                116,
                vec![0xff, 0xff, 0xff, 0xf0],
                "Header extension too large",
            ),
        ];
        for (off, bytes, msg) in cases {
            let mut b = good.clone();
            b[off..off + bytes.len()].copy_from_slice(&bytes);
            let e = Header::parse(&b).unwrap_err().to_string();
            assert!(
                e.contains(msg),
                "offset {off}: {e:?} does not contain {msg:?}"
            );
        }
    }

    #[test]
    fn unknown_extensions_may_repeat_and_serialized_len_matches() {
        for mut h in [sample(), Header::new(2, 9, 1 << 20)] {
            h.unknown_extensions = vec![(0x7167_6964, vec![1; 16]), (0x7167_6964, vec![2; 3])];
            let len = h.serialized_len();
            let buf = h.serialize().unwrap();
            assert!(buf[len..].iter().all(|&b| b == 0));
            assert_eq!(
                buf[len - 16],
                2,
                "data of the last extension, before the end marker"
            );
            assert_eq!(
                Header::parse(&buf).unwrap().unknown_extensions,
                h.unknown_extensions
            );
            h.backing_file = Some("base.qcow2".into());
            let len = h.serialized_len();
            let buf = h.serialize().unwrap();
            assert_eq!(len, h.backing_file_offset as usize + 10);
            assert_eq!(&buf[len - 10..len], b"base.qcow2");
        }
    }

    #[test]
    fn names_unknown_features_from_table() {
        let mut b = sample().serialize().unwrap();
        // Rename table entry 4 (extended L2, bit 4) to bit 9 with a new name.
        let e = 112 + 8 + 4 * 48;
        b[e + 1] = 9;
        b[e + 2..e + 2 + 4].copy_from_slice(b"frob");
        b[e + 6..e + 48].fill(0);
        b[78] = 0x02; // bit 9
        let msg = Header::parse(&b).unwrap_err().to_string();
        assert_eq!(msg, "Unsupported qcow2 feature(s): frob");
    }
}
