//! `qemu-img commit`: copy an overlay's data into its backing file.
use crate::args::{HasArg, Item, Key, LongOpt};
use crate::ctx::{run_getopt, Ctx, Parsed};
use crate::opts::cvtnum;

const CMD: &str = "commit";

/// `qemu-img commit --help` text (`qemu-img` is replaced by the program name).
pub const HELP: &str = r#"Usage:
Commit image to its backing file.  Usage:

  qemu-img commit [-f FMT | --image-opts] [-t CACHE_MODE] [-b BASE_IMG] [-d]
        [-r RATE] [--object OBJDEF] FILENAME

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operations
  -p, --progress
     show operation progress
  -f, --format FMT
     specify FILENAME image format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
     instead of a file name (incompatible with --format)
  -t, --cache CACHE_MODE image cache mode (writeback)
  -d, --drop
     skip emptying FILENAME on completion
  -b, --base BASE_IMG
     image in the backing chain to which to commit changes
     instead of the previous one (implies --drop)
  -r, --rate RATE
     I/O rate limit
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  FILENAME
     name of the image file to operate on

"#;

/// Short options, in getopt syntax.
const SHORT: &str = "b:df:hpqr:t:";
const IMAGE_OPTS: u16 = 1;
const OBJECT: u16 = 2;

/// Long options, in the table order that decides how ambiguities are listed.
const LONG: &[LongOpt] = &[
    LongOpt::new("help", HasArg::No, Key::Short('h')),
    LongOpt::new("base", HasArg::Required, Key::Short('b')),
    LongOpt::new("cache", HasArg::Required, Key::Short('t')),
    LongOpt::new("drop", HasArg::No, Key::Short('d')),
    LongOpt::new("format", HasArg::Required, Key::Short('f')),
    LongOpt::new("image-opts", HasArg::No, Key::Long(IMAGE_OPTS)),
    LongOpt::new("object", HasArg::Required, Key::Long(OBJECT)),
    LongOpt::new("progress", HasArg::No, Key::Short('p')),
    LongOpt::new("quiet", HasArg::No, Key::Short('q')),
    LongOpt::new("rate", HasArg::Required, Key::Short('r')),
];

/// Everything `qemu-img commit` accepts on its command line.
#[derive(Clone, Debug, Default)]
pub struct CommitOpts {
    /// `-f`: image format.
    pub format: Option<String>,
    /// `--image-opts`.
    pub image_opts: bool,
    /// `-b`: commit down to this image (implies `-d`).
    pub base: Option<String>,
    /// `-d`: do not empty the image afterwards.
    pub drop: bool,
    /// `-t`: cache mode.
    pub cache: Option<String>,
    /// `-r`: rate limit in bytes per second.
    pub rate: Option<u64>,
    /// `-p`.
    pub progress: bool,
    /// `-q`.
    pub quiet: bool,
    /// `--object` definitions.
    pub objects: Vec<String>,
    /// The overlay to commit.
    pub filename: String,
}

/// Parses the arguments after `commit`; usage errors are reported here, exactly as
/// qemu-img words them.
pub fn parse(ctx: &Ctx, args: &[String]) -> Parsed<CommitOpts> {
    let mut o = CommitOpts::default();
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
            Key::Short('b') => o.base = Some(arg),
            Key::Short('t') => o.cache = Some(arg),
            Key::Short('d') => o.drop = true,
            Key::Short('f') => o.format = Some(arg),
            Key::Long(IMAGE_OPTS) => o.image_opts = true,
            Key::Long(OBJECT) => o.objects.push(arg),
            Key::Short('p') => o.progress = true,
            Key::Short('q') => o.quiet = true,
            Key::Short('r') => match cvtnum("rate limit", &arg) {
                Ok(v) => o.rate = Some(v as u64),
                Err(m) => {
                    ctx.error(&m);
                    return Err(1);
                }
            },
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
    Parsed::Run(o)
}

/// Runs `commit`; returns the process exit code.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    match parse(ctx, args) {
        Parsed::Run(_opts) => ctx.not_implemented(CMD),
        Parsed::Exit(code) => code,
    }
}
