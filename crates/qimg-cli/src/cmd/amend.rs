//! `qemu-img amend`: change format-specific options of an existing image.
use crate::args::{HasArg, Item, Key, LongOpt};
use crate::ctx::{run_getopt, Ctx, Parsed};
use crate::opts::OptionList;

const CMD: &str = "amend";

/// `qemu-img amend --help` text (`qemu-img` is replaced by the program name).
pub const HELP: &str = r#"Usage:
Update format-specific options of the image.  Usage:

  qemu-img amend [-f FMT | --image-opts] [t CACHE] [--force] [-p] [-q]
        [--object OBJDEF -o OPTIONS FILENAME

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operation
  -p, --progres
     show progress
  -f, --format FMT
     specify FILENAME format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
   instead of a file name (incompatible with --format)
  -t, --cache CACHE
     cache mode for FILENAME (writeback)
  --force
     allow certain unsafe operations

"#;

/// Short options, in getopt syntax.
const SHORT: &str = "f:ho:pqt:";
const FORCE: u16 = 1;
const IMAGE_OPTS: u16 = 2;
const OBJECT: u16 = 3;

/// Long options, in the table order that decides how ambiguities are listed.
const LONG: &[LongOpt] = &[
    LongOpt::new("help", HasArg::No, Key::Short('h')),
    LongOpt::new("cache", HasArg::Required, Key::Short('t')),
    LongOpt::new("format", HasArg::Required, Key::Short('f')),
    LongOpt::new("force", HasArg::No, Key::Long(FORCE)),
    LongOpt::new("image-opts", HasArg::No, Key::Long(IMAGE_OPTS)),
    LongOpt::new("object", HasArg::Required, Key::Long(OBJECT)),
    LongOpt::new("options", HasArg::Required, Key::Short('o')),
    LongOpt::new("progress", HasArg::No, Key::Short('p')),
    LongOpt::new("quiet", HasArg::No, Key::Short('q')),
];

/// Everything `qemu-img amend` accepts on its command line.
#[derive(Clone, Debug, Default)]
pub struct AmendOpts {
    /// `-f`: image format.
    pub format: Option<String>,
    /// `--image-opts`.
    pub image_opts: bool,
    /// `-o`: the options to change (required).
    pub options: OptionList,
    /// `-t`: cache mode.
    pub cache: Option<String>,
    /// `--force`: allow unsafe changes. QEMU only uses it for encryption key slot
    /// changes, which qimg does not support, so it changes nothing, as for qemu-img on
    /// unencrypted images.
    pub force: bool,
    /// `-p`.
    pub progress: bool,
    /// `-q`.
    pub quiet: bool,
    /// `--object` definitions.
    pub objects: Vec<String>,
    /// The image.
    pub filename: String,
}

/// Parses the arguments after `amend`; usage errors are reported here, exactly as
/// qemu-img words them.
pub fn parse(ctx: &Ctx, args: &[String]) -> Parsed<AmendOpts> {
    let mut o = AmendOpts::default();
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
            Key::Short('t') => o.cache = Some(arg),
            Key::Short('f') => o.format = Some(arg),
            Key::Long(FORCE) => o.force = true,
            Key::Long(IMAGE_OPTS) => o.image_opts = true,
            Key::Long(OBJECT) => o.objects.push(arg),
            Key::Short('o') => {
                o.options.accumulate(&arg).map_err(|m| {
                    ctx.error(&m);
                    1
                })?;
            }
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
    if o.options.is_empty() {
        return Parsed::Exit(ctx.usage_error(CMD, "Must specify options (-o)"));
    }
    if ops.len() != 1 {
        ctx.error("Expecting one image file name");
        return Parsed::Exit(1);
    }
    o.filename = ops[0].clone();
    Parsed::Run(o)
}

/// Runs `amend`; returns the process exit code.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    match parse(ctx, args) {
        Parsed::Run(opts) if crate::secrets::register(ctx, &opts.objects).is_err() => 1,
        Parsed::Run(opts) => amend_cmd(ctx, &opts),
        Parsed::Exit(code) => code,
    }
}

/// `qemu-img amend -o help` for qcow2.
const QCOW2_AMEND_HELP: &str = "Amend options for 'qcow2':
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  data_file=<str>        - File name of an external data file
  data_file_raw=<bool (on/off)> - The external data file must stay valid as a raw image
  encrypt.iter-time=<num> - Time to spend in PBKDF in milliseconds
  encrypt.keyslot=<num>  - Select a single keyslot to modify explicitly
  encrypt.new-secret=<str> - New secret to set in the matching keyslots. Empty string to erase
  encrypt.old-secret=<str> - Select all keyslots that match this password
  encrypt.state=<str>    - Select new state of affected keyslots (active/inactive)
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size
";

/// The `encrypt.*` options of LUKS key-slot management (handled by [`luks_amend`]).
const LUKS_AMEND_KEYS: &[&str] = &[
    "encrypt.state",
    "encrypt.keyslot",
    "encrypt.new-secret",
    "encrypt.old-secret",
    "encrypt.iter-time",
];

/// Applies `encrypt.state`/`keyslot`/`new-secret`/`old-secret`/`iter-time`, if given.
fn luks_amend(o: &AmendOpts, q: &mut qimg::qcow2::Qcow2) -> Result<(), String> {
    let pairs: Vec<(String, String)> = o
        .options
        .pairs()
        .into_iter()
        .filter(|(k, _)| LUKS_AMEND_KEYS.contains(&k.as_str()))
        .collect();
    if pairs.is_empty() {
        return Ok(());
    }
    let get = |k: &str| pairs.iter().rev().find(|p| p.0 == k).map(|p| p.1.clone());
    let mut a = qimg::qcow2::LuksAmend {
        force: o.force,
        iter_time_ms: 2000,
        ..Default::default()
    };
    a.activate = match get("encrypt.state").as_deref() {
        None => return Err("Parameter 'state' is missing".into()),
        Some("active") => true,
        Some("inactive") => false,
        Some(v) => return Err(format!("Parameter 'state' does not accept value '{v}'")),
    };
    if let Some(k) = get("encrypt.keyslot") {
        a.keyslot = Some(
            k.parse()
                .map_err(|_| "Parameter 'keyslot' expects a number".to_string())?,
        );
    }
    if let Some(t) = get("encrypt.iter-time") {
        a.iter_time_ms = t
            .parse()
            .map_err(|_| "Parameter 'iter-time' expects a number".to_string())?;
    }
    a.new_secret = get("encrypt.new-secret")
        .map(|id| crate::secrets::secret(&id))
        .transpose()?;
    a.old_secret = get("encrypt.old-secret")
        .map(|id| crate::secrets::secret(&id))
        .transpose()?;
    q.luks_amend(&a).map_err(|e| e.to_string())
}

/// qcow2 creation options that `amend` cannot change.
const CREATE_ONLY: &[&str] = &[
    "cluster_size",
    "preallocation",
    "extended_l2",
    "compression_type",
    "encryption",
    "encrypt.format",
    "encrypt.key-secret",
    "encrypt.cipher-alg",
    "encrypt.cipher-mode",
    "encrypt.ivgen-alg",
    "encrypt.ivgen-hash-alg",
    "encrypt.hash-alg",
];

fn parse_bool(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(format!("Parameter '{key}' expects 'on' or 'off'")),
    }
}

/// Why `-o` could not be turned into library options: the message, and whether
/// qemu-img finds out only inside the driver (after its first progress report) rather
/// than while parsing the options.
struct OptError {
    msg: String,
    in_driver: bool,
}

impl From<String> for OptError {
    fn from(msg: String) -> OptError {
        OptError {
            msg,
            in_driver: false,
        }
    }
}

fn driver_error(msg: &str) -> OptError {
    OptError {
        msg: msg.to_string(),
        in_driver: true,
    }
}

/// Turns `-o` pairs into library options, with qemu-img's messages.
fn amend_options(
    o: &AmendOpts,
    h: &qimg::ondisk::header::Header,
) -> Result<qimg::qcow2::amend::AmendOptions, OptError> {
    let mut a = qimg::qcow2::amend::AmendOptions::default();
    for (k, v) in o.options.pairs() {
        match k.as_str() {
            "compat" => {
                a.version = Some(match v.as_str() {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => return Err(driver_error(&format!("Unknown compatibility level {v}"))),
                })
            }
            "lazy_refcounts" => a.lazy_refcounts = Some(parse_bool(&k, &v)?),
            "refcount_bits" => {
                let n: u64 = v
                    .parse()
                    .map_err(|_| format!("Parameter '{k}' expects a number"))?;
                a.refcount_bits = Some(n.min(u32::MAX as u64) as u32);
            }
            "size" => {
                a.size = Some(
                    crate::opts::parse_size(&v)
                        .map_err(|_| crate::opts::option_size_error("size"))?,
                )
            }
            "data_file_raw" => {
                if parse_bool(&k, &v)? {
                    return Err(driver_error(
                        "data-file-raw cannot be set on existing images",
                    ));
                }
                a.clear_data_file_raw = true;
            }
            "data_file" => a.data_file = Some(v),
            "backing_file" => {
                if h.backing_file.as_deref() != Some(v.as_str()) {
                    return Err(driver_error(
                        "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.",
                    ));
                }
            }
            "backing_fmt" => {
                if h.backing_format.as_deref() != Some(v.as_str()) {
                    return Err(driver_error(
                        "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.",
                    ));
                }
            }
            k if CREATE_ONLY.contains(&k) => {
                return Err(format!(
                    "Invalid parameter '{k}'\nThis option is only supported for image creation"
                )
                .into())
            }
            k if LUKS_AMEND_KEYS.contains(&k) => {}
            k if k.starts_with("encrypt.") => {
                return Err("Amending encryption options is not supported by qimg"
                    .to_string()
                    .into())
            }
            k => return Err(format!("Invalid parameter '{k}'").into()),
        }
    }
    Ok(a)
}

fn amend_cmd(ctx: &Ctx, o: &AmendOpts) -> i32 {
    // qemu-img sets its progress printer up before opening the image, so every exit
    // from here on ends the progress line.
    let mut progress = QemuProgress::new(o.progress && !o.quiet);
    let code = amend_image(ctx, o, &mut progress);
    progress.end();
    code
}

fn amend_image(ctx: &Ctx, o: &AmendOpts, progress: &mut QemuProgress) -> i32 {
    use crate::cmd::common::{image_spec, open_owned_rw};
    use qimg::open::OwnedImage;
    let (filename, format) = match image_spec(ctx, &o.filename, o.format.clone(), o.image_opts) {
        Ok(x) => x,
        Err(c) => return c,
    };
    let img = match open_owned_rw(ctx, &filename, format, false) {
        Ok(i) => i,
        Err(c) => return c,
    };
    let mut q = match img {
        OwnedImage::Qcow2(q) => q,
        OwnedImage::Other(i) => {
            ctx.error(&format!(
                "Format driver '{}' does not support option amendment",
                i.format_name()
            ));
            return 1;
        }
    };
    if o.options.has_help() {
        crate::ctx::print_ignore(QCOW2_AMEND_HELP);
        return 0;
    }
    if let Err(m) = luks_amend(o, &mut q) {
        ctx.error(&m);
        return 1;
    }
    let pairs = o.options.pairs();
    if !pairs.is_empty()
        && pairs
            .iter()
            .all(|(k, _)| LUKS_AMEND_KEYS.contains(&k.as_str()))
    {
        return match q.close() {
            Ok(()) => 0,
            Err(e) => {
                ctx.error(&e.to_string());
                1
            }
        };
    }
    let r = match amend_options(o, q.header()) {
        Err(e) if !e.in_driver => Err(e.msg),
        Err(e) => {
            progress.print(0.0);
            progress.print(100.0);
            Err(e.msg)
        }
        Ok(a) => {
            progress.print(0.0);
            let steps = AmendSteps::plan(&q, &a);
            let r = q.amend(&a).map_err(|e| e.to_string());
            if r.is_ok() {
                steps.report(progress);
            }
            progress.print(100.0);
            r.and_then(|()| q.close().map_err(|e| e.to_string()))
        }
    };
    match r {
        Ok(()) => 0,
        Err(m) => {
            ctx.error(&m);
            1
        }
    }
}

/// qemu-img's progress printer: `    (P/100%)\r` lines, redrawn when the value moved by
/// more than one point either way or reached 0 or 100, in single precision as QEMU
/// computes it (so the same values are printed).
struct QemuProgress {
    enabled: bool,
    last: f32,
}

impl QemuProgress {
    fn new(enabled: bool) -> QemuProgress {
        QemuProgress { enabled, last: 0.0 }
    }

    fn print(&mut self, value: f32) {
        let current = value.min(100.0);
        if current > self.last + 1.0
            || current < self.last - 1.0
            || current == 100.0
            || current == 0.0
        {
            self.last = current;
            if self.enabled {
                crate::ctx::print_ignore(&format!("    ({:.2}/100%)\r", current as f64));
            }
        }
    }

    /// A driver status report: `offset` of `total` units of work done.
    fn status(&mut self, offset: i64, total: i64) {
        self.print(100f32 * offset as f32 / total as f32);
    }

    fn end(&self) {
        if self.enabled {
            crate::ctx::print_ignore("\n");
        }
    }
}

/// One amend operation QEMU reports progress for, with its units of work.
#[derive(Clone, Copy)]
enum Step {
    /// v2 to v3: two units (snapshot table, header).
    Upgrade,
    /// Refcount width change: three walks over a refcount table of this many entries.
    RefcountWidth(i64),
    /// v3 to v2: one unit per L1 entry of the active and snapshot tables.
    Downgrade(i64),
}

/// The progress reports `qemu-img amend -p` prints for an amendment: QEMU's operations,
/// their status reports, and how its amend helper scales them into one 0–100 range (each
/// operation's total is projected onto the ones still to come).
struct AmendSteps(Vec<Step>);

impl AmendSteps {
    fn plan(q: &qimg::qcow2::Qcow2, a: &qimg::qcow2::amend::AmendOptions) -> AmendSteps {
        let h = q.header();
        let old_version = h.version;
        let new_version = a.version.unwrap_or(old_version);
        let old_bits = 1u32 << h.refcount_order;
        let mut steps = Vec::new();
        if new_version > old_version {
            steps.push(Step::Upgrade);
        }
        if a.refcount_bits.is_some_and(|b| b != old_bits) {
            let entries = h.refcount_table_clusters as i64 * (h.cluster_size() as i64 / 8);
            steps.push(Step::RefcountWidth(entries));
        }
        if new_version < old_version {
            let l1: i64 =
                h.l1_size as i64 + q.snapshots().iter().map(|s| s.l1_size as i64).sum::<i64>();
            steps.push(Step::Downgrade(l1));
        }
        AmendSteps(steps)
    }

    fn report(&self, p: &mut QemuProgress) {
        let total_ops = self.0.len() as i64;
        let mut done_ops = 0i64;
        let mut offset_done = 0i64;
        for (i, step) in self.0.iter().enumerate() {
            let (first, work) = match *step {
                Step::Upgrade => (0, 2),
                Step::RefcountWidth(n) => (0, 3 * n),
                Step::Downgrade(n) => (1, n),
            };
            if i > 0 {
                done_ops += 1;
            }
            let current = offset_done + work;
            let projected = current * (total_ops - done_ops - 1) / (done_ops + 1);
            for k in first..=work {
                p.status(offset_done + k, current + projected);
            }
            offset_done += work;
        }
    }
}
