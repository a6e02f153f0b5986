//! `qemu-img info`: describe an image (and its backing chain).
use crate::args::{HasArg, Item, Key, LongOpt};
use crate::ctx::{run_getopt, Ctx, Parsed};
use crate::opts::OutputFormat;

const CMD: &str = "info";

/// `qemu-img info --help` text (`qemu-img` is replaced by the program name).
pub const HELP: &str = r#"Usage:
Display information about image.  Usage:

  qemu-img info [-f FMT | --image-opts] [-b] [-U] [--object OBJDEF]
        [--output human|json] FILENAME

Arguments:
  -h, --help
     print this help and exit
  -f, --format FMT
     specify FILENAME image format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
     instead of a file name (incompatible with --format)
  -b, --backing-chain
     display information about backing chaing
  (in case the image is stacked
  -U, --force-share
     open image in shared mode for concurrent access
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  --output human|json
     specify output format name (default human)
  FILENAME
     image file name (or specification with --image-opts)

"#;

/// Short options, in getopt syntax.
const SHORT: &str = "hf:bU";
const IMAGE_OPTS: u16 = 1;
const OUTPUT: u16 = 2;
const OBJECT: u16 = 3;

/// Long options, in the table order that decides how ambiguities are listed.
const LONG: &[LongOpt] = &[
    LongOpt::new("help", HasArg::No, Key::Short('h')),
    LongOpt::new("format", HasArg::Required, Key::Short('f')),
    LongOpt::new("force-share", HasArg::No, Key::Short('U')),
    LongOpt::new("image-opts", HasArg::No, Key::Long(IMAGE_OPTS)),
    LongOpt::new("backing-chain", HasArg::No, Key::Short('b')),
    LongOpt::new("output", HasArg::Required, Key::Long(OUTPUT)),
    LongOpt::new("object", HasArg::Required, Key::Long(OBJECT)),
];

/// Everything `qemu-img info` accepts on its command line.
#[derive(Clone, Debug, Default)]
pub struct InfoOpts {
    /// `-f`: image format (probed if absent).
    pub format: Option<String>,
    /// `--image-opts`: the file name is a `key=value,...` specification.
    pub image_opts: bool,
    /// `-b`/`--backing-chain`: describe every image of the chain.
    pub backing_chain: bool,
    /// `-U`: open without taking write locks.
    pub force_share: bool,
    /// `--output`.
    pub output: OutputFormat,
    /// `--object` definitions.
    pub objects: Vec<String>,
    /// The image.
    pub filename: String,
}

/// Parses the arguments after `info`; usage errors are reported here, exactly as
/// qemu-img words them.
pub fn parse(ctx: &Ctx, args: &[String]) -> Parsed<InfoOpts> {
    let mut o = InfoOpts::default();
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
            Key::Short('f') => o.format = Some(arg),
            Key::Short('U') => o.force_share = true,
            Key::Long(IMAGE_OPTS) => o.image_opts = true,
            Key::Short('b') => o.backing_chain = true,
            Key::Long(OUTPUT) => match OutputFormat::parse(&arg) {
                Ok(f) => o.output = f,
                Err(m) => return Err(ctx.usage_error(CMD, &m)),
            },
            Key::Long(OBJECT) => o.objects.push(arg),
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

/// Runs `info`; returns the process exit code.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    match parse(ctx, args) {
        Parsed::Run(_opts) => ctx.not_implemented(CMD),
        Parsed::Exit(code) => code,
    }
}
