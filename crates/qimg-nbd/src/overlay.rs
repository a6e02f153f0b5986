//! A throw-away copy-on-write layer over an image, for `qemu-nbd -s/--snapshot`: writes
//! land in an unlinked temporary file and vanish when the server exits; the image itself
//! is opened read-only and never changes.
//!
//! Granularity is 4 KiB. A bitmap records which blocks the layer holds; unallocated blocks
//! read from the base image, which is reported as this layer's backing so block status and
//! allocation depth see a two-layer chain, as with QEMU's temporary qcow2 overlay.

use qimg::image::{Extent, Image, Status};
use qimg::storage::{FileStorage, Storage};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

const BLOCK: u64 = 4096;
const STRIPES: usize = 64;

/// A temporary writable layer over a read-only image.
#[derive(Debug)]
pub struct Overlay {
    base: Arc<dyn Image>,
    file: FileStorage,
    len: u64,
    /// One bit per block: the layer holds the block.
    map: Vec<AtomicU64>,
    /// One bit per held block: it was zeroed as a whole (a hole in the temporary file),
    /// so block status can say "zero" rather than "data", as a qcow2 zero cluster would.
    zmap: Vec<AtomicU64>,
    /// Serialises read-modify-write of partial blocks (striped by block index), so two
    /// non-overlapping sub-block writes to one block cannot both copy it up and lose one.
    stripes: Vec<Mutex<()>>,
}

impl Overlay {
    /// Creates the layer with its temporary file in `dir` (the file is unlinked at once).
    pub fn new(base: Arc<dyn Image>, dir: &Path) -> qimg::Result<Overlay> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path = dir.join(format!("qimg-nbd-snapshot.{}.{nanos}", std::process::id()));
        let file = FileStorage::create(&path)?;
        let _ = std::fs::remove_file(&path);
        let len = base.len();
        file.set_len(len)?;
        let blocks = len.div_ceil(BLOCK);
        let words = blocks.div_ceil(64) as usize;
        Ok(Overlay {
            base,
            file,
            len,
            map: (0..words).map(|_| AtomicU64::new(0)).collect(),
            zmap: (0..words).map(|_| AtomicU64::new(0)).collect(),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        })
    }

    fn held(&self, block: u64) -> bool {
        let w = &self.map[(block / 64) as usize];
        w.load(Ordering::Acquire) & (1 << (block % 64)) != 0
    }

    /// (held, zeroed) for a block.
    fn state(&self, block: u64) -> (bool, bool) {
        let z = self.zmap[(block / 64) as usize].load(Ordering::Acquire) & (1 << (block % 64));
        (self.held(block), z != 0)
    }

    /// Marks blocks held; `zero` says whether they were zeroed whole.
    fn mark(&self, first: u64, count: u64, zero: bool) {
        for b in first..first + count {
            let (i, bit) = ((b / 64) as usize, 1u64 << (b % 64));
            if zero {
                self.zmap[i].fetch_or(bit, Ordering::Release);
            } else {
                self.zmap[i].fetch_and(!bit, Ordering::Release);
            }
            self.map[i].fetch_or(bit, Ordering::Release);
        }
    }

    /// Length of the run starting at `offset` (at most `max`) whose blocks share the
    /// (held, zeroed) state of the first one.
    fn run(&self, offset: u64, max: u64) -> ((bool, bool), u64) {
        let first = offset / BLOCK;
        let state = self.state(first);
        let mut end = (first + 1) * BLOCK;
        let limit = offset + max;
        while end < limit && self.state(end / BLOCK) == state {
            end += BLOCK;
        }
        (state, end.min(limit) - offset)
    }

    fn read_base(&self, buf: &mut [u8], offset: u64) -> qimg::Result<()> {
        let blen = self.base.len();
        let inside = blen.saturating_sub(offset).min(buf.len() as u64) as usize;
        if inside > 0 {
            self.base.read_at(&mut buf[..inside], offset)?;
        }
        buf[inside..].fill(0);
        Ok(())
    }

    fn check(&self, offset: u64, len: u64) -> qimg::Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(qimg::Error::InvalidArgument(format!(
                "request {offset}+{len} past the end of the image ({})",
                self.len
            )));
        }
        Ok(())
    }

    /// Writes part of one block, copying the rest of it up from the base first if the
    /// layer does not hold it yet. `data == None` writes zeros.
    fn write_partial(&self, offset: u64, data: Option<&[u8]>, len: usize) -> qimg::Result<()> {
        let block = offset / BLOCK;
        let _g = self.stripes[(block as usize) % STRIPES]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if self.held(block) {
            match data {
                Some(d) => self.file.write_at(d, offset)?,
                None => self.file.write_at(&vec![0u8; len], offset)?,
            }
            // Part of the block may now hold data: no longer a whole-block zero.
            self.mark(block, 1, false);
            return Ok(());
        }
        let start = block * BLOCK;
        let blen = (self.len - start).min(BLOCK) as usize;
        let mut b = vec![0u8; blen];
        self.read_base(&mut b, start)?;
        let at = (offset - start) as usize;
        match data {
            Some(d) => b[at..at + len].copy_from_slice(d),
            None => b[at..at + len].fill(0),
        }
        self.file.write_at(&b, start)?;
        self.mark(block, 1, false);
        Ok(())
    }

    /// Splits `[offset, offset+len)` into a partial head, whole blocks, and a partial
    /// tail, and applies `data` (or zeros) to each.
    fn apply(&self, offset: u64, len: u64, data: Option<&[u8]>) -> qimg::Result<()> {
        self.check(offset, len)?;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let bstart = pos / BLOCK * BLOCK;
            let bend = (bstart + BLOCK).min(self.len);
            let whole_from = if pos == bstart { Some(bstart) } else { None };
            match whole_from {
                Some(_) if end >= bend => {
                    // Whole blocks from here: one I/O for the longest aligned stretch.
                    let stretch_end = if end == self.len {
                        end
                    } else {
                        end / BLOCK * BLOCK
                    };
                    let n = stretch_end - pos;
                    match data {
                        Some(d) => {
                            let s = (pos - offset) as usize;
                            self.file.write_at(&d[s..s + n as usize], pos)?;
                        }
                        None => self.file.punch_hole(pos, n)?,
                    }
                    self.mark(pos / BLOCK, n.div_ceil(BLOCK), data.is_none());
                    pos += n;
                }
                _ => {
                    let n = (bend.min(end) - pos) as usize;
                    let s = (pos - offset) as usize;
                    self.write_partial(pos, data.map(|d| &d[s..s + n]), n)?;
                    pos += n as u64;
                }
            }
        }
        Ok(())
    }
}

impl Image for Overlay {
    fn format_name(&self) -> &'static str {
        "qcow2"
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> qimg::Result<()> {
        self.check(offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let ((held, _), n) = self.run(pos, (buf.len() - done) as u64);
            let out = &mut buf[done..done + n as usize];
            if held {
                self.file.read_at(out, pos)?;
            } else {
                self.read_base(out, pos)?;
            }
            done += n as usize;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> qimg::Result<()> {
        self.apply(offset, buf.len() as u64, Some(buf))
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> qimg::Result<()> {
        self.apply(offset, len, None)
    }

    fn discard(&self, offset: u64, len: u64) -> qimg::Result<()> {
        // Like a qcow2 v3 overlay: discarded clusters read as zeros, not as the backing.
        self.apply(offset, len, None)
    }

    fn flush(&self) -> qimg::Result<()> {
        // Everything written here is discarded at exit; there is nothing to make durable.
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> qimg::Result<Extent> {
        let len = len.min(self.len.saturating_sub(offset)).max(1);
        if offset >= self.len {
            return Ok(Extent {
                start: offset,
                len,
                status: Status::UNALLOCATED,
            });
        }
        let ((held, zero), n) = self.run(offset, len);
        let status = if held && zero {
            Status::ZERO
        } else if held {
            Status {
                allocated: true,
                data: true,
                zero: false,
                offset: Some(offset),
                compressed: false,
            }
        } else {
            Status::UNALLOCATED
        };
        Ok(Extent {
            start: offset,
            len: n,
            status,
        })
    }

    fn backing(&self) -> Option<&Arc<dyn Image>> {
        Some(&self.base)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qimg::raw::Raw;
    use qimg::storage::MemStorage;

    #[test]
    fn copy_on_write_keeps_base_and_merges_partial_blocks() {
        // A whole number of sectors: raw sizes are rounded up to them.
        let base_bytes: Vec<u8> = (0..20480u32).map(|i| (i % 251) as u8).collect();
        let st = Arc::new(MemStorage::new(base_bytes.clone()));
        let base: Arc<dyn Image> = Arc::new(Raw::open(st.clone(), false).unwrap());
        let o = Overlay::new(base, &std::env::temp_dir()).unwrap();
        let mut model = base_bytes.clone();
        o.write_at(&[9u8; 100], 4000).unwrap();
        model[4000..4100].fill(9);
        o.write_at(&[7u8; 9000], 8192).unwrap();
        model[8192..17192].fill(7);
        o.write_zeroes(17000, 3000, true).unwrap();
        model[17000..20000].fill(0);
        let mut got = vec![0u8; 20480];
        o.read_at(&mut got, 0).unwrap();
        assert_eq!(got, model);
        assert_eq!(st.contents(), base_bytes);
        let e = o.block_status(0, 20480).unwrap();
        assert_eq!((e.len, e.status.allocated), (20480, true));
        assert!(o.write_at(&[1], 20480).is_err());
        let fresh = Overlay::new(o.backing().unwrap().clone(), &std::env::temp_dir()).unwrap();
        let e = fresh.block_status(100, 20000).unwrap();
        assert_eq!((e.len, e.status.allocated), (20000, false));
    }
}
