//! Mutation fuzzing of everything that parses an image: images written by QEMU in several
//! variants (v2/v3, 512 B clusters, refcount widths 1 and 64, extended L2, compressed
//! clusters, snapshots, bitmaps, a dirty lazy-refcounts image) get a few random mutations,
//! mostly in their metadata, and are then opened, read, walked with block status, checked
//! and written to through the library. Errors are expected; a panic, a case that takes
//! more than a few seconds, or an allocation the address-space limit refuses (which
//! aborts the process) fails the test and leaves the image in the temporary directory
//! for reproduction.
//!
//! `cargo test --release -p qimg --test fuzz_open` runs a short pass (QIMG_FUZZ_ITERS,
//! default 1500 cases); `QIMG_FUZZ_ITERS=200000 QIMG_FUZZ_SEED=n` runs a soak.
//! `QIMG_FUZZ_REPLAY=image QIMG_FUZZ_CASE_SEED=n` replays one kept case, printing how long
//! each step takes.

use qimg::qcow2::{check, Qcow2, Qcow2Options};
use qimg::storage::{MemStorage, Storage};
use qimg::Image;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64: good enough spread for picking offsets and values.
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn run(dir: &Path, cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Seed images, made by QEMU's tools.
fn seeds(dir: &Path) -> Vec<(&'static str, Vec<u8>)> {
    let variants: &[(&str, &str, bool)] = &[
        ("v3", "compat=1.1", true),
        ("v2", "compat=0.10", false),
        ("c512", "cluster_size=512", true),
        ("rc1", "refcount_bits=1", true),
        ("rc64", "refcount_bits=64", true),
        ("extl2", "extended_l2=on", true),
        ("zstd", "compression_type=zstd", true),
    ];
    let mut out = Vec::new();
    for &(name, opts, v3) in variants {
        let f = format!("{name}.qcow2");
        run(
            dir,
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", opts, &f, "4M"],
        );
        let mut cmds = vec![
            "write -P 1 0 128k",
            "write -z 256k 64k",
            "write -c -P 2 1M 64k",
            "write -P 3 2M 8k",
            "discard 2M 4k",
        ];
        if !v3 {
            cmds.retain(|c| !c.starts_with("discard"));
        }
        let mut args = vec!["-f", "qcow2"];
        for c in &cmds {
            args.extend_from_slice(&["-c", c]);
        }
        args.push(&f);
        run(dir, "qemu-io", &args);
        if name != "rc1" {
            // A snapshot needs refcounts of 2.
            run(dir, "qemu-img", &["snapshot", "-c", "s1", &f]);
        }
        run(
            dir,
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 4 64k 128k", &f],
        );
        if v3 {
            run(dir, "qemu-img", &["bitmap", "--add", &f, "b0"]);
            run(
                dir,
                "qemu-io",
                &["-f", "qcow2", "-c", "write -P 5 3M 64k", &f],
            );
        }
        out.push((name, std::fs::read(dir.join(&f)).unwrap()));
    }
    // A dirty image with lazy refcounts: opening it for writing repairs it first.
    let f = "lazy.qcow2";
    run(
        dir,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            f,
            "4M",
        ],
    );
    // qemu-io kills itself before closing the image, so the dirty bit stays set.
    let killed = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 6 0 256k",
            "-c",
            "sigraise 9",
            f,
        ])
        .current_dir(dir)
        .status()
        .unwrap();
    assert!(!killed.success());
    out.push(("lazy", std::fs::read(dir.join(f)).unwrap()));
    out
}

/// Values that tend to sit on the edges of what a field allows.
const INTERESTING: &[u64] = &[
    0,
    1,
    0x1ff,
    0x200,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 40,
    0x00ff_ffff_ffff_fe00,
    0x8000_0000_0000_0000,
    0xc000_0000_0000_0000,
    0x4000_0000_0000_0000,
    u64::MAX,
];

/// Applies 1 to 4 mutations; most land in the first clusters, where QEMU keeps the header,
/// the tables and the first L2 tables of a small image.
fn mutate(rng: &mut Rng, img: &mut [u8]) -> Vec<String> {
    let cs = 1u64 << u32::from_be_bytes(img[20..24].try_into().unwrap()).clamp(9, 21);
    let meta = (8 * cs).max(64 << 10).min(img.len() as u64);
    let mut log = Vec::new();
    for _ in 0..1 + rng.below(4) {
        let span = if rng.below(10) < 8 {
            meta
        } else {
            img.len() as u64
        };
        match rng.below(4) {
            0 => {
                let at = rng.below(span) as usize;
                let bit = rng.below(8);
                img[at] ^= 1 << bit;
                log.push(format!("flip bit {bit} of byte {at:#x}"));
            }
            1 => {
                let at = rng.below(span) as usize;
                let v = rng.next() as u8;
                img[at] = v;
                log.push(format!("byte {at:#x} = {v:#x}"));
            }
            2 => {
                let at = (rng.below(span.saturating_sub(8)) & !7) as usize;
                let mut v = INTERESTING[rng.below(INTERESTING.len() as u64) as usize];
                if rng.below(3) == 0 {
                    // A plausible offset instead: cluster-aligned, near the file's end.
                    v = (rng.below(img.len() as u64 / cs + 4) * cs) | (v & (1 << 63));
                }
                img[at..at + 8].copy_from_slice(&v.to_be_bytes());
                log.push(format!("u64 at {at:#x} = {v:#x}"));
            }
            _ => {
                let at = (rng.below(span.saturating_sub(4)) & !3) as usize;
                let v = INTERESTING[rng.below(INTERESTING.len() as u64) as usize] as u32;
                img[at..at + 4].copy_from_slice(&v.to_be_bytes());
                log.push(format!("u32 at {at:#x} = {v:#x}"));
            }
        }
    }
    log
}

/// Everything a reader does with an image, bounded so that a huge (mutated) virtual size
/// costs no more than a normal one.
fn exercise(bytes: Vec<u8>, seed: u64) {
    let verbose = std::env::var_os("QIMG_FUZZ_REPLAY").is_some();
    let t0 = Instant::now();
    let step = |what: &str| {
        if verbose {
            eprintln!("{:8.3} s  {what}", t0.elapsed().as_secs_f64());
        }
    };
    let mut rng = Rng(seed);
    let ro = Qcow2Options {
        writable: false,
        check: false,
    };
    if let Ok(img) = Qcow2::open(Arc::new(MemStorage::new(bytes.clone())), ro) {
        let len = img.len();
        let mut buf = vec![0u8; 64 << 10];
        for _ in 0..16 {
            let off = rng.below(len.saturating_sub(1));
            let n = (buf.len() as u64).min(len - off) as usize;
            let _ = img.read_at(&mut buf[..n], off);
        }
        let mut pos = 0;
        for _ in 0..256 {
            if pos >= len {
                break;
            }
            match img.block_status(pos, len - pos) {
                Ok(e) if e.len > 0 => pos += e.len,
                _ => break,
            }
        }
        let _ = img.snapshots().len() + img.bitmaps().len();
        step("read-only open, reads, block status");
    }
    let chk = Qcow2Options {
        writable: false,
        check: true,
    };
    if let Ok(img) = Qcow2::open(Arc::new(MemStorage::new(bytes.clone())), chk) {
        let _ = check::check(&img);
        step("check");
    }
    let rw = Qcow2Options {
        writable: true,
        check: false,
    };
    let storage = Arc::new(MemStorage::new(bytes));
    if let Ok(img) = Qcow2::open(storage.clone() as Arc<dyn Storage>, rw) {
        let len = img.len();
        let data = vec![0x5au8; 70_000];
        for _ in 0..4 {
            let off = rng.below(len.saturating_sub(1));
            let n = (rng.below(data.len() as u64) + 1).min(len - off) as usize;
            let _ = match rng.below(3) {
                0 => img.write_at(&data[..n], off),
                1 => img.write_zeroes(off, n as u64, rng.below(2) == 0),
                _ => img.discard(off, n as u64),
            };
        }
        let _ = img.flush();
        step("writes and flush");
    }
}

fn limit_address_space() {
    // An allocation sized by a hostile field fails here instead of swapping the machine.
    let lim = libc::rlimit {
        rlim_cur: 8 << 30,
        rlim_max: 8 << 30,
    };
    // SAFETY: setrlimit with a valid struct; failure only means no limit.
    unsafe {
        libc::setrlimit(libc::RLIMIT_AS, &lim);
    }
}

#[test]
fn mutated_images_never_panic_or_hang() {
    if let Some(path) = std::env::var_os("QIMG_FUZZ_REPLAY") {
        let seed = std::env::var("QIMG_FUZZ_CASE_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        exercise(std::fs::read(path).unwrap(), seed);
        return;
    }
    let iters: u64 = std::env::var("QIMG_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    let base_seed: u64 = std::env::var("QIMG_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20261205);
    let dir = tempfile::tempdir().unwrap();
    let seeds = seeds(dir.path());
    limit_address_space();
    let mut rng = Rng(base_seed);
    let mut slowest = Duration::ZERO;
    for i in 0..iters {
        let (name, seed) = &seeds[rng.below(seeds.len() as u64) as usize];
        let mut img = seed.clone();
        let log = mutate(&mut rng, &mut img);
        let case_seed = rng.next();
        let keep = img.clone();
        let t0 = Instant::now();
        let worker = std::thread::spawn(move || exercise(img, case_seed));
        // A case that does not finish is a hang: report it rather than wait forever.
        while !worker.is_finished() && t0.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let took = t0.elapsed();
        let outcome = if worker.is_finished() {
            worker.join().err().map(|_| "panicked")
        } else {
            Some("did not finish within 20 s")
        };
        if let Some(what) = outcome {
            let path = std::env::temp_dir().join(format!("qimg-fuzz-{base_seed}-{i}.qcow2"));
            std::fs::write(&path, &keep).unwrap();
            panic!(
                "case {i} ({name}, mutations {log:?}, seed {case_seed}) {what}; image kept at {}",
                path.display()
            );
        }
        slowest = slowest.max(took);
    }
    eprintln!("{iters} cases, slowest {:.3} s", slowest.as_secs_f64());
}
