//! Randomized differential test of the qcow2 write engine: random writes, zero writes,
//! discards and flushes applied to an image and to a plain buffer, compared after every
//! step; at the end `qemu-img check` must be clean and `qemu-img compare` must find the
//! image identical to the buffer.

use qimg::open::{open_image, OpenOptions};
use std::path::Path;
use std::process::Command;

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

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Picks an offset/length pair: aligned or not, tiny or spanning clusters.
fn range(rng: &mut Rng, size: u64, cs: u64) -> (u64, u64) {
    if rng.below(5) == 0 && size >= 4 * cs {
        // Whole clusters at a cluster boundary: the batched allocation path.
        let n = 2 + rng.below(3);
        let off = rng.below(size / cs - n + 1) * cs;
        return (off, n * cs);
    }
    let len = match rng.below(4) {
        0 => 1 + rng.below(700),
        1 => cs,
        2 => 1 + rng.below(3 * cs),
        _ => (1 + rng.below(4)) * 512,
    };
    let len = len.min(size);
    let mut off = rng.below(size - len + 1);
    if rng.below(2) == 0 {
        off = off / 512 * 512;
    }
    (off, len.min(size - off))
}

#[allow(clippy::too_many_arguments)]
fn exercise(
    dir: &Path,
    name: &str,
    create: &[&str],
    size: u64,
    cs: u64,
    steps: usize,
    seed: u64,
    backing_fill: Option<u8>,
) {
    let img_path = dir.join(format!("{name}.qcow2"));
    let ip = img_path.to_str().unwrap();
    let mut model = vec![0u8; size as usize];
    let size_s = size.to_string();
    let b = dir.join(format!("{name}.base.qcow2"));
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if let Some(fill) = backing_fill {
        let bp = b.to_str().unwrap();
        run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", bp, &size.to_string()],
        );
        // Backing shorter than the overlay: its tail reads as zeros.
        let blen = size / 2;
        run("qemu-io", &["-c", &format!("write -P {fill} 0 {blen}"), bp]);
        model[..blen as usize].fill(fill);
        args.extend(["-b", bp, "-F", "qcow2"]);
    }
    args.extend_from_slice(create);
    args.extend([ip, &size_s]);
    run("qemu-img", &args);
    let v2 = create.iter().any(|o| o.contains("compat=0.10"));
    let has_backing = backing_fill.is_some();
    {
        let img = open_image(
            &img_path,
            &OpenOptions {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap();
        let mut rng = Rng(seed);
        for step in 0..steps {
            let (off, len) = range(&mut rng, size, cs);
            match rng.below(10) {
                0..=5 => {
                    let pat = (rng.next() & 0xff) as u8;
                    let data: Vec<u8> = (0..len)
                        .map(|i| pat.wrapping_add((i % 251) as u8))
                        .collect();
                    img.write_at(&data, off).unwrap();
                    model[off as usize..(off + len) as usize].copy_from_slice(&data);
                }
                6 | 7 => {
                    let unmap = rng.below(2) == 0;
                    img.write_zeroes(off, len, unmap).unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                }
                8 => {
                    img.discard(off, len).unwrap();
                    // Discard changes whole clusters only: v3 makes them read zeros; v2
                    // exposes the backing file.
                    let first = off.div_ceil(cs) * cs;
                    let end = if off + len == size {
                        size
                    } else {
                        (off + len) / cs * cs
                    };
                    if first < end {
                        if v2 && has_backing {
                            let mut back = vec![0u8; (end - first) as usize];
                            img.backing()
                                .unwrap()
                                .read_at(
                                    &mut back[..((size / 2).saturating_sub(first).min(end - first))
                                        as usize],
                                    first,
                                )
                                .ok();
                            model[first as usize..end as usize].copy_from_slice(&back);
                        } else {
                            model[first as usize..end as usize].fill(0);
                        }
                    }
                }
                _ => img.flush().unwrap(),
            }
            // Check a random window and, now and then, everything.
            let (roff, rlen) = range(&mut rng, size, cs);
            let mut buf = vec![0u8; rlen as usize];
            img.read_at(&mut buf, roff).unwrap();
            assert!(
                buf == model[roff as usize..(roff + rlen) as usize],
                "{name} step {step}: window {roff}+{rlen} differs"
            );
            if step % 50 == 49 {
                let mut all = vec![0u8; size as usize];
                img.read_at(&mut all, 0).unwrap();
                assert!(all == model, "{name} step {step}: full read differs");
            }
        }
        img.flush().unwrap();
    }
    let check = Command::new("qemu-img")
        .args(["check", ip])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{name}: qemu-img check: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let raw = dir.join(format!("{name}.model.raw"));
    std::fs::write(&raw, &model).unwrap();
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            raw.to_str().unwrap(),
            ip,
        ],
    );
}

macro_rules! variant {
    ($name:ident, $opts:expr, $size:expr, $cs:expr, $steps:expr, $backing:expr) => {
        #[test]
        fn $name() {
            let dir = tempfile::tempdir().unwrap();
            exercise(
                dir.path(),
                stringify!($name),
                $opts,
                $size,
                $cs,
                $steps,
                0x9e37_79b9_7f4a_7c15 ^ $size,
                $backing,
            );
        }
    };
}

variant!(v3_64k, &["-o", "compat=1.1"], 8 << 20, 65536, 600, None);
variant!(v2_64k, &["-o", "compat=0.10"], 8 << 20, 65536, 600, None);
variant!(v3_512, &["-o", "cluster_size=512"], 2 << 20, 512, 600, None);
variant!(
    v3_2m,
    &["-o", "cluster_size=2M"],
    16 << 20,
    2 << 20,
    200,
    None
);
variant!(
    refcount1,
    &["-o", "cluster_size=4096,refcount_bits=1"],
    4 << 20,
    4096,
    600,
    None
);
variant!(
    refcount64,
    &["-o", "refcount_bits=64"],
    8 << 20,
    65536,
    400,
    None
);
variant!(
    extl2,
    &["-o", "extended_l2=on,cluster_size=64k"],
    8 << 20,
    65536,
    600,
    None
);
variant!(
    lazy,
    &["-o", "lazy_refcounts=on"],
    8 << 20,
    65536,
    400,
    None
);
variant!(
    backing_v3,
    &["-o", "compat=1.1"],
    8 << 20,
    65536,
    400,
    Some(0x5a)
);
variant!(
    backing_v2,
    &["-o", "compat=0.10"],
    8 << 20,
    65536,
    400,
    Some(0x5a)
);
variant!(
    backing_extl2,
    &["-o", "extended_l2=on"],
    8 << 20,
    65536,
    400,
    Some(0x5a)
);
variant!(
    small_clusters_growth,
    &["-o", "cluster_size=512,refcount_bits=64"],
    6 << 20,
    512,
    800,
    None
);

#[test]
fn data_file() {
    let dir = tempfile::tempdir().unwrap();
    let df = dir.path().join("data_file.data");
    let opt = format!("data_file={}", df.display());
    exercise(
        dir.path(),
        "data_file",
        &["-o", &opt],
        8 << 20,
        65536,
        500,
        77,
        None,
    );
}

#[test]
fn data_file_raw() {
    let dir = tempfile::tempdir().unwrap();
    let df = dir.path().join("data_file_raw.data");
    let opt = format!("data_file={},data_file_raw=on", df.display());
    exercise(
        dir.path(),
        "data_file_raw",
        &["-o", &opt],
        8 << 20,
        65536,
        500,
        78,
        None,
    );
    // The raw data file alone must hold the guest view.
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            dir.path().join("data_file_raw.model.raw").to_str().unwrap(),
            df.to_str().unwrap(),
        ],
    );
}

/// Several threads write disjoint and overlapping ranges through one open image; the
/// result must equal a serial replay of the same per-thread sequences for the disjoint
/// part, and the image must check clean.
#[test]
fn concurrent_writers() {
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("conc.qcow2");
    let size: u64 = 16 << 20;
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            p.to_str().unwrap(),
            &size.to_string(),
        ],
    );
    let img = open_image(
        &p,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap();
    let threads = 4u64;
    let region = size / threads;
    std::thread::scope(|s| {
        for t in 0..threads {
            let img = Arc::clone(&img);
            s.spawn(move || {
                let mut rng = Rng(1000 + t);
                for _ in 0..300 {
                    // Unaligned writes inside this thread's region.
                    let len = 1 + rng.below(20000);
                    let off = t * region + rng.below(region - len);
                    let data = vec![(t as u8) + 1; len as usize];
                    img.write_at(&data, off).unwrap();
                }
                // Then fill the region with a final pattern so the end state is known.
                let data = vec![0x40 + t as u8; region as usize];
                img.write_at(&data, t * region).unwrap();
            });
        }
    });
    img.flush().unwrap();
    let mut all = vec![0u8; size as usize];
    img.read_at(&mut all, 0).unwrap();
    for t in 0..threads {
        let r = &all[(t * region) as usize..((t + 1) * region) as usize];
        assert!(
            r.iter().all(|&b| b == 0x40 + t as u8),
            "thread {t} region differs"
        );
    }
    drop(img);
    run("qemu-img", &["check", p.to_str().unwrap()]);
}

/// Overlapping concurrent writes to the same clusters: each cluster must end up holding
/// one writer's complete data, never a mix or a lost allocation.
#[test]
fn concurrent_same_clusters() {
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("same.qcow2");
    let size: u64 = 1 << 20;
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            p.to_str().unwrap(),
            &size.to_string(),
        ],
    );
    let img = open_image(
        &p,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap();
    std::thread::scope(|s| {
        for t in 0..4u8 {
            let img = Arc::clone(&img);
            s.spawn(move || {
                for round in 0..50u64 {
                    let c = round % 16;
                    img.write_at(&vec![t + 1; 65536], c * 65536).unwrap();
                }
            });
        }
    });
    img.flush().unwrap();
    for c in 0..16u64 {
        let mut buf = vec![0u8; 65536];
        img.read_at(&mut buf, c * 65536).unwrap();
        assert!(
            buf.iter().all(|&b| b == buf[0]) && buf[0] != 0,
            "cluster {c} torn"
        );
    }
    drop(img);
    run("qemu-img", &["check", p.to_str().unwrap()]);
}
