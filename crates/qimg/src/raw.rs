//! Raw images: the file is the disk.

use crate::error::{Error, Result};
use crate::image::{Extent, Image, Status};
use crate::storage::Storage;
use std::sync::Arc;

/// A raw image over some storage.
#[derive(Debug)]
pub struct Raw {
    file: Arc<dyn Storage>,
    len: u64,
    writable: bool,
}

impl Raw {
    /// Opens raw storage. The virtual size is the file length rounded up to whole
    /// 512-byte sectors, as QEMU's block layer reports it (`qemu-img info` shows 1024 for
    /// a 1000-byte file); the tail past the end of the file reads as zeros.
    pub fn open(file: Arc<dyn Storage>, writable: bool) -> Result<Raw> {
        let flen = file.len()?;
        let len = flen.checked_add(511).map_or(flen & !511, |v| v & !511);
        Ok(Raw {
            file,
            len,
            writable,
        })
    }

    /// The underlying storage.
    pub fn file(&self) -> &Arc<dyn Storage> {
        &self.file
    }

    fn check_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::Permission("Image is read-only".into()))
        }
    }
}

impl Image for Raw {
    fn format_name(&self) -> &'static str {
        "raw"
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        self.file.write_at(buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check_writable()?;
        // Only release space when the caller allows it (NBD's NO_HOLE, qemu-nbd's
        // --discard=ignore): a guest that zeroes a preallocated disk expects it to stay
        // allocated.
        if may_unmap {
            self.file.punch_hole(offset, len)
        } else {
            self.file.zero_range(offset, len)
        }
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.file.punch_hole(offset, len)
    }

    fn flush(&self) -> Result<()> {
        self.file.flush()
    }

    fn start_writeback(&self) {
        self.file.start_writeback()
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let data = Status {
            allocated: true,
            data: true,
            zero: false,
            offset: Some(offset),
            compressed: false,
        };
        let hole = Status {
            allocated: true,
            data: false,
            zero: true,
            offset: Some(offset),
            compressed: false,
        };
        let (status, n) = match self.file.next_data(offset)? {
            None => (data, len),
            Some((d, h)) if d <= offset => (data, (h - offset).min(len)),
            Some((d, _)) => (hole, (d - offset).min(len)),
        };
        Ok(Extent {
            start: offset,
            len: n.max(1).min(len),
            status,
        })
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
