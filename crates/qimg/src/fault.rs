//! A storage layer for crash tests: it records every write since the last flush, and can
//! produce the bytes a disk might hold after a power cut at any point of the journal.
//!
//! Model: a completed flush makes every earlier write durable. Writes after the last
//! completed flush may each reach the disk fully, not at all, or torn — any subset of its
//! 512-byte sectors.

use crate::error::Result;
use crate::storage::{MemStorage, Storage};
use std::sync::Mutex;

/// One recorded operation.
#[derive(Debug, Clone)]
pub enum Op {
    /// A write of these bytes at this offset.
    Write(u64, Vec<u8>),
    /// A truncate or extend.
    SetLen(u64),
    /// A completed flush.
    Flush,
}

/// Memory storage that journals its operations.
#[derive(Debug)]
pub struct FaultStorage {
    mem: MemStorage,
    base: Vec<u8>,
    journal: Mutex<Vec<Op>>,
}

impl FaultStorage {
    /// Storage starting with `data` (already durable).
    pub fn new(data: Vec<u8>) -> FaultStorage {
        FaultStorage {
            mem: MemStorage::new(data.clone()),
            base: data,
            journal: Mutex::new(Vec::new()),
        }
    }

    /// Number of journal entries so far.
    pub fn journal_len(&self) -> usize {
        self.journal.lock().unwrap().len()
    }

    /// A copy of the journal.
    pub fn journal(&self) -> Vec<Op> {
        self.journal.lock().unwrap().clone()
    }

    /// The disk contents after a power cut right after journal entry `cut` (exclusive
    /// end), keeping each unflushed write according to `keep(write_index, sector)`.
    pub fn crash_image(&self, cut: usize, mut keep: impl FnMut(usize, usize) -> bool) -> Vec<u8> {
        let journal = self.journal.lock().unwrap();
        let cut = cut.min(journal.len());
        let last_flush = journal[..cut]
            .iter()
            .rposition(|o| matches!(o, Op::Flush))
            .map(|i| i + 1)
            .unwrap_or(0);
        let mut disk = self.base.clone();
        let apply = |disk: &mut Vec<u8>, off: u64, data: &[u8]| {
            let end = off as usize + data.len();
            if disk.len() < end {
                disk.resize(end, 0);
            }
            disk[off as usize..end].copy_from_slice(data);
        };
        for op in &journal[..last_flush] {
            match op {
                Op::Write(off, data) => apply(&mut disk, *off, data),
                Op::SetLen(l) => disk.resize(*l as usize, 0),
                Op::Flush => {}
            }
        }
        for (i, op) in journal[last_flush..cut].iter().enumerate() {
            match op {
                Op::Write(off, data) => {
                    // Tear at 512-byte boundaries of the device.
                    let mut pos = 0usize;
                    let mut sector = 0usize;
                    while pos < data.len() {
                        let abs = *off as usize + pos;
                        let n = (512 - abs % 512).min(data.len() - pos);
                        if keep(i, sector) {
                            apply(&mut disk, abs as u64, &data[pos..pos + n]);
                        }
                        pos += n;
                        sector += 1;
                    }
                }
                Op::SetLen(l) => {
                    if keep(i, 0) {
                        disk.resize(*l as usize, 0)
                    }
                }
                Op::Flush => {}
            }
        }
        disk
    }
}

impl Storage for FaultStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.mem.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut j = self.journal.lock().unwrap();
        self.mem.write_at(buf, offset)?;
        j.push(Op::Write(offset, buf.to_vec()));
        Ok(())
    }

    fn len(&self) -> Result<u64> {
        self.mem.len()
    }

    fn set_len(&self, len: u64) -> Result<()> {
        let mut j = self.journal.lock().unwrap();
        self.mem.set_len(len)?;
        j.push(Op::SetLen(len));
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.journal.lock().unwrap().push(Op::Flush);
        Ok(())
    }
}
