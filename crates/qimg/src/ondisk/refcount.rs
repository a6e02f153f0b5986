//! Refcount table entries and refcount blocks of every width (1 to 64 bits).

/// Refblock offset bits of a refcount table entry.
pub const REFTABLE_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

/// Reads entry `i` of a refcount block whose entries are `1 << order` bits wide.
///
/// Sub-byte entries are packed least-significant bit first within each byte; wider
/// entries are big-endian.
pub fn get(block: &[u8], order: u32, i: usize) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let byte = block[i / per_byte];
            let shift = (i % per_byte) * bits;
            ((byte >> shift) as u64) & ((1u64 << bits) - 1)
        }
        3 => block[i] as u64,
        4 => u16::from_be_bytes([block[2 * i], block[2 * i + 1]]) as u64,
        5 => u32::from_be_bytes(block[4 * i..4 * i + 4].try_into().unwrap()) as u64,
        _ => u64::from_be_bytes(block[8 * i..8 * i + 8].try_into().unwrap()),
    }
}

/// Writes entry `i`; `value` must not exceed [`max`] for `order`.
pub fn set(block: &mut [u8], order: u32, i: usize, value: u64) {
    debug_assert!(value <= max(order));
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (i % per_byte) * bits;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            let b = &mut block[i / per_byte];
            *b = (*b & !mask) | (((value as u8) << shift) & mask);
        }
        3 => block[i] = value as u8,
        4 => block[2 * i..2 * i + 2].copy_from_slice(&(value as u16).to_be_bytes()),
        5 => block[4 * i..4 * i + 4].copy_from_slice(&(value as u32).to_be_bytes()),
        _ => block[8 * i..8 * i + 8].copy_from_slice(&value.to_be_bytes()),
    }
}

/// Largest refcount an entry of `1 << order` bits can hold.
pub fn max(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << order)) - 1
    }
}

/// Entries per refcount block for a cluster size and width.
pub fn entries_per_block(cluster_bits: u32, order: u32) -> u64 {
    1u64 << (cluster_bits + 3 - order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_width_roundtrips_and_packs_lsb_first() {
        for order in 0..=6u32 {
            let n = 64usize;
            let mut block = vec![0u8; 512];
            for i in 0..n {
                set(&mut block, order, i, (i as u64 * 7 + 1) & max(order));
            }
            for i in 0..n {
                assert_eq!(
                    get(&block, order, i),
                    (i as u64 * 7 + 1) & max(order),
                    "order {order}"
                );
            }
        }
        let mut b = vec![0u8; 1];
        set(&mut b, 0, 0, 1);
        assert_eq!(b[0], 0b0000_0001);
        set(&mut b, 0, 3, 1);
        assert_eq!(b[0], 0b0000_1001);
        let mut b = vec![0u8; 1];
        set(&mut b, 2, 1, 0xa);
        assert_eq!(b[0], 0xa0);
        let mut b = vec![0u8; 2];
        set(&mut b, 4, 0, 0x1234);
        assert_eq!(b, [0x12, 0x34]);
        assert_eq!(entries_per_block(16, 4), 32768);
        assert_eq!(max(0), 1);
        assert_eq!(max(6), u64::MAX);
    }
}
