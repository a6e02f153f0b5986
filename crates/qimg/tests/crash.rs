//! Crash consistency of the qcow2 write engine with a fault-injecting storage layer.
//!
//! A random workload runs on an image over [`FaultStorage`]; then, for every point of the
//! storage journal, a disk image is built as a power cut there could leave it (unflushed
//! writes kept, dropped or torn at random, per 512-byte sector). Each such image must open,
//! pass `qemu-img check` (leaks allowed), and read back every byte the guest wrote before
//! its last completed flush. `QIMG_CRASH_SEEDS=N` runs more seeds (soak).

use qimg::fault::FaultStorage;
use qimg::image::Image;
use qimg::qcow2::{Qcow2, Qcow2Options};
use qimg::storage::MemStorage;
use std::process::Command;
use std::sync::Arc;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A guest flush that completed: journal length at its end and the guest view then.
struct Completed {
    journal_end: usize,
    model: Vec<u8>,
}

/// A guest operation: the journal length when it started and the range it may change.
struct GuestOp {
    journal_start: usize,
    range: (u64, u64),
}

fn crash_case(name: &str, opts: &str, size: u64, cs: u64, ops: usize, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("base.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", opts])
        .arg(&path)
        .arg(size.to_string())
        .status()
        .unwrap();
    assert!(st.success());
    let lazy = opts.contains("lazy_refcounts=on");
    let fs = Arc::new(FaultStorage::new(std::fs::read(&path).unwrap()));
    let mut model = vec![0u8; size as usize];
    let mut completed = vec![Completed {
        journal_end: 0,
        model: model.clone(),
    }];
    let mut guest_ops: Vec<GuestOp> = Vec::new();
    {
        let img = Qcow2::open(
            fs.clone(),
            Qcow2Options {
                writable: true,
                check: false,
                ..Default::default()
            },
        )
        .unwrap();
        let mut rng = Rng(seed);
        let mut compressed = 0;
        for _ in 0..ops {
            let whole = rng.below(4) == 0 && size >= 4 * cs;
            let len = match rng.below(3) {
                _ if whole => (2 + rng.below(3)) * cs,
                0 => 1 + rng.below(1000),
                1 => cs,
                _ => 1 + rng.below(3 * cs),
            }
            .min(size);
            let off = if whole {
                rng.below(size / cs - len / cs + 1) * cs
            } else {
                rng.below(size - len + 1)
            };
            let start = fs.journal_len();
            match rng.below(9) {
                8 => {
                    // A compressed cluster where the guest cluster is still unallocated
                    // (compression never overwrites; the call fails otherwise).
                    let at = off / cs * cs;
                    let n = cs.min(size - at);
                    let v = (rng.next() as u8) | 1;
                    let data: Vec<u8> = (0..n).map(|i| if i % 7 == 0 { v } else { 0x55 }).collect();
                    if img.write_compressed(&data, at).is_ok() {
                        compressed += 1;
                        model[at as usize..(at + n) as usize].copy_from_slice(&data);
                        guest_ops.push(GuestOp {
                            journal_start: start,
                            range: (at, at + n),
                        });
                    }
                }
                0..=4 => {
                    let v = (rng.next() as u8) | 1;
                    img.write_at(&vec![v; len as usize], off).unwrap();
                    model[off as usize..(off + len) as usize].fill(v);
                    guest_ops.push(GuestOp {
                        journal_start: start,
                        range: (off, off + len),
                    });
                }
                5 => {
                    img.write_zeroes(off, len, rng.below(2) == 0).unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                    guest_ops.push(GuestOp {
                        journal_start: start,
                        range: (off, off + len),
                    });
                }
                6 => {
                    img.discard(off, len).unwrap();
                    let first = off.div_ceil(cs) * cs;
                    let end = if off + len == size {
                        size
                    } else {
                        (off + len) / cs * cs
                    };
                    if first < end {
                        model[first as usize..end as usize].fill(0);
                    }
                    guest_ops.push(GuestOp {
                        journal_start: start,
                        range: (off, off + len),
                    });
                }
                _ => {
                    img.flush().unwrap();
                    completed.push(Completed {
                        journal_end: fs.journal_len(),
                        model: model.clone(),
                    });
                }
            }
        }
        assert!(compressed > 0, "{name}: no compressed write happened");
        // No final flush or close: the image is abandoned as a crash would leave it.
        std::mem::forget(img);
    }
    let journal_len = fs.journal_len();
    assert!(journal_len > 10, "{name}: workload produced too little I/O");
    let mut rng = Rng(seed ^ 0xdead_beef);
    let check_path = dir.path().join("crash.qcow2");
    let mut checked = 0;
    for cut in 0..=journal_len {
        let disk = fs.crash_image(cut, |_, _| rng.below(2) == 0);
        // The last guest flush that had completed by the cut.
        let done = completed
            .iter()
            .rev()
            .find(|c| c.journal_end <= cut)
            .unwrap();
        let img = Qcow2::open(
            Arc::new(MemStorage::new(disk.clone())),
            Qcow2Options::default(),
        )
        .unwrap_or_else(|e| panic!("{name}: cut {cut}: reopen failed: {e}"));
        let mut got = vec![0u8; size as usize];
        img.read_at(&mut got, 0)
            .unwrap_or_else(|e| panic!("{name}: cut {cut}: read failed: {e}"));
        // Bytes no guest operation touched after that flush must be exactly as flushed.
        let mut volatile = vec![false; size as usize];
        for op in guest_ops
            .iter()
            .filter(|o| o.journal_start >= done.journal_end && o.journal_start < cut)
        {
            volatile[op.range.0 as usize..op.range.1 as usize].fill(true);
        }
        // Discards and zero writes act on whole clusters around their range.
        for (i, (a, b)) in got.iter().zip(&done.model).enumerate() {
            if !volatile[i] && a != b {
                let c = i as u64 / cs * cs;
                let near = guest_ops.iter().any(|o| {
                    o.journal_start >= done.journal_end
                        && o.journal_start < cut
                        && o.range.0 / cs * cs <= c
                        && c < o.range.1.div_ceil(cs) * cs
                });
                assert!(
                    near,
                    "{name}: cut {cut}: byte {i} is {a:#x}, flushed {b:#x}"
                );
            }
        }
        // qemu-img check on a sample of cut points (it is the slow part).
        if cut % 4 == 0 || cut == journal_len {
            std::fs::write(&check_path, &disk).unwrap();
            let mut args = vec!["check", "-q"];
            if lazy {
                // A dirty lazy-refcounts image is repaired on open by QEMU; check what the
                // repair leaves.
                args.extend(["-r", "all"]);
            }
            let out = Command::new("qemu-img")
                .args(&args)
                .arg(&check_path)
                .output()
                .unwrap();
            let code = out.status.code().unwrap_or(-1);
            assert!(
                code == 0 || code == 3,
                "{name}: cut {cut}: qemu-img check exit {code}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked > 0);
}

fn seeds() -> u64 {
    std::env::var("QIMG_CRASH_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

#[test]
fn crash_v3_64k() {
    for s in 0..seeds() {
        crash_case("v3_64k", "compat=1.1", 4 << 20, 65536, 120, 11 + s);
    }
}

#[test]
fn crash_v2_small_clusters() {
    for s in 0..seeds() {
        crash_case(
            "v2_4k",
            "compat=0.10,cluster_size=4096",
            1 << 20,
            4096,
            120,
            21 + s,
        );
    }
}

#[test]
fn crash_refcount_growth_512() {
    for s in 0..seeds() {
        crash_case(
            "growth_512",
            "cluster_size=512,refcount_bits=64",
            2 << 20,
            512,
            150,
            31 + s,
        );
    }
}

#[test]
fn crash_extended_l2() {
    for s in 0..seeds() {
        crash_case("extl2", "extended_l2=on", 4 << 20, 65536, 120, 41 + s);
    }
}

#[test]
fn crash_lazy_refcounts() {
    for s in 0..seeds() {
        crash_case("lazy", "lazy_refcounts=on", 4 << 20, 65536, 120, 51 + s);
    }
}
