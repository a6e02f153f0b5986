//! Compressed cluster codecs: raw deflate (QEMU's "zlib", window bits 12, no header) and
//! zstd, with QEMU's acceptance rules.

use crate::error::{Error, Result};
use crate::ondisk::header::CompressionType;
use std::io::Read;

/// Decompresses one cluster of `cluster_size` bytes from `input` (which may carry trailing
/// bytes past the end of the stream, since descriptors are sector-granular).
pub fn decompress(ty: CompressionType, input: &[u8], cluster_size: usize) -> Result<Vec<u8>> {
    let mut out = vec![0u8; cluster_size];
    let bad = || Error::Corrupt("Could not decompress cluster".into());
    match ty {
        CompressionType::Zlib => {
            let mut d = flate2::Decompress::new(false);
            match d.decompress(input, &mut out, flate2::FlushDecompress::Finish) {
                Ok(_) if d.total_out() as usize == cluster_size => {}
                _ => return Err(bad()),
            }
        }
        CompressionType::Zstd => {
            let mut dec = zstd::stream::read::Decoder::with_buffer(input).map_err(|_| bad())?;
            dec.read_exact(&mut out).map_err(|_| bad())?;
        }
    }
    Ok(out)
}

/// Compresses one cluster the way QEMU stores it; `None` when the result would not be
/// smaller than the cluster (QEMU then stores the cluster uncompressed).
pub fn compress(ty: CompressionType, input: &[u8]) -> Result<Option<Vec<u8>>> {
    // Codec state is kept per thread: setting up a deflate or zstd context costs about as
    // much as compressing a small cluster, and convert compresses every cluster.
    thread_local! {
        static DEFLATE: std::cell::RefCell<Option<flate2::Compress>> =
            const { std::cell::RefCell::new(None) };
        static ZSTD: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    let limit = input.len() - 1;
    let mut out = vec![0u8; limit];
    let n = match ty {
        CompressionType::Zlib => DEFLATE.with(|cell| {
            let mut cell = cell.borrow_mut();
            // Default level, raw deflate with a 4 KiB window as QEMU's deflateInit2(-12).
            let c = cell.get_or_insert_with(|| {
                flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12)
            });
            c.reset();
            match c.compress(input, &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) => Some(c.total_out() as usize),
                _ => None,
            }
        }),
        CompressionType::Zstd => ZSTD.with(|cell| -> Result<Option<usize>> {
            let mut cell = cell.borrow_mut();
            let c = match cell.as_mut() {
                Some(c) => c,
                None => {
                    cell.insert(zstd::bulk::Compressor::new(0).map_err(|e| Error::io("zstd", e))?)
                }
            };
            // A destination one byte short of the cluster makes zstd give up as soon as
            // the frame would not be smaller, which is QEMU's "store it uncompressed".
            Ok(c.compress_to_buffer(input, &mut out[..]).ok())
        })?,
    };
    Ok(n.map(|n| {
        out.truncate(n);
        // Callers keep many of these until they are committed in order.
        out.shrink_to_fit();
        out
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_both_codecs_with_trailing_garbage() {
        let mut data = vec![0u8; 65536];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i / 100) as u8;
        }
        for ty in [CompressionType::Zlib, CompressionType::Zstd] {
            let mut c = compress(ty, &data).unwrap().unwrap();
            c.extend_from_slice(&[0xaa; 300]);
            assert_eq!(decompress(ty, &c, 65536).unwrap(), data);
            assert!(decompress(ty, &c[..c.len() / 4], 65536).is_err());
        }
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let random: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect();
        assert_eq!(compress(CompressionType::Zlib, &random).unwrap(), None);
    }
}
