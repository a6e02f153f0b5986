//! `qemu-img rebase`: change the backing file of an image.
use crate::args::{HasArg, Item, Key, LongOpt};
use crate::cmd::common::{image_spec, open, ro_options};
use crate::cmd::convert::Progress;
use crate::ctx::{run_getopt, Ctx, Parsed};
use crate::opts::CacheMode;
use qimg::image::Image;
use qimg::open::{open_image, open_qcow2, resolve_relative, OpenOptions};
use qimg::ops::rebase::{rebase_copy, RebaseOptions};
use std::path::Path;

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
        Parsed::Run(opts) if crate::secrets::register(ctx, &opts.objects).is_err() => 1,
        Parsed::Run(opts) => rebase_cmd(ctx, &opts),
        Parsed::Exit(code) => code,
    }
}

fn rebase_cmd(ctx: &Ctx, o: &RebaseOpts) -> i32 {
    for (t, what) in [(&o.cache, "cache"), (&o.backing_cache, "backing cache")] {
        if let Some(t) = t {
            if CacheMode::parse(t).is_none() {
                ctx.error(&format!("Invalid {what} option: {t}"));
                return 1;
            }
        }
    }
    let (file, fmt) = match image_spec(ctx, &o.filename, o.format.clone(), o.image_opts) {
        Ok(x) => x,
        Err(c) => return c,
    };
    let path = Path::new(&file);
    // Open the image alone first to learn its format: only qcow2 records a backing file.
    let is_qcow2 = {
        let opts = OpenOptions {
            no_backing: true,
            ..ro_options(fmt.clone(), o.force_share)
        };
        match open(ctx, &file, &opts) {
            Ok(i) => i.format_name() == "qcow2",
            Err(c) => return c,
        }
    };
    let new_name = o.backing.clone().unwrap_or_default();
    let change_failed = |why: &str| {
        ctx.error(&format!(
            "Could not change the backing file to '{new_name}': {why}"
        ));
        1
    };
    if !is_qcow2 {
        return change_failed("Operation not supported");
    }
    let opts = OpenOptions {
        writable: true,
        no_backing: o.unsafe_mode,
        ..ro_options(fmt, o.force_share)
    };
    let opts = match crate::cmd::common::with_encryption(ctx, &file, &opts) {
        Ok(x) => x,
        Err(c) => return c,
    };
    let mut img = match open_qcow2(path, &opts) {
        Ok(i) => i,
        Err(e) => {
            ctx.error(&format!("Could not open '{}': {e}", o.filename));
            return 1;
        }
    };
    let progress = (o.progress && !o.quiet).then(Progress::new);
    if !o.unsafe_mode {
        // A relative name is relative to the image's directory, as QEMU resolves it.
        let new = if new_name.is_empty() {
            None
        } else {
            let bopts = ro_options(o.backing_format.clone(), o.force_share);
            match open_image(&resolve_relative(path, &new_name), &bopts) {
                Ok(b) => Some(b),
                Err(e) => {
                    ctx.error(&format!(
                        "Could not open new backing file '{new_name}': {e}"
                    ));
                    return 1;
                }
            }
        };
        let cb = |d: u64, t: u64| {
            if let Some(p) = &progress {
                p.update(d, t);
            }
        };
        let ropts = RebaseOptions {
            progress: Some(&cb),
            compress: o.compress,
        };
        let old = img.backing().cloned();
        let cs = img.cluster_size();
        if let Err(e) = rebase_copy(&img, old.as_deref(), new.as_deref(), cs, &ropts) {
            ctx.error(&format!("Error while rebasing: {e}"));
            return 1;
        }
    }
    if !new_name.is_empty() && o.backing_format.is_none() {
        return change_failed("backing format must be specified");
    }
    let name = (!new_name.is_empty()).then_some(new_name.as_str());
    if let Err(e) = img
        .set_backing_file(name, o.backing_format.as_deref())
        .and_then(|()| img.close())
    {
        return change_failed(&e.to_string());
    }
    if let Some(p) = &progress {
        p.finish();
    }
    0
}
