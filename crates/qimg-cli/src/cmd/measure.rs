//! `qemu-img measure`: compute the file size an image conversion or creation needs.
use crate::args::{HasArg, Item, Key, LongOpt};
use crate::ctx::{run_getopt, Ctx, Parsed};
use crate::opts::{cvtnum, parse_snapshot_param, OptionList, OutputFormat, SnapshotParam};

const CMD: &str = "measure";

/// `qemu-img measure --help` text (`qemu-img` is replaced by the program name).
pub const HELP: &str = r#"Usage:
Calculate file size requred for a new image.  Usage:

  qemu-img measure [-f FMT|--image-opts] [-o OPTIONS] [-O OUTPUT_FMT]
       [--output OFMT] [--object OBJDEF] [-l SNAPSHOT_PARAM]
       (--size SIZE | FILENAME)

Arguments:
  -h, --help
     print this help and exit
  -O, --target-format FMT
     desired target/output image format (default raw)
  -s, --size SIZE
     measure file size for given image size
  FILENAME
     measure file size required to convert from FILENAME
  -f, --format
     specify format of FILENAME explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
     instead of a file name (incompatible with --format)
  -l, --snapshot SNAPSHOT
     use this snapshot in FILENAME as source
  --output human|json
     output format
  -U, --force-share
     open images in shared mode for concurrent access

"#;

/// Short options, in getopt syntax.
const SHORT: &str = "hf:l:o:O:U";
const IMAGE_OPTS: u16 = 1;
const OBJECT: u16 = 2;
const OUTPUT: u16 = 3;
const SIZE: u16 = 4;

/// Long options, in the table order that decides how ambiguities are listed.
const LONG: &[LongOpt] = &[
    LongOpt::new("help", HasArg::No, Key::Short('h')),
    LongOpt::new("format", HasArg::Required, Key::Short('f')),
    LongOpt::new("force-share", HasArg::No, Key::Short('U')),
    LongOpt::new("image-opts", HasArg::No, Key::Long(IMAGE_OPTS)),
    LongOpt::new("options", HasArg::Required, Key::Short('o')),
    LongOpt::new("object", HasArg::Required, Key::Long(OBJECT)),
    LongOpt::new("output", HasArg::Required, Key::Long(OUTPUT)),
    LongOpt::new("snapshot", HasArg::Required, Key::Short('l')),
    LongOpt::new("size", HasArg::Required, Key::Long(SIZE)),
    LongOpt::new("target-format", HasArg::Required, Key::Short('O')),
];

/// Everything `qemu-img measure` accepts on its command line.
#[derive(Clone, Debug, Default)]
pub struct MeasureOpts {
    /// `-f`: source format.
    pub format: Option<String>,
    /// `--image-opts`.
    pub image_opts: bool,
    /// `-l`: measure this internal snapshot of the source.
    pub snapshot: Option<SnapshotParam>,
    /// `-o`: target creation options.
    pub options: OptionList,
    /// `-O`: target format (qemu-img defaults to raw).
    pub target_format: Option<String>,
    /// `--size`: measure a new image of this size instead of a file.
    pub size: Option<u64>,
    /// `--output`.
    pub output: OutputFormat,
    /// `-U`.
    pub force_share: bool,
    /// `--object` definitions.
    pub objects: Vec<String>,
    /// Source image (exactly one of this and `size` is set).
    pub filename: Option<String>,
}

/// Parses the arguments after `measure`; usage errors are reported here, exactly as
/// qemu-img words them.
pub fn parse(ctx: &Ctx, args: &[String]) -> Parsed<MeasureOpts> {
    let mut o = MeasureOpts::default();
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
            Key::Short('o') => {
                o.options.accumulate(&arg).map_err(|m| {
                    ctx.error(&m);
                    1
                })?;
            }
            Key::Long(OBJECT) => o.objects.push(arg),
            Key::Long(OUTPUT) => match OutputFormat::parse(&arg) {
                Ok(f) => o.output = f,
                Err(m) => return Err(ctx.usage_error(CMD, &m)),
            },
            Key::Long(SIZE) => match cvtnum("image size", &arg) {
                Ok(v) => o.size = Some(v as u64),
                Err(m) => {
                    ctx.error(&m);
                    return Err(1);
                }
            },
            Key::Short('O') => o.target_format = Some(arg),
            Key::Short('l') => match parse_snapshot_param(&arg) {
                Ok(s) => o.snapshot = Some(s),
                Err(lines) => {
                    for l in lines {
                        ctx.error(&l);
                    }
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
    if ops.len() > 1 {
        ctx.error("At most one filename argument is allowed.");
        return Parsed::Exit(1);
    }
    o.filename = ops.first().cloned();
    let needs_file = o.image_opts || o.format.is_some() || o.snapshot.is_some();
    if o.filename.is_none() && needs_file {
        ctx.error("--image-opts, -f, and -l require a filename argument.");
        return Parsed::Exit(1);
    }
    if o.filename.is_some() && o.size.is_some() {
        ctx.error("--size N cannot be used together with a filename.");
        return Parsed::Exit(1);
    }
    if o.filename.is_none() && o.size.is_none() {
        ctx.error("Either --size N or one filename must be specified.");
        return Parsed::Exit(1);
    }
    Parsed::Run(o)
}

/// Runs `measure`; returns the process exit code.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    match parse(ctx, args) {
        Parsed::Run(opts) if crate::secrets::register(ctx, &opts.objects).is_err() => 1,
        Parsed::Run(opts) => measure_cmd(ctx, &opts),
        Parsed::Exit(code) => code,
    }
}

fn measure_cmd(ctx: &Ctx, o: &MeasureOpts) -> i32 {
    use crate::cmd::common::{image_spec, open, ro_options};
    use crate::cmd::create::{check_opts, get, qcow2_options, QCOW2_OPTS, RAW_OPTS};
    use qimg::qcow2::create::Preallocation;
    use qimg::qcow2::measure::{measure_qcow2, measure_raw, source_usage};
    let fmt = o.target_format.clone().unwrap_or_else(|| "raw".into());
    if o.options.has_help() {
        return crate::cmd::create::print_options_help(ctx, &fmt);
    }
    let table = match fmt.as_str() {
        "qcow2" => QCOW2_OPTS,
        "raw" => RAW_OPTS,
        _ => {
            ctx.error(&format!("Unknown file format '{fmt}'"));
            return 1;
        }
    };
    let vals = match check_opts(&o.options.pairs(), table) {
        Ok(v) => v,
        Err(m) => {
            ctx.error(&m);
            ctx.error(&format!("Invalid options for file format '{fmt}'"));
            return 1;
        }
    };
    let prealloc = match get(&vals, "preallocation") {
        None => Preallocation::Off,
        Some(p) => match Preallocation::parse(p) {
            Ok(p) => p,
            Err(e) => {
                ctx.error(&e.to_string());
                return 1;
            }
        },
    };
    let cs = get(&vals, "cluster_size")
        .and_then(|c| c.parse().ok())
        .unwrap_or(65536u64);
    let usage = match &o.filename {
        Some(f) => {
            let (f, format) = match image_spec(ctx, f, o.format.clone(), o.image_opts) {
                Ok(x) => x,
                Err(c) => return c,
            };
            let mut opts = ro_options(format, o.force_share);
            opts.snapshot = o.snapshot.as_ref().map(|s| match s {
                SnapshotParam::IdOrName(x) => qimg::open::SnapshotSel::IdOrName(x.clone()),
                SnapshotParam::Options { id, name } => qimg::open::SnapshotSel::Exact {
                    id: id.clone(),
                    name: name.clone(),
                },
            });
            let img = match open(ctx, &f, &opts) {
                Ok(i) => i,
                Err(c) => return c,
            };
            match source_usage(img.as_ref(), if fmt == "qcow2" { cs } else { 512 }) {
                Ok(u) => Some(u),
                Err(e) => {
                    ctx.error(&e.to_string());
                    return 1;
                }
            }
        }
        None => None,
    };
    let size = o.size.unwrap_or(0);
    let r = if fmt == "qcow2" {
        qcow2_options(&vals, size, prealloc)
            .and_then(|co| measure_qcow2(size, &co, usage.as_ref()).map_err(|e| e.to_string()))
    } else {
        measure_raw(size, usage.as_ref()).map_err(|e| e.to_string())
    };
    let mut info = match r {
        Ok(i) => i,
        Err(m) => {
            ctx.error(&m);
            return 1;
        }
    };
    // A LUKS target also holds its header area, rounded up to clusters (qcow2_measure);
    // as in QEMU the key's secret must exist.
    if fmt == "qcow2" && get(&vals, "encrypt.format") == Some("luks") {
        match crate::cmd::create::encryption_options(&vals) {
            Ok(Some(qimg::qcow2::create::CreateEncryption::Luks(p, _))) => {
                let luks = qimg::crypto::luks::area_len(&p).div_ceil(cs) * cs;
                info.required += luks;
                info.fully_allocated += luks;
            }
            Ok(_) => {}
            Err(m) => {
                ctx.error(&m);
                return 1;
            }
        }
    }
    let out = match o.output {
        OutputFormat::Json => {
            let mut m = serde_json::Map::new();
            m.insert("required".into(), serde_json::json!(info.required));
            m.insert(
                "fully-allocated".into(),
                serde_json::json!(info.fully_allocated),
            );
            if let Some(b) = info.bitmaps {
                m.insert("bitmaps".into(), serde_json::json!(b));
            }
            crate::fmt::to_json_pretty(&serde_json::Value::Object(m))
        }
        OutputFormat::Human => {
            let mut s = format!(
                "required size: {}\nfully allocated size: {}\n",
                info.required, info.fully_allocated
            );
            if let Some(b) = info.bitmaps {
                s += &format!("bitmaps size: {b}\n");
            }
            s
        }
    };
    crate::ctx::print_ignore(&out);
    0
}
