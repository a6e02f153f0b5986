//! Internal snapshot table entries (spec: "Snapshots").

use super::{be16, be32, be64, put16, put32, put64};
use crate::error::{Error, Result};

/// Most snapshots QEMU accepts (QCOW_MAX_SNAPSHOTS).
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Most extra data bytes per entry QEMU accepts.
pub const MAX_EXTRA_DATA: u32 = 1024;
/// Largest snapshot table QEMU accepts.
pub const MAX_TABLE_SIZE: u64 = 64 << 20;

/// One snapshot table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in the snapshot's L1 table.
    pub l1_size: u32,
    /// Unique ID string.
    pub id: String,
    /// Name (not necessarily unique).
    pub name: String,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest clock at creation, nanoseconds.
    pub vm_clock_nsec: u64,
    /// VM state size (the 64-bit value from extra data when present).
    pub vm_state_size: u64,
    /// Virtual disk size at creation, when recorded.
    pub disk_size: Option<u64>,
    /// Instruction count, when recorded (`None` for -1 or absent).
    pub icount: Option<u64>,
    /// Extra data bytes past the fields known here, kept verbatim.
    pub unknown_extra: Vec<u8>,
    /// The extra_data_size as read (0 for new entries).
    pub extra_data_size: u32,
}

impl Snapshot {
    /// Parses one entry at the start of `buf`; returns it and its length including padding.
    pub fn parse(buf: &[u8], index: usize) -> Result<(Snapshot, usize)> {
        let short = || Error::invalid("Snapshot table is truncated");
        if buf.len() < 40 {
            return Err(short());
        }
        let id_len = be16(buf, 12) as usize;
        let name_len = be16(buf, 14) as usize;
        let extra = be32(buf, 36);
        if extra > MAX_EXTRA_DATA {
            return Err(Error::invalid(format!(
                "Too much extra metadata in snapshot table entry {index}\nYou can force-remove this extra metadata with qemu-img check -r all"
            )));
        }
        let ex = extra as usize;
        let total = 40 + ex + id_len + name_len;
        if buf.len() < total {
            return Err(short());
        }
        let e = &buf[40..40 + ex];
        let vm32 = be32(buf, 32) as u64;
        let s = Snapshot {
            l1_table_offset: be64(buf, 0),
            l1_size: be32(buf, 8),
            date_sec: be32(buf, 16),
            date_nsec: be32(buf, 20),
            vm_clock_nsec: be64(buf, 24),
            vm_state_size: if ex >= 8 { be64(e, 0) } else { vm32 },
            disk_size: if ex >= 16 { Some(be64(e, 8)) } else { None },
            icount: if ex >= 24 && be64(e, 16) != u64::MAX {
                Some(be64(e, 16))
            } else {
                None
            },
            unknown_extra: if ex > 24 {
                e[24..].to_vec()
            } else {
                Vec::new()
            },
            extra_data_size: extra,
            id: String::from_utf8_lossy(&buf[40 + ex..40 + ex + id_len]).into_owned(),
            name: String::from_utf8_lossy(&buf[40 + ex + id_len..total]).into_owned(),
        };
        Ok((s, total.div_ceil(8) * 8))
    }

    /// Serializes the entry as QEMU writes it (extra data of at least 24 bytes).
    pub fn serialize(&self, out: &mut Vec<u8>) {
        self.serialize_with_names(self.id.as_bytes(), self.name.as_bytes(), out);
    }

    /// [`Snapshot::serialize`] with the ID and name given as raw bytes (a table rewritten
    /// by a repair keeps them byte for byte, even when they are not UTF-8); `self.id`
    /// and `self.name` are ignored.
    pub fn serialize_with_names(&self, id: &[u8], name: &[u8], out: &mut Vec<u8>) {
        let extra = 24 + self.unknown_extra.len();
        let start = out.len();
        out.resize(start + 40 + extra, 0);
        let b = &mut out[start..];
        put64(b, 0, self.l1_table_offset);
        put32(b, 8, self.l1_size);
        put16(b, 12, id.len() as u16);
        put16(b, 14, name.len() as u16);
        put32(b, 16, self.date_sec);
        put32(b, 20, self.date_nsec);
        put64(b, 24, self.vm_clock_nsec);
        put32(
            b,
            32,
            if self.vm_state_size > u32::MAX as u64 {
                0
            } else {
                self.vm_state_size as u32
            },
        );
        put32(b, 36, extra as u32);
        put64(b, 40, self.vm_state_size);
        put64(b, 48, self.disk_size.unwrap_or(0));
        put64(b, 56, self.icount.unwrap_or(u64::MAX));
        b[64..64 + self.unknown_extra.len()].copy_from_slice(&self.unknown_extra);
        out.extend_from_slice(id);
        out.extend_from_slice(name);
        let padded = (out.len() - start).div_ceil(8) * 8;
        out.resize(start + padded, 0);
    }
}

/// Parses a whole snapshot table of `n` entries.
pub fn parse_table(buf: &[u8], n: u32) -> Result<Vec<Snapshot>> {
    let mut out = Vec::with_capacity(n.min(1024) as usize);
    let mut off = 0;
    for i in 0..n as usize {
        let (s, len) = Snapshot::parse(&buf[off.min(buf.len())..], i)?;
        off += len;
        out.push(s);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let s = Snapshot {
            l1_table_offset: 0x70000,
            l1_size: 16,
            id: "1".into(),
            name: "snap one".into(),
            date_sec: 1_795_315_475,
            date_nsec: 46_682_000,
            vm_clock_nsec: 5_000_000_000,
            vm_state_size: 5 << 32,
            disk_size: Some(1 << 30),
            icount: None,
            unknown_extra: vec![1, 2, 3, 4, 5, 6, 7, 8],
            extra_data_size: 32,
        };
        let mut buf = Vec::new();
        s.serialize(&mut buf);
        s.serialize(&mut buf);
        assert_eq!(buf.len() % 8, 0);
        let t = parse_table(&buf, 2).unwrap();
        assert_eq!(t, vec![s.clone(), s]);
        assert!(parse_table(&buf[..50], 1).is_err());
    }
}
