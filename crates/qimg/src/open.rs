//! Opening images by name: format probing, backing chains and external data files.
//!
//! Backing files (and the image file of an add-cow image) are resolved relative to the
//! directory of the image that names them; backing files are opened read-only. The backing format comes from the header when recorded; otherwise it
//! is probed, as QEMU does.

use crate::addcow::AddCow;
use crate::error::{Error, Result};
use crate::image::Image;
use crate::ondisk::header::MAGIC;
use crate::qcow2::{Qcow2, Qcow2Options};
use crate::raw::Raw;
use crate::storage::{FileStorage, LockMode, Storage};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Deepest backing chain accepted (protects against loops that evade detection).
pub const MAX_CHAIN_DEPTH: usize = 256;

/// How to open an image.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Format name (`qcow2`, `raw`); probed when `None`.
    pub format: Option<String>,
    /// Open the top image for writing.
    pub writable: bool,
    /// Do not open the backing chain.
    pub no_backing: bool,
    /// Do not open an external data file (as `qemu-img info` does).
    pub no_data_file: bool,
    /// Open for `check` (tolerate broken metadata).
    pub check: bool,
    /// Read without taking locks that would stop a writer (`-U`).
    pub force_share: bool,
    /// Take no image locks at all.
    pub no_lock: bool,
    /// Read this internal snapshot of the top image instead of its active state.
    pub snapshot: Option<SnapshotSel>,
    /// Also open the layer this deep in the backing chain for writing (0 = the top
    /// itself, 1 = its backing file, ...): `commit` writes into a backing file, and a
    /// second, writable open of the same file would conflict with the chain's own locks.
    pub writable_depth: Option<usize>,
    /// Open without guest I/O (`qemu-img info`): encrypted images need no key. Applies
    /// to the whole chain.
    pub no_io: bool,
    /// `encrypt.*` options of the top image (a backing file's own key is not taken from
    /// here: QEMU names it `backing.encrypt.key-secret`).
    pub encrypt: crate::crypto::EncryptOptions,
}

/// How an internal snapshot is named on a command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotSel {
    /// `ID_OR_NAME`: IDs are tried first, then names.
    IdOrName(String),
    /// `snapshot.id=...,snapshot.name=...`: whichever are given must match.
    Exact {
        /// Snapshot ID.
        id: Option<String>,
        /// Snapshot name.
        name: Option<String>,
    },
}

/// Guesses the format of a file from its first bytes.
pub fn probe(storage: &dyn Storage) -> Result<&'static str> {
    let mut b = [0u8; 8];
    storage.read_at(&mut b, 0)?;
    let magic = u32::from_be_bytes(b[..4].try_into().unwrap());
    let version = u32::from_be_bytes(b[4..8].try_into().unwrap());
    if magic == MAGIC && version >= 2 {
        Ok("qcow2")
    } else if b[..4] == crate::addcow::MAGIC {
        Ok("add-cow")
    } else {
        Ok("raw")
    }
}

/// Resolves a backing (or data file) name relative to the image that names it.
pub fn resolve_relative(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() || name.contains("://") {
        return p.to_path_buf();
    }
    match image.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(p),
        _ => p.to_path_buf(),
    }
}

/// Opens a file and takes the locks its use calls for.
pub fn open_locked(path: &Path, opts: &OpenOptions) -> Result<FileStorage> {
    let f = FileStorage::open(path, opts.writable)?;
    let mode = if opts.no_lock {
        LockMode::None
    } else if opts.writable {
        LockMode::ReadWrite
    } else if opts.force_share {
        LockMode::ForceShare
    } else {
        LockMode::ReadOnly
    };
    f.lock(mode, &path.display().to_string())?;
    Ok(f)
}

/// Opens an image and, unless told otherwise, its whole backing chain.
pub fn open_image(path: &Path, opts: &OpenOptions) -> Result<Arc<dyn Image>> {
    let mut seen = Vec::new();
    open_inner(path, opts, &mut seen)
}

fn open_inner(path: &Path, opts: &OpenOptions, seen: &mut Vec<PathBuf>) -> Result<Arc<dyn Image>> {
    let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    if seen.contains(&canon) {
        return Err(Error::invalid(format!(
            "Backing file '{}' creates an infinite loop.",
            path.display()
        )));
    }
    if seen.len() >= MAX_CHAIN_DEPTH {
        return Err(Error::invalid("Backing chain is too deep"));
    }
    seen.push(canon);
    let opts = &OpenOptions {
        writable: opts.writable || opts.writable_depth == Some(0),
        ..opts.clone()
    };
    let storage: Arc<dyn Storage> = Arc::new(open_locked(path, opts)?);
    let format = match &opts.format {
        Some(f) => f.clone(),
        None => probe(storage.as_ref())?.to_string(),
    };
    match format.as_str() {
        "raw" => Ok(Arc::new(Raw::open(storage, opts.writable)?)),
        "qcow2" => Ok(Arc::new(build_qcow2(path, storage, opts, seen)?)),
        "add-cow" => Ok(Arc::new(build_addcow(path, storage, opts, seen)?)),
        other => Err(Error::unsupported(format!("Unknown driver '{other}'"))),
    }
}

/// Opens the backing image `name` of the image at `path` (read-only unless
/// `opts.writable_depth` reaches it), with `format` when the image records one.
fn open_backing(
    path: &Path,
    name: &str,
    format: Option<String>,
    opts: &OpenOptions,
    seen: &mut Vec<PathBuf>,
) -> Result<Arc<dyn Image>> {
    let bpath = resolve_relative(path, name);
    // With `writable_depth`, the layer that many levels down is opened for writing
    // (commit writes into a backing file).
    let depth = opts.writable_depth.and_then(|d| d.checked_sub(1));
    let bopts = OpenOptions {
        snapshot: None,
        format,
        writable: depth == Some(0),
        writable_depth: depth,
        force_share: opts.force_share,
        no_lock: opts.no_lock,
        no_io: opts.no_io,
        ..Default::default()
    };
    open_inner(&bpath, &bopts, seen)
        .map_err(|e| Error::invalid(format!("Could not open backing file: {e}")))
}

/// Opens an add-cow image on `storage` (its add-cow file): the image file named in the
/// header, locked and writable like the add-cow file, and (unless told otherwise) the
/// backing chain with the backing format the header records.
fn build_addcow(
    path: &Path,
    storage: Arc<dyn Storage>,
    opts: &OpenOptions,
    seen: &mut Vec<PathBuf>,
) -> Result<AddCow> {
    if opts.snapshot.is_some() {
        return Err(Error::unsupported(
            "Block format 'add-cow' does not support internal snapshots",
        ));
    }
    let header = crate::addcow::read_header(storage.as_ref())?;
    let ipath = resolve_relative(path, &header.image_file);
    let icanon = std::fs::canonicalize(&ipath).unwrap_or_else(|_| ipath.clone());
    // The image file must be neither this add-cow file nor any layer below: the second
    // open of the same file would be a second writer (or read stale data).
    if seen.contains(&icanon) {
        return Err(Error::invalid(format!(
            "add-cow image file '{}' is also the add-cow file or a backing file",
            header.image_file
        )));
    }
    seen.push(icanon);
    let iopts = OpenOptions {
        writable: opts.writable,
        force_share: opts.force_share,
        no_lock: opts.no_lock,
        ..Default::default()
    };
    let image: Arc<dyn Storage> = Arc::new(
        open_locked(&ipath, &iopts)
            .map_err(|e| Error::invalid(format!("Could not open add-cow image file: {e}")))?,
    );
    let backing = match (&header.backing_file, opts.no_backing) {
        (Some(name), false) => Some(open_backing(
            path,
            name,
            header.backing_format.clone(),
            opts,
            seen,
        )?),
        _ => None,
    };
    AddCow::open(storage, header, image, backing, opts.writable)
}

/// Opens a qcow2 image on `storage` with its data file and (unless told otherwise) its
/// backing chain.
fn build_qcow2(
    path: &Path,
    storage: Arc<dyn Storage>,
    opts: &OpenOptions,
    seen: &mut Vec<PathBuf>,
) -> Result<Qcow2> {
    let q = Qcow2Options {
        writable: opts.writable,
        check: opts.check,
        no_io: opts.no_io,
        encrypt: opts.encrypt.clone(),
    };
    let mut img = Qcow2::open(storage, q)?;
    if let Some(sel) = &opts.snapshot {
        let idx = match sel {
            SnapshotSel::IdOrName(x) => img
                .find_snapshot(Some(x), None)
                .or_else(|| img.find_snapshot(None, Some(x))),
            SnapshotSel::Exact { id, name } => img.find_snapshot(id.as_deref(), name.as_deref()),
        };
        let idx = idx.ok_or_else(|| {
            Error::NotFound("Failed to load snapshot: Can't find snapshot".into())
        })?;
        img.load_snapshot_readonly(idx)?;
    }
    let h = img.header().clone();
    if h.autoclear_features & crate::ondisk::header::autoclear::DATA_FILE_RAW != 0
        && !h.has_data_file()
        && !opts.no_data_file
    {
        return Err(Error::invalid("data-file-raw requires a data file"));
    }
    if h.has_data_file() && !opts.no_data_file {
        let name = h
            .data_file
            .as_deref()
            .ok_or_else(|| Error::invalid("'data-file' is required for this image"))?;
        let dpath = resolve_relative(path, name);
        img.set_data_file(Arc::new(open_locked(&dpath, opts)?));
    }
    if let (Some(name), false) = (&h.backing_file, opts.no_backing) {
        let backing = open_backing(path, name, h.backing_format.clone(), opts, seen)?;
        img.set_backing(Some(backing));
    }
    Ok(img)
}

/// An image opened by value, for commands that change a qcow2 image's metadata (which
/// needs `&mut Qcow2`).
pub enum OwnedImage {
    /// A qcow2 image.
    Qcow2(Box<Qcow2>),
    /// Any other format.
    Other(Arc<dyn Image>),
}

/// Opens an image like [`open_image`] but hands a qcow2 image over by value.
pub fn open_owned(path: &Path, opts: &OpenOptions) -> Result<OwnedImage> {
    let storage: Arc<dyn Storage> = Arc::new(open_locked(path, opts)?);
    let format = match &opts.format {
        Some(f) => f.clone(),
        None => probe(storage.as_ref())?.to_string(),
    };
    match format.as_str() {
        "qcow2" => {
            let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
            let mut seen = vec![canon];
            Ok(OwnedImage::Qcow2(Box::new(build_qcow2(
                path, storage, opts, &mut seen,
            )?)))
        }
        "raw" => Ok(OwnedImage::Other(Arc::new(Raw::open(
            storage,
            opts.writable,
        )?))),
        "add-cow" => {
            let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
            let mut seen = vec![canon];
            Ok(OwnedImage::Other(Arc::new(build_addcow(
                path, storage, opts, &mut seen,
            )?)))
        }
        other => Err(Error::unsupported(format!("Unknown driver '{other}'"))),
    }
}

/// Opens a qcow2 image (and, unless told otherwise, its backing chain) and returns the
/// engine itself rather than a shared handle, for operations that rewrite the header
/// (`rebase`, `commit`'s emptying and growing) and therefore need exclusive access.
pub fn open_qcow2(path: &Path, opts: &OpenOptions) -> Result<Qcow2> {
    let mut seen = vec![std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())];
    let opts = &OpenOptions {
        writable: opts.writable || opts.writable_depth == Some(0),
        ..opts.clone()
    };
    let storage: Arc<dyn Storage> = Arc::new(open_locked(path, opts)?);
    build_qcow2(path, storage, opts, &mut seen)
}
