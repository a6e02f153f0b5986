//! Output formatting that must match qemu-img byte for byte.
//!
//! * [`size_to_str`]: human sizes (`1.16 MiB`, `64 MiB`, `0 B`, `1e+03 KiB`).
//! * [`to_json`] / [`to_json_pretty`]: QEMU's JSON writer, including the order in which a
//!   QEMU dictionary (a hash table with 512 buckets) yields its keys, so a
//!   `serde_json::Value` built in QAPI schema order prints exactly like qemu-img.
//! * [`dump_human`]: the indented `key: value` dump used under
//!   "Format specific information:" in `qemu-img info`.
//! * [`MapEntry`] and friends: `qemu-img map` lines in both output formats.
//! * Snapshot table lines with dates and VM clocks ([`snapshot_line`]).

use serde_json::{Map, Value};

/// `printf("%.<prec>g", v)` as glibc prints it (prec >= 1).
pub fn format_g(v: f64, prec: usize) -> String {
    if v.is_nan() {
        return if v.is_sign_negative() { "-nan" } else { "nan" }.to_string();
    }
    if v.is_infinite() {
        return if v < 0.0 { "-inf" } else { "inf" }.to_string();
    }
    let prec = prec.max(1);
    // Rounding to `prec` significant digits decides the exponent, exactly like C does.
    let sci = format!("{:.*e}", prec - 1, v);
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i64 = exp.parse().unwrap_or(0);
    if exp < -4 || exp >= prec as i64 {
        let m = strip_fraction_zeros(mantissa);
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{m}e{sign}{:02}", exp.unsigned_abs())
    } else {
        let decimals = (prec as i64 - 1 - exp).max(0) as usize;
        strip_fraction_zeros(&format!("{:.*}", decimals, v)).to_string()
    }
}

fn strip_fraction_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// QEMU's `size_to_str`: three significant digits and a binary unit, switching to the next
/// unit once the number would reach 1000 (so `1000 KiB` prints as `0.977 MiB`).
pub fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let scaled = val as f64 / (1000.0 / 1024.0);
    // frexp's exponent: the e with scaled = m * 2^e, 0.5 <= m < 1 (0 for zero).
    let frexp_exp: i64 = if scaled == 0.0 {
        0
    } else {
        ((scaled.to_bits() >> 52) & 0x7ff) as i64 - 1022
    };
    // C integer division truncates toward zero, so -1 / 10 is 0.
    let i = ((frexp_exp - 1) / 10).clamp(0, 6) as usize;
    let div = (1u64 << (i * 10)) as f64;
    format!("{} {}B", format_g(val as f64 / div, 3), SUFFIXES[i])
}

/// Which of QEMU's 512 dictionary buckets a key lands in (QEMU hashes keys with the
/// gdbm/tdb string hash).
pub fn qdict_bucket(key: &str) -> usize {
    let bytes = key.as_bytes();
    let mut value = 0x238F_13AFu32.wrapping_mul(bytes.len() as u32);
    for (i, &b) in bytes.iter().enumerate() {
        let shift = (i * 5 % 24) as u32;
        value = value.wrapping_add((b as u32) << shift);
    }
    let hash = 1_103_515_243u32.wrapping_mul(value).wrapping_add(12345);
    (hash % 512) as usize
}

/// The order in which QEMU iterates a dictionary whose keys were inserted in `keys`
/// order: by bucket, and within a bucket newest first.
pub fn qdict_order<'a>(keys: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let mut v: Vec<(usize, usize, &str)> = keys
        .into_iter()
        .enumerate()
        .map(|(i, k)| (qdict_bucket(k), i, k))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    v.into_iter().map(|(_, _, k)| k).collect()
}

fn ordered_entries(map: &Map<String, Value>) -> Vec<(&str, &Value)> {
    qdict_order(map.keys().map(String::as_str))
        .into_iter()
        .filter_map(|k| map.get(k).map(|v| (k, v)))
        .collect()
}

/// Appends `s` as a JSON string the way QEMU escapes it: `"` and `\` escaped, the usual
/// short escapes for control characters, and every other character outside printable
/// ASCII as `\uXXXX` (upper-case hex, surrogate pairs beyond the BMP). `/` is not escaped.
pub fn json_quote(s: &str, out: &mut String) {
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (' '..'\u{7f}').contains(&c) => out.push(c),
            c => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{:04X}", u));
                }
            }
        }
    }
    out.push('"');
}

fn json_number(n: &serde_json::Number) -> String {
    if let Some(i) = n.as_i64() {
        i.to_string()
    } else if let Some(u) = n.as_u64() {
        u.to_string()
    } else {
        // QEMU prints doubles with 17 significant digits.
        format_g(n.as_f64().unwrap_or(0.0), 17)
    }
}

fn newline(out: &mut String, pretty: bool, indent: usize) {
    if pretty {
        out.push('\n');
        for _ in 0..indent {
            out.push_str("    ");
        }
    }
}

fn write_json(v: &Value, out: &mut String, pretty: bool, indent: usize) {
    let comma = if pretty { "," } else { ", " };
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&json_number(n)),
        Value::String(s) => json_quote(s, out),
        Value::Array(items) => {
            out.push('[');
            let mut sep = "";
            for item in items {
                out.push_str(sep);
                newline(out, pretty, indent + 1);
                write_json(item, out, pretty, indent + 1);
                sep = comma;
            }
            newline(out, pretty, indent);
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            let mut sep = "";
            for (k, item) in ordered_entries(map) {
                out.push_str(sep);
                newline(out, pretty, indent + 1);
                json_quote(k, out);
                out.push_str(": ");
                write_json(item, out, pretty, indent + 1);
                sep = comma;
            }
            newline(out, pretty, indent);
            out.push('}');
        }
    }
}

/// QEMU's JSON text for `v`, compact (`{"a": 1, "b": 2}`) or pretty (4-space indent, empty
/// containers still broken over two lines). Objects print in QEMU dictionary order; build
/// them in QAPI schema order (serde_json's `preserve_order` keeps insertion order).
pub fn to_json(v: &Value, pretty: bool) -> String {
    let mut out = String::new();
    write_json(v, &mut out, pretty, 0);
    out
}

/// What qemu-img prints for `--output=json` (`info`, `check`, `measure`): the pretty JSON
/// followed by a newline.
pub fn to_json_pretty(v: &Value) -> String {
    let mut s = to_json(v, true);
    s.push('\n');
    s
}

fn dump_scalar(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&json_number(n)),
        Value::String(s) => out.push_str(s),
        Value::Array(_) | Value::Object(_) => {}
    }
}

fn is_composite(v: &Value) -> bool {
    matches!(v, Value::Array(_) | Value::Object(_))
}

fn dump_value(v: &Value, indent: usize, out: &mut String) {
    let pad = |out: &mut String, n: usize| {
        for _ in 0..n * 4 {
            out.push(' ');
        }
    };
    match v {
        Value::Object(map) => {
            for (k, item) in ordered_entries(map) {
                pad(out, indent);
                out.push_str(&k.replace('-', " "));
                out.push(':');
                out.push(if is_composite(item) { '\n' } else { ' ' });
                dump_value(item, indent + 1, out);
                if !is_composite(item) {
                    out.push('\n');
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                pad(out, indent);
                out.push_str(&format!("[{i}]:"));
                out.push(if is_composite(item) { '\n' } else { ' ' });
                dump_value(item, indent + 1, out);
                if !is_composite(item) {
                    out.push('\n');
                }
            }
        }
        scalar => dump_scalar(scalar, out),
    }
}

/// The human dump qemu-img uses for format-specific data: `key: value` lines with dashes
/// in keys shown as spaces, lists as `[i]:`, nesting by 4 spaces per level, starting at
/// `indentation` levels. `info` passes the `data` object at indentation 1.
pub fn dump_human(v: &Value, indentation: usize) -> String {
    let mut out = String::new();
    dump_value(v, indentation, &mut out);
    out
}

/// `printf("%#x", v)`: `0` for zero, `0x...` otherwise.
pub fn hex_alt(v: u64) -> String {
    if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    }
}

/// One extent as `qemu-img map` reports it (QAPI `MapEntry`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapEntry {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Backing-chain depth of the layer that decided the status.
    pub depth: u64,
    /// Allocated somewhere in the chain.
    pub present: bool,
    /// Reads as zeroes.
    pub zero: bool,
    /// Holds data.
    pub data: bool,
    /// Compressed clusters.
    pub compressed: bool,
    /// Host offset in `filename`, when known.
    pub offset: Option<u64>,
    /// File holding the data (human output only).
    pub filename: Option<String>,
}

impl MapEntry {
    /// Whether `next` continues `self` so that qemu-img prints them as one entry.
    pub fn mergeable(&self, next: &MapEntry) -> bool {
        if self.length == 0 {
            return false;
        }
        if self.zero != next.zero
            || self.data != next.data
            || self.compressed != next.compressed
            || self.depth != next.depth
            || self.present != next.present
            || self.filename != next.filename
        {
            return false;
        }
        match (self.offset, next.offset) {
            (None, None) => true,
            (Some(a), Some(b)) => a.checked_add(self.length) == Some(b),
            _ => false,
        }
    }

    /// The JSON form of one entry, without the separator: `{ "start": 0, ... }`.
    pub fn to_json_line(&self) -> String {
        let b = |x: bool| if x { "true" } else { "false" };
        let mut s = format!(
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \
             \"zero\": {}, \"data\": {}, \"compressed\": {}",
            self.start,
            self.length,
            self.depth,
            b(self.present),
            b(self.zero),
            b(self.data),
            b(self.compressed)
        );
        if let Some(off) = self.offset {
            s.push_str(&format!(", \"offset\": {off}"));
        }
        s.push('}');
        s
    }
}

/// Header line of `qemu-img map` human output, with its newline.
pub const MAP_HUMAN_HEADER: &str = "Offset          Length          Mapped to       File\n";

/// Error qemu-img reports when human output meets data without a host offset.
pub const MAP_HUMAN_NO_OFFSET: &str = "File contains external, encrypted or compressed clusters.";

/// One human `map` line (`%#-16x%#-16x%#-16x%s\n`).
pub fn map_human_line(start: u64, length: u64, offset: u64, filename: &str) -> String {
    format!(
        "{:<16}{:<16}{:<16}{}\n",
        hex_alt(start),
        hex_alt(length),
        hex_alt(offset),
        filename
    )
}

/// Writes `qemu-img map` output from already merged entries.
#[derive(Debug)]
pub struct MapWriter {
    json: bool,
    out: String,
    first: bool,
}

impl MapWriter {
    /// Starts the output: `[` for JSON, the column header for human.
    pub fn new(json: bool) -> Self {
        let out = if json {
            "[".to_string()
        } else {
            MAP_HUMAN_HEADER.to_string()
        };
        Self {
            json,
            out,
            first: true,
        }
    }

    /// Adds the next entry. For human output, fails like qemu-img on data without a host
    /// offset; entries that read as zero or hold no data print nothing.
    pub fn push(&mut self, e: &MapEntry) -> Result<(), &'static str> {
        if self.json {
            if !self.first {
                self.out.push_str(",\n");
            }
            self.out.push_str(&e.to_json_line());
        } else {
            if e.data && e.offset.is_none() {
                return Err(MAP_HUMAN_NO_OFFSET);
            }
            if e.data && !e.zero {
                self.out.push_str(&map_human_line(
                    e.start,
                    e.length,
                    e.offset.unwrap_or(0),
                    e.filename.as_deref().unwrap_or(""),
                ));
            }
        }
        self.first = false;
        Ok(())
    }

    /// Text written so far; the caller may flush it incrementally.
    pub fn take(&mut self) -> String {
        std::mem::take(&mut self.out)
    }

    /// Finishes the output (`]` and newline for JSON) and returns the remaining text.
    pub fn finish(mut self) -> String {
        if self.json {
            self.out.push_str("]\n");
        }
        self.out
    }
}

/// Converts days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `%Y-%m-%d %H:%M:%S` for `secs` since the epoch in a zone `utc_offset` seconds east of
/// UTC.
pub fn format_date(secs: i64, utc_offset: i64) -> String {
    let t = secs.saturating_add(utc_offset);
    let (y, mo, d) = civil_from_days(t.div_euclid(86_400));
    let sod = t.rem_euclid(86_400);
    format!(
        "{y:04}-{mo:02}-{d:02} {:02}:{:02}:{:02}",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    )
}

/// The local zone's offset from UTC (seconds east) at `secs`, as the C library sees it
/// (honours `TZ`). Falls back to UTC if the time cannot be converted.
pub fn local_utc_offset(secs: i64) -> i64 {
    let t = secs as libc::time_t;
    // SAFETY: `tm` is plain data that localtime_r fills in; both pointers are valid for the
    // duration of the call.
    unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() {
            0
        } else {
            tm.tm_gmtoff
        }
    }
}

/// The VM clock column: `HHHH:MM:SS.mmm` from nanoseconds (hours are not wrapped at 24).
pub fn format_vm_clock(nsec: u64) -> String {
    let secs = nsec / 1_000_000_000;
    // qemu-img narrows each field to a C int; keep that so huge clocks print the same.
    format!(
        "{:04}:{:02}:{:02}.{:03}",
        (secs / 3600) as i32,
        (secs / 60 % 60) as i32,
        (secs % 60) as i32,
        (nsec / 1_000_000 % 1000) as i32
    )
}

/// Header of the snapshot table (`qemu-img snapshot -l`, `qemu-img info`), no newline.
pub fn snapshot_header() -> String {
    format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    )
}

/// One row of the snapshot table, no newline. `icount` is `None` when the snapshot has
/// no instruction count (stored as -1). The date is shown in the zone `utc_offset`
/// seconds east of UTC; pass [`local_utc_offset`]`(date_sec)` to behave like qemu-img.
pub fn snapshot_line(
    id: &str,
    name: &str,
    vm_state_size: u64,
    date_sec: i64,
    utc_offset: i64,
    vm_clock_nsec: u64,
    icount: Option<u64>,
) -> String {
    let icount = icount
        .map(|i| i.to_string())
        .unwrap_or_else(|| "--".to_string());
    format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        id,
        name,
        size_to_str(vm_state_size),
        format_date(date_sec, utc_offset),
        format_vm_clock(vm_clock_nsec),
        icount
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sizes_match_qemu() {
        // Values observed from qemu-img 10.0.2 (info/create output) and printf("%0.3g").
        let cases: &[(u64, &str)] = &[
            (0, "0 B"),
            (1, "1 B"),
            (512, "512 B"),
            (999, "999 B"),
            (1000, "0.977 KiB"),
            (1023, "0.999 KiB"),
            (1024, "1 KiB"),
            (1536, "1.5 KiB"),
            (200_704, "196 KiB"),
            (233_472, "228 KiB"),
            (655_872, "640 KiB"),
            (1_216_512, "1.16 MiB"),
            (1_573_376, "1.5 MiB"),
            (1_023_487, "999 KiB"),
            (1_023_990, "1e+03 KiB"),
            (67_108_864, "64 MiB"),
            (1 << 30, "1 GiB"),
            (10 << 30, "10 GiB"),
            (1 << 40, "1 TiB"),
            (1 << 50, "1 PiB"),
            (1 << 60, "1 EiB"),
            (2 << 60, "2 EiB"),
            (u64::MAX, "16 EiB"),
        ];
        for (v, s) in cases {
            assert_eq!(size_to_str(*v), *s, "size_to_str({v})");
        }
    }

    #[test]
    fn g_format() {
        assert_eq!(format_g(1.125, 3), "1.12");
        assert_eq!(format_g(0.0001, 3), "0.0001");
        assert_eq!(format_g(0.00001, 3), "1e-05");
        assert_eq!(format_g(123456.0, 3), "1.23e+05");
        assert_eq!(format_g(0.1, 17), "0.10000000000000001");
        assert_eq!(format_g(100.0, 3), "100");
    }

    #[test]
    fn qdict_order_matches_observed_output() {
        // Insertion order is QAPI schema order; expected order is what qemu-img printed.
        assert_eq!(
            qdict_order(["required", "fully-allocated", "bitmaps"]),
            ["bitmaps", "required", "fully-allocated"]
        );
        assert_eq!(
            qdict_order([
                "filename",
                "format",
                "check-errors",
                "image-end-offset",
                "corruptions",
                "leaks",
                "corruptions-fixed",
                "leaks-fixed",
                "total-clusters",
                "allocated-clusters",
                "fragmented-clusters",
                "compressed-clusters",
            ])
            .into_iter()
            .filter(|k| [
                "image-end-offset",
                "total-clusters",
                "check-errors",
                "leaks",
                "allocated-clusters",
                "filename",
                "format"
            ]
            .contains(k))
            .collect::<Vec<_>>(),
            [
                "image-end-offset",
                "total-clusters",
                "check-errors",
                "leaks",
                "allocated-clusters",
                "filename",
                "format"
            ]
        );
        assert_eq!(
            qdict_order([
                "filename",
                "format",
                "dirty-flag",
                "actual-size",
                "virtual-size",
                "cluster-size",
                "backing-filename",
                "full-backing-filename",
                "backing-filename-format",
                "snapshots",
                "format-specific",
                "children",
            ]),
            [
                "children",
                "backing-filename-format",
                "snapshots",
                "virtual-size",
                "filename",
                "cluster-size",
                "format",
                "actual-size",
                "format-specific",
                "full-backing-filename",
                "backing-filename",
                "dirty-flag",
            ]
        );
        assert_eq!(
            qdict_order([
                "id",
                "name",
                "vm-state-size",
                "date-sec",
                "date-nsec",
                "vm-clock-sec",
                "vm-clock-nsec",
                "icount"
            ]),
            [
                "icount",
                "vm-clock-nsec",
                "name",
                "date-sec",
                "date-nsec",
                "vm-clock-sec",
                "id",
                "vm-state-size"
            ]
        );
        assert_eq!(
            qdict_order([
                "compat",
                "data-file",
                "data-file-raw",
                "extended-l2",
                "lazy-refcounts",
                "corrupt",
                "refcount-bits",
                "encrypt",
                "bitmaps",
                "compression-type"
            ])
            .into_iter()
            .filter(|k| !k.starts_with("data-file") && *k != "encrypt")
            .collect::<Vec<_>>(),
            [
                "compat",
                "compression-type",
                "lazy-refcounts",
                "bitmaps",
                "refcount-bits",
                "corrupt",
                "extended-l2"
            ]
        );
        assert_eq!(
            qdict_order(["name", "granularity", "flags"]),
            ["flags", "name", "granularity"]
        );
    }

    #[test]
    fn json_pretty_matches_qemu() {
        let v = json!({
            "filename": "ov\"é\\1.qcow2",
            "format": "file",
            "dirty-flag": false,
            "actual-size": 200704,
            "virtual-size": 197120,
            "format-specific": {"type": "file", "data": {}},
            "children": [],
        });
        let expected = "{\n    \"children\": [\n    ],\n    \"virtual-size\": 197120,\n    \
             \"filename\": \"ov\\\"\\u00E9\\\\1.qcow2\",\n    \"format\": \"file\",\n    \
             \"actual-size\": 200704,\n    \"format-specific\": {\n        \"type\": \"file\",\n        \
             \"data\": {\n        }\n    },\n    \"dirty-flag\": false\n}\n";
        assert_eq!(to_json_pretty(&v), expected);
        let m = json!({"required": 1536, "fully-allocated": 1536});
        assert_eq!(
            to_json_pretty(&m),
            "{\n    \"required\": 1536,\n    \"fully-allocated\": 1536\n}\n"
        );
        assert_eq!(
            to_json(&json!([1, "a/b", null]), false),
            "[1, \"a/b\", null]"
        );
        let mut s = String::new();
        json_quote("a\tb\u{1}\u{1F600}c", &mut s);
        assert_eq!(s, "\"a\\tb\\u0001\\uD83D\\uDE00c\"");
    }

    #[test]
    fn human_dump_matches_info() {
        let data = json!({
            "compat": "1.1",
            "lazy-refcounts": false,
            "bitmaps": [{"name": "bm0", "granularity": 65536, "flags": ["auto"]}],
            "refcount-bits": 16,
            "corrupt": false,
            "extended-l2": false,
            "compression-type": "zlib",
        });
        let expected =
            "    compat: 1.1\n    compression type: zlib\n    lazy refcounts: false\n    \
            bitmaps:\n        [0]:\n            flags:\n                [0]: auto\n            \
            name: bm0\n            granularity: 65536\n    refcount bits: 16\n    \
            corrupt: false\n    extended l2: false\n";
        assert_eq!(dump_human(&data, 1), expected);
    }

    #[test]
    fn map_output_matches_qemu() {
        let entries = [
            MapEntry {
                start: 0,
                length: 524288,
                depth: 1,
                present: true,
                data: true,
                offset: Some(327680),
                filename: Some("mb.qcow2".into()),
                ..Default::default()
            },
            MapEntry {
                start: 655360,
                length: 1441792,
                depth: 1,
                zero: true,
                ..Default::default()
            },
        ];
        let mut w = MapWriter::new(true);
        for e in &entries {
            w.push(e).unwrap();
        }
        assert_eq!(
            w.finish(),
            "[{ \"start\": 0, \"length\": 524288, \"depth\": 1, \"present\": true, \"zero\": false, \
             \"data\": true, \"compressed\": false, \"offset\": 327680},\n\
             { \"start\": 655360, \"length\": 1441792, \"depth\": 1, \"present\": false, \
             \"zero\": true, \"data\": false, \"compressed\": false}]\n"
        );
        let mut w = MapWriter::new(false);
        for e in &entries {
            w.push(e).unwrap();
        }
        assert_eq!(
            w.finish(),
            "Offset          Length          Mapped to       File\n\
             0               0x80000         0x50000         mb.qcow2\n"
        );
        let mut w = MapWriter::new(false);
        let compressed = MapEntry {
            data: true,
            compressed: true,
            ..Default::default()
        };
        assert_eq!(w.push(&compressed), Err(MAP_HUMAN_NO_OFFSET));
        assert_eq!(MapWriter::new(true).finish(), "[]\n");
        assert!(entries[0].mergeable(&MapEntry {
            start: 524288,
            offset: Some(327680 + 524288),
            ..entries[0].clone()
        }));
        assert!(!entries[0].mergeable(&entries[1]));
    }

    #[test]
    fn snapshot_table_matches_qemu() {
        assert_eq!(
            snapshot_header(),
            "ID      TAG               VM_SIZE                DATE        VM_CLOCK     ICOUNT"
        );
        // 2026-11-22 04:42:35 UTC.
        let secs = 1_795_322_555;
        assert_eq!(
            snapshot_line("1", "s1", 0, secs, 0, 0, Some(0)),
            "1       s1                    0 B 2026-11-22 04:42:35  0000:00:00.000          0"
        );
        assert_eq!(
            snapshot_line(
                "2",
                "averyveryverylongsnapshotname_xyz",
                0,
                secs + 30,
                0,
                0,
                Some(0)
            ),
            "2       averyveryverylongsnapshotname_xyz      0 B 2026-11-22 04:43:05  \
             0000:00:00.000          0"
        );
        assert_eq!(format_date(secs, 5 * 3600 + 1800), "2026-11-22 10:12:35");
        assert_eq!(format_date(0, 0), "1970-01-01 00:00:00");
        assert_eq!(format_date(-1, 0), "1969-12-31 23:59:59");
        assert_eq!(format_date(951_782_400, 0), "2000-02-29 00:00:00");
        assert_eq!(format_vm_clock(3_723_456_000_000), "0001:02:03.456");
        assert_eq!(format_vm_clock(0), "0000:00:00.000");
        assert!(snapshot_line("1", "x", 0, 0, 0, 0, None).ends_with("         --"));
        let _ = local_utc_offset(secs);
    }
}
