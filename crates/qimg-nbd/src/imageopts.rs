//! `--image-opts`: the image argument as a block-layer option string
//! (`driver=qcow2,file.filename=disk.qcow2`), reduced to what qimg can open.
//!
//! Only options with an equivalent here are accepted; anything else is refused with
//! QEMU's "does not support the option" message rather than silently ignored, so a
//! command line that relies on an option qimg cannot honour fails loudly.

/// An image described by an option string.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ImageSpec {
    /// The file to open.
    pub filename: String,
    /// The format (`None`: probe).
    pub format: Option<String>,
    /// `force-share=on`: open without taking QEMU's locks against other writers.
    pub force_share: bool,
    /// The raw driver's `offset`: the disk starts this far into the file.
    pub offset: Option<u64>,
    /// qcow2's `encrypt.key-secret`: the id of the `--object secret` with the key.
    pub key_secret: Option<String>,
    /// qcow2's `encrypt.format`, checked against the image's header.
    pub encrypt_format: Option<String>,
}

/// Splits `a=b,c=d` into pairs; `,,` stands for a literal comma (QEMU's escaping).
fn split(spec: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut it = spec.chars().peekable();
    while let Some(c) = it.next() {
        if c == ',' {
            if it.peek() == Some(&',') {
                it.next();
                if let Some(p) = parts.last_mut() {
                    p.push(',');
                }
            } else {
                parts.push(String::new());
            }
        } else if let Some(p) = parts.last_mut() {
            p.push(c);
        }
    }
    parts
}

/// A QEMU size (`4096`, `0x1000`, `64k`, `1M`...): `Ok(None)` for a negative number
/// (QEMU then reports the value as out of range), `Err` for anything unreadable.
fn parse_size(v: &str) -> Result<Option<u64>, ()> {
    let t = v.trim_start();
    if let Some(n) = t.strip_prefix('-') {
        return if !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()) {
            Ok(None)
        } else {
            Err(())
        };
    }
    if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return u64::from_str_radix(h, 16).map(Some).map_err(|_| ());
    }
    let end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(end);
    let n: u64 = num.parse().map_err(|_| ())?;
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return Err(()),
    };
    n.checked_mul(1u64 << shift).map(Some).ok_or(())
}

fn on_off(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(format!("Parameter '{key}' expects 'on' or 'off'")),
    }
}

/// Parses `spec` for an export opened read-only (`-r`) or not. Errors are QEMU's
/// messages, without the "Failed to blk_new_open" prefix.
pub fn parse(spec: &str, read_only_flag: bool) -> Result<ImageSpec, String> {
    let parts = split(spec);
    // QEMU reads a leading bare word as the name of an existing block device.
    if let Some(first) = parts.first().filter(|p| !p.contains('=')) {
        if parts.len() > 1 {
            return Err(
                "Cannot reference an existing block device with additional options or a new filename"
                    .into(),
            );
        }
        return Err(format!(
            "Cannot find device='{first}' nor node-name='{first}'"
        ));
    }
    let mut pairs: Vec<(String, String)> = Vec::new();
    for p in parts {
        match p.split_once('=') {
            Some((k, v)) => pairs.push((k.to_string(), v.to_string())),
            None => pairs.push((p, "on".to_string())),
        }
    }
    // The last of repeated keys wins, as in QEMU's option parser.
    let get = |k: &str| pairs.iter().rev().find(|p| p.0 == k).map(|p| p.1.as_str());
    let driver = get("driver");
    let mut out = ImageSpec::default();
    let protocol_only = match driver {
        None => false,
        Some("qcow2") | Some("raw") => {
            out.format = driver.map(str::to_string);
            false
        }
        Some("file") => {
            out.format = Some("raw".into());
            true
        }
        Some(d) => return Err(format!("Unknown driver '{d}'")),
    };
    let mut read_only = read_only_flag;
    let mut offset = None;
    for (k, v) in &pairs {
        match k.as_str() {
            "driver" => {}
            "filename" if protocol_only => out.filename = v.clone(),
            "file.filename" if !protocol_only => out.filename = v.clone(),
            "file.driver" if !protocol_only => {
                if v != "file" {
                    return Err(format!("Unknown protocol driver '{v}'"));
                }
            }
            // Accepted without effect: qimg does its own caching and locking choices.
            "file.locking" | "file.aio" | "locking" | "aio" | "cache.direct"
            | "cache.no-flush" | "auto-read-only" => {}
            "read-only" => {
                if on_off(k, v)? && !read_only_flag {
                    return Err("Block node is read-only".into());
                }
                read_only |= on_off(k, v)?;
            }
            "force-share" => out.force_share = on_off(k, v)?,
            "encrypt.key-secret" if driver == Some("qcow2") => out.key_secret = Some(v.clone()),
            "encrypt.format" if driver == Some("qcow2") => out.encrypt_format = Some(v.clone()),
            "offset" if driver == Some("raw") => {
                offset = Some(match parse_size(v) {
                    Ok(Some(n)) if n <= i64::MAX as u64 => n,
                    Ok(_) => {
                        return Err(format!("Value '{v}' is out of range for parameter 'offset'"))
                    }
                    Err(()) => {
                        return Err("Parameter 'offset' expects a non-negative number below 2^64\n\
                             Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
                             and exabytes, respectively."
                            .into())
                    }
                })
            }
            other if protocol_only => {
                return Err(format!(
                    "Block protocol 'file' doesn't support the option '{other}'"
                ))
            }
            other => {
                return Err(format!(
                    "Block format '{}' does not support the option '{other}'",
                    driver.unwrap_or("raw")
                ))
            }
        }
    }
    if out.force_share && !read_only {
        return Err("force-share=on can only be used with read-only images".into());
    }
    if out.filename.is_empty() {
        return Err("A block device must be specified for \"file\"".into());
    }
    out.offset = offset.filter(|&o| o != 0);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        let s = parse("driver=qcow2,file.filename=a,,b.qcow2", false).unwrap();
        assert_eq!(s.filename, "a,b.qcow2");
        assert_eq!(s.format.as_deref(), Some("qcow2"));
        let s = parse("driver=file,filename=x", false).unwrap();
        assert_eq!(
            (s.filename.as_str(), s.format.as_deref()),
            ("x", Some("raw"))
        );
        assert_eq!(parse("file.filename=x", false).unwrap().format, None);
        let s = parse("driver=raw,file.filename=x,offset=64k", false).unwrap();
        assert_eq!(s.offset, Some(65536));
        assert_eq!(
            parse("driver=qcow2", false).unwrap_err(),
            "A block device must be specified for \"file\""
        );
        assert_eq!(
            parse("x.qcow2", false).unwrap_err(),
            "Cannot find device='x.qcow2' nor node-name='x.qcow2'"
        );
        assert_eq!(
            parse("driver=qcow2,file.filename=x,bogus=1", false).unwrap_err(),
            "Block format 'qcow2' does not support the option 'bogus'"
        );
        assert_eq!(
            parse("driver=raw,file.filename=x,offset=-1", false).unwrap_err(),
            "Value '-1' is out of range for parameter 'offset'"
        );
        assert!(parse("driver=raw,file.filename=x,offset=99999999999E", false).is_err());
        assert_eq!(
            parse("driver=qcow2,file.filename=x,read-only=on", false).unwrap_err(),
            "Block node is read-only"
        );
        assert!(parse("driver=qcow2,file.filename=x,read-only=on", true).is_ok());
        assert_eq!(
            parse("driver=qcow2,file.filename=x,force-share=on", false).unwrap_err(),
            "force-share=on can only be used with read-only images"
        );
    }
}
