//! `qemu-img check`: check (and optionally repair) an image's metadata.
use crate::args::{HasArg, Item, Key, LongOpt};
use crate::cmd::common::{as_qcow2, open};
use crate::ctx::{eprint_ignore, print_ignore};
use crate::ctx::{run_getopt, Ctx, Parsed};
use crate::fmt::to_json_pretty;
use crate::opts::{OutputFormat, RepairMode};
use qimg::open::OpenOptions;
use qimg::qcow2::check::CheckReport;
use qimg::qcow2::repair;
use serde_json::{json, Map, Value};

const CMD: &str = "check";

/// `qemu-img check --help` text (`qemu-img` is replaced by the program name).
pub const HELP: &str = r#"Usage:
Check basic image integrity.  Usage:

  qemu-img check [-f FMT | --image-opts] [-T CACHE_MODE] [-r] [-u]
        [--output human|json] [--object OBJDEF] FILENAME

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operations
  -f, --format FMT
     specifies format of the image explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
     instead of a file name (incompatible with --format)
  -T, --cache CACHE_MODE
     image cache mode (writeback)
  -U, --force-share
     open image in shared mode for concurrent access
  --output human|json
     output format
  -r, --repair leaks|all
     repair particular aspect of the image
     (image will be open in read-write mode, incompatible with --force-share)
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  FILENAME
     the image file (or image specification) to operate on

"#;

/// Short options, in getopt syntax.
const SHORT: &str = "hf:qr:T:U";
const IMAGE_OPTS: u16 = 1;
const OUTPUT: u16 = 2;
const OBJECT: u16 = 3;

/// Long options, in the table order that decides how ambiguities are listed.
const LONG: &[LongOpt] = &[
    LongOpt::new("help", HasArg::No, Key::Short('h')),
    LongOpt::new("format", HasArg::Required, Key::Short('f')),
    LongOpt::new("force-share", HasArg::No, Key::Short('U')),
    LongOpt::new("image-opts", HasArg::No, Key::Long(IMAGE_OPTS)),
    LongOpt::new("cache", HasArg::Required, Key::Short('T')),
    LongOpt::new("output", HasArg::Required, Key::Long(OUTPUT)),
    LongOpt::new("object", HasArg::Required, Key::Long(OBJECT)),
    LongOpt::new("quiet", HasArg::No, Key::Short('q')),
    LongOpt::new("repair", HasArg::Required, Key::Short('r')),
];

/// Everything `qemu-img check` accepts on its command line.
#[derive(Clone, Debug, Default)]
pub struct CheckOpts {
    /// `-f`: image format.
    pub format: Option<String>,
    /// `--image-opts`.
    pub image_opts: bool,
    /// `-T`: cache mode (validate with `CacheMode::parse`; qemu-img reports `Invalid source cache option: X`).
    pub cache: Option<String>,
    /// `-r leaks|all`.
    pub repair: Option<RepairMode>,
    /// `--output`.
    pub output: OutputFormat,
    /// `-q`.
    pub quiet: bool,
    /// `-U`.
    pub force_share: bool,
    /// `--object` definitions.
    pub objects: Vec<String>,
    /// The image.
    pub filename: String,
}

/// Parses the arguments after `check`; usage errors are reported here, exactly as
/// qemu-img words them.
pub fn parse(ctx: &Ctx, args: &[String]) -> Parsed<CheckOpts> {
    let mut o = CheckOpts::default();
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
            Key::Short('T') => o.cache = Some(arg),
            Key::Long(OUTPUT) => match OutputFormat::parse(&arg) {
                Ok(f) => o.output = f,
                Err(m) => return Err(ctx.usage_error(CMD, &m)),
            },
            Key::Long(OBJECT) => o.objects.push(arg),
            Key::Short('q') => o.quiet = true,
            Key::Short('r') => match RepairMode::parse(&arg) {
                Ok(r) => o.repair = Some(r),
                Err(m) => return Err(ctx.usage_error(CMD, &m)),
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

/// Runs `check`; returns the process exit code.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    match parse(ctx, args) {
        Parsed::Run(opts) if crate::secrets::register(ctx, &opts.objects).is_err() => 1,
        Parsed::Run(opts) => check_cmd(ctx, &opts),
        Parsed::Exit(code) => code,
    }
}

fn check_cmd(ctx: &Ctx, o: &CheckOpts) -> i32 {
    let (filename, format) =
        match crate::cmd::common::image_spec(ctx, &o.filename, o.format.clone(), o.image_opts) {
            Ok(x) => x,
            Err(c) => return c,
        };
    if o.repair.is_some() && o.force_share {
        // qemu-img opens read/write for -r, which shared mode forbids.
        ctx.error(&format!(
            "Could not open '{filename}': force-share=on can only be used with read-only images"
        ));
        return 1;
    }
    let opts = OpenOptions {
        format,
        check: true,
        writable: o.repair.is_some(),
        force_share: o.force_share,
        ..Default::default()
    };
    let img = match open(ctx, &filename, &opts) {
        Ok(i) => i,
        Err(c) => return c,
    };
    let Some(q) = as_qcow2(img.as_ref()) else {
        ctx.error("This image format does not support checks");
        return 63;
    };
    let print_lines = |r: &CheckReport| {
        for line in r.stderr_lines(&ctx.prog) {
            eprint_ignore(&format!("{line}\n"));
        }
    };
    let fail = |r: &CheckReport| -> Option<i32> {
        let f = r.failure.as_ref()?;
        ctx.error(&format!("Check failed: {}", f.strerror()));
        Some(1)
    };
    let r = match o.repair {
        None => match qimg::qcow2::check::check(q) {
            Ok(r) => {
                print_lines(&r);
                if let Some(code) = fail(&r) {
                    return code;
                }
                r
            }
            Err(e) => {
                ctx.error(&format!("Check failed: {e}"));
                return 1;
            }
        },
        Some(mode) => {
            let mode = match mode {
                RepairMode::Leaks => repair::RepairMode::Leaks,
                RepairMode::All => repair::RepairMode::All,
            };
            let rep = match repair::repair(q, mode) {
                Ok(r) => r,
                Err(e) => {
                    ctx.error(&format!("Check failed: {e}"));
                    return 1;
                }
            };
            print_lines(&rep.pass);
            if let Some(code) = fail(&rep.pass) {
                return code;
            }
            if let Some(again) = &rep.recheck {
                if o.output == OutputFormat::Human && !o.quiet {
                    print_ignore(&format!(
                        "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
                        rep.leaks_fixed(),
                        rep.corruptions_fixed()
                    ));
                }
                print_lines(again);
                if let Some(code) = fail(again) {
                    return code;
                }
            }
            rep.result()
        }
    };
    if !o.quiet {
        match o.output {
            OutputFormat::Json => print_ignore(&json(&o.filename, &r)),
            OutputFormat::Human => print_ignore(&human(&r)),
        }
    }
    r.exit_code()
}

/// qemu-img's JSON check result (QAPI ImageCheck): optional members only when non-zero.
fn json(filename: &str, r: &CheckReport) -> String {
    let mut m = Map::new();
    m.insert("filename".into(), json!(filename));
    m.insert("format".into(), json!("qcow2"));
    m.insert("check-errors".into(), json!(r.check_errors));
    let mut opt = |k: &str, v: u64| {
        if v != 0 {
            m.insert(k.into(), json!(v));
        }
    };
    opt("image-end-offset", r.image_end_offset);
    opt("corruptions", r.corruptions);
    opt("leaks", r.leaks);
    opt("corruptions-fixed", r.corruptions_fixed);
    opt("leaks-fixed", r.leaks_fixed);
    opt("total-clusters", r.total_clusters);
    opt("allocated-clusters", r.allocated_clusters);
    opt("fragmented-clusters", r.fragmented_clusters);
    opt("compressed-clusters", r.compressed_clusters);
    to_json_pretty(&Value::Object(m))
}

/// qemu-img's human check summary.
fn human(r: &CheckReport) -> String {
    let mut s = String::new();
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        s += "No errors were found on the image.\n";
    } else {
        if r.corruptions > 0 {
            s += &format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            );
        }
        if r.leaks > 0 {
            s += &format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                r.leaks
            );
        }
        if r.check_errors > 0 {
            s += &format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            );
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let t = r.total_clusters as f64;
        s += &format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            r.allocated_clusters as f64 * 100.0 / t,
            r.fragmented_clusters as f64 * 100.0 / r.allocated_clusters as f64,
            r.compressed_clusters as f64 * 100.0 / r.allocated_clusters as f64,
        );
    }
    if r.image_end_offset > 0 {
        s += &format!("Image end offset: {}\n", r.image_end_offset);
    }
    s
}
