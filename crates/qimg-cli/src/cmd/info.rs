//! `qemu-img info`: describe an image (and its backing chain).
use crate::args::{HasArg, Item, Key, LongOpt};
use crate::cmd::common::{as_addcow, as_qcow2, open};
use crate::ctx::print_ignore;
use crate::ctx::{run_getopt, Ctx, Parsed};
use crate::fmt::{
    dump_human, local_utc_offset, size_to_str, snapshot_header, snapshot_line, to_json_pretty,
};
use crate::opts::OutputFormat;
use qimg::image::Image;
use qimg::ondisk::header::{autoclear, compat, incompat};
use qimg::open::{resolve_relative, OpenOptions};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};

const CMD: &str = "info";

/// `qemu-img info --help` text (`qemu-img` is replaced by the program name).
pub const HELP: &str = r#"Usage:
Display information about image.  Usage:

  qemu-img info [-f FMT | --image-opts] [-b] [-U] [--object OBJDEF]
        [--output human|json] FILENAME

Arguments:
  -h, --help
     print this help and exit
  -f, --format FMT
     specify FILENAME image format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
     instead of a file name (incompatible with --format)
  -b, --backing-chain
     display information about backing chaing
  (in case the image is stacked
  -U, --force-share
     open image in shared mode for concurrent access
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  --output human|json
     specify output format name (default human)
  FILENAME
     image file name (or specification with --image-opts)

"#;

/// Short options, in getopt syntax.
const SHORT: &str = "hf:bU";
const IMAGE_OPTS: u16 = 1;
const OUTPUT: u16 = 2;
const OBJECT: u16 = 3;

/// Long options, in the table order that decides how ambiguities are listed.
const LONG: &[LongOpt] = &[
    LongOpt::new("help", HasArg::No, Key::Short('h')),
    LongOpt::new("format", HasArg::Required, Key::Short('f')),
    LongOpt::new("force-share", HasArg::No, Key::Short('U')),
    LongOpt::new("image-opts", HasArg::No, Key::Long(IMAGE_OPTS)),
    LongOpt::new("backing-chain", HasArg::No, Key::Short('b')),
    LongOpt::new("output", HasArg::Required, Key::Long(OUTPUT)),
    LongOpt::new("object", HasArg::Required, Key::Long(OBJECT)),
];

/// Everything `qemu-img info` accepts on its command line.
#[derive(Clone, Debug, Default)]
pub struct InfoOpts {
    /// `-f`: image format (probed if absent).
    pub format: Option<String>,
    /// `--image-opts`: the file name is a `key=value,...` specification.
    pub image_opts: bool,
    /// `-b`/`--backing-chain`: describe every image of the chain.
    pub backing_chain: bool,
    /// `-U`: open without taking write locks.
    pub force_share: bool,
    /// `--output`.
    pub output: OutputFormat,
    /// `--object` definitions.
    pub objects: Vec<String>,
    /// The image.
    pub filename: String,
}

/// Parses the arguments after `info`; usage errors are reported here, exactly as
/// qemu-img words them.
pub fn parse(ctx: &Ctx, args: &[String]) -> Parsed<InfoOpts> {
    let mut o = InfoOpts::default();
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
            Key::Short('b') => o.backing_chain = true,
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

/// Runs `info`; returns the process exit code.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    match parse(ctx, args) {
        Parsed::Run(opts) if crate::secrets::register(ctx, &opts.objects).is_err() => 1,
        Parsed::Run(opts) => match info(ctx, &opts) {
            Ok(()) => 0,
            Err(code) => code,
        },
        Parsed::Exit(code) => code,
    }
}

/// The `encrypt` member of qcow2's format-specific info (QAPI `QCryptoBlockInfo`).
fn encrypt_info(q: &qimg::qcow2::Qcow2) -> Value {
    let Some(l) = q.luks_header() else {
        return json!({"format": "aes"});
    };
    let mut o = Map::new();
    o.insert("format".into(), json!("luks"));
    o.insert("cipher-alg".into(), json!(l.cipher_alg.name()));
    o.insert("cipher-mode".into(), json!(l.cipher_mode.name()));
    o.insert("ivgen-alg".into(), json!(l.ivgen.name()));
    if let qimg::crypto::IvGen::Essiv(hash) = l.ivgen {
        o.insert("ivgen-hash-alg".into(), json!(hash.name()));
    }
    o.insert("hash-alg".into(), json!(l.hash.name()));
    o.insert("detached-header".into(), json!(false));
    o.insert(
        "payload-offset".into(),
        json!(l.payload_offset as u64 * 512),
    );
    o.insert("master-key-iters".into(), json!(l.mk_digest_iter));
    o.insert("uuid".into(), json!(l.uuid));
    let slots: Vec<Value> = l
        .slots
        .iter()
        .map(|s| {
            let mut so = Map::new();
            so.insert("active".into(), json!(s.active));
            if s.active {
                so.insert("iters".into(), json!(s.iterations));
                so.insert("stripes".into(), json!(s.stripes));
            }
            so.insert("key-offset".into(), json!(s.key_offset as u64 * 512));
            Value::Object(so)
        })
        .collect();
    o.insert("slots".into(), Value::Array(slots));
    Value::Object(o)
}

/// Builds the `BlockGraphInfo` of one image (QAPI field order; the printer applies
/// QEMU's hash order).
pub fn image_info(filename: &str, img: &dyn Image) -> Result<Value, String> {
    let mut m = Map::new();
    let q = as_qcow2(img);
    let ac = as_addcow(img);
    let file = match (q, ac) {
        (Some(q), _) => q.file().clone(),
        (None, Some(a)) => a.meta_file().clone(),
        (None, None) => img
            .as_any()
            .downcast_ref::<qimg::raw::Raw>()
            .map(|r| r.file().clone())
            .ok_or("unsupported image type")?,
    };
    let actual = file.allocated_size().map_err(|e| e.to_string())?;
    let file_len = file.len().map_err(|e| e.to_string())?;
    m.insert("filename".into(), json!(filename));
    m.insert("format".into(), json!(img.format_name()));
    let dirty = q.is_some_and(|q| q.header().incompatible_features & incompat::DIRTY != 0);
    m.insert("dirty-flag".into(), json!(dirty));
    m.insert("actual-size".into(), json!(actual));
    m.insert("virtual-size".into(), json!(img.len()));
    if let Some(q) = q {
        let h = q.header();
        m.insert("cluster-size".into(), json!(h.cluster_size()));
        insert_backing(&mut m, filename, &h.backing_file, &h.backing_format);
        if !q.snapshots().is_empty() {
            let snaps: Vec<Value> = q
                .snapshots()
                .iter()
                .map(|s| {
                    let mut o = Map::new();
                    o.insert("id".into(), json!(s.id));
                    o.insert("name".into(), json!(s.name));
                    o.insert("vm-state-size".into(), json!(s.vm_state_size));
                    o.insert("date-sec".into(), json!(s.date_sec));
                    o.insert("date-nsec".into(), json!(s.date_nsec));
                    o.insert(
                        "vm-clock-sec".into(),
                        json!(s.vm_clock_nsec / 1_000_000_000),
                    );
                    o.insert(
                        "vm-clock-nsec".into(),
                        json!(s.vm_clock_nsec % 1_000_000_000),
                    );
                    if let Some(i) = s.icount {
                        o.insert("icount".into(), json!(i));
                    }
                    Value::Object(o)
                })
                .collect();
            m.insert("snapshots".into(), Value::Array(snaps));
        }
        let mut d = Map::new();
        let v3 = h.version >= 3;
        d.insert("compat".into(), json!(if v3 { "1.1" } else { "0.10" }));
        if v3 {
            if let Some(df) = &h.data_file {
                d.insert("data-file".into(), json!(df));
            }
            if h.has_data_file() {
                d.insert(
                    "data-file-raw".into(),
                    json!(h.autoclear_features & autoclear::DATA_FILE_RAW != 0),
                );
            }
            d.insert("extended-l2".into(), json!(h.extended_l2()));
            d.insert(
                "lazy-refcounts".into(),
                json!(h.compatible_features & compat::LAZY_REFCOUNTS != 0),
            );
            d.insert(
                "corrupt".into(),
                json!(h.incompatible_features & incompat::CORRUPT != 0),
            );
        }
        d.insert("refcount-bits".into(), json!(h.refcount_bits()));
        if q.encrypted() {
            m.insert("encrypted".into(), json!(true));
            d.insert("encrypt".into(), encrypt_info(q));
        }
        if !q.bitmaps().is_empty() {
            let bms: Vec<Value> = q
                .bitmaps()
                .iter()
                .map(|b| {
                    let mut flags = Vec::new();
                    if b.flags & qimg::ondisk::bitmap::FLAG_IN_USE != 0 {
                        flags.push(json!("in-use"));
                    }
                    if b.flags & qimg::ondisk::bitmap::FLAG_AUTO != 0 {
                        flags.push(json!("auto"));
                    }
                    let mut o = Map::new();
                    o.insert("flags".into(), Value::Array(flags));
                    o.insert("name".into(), json!(b.name));
                    o.insert("granularity".into(), json!(1u64 << b.granularity_bits));
                    Value::Object(o)
                })
                .collect();
            d.insert("bitmaps".into(), Value::Array(bms));
        }
        d.insert("compression-type".into(), json!(h.compression().name()));
        m.insert(
            "format-specific".into(),
            json!({"type": "qcow2", "data": Value::Object(d)}),
        );
    }
    if let Some(a) = ac {
        // QEMU has no add-cow driver to imitate: the qcow2 keys where they mean the same,
        // and the image file under format-specific.
        let h = a.header();
        m.insert("cluster-size".into(), json!(h.cluster_size()));
        insert_backing(&mut m, filename, &h.backing_file, &h.backing_format);
        let full = resolve_relative(Path::new(filename), &h.image_file);
        m.insert(
            "format-specific".into(),
            json!({"type": "add-cow", "data": {
                "image-file": h.image_file,
                "full-image-file": full.display().to_string(),
                "image-file-format": h.image_format,
                "copied-clusters": a.copied_clusters(),
            }}),
        );
    }
    let child = json!({
        "name": "file",
        "info": {
            "filename": filename,
            "format": "file",
            "dirty-flag": false,
            "actual-size": actual,
            "virtual-size": file_len.div_ceil(512) * 512,
            "format-specific": {"type": "file", "data": {}},
            "children": [],
        }
    });
    m.insert("children".into(), json!([child]));
    Ok(Value::Object(m))
}

/// qemu-img's human rendering of one image's info.
pub fn human(v: &Value) -> String {
    let mut out = String::new();
    let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
    let n = |k: &str| v[k].as_u64().unwrap_or_default();
    out += &format!("image: {}\n", s("filename"));
    out += &format!("file format: {}\n", s("format"));
    out += &format!(
        "virtual size: {} ({} bytes)\n",
        size_to_str(n("virtual-size")),
        n("virtual-size")
    );
    out += &format!("disk size: {}\n", size_to_str(n("actual-size")));
    if v["encrypted"].as_bool() == Some(true) {
        out += "encrypted: yes\n";
    }
    if let Some(cs) = v["cluster-size"].as_u64() {
        out += &format!("cluster_size: {cs}\n");
    }
    if v["dirty-flag"].as_bool() == Some(true) {
        out += "cleanly shut down: no\n";
    }
    if let Some(b) = v["backing-filename"].as_str() {
        out += &format!("backing file: {b}");
        if let Some(full) = v["full-backing-filename"].as_str() {
            if full != b {
                out += &format!(" (actual path: {full})");
            }
        }
        out += "\n";
    }
    if let Some(f) = v["backing-filename-format"].as_str() {
        out += &format!("backing file format: {f}\n");
    }
    if let Some(snaps) = v["snapshots"].as_array() {
        out += "Snapshot list:\n";
        out += &snapshot_header();
        out += "\n";
        for sn in snaps {
            let date = sn["date-sec"].as_i64().unwrap_or_default();
            out += &snapshot_line(
                sn["id"].as_str().unwrap_or_default(),
                sn["name"].as_str().unwrap_or_default(),
                sn["vm-state-size"].as_u64().unwrap_or_default(),
                date,
                local_utc_offset(date),
                sn["vm-clock-sec"].as_u64().unwrap_or_default() * 1_000_000_000
                    + sn["vm-clock-nsec"].as_u64().unwrap_or_default(),
                sn["icount"].as_u64(),
            );
            out += "\n";
        }
    }
    if let Some(fs) = v.get("format-specific") {
        out += "Format specific information:\n";
        out += &dump_human(&fs["data"], 1);
    }
    if let Some(child) = v["children"].as_array().and_then(|c| c.first()) {
        let ci = &child["info"];
        out += &format!(
            "Child node '/{}':\n",
            child["name"].as_str().unwrap_or_default()
        );
        out += &format!(
            "    filename: {}\n",
            ci["filename"].as_str().unwrap_or_default()
        );
        out += "    protocol type: file\n";
        let fl = ci["virtual-size"].as_u64().unwrap_or_default();
        out += &format!("    file length: {} ({fl} bytes)\n", size_to_str(fl));
        out += &format!(
            "    disk size: {}\n",
            size_to_str(ci["actual-size"].as_u64().unwrap_or_default())
        );
    }
    out
}

fn info(ctx: &Ctx, o: &InfoOpts) -> Result<(), i32> {
    let mut infos = Vec::new();
    let (mut name, mut format) =
        crate::cmd::common::image_spec(ctx, &o.filename, o.format.clone(), o.image_opts)?;
    let mut seen = Vec::new();
    loop {
        let opts = OpenOptions {
            format: format.clone(),
            force_share: o.force_share,
            no_backing: true,
            no_data_file: true,
            no_io: true,
            ..Default::default()
        };
        let canon = std::fs::canonicalize(&name).unwrap_or_else(|_| PathBuf::from(&name));
        if seen.contains(&canon) {
            ctx.error(&format!("Backing file '{name}' creates an infinite loop."));
            return Err(1);
        }
        seen.push(canon);
        let img = open(ctx, &name, &opts)?;
        let mut v = image_info(&name, img.as_ref()).map_err(|e| {
            ctx.error(&e);
            1
        })?;
        if infos.is_empty() {
            if let Some(j) = crate::secrets::json_filename(&name) {
                v["filename"] = j.into();
            }
        }
        let next = v["full-backing-filename"].as_str().map(str::to_string);
        format = v["backing-filename-format"].as_str().map(str::to_string);
        infos.push(v);
        match next {
            Some(n) if o.backing_chain => name = n,
            _ => break,
        }
    }
    let text = match o.output {
        OutputFormat::Json if o.backing_chain => to_json_pretty(&Value::Array(infos)),
        OutputFormat::Json => to_json_pretty(&infos[0]),
        OutputFormat::Human => infos.iter().map(human).collect::<Vec<_>>().join("\n"),
    };
    print_ignore(&text);
    Ok(())
}

/// The backing-file keys of `info --output=json`, as QEMU fills them.
fn insert_backing(
    m: &mut Map<String, Value>,
    filename: &str,
    backing: &Option<String>,
    format: &Option<String>,
) {
    if let Some(b) = backing {
        m.insert("backing-filename".into(), json!(b));
        let full = resolve_relative(Path::new(filename), b);
        m.insert(
            "full-backing-filename".into(),
            json!(full.display().to_string()),
        );
        if let Some(f) = format {
            m.insert("backing-filename-format".into(), json!(f));
        }
    }
}
