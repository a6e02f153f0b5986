//! Crash consistency of `commit` with fault-injecting storage under the base and the top.
//!
//! The sequence is the one `qimg commit` runs: grow the base when it is shorter, copy
//! what the layers above allocate into it, close it, then (without `-b`) empty the top.
//! For every point of the base's journal (and then of the top's), a disk image is built
//! as a power cut there could leave it, and:
//!
//! - `qemu-img check` of the base finds no corruption (leaks are allowed);
//! - every 512-byte sector of the base reads either its old content or the committed
//!   content, and a cluster the base did not store data for before reads wholly old or
//!   wholly new (a fresh cluster is linked only after its data is durable; an in-place
//!   overwrite may tear at sector granularity, as on any disk and in QEMU);
//! - once commit's final flush is durable, the chain top → base reads as before, and keeps
//!   doing so at every cut point of the top's emptying.

use qimg::fault::FaultStorage;
use qimg::image::Image;
use qimg::ops::commit::{commit, CommitOptions};
use qimg::qcow2::{Qcow2, Qcow2Options};
use qimg::storage::MemStorage;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

fn qemu_img(args: &[&str]) {
    let o = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        o.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn qemu_io(path: &Path, fmt: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", fmt]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let o = c.arg(path).output().unwrap();
    assert!(
        o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("error"),
        "qemu-io {cmds:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn ro(bytes: Vec<u8>) -> Qcow2 {
    Qcow2::open(Arc::new(MemStorage::new(bytes)), Qcow2Options::default()).unwrap()
}

fn writable(fs: &Arc<FaultStorage>) -> Qcow2 {
    Qcow2::open(
        fs.clone(),
        Qcow2Options {
            writable: true,
            check: false,
            ..Default::default()
        },
    )
    .unwrap()
}

fn read_all(img: &dyn Image) -> Vec<u8> {
    let mut v = vec![0u8; img.len() as usize];
    img.read_at(&mut v, 0).unwrap();
    v
}

/// Exit code of `qemu-img check` on `disk` (0 clean, 3 leaks only).
fn check(path: &Path, disk: &[u8], repair: bool) -> (i32, String) {
    std::fs::write(path, disk).unwrap();
    let mut c = Command::new("qemu-img");
    c.args(["check", "-q"]);
    if repair {
        c.args(["-r", "all"]);
    }
    let o = c.arg(path).output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

fn dirty(disk: &[u8]) -> bool {
    u64::from_be_bytes(disk[72..80].try_into().unwrap()) & 1 != 0
}

struct Rng(u64);
impl Rng {
    fn bit(&mut self) -> bool {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 & 1 == 0
    }
}

/// One layer of a test chain: `qemu-img create -o` options, size and qemu-io commands.
struct Layer<'a> {
    opts: &'a str,
    size: &'a str,
    io: &'a [&'a str],
}

/// Builds the chain (first layer = base), runs commit into the base over fault storage and
/// checks the cut points. `empty_top`: empty the top afterwards (commit without `-b` on
/// a 2-deep chain).
fn crash_commit(name: &str, layers: &[Layer], empty_top: bool, bitmap: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let p = dir.path().join(format!("l{i}.qcow2"));
        let mut args = vec!["create", "-q", "-f", "qcow2", "-o", l.opts];
        let back;
        if i > 0 {
            back = format!("l{}.qcow2", i - 1);
            args.extend(["-b", &back, "-F", "qcow2"]);
        }
        let ps = p.to_str().unwrap().to_string();
        args.extend([ps.as_str(), l.size]);
        qemu_img(&args);
        qemu_io(&p, "qcow2", l.io);
        if i == 0 && bitmap {
            qemu_img(&["bitmap", "--add", "-g", "16k", &ps, "b0"]);
        }
        paths.push(p);
    }
    let bytes: Vec<Vec<u8>> = paths.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let depth = layers.len() - 1;
    // Builds the chain above the base on memory copies, over `base`.
    let chain = |base: Arc<dyn Image>, top: Vec<u8>| -> Qcow2 {
        let mut below = base;
        for b in &bytes[1..depth] {
            let mut m = ro(b.clone());
            m.set_backing(Some(below));
            below = Arc::new(m);
        }
        let mut t = ro(top);
        t.set_backing(Some(below));
        t
    };
    let old_base_img = ro(bytes[0].clone());
    let old_base = read_all(&old_base_img);
    let top_len;
    let before = {
        let t = chain(Arc::new(ro(bytes[0].clone())), bytes[depth].clone());
        top_len = t.len();
        read_all(&t)
    };
    let cs = old_base_img.cluster_size();
    // Base clusters that stored no data before: they must never read half old, half new.
    let fresh: Vec<bool> = (0..top_len.div_ceil(cs))
        .map(|c| {
            let off = c * cs;
            off >= old_base_img.len() || !old_base_img.block_status(off, cs).unwrap().status.data
        })
        .collect();
    drop(old_base_img);
    // The committed base reads what the chain read; the old base, padded with the zeros a
    // grown base reads, is the other allowed state.
    let mut old_padded = old_base.clone();
    old_padded.resize(top_len as usize, 0);
    assert_ne!(old_padded, before, "{name}: nothing to commit");

    let fs_base = Arc::new(FaultStorage::new(bytes[0].clone()));
    let fs_top = Arc::new(FaultStorage::new(bytes[depth].clone()));
    let commit_flushed;
    {
        if (old_base.len() as u64) < top_len {
            let mut b = writable(&fs_base);
            b.grow(top_len).unwrap();
            b.close().unwrap();
        }
        let base = Arc::new(writable(&fs_base));
        let top = chain(base.clone(), bytes[depth].clone());
        let opts = CommitOptions {
            threads: 4,
            progress: None,
        };
        commit(&top, depth, &opts).unwrap();
        commit_flushed = fs_base.journal_len();
        drop(top);
        base.close().unwrap();
        assert_eq!(read_all(base.as_ref()), before, "{name}: commit result");
        std::mem::forget(Arc::into_inner(base));
    }
    if empty_top {
        let t = writable(&fs_top);
        t.make_empty().unwrap();
    }

    let check_path = dir.path().join("cut.qcow2");
    let n = fs_base.journal_len();
    let mut rng = Rng(0x5eed ^ n as u64);
    // Several thousand cut points would take minutes with qemu-img check on each; a dense
    // sample keeps every point near a flush.
    let step = (n / 600).max(1);
    let mut cuts: Vec<usize> = (0..=n).step_by(step).collect();
    cuts.extend([commit_flushed.saturating_sub(1), commit_flushed, n]);
    for (i, op) in fs_base.journal().iter().enumerate() {
        if matches!(op, qimg::fault::Op::Flush) {
            cuts.extend([i, i + 1]);
        }
    }
    cuts.sort();
    cuts.dedup();
    for (k, &cut) in cuts.iter().enumerate() {
        // Round 0 keeps every unflushed write; the others keep and tear them at random.
        for round in 0..ROUNDS {
            let disk = fs_base.crash_image(cut, |_, _| round == 0 || rng.bit());
            let b = Qcow2::open(Arc::new(MemStorage::new(disk.clone())), Default::default())
                .unwrap_or_else(|e| panic!("{name}: base cut {cut}: open failed: {e}"));
            let got = read_all(&b);
            for (s, sector) in got.chunks(512).enumerate() {
                let o = s * 512;
                let e = o + sector.len();
                let (old, new) = (&old_padded[o..e], &before[o..e]);
                assert!(
                    sector == old || sector == new,
                    "{name}: base cut {cut}/{n}: sector at {o} is neither old nor committed"
                );
            }
            for (c, chunk) in got.chunks(cs as usize).enumerate() {
                let o = c * cs as usize;
                let e = o + chunk.len();
                assert!(
                    !fresh[c] || chunk == &old_padded[o..e] || chunk == &before[o..e],
                    "{name}: base cut {cut}/{n}: fresh cluster at {o} is half old, half new: {}",
                    chunk
                        .chunks(512)
                        .zip(before[o..e].chunks(512))
                        .map(|(x, y)| if x == y { 'N' } else { 'o' })
                        .collect::<String>()
                );
            }
            if cut >= commit_flushed {
                let t = chain(Arc::new(b), bytes[depth].clone());
                assert!(
                    read_all(&t) == before,
                    "{name}: base cut {cut}/{n}: chain reads differently after commit's flush"
                );
            }
            if round == 1 || (round == 0 && k % 2 == 0) || cut == n {
                let (code, out) = check(&check_path, &disk, false);
                assert!(
                    code == 0 || code == 3,
                    "{name}: base cut {cut}/{n}: qemu-img check exit {code}: {out}"
                );
            }
        }
    }
    let final_base = fs_base.crash_image(n, |_, _| true);
    let (code, out) = check(&check_path, &final_base, false);
    assert_eq!(code, 0, "{name}: final base: {out}");
    if bitmap {
        // The enabled bitmap records every range commit changed.
        let b = ro(final_base.clone());
        let dirty = b.bitmap_dirty_ranges("b0").unwrap();
        for (s, (x, y)) in old_padded.chunks(512).zip(before.chunks(512)).enumerate() {
            let o = s as u64 * 512;
            assert!(
                x == y || dirty.iter().any(|&(a, l)| a <= o && o < a + l),
                "{name}: sector at {o} changed but is not dirty in the bitmap"
            );
        }
    }

    if !empty_top {
        assert_eq!(fs_top.journal_len(), 0, "{name}: the top was written");
        return;
    }
    // Emptying the top: the chain keeps reading the same at every point.
    let n = fs_top.journal_len();
    assert!(n > 0, "{name}: the top was not emptied");
    for cut in 0..=n {
        for round in 0..2 {
            let disk = fs_top.crash_image(cut, |_, _| round == 0 || rng.bit());
            let mut ok = check(&check_path, &disk, false);
            if dirty(&disk) && ok.0 != 0 && ok.0 != 3 {
                // The dirty bit is set for the duration, as in QEMU's make_empty; a
                // repair must bring the image back.
                ok = check(&check_path, &disk, true);
            }
            assert!(
                ok.0 == 0 || ok.0 == 3,
                "{name}: top cut {cut}/{n}: qemu-img check exit {}: {}",
                ok.0,
                ok.1
            );
            let repaired = std::fs::read(&check_path).unwrap();
            for d in [disk, repaired] {
                let t = chain(Arc::new(ro(final_base.clone())), d);
                assert!(
                    read_all(&t) == before,
                    "{name}: top cut {cut}/{n}: chain reads differently"
                );
            }
        }
    }
    let disk = fs_top.crash_image(n, |_, _| true);
    let t = ro(disk.clone());
    assert!(
        qimg::image::layer_extents(&t, 0, t.len())
            .unwrap()
            .iter()
            .all(|e| !e.status.allocated),
        "{name}: the top is not empty"
    );
    let (code, out) = check(&check_path, &disk, false);
    assert_eq!(code, 0, "{name}: final top: {out}");
}

/// Crash images built per cut point.
const ROUNDS: usize = 6;

/// Base writes: data runs, a zero run and an unallocated hole, so that commit overwrites
/// in place, fills zero clusters, allocates fresh clusters and unmaps.
const BASE_IO: &[&str] = &[
    "write -P 0x11 0 1M",
    "write -P 0x12 1M 256k",
    "write -z 1280k 256k",
    "write -P 0x13 3M 512k",
];

/// Top writes in mixed runs, including zeros over base data and unaligned pieces.
const TOP_IO: &[&str] = &[
    "write -P 0x21 0 64k",
    "write -P 0x22 128k 12k",
    "write -z 256k 128k",
    "write -P 0x23 900k 300k",
    "write -P 0x24 1300k 100k",
    "write -z 3200k 64k",
    "write -P 0x25 2M 512k",
    "write -P 0x26 3800k 20k",
];

#[test]
fn crash_commit_two_deep() {
    crash_commit(
        "2-deep",
        &[
            Layer {
                opts: "cluster_size=4096",
                size: "4M",
                io: BASE_IO,
            },
            Layer {
                opts: "cluster_size=4096",
                size: "4M",
                io: TOP_IO,
            },
        ],
        true,
        false,
    );
}

#[test]
fn crash_commit_v2_base_bigger_clusters() {
    // A v2 base has no zero clusters: zeros must be written as data. The top's 4 KiB
    // clusters are rounded out to the base's 16 KiB.
    crash_commit(
        "v2",
        &[
            Layer {
                opts: "compat=0.10,cluster_size=16384",
                size: "4M",
                io: BASE_IO,
            },
            Layer {
                opts: "cluster_size=4096",
                size: "4M",
                io: TOP_IO,
            },
        ],
        true,
        false,
    );
}

#[test]
fn crash_commit_three_deep() {
    crash_commit(
        "3-deep",
        &[
            Layer {
                opts: "cluster_size=8192",
                size: "4M",
                io: BASE_IO,
            },
            Layer {
                opts: "cluster_size=4096",
                size: "4M",
                io: &["write -P 0x31 512k 700k", "write -z 2100k 100k"],
            },
            Layer {
                opts: "cluster_size=16384",
                size: "4M",
                io: TOP_IO,
            },
        ],
        false,
        false,
    );
}

#[test]
fn crash_commit_grows_base() {
    crash_commit(
        "grow",
        &[
            Layer {
                opts: "cluster_size=4096",
                size: "2M",
                io: &["write -P 0x11 0 1M", "write -z 1M 512k"],
            },
            Layer {
                opts: "cluster_size=4096",
                size: "8M",
                io: &[
                    "write -P 0x21 512k 128k",
                    "write -P 0x22 1900k 600k",
                    "write -P 0x23 7M 1M",
                ],
            },
        ],
        true,
        false,
    );
}

#[test]
fn crash_commit_base_with_bitmap() {
    crash_commit(
        "bitmap",
        &[
            Layer {
                opts: "cluster_size=4096",
                size: "4M",
                io: BASE_IO,
            },
            Layer {
                opts: "cluster_size=4096",
                size: "4M",
                io: TOP_IO,
            },
        ],
        true,
        true,
    );
}

#[test]
fn crash_commit_small_clusters() {
    // 512-byte clusters: commit allocates many L2 tables and refcount blocks in the base,
    // and grows its refcount table.
    crash_commit(
        "512",
        &[
            Layer {
                opts: "cluster_size=512",
                size: "4M",
                io: &["write -P 0x11 0 256k", "write -z 256k 64k"],
            },
            Layer {
                opts: "cluster_size=4096",
                size: "4M",
                io: TOP_IO,
            },
        ],
        true,
        false,
    );
}
