//! Shared by the mutation fuzz tests (`crates/qimg/tests/fuzz_open.rs` and
//! `crates/qimg-cli/tests/fuzz_cli.rs`): a seeded generator and the image mutator.

#![allow(dead_code)]

/// A small seeded generator (splitmix64), so every case can be replayed from its seed.
pub struct Rng(pub u64);
impl Rng {
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        // splitmix64: good enough spread for picking offsets and values.
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// A value below `n` (0 for `n` = 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Values that tend to sit on the edges of what a field allows.
const INTERESTING: &[u64] = &[
    0,
    1,
    0x1ff,
    0x200,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 40,
    0x00ff_ffff_ffff_fe00,
    0x8000_0000_0000_0000,
    0xc000_0000_0000_0000,
    0x4000_0000_0000_0000,
    u64::MAX,
];

/// Applies 1 to 4 mutations; most land in the first clusters, where QEMU keeps the header,
/// the tables and the first L2 tables of a small image.
pub fn mutate(rng: &mut Rng, img: &mut [u8]) -> Vec<String> {
    let cs = 1u64 << u32::from_be_bytes(img[20..24].try_into().unwrap()).clamp(9, 21);
    let meta = (8 * cs).max(64 << 10).min(img.len() as u64);
    let mut log = Vec::new();
    for _ in 0..1 + rng.below(4) {
        let span = if rng.below(10) < 8 {
            meta
        } else {
            img.len() as u64
        };
        match rng.below(4) {
            0 => {
                let at = rng.below(span) as usize;
                let bit = rng.below(8);
                img[at] ^= 1 << bit;
                log.push(format!("flip bit {bit} of byte {at:#x}"));
            }
            1 => {
                let at = rng.below(span) as usize;
                let v = rng.next() as u8;
                img[at] = v;
                log.push(format!("byte {at:#x} = {v:#x}"));
            }
            2 => {
                let at = (rng.below(span.saturating_sub(8)) & !7) as usize;
                let mut v = INTERESTING[rng.below(INTERESTING.len() as u64) as usize];
                if rng.below(3) == 0 {
                    // A plausible offset instead: cluster-aligned, near the file's end.
                    v = (rng.below(img.len() as u64 / cs + 4) * cs) | (v & (1 << 63));
                }
                img[at..at + 8].copy_from_slice(&v.to_be_bytes());
                log.push(format!("u64 at {at:#x} = {v:#x}"));
            }
            _ => {
                let at = (rng.below(span.saturating_sub(4)) & !3) as usize;
                let v = INTERESTING[rng.below(INTERESTING.len() as u64) as usize] as u32;
                img[at..at + 4].copy_from_slice(&v.to_be_bytes());
                log.push(format!("u32 at {at:#x} = {v:#x}"));
            }
        }
    }
    log
}
