//! `qemu-img bitmap`: add, remove, clear, enable, disable or merge persistent bitmaps.
use crate::args::{HasArg, Item, Key, LongOpt};
use crate::cmd::common::{as_qcow2, image_spec, open, ro_options};
use crate::ctx::{eprint_ignore, run_getopt, Ctx, Parsed};
use crate::opts::cvtnum;
use qimg::image::Image;
use qimg::open::OpenOptions;

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
        Parsed::Run(opts) if crate::secrets::register(ctx, &opts.objects).is_err() => 1,
        Parsed::Run(opts) => match execute(ctx, &opts) {
            Ok(()) => 0,
            Err(code) => code,
        },
        Parsed::Exit(code) => code,
    }
}

impl BitmapAction {
    /// The operation's name in qemu-img's failure message.
    fn verb(&self) -> &'static str {
        match self {
            BitmapAction::Add => "add",
            BitmapAction::Remove => "remove",
            BitmapAction::Clear => "clear",
            BitmapAction::Enable => "enable",
            BitmapAction::Disable => "disable",
            BitmapAction::Merge(_) => "merge",
        }
    }
}

/// Prints the warnings QEMU gives when opening `img`.
fn open_warnings(ctx: &Ctx, img: &dyn Image) {
    if let Some(q) = as_qcow2(img) {
        for w in q.warnings() {
            ctx.warn(w);
            eprint_ignore(
                "Some clusters may be leaked, run 'qemu-img check -r' on the image file to fix.\n",
            );
        }
    }
}

/// Why an operation failed, with the hint qemu-img adds for inconsistent bitmaps.
fn failure(e: &qimg::Error) -> String {
    let m = e.to_string();
    if m.ends_with("is inconsistent and cannot be used") {
        format!("{m}\nTry block-dirty-bitmap-remove to delete this bitmap from disk")
    } else {
        m
    }
}

/// Opens the image read-write (and the `-b` image read-only), then applies the
/// operations in order. As in qemu-img, the first failure stops the run; what was done
/// before it is kept (the image is closed normally).
fn execute(ctx: &Ctx, o: &BitmapOpts) -> Result<(), i32> {
    let (file, fmt) = image_spec(ctx, &o.filename, o.format.clone(), o.image_opts)?;
    let opts = OpenOptions {
        format: fmt,
        writable: true,
        ..Default::default()
    };
    let img = open(ctx, &file, &opts)?;
    open_warnings(ctx, img.as_ref());
    let src = match &o.source_file {
        // Even the target's own file is opened again, so, as with qemu-img, naming it
        // with -b fails on the image lock.
        Some(b) => {
            let s = open(ctx, b, &ro_options(o.source_format.clone(), false))?;
            open_warnings(ctx, s.as_ref());
            Some(s)
        }
        None => None,
    };
    let result = apply_all(o, img.as_ref(), src.as_deref());
    let closed = match as_qcow2(img.as_ref()) {
        Some(q) => q.close(),
        None => img.flush(),
    };
    if let Err((act, e)) = result {
        ctx.error(&format!(
            "Operation {} on bitmap {} failed: {}",
            act.verb(),
            o.bitmap,
            failure(&e)
        ));
        return Err(1);
    }
    if let Err(e) = closed {
        ctx.error(&format!(
            "Lost persistent bitmaps during inactivation of node '#block0': {e}"
        ));
        return Err(1);
    }
    Ok(())
}

type ActionError<'a> = (&'a BitmapAction, qimg::Error);

fn apply_all<'a>(
    o: &'a BitmapOpts,
    img: &dyn Image,
    src: Option<&dyn Image>,
) -> Result<(), ActionError<'a>> {
    for act in &o.actions {
        apply(o, act, img, src).map_err(|e| (act, e))?;
    }
    Ok(())
}

fn apply(
    o: &BitmapOpts,
    act: &BitmapAction,
    img: &dyn Image,
    src: Option<&dyn Image>,
) -> qimg::Result<()> {
    let name = o.bitmap.as_str();
    let Some(q) = as_qcow2(img) else {
        // Formats without persistent bitmaps: qemu-img fails the same way.
        return Err(match act {
            BitmapAction::Add => qimg::Error::unsupported(
                "Can't store persistent bitmaps to #block0: Operation not supported",
            ),
            _ => qimg::Error::NotFound(format!("Dirty bitmap '{name}' not found")),
        });
    };
    match act {
        BitmapAction::Add => {
            let g = o
                .granularity
                .unwrap_or_else(|| q.cluster_size().clamp(4096, 65536));
            q.bitmap_add(name, g, false)
        }
        BitmapAction::Remove => q.bitmap_remove(name),
        BitmapAction::Clear => q.bitmap_clear(name),
        BitmapAction::Enable => q.bitmap_set_enabled(name, true),
        BitmapAction::Disable => q.bitmap_set_enabled(name, false),
        BitmapAction::Merge(from) => {
            // QEMU's order: the target must exist and be usable, then the source.
            q.bitmap_usable(name)?;
            let sq = match src {
                None => q,
                Some(s) => as_qcow2(s).ok_or_else(|| {
                    qimg::Error::NotFound(format!("Dirty bitmap '{from}' not found"))
                })?,
            };
            sq.bitmap_usable(from)?;
            if sq.header().size != q.header().size {
                return Err(qimg::Error::InvalidArgument(
                    "Bitmaps are incompatible and can't be merged".into(),
                ));
            }
            // Run by run, so memory does not grow with the number of set ranges.
            let size = sq.header().size;
            let mut pos = 0;
            while pos < size {
                let (n, dirty) = sq.bitmap_run(from, pos, size - pos)?;
                if dirty {
                    q.bitmap_merge_ranges(name, &[(pos, n)])?;
                }
                pos += n;
            }
            Ok(())
        }
    }
}
