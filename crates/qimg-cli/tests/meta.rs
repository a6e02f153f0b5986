//! `qimg meta`: the image GUID and key/value metadata, checked against QEMU's tools.
//!
//! Metadata is set by qimg on images qemu-img made (v2 and v3, 512-byte and 64 KiB
//! clusters, with a backing file, with bitmaps); then `qemu-img check` must pass, `info`
//! must print what qemu-img prints, qemu-io must read the data unchanged, and after
//! every QEMU operation that rewrites the header the metadata must still be there.
//! Changes that do not fit, and damaged extensions, must fail with one line and leave
//! the file as it was.

mod common;

use common::*;
use qimg::ondisk::header::Header;
use qimg::ondisk::meta::{Guid, GUID_EXT, KV_EXT};
use qimg::qcow2::{Qcow2, Qcow2Options};
use qimg::storage::{FileStorage, Storage};
use std::path::Path;
use std::sync::Arc;

const GUID: &str = "1b4e28ba-2fa1-41d2-883f-0016d3cca427";

/// What `qimg meta` lists after the standard `--set`s below.
fn expected_listing(guid: &str) -> String {
    format!(
        "guid: {guid}\nmetadata:\n    note: hello = world, ünïcode\n    owner: alice\n    vm: web-01\n"
    )
}

/// qimg-only behaviour: nothing to check when the suite runs against qemu-img itself.
fn skip() -> bool {
    testing_qemu_img_itself()
}

fn mk(dir: &Path, opts: &str, name: &str, size: &str) {
    let mut a = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        a.extend_from_slice(&["-o", opts]);
    }
    a.extend_from_slice(&[name, size]);
    qemu_img_ok(dir, &a);
}

#[track_caller]
fn meta_ok(dir: &Path, args: &[&str]) -> Out {
    let mut a = vec!["meta"];
    a.extend_from_slice(args);
    qimg(dir, &a).ok()
}

#[track_caller]
fn listing(dir: &Path, img: &str) -> String {
    meta_ok(dir, &[img]).stdout
}

/// A failure: exit status 1, nothing on stdout, exactly one line on stderr, which
/// contains `fragment`.
#[track_caller]
fn meta_fails(dir: &Path, args: &[&str], fragment: &str) -> String {
    let mut a = vec!["meta"];
    a.extend_from_slice(args);
    let o = qimg(dir, &a);
    assert_eq!(o.code(), Some(1), "{}", o.describe());
    assert_eq!(o.stdout, "", "{}", o.describe());
    assert_eq!(o.stderr.lines().count(), 1, "{}", o.describe());
    assert!(o.stderr.contains(fragment), "{}", o.describe());
    o.stderr
}

#[track_caller]
fn check_clean(dir: &Path, img: &str) {
    let o = qemu_img(dir, ["check", img]);
    assert_eq!(o.code(), Some(0), "{}", o.describe());
    assert!(
        o.stdout.contains("No errors were found"),
        "{}",
        o.describe()
    );
}

/// qimg's `info` (human and JSON) prints exactly what qemu-img prints.
#[track_caller]
fn info_same(dir: &Path, img: &str) {
    assert_same(dir, &["info", img]);
    assert_same(dir, &["info", "--output=json", img]);
}

const WRITES: &[&str] = &["write -P 0x5a 0 128k", "write -P 0x33 1M 64k"];
const READS: &[&str] = &[
    "read -P 0x5a 0 128k",
    "read -P 0x33 1M 64k",
    "read -P 0 128k 64k",
];

fn header(path: &Path) -> Header {
    let st = FileStorage::open(path, false).unwrap();
    let mut b = vec![0u8; 2 << 20];
    let n = st.len().unwrap().min(b.len() as u64) as usize;
    st.read_at(&mut b[..n], 0).unwrap();
    Header::parse(&b).unwrap()
}

/// One kind of image the metadata must survive on.
struct Variant {
    name: &'static str,
    create: &'static str,
    backing: bool,
    bitmap: bool,
}

const VARIANTS: &[Variant] = &[
    Variant {
        name: "v3-64k",
        create: "",
        backing: false,
        bitmap: false,
    },
    Variant {
        name: "v2-64k",
        create: "compat=0.10",
        backing: false,
        bitmap: false,
    },
    Variant {
        name: "v3-512",
        create: "cluster_size=512",
        backing: false,
        bitmap: false,
    },
    Variant {
        name: "v2-512",
        create: "compat=0.10,cluster_size=512",
        backing: false,
        bitmap: false,
    },
    Variant {
        name: "v3-64k-backing",
        create: "",
        backing: true,
        bitmap: false,
    },
    Variant {
        name: "v2-512-backing",
        create: "compat=0.10,cluster_size=512",
        backing: true,
        bitmap: false,
    },
    Variant {
        name: "v3-64k-bitmaps",
        create: "",
        backing: false,
        bitmap: true,
    },
    Variant {
        name: "v3-4k-backing-bitmaps",
        create: "cluster_size=4096",
        backing: true,
        bitmap: true,
    },
];

/// Makes `img.qcow2` for `v` in `dir`, with data (and a bitmap that recorded it).
fn make_variant(dir: &Path, v: &Variant) {
    if v.backing {
        mk(dir, "", "base.qcow2", "8M");
        io(dir, "qcow2", "base.qcow2", &["write -P 0x77 4M 64k"]);
        let mut a = vec![
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
        ];
        if !v.create.is_empty() {
            a.extend_from_slice(&["-o", v.create]);
        }
        a.extend_from_slice(&["img.qcow2", "8M"]);
        qemu_img_ok(dir, &a);
    } else {
        mk(dir, v.create, "img.qcow2", "8M");
    }
    if v.bitmap {
        qemu_img_ok(dir, &["bitmap", "--add", "img.qcow2", "b0"]);
    }
    io(dir, "qcow2", "img.qcow2", WRITES);
}

fn reads_ok(dir: &Path, v: &Variant) {
    io(dir, "qcow2", "img.qcow2", READS);
    if v.backing {
        io(dir, "qcow2", "img.qcow2", &["read -P 0x77 4M 64k"]);
    }
}

fn set_standard(dir: &Path) {
    meta_ok(
        dir,
        &[
            "--set",
            "owner=alice",
            "--set",
            "vm=web-00",
            "--guid",
            GUID,
            "--set",
            "note=hello = world, ünïcode",
            "--set",
            "vm=web-01",
            "img.qcow2",
        ],
    );
}

/// The header rewrites QEMU performs on `v`, each followed by a check that the
/// metadata is intact.
fn qemu_rewrites(v: &Variant) -> Vec<Vec<&'static str>> {
    let v2 = v.create.contains("compat=0.10");
    let mut ops = vec![vec!["snapshot", "-c", "s1", "img.qcow2"]];
    if v2 {
        // Persistent bitmaps, lazy refcounts and the feature table need v3: upgrade.
        ops.push(vec!["amend", "-o", "compat=1.1", "img.qcow2"]);
    }
    ops.push(vec!["bitmap", "--add", "img.qcow2", "b1"]);
    ops.push(vec!["amend", "-o", "lazy_refcounts=on", "img.qcow2"]);
    ops.push(vec!["resize", "img.qcow2", "+1M"]);
    if v.backing {
        ops.push(vec![
            "rebase",
            "-u",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "img.qcow2",
        ]);
        // Empties the overlay after copying its data down.
        ops.push(vec!["commit", "img.qcow2"]);
    } else {
        ops.push(vec!["rebase", "-u", "-b", "", "img.qcow2"]);
    }
    ops.push(vec!["bitmap", "--remove", "img.qcow2", "b1"]);
    ops.push(vec!["amend", "-o", "lazy_refcounts=off", "img.qcow2"]);
    ops.push(vec!["snapshot", "-d", "s1", "img.qcow2"]);
    ops.push(vec!["check", "-r", "all", "img.qcow2"]);
    if !v.bitmap {
        // Persistent bitmaps prevent a downgrade.
        ops.push(vec!["amend", "-o", "compat=0.10", "img.qcow2"]);
    }
    ops
}

#[test]
fn qemu_keeps_metadata_through_header_rewrites() {
    if skip() {
        return;
    }
    for v in VARIANTS {
        let t = Tmp::new(&format!("meta-qemu-{}", v.name));
        let dir = t.path();
        make_variant(dir, v);
        set_standard(dir);
        let want = expected_listing(GUID);
        assert_eq!(listing(dir, "img.qcow2"), want, "{}", v.name);
        check_clean(dir, "img.qcow2");
        info_same(dir, "img.qcow2");
        reads_ok(dir, v);
        // QEMU writes unknown extensions back in reverse order: each flip of ours proves
        // that QEMU really rewrote the header.
        let order = |dir: &Path| -> Vec<u32> {
            header(&dir.join("img.qcow2"))
                .unknown_extensions
                .iter()
                .map(|e| e.0)
                .collect()
        };
        // (qemu-io's read-write open above already rewrote it on images with bitmaps.)
        let mut last = order(dir);
        let mut sorted = last.clone();
        sorted.sort();
        assert_eq!(sorted, [GUID_EXT, KV_EXT], "{}", v.name);
        let mut flips = 0;
        for op in qemu_rewrites(v) {
            let o = qemu_img(dir, &op);
            assert!(o.success(), "{}: {}", v.name, o.describe());
            assert_eq!(listing(dir, "img.qcow2"), want, "{}: after {op:?}", v.name);
            // Still exactly one copy of each extension.
            let h = header(&dir.join("img.qcow2"));
            for typ in [GUID_EXT, KV_EXT] {
                let n = h.unknown_extensions.iter().filter(|e| e.0 == typ).count();
                assert_eq!(n, 1, "{}: after {op:?}", v.name);
            }
            check_clean(dir, "img.qcow2");
            let now = order(dir);
            flips += usize::from(now != last);
            last = now;
        }
        assert!(
            flips >= 4,
            "{}: QEMU rewrote the header only {flips} times",
            v.name
        );
        info_same(dir, "img.qcow2");
        reads_ok(dir, v);
        // The bitmap made before the metadata still recorded the writes.
        if v.bitmap {
            let o = qemu_img(dir, ["info", "--output=json", "img.qcow2"]);
            assert!(o.stdout.contains("\"b0\""), "{}", o.stdout);
        }
    }
}

#[test]
fn qimg_keeps_metadata_through_its_own_header_rewrites() {
    if skip() {
        return;
    }
    for v in VARIANTS {
        let t = Tmp::new(&format!("meta-qimg-{}", v.name));
        let dir = t.path();
        make_variant(dir, v);
        set_standard(dir);
        let want = expected_listing(GUID);
        for op in qemu_rewrites(v) {
            let o = qimg(dir, &op);
            assert!(o.success(), "{}: {}", v.name, o.describe());
            assert_eq!(listing(dir, "img.qcow2"), want, "{}: after {op:?}", v.name);
            check_clean(dir, "img.qcow2");
        }
        info_same(dir, "img.qcow2");
        reads_ok(dir, v);
    }
}

#[test]
fn edits_apply_in_order_and_undo_to_identical_file() {
    if skip() {
        return;
    }
    let t = Tmp::new("meta-edits");
    let dir = t.path();
    for opts in ["", "compat=0.10,cluster_size=512"] {
        mk(dir, opts, "img.qcow2", "4M");
        io(dir, "qcow2", "img.qcow2", WRITES);
        std::fs::copy(dir.join("img.qcow2"), dir.join("orig.qcow2")).unwrap();
        assert_eq!(listing(dir, "img.qcow2"), "guid: none\nmetadata: none\n");

        let o = meta_ok(dir, &["--new-guid", "--set", "a=1", "img.qcow2"]);
        let g = o.stdout.trim().to_string();
        assert!(Guid::parse(&g).is_ok(), "{g:?}");
        assert_eq!(g.as_bytes()[14], b'4', "version 4: {g}");
        assert_eq!(
            listing(dir, "img.qcow2"),
            format!("guid: {g}\nmetadata:\n    a: 1\n")
        );
        // In command-line order: b is set, then removed again; a replaced.
        meta_ok(
            dir,
            &[
                "--set",
                "b=2",
                "--set",
                "a=x=y",
                "--remove",
                "b",
                "--set",
                "c=",
                "img.qcow2",
            ],
        );
        let j = parse_json(&meta_ok(dir, &["--output=json", "img.qcow2"]).stdout);
        assert_eq!(j["guid"], g.as_str());
        assert_eq!(
            j["metadata"],
            serde_json::json!([{"key": "a", "value": "x=y"}, {"key": "c", "value": ""}])
        );
        // A missing key fails the whole command: nothing else changes.
        let before = std::fs::read(dir.join("img.qcow2")).unwrap();
        meta_fails(
            dir,
            &["--set", "z=1", "--remove", "nope", "img.qcow2"],
            "Metadata key 'nope' not found",
        );
        assert_eq!(std::fs::read(dir.join("img.qcow2")).unwrap(), before);
        // Setting what is already there writes nothing (the file keeps its mtime too).
        meta_ok(dir, &["--set", "a=x=y", "img.qcow2"]);
        assert_eq!(std::fs::read(dir.join("img.qcow2")).unwrap(), before);

        meta_ok(dir, &["--clear", "--remove-guid", "img.qcow2"]);
        assert_eq!(listing(dir, "img.qcow2"), "guid: none\nmetadata: none\n");
        assert_files_equal(&dir.join("img.qcow2"), &dir.join("orig.qcow2"));
    }
}

#[test]
fn library_api_and_binary_values() {
    if skip() {
        return;
    }
    let t = Tmp::new("meta-lib");
    let dir = t.path();
    mk(dir, "", "img.qcow2", "4M");
    let path = dir.join("img.qcow2");
    let g = {
        let st = Arc::new(FileStorage::open(&path, true).unwrap());
        let mut q = Qcow2::open(
            st,
            Qcow2Options {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap();
        use qimg::image::Image;
        q.write_at(&[0xa5; 4096], 65536).unwrap();
        q.set_metadata("bin", &[0, 0xff, 0x10]).unwrap();
        q.set_metadata("text", b"line1\nline2").unwrap();
        let g = q.generate_guid().unwrap();
        assert_eq!(q.guid().unwrap(), Some(g));
        assert_eq!(q.metadata().unwrap().len(), 2);
        q.remove_metadata("text").unwrap();
        assert!(q.remove_metadata("text").is_err());
        q.set_metadata("text", b"line1\nline2").unwrap();
        assert!(q.set_metadata("a=b", b"").is_err());
        let space = q.metadata_space();
        assert_eq!(space.cluster_size, 65536);
        assert_eq!(space.reserved, 32);
        q.close().unwrap();
        g
    };
    assert_eq!(
        listing(dir, "img.qcow2"),
        format!(
            "guid: {g}\nmetadata:\n    bin (hex): 00ff10\n    text (hex): 6c696e65310a6c696e6532\n"
        )
    );
    let j = parse_json(&meta_ok(dir, &["--output=json", "img.qcow2"]).stdout);
    assert_eq!(j["metadata"][0]["value-hex"], "00ff10");
    assert_eq!(j["metadata"][1]["value"], "line1\nline2");
    // The CLI sets binary values in hexadecimal; listing them gives the same digits.
    meta_ok(
        dir,
        &["--set-hex", "bin=FF00", "--set-hex", "t=6869", "img.qcow2"],
    );
    let st = Arc::new(FileStorage::open(&path, false).unwrap());
    let q = Qcow2::open(st, Qcow2Options::default()).unwrap();
    let m = q.metadata().unwrap();
    assert_eq!(m["bin"], [0xff, 0]);
    assert_eq!(m["t"], b"hi");
    drop(q);
    assert!(listing(dir, "img.qcow2").contains("\n    bin (hex): ff00\n"));
    check_clean(dir, "img.qcow2");
    io(dir, "qcow2", "img.qcow2", &["read -P 0xa5 64k 4k"]);
}

/// Bytes the key/value extension takes for one key of 1 byte and a value of `n` bytes.
fn kv_ext_bytes(n: usize) -> usize {
    8 + (8 + 6 + 1 + n).div_ceil(8) * 8
}

#[test]
fn changes_that_do_not_fit_fail_cleanly_and_the_reserve_is_enough() {
    if skip() {
        return;
    }
    // 512-byte clusters: v3 header 112 bytes + end marker; v2 header 72 + end marker, with
    // room kept for the 40 bytes of the v3 header. Both keep 32 for the bitmaps extension.
    for (opts, used, reserved) in [
        ("cluster_size=512", 120, 32),
        ("compat=0.10,cluster_size=512", 80, 72),
    ] {
        let t = Tmp::new("meta-full");
        let dir = t.path();
        mk(dir, opts, "img.qcow2", "4M");
        io(dir, "qcow2", "img.qcow2", WRITES);
        let avail = 512 - used - reserved;
        // Largest value that fits, and one byte more.
        let fit = (0..512).rev().find(|&n| kv_ext_bytes(n) <= avail).unwrap();
        let big = "v".repeat(fit + 1);
        let before = std::fs::read(dir.join("img.qcow2")).unwrap();
        let err = meta_fails(
            dir,
            &["--set", &format!("k={big}"), "img.qcow2"],
            "Metadata does not fit in the image header",
        );
        let need = kv_ext_bytes(fit + 1);
        assert!(
            err.contains(&format!(
                "the change needs {need} more bytes, {avail} are free (header cluster 512 bytes, {used} used, {reserved} kept free for QEMU)"
            )),
            "{err}"
        );
        assert_eq!(std::fs::read(dir.join("img.qcow2")).unwrap(), before);
        // The GUID does not fit next to the largest value either.
        let val = "v".repeat(fit);
        meta_ok(dir, &["--set", &format!("k={val}"), "img.qcow2"]);
        meta_fails(dir, &["--new-guid", "img.qcow2"], "free");
        // What the reserve is for: QEMU can still upgrade and add a bitmap.
        if opts.contains("compat=0.10") {
            qemu_img_ok(dir, &["amend", "-o", "compat=1.1", "img.qcow2"]);
        }
        qemu_img_ok(dir, &["bitmap", "--add", "img.qcow2", "b"]);
        qemu_img_ok(dir, &["resize", "img.qcow2", "+1M"]);
        check_clean(dir, "img.qcow2");
        assert_eq!(
            listing(dir, "img.qcow2"),
            format!("guid: none\nmetadata:\n    k: {val}\n")
        );
        // Now the header is full: growing fails, shrinking works.
        meta_fails(dir, &["--set", "k2=x", "img.qcow2"], "0 are free");
        meta_ok(dir, &["--set", "k=short", "--new-guid", "img.qcow2"]);
        check_clean(dir, "img.qcow2");
        io(dir, "qcow2", "img.qcow2", READS);
    }
}

/// Appends extension `(typ, data)` to the header of `path` (after the others).
fn add_raw_ext(path: &Path, typ: u32, data: &[u8]) {
    let mut h = header(path);
    h.unknown_extensions.push((typ, data.to_vec()));
    let b = h.serialize().unwrap();
    let st = FileStorage::open(path, true).unwrap();
    st.write_at(&b, 0).unwrap();
    st.flush().unwrap();
}

fn kv_bytes(count: u32, entries: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut d = vec![0, 0, 0, 1];
    d.extend_from_slice(&count.to_be_bytes());
    for (k, v) in entries {
        d.extend_from_slice(&(k.len() as u16).to_be_bytes());
        d.extend_from_slice(&(v.len() as u32).to_be_bytes());
        d.extend_from_slice(k);
        d.extend_from_slice(v);
    }
    d
}

#[test]
fn malformed_extensions_give_one_line_errors() {
    if skip() {
        return;
    }
    let good = kv_bytes(2, &[(b"a", b"1"), (b"b", b"2")]);
    let mut huge_value = good.clone();
    huge_value[10..14].copy_from_slice(&[0xff; 4]);
    let mut version2 = good.clone();
    version2[3] = 2;
    let kv_cases: Vec<(&str, Vec<Vec<u8>>, &str)> = vec![
        (
            "truncated prefix",
            vec![vec![0, 0, 0]],
            "shorter than its 8-byte prefix",
        ),
        (
            "truncated entry",
            vec![good[..good.len() - 1].to_vec()],
            "exceed the",
        ),
        (
            "count too large",
            vec![kv_bytes(1000, &[(b"a", b"1")])],
            "entry count 1000",
        ),
        (
            "duplicate key",
            vec![kv_bytes(2, &[(b"a", b"1"), (b"a", b"2")])],
            "entry 1: duplicate key \"a\"",
        ),
        (
            "unsorted",
            vec![kv_bytes(2, &[(b"b", b"1"), (b"a", b"2")])],
            "out of order",
        ),
        (
            "bad utf-8",
            vec![kv_bytes(1, &[(b"\xff", b"1")])],
            "not valid UTF-8",
        ),
        ("value length", vec![huge_value], "value length 4294967295"),
        (
            "trailing",
            vec![[good.clone(), vec![9]].concat()],
            "1 bytes after",
        ),
        ("version", vec![version2], "version 2 is not supported"),
        ("twice", vec![good.clone(), good.clone()], "appears 2 times"),
    ];
    for (what, exts, fragment) in kv_cases {
        let t = Tmp::new("meta-bad");
        let dir = t.path();
        mk(dir, "", "img.qcow2", "4M");
        let path = dir.join("img.qcow2");
        for e in &exts {
            add_raw_ext(&path, KV_EXT, e);
        }
        let err = meta_fails(dir, &["img.qcow2"], fragment);
        assert!(
            err.starts_with("qimg: Could not read the metadata of 'img.qcow2': "),
            "{what}: {err}"
        );
        meta_fails(dir, &["-U", "--output=json", "img.qcow2"], fragment);
        // QEMU does not look inside; qimg's info and check do not either.
        info_same(dir, "img.qcow2");
        assert_same(dir, &["check", "img.qcow2"]);
        // Edits that need the damaged contents fail without touching the file...
        let before = std::fs::read(&path).unwrap();
        meta_fails(dir, &["--set", "c=3", "img.qcow2"], fragment);
        meta_fails(dir, &["--remove", "a", "img.qcow2"], fragment);
        assert_eq!(std::fs::read(&path).unwrap(), before, "{what}");
        // ...a GUID can still be set (the damaged extension is kept as it is)...
        meta_ok(dir, &["--guid", GUID, "img.qcow2"]);
        meta_fails(dir, &["img.qcow2"], fragment);
        // ...and --clear replaces it.
        meta_ok(dir, &["--clear", "--set", "c=3", "img.qcow2"]);
        assert_eq!(
            listing(dir, "img.qcow2"),
            format!("guid: {GUID}\nmetadata:\n    c: 3\n"),
            "{what}"
        );
        check_clean(dir, "img.qcow2");
    }
    for (what, exts, fragment) in [
        ("short", vec![vec![1u8; 15]], "length 15 (expected 16)"),
        ("long", vec![vec![1u8; 17]], "length 17 (expected 16)"),
        (
            "twice",
            vec![vec![1u8; 16], vec![2u8; 16]],
            "appears 2 times",
        ),
    ] {
        let t = Tmp::new("meta-badguid");
        let dir = t.path();
        mk(dir, "cluster_size=512", "img.qcow2", "4M");
        let path = dir.join("img.qcow2");
        for e in &exts {
            add_raw_ext(&path, GUID_EXT, e);
        }
        meta_fails(dir, &["img.qcow2"], fragment);
        info_same(dir, "img.qcow2");
        // Keys can be set next to the damaged GUID; a new GUID replaces it.
        meta_ok(dir, &["--set", "k=v", "img.qcow2"]);
        meta_fails(dir, &["img.qcow2"], fragment);
        meta_ok(dir, &["--guid", GUID, "img.qcow2"]);
        assert_eq!(
            listing(dir, "img.qcow2"),
            format!("guid: {GUID}\nmetadata:\n    k: v\n"),
            "{what}"
        );
        check_clean(dir, "img.qcow2");
    }
}

#[test]
fn command_line_errors_and_locking() {
    if skip() {
        return;
    }
    let t = Tmp::new("meta-cli");
    let dir = t.path();
    mk(dir, "", "img.qcow2", "4M");
    qemu_img_ok(dir, &["create", "-q", "-f", "raw", "disk.raw", "1M"]);
    meta_fails(
        dir,
        &["disk.raw"],
        "only qcow2 images have a GUID and metadata",
    );
    meta_fails(dir, &["-f", "raw", "--new-guid", "disk.raw"], "raw image");
    meta_fails(
        dir,
        &["--set", "noequals", "img.qcow2"],
        "--set KEY=VALUE needs a '='",
    );
    meta_fails(
        dir,
        &["--set-hex", "k=abc", "img.qcow2"],
        "not an even number",
    );
    meta_fails(dir, &["--set", "a\tb=1", "img.qcow2"], "control character");
    meta_fails(dir, &["--guid", "not-a-guid", "img.qcow2"], "Invalid GUID");
    meta_fails(dir, &["missing.qcow2"], "Could not open 'missing.qcow2'");
    let o = qimg(dir, ["meta", "-U", "--set", "a=b", "img.qcow2"]);
    assert_eq!(o.code(), Some(1));
    assert!(o.stderr.contains("only for listing"), "{}", o.stderr);
    let o = qimg(dir, ["meta", "--help"]);
    assert_eq!(o.code(), Some(0));
    assert!(
        o.stdout.contains("qimg's own: qemu-img has none like it"),
        "{}",
        o.stdout
    );
    assert!(o.stdout.contains("\n  qimg meta [-f qcow2"), "{}", o.stdout);
    assert!(o.stdout.contains("--set KEY=VALUE"), "{}", o.stdout);

    // Another writer holds the image: changes and a plain listing are refused, -U lists.
    meta_ok(dir, &["--set", "k=v", "img.qcow2"]);
    let held = qimg::open::open_locked(
        &dir.join("img.qcow2"),
        &qimg::open::OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap();
    // QEMU's lock message, with its second line ("Is another process using ...").
    for (args, lock) in [
        (&["meta", "--set", "k=w", "img.qcow2"][..], "\"write\" lock"),
        (&["meta", "img.qcow2"], "shared \"write\" lock"),
    ] {
        let o = qimg(dir, args);
        assert_eq!(o.code(), Some(1), "{}", o.describe());
        let want = format!("qimg: Could not open 'img.qcow2': Failed to get {lock}\n");
        assert!(o.stderr.starts_with(&want), "{}", o.describe());
    }
    drop(held);
    meta_ok(dir, &["--set", "k=w", "img.qcow2"]);

    // An image marked corrupt is listed but not changed, as QEMU opens it read-only only.
    let mut b = std::fs::read(dir.join("img.qcow2")).unwrap();
    b[79] |= 2;
    std::fs::write(dir.join("corrupt.qcow2"), &b).unwrap();
    meta_fails(
        dir,
        &["--new-guid", "corrupt.qcow2"],
        "Image is corrupt; cannot be opened read/write",
    );
    assert_eq!(std::fs::read(dir.join("corrupt.qcow2")).unwrap(), b);
    assert_eq!(
        listing(dir, "corrupt.qcow2"),
        "guid: none\nmetadata:\n    k: w\n"
    );

    // External data file: only the header changes; the data file is not even opened.
    qemu_img_ok(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=d.raw,data_file_raw=on",
            "df.qcow2",
            "4M",
        ],
    );
    io(dir, "qcow2", "df.qcow2", &["write -P 0x12 0 64k"]);
    meta_ok(dir, &["--set", "k=v", "--guid", GUID, "df.qcow2"]);
    assert_eq!(
        listing(dir, "df.qcow2"),
        format!("guid: {GUID}\nmetadata:\n    k: v\n")
    );
    check_clean(dir, "df.qcow2");
    info_same(dir, "df.qcow2");
    io(dir, "qcow2", "df.qcow2", &["read -P 0x12 0 64k"]);
    // --image-opts names the file as other commands accept it.
    let o = meta_ok(
        dir,
        &["--image-opts", "driver=qcow2,file.filename=df.qcow2"],
    );
    assert!(o.stdout.contains(GUID), "{}", o.stdout);
}

#[test]
fn force_share_lists_while_qemu_io_writes() {
    if skip() {
        return;
    }
    let t = Tmp::new("meta-share");
    let dir = t.path();
    mk(dir, "", "img.qcow2", "4M");
    meta_ok(dir, &["--set", "k=v", "--guid", GUID, "img.qcow2"]);
    // qemu-io keeps the image open read-write while `sleep` runs.
    let mut child = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write 0 4k",
            "-c",
            "sleep 3000",
            "img.qcow2",
        ])
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(800));
    let held = qimg(dir, ["meta", "img.qcow2"]);
    let shared = qimg(dir, ["meta", "-U", "img.qcow2"]);
    let change = qimg(dir, ["meta", "--set", "k=w", "img.qcow2"]);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(held.code(), Some(1), "{}", held.describe());
    assert!(held.stderr.contains("lock"), "{}", held.stderr);
    assert_eq!(change.code(), Some(1), "{}", change.describe());
    assert_eq!(shared.code(), Some(0), "{}", shared.describe());
    assert_eq!(
        shared.stdout,
        format!("guid: {GUID}\nmetadata:\n    k: v\n")
    );
}

#[test]
fn create_with_guid_option() {
    if skip() {
        return;
    }
    let t = Tmp::new("meta-create");
    let dir = t.path();
    let a = dir.join("a");
    let b = dir.join("b");
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let ours = qimg(
        &a,
        [
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "-o",
            &format!("guid={GUID}"),
            "img.qcow2",
            "4M",
        ],
    )
    .ok();
    let theirs = qemu_img_ok(
        &b,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "img.qcow2",
            "4M",
        ],
    );
    assert_eq!(ours.stdout, theirs.stdout);
    assert_eq!(
        listing(&a, "img.qcow2"),
        format!("guid: {GUID}\nmetadata: none\n")
    );
    check_clean(&a, "img.qcow2");
    meta_ok(&a, &["--remove-guid", "img.qcow2"]);
    assert_files_equal(&a.join("img.qcow2"), &b.join("img.qcow2"));

    qimg(
        dir,
        [
            "create", "-q", "-f", "qcow2", "-o", "guid=on", "r.qcow2", "1M",
        ],
    )
    .ok();
    let l = listing(dir, "r.qcow2");
    let g = l.lines().next().unwrap().strip_prefix("guid: ").unwrap();
    assert!(Guid::parse(g).is_ok(), "{l}");

    let o = qimg(
        dir,
        [
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "guid=xyz",
            "bad.qcow2",
            "1M",
        ],
    );
    assert_eq!(o.code(), Some(1));
    assert!(
        o.stderr.contains("Parameter 'guid' expects"),
        "{}",
        o.stderr
    );
    assert!(!dir.join("bad.qcow2").exists());
    // Other formats refuse it as qemu-img does.
    assert_same(
        dir,
        &["create", "-q", "-f", "raw", "-o", "guid=on", "x.raw", "1M"],
    );
}

/// Changes that span several header sectors go through the staged update (backing file
/// name moved first, then the switch sector last); QEMU must read every result.
#[test]
fn large_changes_with_a_backing_file() {
    if skip() {
        return;
    }
    for opts in ["", "cluster_size=4096,compat=0.10"] {
        let t = Tmp::new("meta-large");
        let dir = t.path();
        let v = Variant {
            name: "large",
            create: opts,
            backing: true,
            bitmap: false,
        };
        make_variant(dir, &v);
        let a = "a".repeat(2000);
        let b = "b".repeat(1500);
        for (args, want) in [
            (
                vec![
                    "--set",
                    &*format!("blob={a}"),
                    "--set",
                    "small=1",
                    "--guid",
                    GUID,
                ],
                format!("guid: {GUID}\nmetadata:\n    blob: {a}\n    small: 1\n"),
            ),
            (
                vec!["--set", &*format!("blob={b}"), "--set", "c=2"],
                format!("guid: {GUID}\nmetadata:\n    blob: {b}\n    c: 2\n    small: 1\n"),
            ),
            (
                vec!["--remove", "blob"],
                format!("guid: {GUID}\nmetadata:\n    c: 2\n    small: 1\n"),
            ),
            (
                vec!["--clear", "--remove-guid"],
                "guid: none\nmetadata: none\n".into(),
            ),
            (
                vec!["--set", &*format!("blob={a}")],
                format!("guid: none\nmetadata:\n    blob: {a}\n"),
            ),
        ] {
            let mut args = args.clone();
            args.push("img.qcow2");
            meta_ok(dir, &args);
            assert_eq!(listing(dir, "img.qcow2"), want, "{opts}: {args:?}");
            check_clean(dir, "img.qcow2");
            info_same(dir, "img.qcow2");
            reads_ok(dir, &v);
        }
        qemu_img_ok(dir, &["resize", "img.qcow2", "+1M"]);
        assert_eq!(
            listing(dir, "img.qcow2"),
            format!("guid: none\nmetadata:\n    blob: {a}\n")
        );
        reads_ok(dir, &v);
    }
}
