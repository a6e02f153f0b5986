//! Zero-copy views of image data: the files under an image (and its backing chain) mapped
//! read-only, and guest ranges looked up in them.
//!
//! Readers that only inspect data and pass it on (convert's zero detection and write, the
//! NBD server's read replies) save one copy of every byte this way. The price is a rule the
//! caller must keep: a file truncated by someone else while mapped raises SIGBUS when user
//! code touches the lost pages. Code that only hands views to the kernel (`write`, `send`)
//! gets EFAULT instead; code that reads them itself must handle SIGBUS (the CLI does).
//!
//! Views see the file as it is: like a plain read racing a write, a view of a range that
//! is concurrently rewritten may show old or new bytes.

use crate::error::Result;
use crate::image::{chain_status, Image};
use crate::storage::Mapping;

/// The file holding one layer's guest data at the host offsets its block status reports:
/// a raw image's file, a qcow2 image's data file (or the image file), an add-cow image's
/// image file (copied clusters sit at their guest offsets there). `None` for other formats.
pub(crate) fn data_file(layer: &dyn Image) -> Option<&std::sync::Arc<dyn crate::storage::Storage>> {
    let any = layer.as_any();
    if let Some(r) = any.downcast_ref::<crate::raw::Raw>() {
        Some(r.file())
    } else if let Some(q) = any.downcast_ref::<crate::qcow2::Qcow2>() {
        Some(q.data_file().unwrap_or(q.file()))
    } else {
        any.downcast_ref::<crate::addcow::AddCow>()
            .map(|a| a.image_file())
    }
}

/// The mapped files of one image's layers.
#[derive(Debug)]
pub struct MappedLayers {
    /// By backing depth, top first: the file holding that layer's guest data.
    maps: Vec<Option<Mapping>>,
}

impl MappedLayers {
    /// Maps the file holding each layer's guest data, top first, down to the first layer
    /// that is not raw, qcow2 or add-cow (ranges stored below it get no view).
    pub fn new(top: &dyn Image) -> MappedLayers {
        let mut maps = Vec::new();
        let mut layer = Some(top);
        while let Some(l) = layer {
            let Some(file) = data_file(l) else {
                break;
            };
            maps.push(file.map_readonly());
            layer = l.backing().map(|b| b.as_ref());
        }
        MappedLayers { maps }
    }

    /// Whether no layer could be mapped (every [`MappedLayers::view`] returns `None`).
    pub fn is_empty(&self) -> bool {
        self.maps.iter().all(Option::is_none)
    }

    /// The bytes of guest range `[offset, offset+len)` of `img` (the image given to
    /// [`MappedLayers::new`]) when one layer stores all of them uncompressed in one
    /// contiguous host range, with their pages mapped; `None` otherwise, and when the pages
    /// cannot be mapped (an I/O error, a file shorter than the mapping): the caller then
    /// reads the ordinary way and gets the ordinary error.
    pub fn view(&self, img: &dyn Image, offset: u64, len: u64) -> Result<Option<&[u8]>> {
        if self.is_empty() || len == 0 || offset.checked_add(len).is_none_or(|e| e > img.len()) {
            return Ok(None);
        }
        let e = chain_status(img, offset, len)?;
        let host = match e.offset {
            Some(h) if e.len == len && e.present && e.data && !e.zero && !e.compressed => h,
            _ => return Ok(None),
        };
        let Some(m) = self.maps.get(e.depth as usize).and_then(Option::as_ref) else {
            return Ok(None);
        };
        let (Ok(host), Ok(len)) = (usize::try_from(host), usize::try_from(len)) else {
            return Ok(None);
        };
        let Some(bytes) = host
            .checked_add(len)
            .and_then(|end| m.bytes().get(host..end))
        else {
            return Ok(None);
        };
        // One call maps all the pages (faulting them one by one costs more), and it
        // reports the errors a read would have met.
        if !m.populate(host, len) {
            return Ok(None);
        }
        Ok(Some(bytes))
    }
}
