//! `qemu-img dd`: copy part of an image into a new one, `dd` style.
use crate::args::{HasArg, Item, Key, LongOpt};
use crate::cmd::common::{image_spec, open, ro_options};
use crate::ctx::{run_getopt, Ctx, Parsed};
use crate::opts::{cvtnum, cvtnum_full, OptionList};
use qimg::open::OpenOptions;
use qimg::ops::dd::{dd, plan};

const CMD: &str = "dd";

/// `qemu-img dd --help` text (`qemu-img` is replaced by the program name).
pub const HELP: &str = r#"Usage:
Copy input to output with optional format conversion.  Usage:

  qemu-img dd [-f FMT|--image-opts] [-O OUTPUT_FMT] [-U]
        [bs=BLOCK_SIZE] [count=BLOCKS] if=INPUT of=OUTPUT

Arguments:
  -h, --help
     print this help and exit
  -f, --format FMT
     specify format for INPUT explicitly
  --image-opts
     indicates that INPUT is a complete image specification
     instead of a file name (incompatible with --format)
  -O, --output-format OUTPUT_FMT
     format of the OUTPUT (default raw)
  -U, --force-share
     open images in shared mode for concurrent access
  bs=BLOCK_SIZE[kKMGTP]
     size of I/O block (default 512)
  count=COUNT
     number of blocks to convert (default whole INPUT)
  if=INPUT
     input file name (or image specification with --image-opts)
  of=OUTPUT
     output file name to create

"#;

/// Short options, in getopt syntax.
const SHORT: &str = "f:hO:U";
const IMAGE_OPTS: u16 = 1;
const OBJECT: u16 = 2;

/// Long options, in the table order that decides how ambiguities are listed.
const LONG: &[LongOpt] = &[
    LongOpt::new("help", HasArg::No, Key::Short('h')),
    LongOpt::new("format", HasArg::Required, Key::Short('f')),
    LongOpt::new("force-share", HasArg::No, Key::Short('U')),
    LongOpt::new("image-opts", HasArg::No, Key::Long(IMAGE_OPTS)),
    LongOpt::new("object", HasArg::Required, Key::Long(OBJECT)),
    LongOpt::new("output-format", HasArg::Required, Key::Short('O')),
];

/// Everything `qemu-img dd` accepts on its command line.
#[derive(Clone, Debug, Default)]
pub struct DdOpts {
    /// `-f`: input format.
    pub format: Option<String>,
    /// `--image-opts`.
    pub image_opts: bool,
    /// `-O`: output format (qemu-img defaults to raw).
    pub output_format: Option<String>,
    /// `-U`.
    pub force_share: bool,
    /// `--object` definitions.
    pub objects: Vec<String>,
    /// `bs=`: block size (default 512).
    pub bs: u64,
    /// `count=`: blocks to copy (default: all).
    pub count: Option<u64>,
    /// `skip=`: input blocks to skip.
    pub skip: u64,
    /// `if=`: input image.
    pub input: String,
    /// `of=`: output image (created).
    pub output: String,
}

/// Parses the arguments after `dd`; usage errors are reported here, exactly as
/// qemu-img words them.
pub fn parse(ctx: &Ctx, args: &[String]) -> Parsed<DdOpts> {
    let mut o = DdOpts::default();
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
            Key::Long(OBJECT) => o.objects.push(arg),
            Key::Short('O') => o.output_format = Some(arg),
            _ => {}
        }
        Ok(())
    });
    if let Err(code) = res {
        return Parsed::Exit(code);
    }
    let ops = g.operands();
    o.bs = 512;
    let (mut input, mut output) = (None, None);
    for word in &ops {
        let parsed = match word.split_once('=') {
            Some(("bs", v)) => cvtnum_full("bs", v, 1, i32::MAX as i64).map(|n| o.bs = n as u64),
            Some(("count", v)) => cvtnum("count", v).map(|n| o.count = Some(n as u64)),
            Some(("skip", v)) => cvtnum("skip", v).map(|n| o.skip = n as u64),
            Some(("if", v)) => {
                input = Some(v.to_string());
                Ok(())
            }
            Some(("of", v)) => {
                output = Some(v.to_string());
                Ok(())
            }
            // qemu-img names only the part before '='.
            _ => Err(format!(
                "unrecognized operand {}",
                word.split_once('=').map_or(word.as_str(), |(k, _)| k)
            )),
        };
        if let Err(m) = parsed {
            ctx.error(&m);
            return Parsed::Exit(1);
        }
    }
    let (Some(input), Some(output)) = (input, output) else {
        ctx.error("Must specify both input and output files");
        return Parsed::Exit(1);
    };
    o.input = input;
    o.output = output;
    Parsed::Run(o)
}

/// Runs `dd`; returns the process exit code.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    match parse(ctx, args) {
        Parsed::Run(opts) if crate::secrets::register(ctx, &opts.objects).is_err() => 1,
        Parsed::Run(opts) => dd_cmd(ctx, &opts),
        Parsed::Exit(code) => code,
    }
}

fn dd_cmd(ctx: &Ctx, o: &DdOpts) -> i32 {
    let (input, fmt) = match image_spec(ctx, &o.input, o.format.clone(), o.image_opts) {
        Ok(x) => x,
        Err(c) => return c,
    };
    let src = match open(ctx, &input, &ro_options(fmt, o.force_share)) {
        Ok(s) => s,
        Err(c) => return c,
    };
    let out_fmt = o.output_format.clone().unwrap_or_else(|| "raw".into());
    if out_fmt != "raw" && out_fmt != "qcow2" {
        ctx.error("Unknown file format");
        return 1;
    }
    let p = plan(src.len(), o.bs, o.count, o.skip);
    if p.skip_too_far {
        // qemu-img reports this and still creates an empty output (exit code 0).
        ctx.error(&format!("{}: cannot skip to specified offset", o.input));
    }
    if let Err(c) = crate::cmd::create::create_image(
        ctx,
        &out_fmt,
        &o.output,
        Some(p.len),
        &OptionList::default(),
        None,
        None,
        true,
        false,
        Some("error while creating output image: "),
    ) {
        return c;
    }
    let topts = OpenOptions {
        format: Some(out_fmt),
        writable: true,
        ..Default::default()
    };
    let dst = match open(ctx, &o.output, &topts) {
        Ok(d) => d,
        Err(c) => return c,
    };
    if let Err(e) = dd(src.as_ref(), dst.as_ref(), &p) {
        ctx.error(&format!("error while writing to output image file: {e}"));
        return 1;
    }
    0
}
