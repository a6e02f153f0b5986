//! The storage layer: byte-addressed files under an image.
//!
//! Every format engine does its I/O through [`Storage`], so tests can swap the real file for
//! memory or for a fault-injecting layer.

use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::RwLock;

/// Positional, thread-safe byte storage.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Reads exactly `buf.len()` bytes at `offset`; bytes past the end read as zeros, because
    /// qcow2 readers must tolerate compressed data and tables that end short of a sector.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Writes all of `buf` at `offset`, extending the storage if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Current length in bytes.
    fn len(&self) -> Result<u64>;
    /// Whether the storage is empty.
    fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncates or extends to `len` bytes.
    fn set_len(&self, len: u64) -> Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<()>;
    /// Starts writing completed writes back to the device without waiting for them: a
    /// hint that lets a long copy overlap its final [`flush`](Storage::flush) with the
    /// copying. It guarantees nothing; durability still needs `flush`.
    fn start_writeback(&self) {}
    /// Bytes really allocated on the host (for `actual-size`).
    fn allocated_size(&self) -> Result<u64> {
        self.len()
    }
    /// Deallocates a range so that it reads as zeros; the default writes zeros.
    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        write_zeros(self, offset, len)
    }
    /// Makes a range read as zeros while keeping it allocated (a later write there
    /// cannot fail for lack of space); the default writes zeros.
    fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        write_zeros(self, offset, len)
    }
    /// Returns where the next data at or after `offset` starts and where it ends, if the
    /// storage knows about holes; `None` means "treat everything as data".
    fn next_data(&self, _offset: u64) -> Result<Option<(u64, u64)>> {
        Ok(None)
    }
    /// A read-only memory mapping of the whole storage, for readers that only look at most
    /// of the bytes (zero detection) and hand the rest straight to a write: it saves the
    /// copy into a buffer. `None` when the storage cannot be mapped.
    ///
    /// The caller takes on a risk plain reads do not have: if another process truncates the
    /// file while it is mapped, touching the lost tail raises SIGBUS. Use it only where that
    /// signal is handled (the CLI's convert installs a handler that exits with an error).
    fn map_readonly(&self) -> Option<Mapping> {
        None
    }
    /// Allocates space for a range about to be written in full, so the filesystem does
    /// not have to reserve it block by block during the write; best effort.
    fn preallocate(&self, _offset: u64, _len: u64) {}
    /// The file descriptor behind the storage, for copies the kernel can make itself
    /// ([`copy_range`]). `None` for storage that is not one plain file.
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
}

/// Copies `len` bytes from `src` at `src_off` to `dst` at `dst_off`, letting the kernel do
/// it (`copy_file_range`: a reflink or a server-side copy where the filesystem can, an
/// in-kernel copy otherwise) when both are plain files; falls back to reading and writing
/// through a buffer where the kernel cannot (different filesystems, old kernels, memory).
/// Bytes past the end of `src` are copied as zeros, as reads see them.
pub fn copy_range(
    src: &dyn Storage,
    src_off: u64,
    dst: &dyn Storage,
    dst_off: u64,
    len: u64,
) -> Result<()> {
    let mut done = 0u64;
    if let (Some(sfd), Some(dfd)) = (src.raw_fd(), dst.raw_fd()) {
        while done < len {
            let mut so = (src_off + done) as libc::off64_t;
            let mut d = (dst_off + done) as libc::off64_t;
            let want = (len - done).min(1 << 30) as usize;
            // SAFETY: two valid descriptors and offsets owned by this frame.
            let n = unsafe { libc::copy_file_range(sfd, &mut so, dfd, &mut d, want, 0) };
            if n > 0 {
                done += n as u64;
                continue;
            }
            if n == 0 {
                // The source ended: the rest reads as zeros, which the fallback writes.
                break;
            }
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(
                    libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | libc::EBADF,
                ) => break,
                _ => return Err(Error::io("Could not copy", err)),
            }
        }
    }
    let mut buf = vec![0u8; (len - done).min(1 << 20) as usize];
    while done < len {
        let n = ((len - done) as usize).min(buf.len());
        src.read_at(&mut buf[..n], src_off + done)?;
        dst.write_at(&buf[..n], dst_off + done)?;
        done += n as u64;
    }
    Ok(())
}

/// A read-only shared mapping of a file, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is read-only and owned; sharing `&[u8]` views across threads is sound
// as long as no one writes through it, and nothing does.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` from offset 0 read-only.
    fn new(fd: libc::c_int, len: usize) -> Option<Mapping> {
        if len == 0 {
            return None;
        }
        // SAFETY: a fresh read-only shared mapping; the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        Some(Mapping { ptr, len })
    }

    /// The mapped bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is mapped readable for as long as self lives.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }

    /// Asks the kernel to map the pages of `[offset, offset+len)` now, in one call, rather
    /// than one fault at a time. False when that failed (I/O error, range past the end of
    /// the file or of the mapping); kernels without the call count as success.
    pub fn populate(&self, offset: usize, len: usize) -> bool {
        const MADV_POPULATE_READ: libc::c_int = 22;
        let page = 4096;
        let start = offset & !(page - 1);
        let Some(end) = offset.checked_add(len).filter(|&e| e <= self.len) else {
            return false;
        };
        if start >= end {
            return true;
        }
        // SAFETY: advice on a range inside our own mapping.
        let r = unsafe {
            libc::madvise(
                (self.ptr as *mut u8).add(start) as *mut libc::c_void,
                end - start,
                MADV_POPULATE_READ,
            )
        };
        r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL)
    }
}

/// Drops the page-table entries of the whole pages inside `bytes`, a slice of a
/// [`Mapping`], so they stop counting towards the process's resident memory. The data stays
/// in the page cache and the slice stays valid: touching it again faults the pages back in.
pub fn release_mapped(bytes: &[u8]) {
    let page = 4096usize;
    let start = (bytes.as_ptr() as usize).next_multiple_of(page);
    let end = (bytes.as_ptr() as usize + bytes.len()) & !(page - 1);
    if start >= end {
        return;
    }
    // SAFETY: the range lies inside a shared read-only file mapping; MADV_DONTNEED on such
    // a mapping only drops page-table entries, the contents are unchanged on the next read.
    unsafe {
        libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe {
            libc::munmap(self.ptr, self.len);
        }
    }
}

/// Writes `len` zero bytes at `offset`, 1 MiB at a time.
pub(crate) fn write_zeros<S: Storage + ?Sized>(s: &S, offset: u64, len: u64) -> Result<()> {
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        s.write_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// How an opener takes QEMU's image locks (see `shared/qcow2-reference.md` §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Reads and writes; refuses to share write and resize.
    ReadWrite,
    /// Reads; refuses to share write and resize (so no writer can start).
    ReadOnly,
    /// Reads only, sharing everything (`-U` / force-share).
    ForceShare,
    /// No locks at all.
    None,
}

/// QEMU's permission bits, in bit order, by the names its messages use.
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

fn ofd_lock(fd: i32, cmd: i32, typ: i32, byte: i64) -> std::io::Result<libc::flock> {
    // SAFETY: flock is plain data; zeroed is a valid value before we fill it in.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = typ as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = byte;
    fl.l_len = 1;
    // SAFETY: fcntl with an OFD lock command and a valid flock pointer.
    let r = unsafe { libc::fcntl(fd, cmd, &mut fl) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl)
}

/// A real file.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    writable: bool,
}

impl FileStorage {
    /// Opens an existing file.
    pub fn open(path: &Path, writable: bool) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| Error::io(format!("Could not open '{}'", path.display()), e))?;
        Ok(FileStorage { file, writable })
    }

    /// Creates (or truncates) a file for writing.
    pub fn create(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| Error::io(format!("Could not create '{}'", path.display()), e))?;
        Ok(FileStorage {
            file,
            writable: true,
        })
    }

    /// Takes QEMU-compatible OFD byte-range locks so that QEMU and qimg never write an
    /// image the other has open. `name` is the file name for the error message.
    pub fn lock(&self, mode: LockMode, name: &str) -> Result<()> {
        use std::os::fd::AsRawFd;
        let (perms, shared): (u32, u32) = match mode {
            LockMode::None => return Ok(()),
            LockMode::ReadWrite => (0b1011, 0b0101),
            LockMode::ReadOnly => (0b0001, 0b0101),
            LockMode::ForceShare => (0b0001, 0b1111),
        };
        let fd = self.file.as_raw_fd();
        for bit in 0..4 {
            if perms & (1 << bit) != 0 {
                ofd_lock(fd, libc::F_OFD_SETLK, libc::F_RDLCK, PERM_BASE + bit)
                    .map_err(|e| Error::io("Failed to lock byte", e))?;
            }
            if shared & (1 << bit) == 0 {
                ofd_lock(fd, libc::F_OFD_SETLK, libc::F_RDLCK, SHARED_BASE + bit)
                    .map_err(|e| Error::io("Failed to lock byte", e))?;
            }
        }
        if mode == LockMode::ForceShare {
            return Ok(());
        }
        let busy = |byte: i64| -> Result<bool> {
            let fl = ofd_lock(fd, libc::F_OFD_GETLK, libc::F_WRLCK, byte)
                .map_err(|e| Error::io("Failed to test lock byte", e))?;
            Ok(fl.l_type != libc::F_UNLCK as i16)
        };
        let hint = format!("\nIs another process using the image [{name}]?");
        for bit in 0..4 {
            if perms & (1 << bit) != 0 && busy(SHARED_BASE + bit)? {
                self.unlock();
                return Err(Error::Permission(format!(
                    "Failed to get \"{}\" lock{hint}",
                    PERM_NAMES[bit as usize]
                )));
            }
        }
        for bit in 0..4 {
            if shared & (1 << bit) == 0 && busy(PERM_BASE + bit)? {
                self.unlock();
                return Err(Error::Permission(format!(
                    "Failed to get shared \"{}\" lock{hint}",
                    PERM_NAMES[bit as usize]
                )));
            }
        }
        Ok(())
    }

    fn unlock(&self) {
        use std::os::fd::AsRawFd;
        for byte in (PERM_BASE..PERM_BASE + 4).chain(SHARED_BASE..SHARED_BASE + 4) {
            let _ = ofd_lock(
                self.file.as_raw_fd(),
                libc::F_OFD_SETLK,
                libc::F_UNLCK,
                byte,
            );
        }
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Whether the file was opened for writing.
    pub fn writable(&self) -> bool {
        self.writable
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.file.write_all_at(buf, offset)?;
        Ok(())
    }

    fn len(&self) -> Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> Result<()> {
        self.file.set_len(len)?;
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.file.sync_data()?;
        Ok(())
    }

    fn start_writeback(&self) {
        use std::os::fd::AsRawFd;
        // SAFETY: plain syscall on a descriptor this storage owns; a failure (a file
        // system without it) only loses the hint.
        unsafe {
            libc::sync_file_range(self.file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
        }
    }

    fn allocated_size(&self) -> Result<u64> {
        Ok(self.file.metadata()?.blocks() * 512)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: fallocate on a valid fd with plain integer arguments.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
        // Filesystems without hole punching: fall back to writing zeros.
        write_zeros(self, offset, len)
    }

    fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        use std::os::fd::AsRawFd;
        if len == 0 {
            return Ok(());
        }
        // ZERO_RANGE turns the range into allocated, unwritten extents: cheap, and the
        // space stays reserved. Without KEEP_SIZE it also extends the file like a write.
        // SAFETY: fallocate on a valid fd with plain integer arguments.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_ZERO_RANGE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
        // Filesystems without it (tmpfs, NFS): write the zeros.
        write_zeros(self, offset, len)
    }

    fn next_data(&self, offset: u64) -> Result<Option<(u64, u64)>> {
        use std::os::fd::AsRawFd;
        let fd = self.file.as_raw_fd();
        // SAFETY: lseek on a valid fd; the file position is not used by positional I/O.
        let data = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            return match err.raw_os_error() {
                // Past the last data: everything from offset on is a hole.
                Some(libc::ENXIO) => Ok(Some((u64::MAX, u64::MAX))),
                _ => Ok(None),
            };
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Ok(None);
        }
        Ok(Some((data as u64, hole as u64)))
    }

    fn preallocate(&self, offset: u64, len: u64) {
        use std::os::fd::AsRawFd;
        // SAFETY: fallocate on a valid fd with plain integer arguments; failure is harmless.
        unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                0,
                offset as libc::off_t,
                len as libc::off_t,
            );
        }
    }

    fn map_readonly(&self) -> Option<Mapping> {
        use std::os::fd::AsRawFd;
        let len = usize::try_from(self.len().ok()?).ok()?;
        Mapping::new(self.file.as_raw_fd(), len)
    }

    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        Some(self.file.as_raw_fd())
    }
}

/// Storage in memory, for tests.
#[derive(Debug, Default)]
pub struct MemStorage {
    data: RwLock<Vec<u8>>,
}

impl MemStorage {
    /// Storage holding `data`.
    pub fn new(data: Vec<u8>) -> Self {
        MemStorage {
            data: RwLock::new(data),
        }
    }

    /// A copy of the current contents.
    pub fn contents(&self) -> Vec<u8> {
        self.data.read().unwrap().clone()
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let data = self.data.read().unwrap();
        buf.fill(0);
        if offset < data.len() as u64 {
            let start = offset as usize;
            let n = buf.len().min(data.len() - start);
            buf[..n].copy_from_slice(&data[start..start + n]);
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let end = mem_end(offset, buf.len() as u64)?;
        let mut data = self.data.write().unwrap();
        if data.len() < end {
            data.resize(end, 0);
        }
        data[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }

    fn len(&self) -> Result<u64> {
        Ok(self.data.read().unwrap().len() as u64)
    }

    fn set_len(&self, len: u64) -> Result<()> {
        let len = mem_end(len, 0)?;
        self.data.write().unwrap().resize(len, 0);
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

/// The largest file [`MemStorage`] holds. Like a filesystem's maximum file size (EFBIG),
/// so that a write at an absurd offset (from a damaged image) fails as it would on a real
/// file instead of trying to allocate that much memory.
const MEM_MAX_LEN: u64 = 1 << 30;

fn mem_end(offset: u64, len: u64) -> Result<usize> {
    match offset.checked_add(len) {
        Some(end) if end <= MEM_MAX_LEN => Ok(end as usize),
        _ => Err(Error::io(
            "Could not write",
            std::io::Error::from_raw_os_error(libc::EFBIG),
        )),
    }
}
