//! `qemu-img convert`: copy one or more images into a new one, possibly converting the format.
use crate::args::{HasArg, Item, Key, LongOpt};
use crate::ctx::{run_getopt, Ctx, Parsed};
use crate::opts::{cvtnum, cvtnum_full, parse_snapshot_param, OptionList, SnapshotParam};

const CMD: &str = "convert";

/// `qemu-img convert --help` text (`qemu-img` is replaced by the program name).
pub const HELP: &str = r#"Usage:
Copy one image to another with optional format conversion.  Usage:

  qemu-img convert [-f SRC_FMT|--image-opts] [-T SRC_CACHE] [--bitmaps [--skip-broken-bitmaps]]
        [-o TGT_OPTS|--target-image-opts] [-t TGT_CACHE] [-n]
        [-B BACKING_FILENAME [-F BACKING_FMT]]
        SRC_FILENAME [SRC_FILENAME2 [...]] TGT_FILENAME

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operations
  -p, --progress
     show operation progress
  -f, --source-format SRC_FMT
     specify SRC_FILENAME source image format explicitly
  --source-image-opts
     indicates that SRC_FILENAME is a complete image specification
     instead of a file name (incompatible with --source-format)
  -l, --source-snapshot SNAPSHOT_PARAMS
     specify source snapshot parameters
  -T, --source-cache SRC_CACHE
     source image(s) cache mode (writeback)
  -O, --target-format TGT_FMT
     specify TGT_FILENAME image format (default is raw)
  --target-image-opts
     indicates that TGT_FILENAME is a complete image specification
     instead of a file name (incompatible with --output-format)
  -o, --target-options TGT_OPTS
     TARGET_FMT-specific options
  -c, --compress
     create compressed output image (qcow and qcow2 format only)
  -t, --target-cache TGT_CACHE
     cache mode when opening output image (unsafe)
  -B, --backing BACKING_FILENAME
     create output to be a CoW on top of BACKING_FILENAME
  -F, --backing-format BACKING_FMT
     specify BACKING_FILENAME image format explicitly
  -n, --no-create
     omit target volume creation (eg on rbd)
  --target-is-zero
  -S, --sparse-size SPARSE_SIZE
     XXX todo
  --bitmaps
     also copy any persistent bitmaps present in source
  --skip-broken-bitmaps
     skip (do not error out) any broken bitmaps
  -U, --force-share
     open images in shared mode for concurrent access
  -r, --rate RATE
     I/O rate limit
  -m, --parallel NUM_COROUTINES
     specify parallelism (default 8)
  -C, --copy-range-offloading
     use copy_range offloading
  --salvage
     XXX todo
  -W, --oob-writes
     enable out-of-order writes to improve performance
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  SRC_FILENAME
     source image file name (or specification with --image-opts)
  TGT_FILENAME
     target (output) image file name

"#;

/// Short options, in getopt syntax.
const SHORT: &str = "hf:O:o:cnpqr:t:T:S:m:l:B:F:CUW";
const BITMAPS: u16 = 1;
const IMAGE_OPTS: u16 = 2;
const OBJECT: u16 = 3;
const SALVAGE: u16 = 4;
const SKIP_BROKEN: u16 = 5;
const TARGET_IMAGE_OPTS: u16 = 6;
const TARGET_IS_ZERO: u16 = 7;
/// Largest `-m` value qemu-img accepts.
const MAX_COROUTINES: i64 = 16;
/// Largest `-S` value qemu-img accepts (32768 sectors).
const MAX_SPARSE_SIZE: i64 = 16 * 1024 * 1024;

/// Long options, in the table order that decides how ambiguities are listed.
const LONG: &[LongOpt] = &[
    LongOpt::new("help", HasArg::No, Key::Short('h')),
    LongOpt::new("backing", HasArg::Required, Key::Short('B')),
    LongOpt::new("backing-format", HasArg::Required, Key::Short('F')),
    LongOpt::new("bitmaps", HasArg::No, Key::Long(BITMAPS)),
    LongOpt::new("copy-range-offloading", HasArg::No, Key::Short('C')),
    LongOpt::new("force-share", HasArg::No, Key::Short('U')),
    LongOpt::new("image-opts", HasArg::No, Key::Long(IMAGE_OPTS)),
    LongOpt::new("object", HasArg::Required, Key::Long(OBJECT)),
    LongOpt::new("output-format", HasArg::Required, Key::Short('O')),
    LongOpt::new("options", HasArg::Required, Key::Short('o')),
    LongOpt::new("output-cache", HasArg::Required, Key::Short('t')),
    LongOpt::new("oob-writes", HasArg::No, Key::Short('W')),
    LongOpt::new("parallel", HasArg::Required, Key::Short('m')),
    LongOpt::new("quiet", HasArg::No, Key::Short('q')),
    LongOpt::new("rate", HasArg::Required, Key::Short('r')),
    LongOpt::new("source-image-opts", HasArg::No, Key::Long(IMAGE_OPTS)),
    LongOpt::new("source-format", HasArg::Required, Key::Short('f')),
    LongOpt::new("source-cache", HasArg::Required, Key::Short('T')),
    LongOpt::new("snapshot", HasArg::Required, Key::Short('l')),
    LongOpt::new("sparse-size", HasArg::Required, Key::Short('S')),
    LongOpt::new("salvage", HasArg::No, Key::Long(SALVAGE)),
    LongOpt::new("skip-broken-bitmaps", HasArg::No, Key::Long(SKIP_BROKEN)),
    LongOpt::new(
        "target-image-opts",
        HasArg::No,
        Key::Long(TARGET_IMAGE_OPTS),
    ),
    LongOpt::new("target-is-zero", HasArg::No, Key::Long(TARGET_IS_ZERO)),
];

/// Everything `qemu-img convert` accepts on its command line.
#[derive(Clone, Debug, Default)]
pub struct ConvertOpts {
    /// `-f`: format of the sources.
    pub source_format: Option<String>,
    /// `--image-opts`: sources are specifications.
    pub image_opts: bool,
    /// `-l`: read this internal snapshot of the source.
    pub snapshot: Option<SnapshotParam>,
    /// `-O`: target format (qemu-img defaults to raw).
    pub output_format: Option<String>,
    /// `--target-image-opts`: the target is a specification (needs `-n`).
    pub target_image_opts: bool,
    /// `-o`: target creation options.
    pub options: OptionList,
    /// `-c`: write compressed clusters.
    pub compress: bool,
    /// `-n`: the target exists already.
    pub no_create: bool,
    /// `--target-is-zero` (needs `-n`).
    pub target_is_zero: bool,
    /// `-B`: make the target an overlay of this file.
    pub backing: Option<String>,
    /// `-F`: format of the `-B` file.
    pub backing_format: Option<String>,
    /// `-S`: zero-detection granularity in bytes (0 = allocate everything); a multiple of 512 up to 16 MiB.
    pub sparse_size: Option<u64>,
    /// `-m`: parallel requests, 1..=16 (qemu-img defaults to 8).
    pub parallel: Option<u32>,
    /// `-W`: out-of-order writes.
    pub oob_writes: bool,
    /// `-C`: copy offloading.
    pub copy_range: bool,
    /// `-r`: rate limit in bytes per second.
    pub rate: Option<u64>,
    /// `-t`: target cache mode.
    pub target_cache: Option<String>,
    /// `-T`: source cache mode.
    pub source_cache: Option<String>,
    /// `--bitmaps`: copy persistent bitmaps.
    pub bitmaps: bool,
    /// `--skip-broken-bitmaps`.
    pub skip_broken_bitmaps: bool,
    /// `--salvage`: read errors become zeroes.
    pub salvage: bool,
    /// `-U`.
    pub force_share: bool,
    /// `-p`.
    pub progress: bool,
    /// `-q`.
    pub quiet: bool,
    /// `--object` definitions.
    pub objects: Vec<String>,
    /// `-o help` was given: list the target format's creation options and stop; `target` may then be empty.
    pub help_requested: bool,
    /// Source images, concatenated in order.
    pub sources: Vec<String>,
    /// Target image.
    pub target: String,
}

/// Parses the arguments after `convert`; usage errors are reported here, exactly as
/// qemu-img words them.
pub fn parse(ctx: &Ctx, args: &[String]) -> Parsed<ConvertOpts> {
    let mut o = ConvertOpts::default();
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
            Key::Short('B') => o.backing = Some(arg),
            Key::Short('F') => o.backing_format = Some(arg),
            Key::Long(BITMAPS) => o.bitmaps = true,
            Key::Short('C') => o.copy_range = true,
            Key::Short('U') => o.force_share = true,
            Key::Long(IMAGE_OPTS) => o.image_opts = true,
            Key::Long(OBJECT) => o.objects.push(arg),
            Key::Short('O') => o.output_format = Some(arg),
            Key::Short('o') => {
                o.options.accumulate(&arg).map_err(|m| {
                    ctx.error(&m);
                    1
                })?;
            }
            Key::Short('t') => o.target_cache = Some(arg),
            Key::Short('W') => o.oob_writes = true,
            Key::Short('m') => match cvtnum_full("number of coroutines", &arg, 1, MAX_COROUTINES) {
                Ok(v) => o.parallel = Some(v as u32),
                Err(m) => {
                    ctx.error(&m);
                    return Err(1);
                }
            },
            Key::Short('q') => o.quiet = true,
            Key::Short('r') => match cvtnum("rate limit", &arg) {
                Ok(v) => o.rate = Some(v as u64),
                Err(m) => {
                    ctx.error(&m);
                    return Err(1);
                }
            },
            Key::Short('f') => o.source_format = Some(arg),
            Key::Short('T') => o.source_cache = Some(arg),
            Key::Short('l') => match parse_snapshot_param(&arg) {
                Ok(s) => o.snapshot = Some(s),
                Err(lines) => {
                    for l in lines {
                        ctx.error(&l);
                    }
                    return Err(1);
                }
            },
            Key::Short('S') => match cvtnum("buffer size for sparse output", &arg) {
                Ok(v) if v.rem_euclid(512) == 0 && v <= MAX_SPARSE_SIZE => {
                    o.sparse_size = Some(v as u64)
                }
                Ok(_) => {
                    ctx.error(&format!(
                        "Invalid buffer size for sparse output specified. Valid sizes are \
                         multiples of 512 up to {MAX_SPARSE_SIZE}. Select 0 to disable sparse \
                         detection (fully allocates output)."
                    ));
                    return Err(1);
                }
                Err(m) => {
                    ctx.error(&m);
                    return Err(1);
                }
            },
            Key::Long(SALVAGE) => o.salvage = true,
            Key::Long(SKIP_BROKEN) => o.skip_broken_bitmaps = true,
            Key::Long(TARGET_IMAGE_OPTS) => o.target_image_opts = true,
            Key::Long(TARGET_IS_ZERO) => o.target_is_zero = true,
            Key::Short('c') => o.compress = true,
            Key::Short('n') => o.no_create = true,
            Key::Short('p') => o.progress = true,
            _ => {}
        }
        Ok(())
    });
    if let Err(code) = res {
        return Parsed::Exit(code);
    }
    let ops = g.operands();
    let conflict = if o.skip_broken_bitmaps && !o.bitmaps {
        Some("Use of --skip-broken-bitmaps requires --bitmaps")
    } else if o.compress && o.copy_range {
        Some("Cannot enable copy offloading when -c is used")
    } else if o.sparse_size.is_some() && o.copy_range {
        Some("Cannot enable copy offloading when -S is used")
    } else if o.copy_range && o.salvage {
        Some("Cannot use copy offloading in salvaging mode")
    } else if o.target_image_opts && !o.no_create {
        Some("--target-image-opts requires use of -n flag")
    } else if o.no_create && !o.options.is_empty() {
        Some("-o has no effect when skipping image creation")
    } else if o.target_is_zero && !o.no_create {
        Some("--target-is-zero requires use of -n flag")
    } else {
        None
    };
    if let Some(m) = conflict {
        ctx.error(m);
        return Parsed::Exit(1);
    }
    if o.options.has_help() {
        o.help_requested = true;
        if ops.len() >= 2 {
            o.target = ops[ops.len() - 1].clone();
        }
        return Parsed::Run(o);
    }
    if ops.len() < 2 {
        ctx.error("Must specify image file name");
        return Parsed::Exit(1);
    }
    o.target = ops[ops.len() - 1].clone();
    o.sources = ops[..ops.len() - 1].to_vec();
    Parsed::Run(o)
}

/// Runs `convert`; returns the process exit code.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    match parse(ctx, args) {
        Parsed::Run(_opts) => ctx.not_implemented(CMD),
        Parsed::Exit(code) => code,
    }
}
