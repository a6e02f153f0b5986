//! Opening images the way qemu-img's commands do, with its error messages.

use crate::ctx::Ctx;
use qimg::image::Image;
use qimg::open::{open_image, resolve_relative, OpenOptions};
use qimg::qcow2::Qcow2;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Opens `filename`, reporting failure as `<prog>: Could not open '<file>': <why>`.
pub fn open(ctx: &Ctx, filename: &str, opts: &OpenOptions) -> Result<Arc<dyn Image>, i32> {
    let opts = with_encryption(ctx, filename, opts)?;
    open_image(Path::new(filename), &opts).map_err(|e| {
        ctx.error(&format!(
            "Could not open '{}': {e}",
            crate::secrets::display_name(filename)
        ));
        1
    })
}

/// `opts` with the `encrypt.*` options `--image-opts` gave for `filename` (the secret
/// resolved), reporting an unknown secret as qemu-img does.
pub fn with_encryption(ctx: &Ctx, filename: &str, opts: &OpenOptions) -> Result<OpenOptions, i32> {
    match crate::secrets::encrypt_options(filename, opts.no_io) {
        Ok(encrypt) => Ok(OpenOptions {
            encrypt,
            ..opts.clone()
        }),
        Err(m) => {
            ctx.error(&format!(
                "Could not open '{}': {m}",
                crate::secrets::display_name(filename)
            ));
            Err(1)
        }
    }
}

/// The qcow2 engine behind an image, if it is one.
pub fn as_qcow2(img: &dyn Image) -> Option<&Qcow2> {
    img.as_any().downcast_ref::<Qcow2>()
}

/// The add-cow engine behind an image, if it is one.
pub fn as_addcow(img: &dyn Image) -> Option<&qimg::addcow::AddCow> {
    img.as_any().downcast_ref::<qimg::addcow::AddCow>()
}

/// The backing file name a layer records in its header (qcow2 or add-cow).
pub fn recorded_backing(layer: &dyn Image) -> Option<String> {
    if let Some(q) = as_qcow2(layer) {
        return q.header().backing_file.clone();
    }
    as_addcow(layer).and_then(|a| a.header().backing_file.clone())
}

/// File names of every layer of the chain, top first, as QEMU names them: the top as
/// given, each backing file resolved against the directory of the image naming it.
pub fn chain_filenames(top_name: &str, top: &dyn Image) -> Vec<String> {
    let mut names = vec![top_name.to_string()];
    let mut layer = top;
    let mut name = PathBuf::from(top_name);
    while let Some(b) = layer.backing() {
        let next = recorded_backing(layer)
            .map(|bf| resolve_relative(&name, &bf))
            .unwrap_or_default();
        names.push(next.display().to_string());
        name = next;
        layer = b.as_ref();
    }
    names
}

/// The name of the file holding a layer's data (its external data file, or an add-cow
/// image's image file).
pub fn data_filename(layer_name: &str, layer: &dyn Image) -> String {
    if let Some(a) = as_addcow(layer) {
        return resolve_relative(Path::new(layer_name), &a.header().image_file)
            .display()
            .to_string();
    }
    if let Some(q) = as_qcow2(layer) {
        if q.header().has_data_file() {
            if let Some(df) = &q.header().data_file {
                return resolve_relative(Path::new(layer_name), df)
                    .display()
                    .to_string();
            }
        }
    }
    layer_name.to_string()
}

/// The basic open options for a read-only command.
pub fn ro_options(format: Option<String>, force_share: bool) -> OpenOptions {
    OpenOptions {
        format,
        force_share,
        ..Default::default()
    }
}

/// Resolves `--image-opts` specifications (`driver=qcow2,file.filename=x.qcow2`) to a file
/// name and format; plain file names pass through.
pub fn image_spec(
    ctx: &Ctx,
    filename: &str,
    format: Option<String>,
    image_opts: bool,
) -> Result<(String, Option<String>), i32> {
    if !image_opts {
        return Ok((filename.to_string(), format));
    }
    let mut file = None;
    let mut driver = None;
    let mut enc_format = None;
    let mut key_secret = None;
    for (k, v) in crate::opts::parse_pairs(filename) {
        match k.as_str() {
            "driver" => driver = Some(v),
            "file.filename" | "filename" => file = Some(v),
            "encrypt.format" if driver.as_deref() == Some("qcow2") => enc_format = Some(v),
            "encrypt.key-secret" if driver.as_deref() == Some("qcow2") => key_secret = Some(v),
            "file.driver" | "file.locking" | "file.aio" | "read-only" | "force-share" => {}
            other => {
                ctx.error(&format!("Could not open '{filename}': Block format '{}' does not support the option '{other}'", driver.as_deref().unwrap_or("raw")));
                return Err(1);
            }
        }
    }
    if let (Some(f), true) = (&file, enc_format.is_some() || key_secret.is_some()) {
        crate::secrets::set_image_encrypt(f, filename, enc_format, key_secret);
    }
    match (file, driver) {
        (Some(f), Some(d)) if d == "file" => Ok((f, Some("raw".into()))),
        (Some(f), d) => Ok((f, d)),
        (None, _) => {
            ctx.error(&format!(
                "Could not open '{filename}': A block device must be specified for \"file\""
            ));
            Err(1)
        }
    }
}

/// Opens `filename` read-write by value (for snapshot, resize and amend), reporting failure
/// as `open` does. A raw image whose format was probed gets QEMU's warning.
pub fn open_owned_rw(
    ctx: &Ctx,
    filename: &str,
    format: Option<String>,
    no_backing: bool,
) -> Result<qimg::open::OwnedImage, i32> {
    let probed = format.is_none();
    let opts = OpenOptions {
        format,
        writable: true,
        no_backing,
        ..Default::default()
    };
    let opts = with_encryption(ctx, filename, &opts)?;
    let img = qimg::open::open_owned(Path::new(filename), &opts).map_err(|e| {
        ctx.error(&format!(
            "Could not open '{}': {e}",
            crate::secrets::display_name(filename)
        ));
        1
    })?;
    if probed && matches!(img, qimg::open::OwnedImage::Other(_)) {
        crate::ctx::eprint_ignore(&format!(
            "WARNING: Image format was not specified for '{filename}' and probing guessed raw.\n         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         Specify the 'raw' format explicitly to remove the restrictions.\n"
        ));
    }
    Ok(img)
}

/// The text QEMU prints for an errno-style library error (`strerror` where QEMU has
/// only the errno, the library's message otherwise).
pub fn errno_text(e: &qimg::Error) -> String {
    match e {
        qimg::Error::NotFound(m) | qimg::Error::Unsupported(m) => m.clone(),
        e => e.to_string(),
    }
}
