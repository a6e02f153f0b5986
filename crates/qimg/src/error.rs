//! Error type shared by every layer of the library.
//!
//! Messages are worded as QEMU words them where QEMU has a message for the same condition,
//! because scripts written for `qemu-img` match on those texts.

use std::io;

/// Result alias used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the library, with one coarse kind per variant so that
/// front ends can map errors to exit codes and NBD errno values.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error from the storage below, with what was being done.
    #[error("{context}: {}", strerror(source))]
    Io {
        /// What was being done, e.g. "Could not read L2 table".
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A bare I/O error without more context.
    #[error("{}", strerror(.0))]
    RawIo(#[from] io::Error),
    /// The image is malformed: a field has a value the format does not allow.
    #[error("{0}")]
    Invalid(String),
    /// The image uses a feature this implementation does not support.
    #[error("{0}")]
    Unsupported(String),
    /// The caller asked for something impossible (bad option, out-of-range request).
    #[error("{0}")]
    InvalidArgument(String),
    /// A runtime inconsistency was found in the image's metadata.
    #[error("{0}")]
    Corrupt(String),
    /// The operation is not permitted (read-only image, lock held by another process).
    #[error("{0}")]
    Permission(String),
    /// A named object (snapshot, bitmap, file) does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A copy (`convert`) failed reading its source or writing its target. Displayed as
    /// qemu-img reports it: the operation, the offset and the errno text only (QEMU's
    /// block layer turns every failed read, a corrupt compressed cluster included, into
    /// an errno).
    #[error("error while {} at byte {offset}: {}", if *.reading { "reading" } else { "writing" }, strerror(&io::Error::from_raw_os_error(.source.errno())))]
    Copy {
        /// True for a source read, false for a target write.
        reading: bool,
        /// The byte offset in the target where the failing request starts.
        offset: u64,
        /// What failed.
        source: Box<Error>,
    },
}

impl Error {
    /// Wraps an I/O error with context.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Shorthand for [`Error::Invalid`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }

    /// Shorthand for [`Error::Unsupported`].
    pub fn unsupported(msg: impl Into<String>) -> Self {
        Error::Unsupported(msg.into())
    }

    /// The errno value QEMU would report for this error (used for NBD replies and for
    /// messages that end in `strerror`).
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } | Error::RawIo(source) => {
                source.raw_os_error().unwrap_or(libc::EIO)
            }
            Error::Invalid(_) | Error::InvalidArgument(_) => libc::EINVAL,
            Error::Unsupported(_) => libc::ENOTSUP,
            Error::Corrupt(_) => libc::EIO,
            Error::Permission(_) => libc::EPERM,
            Error::NotFound(_) => libc::ENOENT,
            Error::Copy { source, .. } => source.errno(),
        }
    }
}

/// The C library's text for an I/O error (as QEMU prints it), without Rust's
/// "(os error N)" suffix.
pub fn strerror(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => {
            // SAFETY: strerror returns a pointer to a static or thread-local C string.
            let p = unsafe { libc::strerror(code) };
            if p.is_null() {
                return e.to_string();
            }
            // SAFETY: p is a valid NUL-terminated string.
            unsafe { std::ffi::CStr::from_ptr(p) }
                .to_string_lossy()
                .into_owned()
        }
        None => e.to_string(),
    }
}
