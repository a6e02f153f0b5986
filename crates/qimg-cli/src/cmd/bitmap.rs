//! `qemu-img bitmap`: add, remove, clear, enable, disable or merge persistent bitmaps.
use crate::args::{HasArg, Item, Key, LongOpt};
use crate::ctx::{run_getopt, Ctx, Parsed};
use crate::opts::cvtnum;

const CMD: &str = "bitmap";

/// `qemu-img bitmap --help` text (`qemu-img` is replaced by the program name).
pub const HELP: &str = r#"Usage:
Perform modifications of the persistent bitmap in the image.  Usage:

  qemu-img bitmap ( --merge SOURCE | --add | --remove | --clear |
                --enable | --disable ).. [-f FMT | --image-opts]
        [ -b SRC_FILENAME [-F SOURCE_FMT]] [-g SIZE[KMGTPE]] [--object OBJDEF]
        FILENAME BITMAP

Arguments:
  -h, --help
     print this help and exit
  -f, --format FMT
     specify FILENAME format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
     instead of a file name (incompatible with --format)
  --add
     creates BITMAP, enables to record future edits
   -g, --granularity SIZE[KMGTPE]
     sets non-default bitmap granularity for --add to this size
  --remove
     removes BITMAP
  --clear
     clears BITMAP
  --enable, --disable
     starts and stops recording future edits to BITMAP
  --merge SRC_FILENAME
     merges contents of SRC_FILENAME bitmap into BITMAP
   -b, --source-file SRC_FILENAME
     select alternative source file for --merge
   -F, --source-format SRC_FMT
     specify format for SRC_FILENAME explicitly

"#;

/// Short options, in getopt syntax.
const SHORT: &str = "b:f:g:hF:";
const ADD: u16 = 1;
const REMOVE: u16 = 2;
const CLEAR: u16 = 3;
const ENABLE: u16 = 4;
const DISABLE: u16 = 5;
const MERGE: u16 = 6;
const IMAGE_OPTS: u16 = 7;
const OBJECT: u16 = 8;

/// Long options, in the table order that decides how ambiguities are listed.
const LONG: &[LongOpt] = &[
    LongOpt::new("help", HasArg::No, Key::Short('h')),
    LongOpt::new("add", HasArg::No, Key::Long(ADD)),
    LongOpt::new("remove", HasArg::No, Key::Long(REMOVE)),
    LongOpt::new("clear", HasArg::No, Key::Long(CLEAR)),
    LongOpt::new("enable", HasArg::No, Key::Long(ENABLE)),
    LongOpt::new("disable", HasArg::No, Key::Long(DISABLE)),
    LongOpt::new("merge", HasArg::Required, Key::Long(MERGE)),
    LongOpt::new("granularity", HasArg::Required, Key::Short('g')),
    LongOpt::new("source-file", HasArg::Required, Key::Short('b')),
    LongOpt::new("source-format", HasArg::Required, Key::Short('F')),
    LongOpt::new("format", HasArg::Required, Key::Short('f')),
    LongOpt::new("image-opts", HasArg::No, Key::Long(IMAGE_OPTS)),
    LongOpt::new("object", HasArg::Required, Key::Long(OBJECT)),
];

/// One bitmap operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BitmapAction {
    /// `--add`: create a persistent, enabled bitmap.
    Add,
    /// `--remove`.
    Remove,
    /// `--clear`: reset all bits.
    Clear,
    /// `--enable`: start recording writes.
    Enable,
    /// `--disable`: stop recording writes.
    Disable,
    /// `--merge SOURCE`: OR the source bitmap into this one.
    Merge(String),
}

/// Everything `qemu-img bitmap` accepts on its command line.
#[derive(Clone, Debug, Default)]
pub struct BitmapOpts {
    /// Operations in command-line order.
    pub actions: Vec<BitmapAction>,
    /// `-g`: granularity for `--add`.
    pub granularity: Option<u64>,
    /// `-b`: image holding the `--merge` source bitmap.
    pub source_file: Option<String>,
    /// `-F`: format of the `-b` image.
    pub source_format: Option<String>,
    /// `-f`: image format.
    pub format: Option<String>,
    /// `--image-opts`.
    pub image_opts: bool,
    /// `--object` definitions.
    pub objects: Vec<String>,
    /// The image.
    pub filename: String,
    /// The bitmap to operate on.
    pub bitmap: String,
}

/// Parses the arguments after `bitmap`; usage errors are reported here, exactly as
/// qemu-img words them.
pub fn parse(ctx: &Ctx, args: &[String]) -> Parsed<BitmapOpts> {
    let mut o = BitmapOpts::default();
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
            Key::Long(ADD) => o.actions.push(BitmapAction::Add),
            Key::Long(REMOVE) => o.actions.push(BitmapAction::Remove),
            Key::Long(CLEAR) => o.actions.push(BitmapAction::Clear),
            Key::Long(ENABLE) => o.actions.push(BitmapAction::Enable),
            Key::Long(DISABLE) => o.actions.push(BitmapAction::Disable),
            Key::Long(MERGE) => o.actions.push(BitmapAction::Merge(arg)),
            Key::Short('g') => match cvtnum("granularity", &arg) {
                Ok(v) => o.granularity = Some(v as u64),
                Err(m) => {
                    ctx.error(&m);
                    return Err(1);
                }
            },
            Key::Short('b') => o.source_file = Some(arg),
            Key::Short('F') => o.source_format = Some(arg),
            Key::Short('f') => o.format = Some(arg),
            Key::Long(IMAGE_OPTS) => o.image_opts = true,
            Key::Long(OBJECT) => o.objects.push(arg),
            _ => {}
        }
        Ok(())
    });
    if let Err(code) = res {
        return Parsed::Exit(code);
    }
    let ops = g.operands();
    let has = |f: fn(&BitmapAction) -> bool| o.actions.iter().any(f);
    let problem = if o.actions.is_empty() {
        Some("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge")
    } else if o.granularity.is_some() && !has(|a| *a == BitmapAction::Add) {
        Some("granularity only supported with --add")
    } else if o.source_format.is_some() && o.source_file.is_none() {
        Some("-F only supported with -b")
    } else if o.source_file.is_some() && !has(|a| matches!(a, BitmapAction::Merge(_))) {
        Some("Merge bitmap source file only supported with --merge")
    } else if ops.len() != 2 {
        Some("Expecting filename and bitmap name")
    } else {
        None
    };
    if let Some(m) = problem {
        ctx.error(m);
        return Parsed::Exit(1);
    }
    o.filename = ops[0].clone();
    o.bitmap = ops[1].clone();
    Parsed::Run(o)
}

/// Runs `bitmap`; returns the process exit code.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    match parse(ctx, args) {
        Parsed::Run(_opts) => ctx.not_implemented(CMD),
        Parsed::Exit(code) => code,
    }
}
