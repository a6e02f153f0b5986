//! `--object secret,...` definitions and the `encrypt.*` options of `--image-opts`.
//!
//! QEMU's objects live in one process-wide tree, created before any image is opened and
//! looked up by id when an image names them; this module keeps them the same way so a
//! command only has to register its `--object` arguments and open its images.

use crate::ctx::Ctx;
use qimg::crypto::{EncryptOptions, Secret};
use std::collections::HashMap;
use std::sync::Mutex;

static SECRETS: Mutex<Option<HashMap<String, Secret>>> = Mutex::new(None);

/// What `--image-opts` said about an encrypted image: the whole specification (QEMU names
/// the image by it in messages), `encrypt.format`, `encrypt.key-secret`.
type EncryptSpec = (String, Option<String>, Option<String>);

/// `encrypt.*` options given with `--image-opts`, by the file name they came with.
static ENCRYPT: Mutex<Option<HashMap<String, EncryptSpec>>> = Mutex::new(None);

/// Object types qemu-img accepts that qimg has no use for (they are ignored).
const OTHER_TYPES: &[&str] = &[
    "authz-list",
    "authz-listfile",
    "authz-pam",
    "authz-simple",
    "iothread",
    "secret_keyring",
    "throttle-group",
    "tls-cipher-suites",
    "tls-creds-anon",
    "tls-creds-psk",
    "tls-creds-x509",
];

fn parse_secret(def: &str) -> Result<Option<(String, Secret)>, String> {
    let (qom_type, rest) = match def.split_once(',') {
        Some((t, r)) if !t.contains('=') => (Some(t.to_string()), r),
        None if !def.contains('=') => (Some(def.to_string()), ""),
        _ => (None, def),
    };
    let mut qom_type = qom_type;
    let mut id = None;
    let mut data = None;
    let mut file = None;
    let mut format = None;
    let pairs = crate::opts::parse_pairs(rest);
    for (k, v) in &pairs {
        if k == "qom-type" {
            qom_type = Some(v.clone());
        }
    }
    let qom_type = qom_type.ok_or("Parameter 'qom-type' is missing")?;
    if qom_type != "secret" {
        if OTHER_TYPES.contains(&qom_type.as_str()) {
            return Ok(None);
        }
        return Err(format!(
            "Parameter 'qom-type' does not accept value '{qom_type}'"
        ));
    }
    for (k, v) in pairs {
        match k.as_str() {
            "qom-type" => {}
            "id" => id = Some(v),
            "data" => data = Some(v),
            "file" => file = Some(v),
            "format" => format = Some(v),
            "keyid" | "iv" => {
                return Err(
                    "secrets encrypted with another secret (keyid, iv) are not supported by qimg"
                        .into(),
                )
            }
            other => return Err(format!("Parameter '{other}' is unexpected")),
        }
    }
    let id = id.ok_or("Parameter 'id' is missing")?;
    let secret = Secret::from_object(data.as_deref(), file.as_deref(), format.as_deref())?;
    Ok(Some((id, secret)))
}

/// Creates the objects of `--object` arguments, reporting the first bad one as qemu-img
/// does (exit code 1).
pub fn register(ctx: &Ctx, defs: &[String]) -> Result<(), i32> {
    let mut g = SECRETS.lock().unwrap();
    let map = g.get_or_insert_with(HashMap::new);
    for def in defs {
        match parse_secret(def) {
            Ok(Some((id, s))) => {
                if map.contains_key(&id) {
                    ctx.error(&format!(
                        "attempt to add duplicate property '{id}' to object (type 'container')"
                    ));
                    return Err(1);
                }
                map.insert(id, s);
            }
            Ok(None) => {}
            Err(m) => {
                ctx.error(&m);
                return Err(1);
            }
        }
    }
    Ok(())
}

/// Records the `encrypt.format` / `encrypt.key-secret` options given for `filename`.
pub fn set_image_encrypt(
    filename: &str,
    spec: &str,
    format: Option<String>,
    key_secret: Option<String>,
) {
    let mut g = ENCRYPT.lock().unwrap();
    g.get_or_insert_with(HashMap::new)
        .insert(filename.to_string(), (spec.to_string(), format, key_secret));
}

/// How qemu-img names `filename` in messages: the `--image-opts` specification it came
/// from when that carried encryption options, else the name itself.
pub fn display_name(filename: &str) -> String {
    ENCRYPT
        .lock()
        .unwrap()
        .as_ref()
        .and_then(|m| m.get(filename).map(|s| s.0.clone()))
        .unwrap_or_else(|| filename.to_string())
}

/// The name QEMU gives an image opened with `encrypt.key-secret` (`json:{...}`, since the
/// option cannot be expressed by a plain file name), if `filename` came with one.
pub fn json_filename(filename: &str) -> Option<String> {
    let spec = ENCRYPT
        .lock()
        .unwrap()
        .as_ref()
        .and_then(|m| m.get(filename).cloned())?;
    // QEMU leaves encrypt.format out of the name: only the key's id counts.
    let key = spec.2?;
    let mut m = serde_json::Map::new();
    m.insert("driver".into(), "qcow2".into());
    m.insert("encrypt.key-secret".into(), key.into());
    m.insert(
        "file".into(),
        serde_json::json!({"driver": "file", "filename": filename}),
    );
    Some(format!(
        "json:{}",
        crate::fmt::to_json(&serde_json::Value::Object(m), false)
    ))
}

/// Looks up a secret by id (QEMU's "No secret with id" when absent).
pub fn secret(id: &str) -> Result<Secret, String> {
    SECRETS
        .lock()
        .unwrap()
        .as_ref()
        .and_then(|m| m.get(id).cloned())
        .ok_or_else(|| format!("No secret with id '{id}'"))
}

/// The encryption options to open `filename` with, from its `--image-opts`.
/// With `no_io` (`info`), an unknown secret is no error: QEMU does not look the key up
/// when it will do no I/O.
pub fn encrypt_options(filename: &str, no_io: bool) -> Result<EncryptOptions, String> {
    let spec = ENCRYPT
        .lock()
        .unwrap()
        .as_ref()
        .and_then(|m| m.get(filename).cloned());
    let Some((_, format, key_secret)) = spec else {
        return Ok(EncryptOptions::default());
    };
    let key = match key_secret.as_deref().map(secret).transpose() {
        Err(_) if no_io => None,
        r => r?,
    };
    Ok(EncryptOptions { format, key })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_definitions() {
        let (id, s) = parse_secret("secret,id=a,data=x,,y").unwrap().unwrap();
        assert_eq!((id.as_str(), s.bytes()), ("a", &b"x,y"[..]));
        let (_, s) = parse_secret("secret,id=a,data=YWJj,format=base64")
            .unwrap()
            .unwrap();
        assert_eq!(s.bytes(), b"abc");
        assert_eq!(
            parse_secret("secret,data=abc").unwrap_err(),
            "Parameter 'id' is missing"
        );
        assert!(parse_secret("tls-creds-x509,id=t,dir=/x")
            .unwrap()
            .is_none());
        assert_eq!(
            parse_secret("foo,id=x").unwrap_err(),
            "Parameter 'qom-type' does not accept value 'foo'"
        );
    }
}
