//! `dd`: copies a byte range of one image to the start of another, `dd` style.
//!
//! qemu-img's `dd` sizes its work in a way worth spelling out: the range read is
//! `[skip*bs, min(count*bs, input length))` — `count` counts from the start of the input,
//! not from the skip point — and the output is created with exactly that length. Every
//! byte is written (zeros included), so a qcow2 output is fully allocated, as with
//! qemu-img. Copying in pieces larger than `bs` changes nothing visible and is faster.

use crate::error::Result;
use crate::image::Image;

/// What a `dd` invocation copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DdPlan {
    /// First input byte copied.
    pub start: u64,
    /// Bytes copied (and the size of the output).
    pub len: u64,
    /// The skip point lies past the end of what would be copied ("cannot skip").
    pub skip_too_far: bool,
}

/// Works out the range `dd` copies from an input of `input_len` bytes.
pub fn plan(input_len: u64, bs: u64, count: Option<u64>, skip: u64) -> DdPlan {
    let mut size = input_len;
    if let Some(c) = count {
        if let Some(b) = c.checked_mul(bs) {
            size = size.min(b);
        }
    }
    match skip.checked_mul(bs) {
        Some(s) if s <= size => DdPlan {
            start: s,
            len: size - s,
            skip_too_far: false,
        },
        _ => DdPlan {
            start: size,
            len: 0,
            skip_too_far: skip != 0,
        },
    }
}

/// Bytes moved per request.
const PIECE: u64 = 4 << 20;

/// Copies `plan.len` bytes from `input` at `plan.start` to `output` at 0.
pub fn dd(input: &dyn Image, output: &dyn Image, plan: &DdPlan) -> Result<()> {
    let mut buf = crate::buf::AlignedBuf::new(PIECE.min(plan.len.max(1)) as usize);
    let mut done = 0;
    while done < plan.len {
        let n = (plan.len - done).min(PIECE) as usize;
        input.read_at(&mut buf[..n], plan.start + done)?;
        output.write_at(&buf[..n], done)?;
        done += n as u64;
    }
    output.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_like_qemu_img() {
        let m = 1 << 20;
        assert_eq!(plan(4 * m, m, None, 1).len, 3 * m);
        // count counts from the start of the input.
        let p = plan(4 * m, 64 << 10, Some(5), 2);
        assert_eq!((p.start, p.len), (128 << 10, 192 << 10));
        assert!(plan(4 * m, m, None, 5).skip_too_far);
        assert!(!plan(4 * m, m, None, 4).skip_too_far);
        assert_eq!(plan(4 * m, m, Some(2), 3).len, 0);
        assert_eq!(plan(4 * m, u64::MAX, Some(u64::MAX), 0).len, 4 * m);
    }
}
