//! `compare`: are two images' guest contents the same?
//!
//! Ranges that both images report as zeros are skipped without reading; a range allocated
//! in only one image must read as zeros there. Mismatch offsets are reported at 512-byte
//! sector granularity, as qemu-img does.

use crate::error::Result;
use crate::image::{chain_status, Image};

/// The outcome of a comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompareOutcome {
    /// Contents equal.
    Identical,
    /// First differing sector.
    ContentMismatch(u64),
    /// Strict mode: sizes differ.
    StrictSizeMismatch,
    /// Strict mode: allocation differs at this offset.
    StrictStatusMismatch(u64),
}

/// Result of [`compare`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Comparison {
    /// The outcome.
    pub outcome: CompareOutcome,
    /// Non-strict comparison of images of different sizes (qemu-img warns).
    pub size_mismatch: bool,
}

const CHUNK: u64 = 2 << 20;

fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .map(|p| p / 512 * 512)
}

fn first_nonzero(a: &[u8]) -> Option<usize> {
    a.iter().position(|&x| x != 0).map(|p| p / 512 * 512)
}

/// Compares `a` and `b`; with `strict`, sizes and allocation must match too.
pub fn compare(a: &dyn Image, b: &dyn Image, strict: bool) -> Result<Comparison> {
    let (la, lb) = (a.len(), b.len());
    if strict && la != lb {
        return Ok(Comparison {
            outcome: CompareOutcome::StrictSizeMismatch,
            size_mismatch: true,
        });
    }
    let common = la.min(lb);
    let mut ba = crate::buf::AlignedBuf::new(CHUNK as usize);
    let mut bb = crate::buf::AlignedBuf::new(CHUNK as usize);
    let mut pos = 0u64;
    while pos < common {
        // Each image is asked about the rest of itself, as qemu-img does, so that strict
        // mode sees the same flags (including "reaches the end of the image").
        let sa = chain_status(a, pos, la - pos)?;
        let sb = chain_status(b, pos, lb - pos)?;
        if strict {
            let flags = |s: &crate::image::ChainExtent, len: u64| {
                (
                    s.present,
                    s.data,
                    s.zero,
                    s.offset.is_some(),
                    pos + s.len == len,
                )
            };
            if flags(&sa, la) != flags(&sb, lb) {
                return Ok(Comparison {
                    outcome: CompareOutcome::StrictStatusMismatch(pos),
                    size_mismatch: false,
                });
            }
        }
        let n = sa.len.min(sb.len).min(common - pos).min(CHUNK);
        let za = sa.zero && !sa.data;
        let zb = sb.zero && !sb.data;
        if !(za && zb) {
            let (x, y) = (&mut ba[..n as usize], &mut bb[..n as usize]);
            if za {
                b.read_at(y, pos)?;
                if let Some(d) = first_nonzero(y) {
                    return Ok(mismatch(pos + d as u64, false));
                }
            } else if zb {
                a.read_at(x, pos)?;
                if let Some(d) = first_nonzero(x) {
                    return Ok(mismatch(pos + d as u64, false));
                }
            } else {
                a.read_at(x, pos)?;
                b.read_at(y, pos)?;
                if let Some(d) = first_diff(x, y) {
                    return Ok(mismatch(pos + d as u64, false));
                }
            }
        }
        pos += n;
    }
    let size_mismatch = la != lb;
    if size_mismatch {
        // The larger image's tail must read as zeros.
        let big = if la > lb { a } else { b };
        let end = big.len();
        let mut pos = common;
        while pos < end {
            let s = chain_status(big, pos, CHUNK.min(end - pos))?;
            if s.data || !s.zero {
                let buf = &mut ba[..s.len as usize];
                big.read_at(buf, pos)?;
                if let Some(d) = first_nonzero(buf) {
                    return Ok(mismatch(pos + d as u64, true));
                }
            }
            pos += s.len;
        }
    }
    Ok(Comparison {
        outcome: CompareOutcome::Identical,
        size_mismatch,
    })
}

fn mismatch(off: u64, size_mismatch: bool) -> Comparison {
    Comparison {
        outcome: CompareOutcome::ContentMismatch(off),
        size_mismatch,
    }
}
