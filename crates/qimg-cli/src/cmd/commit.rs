//! `qemu-img commit`: copy an overlay's data into its backing file.
use crate::args::{HasArg, Item, Key, LongOpt};
use crate::cmd::common::{as_qcow2, chain_filenames, image_spec, open, ro_options};
use crate::cmd::convert::Progress;
use crate::ctx::print_ignore;
use crate::ctx::{run_getopt, Ctx, Parsed};
use crate::opts::{cvtnum, CacheMode};
use qimg::image::Image;
use qimg::open::{open_qcow2, resolve_relative, OpenOptions};
use qimg::ops::commit::{commit, layer_at, CommitOptions};
use std::path::Path;

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
        Parsed::Run(opts) if crate::secrets::register(ctx, &opts.objects).is_err() => 1,
        Parsed::Run(opts) => commit_cmd(ctx, &opts),
        Parsed::Exit(code) => code,
    }
}

/// Finds `name` in the backing chain of `top` (depth 1 = its backing file) the way
/// qemu-img does: by the name stored in the overlay, or by the file it resolves to when
/// taken relative to the directory of the image that names each layer (not to the
/// current directory: `commit -b dir/base dir/top` is not found, as with qemu-img).
fn find_in_chain(top_name: &str, top: &dyn Image, name: &str) -> Option<usize> {
    let canon = |p: &Path| std::fs::canonicalize(p).ok();
    let names = chain_filenames(top_name, top);
    let mut layer = top;
    for depth in 1..names.len() {
        let stored = as_qcow2(layer).and_then(|q| q.header().backing_file.clone());
        let wanted = canon(&resolve_relative(Path::new(&names[depth - 1]), name));
        let c = canon(Path::new(&names[depth]));
        if stored.as_deref() == Some(name) || (c.is_some() && wanted == c) {
            return Some(depth);
        }
        layer = layer.backing()?.as_ref();
    }
    None
}

/// Grows the image at `path` (format `fmt`) to `size` bytes.
fn grow(path: &Path, fmt: &str, size: u64) -> qimg::Result<()> {
    let opts = OpenOptions {
        format: Some(fmt.to_string()),
        writable: true,
        no_backing: true,
        ..Default::default()
    };
    if fmt == "qcow2" {
        let mut q = open_qcow2(path, &opts)?;
        q.grow(size)?;
        q.close()
    } else {
        let f = qimg::open::open_locked(path, &opts)?;
        qimg::storage::Storage::set_len(&f, size)
    }
}

fn commit_cmd(ctx: &Ctx, o: &CommitOpts) -> i32 {
    if let Some(t) = &o.cache {
        if CacheMode::parse(t).is_none() {
            ctx.error(&format!("Invalid cache option: {t}"));
            return 1;
        }
    }
    let (file, fmt) = match image_spec(ctx, &o.filename, o.format.clone(), o.image_opts) {
        Ok(x) => x,
        Err(c) => return c,
    };
    let ro = ro_options(fmt.clone(), false);
    // First look at the chain read-only: which layer is the base, and is it big enough?
    let (depth, base_path, base_fmt, base_len, top_len) = {
        let top = match open(ctx, &file, &ro) {
            Ok(t) => t,
            Err(c) => return c,
        };
        if top.backing().is_none() {
            ctx.error("Image does not have a backing file");
            return 1;
        }
        let depth = match &o.base {
            None => 1,
            Some(b) => match find_in_chain(&file, top.as_ref(), b) {
                Some(d) => d,
                None => {
                    ctx.error(&format!(
                        "Did not find '{b}' in the backing chain of '{}'",
                        o.filename
                    ));
                    return 1;
                }
            },
        };
        let names = chain_filenames(&file, top.as_ref());
        let Some(base) = layer_at(top.as_ref(), depth) else {
            ctx.error("Image does not have a backing file");
            return 1;
        };
        (
            depth,
            names[depth].clone(),
            base.format_name(),
            base.len(),
            top.len(),
        )
    };
    if base_len < top_len {
        if let Err(e) = grow(Path::new(&base_path), base_fmt, top_len) {
            ctx.error(&format!("Top image {} is larger than base image {base_path}, and resize of base image failed: {e}", o.filename));
            return 1;
        }
    }
    let progress = (o.progress && !o.quiet).then(Progress::new);
    let cb = |d: u64, t: u64| {
        if let Some(p) = &progress {
            p.update(d, t);
        }
    };
    {
        let opts = OpenOptions {
            writable_depth: Some(depth),
            ..ro.clone()
        };
        let top = match open(ctx, &file, &opts) {
            Ok(t) => t,
            Err(c) => return c,
        };
        let copts = CommitOptions {
            threads: 4,
            progress: Some(&cb),
        };
        if let Err(e) = commit(top.as_ref(), depth, &copts) {
            ctx.error(&format!("Block job failed: {e}"));
            return 1;
        }
        // Close the base here rather than on drop, where a failure storing its bitmaps or
        // writing its last metadata could not be reported.
        if let Some(q) = layer_at(top.as_ref(), depth).and_then(as_qcow2) {
            if let Err(e) = q.close() {
                ctx.error(&format!("Block job failed: {e}"));
                return 1;
            }
        }
    }
    // -b implies -d: the overlay still names its old backing file, whose content changed.
    if !o.drop && o.base.is_none() && fmt.as_deref() != Some("raw") {
        let opts = OpenOptions {
            writable: true,
            no_backing: true,
            ..ro.clone()
        };
        let opts = match crate::cmd::common::with_encryption(ctx, &file, &opts) {
            Ok(x) => x,
            Err(c) => return c,
        };
        let r = open_qcow2(Path::new(&file), &opts).and_then(|q| q.make_empty());
        if let Err(e) = r {
            ctx.error(&format!("Could not empty {}: {e}", o.filename));
            return 1;
        }
    }
    if let Some(p) = &progress {
        p.finish();
    }
    if !o.quiet {
        print_ignore("Image committed.\n");
    }
    0
}
