//! Runs `qimg` (through a symlink named `qemu-img`) and the installed `qemu-img` on the
//! same bad command lines and requires identical diagnostics and exit codes. Also checks
//! the size parser and formatter against qemu-img's own output. Skipped when qemu-img is
//! not installed.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use qimg_cli::fmt::size_to_str;
use qimg_cli::opts::{parse_size, SizeError};

/// A scratch directory with a `qemu-img` symlink to the qimg binary; removed on drop.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("qimg-cli-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_qimg"), dir.join("qemu-img"))
            .expect("symlink qimg");
        Self { dir }
    }

    fn qimg(&self, args: &[&str]) -> Output {
        run(
            Command::new(self.dir.join("qemu-img")).arg0("qemu-img"),
            &self.dir,
            args,
        )
    }

    fn qemu(&self, args: &[&str]) -> Output {
        run(&mut Command::new("qemu-img"), &self.dir, args)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run(cmd: &mut Command, dir: &Path, args: &[&str]) -> Output {
    cmd.args(args)
        .current_dir(dir)
        .env_remove("POSIXLY_CORRECT")
        .output()
        .expect("run command")
}

fn have_qemu_img() -> bool {
    let ok = Command::new("qemu-img").arg("--version").output().is_ok();
    if !ok {
        eprintln!("qemu-img not installed; skipping comparison");
    }
    ok
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn assert_same(s: &Scratch, args: &[&str]) {
    let q = s.qemu(args);
    let m = s.qimg(args);
    assert_eq!(text(&m.stderr), text(&q.stderr), "stderr of {args:?}");
    assert_eq!(m.status.code(), q.status.code(), "exit code of {args:?}");
}

#[test]
fn unknown_command_and_top_level_options() {
    if !have_qemu_img() {
        return;
    }
    let s = Scratch::new("top");
    for args in [
        &["frob"][..],
        &[],
        &["-Z"],
        &["--bogus"],
        &["--help=x"],
        &["-T"],
        &["-"],
        &["INFO"],
        &["--bogus", "frob"],
    ] {
        assert_same(&s, args);
    }
}

#[test]
fn getopt_errors() {
    if !have_qemu_img() {
        return;
    }
    let s = Scratch::new("getopt");
    for args in [
        &["info", "--bogus"][..],
        &["info", "--bogus=3", "x"],
        &["info", "-Z"],
        &["info", "-UZ"],
        &["create", "-f"],
        &["check", "-r"],
        &["convert", "-O"],
        &["info", "--output"],
        &["info", "--o=json"],
        &["info", "--fo=x"],
        &["info", "--backing-chain=x"],
        &["convert", "--s=1", "a", "b"],
        &["rebase", "--c", "a"],
        &["bitmap", "--merge"],
        &["resize", "-1M"],
        &["resize", "a", "1M", "-1M"],
        &["compare", "--help=x"],
    ] {
        assert_same(&s, args);
    }
}

#[test]
fn usage_errors() {
    if !have_qemu_img() {
        return;
    }
    let s = Scratch::new("usage");
    for args in [
        &["info"][..],
        &["info", "a", "b"],
        &["check", "-r", "foo", "x"],
        &["map", "--output=foo", "x"],
        &["compare", "a"],
        &["measure"],
        &["measure", "a", "b"],
        &["measure", "-l", "x"],
        &["convert", "a"],
        &["convert", "--target-is-zero", "a", "b"],
        &["snapshot", "-l", "-c", "x", "a"],
        &["rebase", "a"],
        &["resize", "a"],
        &["resize", "a", "1", "2"],
        &["amend", "a"],
        &["bitmap", "a", "b"],
        &["dd", "foo=1", "if=a", "of=b"],
        &["dd", "if=a"],
    ] {
        assert_same(&s, args);
    }
}

#[test]
fn bad_sizes() {
    if !have_qemu_img() {
        return;
    }
    let s = Scratch::new("sizes");
    for args in [
        &["create", "-f", "raw", "x.img", "1Q"][..],
        &["create", "-f", "raw", "x.img", "--", "-1"],
        &["create", "-f", "raw", "x.img", "8E"],
        &["create", "-f", "raw", "x.img", "1.5"],
        &["measure", "--size", "1e3"],
        &["convert", "-S", "100", "a", "b"],
        &["convert", "-m", "17", "a", "b"],
        &["map", "--start-offset", "x", "a"],
        &["dd", "bs=0", "if=a", "of=b"],
        &["resize", "a", "1Q"],
        &["create", "-f", "qcow2", "-o", "", "x.img"],
    ] {
        assert_same(&s, args);
    }
}

#[test]
fn help_texts_match() {
    if !have_qemu_img() {
        return;
    }
    let s = Scratch::new("help");
    for cmd in [
        "amend", "bench", "bitmap", "check", "commit", "compare", "convert", "create", "dd",
        "info", "map", "measure", "rebase", "resize", "snapshot",
    ] {
        let q = s.qemu(&[cmd, "--help"]);
        let m = s.qimg(&[cmd, "-h"]);
        assert_eq!(text(&m.stdout), text(&q.stdout), "{cmd} --help");
        assert_eq!(m.status.code(), Some(0));
    }
}

/// The size qemu-img accepts for `create` (`Ok(bytes)`), or whether it called the value
/// invalid or out of range.
fn qemu_size(s: &Scratch, size: &str) -> Result<u64, SizeError> {
    // A path in a missing directory: qemu-img prints the size, then fails to create.
    let out = s.qemu(&["create", "-f", "raw", "missing/x", "--", size]);
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    if let Some(pos) = stdout.find("size=") {
        let digits: String = stdout[pos + 5..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        return Ok(digits.parse().expect("size digits"));
    }
    if stderr.contains("Must be between") {
        Err(SizeError::Range)
    } else {
        Err(SizeError::Invalid)
    }
}

#[test]
fn size_parser_agrees_with_qemu() {
    if !have_qemu_img() {
        return;
    }
    let s = Scratch::new("parse");
    let cases = [
        "0",
        "1",
        "512",
        "1k",
        "1K",
        "1.5M",
        "1.3k",
        "0.0001k",
        ".5k",
        " .5k",
        "1.k",
        "1.",
        "1.0",
        "1.0b",
        "4.5b",
        "0x10",
        "0X1f",
        "0x",
        "0x1k",
        "00x10",
        "010",
        " 1",
        "+5",
        "1 ",
        "",
        "k",
        "1e3",
        "1.5e1k",
        "1kb",
        "-1",
        "-0",
        "-1k",
        "-.5",
        "-.5k",
        "7E",
        "7.99E",
        "8E",
        "0.99999999999999999999999k",
        "1.00000000000000000001k",
        "1.5E",
        "123456789012345678901234567890",
        "9223372036854775807",
        "9223372036854775808",
        "0x7fffffffffffffff",
        "0x8000000000000000",
        "3.14159G",
        "2.000000001T",
        "0.1b",
        "12345.6789k",
        "0.00000000000000000000000000001k",
        "inf",
        "nan",
        "1,5k",
        ".",
        "..5k",
    ];
    for size in cases {
        let ours = match parse_size(size) {
            Ok(v) if v > i64::MAX as u64 => Err(SizeError::Range),
            other => other,
        };
        assert_eq!(ours, qemu_size(&s, size), "size {size:?}");
    }
}

#[test]
fn size_formatter_agrees_with_qemu() {
    if !have_qemu_img() {
        return;
    }
    let s = Scratch::new("fmt");
    let sizes: &[u64] = &[
        0,
        1,
        999,
        1000,
        1023,
        1024,
        1536,
        1_022_976,
        1_023_488,
        1_047_552,
        655_872,
        1_023_487,
        1_023_990,
        1_048_064,
        1_048_576,
        1_216_512,
        10 << 20,
        1_000 << 20,
        1_023 << 20,
        (1 << 30) + 1,
        5 << 40,
        1_125_899_906_842_623,
        1 << 50,
        7 << 60,
    ];
    let file = s.dir.join("sparse.raw");
    for &size in sizes {
        // qemu-img reports raw sizes rounded up to whole sectors.
        let size = size.div_ceil(512) * 512;
        let f = std::fs::File::create(&file).expect("create sparse file");
        if f.set_len(size).is_err() {
            continue;
        }
        drop(f);
        let out = s.qemu(&["info", "-f", "raw", "sparse.raw"]);
        let stdout = text(&out.stdout);
        let line = stdout
            .lines()
            .find(|l| l.starts_with("virtual size: "))
            .unwrap_or_else(|| panic!("no virtual size for {size}: {stdout}"));
        assert_eq!(
            line,
            format!("virtual size: {} ({size} bytes)", size_to_str(size)),
            "size_to_str({size})"
        );
    }
}

#[test]
fn json_printer_reproduces_qemu_output() {
    if !have_qemu_img() {
        return;
    }
    let s = Scratch::new("json");
    std::fs::File::create(s.dir.join("j.raw"))
        .and_then(|f| f.set_len(1 << 20))
        .expect("create raw image");
    for args in [
        &["info", "--output=json", "-f", "raw", "j.raw"][..],
        &["check", "--output=json", "-f", "raw", "j.raw"],
        &["measure", "--output=json", "-O", "qcow2", "--size", "10G"],
        &[
            "measure",
            "--output=json",
            "-O",
            "raw",
            "-f",
            "raw",
            "j.raw",
        ],
    ] {
        let out = s.qemu(args);
        let printed = text(&out.stdout);
        if printed.is_empty() {
            continue; // e.g. check on raw has nothing to print
        }
        // Parsing keeps qemu's printed order; re-rendering must give the same bytes
        // (none of these keys share a hash bucket, so insertion order does not matter).
        let v: serde_json::Value = serde_json::from_str(&printed).expect("qemu JSON");
        assert_eq!(qimg_cli::fmt::to_json_pretty(&v), printed, "{args:?}");
    }
}
