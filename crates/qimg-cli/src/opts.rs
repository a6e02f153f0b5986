//! Value parsers shared by the commands, with qemu-img's error texts.
//!
//! * [`parse_size`]: QEMU's size syntax (`1G`, `512k`, `1.5M`, `0x1000`, `b` suffix).
//! * [`cvtnum`] / [`cvtnum_full`]: a size checked against a range, with the messages
//!   qemu-img prints (`Invalid image size specified: '1Q'.`).
//! * [`OptionList`]: `-o key=value,...` strings (`,,` escapes a comma, repeated `-o` are
//!   joined, `help` / `?` asks for help).
//! * Small enums for `--output`, cache modes and `check -r`.

/// Why a size string was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeError {
    /// Not a size at all (QEMU's `-EINVAL`).
    Invalid,
    /// Negative or at least 2^64 bytes (QEMU's `-ERANGE`).
    Range,
}

fn suffix_mul(c: u8) -> Option<u64> {
    let shift = match c {
        b'b' | b'B' => 0,
        b'k' | b'K' => 10,
        b'm' | b'M' => 20,
        b'g' | b'G' => 30,
        b't' | b'T' => 40,
        b'p' | b'P' => 50,
        b'e' | b'E' => 60,
        _ => return None,
    };
    Some(1u64 << shift)
}

fn is_c_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\x0b' | b'\x0c' | b'\r')
}

/// Result of reading an unsigned integer the way `strtoull` does: the value (saturated),
/// where it stopped, whether it overflowed, and whether a minus sign was present.
struct Integral {
    value: u64,
    end: usize,
    overflow: bool,
    negative: bool,
}

/// `strtoull(s, &end, radix)` for radix 10 or 16 (16 accepts an optional `0x`).
/// Returns `None` when no digits were found (end == start).
fn strtoull(s: &[u8], radix: u32) -> Option<Integral> {
    let mut i = 0;
    while i < s.len() && is_c_space(s[i]) {
        i += 1;
    }
    let mut negative = false;
    if i < s.len() && (s[i] == b'+' || s[i] == b'-') {
        negative = s[i] == b'-';
        i += 1;
    }
    if radix == 16
        && s.get(i) == Some(&b'0')
        && matches!(s.get(i + 1), Some(b'x' | b'X'))
        && s.get(i + 2).is_some_and(|c| c.is_ascii_hexdigit())
    {
        i += 2;
    }
    let start = i;
    let mut value: u64 = 0;
    let mut overflow = false;
    while let Some(d) = s.get(i).and_then(|&c| (c as char).to_digit(radix)) {
        match value
            .checked_mul(radix as u64)
            .and_then(|v| v.checked_add(d as u64))
        {
            Some(v) => value = v,
            None => {
                overflow = true;
                value = u64::MAX;
            }
        }
        i += 1;
    }
    if i == start {
        return None;
    }
    Some(Integral {
        value,
        end: i,
        overflow,
        negative,
    })
}

/// Parses `.digits` (the fractional part) like `strtod` would, returning the value in
/// [0, 1] and the bytes consumed. `s` starts at optional spaces/sign before the dot when
/// `allow_prefix` is set (QEMU hands strtod the whole string if there is no integer part).
fn parse_fraction(s: &[u8], allow_prefix: bool) -> Option<(f64, usize, bool)> {
    let mut i = 0;
    let mut negative = false;
    if allow_prefix {
        while i < s.len() && is_c_space(s[i]) {
            i += 1;
        }
        if i < s.len() && (s[i] == b'+' || s[i] == b'-') {
            negative = s[i] == b'-';
            i += 1;
        }
    }
    if s.get(i) != Some(&b'.') {
        return None;
    }
    let digits_start = i + 1;
    let mut j = digits_start;
    while j < s.len() && s[j].is_ascii_digit() {
        j += 1;
    }
    if j == digits_start {
        return None;
    }
    // Only ASCII digits were taken, so this is valid UTF-8 and a valid float literal.
    let text = std::str::from_utf8(&s[digits_start..j]).ok()?;
    let value: f64 = format!("0.{text}").parse().ok()?;
    Some((value, j, negative))
}

/// QEMU's size parser (`qemu_strtosz`): a decimal integer, optionally with a fraction,
/// or a `0x` hexadecimal integer, followed by an optional binary suffix
/// (`b`, `k`, `M`, `G`, `T`, `P`, `E`, either case). Fractions need a suffix other than
/// `b`; results are rounded to the nearest byte. The whole string must be consumed.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let b = s.as_bytes();
    let int = strtoull(b, 10);
    if let Some(int) = &int {
        if int.overflow || int.negative {
            // QEMU reports range errors only when nothing follows the number.
            return Err(if int.end == b.len() {
                SizeError::Range
            } else {
                SizeError::Invalid
            });
        }
    }
    let mut val: u64;
    let mut end: usize;
    let mut frac: u64 = 0;
    match int {
        Some(int) if int.value == 0 && matches!(b.get(int.end), Some(b'x' | b'X')) => {
            // Hexadecimal: no fraction and no suffix allowed.
            let hex = strtoull(b, 16).ok_or(SizeError::Invalid)?;
            if hex.overflow {
                return Err(if hex.end == b.len() {
                    SizeError::Range
                } else {
                    SizeError::Invalid
                });
            }
            if hex.end < b.len() {
                return Err(SizeError::Invalid);
            }
            return Ok(hex.value);
        }
        Some(int) if b.get(int.end) == Some(&b'.') => {
            val = int.value;
            end = int.end;
            if b.get(end + 1).is_some_and(u8::is_ascii_digit) {
                let (f, used, _) = parse_fraction(&b[end..], false).ok_or(SizeError::Invalid)?;
                end += used;
                (val, frac) = split_fraction(val, f)?;
                frac = underflow_guard(frac, &b[int.end..end]);
            } else {
                // "1.k" and "1." are accepted with an empty fraction.
                end += 1;
            }
        }
        Some(int) => {
            val = int.value;
            end = int.end;
        }
        None if s.contains('.') => {
            let (f, used, negative) = parse_fraction(b, true).ok_or(SizeError::Invalid)?;
            if negative {
                // strtod returned a negative number (even -0.0): QEMU calls that a range
                // error, which trailing garbage turns into an invalid-input error.
                return Err(if used == b.len() {
                    SizeError::Range
                } else {
                    SizeError::Invalid
                });
            }
            end = used;
            (val, frac) = split_fraction(0, f)?;
            frac = underflow_guard(frac, &b[..end]);
        }
        None => return Err(SizeError::Invalid),
    }
    let mul = match b.get(end).and_then(|&c| suffix_mul(c)) {
        Some(m) => {
            end += 1;
            m
        }
        None => 1,
    };
    if end != b.len() {
        return Err(SizeError::Invalid);
    }
    if mul == 1 {
        // A fraction of a byte is meaningless.
        if frac != 0 {
            return Err(SizeError::Invalid);
        }
        return Ok(val);
    }
    // Exact 64.64 fixed point times the multiplier, rounding half up.
    let whole = (val as u128) * (mul as u128);
    let part = (frac as u128) * (mul as u128);
    let total = whole + (part >> 64) + ((part >> 63) & 1);
    u64::try_from(total).map_err(|_| SizeError::Range)
}

/// Splits a fraction in [0, 1] into (carry into the integer part, 64-bit fixed point).
fn split_fraction(val: u64, f: f64) -> Result<(u64, u64), SizeError> {
    if f >= 1.0 {
        // ".9999999999999999999" rounds to 1.0 as a double.
        return Ok((val.checked_add(1).ok_or(SizeError::Range)?, 0));
    }
    Ok((val, (f * 18_446_744_073_709_551_616.0) as u64))
}

/// strtod reports underflow for tiny non-zero fractions; QEMU then still treats the
/// fraction as non-zero (so it requires a suffix).
fn underflow_guard(frac: u64, text: &[u8]) -> u64 {
    if frac == 0 && text.iter().any(|c| (b'1'..=b'9').contains(c)) {
        let f: f64 = std::str::from_utf8(text)
            .ok()
            .map(|t| t.trim_start_matches(|c: char| c.is_ascii_whitespace() || c == '+'))
            .and_then(|t| format!("0{t}").parse().ok())
            .unwrap_or(0.0);
        if f < f64::MIN_POSITIVE {
            return 1;
        }
    }
    frac
}

/// qemu-img's `cvtnum_full`: a size between `min` and `max`, or the error line qemu-img
/// prints (without the program name), e.g. `Invalid image size specified: '1Q'.` or
/// `Invalid image size specified. Must be between 0 and 9223372036854775807.`.
/// `name` is the human name of the value ("image size", "start offset", ...).
pub fn cvtnum_full(name: &str, value: &str, min: i64, max: i64) -> Result<i64, String> {
    let range = || format!("Invalid {name} specified. Must be between {min} and {max}.");
    match parse_size(value) {
        Ok(v) => match i64::try_from(v) {
            Ok(v) if v >= min && v <= max => Ok(v),
            _ => Err(range()),
        },
        Err(SizeError::Range) => Err(range()),
        Err(SizeError::Invalid) => Err(format!("Invalid {name} specified: '{value}'.")),
    }
}

/// [`cvtnum_full`] with the usual range 0..=i64::MAX.
pub fn cvtnum(name: &str, value: &str) -> Result<i64, String> {
    cvtnum_full(name, value, 0, i64::MAX)
}

/// The error qemu-img prints (over three lines, without the program name) when a size
/// inside an option list (`-o size=...`, `resize` sizes) does not parse.
pub fn option_size_error(param: &str) -> String {
    format!(
        "Parameter '{param}' expects a non-negative number below 2^64\n\
         Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
         and exabytes, respectively."
    )
}

/// A parsed `-o` option string: `key=value` pairs in command-line order.
///
/// A key without `=` is a flag: `name` means `name=on`, `noname` means `name=off`.
/// Repeated keys are all kept; [`OptionList::get`] returns the last one, which is what
/// QEMU uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OptionList {
    /// The joined raw text (as qemu-img builds it from repeated `-o`).
    pub raw: String,
}

impl OptionList {
    /// qemu-img's check on each `-o` argument: not empty, not starting with a comma, and
    /// not ending in an odd number of commas (a single trailing comma has nothing after
    /// it, while `,,` is an escaped comma).
    pub fn is_valid(arg: &str) -> bool {
        if arg.is_empty() || arg.starts_with(',') {
            return false;
        }
        let trailing = arg.len() - arg.trim_end_matches(',').len();
        trailing.is_multiple_of(2)
    }

    /// Adds one `-o` argument, joining it to earlier ones with a comma. The error is the
    /// line qemu-img prints (without the program name).
    pub fn accumulate(&mut self, arg: &str) -> Result<(), String> {
        if !Self::is_valid(arg) {
            return Err(format!("Invalid option list: {arg}"));
        }
        if !self.raw.is_empty() {
            self.raw.push(',');
        }
        self.raw.push_str(arg);
        Ok(())
    }

    /// Whether any `-o` was given.
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    /// Whether one of the comma-separated elements is exactly `help` or `?`.
    pub fn has_help(&self) -> bool {
        split_values(&self.raw)
            .iter()
            .any(|e| e == "help" || e == "?")
    }

    /// The `(key, value)` pairs in order.
    pub fn pairs(&self) -> Vec<(String, String)> {
        parse_pairs(&self.raw)
    }

    /// The last value given for `key`.
    pub fn get(&self, key: &str) -> Option<String> {
        self.pairs()
            .into_iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }
}

/// Reads one value up to an unescaped comma; `,,` stands for `,`. Returns the value and
/// the rest after the separating comma (if any).
fn take_value(s: &str) -> (String, &str) {
    let mut out = String::new();
    let mut rest = s;
    loop {
        match rest.find(',') {
            None => {
                out.push_str(rest);
                return (out, "");
            }
            Some(i) => {
                out.push_str(&rest[..i]);
                if rest[i + 1..].starts_with(',') {
                    out.push(',');
                    rest = &rest[i + 2..];
                } else {
                    return (out, &rest[i + 1..]);
                }
            }
        }
    }
}

/// Splits an option string into its elements (whole `key=value` texts, unescaped).
fn split_values(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let (v, r) = take_value(rest);
        out.push(v);
        rest = r;
    }
    out
}

/// Parses `key=value,flag,nokey,...` into pairs the way QEMU's option parser does: the
/// key ends at the first `=` or `,` (keys cannot contain escaped commas), values may.
pub fn parse_pairs(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let key_len = rest.find(['=', ',']).unwrap_or(rest.len());
        let key = &rest[..key_len];
        if rest[key_len..].starts_with('=') {
            let (value, r) = take_value(&rest[key_len + 1..]);
            out.push((key.to_string(), value));
            rest = r;
        } else {
            match key.strip_prefix("no") {
                Some(k) => out.push((k.to_string(), "off".to_string())),
                None => out.push((key.to_string(), "on".to_string())),
            }
            rest = rest[key_len..]
                .strip_prefix(',')
                .unwrap_or(&rest[key_len..]);
        }
    }
    out
}

/// An internal snapshot selector (`convert -l`, `measure -l`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapshotParam {
    /// `ID_OR_NAME`: matched against IDs first, then names.
    IdOrName(String),
    /// `snapshot.id=...,snapshot.name=...`: either or both.
    Options {
        /// `snapshot.id`.
        id: Option<String>,
        /// `snapshot.name`.
        name: Option<String>,
    },
}

/// Parses a `-l` argument. Errors are the lines qemu-img prints (without the program
/// name), e.g. `Invalid parameter 'snapshot.foo'` then `Failed in parsing snapshot param
/// 'snapshot.foo=1'`.
pub fn parse_snapshot_param(arg: &str) -> Result<SnapshotParam, Vec<String>> {
    if !arg.starts_with("snapshot.") {
        return Ok(SnapshotParam::IdOrName(arg.to_string()));
    }
    let (mut id, mut name) = (None, None);
    for (k, v) in parse_pairs(arg) {
        match k.as_str() {
            "snapshot.id" => id = Some(v),
            "snapshot.name" => name = Some(v),
            _ => {
                return Err(vec![
                    format!("Invalid parameter '{k}'"),
                    format!("Failed in parsing snapshot param '{arg}'"),
                ])
            }
        }
    }
    Ok(SnapshotParam::Options { id, name })
}

/// `--output` values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OutputFormat {
    /// Text for people (the default).
    #[default]
    Human,
    /// QEMU's JSON.
    Json,
}

impl OutputFormat {
    /// Parses an `--output` argument; the error is qemu-img's usage message (print it
    /// with the `Try ... --help` hint).
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "human" => Ok(Self::Human),
            "json" => Ok(Self::Json),
            _ => Err(format!("--output expects 'human' or 'json' not '{s}'")),
        }
    }
}

/// QEMU cache modes (`-t`, `-T`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheMode {
    /// O_DIRECT, writeback cache emulation.
    None,
    /// Host page cache, flushes on request.
    Writeback,
    /// Host page cache, every write flushed.
    Writethrough,
    /// O_DIRECT and every write flushed.
    Directsync,
    /// Host page cache, flushes ignored.
    Unsafe,
}

impl CacheMode {
    /// Parses a cache mode name as QEMU does (`off` is an alias of `none`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "none" | "off" => Some(Self::None),
            "writeback" => Some(Self::Writeback),
            "writethrough" => Some(Self::Writethrough),
            "directsync" => Some(Self::Directsync),
            "unsafe" => Some(Self::Unsafe),
            _ => None,
        }
    }
}

/// `check -r` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepairMode {
    /// Fix leaked clusters only.
    Leaks,
    /// Fix leaks and corruptions.
    All,
}

impl RepairMode {
    /// Parses a `-r` argument; the error is qemu-img's usage message.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "leaks" => Ok(Self::Leaks),
            "all" => Ok(Self::All),
            _ => Err(format!("--repair (-r) expects 'leaks' or 'all' not '{s}'")),
        }
    }
}

/// Preallocation modes (`resize --preallocation`, `-o preallocation=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prealloc {
    /// Nothing preallocated.
    Off,
    /// Metadata only.
    Metadata,
    /// fallocate the data area.
    Falloc,
    /// Write zeroes to the data area.
    Full,
}

impl Prealloc {
    /// Parses a mode; the error is the message qemu-img prints.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Self::Off),
            "metadata" => Ok(Self::Metadata),
            "falloc" => Ok(Self::Falloc),
            "full" => Ok(Self::Full),
            _ => Err(format!("Invalid preallocation mode '{s}'")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SizeError::*;

    #[test]
    fn sizes_like_qemu() {
        // Observed with `qemu-img create -f raw` / `qemu-img measure --size` (10.0.2).
        let ok: &[(&str, u64)] = &[
            ("0", 0),
            ("511", 511),
            ("1b", 1),
            ("1B", 1),
            ("1K", 1024),
            ("1k", 1024),
            ("1m", 1 << 20),
            ("1M", 1 << 20),
            ("1g", 1 << 30),
            ("1t", 1 << 40),
            ("1p", 1 << 50),
            ("1e", 1 << 60),
            ("1E", 1 << 60),
            ("1.5M", 1_572_864),
            ("1.3k", 1331),
            ("0.5k", 512),
            (".5k", 512),
            (" .5k", 512),
            ("1.k", 1024),
            ("5.k", 5120),
            ("1.", 1),
            ("1.0", 1),
            ("1.0b", 1),
            ("1.0000001k", 1024),
            ("0.0001k", 0),
            ("0.99999999999999999999999k", 1024),
            ("1.00000000000000000001k", 1024),
            ("1.5E", 1_729_382_256_910_270_464),
            ("1.5P", 1_688_849_860_263_936),
            ("0x10", 16),
            ("0X10", 16),
            ("0x1E", 30),
            ("0x7fffffffffffffff", 0x7fff_ffff_ffff_ffff),
            ("010", 10),
            (" 1", 1),
            ("+5", 5),
            (" +1", 1),
            ("18446744073709551615", u64::MAX),
        ];
        for (s, v) in ok {
            assert_eq!(parse_size(s), Ok(*v), "parse_size({s:?})");
        }
        let bad: &[(&str, SizeError)] = &[
            ("1Q", Invalid),
            ("", Invalid),
            ("k", Invalid),
            ("1 ", Invalid),
            ("1 k", Invalid),
            ("1.5", Invalid),
            ("1.5b", Invalid),
            ("0.5b", Invalid),
            ("0.0001", Invalid),
            ("1e3", Invalid),
            ("1e1", Invalid),
            ("1.5e1", Invalid),
            ("1.5e1k", Invalid),
            ("1kb", Invalid),
            ("1,5k", Invalid),
            ("inf", Invalid),
            ("nan", Invalid),
            ("0x", Invalid),
            ("0xk", Invalid),
            ("0x1k", Invalid),
            ("0x.5", Invalid),
            ("00x10", Invalid),
            ("0x1p10", Invalid),
            ("1.5.k", Invalid),
            ("..5k", Invalid),
            (".k", Invalid),
            (".", Invalid),
            ("+-1", Invalid),
            ("- 1", Invalid),
            ("-x", Invalid),
            ("-1Q", Invalid),
            ("-1k", Invalid),
            ("-.5k", Invalid),
            ("99999999999999999999k", Invalid),
            ("-1", Range),
            ("-0", Range),
            (" -1", Range),
            ("-.5", Range),
            ("16E", Range),
            ("18446744073709551616", Range),
            ("123456789012345678901234567890", Range),
            ("0x10000000000000000", Range),
        ];
        for (s, e) in bad {
            assert_eq!(parse_size(s), Err(*e), "parse_size({s:?})");
        }
    }

    #[test]
    fn cvtnum_messages() {
        assert_eq!(
            cvtnum("image size", "1Q"),
            Err("Invalid image size specified: '1Q'.".to_string())
        );
        assert_eq!(
            cvtnum("image size", "8E"),
            Err(
                "Invalid image size specified. Must be between 0 and 9223372036854775807."
                    .to_string()
            )
        );
        assert_eq!(cvtnum("image size", "7E"), Ok(8_070_450_532_247_928_832));
        assert_eq!(
            cvtnum_full("number of coroutines", "17", 1, 16),
            Err("Invalid number of coroutines specified. Must be between 1 and 16.".to_string())
        );
        assert_eq!(cvtnum_full("bs", "4k", 1, i32::MAX as i64), Ok(4096));
    }

    #[test]
    fn option_lists() {
        assert!(!OptionList::is_valid(""));
        assert!(!OptionList::is_valid(","));
        assert!(!OptionList::is_valid("a=1,"));
        assert!(OptionList::is_valid("a=1,,"));
        assert!(OptionList::is_valid("a=1"));
        let mut o = OptionList::default();
        o.accumulate("cluster_size=4k").unwrap();
        o.accumulate("cluster_size=8k,lazy_refcounts,nofoo")
            .unwrap();
        assert_eq!(
            o.raw,
            "cluster_size=4k,cluster_size=8k,lazy_refcounts,nofoo"
        );
        assert_eq!(o.get("cluster_size").as_deref(), Some("8k"));
        assert_eq!(o.get("lazy_refcounts").as_deref(), Some("on"));
        assert_eq!(o.get("foo").as_deref(), Some("off"));
        assert!(!o.has_help());
        assert_eq!(o.accumulate(""), Err("Invalid option list: ".to_string()));
        let mut o = OptionList::default();
        o.accumulate("backing_file=a,,b,backing_fmt=raw").unwrap();
        assert_eq!(
            o.pairs(),
            vec![
                ("backing_file".to_string(), "a,b".to_string()),
                ("backing_fmt".to_string(), "raw".to_string())
            ]
        );
        for h in ["help", "?", "a=1,help", "x,?"] {
            let mut o = OptionList::default();
            o.accumulate(h).unwrap();
            assert!(o.has_help(), "{h}");
        }
        let mut o = OptionList::default();
        o.accumulate("help=1").unwrap();
        assert!(!o.has_help());
        assert_eq!(parse_pairs("=5"), vec![(String::new(), "5".to_string())]);
        assert_eq!(
            parse_pairs("a=1=2"),
            vec![("a".to_string(), "1=2".to_string())]
        );
    }

    #[test]
    fn enums() {
        assert_eq!(OutputFormat::parse("json"), Ok(OutputFormat::Json));
        assert_eq!(
            OutputFormat::parse("foo"),
            Err("--output expects 'human' or 'json' not 'foo'".to_string())
        );
        assert_eq!(
            RepairMode::parse("foo"),
            Err("--repair (-r) expects 'leaks' or 'all' not 'foo'".to_string())
        );
        assert_eq!(CacheMode::parse("off"), Some(CacheMode::None));
        assert_eq!(
            Prealloc::parse("bogus"),
            Err("Invalid preallocation mode 'bogus'".into())
        );
    }
}
