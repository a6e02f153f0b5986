//! Persistent dirty bitmap directory entries (spec: "Bitmaps extension").

use super::{be16, be32, be64};
use crate::error::{Error, Result};

/// Directory entry flag: the bitmap was not saved cleanly.
pub const FLAG_IN_USE: u32 = 1;
/// Directory entry flag: the bitmap is enabled (tracks writes).
pub const FLAG_AUTO: u32 = 2;
/// Flags QEMU accepts.
pub const FLAGS_KNOWN: u32 = FLAG_IN_USE | FLAG_AUTO;

/// One bitmap directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapEntry {
    /// Offset of the bitmap table.
    pub table_offset: u64,
    /// Entries in the bitmap table.
    pub table_size: u32,
    /// Flags.
    pub flags: u32,
    /// Bitmap type (1 = dirty tracking).
    pub typ: u8,
    /// log2 of the granularity in bytes.
    pub granularity_bits: u8,
    /// Extra data, kept verbatim.
    pub extra: Vec<u8>,
    /// Name.
    pub name: String,
}

impl BitmapEntry {
    /// QEMU's per-entry constraints (type, granularity, table placement and size, flags).
    pub fn satisfies_constraints(&self, cluster_size: u64) -> bool {
        self.table_offset != 0
            && self.table_offset.is_multiple_of(cluster_size)
            && self.table_size >= 1
            && self.table_size <= 0x800_0000
            && (self.table_size as u64) * cluster_size <= 512 << 20
            && self.flags & !FLAGS_KNOWN == 0
            && self.typ == 1
            && (9..=31).contains(&self.granularity_bits)
            && !self.name.is_empty()
            && self.name.len() <= 1023
    }
}

/// Parses a bitmap directory of `n` entries occupying exactly `buf`, checking each entry
/// as QEMU does when it loads the directory (in its order, with its messages).
pub fn parse_directory(buf: &[u8], n: u32, cluster_size: u64) -> Result<Vec<BitmapEntry>> {
    let broken = || Error::invalid("Broken bitmap directory");
    let mut out = Vec::new();
    let mut off = 0usize;
    while off < buf.len() {
        if buf.len() - off < 24 {
            return Err(broken());
        }
        let b = &buf[off..];
        let name_len = be16(b, 18) as usize;
        let extra_len = be32(b, 20) as usize;
        if extra_len != 0 {
            return Err(Error::unsupported("Bitmap extra data is not supported"));
        }
        let total = 24 + name_len;
        if total > b.len() {
            return Err(broken());
        }
        if out.len() as u64 >= n as u64 {
            return Err(Error::invalid(
                "More bitmaps found than specified in header extension",
            ));
        }
        let e = BitmapEntry {
            table_offset: be64(b, 0),
            table_size: be32(b, 8),
            flags: be32(b, 12),
            typ: b[16],
            granularity_bits: b[17],
            extra: Vec::new(),
            name: String::from_utf8_lossy(&b[24..total]).into_owned(),
        };
        if !e.satisfies_constraints(cluster_size) {
            return Err(Error::invalid(format!(
                "Bitmap '{}' doesn't satisfy the constraints",
                e.name
            )));
        }
        out.push(e);
        off += total.div_ceil(8) * 8;
    }
    if out.len() as u64 != n as u64 {
        return Err(Error::invalid(
            "Less bitmaps found than specified in header extension",
        ));
    }
    Ok(out)
}

/// Offset bits of a bitmap table entry (bits 9-55).
pub const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of a bitmap table entry (bits 1-8 and 56-63).
pub const TABLE_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// Table entry flag: with offset 0, the whole cluster of bits is set.
pub const TABLE_ALL_ONES: u64 = 1;

/// Whether a bitmap table entry is one QEMU accepts when loading.
pub fn table_entry_ok(e: u64, cluster_size: u64) -> bool {
    let off = e & TABLE_OFFSET_MASK;
    e & TABLE_RESERVED_MASK == 0
        && off & (cluster_size - 1) == 0
        && !(off != 0 && e & TABLE_ALL_ONES != 0)
}

/// Bitmap table entries needed for `size` guest bytes at `2^granularity_bits` per bit
/// with `cluster_size`-byte data clusters (QEMU requires exactly this many on load).
pub fn table_size_for(size: u64, granularity_bits: u8, cluster_size: u64) -> u64 {
    let bits = size.div_ceil(1u64 << granularity_bits.min(63));
    bits.div_ceil(cluster_size * 8)
}

impl BitmapEntry {
    /// Appends the serialized entry (header, name, zero padding to 8 bytes) to `out`.
    pub fn serialize(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.resize(start + 24, 0);
        let b = &mut out[start..];
        super::put64(b, 0, self.table_offset);
        super::put32(b, 8, self.table_size);
        super::put32(b, 12, self.flags);
        b[16] = self.typ;
        b[17] = self.granularity_bits;
        super::put16(b, 18, self.name.len() as u16);
        super::put32(b, 20, self.extra.len() as u32);
        out.extend_from_slice(&self.extra);
        out.extend_from_slice(self.name.as_bytes());
        out.resize(out.len().div_ceil(8) * 8, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_round_trip() {
        let e = BitmapEntry {
            table_offset: 0x30000,
            table_size: 1,
            flags: FLAG_AUTO,
            typ: 1,
            granularity_bits: 16,
            extra: Vec::new(),
            name: "bm0".into(),
        };
        let mut buf = Vec::new();
        e.serialize(&mut buf);
        e.serialize(&mut buf);
        assert_eq!(buf.len(), 64);
        let v = parse_directory(&buf, 2, 65536).unwrap();
        assert_eq!(v, vec![e.clone(), e]);
    }

    #[test]
    fn table_entries() {
        let cs = 65536;
        assert!(table_entry_ok(0, cs));
        assert!(table_entry_ok(1, cs));
        assert!(table_entry_ok(0x10000, cs));
        assert!(!table_entry_ok(0x10001, cs));
        assert!(!table_entry_ok(2, cs));
        assert!(!table_entry_ok(0x200, cs));
        assert!(!table_entry_ok(1 << 60, cs));
        assert_eq!(table_size_for(64 << 20, 16, cs), 1);
        assert_eq!(table_size_for(1 << 40, 9, 512), 1 << 19);
    }
}
