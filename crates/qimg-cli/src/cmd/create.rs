//! `qemu-img create`: create and format a new image.
use crate::args::{HasArg, Item, Key, LongOpt};
use crate::ctx::{run_getopt, Ctx, Parsed};
use crate::opts::{cvtnum, OptionList};

const CMD: &str = "create";

/// `qemu-img create --help` text (`qemu-img` is replaced by the program name).
pub const HELP: &str = r#"Usage:
Create and format new image file.  Usage:

  qemu-img create [-f FMT] [-o FMT_OPTS] [-b BACKING_FILENAME [-F BACKING_FMT]]
        [--object OBJDEF] [-u] FILENAME [SIZE[bkKMGTPE]]

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operations
  -f, --format FMT
     specifies format of the new image, default is raw
  -o, --options FMT_OPTS
     format-specific options ('-o list' for list)
  -b, --backing BACKING_FILENAME
     stack new image on top of BACKING_FILENAME
     (for formats which support stacking)
  -F, --backing-format BACKING_FMT
     specify format of BACKING_FILENAME
  -u, --backing-unsafe
     do not fail if BACKING_FMT can not be read
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  FILENAME
     image file to create.  It will be overridden if exists
  SIZE
     image size with optional suffix (multiplies in 1024)
     SIZE is required unless BACKING_IMG is specified,
     in which case it will be the same as size of BACKING_IMG

"#;

/// Short options, in getopt syntax.
const SHORT: &str = "hqf:o:b:F:u";
const OBJECT: u16 = 1;

/// Long options, in the table order that decides how ambiguities are listed.
const LONG: &[LongOpt] = &[
    LongOpt::new("help", HasArg::No, Key::Short('h')),
    LongOpt::new("quiet", HasArg::No, Key::Short('q')),
    LongOpt::new("format", HasArg::Required, Key::Short('f')),
    LongOpt::new("object", HasArg::Required, Key::Long(OBJECT)),
    LongOpt::new("options", HasArg::Required, Key::Short('o')),
    LongOpt::new("backing", HasArg::Required, Key::Short('b')),
    LongOpt::new("backing-format", HasArg::Required, Key::Short('F')),
    LongOpt::new("backing-unsafe", HasArg::No, Key::Short('u')),
];

/// Everything `qemu-img create` accepts on its command line.
#[derive(Clone, Debug, Default)]
pub struct CreateOpts {
    /// `-q`: print nothing but errors.
    pub quiet: bool,
    /// `-f`: format of the new image (qemu-img defaults to raw).
    pub format: Option<String>,
    /// `-o`: creation options, all `-o` joined.
    pub options: OptionList,
    /// `-b`: backing file.
    pub backing: Option<String>,
    /// `-F`: backing file format.
    pub backing_format: Option<String>,
    /// `-u`: do not open the backing file.
    pub backing_unsafe: bool,
    /// `--object` definitions.
    pub objects: Vec<String>,
    /// `-o help` (or `?`) was given: list the creation options of the format instead of creating; `filename` may then be empty.
    pub help_requested: bool,
    /// Image to create.
    pub filename: String,
    /// Virtual size; required unless a backing file provides it.
    pub size: Option<u64>,
}

/// Parses the arguments after `create`; usage errors are reported here, exactly as
/// qemu-img words them.
pub fn parse(ctx: &Ctx, args: &[String]) -> Parsed<CreateOpts> {
    let mut o = CreateOpts::default();
    let mut g = ctx.getopt(CMD, args, SHORT, LONG);
    let res = run_getopt(ctx, CMD, &mut g, |item| {
        let Item::Opt(key, arg) = item else {
            return Ok(());
        };
        let arg = arg.unwrap_or_default();
        match key {
            Key::Short('h') => {
                ctx.print_help(HELP);
                return Err(0);
            }
            Key::Short('q') => o.quiet = true,
            Key::Short('f') => o.format = Some(arg),
            Key::Long(OBJECT) => o.objects.push(arg),
            Key::Short('o') => {
                o.options.accumulate(&arg).map_err(|m| {
                    ctx.error(&m);
                    1
                })?;
            }
            Key::Short('b') => o.backing = Some(arg),
            Key::Short('F') => o.backing_format = Some(arg),
            Key::Short('u') => o.backing_unsafe = true,
            _ => {}
        }
        Ok(())
    });
    if let Err(code) = res {
        return Parsed::Exit(code);
    }
    let ops = g.operands();
    if o.options.has_help() {
        o.help_requested = true;
        o.filename = ops.first().cloned().unwrap_or_default();
        return Parsed::Run(o);
    }
    let Some(filename) = ops.first() else {
        return Parsed::Exit(ctx.usage_error(CMD, "Expecting image file name"));
    };
    o.filename = filename.clone();
    if let Some(size) = ops.get(1) {
        match cvtnum("image size", size) {
            Ok(v) => o.size = Some(v as u64),
            Err(m) => {
                ctx.error(&m);
                return Parsed::Exit(1);
            }
        }
    }
    if let Some(extra) = ops.get(2) {
        return Parsed::Exit(ctx.usage_error(CMD, &format!("Unexpected argument: {extra}")));
    }
    Parsed::Run(o)
}

/// Runs `create`; returns the process exit code.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    match parse(ctx, args) {
        Parsed::Run(_opts) => ctx.not_implemented(CMD),
        Parsed::Exit(code) => code,
    }
}

/// Lists the creation options of a format (`-o help`).
pub fn print_options_help(ctx: &Ctx, fmt: &str) -> i32 {
    ctx.error(&format!(
        "-o help for format '{fmt}' is not implemented in qimg yet"
    ));
    1
}

/// Creates an image file of format `fmt` and `size` bytes with `-o` options; convert
/// and create share this. With `quiet`, nothing is printed.
#[allow(clippy::too_many_arguments)]
pub fn create_image(
    ctx: &Ctx,
    fmt: &str,
    filename: &str,
    size: u64,
    options: &crate::opts::OptionList,
    backing: Option<&str>,
    backing_fmt: Option<&str>,
    quiet: bool,
) -> Result<(), i32> {
    let _ = (options, backing, backing_fmt, quiet);
    match fmt {
        "raw" => std::fs::File::create(filename)
            .and_then(|f| f.set_len(size))
            .map_err(|e| {
                ctx.error(&format!("{filename}: {}", qimg::error::strerror(&e)));
                1
            }),
        _ => {
            ctx.error(&format!(
                "Creating '{fmt}' images is not implemented in qimg yet"
            ));
            Err(1)
        }
    }
}
