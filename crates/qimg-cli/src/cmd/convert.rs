//! `qemu-img convert`: copy one or more images into a new one, possibly converting the format.
use crate::args::{HasArg, Item, Key, LongOpt};
use crate::cmd::common::{open, ro_options};
use crate::ctx::{eprint_ignore, print_ignore};
use crate::ctx::{run_getopt, Ctx, Parsed};
use crate::opts::{cvtnum, cvtnum_full, parse_snapshot_param, OptionList, SnapshotParam};
use qimg::image::Image;
use qimg::open::{open_locked, OpenOptions, SnapshotSel};
use qimg::ops::convert::{convert, ConvertOptions, Target};
use qimg::qcow2::writer::Qcow2Writer;
use qimg::raw::Raw;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

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
        Parsed::Run(opts) if crate::secrets::register(ctx, &opts.objects).is_err() => 1,
        Parsed::Run(opts) => convert_cmd(ctx, &opts),
        Parsed::Exit(code) => code,
    }
}

/// Prints progress as qemu-img does (`    (12.34/100%)` and a carriage return) when stdout
/// is not a terminal, and a bar with throughput when it is.
pub(crate) struct Progress {
    tty: bool,
    last: AtomicU64,
    start: std::time::Instant,
    out: Mutex<()>,
}

impl Progress {
    pub(crate) fn new() -> Progress {
        let p = Progress {
            tty: std::io::stdout().is_terminal(),
            last: AtomicU64::new(0),
            start: std::time::Instant::now(),
            out: Mutex::new(()),
        };
        p.draw(0, 1);
        p
    }

    fn draw(&self, done: u64, total: u64) {
        let pct = if total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / total as f64
        };
        let _g = self.out.lock().unwrap();
        if self.tty {
            let width = 40usize;
            let filled = ((pct / 100.0) * width as f64) as usize;
            let secs = self.start.elapsed().as_secs_f64().max(1e-6);
            let rate = done as f64 / secs / (1 << 20) as f64;
            print_ignore(&format!(
                "\r[{}{}] {pct:6.2}% {rate:8.1} MiB/s",
                "#".repeat(filled),
                " ".repeat(width - filled)
            ));
        } else {
            print_ignore(&format!("    ({pct:.2}/100%)\r"));
        }
    }

    /// Redraws when the percentage moved by at least one point.
    pub(crate) fn update(&self, done: u64, total: u64) {
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        let prev = self.last.load(Ordering::Relaxed);
        if pct > prev
            && self
                .last
                .compare_exchange(prev, pct, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.draw(done, total);
        }
    }

    pub(crate) fn finish(&self) {
        self.draw(1, 1);
        print_ignore("\n");
    }
}

fn convert_cmd(ctx: &Ctx, o: &ConvertOpts) -> i32 {
    if o.help_requested {
        return crate::cmd::create::print_options_help(
            ctx,
            o.output_format.as_deref().unwrap_or("raw"),
        );
    }
    let mut sources: Vec<Arc<dyn Image>> = Vec::new();
    let snapshot = o.snapshot.as_ref().map(|s| match s {
        SnapshotParam::IdOrName(x) => SnapshotSel::IdOrName(x.clone()),
        SnapshotParam::Options { id, name } => SnapshotSel::Exact {
            id: id.clone(),
            name: name.clone(),
        },
    });
    for s in &o.sources {
        let (s, fmt) =
            match crate::cmd::common::image_spec(ctx, s, o.source_format.clone(), o.image_opts) {
                Ok(x) => x,
                Err(c) => return c,
            };
        let s = &s;
        let mut opts = ro_options(fmt, o.force_share);
        opts.snapshot = snapshot.clone();
        let r = if snapshot.is_some() {
            let opts = match crate::cmd::common::with_encryption(ctx, s, &opts) {
                Ok(x) => x,
                Err(c) => return c,
            };
            // qemu-img reports a missing snapshot without the "Could not open" prefix.
            qimg::open::open_image(Path::new(s), &opts).map_err(|e| {
                match e {
                    qimg::Error::NotFound(m) => ctx.error(&m),
                    e => ctx.error(&format!("Could not open '{s}': {e}")),
                }
                1
            })
        } else {
            open(ctx, s, &opts)
        };
        match r {
            Ok(i) => sources.push(i),
            Err(c) => return c,
        }
    }
    let total: u64 = sources.iter().map(|s| s.len()).sum();
    let fmt = o.output_format.clone().unwrap_or_else(|| "raw".into());
    if fmt != "raw" && fmt != "qcow2" {
        ctx.error(&format!("Unknown file format '{fmt}'"));
        return 1;
    }
    if o.bitmaps && fmt != "qcow2" {
        ctx.error(&format!("Format driver '{fmt}' does not support bitmaps"));
        return 1;
    }
    if o.bitmaps && sources.len() != 1 {
        ctx.error("Copying bitmaps only possible with single source");
        return 1;
    }
    // Bitmaps to copy, checked before any data moves (as qemu-img does).
    let mut bitmaps = Vec::new();
    if o.bitmaps {
        if let Some(q) = crate::cmd::common::as_qcow2(sources[0].as_ref()) {
            for b in q.bitmap_list() {
                if b.inconsistent {
                    if o.skip_broken_bitmaps {
                        ctx.warn(&format!("Skipping inconsistent bitmap '{}'", b.name));
                        continue;
                    }
                    ctx.error(&format!("Cannot copy inconsistent bitmap '{}'", b.name));
                    eprint_ignore("Try --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it\n");
                    return 1;
                }
                match q.bitmap_dirty_ranges(&b.name) {
                    Ok(r) => bitmaps.push((b, r)),
                    Err(e) => {
                        ctx.error(&e.to_string());
                        return 1;
                    }
                }
            }
        }
    }
    if o.compress && fmt != "qcow2" {
        ctx.error("Compression not supported for this file format");
        return 1;
    }
    if o.compress
        && (o.options.get("encrypt.format").is_some()
            || o.options.get("encryption").as_deref() == Some("on"))
    {
        ctx.error("Compression and encryption not supported at the same time");
        return 1;
    }
    let target_path = Path::new(&o.target);
    let fresh = !o.no_create;
    // -B (or -o backing_file=): the target becomes an overlay of that file.
    let backing = o.backing.clone().or_else(|| o.options.get("backing_file"));
    let backing_fmt = o
        .backing_format
        .clone()
        .or_else(|| o.options.get("backing_fmt"));
    if let Some(b) = &backing {
        if fmt == "raw" {
            ctx.error("Backing file not supported for file format 'raw'");
            return 1;
        }
        if fresh && backing_fmt.is_none() {
            ctx.error("Use of backing file requires explicit backing format");
            return 1;
        }
        // The fresh target is written without opening its chain; check the backing file
        // opens as qemu-img's open of the target would.
        let bopts = ro_options(backing_fmt.clone(), o.force_share);
        let bpath = qimg::open::resolve_relative(target_path, b);
        if fresh {
            if let Err(e) = qimg::open::open_image(&bpath, &bopts) {
                if let Err(c) = crate::cmd::create::create_image(
                    ctx,
                    &fmt,
                    &o.target,
                    Some(total),
                    &o.options,
                    o.backing.as_deref(),
                    o.backing_format.as_deref(),
                    true,
                    true,
                    Some(&format!("error while converting {fmt}: ")),
                ) {
                    return c;
                }
                ctx.error(&format!(
                    "Could not open '{}': Could not open backing file: {e}",
                    o.target
                ));
                return 1;
            }
        }
    }
    if fresh {
        if let Err(c) = crate::cmd::create::create_image(
            ctx,
            &fmt,
            &o.target,
            Some(total),
            &o.options,
            o.backing.as_deref(),
            o.backing_format.as_deref(),
            true,
            true,
            Some(&format!("error while converting {fmt}: ")),
        ) {
            return c;
        }
    }
    let topts = OpenOptions {
        format: Some(fmt.clone()),
        writable: true,
        ..Default::default()
    };
    // A target created encrypted is opened with the key its creation options name (as
    // qemu-img does) and written through the image engine, which encrypts.
    let encrypted_target = fresh
        && fmt == "qcow2"
        && (o.options.get("encrypt.format").is_some()
            || o.options.get("encryption").as_deref() == Some("on"));
    if encrypted_target {
        crate::secrets::set_image_encrypt(
            &o.target,
            &o.target,
            None,
            o.options.get("encrypt.key-secret"),
        );
    }
    let target = if fmt == "qcow2" && fresh && !encrypted_target {
        let st = match open_locked(target_path, &topts) {
            Ok(s) => s,
            Err(e) => {
                ctx.error(&format!("Could not open '{}': {e}", o.target));
                return 1;
            }
        };
        let img = match qimg::qcow2::Qcow2::open(
            Arc::new(st),
            qimg::qcow2::Qcow2Options {
                writable: false,
                check: false,
                ..Default::default()
            },
        ) {
            Ok(i) => i,
            Err(e) => {
                ctx.error(&format!("Could not open '{}': {e}", o.target));
                return 1;
            }
        };
        let data = match img.header().data_file.clone() {
            Some(df) if img.header().has_data_file() => {
                let p = qimg::open::resolve_relative(target_path, &df);
                match open_locked(&p, &topts) {
                    Ok(s) => Some(Arc::new(s) as Arc<dyn qimg::storage::Storage>),
                    Err(e) => {
                        ctx.error(&format!("Could not open '{}': {e}", p.display()));
                        return 1;
                    }
                }
            }
            _ => None,
        };
        let file = img.file().clone();
        drop(img);
        match Qcow2Writer::open(file, data) {
            Ok(w) => Target::Qcow2(Box::new(w)),
            Err(e) => {
                ctx.error(&format!("Could not open '{}': {e}", o.target));
                return 1;
            }
        }
    } else if fmt == "raw" && fresh {
        match open_locked(target_path, &topts).and_then(|s| Raw::open(Arc::new(s), true)) {
            Ok(r) => Target::Image(Arc::new(r)),
            Err(e) => {
                ctx.error(&format!("Could not open '{}': {e}", o.target));
                return 1;
            }
        }
    } else if o.target_image_opts {
        let (t, f) = match crate::cmd::common::image_spec(ctx, &o.target, None, true) {
            Ok(x) => x,
            Err(c) => return c,
        };
        let topts = OpenOptions {
            format: f,
            ..topts.clone()
        };
        match open(ctx, &t, &topts) {
            Ok(i) => Target::Image(i),
            Err(c) => return c,
        }
    } else {
        match open(ctx, &o.target, &topts) {
            Ok(i) => Target::Image(i),
            Err(c) => return c,
        }
    };
    if let Target::Image(t) = &target {
        if t.len() < total {
            ctx.error("output file is smaller than input file");
            return 1;
        }
    }
    let progress = (o.progress && !o.quiet).then(Progress::new);
    let cb = |d: u64, t: u64| {
        if let Some(p) = &progress {
            p.update(d, t);
        }
    };
    let flush = !matches!(o.target_cache.as_deref(), None | Some("unsafe"));
    let salvaged = |at: u64, e: &qimg::Error| {
        let errno = std::io::Error::from_raw_os_error(e.errno());
        ctx.warn(&format!(
            "error while reading offset {at}: {}",
            qimg::error::strerror(&errno)
        ));
    };
    let copts = ConvertOptions {
        sparse_size: o.sparse_size.unwrap_or(4096),
        target_is_zero: fresh || o.target_is_zero,
        compress: o.compress,
        // Compression is CPU-bound: one worker per core; plain copies overlap I/O with
        // qemu-img's default of 8 requests in flight.
        threads: o.parallel.map(|m| m as usize).unwrap_or(if o.compress {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        } else {
            8
        }),
        flush,
        progress: Some(&cb),
        top_only: backing.is_some(),
        map_sources: sigbus::install(&ctx.prog),
        salvage: o.salvage,
        on_salvaged: Some(&salvaged),
        rate_limit: o.rate.unwrap_or(0),
        copy_range: o.copy_range,
    };
    match convert(&sources, target, &copts) {
        Ok(()) => {}
        // Says which side failed and where, as qemu-img does.
        Err(e @ qimg::Error::Copy { .. }) => {
            ctx.error(&e.to_string());
            return 1;
        }
        Err(e) => {
            ctx.error(&format!("error while writing at byte 0: {e}"));
            return 1;
        }
    }
    if let Some(p) = &progress {
        p.finish();
    }
    if !bitmaps.is_empty() {
        if let Err(e) = copy_bitmaps(&o.target, &bitmaps) {
            ctx.error(&e.to_string());
            return 1;
        }
    }
    0
}

/// Recreates the source's persistent bitmaps in the converted target.
fn copy_bitmaps(
    target: &str,
    bitmaps: &[(qimg::qcow2::bitmaps::BitmapInfo, Vec<(u64, u64)>)],
) -> qimg::Result<()> {
    let opts = OpenOptions {
        format: Some("qcow2".into()),
        writable: true,
        ..Default::default()
    };
    let img = qimg::open::open_image(Path::new(target), &opts)?;
    let q = crate::cmd::common::as_qcow2(img.as_ref())
        .ok_or_else(|| qimg::Error::unsupported("target is not qcow2"))?;
    for (b, ranges) in bitmaps {
        q.bitmap_add(&b.name, b.granularity, !b.enabled)?;
        q.bitmap_merge_ranges(&b.name, ranges)?;
    }
    q.close()
}

/// Turns SIGBUS into qemu-img-style error exit, so raw sources may be memory-mapped: the
/// only way to get the signal is a source shrinking under a running convert, and that must
/// end in a one-line error rather than a crash dump.
mod sigbus {
    use std::sync::OnceLock;

    static MESSAGE: OnceLock<Vec<u8>> = OnceLock::new();

    extern "C" fn on_sigbus(_: libc::c_int) {
        if let Some(m) = MESSAGE.get() {
            // SAFETY: write(2) and _exit(2) are async-signal-safe; the message was built
            // before the handler was installed and is never freed.
            unsafe {
                libc::write(2, m.as_ptr() as *const libc::c_void, m.len());
            }
        }
        // SAFETY: as above.
        unsafe { libc::_exit(1) }
    }

    /// Installs the handler; returns whether mapping sources is safe.
    pub fn install(prog: &str) -> bool {
        let msg =
            format!("{prog}: error while reading: a source image shrank during the conversion\n");
        MESSAGE.get_or_init(|| msg.into_bytes());
        // SAFETY: a zeroed sigaction with a plain handler and an empty mask is valid.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigbus as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) == 0
        }
    }
}
