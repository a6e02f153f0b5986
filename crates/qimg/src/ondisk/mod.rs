//! Pure on-disk types of qcow2: parse and serialize, no I/O.
//!
//! Layouts follow the qcow2 specification (docs/interop/qcow2.rst in QEMU); the limits
//! enforced are QEMU's, listed in `shared/qcow2-reference.md` §1.14. All integers are
//! big-endian.

pub mod bitmap;
pub mod header;
pub mod l2;
pub mod meta;
pub mod refcount;
pub mod snapshot;

/// Reads a big-endian u16 at `off`.
pub(crate) fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes(b[off..off + 2].try_into().unwrap())
}
/// Reads a big-endian u32 at `off`.
pub(crate) fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().unwrap())
}
/// Reads a big-endian u64 at `off`.
pub(crate) fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().unwrap())
}
/// Writes a big-endian u16 at `off`.
pub(crate) fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_be_bytes());
}
/// Writes a big-endian u32 at `off`.
pub(crate) fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}
/// Writes a big-endian u64 at `off`.
pub(crate) fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

/// Largest host offset a qcow2 table may point to (QCOW_MAX_CLUSTER_OFFSET).
pub const MAX_HOST_OFFSET: u64 = (1 << 56) - 1;
