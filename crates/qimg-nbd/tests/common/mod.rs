//! Test harness: start qimg-nbd or qemu-nbd on a unix socket, run real clients against it
//! with a time limit, and tidy up.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Our binary.
pub fn qimg_nbd() -> &'static str {
    env!("CARGO_BIN_EXE_qimg-nbd")
}

/// Whether a tool is installed; tests needing a missing client are skipped with a note.
pub fn have(tool: &str) -> bool {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("SKIP: {tool} not installed");
    }
    ok
}

/// Runs a command with a time limit (via coreutils `timeout`) and returns its output.
pub fn run(secs: u32, prog: &str, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg("-k1")
        .arg(secs.to_string())
        .arg(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("spawn")
}

/// Runs and insists on success; returns stdout.
pub fn ok(secs: u32, prog: &str, args: &[&str]) -> String {
    let o = run(secs, prog, args);
    assert!(
        o.status.success(),
        "{prog} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A server process on a unix socket, killed on drop.
pub struct Srv {
    pub child: Child,
    pub sock: PathBuf,
}

impl Srv {
    /// Starts `prog` (`qimg_nbd()` or "qemu-nbd") with `-k SOCK ARGS...` and waits for the
    /// socket to accept connections.
    pub fn start(prog: &str, sock: &Path, args: &[&str]) -> Srv {
        let _ = std::fs::remove_file(sock);
        let child = Command::new(prog)
            .arg("-k")
            .arg(sock)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn server");
        let mut s = Srv {
            child,
            sock: sock.to_path_buf(),
        };
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            // Probe for the socket file, not with a connection: a connection is a client,
            // and a server without -t exits when its last client leaves.
            if sock.exists() {
                std::thread::sleep(Duration::from_millis(30));
                return s;
            }
            if let Ok(Some(st)) = s.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = s.child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                panic!("{prog} exited early ({st}): {err}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("{prog} did not start listening on {}", sock.display());
    }

    /// The NBD URI of export `name`.
    pub fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.sock.display())
    }

    /// Waits (bounded) for the process to exit; returns its status code.
    pub fn wait_exit(&mut self, secs: u64) -> Option<i32> {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(secs) {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Sends a signal.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }
}

impl Drop for Srv {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.sock);
    }
}

/// Creates a raw file of `size` bytes with a recognisable pattern in some places and holes
/// elsewhere.
pub fn make_raw(path: &Path, size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    use std::os::unix::fs::FileExt;
    let block: Vec<u8> = (0..65536u32).map(|i| (i * 7 + 3) as u8).collect();
    let mut off = 0;
    while off + 65536 <= size {
        f.write_all_at(&block, off).unwrap();
        off += 1 << 20;
    }
}

/// A qcow2 chain made with qemu-img/qemu-io: base (data at 0 and 1M), top over it (data at
/// 64k, zero cluster at 2M). Returns the top's path.
pub fn make_chain(dir: &Path) -> PathBuf {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    let b = base.to_str().unwrap();
    let t = top.to_str().unwrap();
    ok(30, "qemu-img", &["create", "-q", "-f", "qcow2", b, "4M"]);
    ok(
        30,
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 1 0 64k",
            "-c",
            "write -P 2 1M 64k",
            b,
        ],
    );
    ok(
        30,
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", t, "4M",
        ],
    );
    ok(
        30,
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 3 64k 64k",
            "-c",
            "write -z 2M 64k",
            t,
        ],
    );
    top
}
