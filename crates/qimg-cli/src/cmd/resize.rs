//! `qemu-img resize`: change the virtual size of an image.
//!
//! Unlike the other commands, operands are taken in order, and a word starting with `-`
//! and a digit right after the file name is the size (`qimg resize img -1G`).
use crate::args::{Getopt, HasArg, Item, Key, LongOpt};
use crate::ctx::{Ctx, Parsed};
use crate::opts::{option_size_error, parse_size, Prealloc};

const CMD: &str = "resize";

/// `qemu-img resize --help` text (`qemu-img` is replaced by the program name).
pub const HELP: &str = r#"Usage:
Resize the image to the new size.  Usage:

  qemu-img resize [-f FMT | --image-opts] [--preallocation PREALLOC] [--shrink]
        [--object OBJECTDEF] [-q] FILENAME [+-]SIZE[bkKMGTPE]

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operation
  -f, --format FMT
     specify FILENAME format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
   instead of a file name (incompatible with --format)
  --shrink
     allow operation when new size is smaller than original
  --preallocation PREALLOC
     specify preallocation type for the new areas
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  FILENAME
     image file (specification) to resize
  [+-]SIZE[bkKMGTPE]
     new image size or amount by which to shrink/grow,
     with optional suffix (1024-based multiplies)

"#;

/// Short options, in getopt syntax.
const SHORT: &str = "-f:hq";
const IMAGE_OPTS: u16 = 1;
const OBJECT: u16 = 2;
const PREALLOCATION: u16 = 3;
const SHRINK: u16 = 4;

/// Long options, in the table order that decides how ambiguities are listed.
const LONG: &[LongOpt] = &[
    LongOpt::new("help", HasArg::No, Key::Short('h')),
    LongOpt::new("format", HasArg::Required, Key::Short('f')),
    LongOpt::new("image-opts", HasArg::No, Key::Long(IMAGE_OPTS)),
    LongOpt::new("object", HasArg::Required, Key::Long(OBJECT)),
    LongOpt::new("preallocation", HasArg::Required, Key::Long(PREALLOCATION)),
    LongOpt::new("quiet", HasArg::No, Key::Short('q')),
    LongOpt::new("shrink", HasArg::No, Key::Long(SHRINK)),
];

/// The size operand of `resize`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResizeSize {
    /// `SIZE`: the new virtual size.
    Absolute(u64),
    /// `+SIZE`: grow by this much.
    Grow(u64),
    /// `-SIZE`: shrink by this much.
    Shrink(u64),
}

impl Default for ResizeSize {
    fn default() -> Self {
        Self::Absolute(0)
    }
}

impl ResizeSize {
    /// Parses `[+-]SIZE` with QEMU's size syntax; `None` if the size does not parse.
    pub fn parse(s: &str) -> Option<Self> {
        if let Some(rest) = s.strip_prefix('+') {
            parse_size(rest).ok().map(Self::Grow)
        } else if let Some(rest) = s.strip_prefix('-') {
            parse_size(rest).ok().map(Self::Shrink)
        } else {
            parse_size(s).ok().map(Self::Absolute)
        }
    }
}

/// Assigns the next positional word: file name first, then the size; more is an error.
fn positional(
    ctx: &Ctx,
    filename: &mut Option<String>,
    size: &mut Option<String>,
    word: String,
    g: Option<&mut Getopt<'_>>,
) -> Result<(), i32> {
    if filename.is_none() {
        *filename = Some(word);
        // A negative size right after the file name would otherwise look like an option.
        if let Some(g) = g {
            let negative = |w: &str| {
                let b = w.as_bytes();
                b.len() > 1 && b[0] == b'-' && b[1].is_ascii_digit()
            };
            if let Some(s) = g.take_next_if(negative) {
                *size = Some(s);
            }
        }
    } else if size.is_none() {
        *size = Some(word);
    } else {
        return Err(ctx.usage_error(CMD, "Extra argument(s) in command line"));
    }
    Ok(())
}

/// Everything `qemu-img resize` accepts on its command line.
#[derive(Clone, Debug, Default)]
pub struct ResizeOpts {
    /// `-f`: image format.
    pub format: Option<String>,
    /// `--image-opts`.
    pub image_opts: bool,
    /// `--preallocation` for the new area.
    pub preallocation: Option<Prealloc>,
    /// `--shrink`: allow making the image smaller.
    pub shrink: bool,
    /// `-q`.
    pub quiet: bool,
    /// `--object` definitions.
    pub objects: Vec<String>,
    /// The image.
    pub filename: String,
    /// The new size, absolute or relative.
    pub size: ResizeSize,
}

/// Parses the arguments after `resize`; usage errors are reported here, exactly as
/// qemu-img words them.
pub fn parse(ctx: &Ctx, args: &[String]) -> Parsed<ResizeOpts> {
    let mut o = ResizeOpts::default();
    let mut filename: Option<String> = None;
    let mut size: Option<String> = None;
    let mut g = ctx.getopt(CMD, args, SHORT, LONG);
    while let Some(item) = g.next_item() {
        let (key, arg) = match item {
            Err(e) => return Parsed::Exit(ctx.getopt_error(CMD, &e)),
            Ok(Item::Operand(word)) => {
                if let Err(code) = positional(ctx, &mut filename, &mut size, word, Some(&mut g)) {
                    return Parsed::Exit(code);
                }
                continue;
            }
            Ok(Item::Opt(key, arg)) => (key, arg.unwrap_or_default()),
        };
        match key {
            Key::Short('h') => {
                ctx.print_help(HELP);
                return Parsed::Exit(0);
            }
            Key::Short('f') => o.format = Some(arg),
            Key::Long(IMAGE_OPTS) => o.image_opts = true,
            Key::Long(OBJECT) => o.objects.push(arg),
            Key::Long(PREALLOCATION) => match Prealloc::parse(&arg) {
                Ok(p) => o.preallocation = Some(p),
                Err(m) => {
                    ctx.error(&m);
                    return Parsed::Exit(1);
                }
            },
            Key::Short('q') => o.quiet = true,
            Key::Long(SHRINK) => o.shrink = true,
            _ => {}
        }
    }
    // Words after `--` are still file name and size.
    let ops = g.operands();
    for word in ops {
        if let Err(code) = positional(ctx, &mut filename, &mut size, word, None) {
            return Parsed::Exit(code);
        }
    }
    let (Some(filename), Some(size)) = (filename, size) else {
        return Parsed::Exit(ctx.usage_error(CMD, "Expecting image file name and size"));
    };
    o.filename = filename;
    o.size = match ResizeSize::parse(&size) {
        Some(s) => s,
        None => {
            ctx.error(&option_size_error("size"));
            return Parsed::Exit(1);
        }
    };
    Parsed::Run(o)
}

/// Runs `resize`; returns the process exit code.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    match parse(ctx, args) {
        Parsed::Run(opts) if crate::secrets::register(ctx, &opts.objects).is_err() => 1,
        Parsed::Run(opts) => resize_cmd(ctx, &opts),
        Parsed::Exit(code) => code,
    }
}

fn resize_cmd(ctx: &Ctx, o: &ResizeOpts) -> i32 {
    use crate::cmd::common::{image_spec, open_owned_rw};
    use qimg::image::Image;
    use qimg::open::OwnedImage;
    let (filename, format) = match image_spec(ctx, &o.filename, o.format.clone(), o.image_opts) {
        Ok(x) => x,
        Err(c) => return c,
    };
    let img = match open_owned_rw(ctx, &filename, format, false) {
        Ok(i) => i,
        Err(c) => return c,
    };
    // Raw sizes count in whole sectors, as the block layer reports them.
    let current = match &img {
        OwnedImage::Qcow2(q) => q.len(),
        OwnedImage::Other(r) => r.len().div_ceil(512) * 512,
    };
    let total = match o.size {
        ResizeSize::Absolute(n) => Some(n),
        ResizeSize::Grow(d) => current.checked_add(d),
        ResizeSize::Shrink(d) => current.checked_sub(d),
    };
    let total = match total {
        Some(t) if t > 0 && t <= i64::MAX as u64 => t,
        _ => {
            ctx.error("New image size must be positive");
            return 1;
        }
    };
    let prealloc = o.preallocation.unwrap_or(Prealloc::Off);
    if prealloc != Prealloc::Off && total < current {
        ctx.error("Preallocation can only be used for growing images");
        return 1;
    }
    if total < current && !o.shrink {
        ctx.error("Use the --shrink option to perform a shrink operation.");
        ctx.warn("Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.");
        return 1;
    }
    let r = match img {
        OwnedImage::Qcow2(mut q) => {
            let p = match prealloc {
                Prealloc::Off => qimg::qcow2::resize::Prealloc::Off,
                Prealloc::Metadata => qimg::qcow2::resize::Prealloc::Metadata,
                Prealloc::Falloc => qimg::qcow2::resize::Prealloc::Falloc,
                Prealloc::Full => qimg::qcow2::resize::Prealloc::Full,
            };
            q.resize(total, p).and_then(|()| q.close()).map_err(|e| {
                let m = e.to_string();
                if m.ends_with("is inconsistent and cannot be used") {
                    format!("{m}\nTry block-dirty-bitmap-remove to delete this bitmap from disk")
                } else {
                    m
                }
            })
        }
        OwnedImage::Other(img) => resize_raw(img.as_ref(), total, prealloc),
    };
    match r {
        Ok(()) => {
            if !o.quiet {
                crate::ctx::print_ignore("Image resized.\n");
            }
            0
        }
        Err(m) => {
            ctx.error(&m);
            1
        }
    }
}

/// Resizes a raw image: the file is the disk.
fn resize_raw(img: &dyn qimg::image::Image, size: u64, prealloc: Prealloc) -> Result<(), String> {
    let Some(raw) = img.as_any().downcast_ref::<qimg::raw::Raw>() else {
        return Err("Image format does not support resizing".into());
    };
    let f = raw.file();
    let old = f.len().map_err(|e| e.to_string())?;
    match prealloc {
        Prealloc::Metadata => return Err("Unsupported preallocation mode: metadata".into()),
        Prealloc::Full if size > old => {
            f.set_len(size).map_err(|e| e.to_string())?;
            let zeros = vec![0u8; 1 << 20];
            let mut pos = old;
            while pos < size {
                let n = (size - pos).min(zeros.len() as u64);
                f.write_at(&zeros[..n as usize], pos)
                    .map_err(|e| e.to_string())?;
                pos += n;
            }
        }
        _ => f.set_len(size).map_err(|e| e.to_string())?,
    }
    f.flush().map_err(|e| e.to_string())
}
