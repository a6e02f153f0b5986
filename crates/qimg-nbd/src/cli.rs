//! `qemu-nbd`-compatible command line.
//!
//! Parsing is done in two stages, like ripgrep: a getopt_long-style pass that collects raw
//! values (GNU semantics: permuted arguments, `--opt=value`, unique long-option prefixes,
//! clustered short flags), then validation into a configuration. Messages are qemu-nbd's,
//! with the program name in front, so scripts that match on them keep working.
//!
//! One deliberate difference: without `-b`, TCP listens on 127.0.0.1, not 0.0.0.0.
//! Exporting a disk to every network the host is on should be a decision, not a default.

use crate::proto::MAX_STRING;
use crate::server::{CacheMode, DetectZeroes, Discard, Export, Server, ServerConfig};
use crate::stream::Listener;
use crate::tls::TlsConfig;
use qimg::open::{open_image, OpenOptions};
use qimg::Image;
use std::net::{TcpListener, ToSocketAddrs};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Default TCP port (IANA-assigned to NBD).
pub const DEFAULT_PORT: u16 = 10809;
/// Default bind address: loopback only (qemu-nbd uses 0.0.0.0).
pub const DEFAULT_BIND: &str = "127.0.0.1";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Arg {
    None,
    Required,
}

/// Long options: name, argument, and the short option (or a private code) it maps to.
const LONG: &[(&str, Arg, char)] = &[
    ("help", Arg::None, 'h'),
    ("version", Arg::None, 'V'),
    ("bind", Arg::Required, 'b'),
    ("port", Arg::Required, 'p'),
    ("socket", Arg::Required, 'k'),
    ("offset", Arg::Required, 'o'),
    ("read-only", Arg::None, 'r'),
    ("allocation-depth", Arg::None, 'A'),
    ("bitmap", Arg::Required, 'B'),
    ("connect", Arg::Required, 'c'),
    ("disconnect", Arg::None, 'd'),
    ("list", Arg::None, 'L'),
    ("snapshot", Arg::None, 's'),
    ("load-snapshot", Arg::Required, 'l'),
    ("nocache", Arg::None, 'n'),
    ("cache", Arg::Required, '\u{1}'),
    ("aio", Arg::Required, '\u{2}'),
    ("discard", Arg::Required, '\u{3}'),
    ("detect-zeroes", Arg::Required, '\u{4}'),
    ("shared", Arg::Required, 'e'),
    ("format", Arg::Required, 'f'),
    ("persistent", Arg::None, 't'),
    ("export-name", Arg::Required, 'x'),
    ("description", Arg::Required, 'D'),
    ("verbose", Arg::None, 'v'),
    ("object", Arg::Required, '\u{5}'),
    ("tls-creds", Arg::Required, '\u{6}'),
    ("tls-authz", Arg::Required, '\u{7}'),
    ("tls-hostname", Arg::Required, '\u{8}'),
    ("image-opts", Arg::None, '\u{9}'),
    ("trace", Arg::Required, 'T'),
    ("fork", Arg::None, '\u{a}'),
    ("pid-file", Arg::Required, '\u{b}'),
    ("selinux-label", Arg::Required, '\u{c}'),
    ("handshake-limit", Arg::Required, '\u{d}'),
];

/// Short options and whether they take an argument (qemu-nbd's getopt string).
const SHORT: &str = "hVb:o:p:rsnc:dvk:e:f:tl:x:T:D:AB:L";

fn short_arg(c: char) -> Option<Arg> {
    let mut it = SHORT.chars().peekable();
    while let Some(x) = it.next() {
        let takes = it.peek() == Some(&':');
        if takes {
            it.next();
        }
        if x == c {
            return Some(if takes { Arg::Required } else { Arg::None });
        }
    }
    None
}

/// A usage error: the message, and whether to add the "Try --help" line.
struct Usage(String);

/// Options in command-line order (code, value) and the positional arguments.
type Parsed = (Vec<(char, String)>, Vec<String>);

/// Stage one: options in order, and the positional arguments.
fn getopt(args: &[String]) -> Result<Parsed, Usage> {
    let mut opts = Vec::new();
    let mut pos = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        if a == "--" {
            pos.extend(args[i..].iter().cloned());
            break;
        }
        if let Some(body) = a.strip_prefix("--") {
            let (name, inline) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (body, None),
            };
            let exact = LONG.iter().find(|l| l.0 == name);
            let cands: Vec<_> = LONG.iter().filter(|l| l.0.starts_with(name)).collect();
            let (lname, arg, code) = match (exact, cands.len()) {
                (Some(l), _) => *l,
                (None, 1) => *cands[0],
                (None, 0) => return Err(Usage(format!("unrecognized option '--{name}'"))),
                (None, _) => {
                    let list: Vec<String> = cands.iter().map(|c| format!("'--{}'", c.0)).collect();
                    return Err(Usage(format!(
                        "option '--{name}' is ambiguous; possibilities: {}",
                        list.join(" ")
                    )));
                }
            };
            match (arg, inline) {
                (Arg::None, Some(_)) => {
                    return Err(Usage(format!(
                        "option '--{lname}' doesn't allow an argument"
                    )))
                }
                (Arg::None, None) => opts.push((code, String::new())),
                (Arg::Required, Some(v)) => opts.push((code, v)),
                (Arg::Required, None) => {
                    if i < args.len() {
                        opts.push((code, args[i].clone()));
                        i += 1;
                    } else {
                        return Err(Usage(format!("option '--{lname}' requires an argument")));
                    }
                }
            }
            continue;
        }
        if a.len() > 1 && a.starts_with('-') {
            let chars: Vec<char> = a[1..].chars().collect();
            let mut j = 0;
            while j < chars.len() {
                let c = chars[j];
                j += 1;
                match short_arg(c) {
                    None => return Err(Usage(format!("invalid option -- '{c}'"))),
                    Some(Arg::None) => opts.push((c, String::new())),
                    Some(Arg::Required) => {
                        if j < chars.len() {
                            opts.push((c, chars[j..].iter().collect()));
                        } else if i < args.len() {
                            opts.push((c, args[i].clone()));
                            i += 1;
                        } else {
                            return Err(Usage(format!("option requires an argument -- '{c}'")));
                        }
                        break;
                    }
                }
            }
            continue;
        }
        pos.push(a.clone());
    }
    Ok((opts, pos))
}

/// Parses an integer as C's `strtol(s, .., 0)` would, whole string only, within `i32`.
fn parse_c_int(s: &str) -> Option<i64> {
    let t = s.trim_start();
    let (neg, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let v = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        i64::from_str_radix(h, 16).ok()?
    } else if t.len() > 1 && t.starts_with('0') {
        i64::from_str_radix(&t[1..], 8).ok()?
    } else {
        t.parse::<i64>().ok()?
    };
    if t.is_empty() || t.starts_with(['+', '-']) {
        return None;
    }
    let v = if neg { -v } else { v };
    (i64::from(i32::MIN)..=i64::from(i32::MAX))
        .contains(&v)
        .then_some(v)
}

/// Parses an unsigned integer as C's `strtoull(s, .., 0)` would, whole string only:
/// leading blanks, a sign (a minus wraps around, as in C), `0x` hex or `0` octal.
fn parse_c_u64(s: &str) -> Option<u64> {
    let t = s.trim_start_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r']);
    let (neg, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let hex = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .filter(|h| h.starts_with(|c: char| c.is_ascii_hexdigit()));
    let (digits, radix) = match hex {
        Some(h) => (h, 16),
        None if t.starts_with('0') => (t, 8),
        None => (t, 10),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let v = u64::from_str_radix(digits, radix).ok()?;
    Some(if neg { v.wrapping_neg() } else { v })
}

/// Stage two: the validated configuration.
#[derive(Debug, Default)]
struct Opts {
    socket: Option<String>,
    bind: Option<String>,
    port: Option<String>,
    export_name: String,
    description: Option<String>,
    read_only: bool,
    shared: u32,
    persistent: bool,
    format: Option<String>,
    bitmaps: Vec<String>,
    allocation_depth: bool,
    load_snapshot: Option<String>,
    snapshot: bool,
    discard: Discard,
    detect_zeroes: DetectZeroes,
    cache: CacheMode,
    handshake_limit: u32,
    /// `-o`: export the image from this byte on (qemu-nbd keeps it as a u64 and only
    /// refuses values above `i64::MAX` once the image is open).
    offset: u64,
    pid_file: Option<String>,
    fork: bool,
    /// `--image-opts`: the image argument is an option string.
    image_opts: bool,
    /// `-L`: list a server's exports instead of serving.
    list: bool,
    help: bool,
    version: bool,
    image: String,
    tls: Option<TlsConfig>,
    /// `--object secret` values by id.
    secrets: Vec<(String, qimg::crypto::Secret)>,
}

/// A failure with qemu-nbd's wording; `usage` adds the "Try --help" hint.
struct Fail {
    msg: String,
    usage: bool,
}

fn fail(msg: impl Into<String>) -> Fail {
    Fail {
        msg: msg.into(),
        usage: false,
    }
}

fn validate(opts: Vec<(char, String)>, pos: Vec<String>) -> Result<Opts, Fail> {
    let mut o = Opts {
        shared: 1,
        handshake_limit: 10,
        ..Opts::default()
    };
    let mut objects: Vec<Object> = Vec::new();
    let (mut tls_creds, mut tls_authz, mut tls_hostname) = (None, None, None);
    let mut connect = false;
    // List mode (-L) is a client: options that describe an export make no sense with it.
    let list = opts.iter().any(|o| o.0 == 'L');
    let per_device = opts.iter().any(|o| {
        matches!(
            o.0,
            'x' | 'D' | 'o' | 'c' | 'd' | 'f' | 'l' | 'B' | 'A' | 'n' | '\u{1}' | '\u{2}' | '\u{3}'
        )
    });
    for (c, v) in opts {
        match c {
            'h' => o.help = true,
            'V' => o.version = true,
            'b' => o.bind = Some(v),
            'p' => o.port = Some(v),
            'k' => o.socket = Some(v),
            'o' => match parse_c_u64(&v) {
                Some(x) => o.offset = x,
                None => return Err(fail(format!("Invalid offset '{v}'"))),
            },
            'r' => o.read_only = true,
            'A' => o.allocation_depth = true,
            'B' => o.bitmaps.push(v),
            // Refused after the loop, where qemu-nbd's TLS check comes first.
            'c' if !list => connect = true,
            'd' if !list => {
                return Err(fail(
                    "the kernel NBD client (-d/--disconnect) is not supported",
                ))
            }
            'L' | 'c' | 'd' => o.list = true,
            's' => o.snapshot = true,
            'l' => {
                o.load_snapshot = Some(v);
                o.read_only = true;
            }
            'n' => o.cache = CacheMode::None,
            '\u{1}' => {
                o.cache = match v.as_str() {
                    "writeback" => CacheMode::Writeback,
                    "writethrough" => CacheMode::Writethrough,
                    "none" | "off" => CacheMode::None,
                    "directsync" => CacheMode::DirectSync,
                    "unsafe" => CacheMode::Unsafe,
                    _ => return Err(fail(format!("Invalid cache mode `{v}'"))),
                }
            }
            '\u{2}' => {
                if !matches!(v.as_str(), "threads" | "native" | "io_uring") {
                    return Err(fail(format!("Invalid aio mode '{v}'")));
                }
            }
            '\u{3}' => {
                o.discard = match v.as_str() {
                    "ignore" | "off" => Discard::Ignore,
                    "unmap" | "on" => Discard::Unmap,
                    _ => return Err(fail(format!("Invalid discard mode `{v}'"))),
                }
            }
            '\u{4}' => {
                o.detect_zeroes = match v.as_str() {
                    "off" => DetectZeroes::Off,
                    "on" => DetectZeroes::On,
                    "unmap" => DetectZeroes::Unmap,
                    _ => {
                        return Err(fail(format!(
                            "Failed to parse detect_zeroes mode: invalid parameter value: {v}"
                        )))
                    }
                }
            }
            'e' => match parse_c_int(&v) {
                Some(n) if n >= 0 => o.shared = n as u32,
                _ => return Err(fail(format!("Invalid shared device number '{v}'"))),
            },
            'f' => o.format = Some(v),
            't' => o.persistent = true,
            'x' => {
                if v.len() > MAX_STRING {
                    return Err(fail(format!("export name '{v}' too long")));
                }
                o.export_name = v;
            }
            'D' => {
                if v.len() > MAX_STRING {
                    return Err(fail(format!("export description '{v}' too long")));
                }
                o.description = Some(v);
            }
            'v' | 'T' => {}
            '\u{5}' => add_object(&mut objects, &v)?,
            '\u{6}' => tls_creds = Some(v),
            '\u{7}' => tls_authz = Some(v),
            '\u{8}' => tls_hostname = Some(v),
            '\u{9}' => o.image_opts = true,
            '\u{a}' => o.fork = true,
            '\u{b}' => o.pid_file = Some(v),
            '\u{c}' => return Err(fail("--selinux-label is not supported")),
            '\u{d}' => match parse_c_int(&v) {
                Some(n) if n >= 0 => o.handshake_limit = n as u32,
                _ => return Err(fail(format!("Invalid handshake limit '{v}'"))),
            },
            _ => return Err(fail("internal option error")),
        }
    }
    if o.help || o.version {
        return Ok(o);
    }
    if connect {
        return Err(fail(if tls_creds.is_some() {
            "TLS is not supported with a host device"
        } else {
            "the kernel NBD client (-c/--connect) is not supported"
        }));
    }
    o.tls = tls_config(&objects, tls_creds, tls_authz, tls_hostname.is_some())?;
    o.secrets = objects
        .iter()
        .filter_map(|ob| match ob {
            Object::Secret { id, secret } => Some((id.clone(), secret.clone())),
            _ => None,
        })
        .collect();
    if list {
        if !pos.is_empty() {
            return Err(fail("List mode is incompatible with a file name"));
        }
        if per_device {
            return Err(fail("List mode is incompatible with per-device settings"));
        }
        if o.fork {
            return Err(fail("List mode is incompatible with forking"));
        }
        return Ok(o);
    }
    if pos.len() != 1 {
        return Err(Fail {
            msg: "Invalid number of arguments".into(),
            usage: true,
        });
    }
    if o.image_opts && o.format.is_some() {
        return Err(fail("--image-opts and -f are mutually exclusive"));
    }
    if o.detect_zeroes == DetectZeroes::Unmap && o.discard != Discard::Unmap {
        return Err(fail(
            "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap",
        ));
    }
    o.image = pos.into_iter().next().unwrap_or_default();
    Ok(o)
}

/// An `--object` the server can use.
#[derive(Debug)]
enum Object {
    /// `tls-creds-x509`: credentials, loaded when the object is created (as QEMU does),
    /// or `None` for a client endpoint, which a server cannot use.
    X509 {
        id: String,
        creds: Option<TlsConfig>,
    },
    /// `authz-simple`: the one client identity allowed in.
    AuthzSimple { id: String, identity: String },
    /// `secret`: a passphrase for an encrypted image (`encrypt.key-secret`).
    Secret {
        id: String,
        secret: qimg::crypto::Secret,
    },
}

impl Object {
    fn id(&self) -> &str {
        match self {
            Object::X509 { id, .. }
            | Object::AuthzSimple { id, .. }
            | Object::Secret { id, .. } => id,
        }
    }
}

/// Splits QEMU's `key=value,...` syntax, where `,,` stands for a literal comma. A first
/// item without `=` is the object type.
fn split_qemu_opts(s: &str) -> Vec<(String, String)> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                items.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    items.push(cur);
    items
        .into_iter()
        .enumerate()
        .filter(|(_, it)| !it.is_empty())
        .map(|(i, it)| match it.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None if i == 0 => ("qom-type".to_string(), it),
            // QemuOpts reads a bare key as "key=on".
            None => (it, "on".to_string()),
        })
        .collect()
}

/// A QEMU boolean property: QEMU also takes yes/true/y and no/false/n (case matters).
fn parse_on_off(key: &str, v: &str) -> Result<bool, Fail> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(fail(format!("Parameter '{key}' expects 'on' or 'off'"))),
    }
}

/// Creates one `--object`, with qemu-nbd's messages for what it would refuse, and ours
/// for what QEMU accepts but this server cannot do.
fn add_object(objects: &mut Vec<Object>, spec: &str) -> Result<(), Fail> {
    let props = split_qemu_opts(spec);
    let get = |k: &str| props.iter().rev().find(|(key, _)| key == k).map(|(_, v)| v);
    let typ = get("qom-type")
        .cloned()
        .ok_or_else(|| fail("Parameter 'qom-type' is missing"))?;
    let allowed: &[&str] = match typ.as_str() {
        "tls-creds-x509" => &[
            "qom-type",
            "id",
            "endpoint",
            "dir",
            "verify-peer",
            "priority",
            "sanity-check",
            "loaded",
            "passwordid",
        ],
        "authz-simple" => &["qom-type", "id", "identity"],
        "secret" => &["qom-type", "id", "data", "file", "format"],
        "tls-creds-psk" => {
            return Err(fail(
                "--object tls-creds-psk is not supported: the TLS library (rustls) has no \
                 TLS-PSK; use tls-creds-x509",
            ))
        }
        "tls-creds-anon" => {
            return Err(fail(
                "--object tls-creds-anon is not supported: the TLS library (rustls) has no \
                 anonymous TLS; use tls-creds-x509",
            ))
        }
        "secret_keyring" | "authz-list" | "authz-listfile" | "authz-pam" | "tls-cipher-suites"
        | "throttle-group" | "iothread" => {
            return Err(fail(format!("--object {typ} is not supported")))
        }
        _ => {
            return Err(fail(format!(
                "Parameter 'qom-type' does not accept value '{typ}'"
            )))
        }
    };
    if let Some((k, _)) = props.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
        return Err(fail(format!("Parameter '{k}' is unexpected")));
    }
    let id = get("id")
        .cloned()
        .ok_or_else(|| fail("Parameter 'id' is missing"))?;
    if objects.iter().any(|o| o.id() == id) {
        return Err(fail(format!(
            "attempt to add duplicate property '{id}' to object (type 'container')"
        )));
    }
    let obj = match typ.as_str() {
        "secret" => Object::Secret {
            secret: qimg::crypto::Secret::from_object(
                get("data").map(String::as_str),
                get("file").map(String::as_str),
                get("format").map(String::as_str),
            )
            .map_err(fail)?,
            id,
        },
        "authz-simple" => Object::AuthzSimple {
            identity: get("identity")
                .cloned()
                .ok_or_else(|| fail("Parameter 'identity' is missing"))?,
            id,
        },
        _ => {
            let server = match get("endpoint").map(String::as_str) {
                None | Some("client") => false,
                Some("server") => true,
                Some(e) => {
                    return Err(fail(format!(
                        "Parameter 'endpoint' does not accept value '{e}'"
                    )))
                }
            };
            let verify_peer = match get("verify-peer") {
                Some(v) => parse_on_off("verify-peer", v)?,
                None => true,
            };
            for k in ["sanity-check", "loaded"] {
                if let Some(v) = get(k) {
                    parse_on_off(k, v)?;
                }
            }
            // A GnuTLS priority string or an encrypted key have no rustls equivalent;
            // ignoring them would silently weaken or change the set-up.
            for k in ["priority", "passwordid"] {
                if get(k).is_some() {
                    return Err(fail(format!(
                        "tls-creds-x509 property '{k}' is not supported"
                    )));
                }
            }
            let dir = get("dir").ok_or_else(|| fail("Missing 'dir' property value"))?;
            let creds = if server {
                Some(TlsConfig::from_dir(Path::new(dir), verify_peer).map_err(|e| fail(e.0))?)
            } else {
                None
            };
            Object::X509 { id, creds }
        }
    };
    objects.push(obj);
    Ok(())
}

/// Resolves `--tls-creds`, `--tls-authz` and `--tls-hostname` against the objects.
fn tls_config(
    objects: &[Object],
    creds: Option<String>,
    authz: Option<String>,
    hostname: bool,
) -> Result<Option<TlsConfig>, Fail> {
    if hostname {
        // qemu-nbd takes a hostname only to check the server's certificate in list mode
        // (-L), which is a client feature this server does not have.
        return Err(fail("TLS hostname is only supported with export list"));
    }
    let Some(creds) = creds else {
        if authz.is_some() {
            return Err(fail("--tls-authz is not permitted without --tls-creds"));
        }
        return Ok(None);
    };
    let mut tls = match objects.iter().find(|o| o.id() == creds) {
        Some(Object::X509 { creds: Some(c), .. }) => c.clone(),
        Some(Object::X509 { creds: None, .. }) => {
            return Err(fail(
                "Failed to get TLS creds: Expected TLS credentials for a server endpoint",
            ))
        }
        Some(_) => {
            return Err(fail(format!(
                "Failed to get TLS creds: Object with id '{creds}' is not TLS credentials"
            )))
        }
        None => {
            return Err(fail(format!(
                "Failed to get TLS creds: No TLS credentials with id '{creds}'"
            )))
        }
    };
    if let Some(a) = authz {
        // qemu-nbd looks the object up per connection and so refuses every client when
        // the id is wrong; refusing to start says the same thing sooner.
        match objects.iter().find(|o| o.id() == a) {
            Some(Object::AuthzSimple { identity, .. }) => tls = tls.with_authz(identity.clone()),
            Some(_) => {
                return Err(fail(format!(
                    "Object with id '{a}' is not an authorization object"
                )))
            }
            None => return Err(fail(format!("Cannot find QAuthZ object ID {a}"))),
        }
    }
    Ok(Some(tls))
}

fn help(prog: &str) -> String {
    format!(
        "Usage: {prog} [OPTIONS] FILE
Serve a disk image over NBD (a drop-in for qemu-nbd, built on qimg).

  -h, --help                display this help and exit
  -V, --version             output version information and exit

  -L, --list                list exports available from another NBD server

Connection properties:
  -p, --port=PORT           port to listen on (default `{DEFAULT_PORT}')
  -b, --bind=IFACE          interface to bind to (default `{DEFAULT_BIND}';
                            qemu-nbd binds 0.0.0.0)
  -k, --socket=PATH         path to the unix socket
  -e, --shared=NUM          device can be shared by NUM clients (default '1',
                            0 = unlimited)
  -t, --persistent          don't exit on the last connection
  -v, --verbose             accepted for compatibility
  -x, --export-name=NAME    expose export by name (default is empty string)
  -D, --description=TEXT    export a human-readable description
      --handshake-limit=N   limit client's handshake to N seconds (default 10)

Exposing part of the image:
  -o, --offset=OFFSET       offset into the image
  -A, --allocation-depth    expose the allocation depth
  -B, --bitmap=NAME         expose a persistent dirty bitmap

TLS (clients must negotiate TLS before anything else):
      --object tls-creds-x509,id=ID,endpoint=server,dir=DIR[,verify-peer=on|off]
                            TLS credentials: DIR holds ca-cert.pem,
                            server-cert.pem and server-key.pem; with
                            verify-peer=on (the default) clients must present a
                            certificate signed by the CA
      --object authz-simple,id=ID,identity=DN
                            allow only the client certificate whose subject is
                            DN, written in certificate order, e.g.
                            C=GB,,O=Example,,CN=client (',,' is a comma)
      --tls-creds=ID        use the tls-creds-x509 object ID
      --tls-authz=ID        use the authz-simple object ID (as in qemu-nbd, it is
                            only checked with verify-peer=on)
      tls-creds-psk, --tls-hostname and the priority property are not supported

General purpose options:
  -T, --trace ...           accepted for compatibility
      --fork                fork off the server process and exit the parent
                            once the server is running
      --pid-file=PATH       store the server's process ID in the given file

Block device options:
      --image-opts          treat FILE as a full set of image options
                            (driver=qcow2|raw|file, file.filename, ...)
  -f, --format=FORMAT       set image format (raw, qcow2)
  -r, --read-only           export read-only
  -s, --snapshot            use FILE as a backing file; writes go to a
                            temporary overlay and are discarded at exit
  -l, --load-snapshot=SNAPSHOT_PARAM
                            load an internal snapshot inside FILE
  -n, --nocache             disable host cache
      --cache=MODE          'none', 'writeback' (default), 'writethrough',
                            'directsync' or 'unsafe'
      --aio=MODE            accepted for compatibility (threads are used)
      --discard=MODE        set discard mode (ignore, unmap)
      --detect-zeroes=MODE  set detect-zeroes mode (off, on, unmap)
"
    )
}

/// Strips Rust's " (os error N)" suffix so messages read like QEMU's `strerror` ones.
fn qemu_msg(e: impl std::fmt::Display) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) if s.ends_with(')') => s[..i].to_string(),
        _ => s,
    }
}

/// Where SIGTERM/SIGINT/SIGHUP write their shutdown byte (the server's wake pipe).
static SIGNAL_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(_sig: libc::c_int) {
    let fd = SIGNAL_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let b = b'S';
        // SAFETY: write(2) is async-signal-safe; the buffer is a local byte.
        unsafe {
            libc::write(fd, (&b as *const u8).cast(), 1);
        }
    }
}

fn install_signal_handlers(fd: i32) {
    SIGNAL_FD.store(fd, Ordering::SeqCst);
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: installing a handler that only performs an async-signal-safe write.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Forks: the parent exits 0 (the server is already listening), the child detaches and
/// carries on with stdio on /dev/null, as `qemu-nbd --fork` behaves.
fn daemonize() -> Result<(), String> {
    // SAFETY: no other threads exist yet (the server has not started), so fork is sound.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(qemu_msg(std::io::Error::last_os_error()));
    }
    if pid > 0 {
        std::process::exit(0);
    }
    // SAFETY: plain syscalls on descriptors we own in the child.
    unsafe {
        libc::setsid();
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::dup2(null, 1);
            libc::dup2(null, 2);
            if null > 2 {
                libc::close(null);
            }
        }
    }
    Ok(())
}

/// Entry point of `qimg-nbd` (and of a `qemu-nbd` compatible front end): `prog` is the
/// name used in messages, `args` the arguments after it. Returns the exit status.
pub fn main_serve(prog: &str, args: &[String]) -> i32 {
    let (opts, pos) = match getopt(args) {
        Ok(v) => v,
        Err(Usage(m)) => {
            eprintln!("{prog}: {m}\n{prog}: Try `{prog} --help' for more information.");
            return 1;
        }
    };
    let o = match validate(opts, pos) {
        Ok(o) => o,
        Err(f) => {
            eprintln!("{prog}: {}", f.msg);
            if f.usage {
                eprintln!("Try `{prog} --help' for more information.");
            }
            return 1;
        }
    };
    if o.help {
        print!("{}", help(prog));
        return 0;
    }
    if o.version {
        println!("{prog} {}", env!("CARGO_PKG_VERSION"));
        return 0;
    }
    if o.list {
        // qemu-nbd connects to 0.0.0.0 by default here (Linux treats it as this host).
        let port = o.port.clone().unwrap_or_else(|| DEFAULT_PORT.to_string());
        let host = o.bind.as_deref().unwrap_or("0.0.0.0");
        return crate::client::main_list(prog, o.socket.as_deref(), host, &port);
    }
    match run(prog, &o) {
        Ok(()) => 0,
        Err(msg) => {
            eprintln!("{prog}: {msg}");
            1
        }
    }
}

fn run(prog: &str, o: &Opts) -> Result<(), String> {
    // With -s the image is only read; writes go to a temporary overlay.
    // An internal snapshot is exported read-only, as qemu-nbd does.
    let writable = !o.read_only && !o.snapshot && o.load_snapshot.is_none();
    // With --image-opts the argument names the file and format in an option string.
    let spec = if o.image_opts {
        Some(
            crate::imageopts::parse(&o.image, o.read_only)
                .map_err(|m| format!("Failed to blk_new_open '{}': {m}", o.image))?,
        )
    } else {
        None
    };
    let (file, format) = match &spec {
        Some(s) => (s.filename.as_str(), s.format.clone()),
        None => (o.image.as_str(), o.format.clone()),
    };
    let path = Path::new(file);
    let snapshot = o.load_snapshot.as_ref().map(|spec| {
        if spec.starts_with("snapshot.") {
            let mut id = None;
            let mut name = None;
            for part in spec.split(',') {
                if let Some(v) = part.strip_prefix("snapshot.id=") {
                    id = Some(v.to_string());
                } else if let Some(v) = part.strip_prefix("snapshot.name=") {
                    name = Some(v.to_string());
                }
            }
            qimg::open::SnapshotSel::Exact { id, name }
        } else {
            qimg::open::SnapshotSel::IdOrName(spec.clone())
        }
    });
    let key = match spec.as_ref().and_then(|s| s.key_secret.as_deref()) {
        Some(id) => Some(
            o.secrets
                .iter()
                .find(|(i, _)| i == id)
                .map(|(_, s)| s.clone())
                .ok_or_else(|| {
                    format!(
                        "Failed to blk_new_open '{}': No secret with id '{id}'",
                        o.image
                    )
                })?,
        ),
        None => None,
    };
    let open_opts = OpenOptions {
        format: format.clone(),
        writable,
        force_share: spec.as_ref().is_some_and(|s| s.force_share),
        snapshot: snapshot.clone(),
        encrypt: qimg::crypto::EncryptOptions {
            format: spec.as_ref().and_then(|s| s.encrypt_format.clone()),
            key,
        },
        ..OpenOptions::default()
    };
    if snapshot.is_some() {
        // Probe first so that a format without snapshots gets QEMU's message.
        let probe_opts = OpenOptions {
            format: format.clone(),
            force_share: true,
            no_backing: true,
            ..OpenOptions::default()
        };
        if let Ok(img) = open_image(path, &probe_opts) {
            if img.as_any().downcast_ref::<qimg::qcow2::Qcow2>().is_none() {
                return Err(format!(
                    "Failed to load snapshot: Block format '{}' used by device '' does not support temporarily loading internal snapshots",
                    img.format_name()
                ));
            }
        }
    }
    let image: Arc<dyn Image> = open_image(path, &open_opts).map_err(|e| match e {
        qimg::Error::NotFound(m) if snapshot.is_some() => m,
        e => format!("Failed to blk_new_open '{}': {}", o.image, qemu_msg(e)),
    })?;
    // The raw driver's `offset` option (--image-opts) sits right on the file.
    let image: Arc<dyn Image> = match spec.as_ref().and_then(|s| s.offset) {
        Some(off) => Arc::new(
            crate::offset::OffsetImage::new(image, off)
                .map_err(|m| format!("Failed to blk_new_open '{}': {m}", o.image))?,
        ),
        None => image,
    };
    if format.is_none() && image.format_name() == "raw" {
        eprintln!(
            "WARNING: Image format was not specified for '{}' and probing guessed raw.\n         \
             Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         \
             Specify the 'raw' format explicitly to remove the restrictions.",
            file
        );
    }
    // qemu-nbd checks the offset once the image is open, against its (sector-rounded)
    // size; values above i64::MAX are refused as the signed option they become.
    if o.offset != 0 {
        if o.offset > i64::MAX as u64 {
            return Err(format!(
                "Value '{}' is out of range for parameter 'offset'",
                o.offset as i64
            ));
        }
        crate::offset::OffsetImage::new(image.clone(), o.offset)?;
        // The offset node qemu-nbd stacks on top hides the image's bitmaps.
        if let Some(b) = o.bitmaps.first() {
            return Err(format!("Bitmap '{b}' is not found"));
        }
    }
    // Bitmaps are looked up in the image itself (below any `-s` overlay), and refused
    // with qemu-nbd's messages when missing or inconsistent.
    let mut bitmap_contexts: Vec<Arc<dyn crate::meta::MetaContext>> = Vec::new();
    for b in &o.bitmaps {
        bitmap_contexts.push(Arc::new(crate::meta::DirtyBitmap::new(image.clone(), b)?));
    }

    let mut socket_path: Option<PathBuf> = None;
    let listener: Listener = if let Some(sock) = &o.socket {
        let p = PathBuf::from(sock);
        // Like QEMU, replace a stale socket left behind by an earlier server.
        if let Ok(md) = std::fs::symlink_metadata(&p) {
            use std::os::unix::fs::FileTypeExt;
            if md.file_type().is_socket() {
                let _ = std::fs::remove_file(&p);
            }
        }
        let l = UnixListener::bind(&p)
            .map_err(|e| format!("Failed to bind socket to {sock}: {}", qemu_msg(e)))?;
        socket_path = Some(p);
        l.into()
    } else {
        let bind = o.bind.as_deref().unwrap_or(DEFAULT_BIND);
        let port_s = o.port.clone().unwrap_or_else(|| DEFAULT_PORT.to_string());
        let port: u16 = port_s.parse().map_err(|_| {
            format!(
                "address resolution failed for {bind}:{port_s}: Servname not supported for ai_socktype"
            )
        })?;
        let host = bind.trim_start_matches('[').trim_end_matches(']');
        let addrs: Vec<_> = (host, port)
            .to_socket_addrs()
            .map_err(|e| {
                format!(
                    "address resolution failed for {bind}:{port_s}: {}",
                    qemu_msg(e)
                )
            })?
            .collect();
        let l = TcpListener::bind(&addrs[..])
            .map_err(|e| format!("Failed to find an available port: {}", qemu_msg(e)))?;
        l.into()
    };

    let image: Arc<dyn Image> = if o.snapshot {
        // QEMU puts its temporary overlay in $TMPDIR (default /var/tmp).
        let dir = std::env::var_os("TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/tmp"));
        Arc::new(
            crate::overlay::Overlay::new(image, &dir)
                .map_err(|e| format!("Could not create temporary overlay: {}", qemu_msg(e)))?,
        )
    } else {
        image
    };
    let image: Arc<dyn Image> = if o.offset != 0 {
        Arc::new(crate::offset::OffsetImage::new(image, o.offset)?)
    } else {
        image
    };
    let mut export = Export::new(o.export_name.clone(), image);
    export.description = o.description.clone();
    export.read_only = o.read_only;
    export.allocation_depth = o.allocation_depth;
    export.bitmaps = bitmap_contexts;
    let config = ServerConfig {
        max_connections: o.shared,
        persistent: o.persistent,
        handshake_limit: (o.handshake_limit > 0)
            .then(|| Duration::from_secs(u64::from(o.handshake_limit))),
        discard: o.discard,
        detect_zeroes: o.detect_zeroes,
        cache: o.cache,
        // Benchmarks compare pool sizes through this variable; qemu-nbd has no such knob.
        workers_per_connection: std::env::var("QIMG_NBD_WORKERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(16),
        log_prefix: Some(prog.to_string()),
        tls: o.tls.clone(),
    };
    let server = Server::new(vec![export], config).map_err(|e| e.to_string())?;

    if o.fork {
        daemonize()?;
    }
    if let Some(pf) = &o.pid_file {
        std::fs::write(pf, format!("{}\n", std::process::id()))
            .map_err(|e| format!("Failed to write pid file '{pf}': {}", qemu_msg(e)))?;
    }
    install_signal_handlers(server.shutdown_handle().signal_fd());
    let res = server.serve(listener);
    if let Some(p) = socket_path {
        let _ = std::fs::remove_file(p);
    }
    if let Some(pf) = &o.pid_file {
        let _ = std::fs::remove_file(pf);
    }
    res.map_err(|e| format!("server failed: {}", qemu_msg(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(a: &[&str]) -> Result<Opts, String> {
        let args: Vec<String> = a.iter().map(|s| s.to_string()).collect();
        let (o, p) = getopt(&args).map_err(|u| u.0)?;
        validate(o, p).map_err(|f| f.msg)
    }

    #[test]
    fn qemu_opts_syntax() {
        assert!(parse_on_off("k", "y").is_ok_and(|b| b));
        assert!(parse_on_off("k", "false").is_ok_and(|b| !b));
        assert!(parse_on_off("k", "ON").is_err());
        let kv = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        assert_eq!(
            split_qemu_opts("authz-simple,id=a,identity=C=GB,,O=x,,CN=y"),
            kv(&[
                ("qom-type", "authz-simple"),
                ("id", "a"),
                ("identity", "C=GB,O=x,CN=y")
            ])
        );
        assert_eq!(
            split_qemu_opts("qom-type=secret,id=s,,x,flag"),
            kv(&[("qom-type", "secret"), ("id", "s,x"), ("flag", "on")])
        );
        assert!(parse(&[
            "--object",
            "authz-simple,id=a,identity=CN=x",
            "--tls-authz=a",
            "i"
        ])
        .unwrap_err()
        .contains("not permitted without --tls-creds"));
        assert!(parse(&[
            "--object",
            "authz-simple,id=a,identity=x",
            "--tls-creds=a",
            "--tls-authz=a",
            "i"
        ])
        .unwrap_err()
        .contains("is not TLS credentials"));
    }

    #[test]
    fn getopt_semantics() {
        let o = parse(&["-rtk", "/s", "img", "--shared=4", "--persist", "-x", "e"]).unwrap();
        assert!(o.read_only && o.persistent);
        assert_eq!(o.socket.as_deref(), Some("/s"));
        assert_eq!(o.shared, 4);
        assert_eq!(o.image, "img");
        assert_eq!(o.export_name, "e");
        assert_eq!(parse(&["-p10", "i"]).unwrap().port.as_deref(), Some("10"));
        assert_eq!(parse(&["--", "-x"]).unwrap().image, "-x");
    }

    #[test]
    fn usage_errors_match_qemu_nbd() {
        assert_eq!(parse(&[]).err().unwrap(), "Invalid number of arguments");
        assert_eq!(
            parse(&["a", "b"]).err().unwrap(),
            "Invalid number of arguments"
        );
        assert_eq!(
            parse(&["--bogus"]).err().unwrap(),
            "unrecognized option '--bogus'"
        );
        assert_eq!(parse(&["-Z"]).err().unwrap(), "invalid option -- 'Z'");
        assert_eq!(
            parse(&["-k"]).err().unwrap(),
            "option requires an argument -- 'k'"
        );
        assert_eq!(
            parse(&["--cache"]).err().unwrap(),
            "option '--cache' requires an argument"
        );
        assert_eq!(
            parse(&["-e", "-1", "i"]).err().unwrap(),
            "Invalid shared device number '-1'"
        );
        assert_eq!(
            parse(&["-e", "2147483648", "i"]).err().unwrap(),
            "Invalid shared device number '2147483648'"
        );
        assert_eq!(parse(&["-e", "0x5", "i"]).unwrap().shared, 5);
        assert_eq!(
            parse(&["--discard=bad", "i"]).err().unwrap(),
            "Invalid discard mode `bad'"
        );
        assert_eq!(
            parse(&["--detect-zeroes=unmap", "i"]).err().unwrap(),
            "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap"
        );
        assert_eq!(
            parse(&["--handshake-limit=x", "i"]).err().unwrap(),
            "Invalid handshake limit 'x'"
        );
        assert_eq!(
            parse(&["--cache=bad", "i"]).err().unwrap(),
            "Invalid cache mode `bad'"
        );
        let long = "a".repeat(5000);
        assert_eq!(
            parse(&["-x", &long, "i"]).err().unwrap(),
            format!("export name '{long}' too long")
        );
    }

    #[test]
    fn offsets_parse_like_strtoull() {
        assert_eq!(parse_c_u64("4096"), Some(4096));
        assert_eq!(parse_c_u64(" +0x10"), Some(16));
        assert_eq!(parse_c_u64("010"), Some(8));
        assert_eq!(parse_c_u64("-1"), Some(u64::MAX));
        assert_eq!(parse_c_u64("-18446744073709551615"), Some(1));
        for bad in ["", "0x", "08", "1k", "1 ", "-", "18446744073709551616"] {
            assert_eq!(parse_c_u64(bad), None, "{bad:?}");
        }
        assert_eq!(parse(&["-o", "0x200", "i"]).unwrap().offset, 512);
        assert_eq!(
            parse(&["-o", "2M", "i"]).err().unwrap(),
            "Invalid offset '2M'"
        );
    }

    #[test]
    fn list_mode_validation() {
        assert!(parse(&["-L", "-r", "-s", "-t"]).unwrap().list);
        assert_eq!(
            parse(&["-L", "img"]).err().unwrap(),
            "List mode is incompatible with a file name"
        );
        for opt in [
            &["-x", "e"][..],
            &["-d"],
            &["-c", "/dev/nbd0"],
            &["--aio=threads"],
        ] {
            let mut a = vec!["-L"];
            a.extend_from_slice(opt);
            assert_eq!(
                parse(&a).err().unwrap(),
                "List mode is incompatible with per-device settings"
            );
        }
        assert_eq!(
            parse(&["-L", "--fork"]).err().unwrap(),
            "List mode is incompatible with forking"
        );
    }

    #[test]
    fn c_integers() {
        assert_eq!(parse_c_int("010"), Some(8));
        assert_eq!(parse_c_int("0x1f"), Some(31));
        assert_eq!(parse_c_int("-3"), Some(-3));
        assert_eq!(parse_c_int(""), None);
        assert_eq!(parse_c_int("1x"), None);
        assert_eq!(parse_c_int("0"), Some(0));
    }
}
