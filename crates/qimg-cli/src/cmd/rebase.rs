//! `qemu-img rebase`: change the backing file of an image.
use crate::args::{HasArg, Item, Key, LongOpt};
use crate::ctx::{run_getopt, Ctx, Parsed};

const CMD: &str = "rebase";

/// `qemu-img rebase --help` text (`qemu-img` is replaced by the program name).
pub const HELP: &str = r#"Usage:
Change backing file of the image.  Usage:

  qemu-img rebase [-f FMT | --image-opts] [-t CACHE] [-q] [-U] [-p]
        [-b BACKING_FILENAME [-F BACKING_FMT] [-T BACKING_CACHE]] [-u]
        [--object OBJDEF] [-c] FILENAME
Rebases FILENAME on top of BACKING_FILENAME or no backing file

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operation
  -p, --progress
     show progress indicator
  -f, --format FMT
     specify FILENAME format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
     instead of a file name (incompatible with --format)
  -t, --cache CACHE
     cache mode for FILENAME (writeback)
  -b, --backing BACKING_FILENAME|""
     rebase onto this file (or no backing file)
  -F, --backing-format BACKING_FMT
     specify format for BACKING_FILENAME
  -T, --backing-cache CACHE
     BACKING_FILENAME cache mode (writeback)
  -u, --backing-unsafe
     do not fail if BACKING_FILENAME can not be read
  -c, --compress
     compress image (when image supports this)
  -U, --force-share
     open image in shared mode for concurrent access
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  FILENAME
     image file name (or specification with --image-opts)

"#;

/// Short options, in getopt syntax.
const SHORT: &str = "b:cf:hpqt:uF:T:U";
const IMAGE_OPTS: u16 = 1;
const OBJECT: u16 = 2;

/// Long options, in the table order that decides how ambiguities are listed.
const LONG: &[LongOpt] = &[
    LongOpt::new("help", HasArg::No, Key::Short('h')),
    LongOpt::new("backing", HasArg::Required, Key::Short('b')),
    LongOpt::new("backing-format", HasArg::Required, Key::Short('F')),
    LongOpt::new("backing-cache", HasArg::Required, Key::Short('T')),
    LongOpt::new("backing-unsafe", HasArg::No, Key::Short('u')),
    LongOpt::new("cache", HasArg::Required, Key::Short('t')),
    LongOpt::new("compress", HasArg::No, Key::Short('c')),
    LongOpt::new("force-share", HasArg::No, Key::Short('U')),
    LongOpt::new("format", HasArg::Required, Key::Short('f')),
    LongOpt::new("image-opts", HasArg::No, Key::Long(IMAGE_OPTS)),
    LongOpt::new("object", HasArg::Required, Key::Long(OBJECT)),
    LongOpt::new("progress", HasArg::No, Key::Short('p')),
    LongOpt::new("quiet", HasArg::No, Key::Short('q')),
];

/// Everything `qemu-img rebase` accepts on its command line.
#[derive(Clone, Debug, Default)]
pub struct RebaseOpts {
    /// `-f`: image format.
    pub format: Option<String>,
    /// `--image-opts`.
    pub image_opts: bool,
    /// `-b`: new backing file; an empty string removes the backing file.
    pub backing: Option<String>,
    /// `-F`: format of the new backing file.
    pub backing_format: Option<String>,
    /// `-u`: only rewrite the header.
    pub unsafe_mode: bool,
    /// `-c`: write copied clusters compressed.
    pub compress: bool,
    /// `-t`: cache mode of the image.
    pub cache: Option<String>,
    /// `-T`: cache mode of the backing files.
    pub backing_cache: Option<String>,
    /// `-U`.
    pub force_share: bool,
    /// `-p`.
    pub progress: bool,
    /// `-q`.
    pub quiet: bool,
    /// `--object` definitions.
    pub objects: Vec<String>,
    /// The image to rebase.
    pub filename: String,
}

/// Parses the arguments after `rebase`; usage errors are reported here, exactly as
/// qemu-img words them.
pub fn parse(ctx: &Ctx, args: &[String]) -> Parsed<RebaseOpts> {
    let mut o = RebaseOpts::default();
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
            Key::Short('b') => o.backing = Some(arg),
            Key::Short('F') => o.backing_format = Some(arg),
            Key::Short('T') => o.backing_cache = Some(arg),
            Key::Short('u') => o.unsafe_mode = true,
            Key::Short('t') => o.cache = Some(arg),
            Key::Short('c') => o.compress = true,
            Key::Short('U') => o.force_share = true,
            Key::Short('f') => o.format = Some(arg),
            Key::Long(IMAGE_OPTS) => o.image_opts = true,
            Key::Long(OBJECT) => o.objects.push(arg),
            Key::Short('p') => o.progress = true,
            Key::Short('q') => o.quiet = true,
            _ => {}
        }
        Ok(())
    });
    if let Err(code) = res {
        return Parsed::Exit(code);
    }
    let ops = g.operands();
    if ops.len() != 1 {
        return Parsed::Exit(ctx.usage_error(CMD, "Expecting one image file name"));
    }
    o.filename = ops[0].clone();
    if o.backing.is_none() && !o.unsafe_mode {
        return Parsed::Exit(ctx.usage_error(
            CMD,
            "Must specify backing file (-b) or use unsafe mode (-u)",
        ));
    }
    Parsed::Run(o)
}

/// Runs `rebase`; returns the process exit code.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    match parse(ctx, args) {
        Parsed::Run(_opts) => ctx.not_implemented(CMD),
        Parsed::Exit(code) => code,
    }
}
