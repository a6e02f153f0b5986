//! `qemu-img map`: dump the allocation map of an image.
use crate::args::{HasArg, Item, Key, LongOpt};
use crate::cmd::common::{chain_filenames, data_filename, open, ro_options};
use crate::ctx::print_ignore;
use crate::ctx::{run_getopt, Ctx, Parsed};
use crate::fmt::{MapEntry, MapWriter};
use crate::opts::{cvtnum, OutputFormat};

const CMD: &str = "map";

/// `qemu-img map --help` text (`qemu-img` is replaced by the program name).
pub const HELP: &str = r#"Usage:
Dump image metadata.  Usage:

  qemu-img map [-f FMT | --image-opts] [--object OBJDEF] [--output human|json]
        [--start-offset OFFSET] [--max-length LENGTH] [-U] FILENAME

Arguments:
  -h, --help
     print this help and exit
  -f, --format FMT
     specify FILENAME image format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
     instead of a file name (incompatible with --format)
  --start-offset OFFSET
  --max-length LENGTH
  --output human|json
     specify output format name (default human)
  -U, --force-share
     open image in shared mode for concurrent access
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  FILENAME
     image file name (or specification with --image-opts)

"#;

/// Short options, in getopt syntax.
const SHORT: &str = "hf:l:s:U";
const IMAGE_OPTS: u16 = 1;
const OUTPUT: u16 = 2;
const OBJECT: u16 = 3;

/// Long options, in the table order that decides how ambiguities are listed.
const LONG: &[LongOpt] = &[
    LongOpt::new("help", HasArg::No, Key::Short('h')),
    LongOpt::new("format", HasArg::Required, Key::Short('f')),
    LongOpt::new("force-share", HasArg::No, Key::Short('U')),
    LongOpt::new("image-opts", HasArg::No, Key::Long(IMAGE_OPTS)),
    LongOpt::new("max-length", HasArg::Required, Key::Short('l')),
    LongOpt::new("start-offset", HasArg::Required, Key::Short('s')),
    LongOpt::new("output", HasArg::Required, Key::Long(OUTPUT)),
    LongOpt::new("object", HasArg::Required, Key::Long(OBJECT)),
];

/// Everything `qemu-img map` accepts on its command line.
#[derive(Clone, Debug, Default)]
pub struct MapOpts {
    /// `-f`: image format.
    pub format: Option<String>,
    /// `--image-opts`.
    pub image_opts: bool,
    /// `--start-offset` (`-s`).
    pub start_offset: Option<u64>,
    /// `--max-length` (`-l`).
    pub max_length: Option<u64>,
    /// `--output`.
    pub output: OutputFormat,
    /// `-U`.
    pub force_share: bool,
    /// `--object` definitions.
    pub objects: Vec<String>,
    /// The image.
    pub filename: String,
}

/// Parses the arguments after `map`; usage errors are reported here, exactly as
/// qemu-img words them.
pub fn parse(ctx: &Ctx, args: &[String]) -> Parsed<MapOpts> {
    let mut o = MapOpts::default();
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
            Key::Short('s') => match cvtnum("start offset", &arg) {
                Ok(v) => o.start_offset = Some(v as u64),
                Err(m) => {
                    ctx.error(&m);
                    return Err(1);
                }
            },
            Key::Short('l') => match cvtnum("max length", &arg) {
                Ok(v) => o.max_length = Some(v as u64),
                Err(m) => {
                    ctx.error(&m);
                    return Err(1);
                }
            },
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

/// Runs `map`; returns the process exit code.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    match parse(ctx, args) {
        Parsed::Run(opts) if crate::secrets::register(ctx, &opts.objects).is_err() => 1,
        Parsed::Run(opts) => map_cmd(ctx, &opts),
        Parsed::Exit(code) => code,
    }
}

fn map_cmd(ctx: &Ctx, o: &MapOpts) -> i32 {
    let (filename, format) =
        match crate::cmd::common::image_spec(ctx, &o.filename, o.format.clone(), o.image_opts) {
            Ok(x) => x,
            Err(c) => return c,
        };
    let img = match open(ctx, &filename, &ro_options(format, o.force_share)) {
        Ok(i) => i,
        Err(c) => return c,
    };
    let names = chain_filenames(&filename, img.as_ref());
    let mut layers = vec![img.clone()];
    while let Some(b) = layers.last().unwrap().backing().cloned() {
        layers.push(b);
    }
    let len = img.len();
    let start = o.start_offset.unwrap_or(0).min(len);
    let end = match o.max_length {
        Some(l) => start.saturating_add(l).min(len),
        None => len,
    };
    let mut w = MapWriter::new(o.output == OutputFormat::Json);
    let mut pending: Option<MapEntry> = None;
    let mut pos = start;
    while pos < end {
        let e = match qimg::image::chain_status(img.as_ref(), pos, end - pos) {
            Ok(e) => e,
            Err(err) => {
                ctx.error(&format!("Could not read file metadata: {err}"));
                return 1;
            }
        };
        let d = (e.depth as usize).min(layers.len() - 1);
        let entry = MapEntry {
            start: pos,
            length: e.len,
            depth: e.depth as u64,
            present: e.present,
            zero: e.zero,
            data: e.data,
            compressed: e.compressed,
            offset: e.offset,
            filename: Some(data_filename(&names[d], layers[d].as_ref())),
        };
        pos += e.len;
        match pending.as_mut() {
            Some(p) if p.mergeable(&entry) => p.length += entry.length,
            _ => {
                if let Some(p) = pending.replace(entry) {
                    if let Err(m) = w.push(&p) {
                        // qemu-img's stdout is block-buffered, so its error comes first.
                        ctx.error(m);
                        print_ignore(&w.take());
                        return 1;
                    }
                }
            }
        }
    }
    if let Some(p) = pending {
        if let Err(m) = w.push(&p) {
            ctx.error(m);
            print_ignore(&w.take());
            return 1;
        }
    }
    print_ignore(&w.finish());
    0
}
