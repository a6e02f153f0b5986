//! Shared harness for the integration tests that compare `qimg` with QEMU's tools.
//!
//! The binary under test is `$QIMG_TEST_BIN` when set, else the `qimg` binary cargo built.
//! Running the suite with `QIMG_TEST_BIN=/usr/bin/qemu-img` checks the tests themselves:
//! every comparison must then pass, because qemu-img is identical to itself.
//!
//! Every child process runs with a wall-clock timeout (it is killed and the test fails when
//! it runs over) and an address-space limit (`RLIMIT_AS`), so that a runaway allocation in the
//! binary under test fails the test instead of taking the machine down.
//!
//! Commands run with the test's temporary directory as their working directory and are given
//! relative file names, so that file names printed by both tools are the same string.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Default wall-clock limit for one child process.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Default address-space limit for one child process (4 GiB).
pub const DEFAULT_AS_LIMIT: u64 = 4 << 30;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

/// Path of the binary under test.
pub fn bin_under_test() -> PathBuf {
    match std::env::var_os("QIMG_TEST_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_qimg")),
    }
}

/// File name of the binary under test (`qimg`, or `qemu-img` when checking the tests).
pub fn prog_name() -> String {
    bin_under_test()
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "qimg".into())
}

/// True when the binary under test is qemu-img itself (self-check of the suite). Only tests
/// of qimg-only behaviour consult this.
pub fn testing_qemu_img_itself() -> bool {
    prog_name() == "qemu-img"
}

/// Result of one child process.
#[derive(Debug, Clone)]
pub struct Out {
    /// Human-readable command line, for failure messages.
    pub cmdline: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub stdout_bytes: Vec<u8>,
    pub timed_out: bool,
    pub elapsed: Duration,
}

impl Out {
    /// Exit code; `None` when killed by a signal.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    pub fn signal(&self) -> Option<i32> {
        self.status.signal()
    }

    pub fn success(&self) -> bool {
        !self.timed_out && self.status.success()
    }

    /// Panics (fails the test) unless the command exited with status 0.
    #[track_caller]
    pub fn ok(self) -> Self {
        assert!(
            self.success(),
            "command failed: {}\n{}",
            self.cmdline,
            self.describe()
        );
        self
    }

    pub fn describe(&self) -> String {
        format!(
            "status: {:?} (signal {:?}, timed out: {}, {:?})\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code(),
            self.signal(),
            self.timed_out,
            self.elapsed,
            self.stdout,
            self.stderr
        )
    }
}

/// Limits applied to a child process.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub timeout: Duration,
    pub as_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout: DEFAULT_TIMEOUT,
            as_bytes: DEFAULT_AS_LIMIT,
        }
    }
}

/// Runs `prog args...` in `cwd` with the given limits. Never hangs: the child is killed once
/// the timeout passes (and `timed_out` is set). stdin is /dev/null.
pub fn run_with<I, S>(prog: &Path, args: I, cwd: &Path, limits: Limits) -> Out
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let cmdline = std::iter::once(prog.as_os_str())
        .chain(args.iter().map(|a| a.as_os_str()))
        .map(|a| shell_quote(&a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ");
    let mut cmd = Command::new(prog);
    cmd.args(&args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Stable messages and number formats.
        .env("LC_ALL", "C")
        .env_remove("QEMU_IMG_OPTS");
    let as_bytes = limits.as_bytes;
    // SAFETY: only async-signal-safe calls (setrlimit) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: as_bytes as libc::rlim_t,
                rlim_max: as_bytes as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // No core dumps from crashing children.
            let zero = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &zero);
            Ok(())
        });
    }
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmdline} in {}: {e}", cwd.display()));
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let mut timed_out = false;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for child") {
            break st;
        }
        if start.elapsed() > limits.timeout {
            timed_out = true;
            let _ = child.kill();
            break child.wait().expect("wait for killed child");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let elapsed = start.elapsed();
    let stdout_bytes = t_out.join().unwrap();
    let stderr = String::from_utf8_lossy(&t_err.join().unwrap()).into_owned();
    Out {
        cmdline,
        status,
        stdout: String::from_utf8_lossy(&stdout_bytes).into_owned(),
        stderr,
        stdout_bytes,
        timed_out,
        elapsed,
    }
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=,:+@%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Asserts the invariants every run of the binary under test must keep, whatever its input:
/// it ended in time, it was not killed by a signal, and it did not panic.
#[track_caller]
pub fn assert_sane(o: &Out) {
    assert!(
        !o.timed_out,
        "timed out after {:?}: {}\n{}",
        o.elapsed,
        o.cmdline,
        o.describe()
    );
    assert!(
        o.signal().is_none(),
        "killed by signal: {}\n{}",
        o.cmdline,
        o.describe()
    );
    assert!(
        !o.stderr.contains("panicked"),
        "panic: {}\n{}",
        o.cmdline,
        o.describe()
    );
    assert!(
        !o.stdout.contains("panicked"),
        "panic: {}\n{}",
        o.cmdline,
        o.describe()
    );
}

/// Runs the binary under test with default limits; asserts [`assert_sane`].
#[track_caller]
pub fn qimg<I, S>(cwd: &Path, args: I) -> Out
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    qimg_with(cwd, args, Limits::default())
}

/// Runs the binary under test with the given limits; asserts [`assert_sane`].
#[track_caller]
pub fn qimg_with<I, S>(cwd: &Path, args: I, limits: Limits) -> Out
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let o = run_with(&bin_under_test(), args, cwd, limits);
    assert_sane(&o);
    o
}

/// Runs the reference qemu-img.
#[track_caller]
pub fn qemu_img<I, S>(cwd: &Path, args: I) -> Out
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let o = run_with(Path::new("qemu-img"), args, cwd, Limits::default());
    assert!(
        !o.timed_out && o.signal().is_none(),
        "qemu-img misbehaved: {}",
        o.describe()
    );
    o
}

/// Runs qemu-io (used to build test images).
#[track_caller]
pub fn qemu_io<I, S>(cwd: &Path, args: I) -> Out
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let o = run_with(Path::new("qemu-io"), args, cwd, Limits::default());
    assert!(
        !o.timed_out && o.signal().is_none(),
        "qemu-io misbehaved: {}",
        o.describe()
    );
    o
}

/// Runs qemu-io commands on an image (`-f fmt`), each `-c CMD`; fails the test if qemu-io
/// fails or reports an error in its output (qemu-io exits 0 even when a command fails).
#[track_caller]
pub fn io(cwd: &Path, fmt: &str, img: &str, cmds: &[&str]) {
    io_opts(cwd, &["-f", fmt], img, cmds)
}

/// Like [`io`], with arbitrary leading qemu-io options (e.g. `--image-opts`).
#[track_caller]
pub fn io_opts(cwd: &Path, opts: &[&str], img: &str, cmds: &[&str]) {
    if cmds.is_empty() {
        return;
    }
    let mut args: Vec<String> = opts.iter().map(|s| s.to_string()).collect();
    for c in cmds {
        args.push("-c".into());
        args.push(c.to_string());
    }
    args.push(img.into());
    let o = qemu_io(cwd, &args).ok();
    let bad = o
        .stdout
        .lines()
        .chain(o.stderr.lines())
        .find(|l| l.contains("failed") || l.contains("error") || l.contains("Error"));
    assert!(
        bad.is_none(),
        "qemu-io reported an error: {}\n{}",
        o.cmdline,
        o.describe()
    );
}

/// Runs `qemu-img` with the given arguments and requires success.
#[track_caller]
pub fn qemu_img_ok(cwd: &Path, args: &[&str]) -> Out {
    qemu_img(cwd, args).ok()
}

/// A fresh temporary directory, removed when dropped (kept when `QIMG_KEEP_TMP` is set, to
/// look at a failing case).
pub struct Tmp {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl Tmp {
    pub fn new(tag: &str) -> Tmp {
        let dir = tempfile::Builder::new()
            .prefix(&format!("qimgtest-{tag}-"))
            .tempdir()
            .expect("create temp dir");
        let path = dir.path().to_path_buf();
        if std::env::var_os("QIMG_KEEP_TMP").is_some() {
            let _ = dir.keep();
            Tmp { dir: None, path }
        } else {
            Tmp {
                dir: Some(dir),
                path,
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Makes a subdirectory and returns its path.
    pub fn subdir(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }
}

impl Drop for Tmp {
    fn drop(&mut self) {
        drop(self.dir.take());
    }
}

/// Compares two files byte for byte; `Err` names the first differing offset or the sizes.
pub fn compare_files(a: &Path, b: &Path) -> Result<(), String> {
    let mut fa = File::open(a).map_err(|e| format!("{}: {e}", a.display()))?;
    let mut fb = File::open(b).map_err(|e| format!("{}: {e}", b.display()))?;
    let la = fa.metadata().unwrap().len();
    let lb = fb.metadata().unwrap().len();
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba);
        let nb = read_full(&mut fb, &mut bb);
        let n = na.min(nb);
        if let Some(i) = (0..n).find(|&i| ba[i] != bb[i]) {
            return Err(format!(
                "{} and {} differ at byte {} ({:#x}): {:#04x} vs {:#04x} (sizes {la} / {lb})",
                a.display(),
                b.display(),
                off + i as u64,
                off + i as u64,
                ba[i],
                bb[i]
            ));
        }
        if na != nb {
            return Err(format!(
                "{} and {} have different sizes: {la} vs {lb} (equal up to {})",
                a.display(),
                b.display(),
                off + n as u64
            ));
        }
        if na == 0 {
            return Ok(());
        }
        off += na as u64;
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("read: {e}"),
        }
    }
    n
}

#[track_caller]
pub fn assert_files_equal(a: &Path, b: &Path) {
    if let Err(e) = compare_files(a, b) {
        panic!("{e}");
    }
}

/// Parses JSON, failing the test with the text on error.
#[track_caller]
pub fn parse_json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("invalid JSON ({e}):\n{s}"))
}

/// Replaces the program name in messages, so qimg's "qimg: error" equals qemu-img's
/// "qemu-img: error". Only the name at the start of a line (`NAME: ` / `NAME CMD: `) and
/// in the usage hint (`Try 'NAME ...`) is replaced, never inside file names.
pub fn normalize_prog(s: &str, prog: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for line in s.split_inclusive('\n') {
        let mut l = line.to_string();
        if let Some(rest) = l.strip_prefix(prog) {
            if rest.starts_with(':') || rest.starts_with(' ') {
                l = format!("PROG{rest}");
            }
        }
        l = l.replace(&format!("Try '{prog} "), "Try 'PROG ");
        l = l.replace(&format!("Try '{prog}'"), "Try 'PROG'");
        out.push_str(&l);
    }
    out
}

/// Normalizes qemu-img's stderr/stdout for comparison with the binary under test.
pub fn norm_theirs(s: &str) -> String {
    normalize_prog(s, "qemu-img")
}

/// Normalizes the binary under test's stderr/stdout. Usage messages may name the program by
/// its argv[0] (the full path the harness ran) or by its base name.
pub fn norm_ours(s: &str) -> String {
    let full = bin_under_test().to_string_lossy().into_owned();
    normalize_prog(&normalize_prog(s, &full), &prog_name())
}

/// Volatile fields of `info --output=json`, for images that were *created separately* by the
/// two tools (never needed when both tools read the same file):
/// - `actual-size` is the file system's block allocation (st_blocks), which depends on the
///   file system's allocation heuristics and timing (delayed allocation, extent
///   preallocation), not on what the image format writes.
///
/// Replaces the value with 0 (both at top level and in children/backing chain entries).
pub fn normalize_info_json_text(s: &str) -> String {
    s.lines()
        .map(|l| {
            let t = l.trim_start();
            if t.starts_with("\"actual-size\":") {
                let indent = &l[..l.len() - t.len()];
                let comma = if t.trim_end().ends_with(',') { "," } else { "" };
                format!("{indent}\"actual-size\": 0{comma}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Human `info` counterpart of [`normalize_info_json_text`]: `disk size:` lines show the
/// same st_blocks figure.
pub fn normalize_info_human(s: &str) -> String {
    s.lines()
        .map(|l| {
            let t = l.trim_start();
            if t.starts_with("disk size:") {
                let indent = &l[..l.len() - t.len()];
                format!("{indent}disk size: X")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs the same arguments through qemu-img and the binary under test (same working
/// directory) and asserts identical exit code, stdout and stderr (modulo program name).
/// Only for read-only commands: both must see the same input.
#[track_caller]
pub fn assert_same(cwd: &Path, args: &[&str]) -> (Out, Out) {
    let theirs = qemu_img(cwd, args);
    let ours = qimg(cwd, args);
    assert_outputs_equal(&ours, &theirs, &|s| s.to_string());
    (ours, theirs)
}

/// Like [`assert_same`], with a normalizer applied to both stdouts.
#[track_caller]
pub fn assert_same_norm(cwd: &Path, args: &[&str], norm: &dyn Fn(&str) -> String) -> (Out, Out) {
    let theirs = qemu_img(cwd, args);
    let ours = qimg(cwd, args);
    assert_outputs_equal(&ours, &theirs, norm);
    (ours, theirs)
}

/// Asserts exit code, stdout (after `norm`) and stderr (modulo program name) are equal.
#[track_caller]
pub fn assert_outputs_equal(ours: &Out, theirs: &Out, norm: &dyn Fn(&str) -> String) {
    let so = norm(&norm_ours(&ours.stdout));
    let st = norm(&norm_theirs(&theirs.stdout));
    assert_eq!(
        so,
        st,
        "stdout differs\n ours: {}\ntheirs: {}\n--- ours ---\n{}\n--- theirs ---\n{}",
        ours.cmdline,
        theirs.cmdline,
        ours.describe(),
        theirs.describe()
    );
    assert_eq!(
        norm_ours(&ours.stderr),
        norm_theirs(&theirs.stderr),
        "stderr differs\n ours: {}\ntheirs: {}",
        ours.cmdline,
        theirs.cmdline
    );
    assert_eq!(
        ours.code(),
        theirs.code(),
        "exit code differs\n ours: {}\ntheirs: {}\n--- ours ---\n{}\n--- theirs ---\n{}",
        ours.cmdline,
        theirs.cmdline,
        ours.describe(),
        theirs.describe()
    );
}

/// `qemu-img convert -O raw IMG ref.raw` vs `qimg convert -O raw IMG out.raw`: same exit code
/// and byte-identical output.
#[track_caller]
pub fn assert_convert_raw_same(cwd: &Path, pre: &[&str], img: &str) {
    let reff = format!("{img}.ref.raw");
    let outf = format!("{img}.out.raw");
    let mut a: Vec<&str> = vec!["convert"];
    a.extend_from_slice(pre);
    a.extend_from_slice(&["-O", "raw", img, &reff]);
    let theirs = qemu_img(cwd, &a).ok();
    let mut b: Vec<&str> = vec!["convert"];
    b.extend_from_slice(pre);
    b.extend_from_slice(&["-O", "raw", img, &outf]);
    let ours = qimg(cwd, &b);
    assert!(
        ours.success(),
        "convert failed: {}\n{}",
        ours.cmdline,
        ours.describe()
    );
    assert_eq!(norm_ours(&ours.stdout), norm_theirs(&theirs.stdout));
    assert_files_equal(&cwd.join(&outf), &cwd.join(&reff));
    let _ = std::fs::remove_file(cwd.join(&outf));
    let _ = std::fs::remove_file(cwd.join(&reff));
}

/// Reads `len` bytes at `off` of a file.
pub fn read_at(path: &Path, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path).unwrap();
    let mut v = vec![0u8; len];
    f.read_exact_at(&mut v, off).unwrap();
    v
}

/// Writes bytes at `off` of a file (in place, no truncation).
pub fn write_at(path: &Path, off: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, off).unwrap();
}

pub fn be32(path: &Path, off: u64) -> u32 {
    u32::from_be_bytes(read_at(path, off, 4).try_into().unwrap())
}

pub fn be64(path: &Path, off: u64) -> u64 {
    u64::from_be_bytes(read_at(path, off, 8).try_into().unwrap())
}

pub fn put_be32(path: &Path, off: u64, v: u32) {
    write_at(path, off, &v.to_be_bytes())
}

pub fn put_be64(path: &Path, off: u64, v: u64) {
    write_at(path, off, &v.to_be_bytes())
}

pub fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

/// Writes a file of `len` bytes from a simple deterministic generator (xorshift), so raw
/// sources are reproducible without a random crate.
pub fn write_pseudo_random(path: &Path, len: usize, seed: u64) {
    let mut f = File::create(path).unwrap();
    let mut x = seed | 1;
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        buf.extend_from_slice(&x.to_le_bytes());
    }
    buf.truncate(len);
    f.write_all(&buf).unwrap();
}

/// Selected header fields of a qcow2 file (for tests that edit images).
#[derive(Debug, Clone, Copy)]
pub struct Qcow2Hdr {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub header_length: u32,
    pub refcount_order: u32,
}

impl Qcow2Hdr {
    pub fn read(path: &Path) -> Qcow2Hdr {
        let version = be32(path, 4);
        Qcow2Hdr {
            version,
            backing_file_offset: be64(path, 8),
            backing_file_size: be32(path, 16),
            cluster_bits: be32(path, 20),
            size: be64(path, 24),
            l1_size: be32(path, 36),
            l1_table_offset: be64(path, 40),
            refcount_table_offset: be64(path, 48),
            refcount_table_clusters: be32(path, 56),
            nb_snapshots: be32(path, 60),
            snapshots_offset: be64(path, 64),
            header_length: if version >= 3 { be32(path, 100) } else { 72 },
            refcount_order: if version >= 3 { be32(path, 96) } else { 4 },
        }
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Header extensions as (offset of the type field, type, length).
    pub fn extensions(&self, path: &Path) -> Vec<(u64, u32, u32)> {
        let end = if self.backing_file_offset != 0 {
            self.backing_file_offset
        } else {
            self.cluster_size()
        };
        let mut off = self.header_length as u64;
        let mut v = Vec::new();
        while off + 8 <= end {
            let t = be32(path, off);
            let l = be32(path, off + 4);
            if t == 0 {
                break;
            }
            v.push((off, t, l));
            off += 8 + (l as u64).div_ceil(8) * 8;
        }
        v
    }
}
