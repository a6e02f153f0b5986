//! L1 and L2 table entries, standard and extended, and compressed-cluster descriptors
//! (spec: "Cluster mapping", "Extended L2 Entries", "Compressed Clusters Descriptor").

/// COPIED flag (bit 63): refcount is exactly one.
pub const COPIED: u64 = 1 << 63;
/// Compressed flag (bit 62) of an L2 entry.
pub const COMPRESSED: u64 = 1 << 62;
/// "Reads as zero" flag (bit 0) of a standard L2 entry.
pub const ZERO: u64 = 1;
/// Host offset bits of L1 and standard L2 entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of an L1 entry.
pub const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of a standard L2 entry.
pub const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// An L1 entry's L2 table offset (0 = unallocated).
pub fn l1_offset(entry: u64) -> u64 {
    entry & OFFSET_MASK
}

/// How one guest cluster (or subcluster) is stored, as QEMU classifies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterType {
    /// Not allocated here: read from the backing file (or zeros).
    Unallocated,
    /// Reads as zeros, no host cluster.
    ZeroPlain,
    /// Reads as zeros, host cluster kept at this offset.
    ZeroAlloc(u64),
    /// Data at this host offset.
    Normal(u64),
    /// Compressed data (see [`CompressedDesc`]).
    Compressed(u64),
    /// Extended L2 only: host cluster allocated but this subcluster reads from backing.
    UnallocatedAlloc(u64),
}

/// Classifies a standard (64-bit) L2 entry the way QEMU does (qcow2_get_cluster_type):
/// compressed first, then the zero flag, then the offset. With an external data file an
/// offset of 0 with COPIED set is a real allocation at 0.
pub fn classify(entry: u64, extended: bool, data_file: bool) -> ClusterType {
    if entry & COMPRESSED != 0 {
        return ClusterType::Compressed(entry & !(COPIED | COMPRESSED));
    }
    let off = entry & OFFSET_MASK;
    if entry & ZERO != 0 && !extended {
        return if off != 0 {
            ClusterType::ZeroAlloc(off)
        } else {
            ClusterType::ZeroPlain
        };
    }
    if off == 0 && !(data_file && entry & COPIED != 0) {
        return ClusterType::Unallocated;
    }
    ClusterType::Normal(off)
}

/// Classifies subcluster `sc` of an extended L2 entry. Returns `None` when the bitmap is
/// invalid (a subcluster both allocated and zero, or allocation bits on an unallocated
/// cluster), which QEMU treats as corruption.
pub fn classify_subcluster(
    entry: u64,
    bitmap: u64,
    sc: u32,
    data_file: bool,
) -> Option<ClusterType> {
    let t = classify(entry, true, data_file);
    let alloc = bitmap as u32;
    let zero = (bitmap >> 32) as u32;
    match t {
        ClusterType::Compressed(_) => Some(t),
        ClusterType::Normal(off) => {
            if alloc & zero != 0 {
                return None;
            }
            if zero & (1 << sc) != 0 {
                Some(ClusterType::ZeroAlloc(off))
            } else if alloc & (1 << sc) != 0 {
                Some(ClusterType::Normal(off))
            } else {
                Some(ClusterType::UnallocatedAlloc(off))
            }
        }
        _ => {
            if alloc != 0 {
                return None;
            }
            if zero & (1 << sc) != 0 {
                Some(ClusterType::ZeroPlain)
            } else {
                Some(ClusterType::Unallocated)
            }
        }
    }
}

/// A compressed cluster descriptor decoded for a given cluster size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedDesc {
    /// Host byte offset where the compressed stream starts.
    pub offset: u64,
    /// Number of bytes to read (to the end of the last 512-byte sector).
    pub len: u64,
}

impl CompressedDesc {
    /// Decodes the low 62 bits of an L2 entry for clusters of `1 << cluster_bits` bytes.
    pub fn decode(entry: u64, cluster_bits: u32) -> CompressedDesc {
        let x = 62 - (cluster_bits - 8);
        let offset = entry & ((1u64 << x) - 1) & super::MAX_HOST_OFFSET;
        let nsect = (entry >> x) & ((1u64 << (cluster_bits - 8)) - 1);
        let len = (nsect + 1) * 512 - (offset & 511);
        CompressedDesc { offset, len }
    }

    /// Encodes a stream of `len` bytes at `offset` (QEMU's sector arithmetic), without
    /// the compressed flag.
    pub fn encode(offset: u64, len: u64, cluster_bits: u32) -> u64 {
        let x = 62 - (cluster_bits - 8);
        let nsect = (offset + len - 1) / 512 - offset / 512;
        offset | (nsect << x)
    }

    /// Host clusters touched by the stream (first, last inclusive), which each carry one
    /// reference for this descriptor.
    pub fn host_clusters(&self, cluster_bits: u32) -> (u64, u64) {
        (
            self.offset >> cluster_bits,
            (self.offset + self.len - 1) >> cluster_bits,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_standard() {
        assert_eq!(classify(0, false, false), ClusterType::Unallocated);
        assert_eq!(classify(1, false, false), ClusterType::ZeroPlain);
        assert_eq!(
            classify(0x50000 | 1, false, false),
            ClusterType::ZeroAlloc(0x50000)
        );
        assert_eq!(
            classify(COPIED | 0x50000, false, false),
            ClusterType::Normal(0x50000)
        );
        assert_eq!(classify(COPIED, false, true), ClusterType::Normal(0));
        assert_eq!(classify(COPIED, false, false), ClusterType::Unallocated);
        // The zero flag is not used with extended L2.
        assert_eq!(classify(1, true, false), ClusterType::Unallocated);
    }

    #[test]
    fn classify_extended() {
        let e = COPIED | 0xa0000;
        let bm = 0x0001_0000_0000_0002;
        assert_eq!(
            classify_subcluster(e, bm, 1, false),
            Some(ClusterType::Normal(0xa0000))
        );
        assert_eq!(
            classify_subcluster(e, bm, 16, false),
            Some(ClusterType::ZeroAlloc(0xa0000))
        );
        assert_eq!(
            classify_subcluster(e, bm, 0, false),
            Some(ClusterType::UnallocatedAlloc(0xa0000))
        );
        assert_eq!(
            classify_subcluster(0, 1 << 33, 1, false),
            Some(ClusterType::ZeroPlain)
        );
        assert_eq!(classify_subcluster(0, 1, 0, false), None);
        assert_eq!(classify_subcluster(e, 0x1_0000_0001, 0, false), None);
    }

    #[test]
    fn compressed_roundtrip_all_cluster_sizes() {
        for bits in 9..=21u32 {
            for (off, len) in [
                (0x50000u64, 20u64),
                (0x50014, 1000),
                (0x7fff_fff3, 1 << (bits - 1)),
            ] {
                let e = CompressedDesc::encode(off, len, bits);
                let d = CompressedDesc::decode(e, bits);
                assert_eq!(d.offset, off, "bits {bits}");
                assert!(d.len >= len && d.len < len + 512, "bits {bits}");
                assert_eq!((d.offset + d.len) % 512, 0);
            }
        }
        // QEMU's example: 20 bytes at 0x50014 with 64 KiB clusters, one sector.
        let d = CompressedDesc::decode(CompressedDesc::encode(0x50014, 20, 16), 16);
        assert_eq!(
            d,
            CompressedDesc {
                offset: 0x50014,
                len: 512 - 0x14
            }
        );
    }
}
