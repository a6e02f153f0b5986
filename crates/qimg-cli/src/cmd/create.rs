//! `qemu-img create`: create and format a new image.
use crate::args::{HasArg, Item, Key, LongOpt};
use crate::ctx::{run_getopt, Ctx, Parsed};
use crate::opts::{cvtnum, OptionList};

const CMD: &str = "create";

/// `qemu-img create --help` text (`qemu-img` is replaced by the program name).
pub const HELP: &str = r#"Usage:
Create and format new image file.  Usage:

  qemu-img create [-f FMT] [-o FMT_OPTS] [-b BACKING_FILENAME [-F BACKING_FMT]]
        [--object OBJDEF] [-u] FILENAME [SIZE[bkKMGTPE]]

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operations
  -f, --format FMT
     specifies format of the new image, default is raw
  -o, --options FMT_OPTS
     format-specific options ('-o list' for list)
  -b, --backing BACKING_FILENAME
     stack new image on top of BACKING_FILENAME
     (for formats which support stacking)
  -F, --backing-format BACKING_FMT
     specify format of BACKING_FILENAME
  -u, --backing-unsafe
     do not fail if BACKING_FMT can not be read
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  FILENAME
     image file to create.  It will be overridden if exists
  SIZE
     image size with optional suffix (multiplies in 1024)
     SIZE is required unless BACKING_IMG is specified,
     in which case it will be the same as size of BACKING_IMG

"#;

/// Short options, in getopt syntax.
const SHORT: &str = "hqf:o:b:F:u";
const OBJECT: u16 = 1;

/// Long options, in the table order that decides how ambiguities are listed.
const LONG: &[LongOpt] = &[
    LongOpt::new("help", HasArg::No, Key::Short('h')),
    LongOpt::new("quiet", HasArg::No, Key::Short('q')),
    LongOpt::new("format", HasArg::Required, Key::Short('f')),
    LongOpt::new("object", HasArg::Required, Key::Long(OBJECT)),
    LongOpt::new("options", HasArg::Required, Key::Short('o')),
    LongOpt::new("backing", HasArg::Required, Key::Short('b')),
    LongOpt::new("backing-format", HasArg::Required, Key::Short('F')),
    LongOpt::new("backing-unsafe", HasArg::No, Key::Short('u')),
];

/// Everything `qemu-img create` accepts on its command line.
#[derive(Clone, Debug, Default)]
pub struct CreateOpts {
    /// `-q`: print nothing but errors.
    pub quiet: bool,
    /// `-f`: format of the new image (qemu-img defaults to raw).
    pub format: Option<String>,
    /// `-o`: creation options, all `-o` joined.
    pub options: OptionList,
    /// `-b`: backing file.
    pub backing: Option<String>,
    /// `-F`: backing file format.
    pub backing_format: Option<String>,
    /// `-u`: do not open the backing file.
    pub backing_unsafe: bool,
    /// `--object` definitions.
    pub objects: Vec<String>,
    /// `-o help` (or `?`) was given: list the creation options of the format instead of creating; `filename` may then be empty.
    pub help_requested: bool,
    /// Image to create.
    pub filename: String,
    /// Virtual size; required unless a backing file provides it.
    pub size: Option<u64>,
}

/// Parses the arguments after `create`; usage errors are reported here, exactly as
/// qemu-img words them.
pub fn parse(ctx: &Ctx, args: &[String]) -> Parsed<CreateOpts> {
    let mut o = CreateOpts::default();
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
            Key::Short('q') => o.quiet = true,
            Key::Short('f') => o.format = Some(arg),
            Key::Long(OBJECT) => o.objects.push(arg),
            Key::Short('o') => {
                o.options.accumulate(&arg).map_err(|m| {
                    ctx.error(&m);
                    1
                })?;
            }
            Key::Short('b') => o.backing = Some(arg),
            Key::Short('F') => o.backing_format = Some(arg),
            Key::Short('u') => o.backing_unsafe = true,
            _ => {}
        }
        Ok(())
    });
    if let Err(code) = res {
        return Parsed::Exit(code);
    }
    let ops = g.operands();
    if o.options.has_help() {
        o.help_requested = true;
        o.filename = ops.first().cloned().unwrap_or_default();
        return Parsed::Run(o);
    }
    let Some(filename) = ops.first() else {
        return Parsed::Exit(ctx.usage_error(CMD, "Expecting image file name"));
    };
    o.filename = filename.clone();
    if let Some(size) = ops.get(1) {
        match cvtnum("image size", size) {
            Ok(v) => o.size = Some(v as u64),
            Err(m) => {
                ctx.error(&m);
                return Parsed::Exit(1);
            }
        }
    }
    if let Some(extra) = ops.get(2) {
        return Parsed::Exit(ctx.usage_error(CMD, &format!("Unexpected argument: {extra}")));
    }
    Parsed::Run(o)
}

/// Runs `create`; returns the process exit code.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    match parse(ctx, args) {
        Parsed::Run(opts) if crate::secrets::register(ctx, &opts.objects).is_err() => 1,
        Parsed::Run(opts) => create_cmd(ctx, &opts),
        Parsed::Exit(code) => code,
    }
}

/// qcow2 creation options in the order qemu-img lists and prints them.
pub(crate) const QCOW2_OPTS: &[(&str, &str)] = &[
    ("size", "size"),
    ("compat", "str"),
    ("backing_file", "str"),
    ("backing_fmt", "str"),
    ("data_file", "str"),
    ("data_file_raw", "bool"),
    ("encryption", "bool"),
    ("encrypt.format", "str"),
    ("encrypt.key-secret", "str"),
    ("encrypt.cipher-alg", "str"),
    ("encrypt.cipher-mode", "str"),
    ("encrypt.ivgen-alg", "str"),
    ("encrypt.ivgen-hash-alg", "str"),
    ("encrypt.hash-alg", "str"),
    ("encrypt.iter-time", "number"),
    ("cluster_size", "size"),
    ("extended_l2", "bool"),
    ("preallocation", "str"),
    ("lazy_refcounts", "bool"),
    ("refcount_bits", "number"),
    ("compression_type", "str"),
    ("nocow", "bool"),
    ("extent_size_hint", "size"),
];

/// The order of the "Formatting ..." line for qcow2 (qemu's merged option list order).
const QCOW2_PRINT_ORDER: &[&str] = &[
    "encryption",
    "encrypt.format",
    "encrypt.key-secret",
    "encrypt.cipher-alg",
    "encrypt.cipher-mode",
    "encrypt.ivgen-alg",
    "encrypt.ivgen-hash-alg",
    "encrypt.hash-alg",
    "encrypt.iter-time",
    "cluster_size",
    "extended_l2",
    "preallocation",
    "compression_type",
    "size",
    "compat",
    "backing_file",
    "backing_fmt",
    "data_file",
    "data_file_raw",
    "lazy_refcounts",
    "refcount_bits",
    "nocow",
    "extent_size_hint",
];

pub(crate) const RAW_OPTS: &[(&str, &str)] = &[
    ("size", "size"),
    ("preallocation", "str"),
    ("nocow", "bool"),
    ("extent_size_hint", "size"),
];

/// add-cow creation options (qimg's own: QEMU never merged the format).
pub(crate) const ADDCOW_OPTS: &[(&str, &str)] = &[
    ("size", "size"),
    ("backing_file", "str"),
    ("backing_fmt", "str"),
    ("image_file", "str"),
    ("image_fmt", "str"),
    ("cluster_size", "size"),
];

/// Lists the creation options of a format (`-o help`).
pub fn print_options_help(ctx: &Ctx, fmt: &str) -> i32 {
    let help: &[(&str, &str)] = match fmt {
        "qcow2" => &[
            ("backing_file=<str>", "File name of a base image"),
            ("backing_fmt=<str>", "Image format of the base image"),
            ("cluster_size=<size>", "qcow2 cluster size"),
            (
                "compat=<str>",
                "Compatibility level (v2 [0.10] or v3 [1.1])",
            ),
            (
                "compression_type=<str>",
                "Compression method used for image cluster compression",
            ),
            ("data_file=<str>", "File name of an external data file"),
            (
                "data_file_raw=<bool (on/off)>",
                "The external data file must stay valid as a raw image",
            ),
            (
                "encrypt.cipher-alg=<str>",
                "Name of encryption cipher algorithm",
            ),
            (
                "encrypt.cipher-mode=<str>",
                "Name of encryption cipher mode",
            ),
            (
                "encrypt.format=<str>",
                "Encrypt the image, format choices: 'aes', 'luks'",
            ),
            (
                "encrypt.hash-alg=<str>",
                "Name of encryption hash algorithm",
            ),
            (
                "encrypt.iter-time=<num>",
                "Time to spend in PBKDF in milliseconds",
            ),
            ("encrypt.ivgen-alg=<str>", "Name of IV generator algorithm"),
            (
                "encrypt.ivgen-hash-alg=<str>",
                "Name of IV generator hash algorithm",
            ),
            (
                "encrypt.key-secret=<str>",
                "ID of secret providing qcow AES key or LUKS passphrase",
            ),
            (
                "encryption=<bool (on/off)>",
                "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
            ),
            ("extended_l2=<bool (on/off)>", "Extended L2 tables"),
            (
                "extent_size_hint=<size>",
                "Extent size hint for the image file, 0 to disable",
            ),
            (
                "lazy_refcounts=<bool (on/off)>",
                "Postpone refcount updates",
            ),
            (
                "nocow=<bool (on/off)>",
                "Turn off copy-on-write (valid only on btrfs)",
            ),
            (
                "preallocation=<str>",
                "Preallocation mode (allowed values: off, metadata, falloc, full)",
            ),
            (
                "refcount_bits=<num>",
                "Width of a reference count entry in bits",
            ),
            ("size=<size>", "Virtual disk size"),
        ],
        "raw" => &[
            (
                "extent_size_hint=<size>",
                "Extent size hint for the image file, 0 to disable",
            ),
            (
                "nocow=<bool (on/off)>",
                "Turn off copy-on-write (valid only on btrfs)",
            ),
            (
                "preallocation=<str>",
                "Preallocation mode (allowed values: off, falloc, full)",
            ),
            ("size=<size>", "Virtual disk size"),
        ],
        "add-cow" => &[
            ("backing_file=<str>", "File name of a base image"),
            ("backing_fmt=<str>", "Image format of the base image"),
            ("cluster_size=<size>", "add-cow cluster size"),
            ("image_file=<str>", "File name of the raw image file"),
            ("image_fmt=<str>", "Image format of the image file (raw)"),
            ("size=<size>", "Virtual disk size"),
        ],
        _ => {
            ctx.error(&format!("Unknown file format '{fmt}'"));
            return 1;
        }
    };
    let mut out = String::from("Supported options:\n");
    for (k, d) in help {
        out += &format!("  {k:<22} - {d}\n");
    }
    crate::ctx::print_ignore(&out);
    0
}

/// One validated `-o` value with the text qemu prints for it.
pub(crate) struct OptVal {
    key: String,
    shown: String,
}

/// Parses `-o` pairs against a format's option table, with QEMU's messages.
pub(crate) fn check_opts(
    pairs: &[(String, String)],
    table: &[(&str, &str)],
) -> Result<Vec<OptVal>, String> {
    let mut out: Vec<OptVal> = Vec::new();
    for (k, v) in pairs {
        let Some((_, ty)) = table.iter().find(|(n, _)| n == k) else {
            return Err(format!("Invalid parameter '{k}'"));
        };
        let shown = match *ty {
            "bool" => match v.as_str() {
                "on" | "off" => v.clone(),
                _ => return Err(format!("Parameter '{k}' expects 'on' or 'off'")),
            },
            "size" => match crate::opts::parse_size(v) {
                Ok(n) => n.to_string(),
                Err(_) => return Err(crate::opts::option_size_error(k)),
            },
            "number" => match v.parse::<u64>() {
                Ok(n) => n.to_string(),
                Err(_) => return Err(format!("Parameter '{k}' expects a number")),
            },
            _ => v.clone(),
        };
        out.retain(|o| o.key != *k);
        out.push(OptVal {
            key: k.clone(),
            shown,
        });
    }
    Ok(out)
}

pub(crate) fn get<'a>(v: &'a [OptVal], k: &str) -> Option<&'a str> {
    v.iter().find(|o| o.key == k).map(|o| o.shown.as_str())
}

fn create_cmd(ctx: &Ctx, o: &CreateOpts) -> i32 {
    let fmt = o.format.clone().unwrap_or_else(|| "raw".into());
    if o.help_requested || o.options.has_help() {
        return print_options_help(ctx, &fmt);
    }
    let (options, guid) = match take_guid_option(&fmt, &o.options) {
        Ok(x) => x,
        Err(m) => {
            ctx.error(&format!("{}: {m}", o.filename));
            return 1;
        }
    };
    let made = create_image(
        ctx,
        &fmt,
        &o.filename,
        o.size,
        &options,
        o.backing.as_deref(),
        o.backing_format.as_deref(),
        o.quiet,
        o.backing_unsafe,
        None,
    );
    if let Err(c) = made {
        return c;
    }
    if let Some(edit) = guid {
        if let Err(e) = set_guid(&o.filename, edit) {
            ctx.error(&format!(
                "{}: Could not set the image GUID: {e}",
                o.filename
            ));
            return 1;
        }
    }
    0
}

/// `-o guid=on|off|UUID` (qcow2 only, qimg's own option): removed from the options
/// before the image is made (so the image and the "Formatting" line are what qemu-img
/// makes and prints), and returned as the edit to apply afterwards. Other formats keep
/// it, and fail on it as qemu-img does.
fn take_guid_option(
    fmt: &str,
    options: &crate::opts::OptionList,
) -> Result<(crate::opts::OptionList, Option<qimg::qcow2::meta::MetaEdit>), String> {
    use qimg::qcow2::meta::MetaEdit;
    let pairs = options.pairs();
    if fmt != "qcow2" || !pairs.iter().any(|(k, _)| k == "guid") {
        return Ok((options.clone(), None));
    }
    let mut rest = crate::opts::OptionList::default();
    let mut edit = None;
    for (k, v) in pairs {
        if k == "guid" {
            edit = match v.as_str() {
                "on" => Some(MetaEdit::NewGuid),
                "off" => None,
                u => Some(MetaEdit::SetGuid(
                    qimg::ondisk::meta::Guid::parse(u).map_err(|_| {
                        format!("Parameter 'guid' expects 'on', 'off' or a UUID, not '{u}'")
                    })?,
                )),
            };
        } else {
            rest.accumulate(&format!("{k}={}", v.replace(',', ",,")))?;
        }
    }
    Ok((rest, edit))
}

/// Gives the freshly made qcow2 image `filename` its GUID (one header rewrite).
fn set_guid(filename: &str, edit: qimg::qcow2::meta::MetaEdit) -> qimg::Result<()> {
    let opts = qimg::open::OpenOptions {
        writable: true,
        ..Default::default()
    };
    let file = qimg::open::open_locked(std::path::Path::new(filename), &opts)?;
    qimg::qcow2::meta::update_header_metadata(&file, &[edit])?;
    Ok(())
}

/// Creates an image file of format `fmt` with `-o` options, printing the
/// "Formatting ..." line unless `quiet`; convert and create share this. Errors are
/// printed as qemu-img prints them (`<prog>: <file>: <why>`).
#[allow(clippy::too_many_arguments)]
pub fn create_image(
    ctx: &Ctx,
    fmt: &str,
    filename: &str,
    size: Option<u64>,
    options: &crate::opts::OptionList,
    backing: Option<&str>,
    backing_fmt: Option<&str>,
    quiet: bool,
    backing_unsafe: bool,
    error_prefix: Option<&str>,
) -> Result<(), i32> {
    use qimg::qcow2::create::{create_qcow2, create_raw, Preallocation};
    let fail = |m: &str| {
        ctx.error(&format!("{filename}: {}{m}", error_prefix.unwrap_or("")));
        1
    };
    let table = match fmt {
        "qcow2" => QCOW2_OPTS,
        "raw" => RAW_OPTS,
        "add-cow" => ADDCOW_OPTS,
        _ => return Err(fail(&format!("Unknown file format '{fmt}'"))),
    };
    let mut pairs = options.pairs();
    if let Some(b) = backing {
        pairs.push(("backing_file".into(), b.into()));
    }
    if let Some(f) = backing_fmt {
        pairs.push(("backing_fmt".into(), f.into()));
    }
    let vals = check_opts(&pairs, table).map_err(|m| fail(&m))?;
    if fmt == "raw" && (backing.is_some() || backing_fmt.is_some()) {
        return Err(fail("Backing file not supported for file format 'raw'"));
    }
    let mut size = size.or_else(|| get(&vals, "size").and_then(|s| s.parse().ok()));
    if fmt == "add-cow" {
        let Some(image_file) = get(&vals, "image_file").filter(|i| !i.is_empty()) else {
            return Err(fail(
                "add-cow images need an image file (-o image_file=NAME)",
            ));
        };
        if let Some(f) = get(&vals, "image_fmt").filter(|f| *f != "raw") {
            return Err(fail(&format!(
                "add-cow image file format '{f}' is not supported (only raw)"
            )));
        }
        // An existing image file gives the size (it may be larger than the backing file).
        if size.is_none() {
            let ipath = qimg::open::resolve_relative(std::path::Path::new(filename), image_file);
            if let Ok(md) = std::fs::metadata(&ipath) {
                size = Some(md.len());
            }
        }
    }
    let backing_file = get(&vals, "backing_file").map(str::to_string);
    let backing_format = get(&vals, "backing_fmt").map(str::to_string);
    if let Some(bf) = &backing_file {
        if backing_format.is_none() {
            let bpath = qimg::open::resolve_relative(std::path::Path::new(filename), bf);
            let mut msg = "Backing file specified without backing format".to_string();
            if let Ok(st) = qimg::storage::FileStorage::open(&bpath, false) {
                if let Ok(f) = qimg::open::probe(&st) {
                    msg += &format!("\nDetected format of {f}.");
                }
            }
            return Err(fail(&msg));
        }
        if !backing_unsafe {
            let bpath = qimg::open::resolve_relative(std::path::Path::new(filename), bf);
            let opts = qimg::open::OpenOptions {
                format: backing_format.clone(),
                force_share: true,
                ..Default::default()
            };
            match qimg::open::open_image(&bpath, &opts) {
                Ok(img) => {
                    if size.is_none() {
                        size = Some(img.len());
                    }
                }
                Err(e) => {
                    let e = e.to_string();
                    let shown = if e.starts_with("Could not open '") {
                        e
                    } else {
                        format!("Could not open '{bf}': {e}")
                    };
                    return Err(fail(&format!("{shown}\nCould not open backing image.")));
                }
            }
        }
    }
    let Some(size) = size else {
        return Err(fail("Image creation needs a size parameter"));
    };
    // The "Formatting" line, with the options qemu-img shows.
    let size_r = size.div_ceil(512) * 512;
    let mut line = format!("Formatting '{filename}', fmt={fmt}");
    if fmt == "add-cow" {
        line += &format!(" size={size}");
        for k in [
            "backing_file",
            "backing_fmt",
            "image_file",
            "image_fmt",
            "cluster_size",
        ] {
            let v = get(&vals, k).map(str::to_string).or_else(|| match k {
                "image_fmt" => Some("raw".into()),
                "cluster_size" => Some("65536".into()),
                _ => None,
            });
            if let Some(v) = v {
                line += &format!(" {k}={v}");
            }
        }
    } else if fmt == "qcow2" {
        let defaults: &[(&str, String)] = &[
            ("cluster_size", "65536".into()),
            ("extended_l2", "off".into()),
            ("compression_type", "zlib".into()),
            ("size", size_r.to_string()),
            ("lazy_refcounts", "off".into()),
            ("refcount_bits", "16".into()),
        ];
        for k in QCOW2_PRINT_ORDER {
            let v = if *k == "size" {
                Some(size.to_string())
            } else {
                get(&vals, k).map(str::to_string).or_else(|| {
                    defaults
                        .iter()
                        .find(|(d, _)| d == k)
                        .map(|(_, v)| v.clone())
                })
            };
            if let Some(v) = v {
                line += &format!(" {k}={v}");
            }
        }
    } else {
        line += &format!(" size={size}");
        for k in ["preallocation", "nocow", "extent_size_hint"] {
            if let Some(v) = get(&vals, k) {
                line += &format!(" {k}={v}");
            }
        }
    }
    if !quiet {
        crate::ctx::print_ignore(&format!("{line}\n"));
    }
    let prealloc = match get(&vals, "preallocation") {
        None => Preallocation::Off,
        Some(p) => Preallocation::parse(p).map_err(|e| fail(&e.to_string()))?,
    };
    let path = std::path::Path::new(filename);
    if fmt == "add-cow" {
        let co = qimg::addcow::CreateOptions {
            size: Some(size),
            image_file: get(&vals, "image_file").unwrap_or_default().to_string(),
            backing_file: backing_file.clone(),
            backing_format: backing_format.clone(),
            cluster_size: get(&vals, "cluster_size").and_then(|c| c.parse().ok()),
        };
        return qimg::addcow::create(path, &co).map_err(|e| fail(&e.to_string()));
    }
    if fmt == "raw" {
        return create_raw(path, size_r, prealloc).map_err(|e| fail(&e.to_string()));
    }
    let backing_file_keep = backing_file;
    let mut co = qcow2_options(&vals, size, prealloc).map_err(|m| fail(&m))?;
    co.backing_file = backing_file_keep;
    co.backing_fmt = backing_format;
    co.encryption = encryption_options(&vals).map_err(|m| fail(&m))?;
    co.validate().map_err(|e| fail(&e.to_string()))?;
    create_qcow2(path, &co).map_err(|e| fail(&e.to_string()))
}

/// The `encryption` / `encrypt.*` creation options, checked with qemu's messages.
pub(crate) fn encryption_options(
    vals: &[OptVal],
) -> Result<Option<qimg::qcow2::create::CreateEncryption>, String> {
    use qimg::crypto::{luks::LuksParams, CipherAlg, CipherMode, HashAlg, IvGen};
    use qimg::qcow2::create::CreateEncryption;
    let format = match (get(vals, "encrypt.format"), get(vals, "encryption")) {
        (Some(f), _) => Some(f),
        (None, Some("on")) => Some("aes"),
        _ => None,
    };
    let Some(format) = format else {
        if vals.iter().any(|v| v.key.starts_with("encrypt.")) {
            return Err("Parameter 'encrypt.format' is missing".into());
        }
        return Ok(None);
    };
    if format != "aes" && format != "luks" {
        return Err(format!(
            "Parameter 'format' does not accept value '{format}'"
        ));
    }
    let id = get(vals, "encrypt.key-secret")
        .ok_or("Parameter 'encrypt.key-secret' is required for cipher")?;
    let secret = crate::secrets::secret(id)?;
    if format == "aes" {
        return Ok(Some(CreateEncryption::Aes(secret)));
    }
    // Names QEMU knows but qimg (AES only) cannot do get QEMU's "not supported" text.
    const OTHER_CIPHERS: &[&str] = &[
        "des",
        "3des",
        "cast5-128",
        "serpent-128",
        "serpent-192",
        "serpent-256",
        "twofish-128",
        "twofish-192",
        "twofish-256",
        "sm4",
    ];
    let mut p = LuksParams::default();
    if let Some(a) = get(vals, "encrypt.cipher-alg") {
        p.cipher_alg = match CipherAlg::parse(a) {
            Some(c) => c,
            None if OTHER_CIPHERS.contains(&a) => {
                return Err(format!("Algorithm '{a}' not supported"))
            }
            None => {
                return Err(format!(
                    "Parameter 'cipher-alg' does not accept value '{a}'"
                ))
            }
        };
    }
    if let Some(m) = get(vals, "encrypt.cipher-mode") {
        p.cipher_mode = match CipherMode::parse(m) {
            Some(c) => c,
            None if m == "ctr" => return Err(format!("Cipher mode '{m}' not supported")),
            None => {
                return Err(format!(
                    "Parameter 'cipher-mode' does not accept value '{m}'"
                ))
            }
        };
    }
    let hash = |k: &str, name: &str| -> Result<Option<HashAlg>, String> {
        match get(vals, k) {
            None => Ok(None),
            Some(h) => match HashAlg::parse(h) {
                Some(x) => Ok(Some(x)),
                None if ["md5", "ripemd160", "sm3"].contains(&h) => {
                    Err(format!("Hash algorithm '{h}' not supported"))
                }
                None => Err(format!("Parameter '{name}' does not accept value '{h}'")),
            },
        }
    };
    if let Some(h) = hash("encrypt.hash-alg", "hash-alg")? {
        p.hash = h;
    }
    let ivhash = hash("encrypt.ivgen-hash-alg", "ivgen-hash-alg")?;
    p.ivgen = match get(vals, "encrypt.ivgen-alg") {
        None | Some("plain64") => IvGen::Plain64,
        Some("plain") => IvGen::Plain,
        Some("essiv") => IvGen::Essiv(ivhash.unwrap_or(HashAlg::Sha256)),
        Some(other) => {
            return Err(format!(
                "Parameter 'ivgen-alg' does not accept value '{other}'"
            ))
        }
    };
    if let Some(t) = get(vals, "encrypt.iter-time") {
        p.iter_time_ms = t.parse().unwrap_or(2000);
    }
    Ok(Some(CreateEncryption::Luks(p, secret)))
}

/// Builds qcow2 creation options from checked `-o` values (qemu's messages on error).
pub(crate) fn qcow2_options(
    vals: &[OptVal],
    size: u64,
    prealloc: qimg::qcow2::create::Preallocation,
) -> Result<qimg::qcow2::create::CreateOptions, String> {
    use qimg::ondisk::header::CompressionType;
    use qimg::qcow2::create::{Compat, CreateOptions};
    let mut co = CreateOptions {
        size,
        preallocation: prealloc,
        ..Default::default()
    };
    if let Some(c) = get(vals, "compat") {
        co.compat = Compat::parse(c).map_err(|e| e.to_string())?;
    }
    if let Some(c) = get(vals, "cluster_size") {
        co.cluster_size = c.parse().unwrap_or(0);
    }
    if let Some(r) = get(vals, "refcount_bits") {
        co.refcount_bits = r.parse().unwrap_or(0);
    }
    co.extended_l2 = get(vals, "extended_l2") == Some("on");
    co.lazy_refcounts = get(vals, "lazy_refcounts") == Some("on");
    co.data_file_raw = get(vals, "data_file_raw") == Some("on");
    co.data_file = get(vals, "data_file").map(str::to_string);
    co.backing_file = get(vals, "backing_file").map(str::to_string);
    co.backing_fmt = get(vals, "backing_fmt").map(str::to_string);
    co.compression_type = match get(vals, "compression_type") {
        None | Some("zlib") => CompressionType::Zlib,
        Some("zstd") => CompressionType::Zstd,
        Some(other) => {
            return Err(format!(
                "Parameter 'compression-type' does not accept value '{other}'"
            ))
        }
    };
    Ok(co)
}
