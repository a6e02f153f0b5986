//! `qemu-img amend`: change format-specific options of an existing image.
use crate::args::{HasArg, Item, Key, LongOpt};
use crate::ctx::{run_getopt, Ctx, Parsed};
use crate::opts::OptionList;

const CMD: &str = "amend";

/// `qemu-img amend --help` text (`qemu-img` is replaced by the program name).
pub const HELP: &str = r#"Usage:
Update format-specific options of the image.  Usage:

  qemu-img amend [-f FMT | --image-opts] [t CACHE] [--force] [-p] [-q]
        [--object OBJDEF -o OPTIONS FILENAME

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operation
  -p, --progres
     show progress
  -f, --format FMT
     specify FILENAME format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
   instead of a file name (incompatible with --format)
  -t, --cache CACHE
     cache mode for FILENAME (writeback)
  --force
     allow certain unsafe operations

"#;

/// Short options, in getopt syntax.
const SHORT: &str = "f:ho:pqt:";
const FORCE: u16 = 1;
const IMAGE_OPTS: u16 = 2;
const OBJECT: u16 = 3;

/// Long options, in the table order that decides how ambiguities are listed.
const LONG: &[LongOpt] = &[
    LongOpt::new("help", HasArg::No, Key::Short('h')),
    LongOpt::new("cache", HasArg::Required, Key::Short('t')),
    LongOpt::new("format", HasArg::Required, Key::Short('f')),
    LongOpt::new("force", HasArg::No, Key::Long(FORCE)),
    LongOpt::new("image-opts", HasArg::No, Key::Long(IMAGE_OPTS)),
    LongOpt::new("object", HasArg::Required, Key::Long(OBJECT)),
    LongOpt::new("options", HasArg::Required, Key::Short('o')),
    LongOpt::new("progress", HasArg::No, Key::Short('p')),
    LongOpt::new("quiet", HasArg::No, Key::Short('q')),
];

/// Everything `qemu-img amend` accepts on its command line.
#[derive(Clone, Debug, Default)]
pub struct AmendOpts {
    /// `-f`: image format.
    pub format: Option<String>,
    /// `--image-opts`.
    pub image_opts: bool,
    /// `-o`: the options to change (required).
    pub options: OptionList,
    /// `-t`: cache mode.
    pub cache: Option<String>,
    /// `--force`: allow unsafe changes.
    pub force: bool,
    /// `-p`.
    pub progress: bool,
    /// `-q`.
    pub quiet: bool,
    /// `--object` definitions.
    pub objects: Vec<String>,
    /// The image.
    pub filename: String,
}

/// Parses the arguments after `amend`; usage errors are reported here, exactly as
/// qemu-img words them.
pub fn parse(ctx: &Ctx, args: &[String]) -> Parsed<AmendOpts> {
    let mut o = AmendOpts::default();
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
            Key::Short('t') => o.cache = Some(arg),
            Key::Short('f') => o.format = Some(arg),
            Key::Long(FORCE) => o.force = true,
            Key::Long(IMAGE_OPTS) => o.image_opts = true,
            Key::Long(OBJECT) => o.objects.push(arg),
            Key::Short('o') => {
                o.options.accumulate(&arg).map_err(|m| {
                    ctx.error(&m);
                    1
                })?;
            }
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
    if o.options.is_empty() {
        return Parsed::Exit(ctx.usage_error(CMD, "Must specify options (-o)"));
    }
    if ops.len() != 1 {
        ctx.error("Expecting one image file name");
        return Parsed::Exit(1);
    }
    o.filename = ops[0].clone();
    Parsed::Run(o)
}

/// Runs `amend`; returns the process exit code.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    match parse(ctx, args) {
        Parsed::Run(_opts) => ctx.not_implemented(CMD),
        Parsed::Exit(code) => code,
    }
}
