//! `qimg meta`: list or change the image GUID and key/value metadata of a qcow2 image.
//!
//! qemu-img has no such command; the data lives in two header extensions of qimg's own
//! (layout in `qimg::ondisk::meta`) that QEMU keeps but does not show.
use crate::args::{HasArg, Item, Key, LongOpt};
use crate::cmd::common::image_spec;
use crate::ctx::{print_ignore, run_getopt, Ctx, Parsed};
use crate::fmt::json_quote;
use crate::opts::OutputFormat;
use qimg::ondisk::header::incompat;
use qimg::ondisk::meta::{check_key, Guid, Metadata};
use qimg::open::{open_locked, probe, OpenOptions};
use qimg::qcow2::meta::{update_header_metadata, MetaEdit};
use qimg::qcow2::{Qcow2, Qcow2Options};
use qimg::storage::Storage;
use std::path::Path;
use std::sync::Arc;

const CMD: &str = "meta";

/// `qimg meta --help` text (`qemu-img meta` is replaced by the program name).
pub const HELP: &str = r#"Usage:
List or change the GUID and key/value metadata of a qcow2 image.  Usage:

  qemu-img meta [-f qcow2 | --image-opts] [--output=human|json] [-U] FILENAME
  qemu-img meta [-f qcow2 | --image-opts] [--set KEY=VALUE].. [--set-hex KEY=HEX]..
        [--remove KEY].. [--clear] [--guid UUID | --new-guid | --remove-guid]..
        FILENAME

This command is qimg's own: qemu-img has none like it. The GUID and the
metadata are stored in two qcow2 header extensions that QEMU does not
interpret but keeps when it rewrites the header, so QEMU still opens the
image. Without changes the command lists the GUID and the keys; changes are
applied in command-line order in one update of the image header, and
either all of them are made or none. Values are listed as text when
they are valid UTF-8, else in hexadecimal (the human listing also shows
values with control characters in hexadecimal, to keep one line per key).

Arguments:
  -h, --help
     print this help and exit
  -f, --format FMT
     specify FILENAME format explicitly (only qcow2 has metadata)
  --image-opts
     indicates that FILENAME is a complete image specification
     instead of a file name (incompatible with --format)
  --output human|json
     listing format (human by default)
  -U, --force-share
     list even when another process has the image open for writing
  --set KEY=VALUE
     sets KEY (UTF-8, not empty, no '=' or control characters) to VALUE
  --set-hex KEY=HEX
     sets KEY to the bytes written in hexadecimal (for binary values)
  --remove KEY
     removes KEY; fails if the image has no such key
  --clear
     removes every key (also a damaged metadata extension)
  --guid UUID
     sets the image GUID (form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)
  --new-guid
     sets a new random GUID and prints it
  --remove-guid
     removes the image GUID

"#;

/// Short options, in getopt syntax.
const SHORT: &str = "f:hU";
const OUTPUT: u16 = 1;
const SET: u16 = 2;
const REMOVE: u16 = 3;
const CLEAR: u16 = 4;
const GUID: u16 = 5;
const NEW_GUID: u16 = 6;
const REMOVE_GUID: u16 = 7;
const IMAGE_OPTS: u16 = 8;
const SET_HEX: u16 = 9;

/// Long options, in the table order that decides how ambiguities are listed.
const LONG: &[LongOpt] = &[
    LongOpt::new("help", HasArg::No, Key::Short('h')),
    LongOpt::new("format", HasArg::Required, Key::Short('f')),
    LongOpt::new("image-opts", HasArg::No, Key::Long(IMAGE_OPTS)),
    LongOpt::new("output", HasArg::Required, Key::Long(OUTPUT)),
    LongOpt::new("force-share", HasArg::No, Key::Short('U')),
    LongOpt::new("set", HasArg::Required, Key::Long(SET)),
    LongOpt::new("set-hex", HasArg::Required, Key::Long(SET_HEX)),
    LongOpt::new("remove", HasArg::Required, Key::Long(REMOVE)),
    LongOpt::new("clear", HasArg::No, Key::Long(CLEAR)),
    LongOpt::new("guid", HasArg::Required, Key::Long(GUID)),
    LongOpt::new("new-guid", HasArg::No, Key::Long(NEW_GUID)),
    LongOpt::new("remove-guid", HasArg::No, Key::Long(REMOVE_GUID)),
];

/// Everything `qimg meta` accepts on its command line.
#[derive(Clone, Debug, Default)]
pub struct MetaOpts {
    /// `-f`: image format.
    pub format: Option<String>,
    /// `--image-opts`.
    pub image_opts: bool,
    /// `--output` (listing only).
    pub output: Option<OutputFormat>,
    /// `-U`: list without the lock that keeps writers out.
    pub force_share: bool,
    /// Changes, in command-line order; none means list.
    pub edits: Vec<MetaEdit>,
    /// The image.
    pub filename: String,
}

/// Parses one `--set KEY=VALUE` (or, `hex`, `--set-hex KEY=HEX`) argument.
fn parse_set(arg: &str, hex: bool) -> Result<MetaEdit, String> {
    let opt = if hex {
        "--set-hex KEY=HEX"
    } else {
        "--set KEY=VALUE"
    };
    let Some((k, v)) = arg.split_once('=') else {
        return Err(format!("{opt} needs a '=', not '{arg}'"));
    };
    check_key(k).map_err(|e| e.to_string())?;
    let value = if hex {
        let bad = || format!("{opt}: '{v}' is not an even number of hexadecimal digits");
        if v.len() % 2 != 0 || !v.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad());
        }
        (0..v.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&v[i..i + 2], 16).map_err(|_| bad()))
            .collect::<Result<Vec<u8>, String>>()?
    } else {
        v.as_bytes().to_vec()
    };
    Ok(MetaEdit::Set(k.to_string(), value))
}

/// Parses the arguments after `meta`; usage errors are reported here.
pub fn parse(ctx: &Ctx, args: &[String]) -> Parsed<MetaOpts> {
    let mut o = MetaOpts::default();
    let mut g = ctx.getopt(CMD, args, SHORT, LONG);
    let res = run_getopt(ctx, CMD, &mut g, |item| {
        let Item::Opt(key, arg) = item else {
            return Ok(());
        };
        let arg = arg.unwrap_or_default();
        let fail = |m: String| {
            ctx.error(&m);
            1
        };
        match key {
            Key::Short('h') => {
                // Only the usage lines name the program; the text names qemu-img itself.
                print_ignore(&HELP.replace("qemu-img meta", &format!("{} meta", ctx.prog)));
                return Err(0);
            }
            Key::Short('f') => o.format = Some(arg),
            Key::Short('U') => o.force_share = true,
            Key::Long(IMAGE_OPTS) => o.image_opts = true,
            Key::Long(OUTPUT) => match OutputFormat::parse(&arg) {
                Ok(f) => o.output = Some(f),
                Err(m) => return Err(ctx.usage_error(CMD, &m)),
            },
            Key::Long(SET) => o.edits.push(parse_set(&arg, false).map_err(fail)?),
            Key::Long(SET_HEX) => o.edits.push(parse_set(&arg, true).map_err(fail)?),
            Key::Long(REMOVE) => o.edits.push(MetaEdit::Remove(arg)),
            Key::Long(CLEAR) => o.edits.push(MetaEdit::Clear),
            Key::Long(GUID) => {
                let g = Guid::parse(&arg).map_err(|e| fail(e.to_string()))?;
                o.edits.push(MetaEdit::SetGuid(g));
            }
            Key::Long(NEW_GUID) => o.edits.push(MetaEdit::NewGuid),
            Key::Long(REMOVE_GUID) => o.edits.push(MetaEdit::RemoveGuid),
            _ => {}
        }
        Ok(())
    });
    if let Err(code) = res {
        return Parsed::Exit(code);
    }
    let ops = g.operands();
    let problem = if !o.edits.is_empty() && o.force_share {
        Some("--force-share (-U) is only for listing, not for changes")
    } else if !o.edits.is_empty() && o.output.is_some() {
        Some("--output is only for listing, not for changes")
    } else if o.image_opts && o.format.is_some() {
        Some("--image-opts and --format are mutually exclusive")
    } else if ops.len() != 1 {
        Some("Expecting one image file name")
    } else {
        None
    };
    if let Some(m) = problem {
        return Parsed::Exit(ctx.usage_error(CMD, m));
    }
    o.filename = ops[0].clone();
    Parsed::Run(o)
}

/// Runs `meta`; returns the process exit code.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    match parse(ctx, args) {
        Parsed::Run(opts) => match execute(ctx, &opts) {
            Ok(()) => 0,
            Err(code) => code,
        },
        Parsed::Exit(code) => code,
    }
}

/// A value as listed: the text when it is UTF-8 without control characters (so that a
/// listing keeps one line per key), else `None` (listed in hexadecimal).
fn printable(v: &[u8]) -> Option<&str> {
    std::str::from_utf8(v)
        .ok()
        .filter(|s| !s.chars().any(char::is_control))
}

fn hex(v: &[u8]) -> String {
    v.iter().map(|b| format!("{b:02x}")).collect()
}

/// The human listing: `guid: ...`, then `metadata:` with one indented `key: value` line
/// per key (`key (hex): ...` for values that are not printable text).
pub fn render_human(guid: Option<Guid>, map: &Metadata) -> String {
    let mut out = match guid {
        Some(g) => format!("guid: {g}\n"),
        None => "guid: none\n".to_string(),
    };
    if map.is_empty() {
        out.push_str("metadata: none\n");
        return out;
    }
    out.push_str("metadata:\n");
    for (k, v) in map {
        match printable(v) {
            Some(s) => out.push_str(&format!("    {k}: {s}\n")),
            None => out.push_str(&format!("    {k} (hex): {}\n", hex(v))),
        }
    }
    out
}

/// The JSON listing: `{"guid": ... or null, "metadata": [{"key": ..., "value": ...}]}`,
/// with `"value-hex"` instead of `"value"` for values that are not valid UTF-8 (JSON
/// strings escape control characters, so those need no hex).
pub fn render_json(guid: Option<Guid>, map: &Metadata) -> String {
    let mut out = String::from("{\n    \"guid\": ");
    match guid {
        Some(g) => json_quote(&g.to_string(), &mut out),
        None => out.push_str("null"),
    }
    out.push_str(",\n    \"metadata\": [");
    let mut sep = "";
    for (k, v) in map {
        out.push_str(sep);
        out.push_str("\n        {\n            \"key\": ");
        json_quote(k, &mut out);
        match std::str::from_utf8(v) {
            Ok(s) => {
                out.push_str(",\n            \"value\": ");
                json_quote(s, &mut out);
            }
            Err(_) => {
                out.push_str(",\n            \"value-hex\": ");
                json_quote(&hex(v), &mut out);
            }
        }
        out.push_str("\n        }");
        sep = ",";
    }
    if !map.is_empty() {
        out.push_str("\n    ");
    }
    out.push_str("]\n}\n");
    out
}

/// Opens the image file with the lock a listing (or, `writable`, a writer) takes,
/// checks that it is a qcow2 image a writer may change, and returns the file and the
/// image opened read-only (bitmaps, a dirty bit and the data stay as they are: only
/// the header is read or changed).
fn open_checked(ctx: &Ctx, o: &MetaOpts, writable: bool) -> Result<(Arc<dyn Storage>, Qcow2), i32> {
    let (name, format) = image_spec(ctx, &o.filename, o.format.clone(), o.image_opts)?;
    let fail = |e: &dyn std::fmt::Display| {
        ctx.error(&format!("Could not open '{name}': {e}"));
        1
    };
    let opts = OpenOptions {
        format: format.clone(),
        writable,
        force_share: o.force_share,
        no_backing: true,
        no_data_file: true,
        ..Default::default()
    };
    let file: Arc<dyn Storage> =
        Arc::new(open_locked(Path::new(&name), &opts).map_err(|e| fail(&e))?);
    let format = match format {
        Some(f) => f,
        None => probe(file.as_ref()).map_err(|e| fail(&e))?.to_string(),
    };
    match format.as_str() {
        "qcow2" => {}
        "raw" | "file" => {
            ctx.error(&format!(
                "'{name}' is a {format} image: only qcow2 images have a GUID and metadata"
            ));
            return Err(1);
        }
        other => return Err(fail(&format!("Unknown driver '{other}'"))),
    }
    let q = Qcow2::open(file.clone(), Qcow2Options::default()).map_err(|e| fail(&e))?;
    if writable && q.header().incompatible_features & incompat::CORRUPT != 0 {
        return Err(fail(
            &"qcow2: Image is corrupt; cannot be opened read/write",
        ));
    }
    Ok((file, q))
}

fn execute(ctx: &Ctx, o: &MetaOpts) -> Result<(), i32> {
    let name = &o.filename;
    if o.edits.is_empty() {
        let (_file, q) = open_checked(ctx, o, false)?;
        let read = q.guid().and_then(|g| Ok((g, q.metadata()?)));
        let (guid, map) = read.map_err(|e| {
            ctx.error(&format!("Could not read the metadata of '{name}': {e}"));
            1
        })?;
        let text = match o.output.unwrap_or_default() {
            OutputFormat::Human => render_human(guid, &map),
            OutputFormat::Json => render_json(guid, &map),
        };
        print_ignore(&text);
        return Ok(());
    }
    let (file, q) = open_checked(ctx, o, true)?;
    drop(q);
    let (_, guid) = update_header_metadata(file.as_ref(), &o.edits).map_err(|e| {
        ctx.error(&format!("Could not change the metadata of '{name}': {e}"));
        1
    })?;
    if o.edits.contains(&MetaEdit::NewGuid) {
        if let Some(g) = guid {
            print_ignore(&format!("{g}\n"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &[u8])]) -> Metadata {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect()
    }

    #[test]
    fn listings() {
        let g = Guid::parse("1b4e28ba-2fa1-41d2-883f-0016d3cca427").unwrap();
        let m = map(&[("owner", b"alice"), ("bin", &[0, 0xff]), ("nl", b"a\nb")]);
        assert_eq!(
            render_human(Some(g), &m),
            "guid: 1b4e28ba-2fa1-41d2-883f-0016d3cca427\nmetadata:\n    bin (hex): 00ff\n    nl (hex): 610a62\n    owner: alice\n"
        );
        assert_eq!(
            render_human(None, &Metadata::new()),
            "guid: none\nmetadata: none\n"
        );
        let j = render_json(Some(g), &m);
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(v["guid"], "1b4e28ba-2fa1-41d2-883f-0016d3cca427");
        assert_eq!(v["metadata"][0]["value-hex"], "00ff");
        assert_eq!(v["metadata"][1]["value"], "a\nb");
        assert_eq!(v["metadata"][2]["key"], "owner");
        assert_eq!(
            render_json(None, &Metadata::new()),
            "{\n    \"guid\": null,\n    \"metadata\": []\n}\n"
        );
    }

    #[test]
    fn command_lines() {
        let ctx = Ctx::new("qimg");
        let sv = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let Parsed::Run(o) = parse(
            &ctx,
            &sv(&[
                "--set",
                "a=b=c",
                "img",
                "--remove",
                "x",
                "--new-guid",
                "--clear",
            ]),
        ) else {
            panic!()
        };
        assert_eq!(
            o.edits,
            vec![
                MetaEdit::Set("a".into(), b"b=c".to_vec()),
                MetaEdit::Remove("x".into()),
                MetaEdit::NewGuid,
                MetaEdit::Clear
            ]
        );
        assert_eq!(o.filename, "img");
        for bad in [
            &["--set", "novalue", "img"][..],
            &["--set-hex", "k=0", "img"],
            &["--set-hex", "k=zz", "img"],
            &["--set-hex", "k=+f", "img"],
            &["--set", "=v", "img"],
            &["--guid", "xyz", "img"],
            &["-U", "--set", "a=b", "img"],
            &["--output=json", "--clear", "img"],
            &["img", "other"],
            &[],
        ] {
            assert!(matches!(parse(&ctx, &sv(bad)), Parsed::Exit(1)), "{bad:?}");
        }
    }
}
