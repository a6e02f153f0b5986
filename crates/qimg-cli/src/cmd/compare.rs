//! `qemu-img compare`: check whether two images have the same content.
//!
//! Exit codes differ from the other commands: 0 identical, 1 different, 2 open error,
//! 3 block-status error, 4 read error (usage errors are 1).
use crate::args::{HasArg, Item, Key, LongOpt};
use crate::cmd::common::{open, ro_options};
use crate::ctx::print_ignore;
use crate::ctx::{run_getopt, Ctx, Parsed};
use qimg::ops::compare::{compare, CompareOutcome};

const CMD: &str = "compare";

/// `qemu-img compare --help` text (`qemu-img` is replaced by the program name).
pub const HELP: &str = r#"Usage:
Check if two images have the same contents.  Usage:

  qemu-img compare [--image-opts | [-f FMT] [-F FMT]] [-s]
        [-T CACHE] [-U] [--object OBJDEF] FILENAME1 FILENAME2

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operation
  -p, --progress
     show operation progress
  -f, --a-format FMT
     specify FILENAME1 image format explicitly
  -F, --b-format FMT
     specify FILENAME2 image format explicitly
  --image-opts
     indicates that FILENAMEs are complete image specifications
     instead of file names (incompatible with --a-format and --b-format)
  -s, --strict
     strict mode, also check if sizes are equal
  -T, --cache CACHE_MODE
     images caching mode (writeback)
  -U, --force-share
     open images in shared mode for concurrent access
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  FILENAME1, FILENAME2
     image files (or specifications) to compare

"#;

/// Short options, in getopt syntax.
const SHORT: &str = "hf:F:T:pqsU";
const IMAGE_OPTS: u16 = 1;
const OBJECT: u16 = 2;

/// Long options, in the table order that decides how ambiguities are listed.
const LONG: &[LongOpt] = &[
    LongOpt::new("help", HasArg::No, Key::Short('h')),
    LongOpt::new("a-format", HasArg::Required, Key::Short('f')),
    LongOpt::new("left-format", HasArg::Required, Key::Short('f')),
    LongOpt::new("b-format", HasArg::Required, Key::Short('F')),
    LongOpt::new("right-format", HasArg::Required, Key::Short('F')),
    LongOpt::new("image-opts", HasArg::No, Key::Long(IMAGE_OPTS)),
    LongOpt::new("strict", HasArg::No, Key::Short('s')),
    LongOpt::new("cache", HasArg::Required, Key::Short('T')),
    LongOpt::new("force-share", HasArg::No, Key::Short('U')),
    LongOpt::new("progress", HasArg::No, Key::Short('p')),
    LongOpt::new("quiet", HasArg::No, Key::Short('q')),
    LongOpt::new("object", HasArg::Required, Key::Long(OBJECT)),
];

/// Everything `qemu-img compare` accepts on its command line.
#[derive(Clone, Debug, Default)]
pub struct CompareOpts {
    /// `-f`: format of the first image.
    pub format1: Option<String>,
    /// `-F`: format of the second image.
    pub format2: Option<String>,
    /// `--image-opts`.
    pub image_opts: bool,
    /// `-s`: size or allocation differences count.
    pub strict: bool,
    /// `-T`: cache mode.
    pub cache: Option<String>,
    /// `-p`.
    pub progress: bool,
    /// `-q`.
    pub quiet: bool,
    /// `-U`.
    pub force_share: bool,
    /// `--object` definitions.
    pub objects: Vec<String>,
    /// First image.
    pub filename1: String,
    /// Second image.
    pub filename2: String,
}

/// Parses the arguments after `compare`; usage errors are reported here, exactly as
/// qemu-img words them.
pub fn parse(ctx: &Ctx, args: &[String]) -> Parsed<CompareOpts> {
    let mut o = CompareOpts::default();
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
            Key::Short('f') => o.format1 = Some(arg),
            Key::Short('F') => o.format2 = Some(arg),
            Key::Long(IMAGE_OPTS) => o.image_opts = true,
            Key::Short('s') => o.strict = true,
            Key::Short('T') => o.cache = Some(arg),
            Key::Short('U') => o.force_share = true,
            Key::Short('p') => o.progress = true,
            Key::Short('q') => o.quiet = true,
            Key::Long(OBJECT) => o.objects.push(arg),
            _ => {}
        }
        Ok(())
    });
    if let Err(code) = res {
        return Parsed::Exit(code);
    }
    let ops = g.operands();
    if ops.len() != 2 {
        return Parsed::Exit(ctx.usage_error(CMD, "Expecting two image file names"));
    }
    o.filename1 = ops[0].clone();
    o.filename2 = ops[1].clone();
    Parsed::Run(o)
}

/// Runs `compare`; returns the process exit code.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    match parse(ctx, args) {
        Parsed::Run(opts) if crate::secrets::register(ctx, &opts.objects).is_err() => 1,
        Parsed::Run(opts) => compare_cmd(ctx, &opts),
        Parsed::Exit(code) => code,
    }
}

fn compare_cmd(ctx: &Ctx, o: &CompareOpts) -> i32 {
    let spec = |f: &str, fmt: &Option<String>| {
        crate::cmd::common::image_spec(ctx, f, fmt.clone(), o.image_opts)
    };
    let ((f1, fmt1), (f2, fmt2)) = match (
        spec(&o.filename1, &o.format1),
        spec(&o.filename2, &o.format2),
    ) {
        (Ok(a), Ok(b)) => (a, b),
        _ => return 2,
    };
    let a = match open(ctx, &f1, &ro_options(fmt1, o.force_share)) {
        Ok(i) => i,
        Err(_) => return 2,
    };
    let b = match open(ctx, &f2, &ro_options(fmt2, o.force_share)) {
        Ok(i) => i,
        Err(_) => return 2,
    };
    let say = |s: &str| {
        if !o.quiet {
            print_ignore(s);
        }
    };
    let r = match compare(a.as_ref(), b.as_ref(), o.strict) {
        Ok(r) => r,
        Err(e) => {
            ctx.error(&format!("Error while reading: {e}"));
            return 4;
        }
    };
    match r.outcome {
        CompareOutcome::StrictSizeMismatch => {
            say("Strict mode: Image size mismatch!\n");
            1
        }
        CompareOutcome::StrictStatusMismatch(off) => {
            say(&format!(
                "Strict mode: Offset {off} block status mismatch!\n"
            ));
            1
        }
        CompareOutcome::ContentMismatch(off) => {
            if r.size_mismatch {
                say("Warning: Image size mismatch!\n");
            }
            say(&format!("Content mismatch at offset {off}!\n"));
            1
        }
        CompareOutcome::Identical => {
            if r.size_mismatch {
                say("Warning: Image size mismatch!\n");
            }
            say("Images are identical.\n");
            0
        }
    }
}
