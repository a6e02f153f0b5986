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

mod fuzz_common;

use fuzz_common::{mutate, Rng};
use qimg::qcow2::{check, Qcow2, Qcow2Options};
use qimg::storage::{MemStorage, Storage};
use qimg::Image;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
        .output()
        .unwrap();
    assert!(!killed.status.success());
    out.push(("lazy", std::fs::read(dir.join(f)).unwrap()));
    out
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
        ..Default::default()
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
        ..Default::default()
    };
    if let Ok(img) = Qcow2::open(Arc::new(MemStorage::new(bytes.clone())), chk) {
        let _ = check::check(&img);
        step("check");
    }
    let rw = Qcow2Options {
        writable: true,
        check: false,
        ..Default::default()
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
