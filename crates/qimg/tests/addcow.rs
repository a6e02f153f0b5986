//! The add-cow driver against plain buffers: random guest I/O compared byte for byte,
//! concurrent writers into the same clusters, and power cuts at every point of the two
//! files' journals (the add-cow file and the image file fail together).

use qimg::addcow::{AddCow, AddCowHeader};
use qimg::fault::FaultStorage;
use qimg::image::{layer_extents, Image};
use qimg::raw::Raw;
use qimg::storage::{MemStorage, Storage};
use std::sync::{Arc, Mutex};

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

fn header(cluster_bits: u32, backing: bool) -> AddCowHeader {
    AddCowHeader {
        backing_file: backing.then(|| "base.raw".to_string()),
        backing_format: backing.then(|| "raw".to_string()),
        image_file: "disk.raw".into(),
        image_format: "raw".into(),
        cluster_bits,
        features: 0,
        compatible_features: 0,
        header_size: 4096,
    }
}

/// The bytes of a fresh add-cow file for an image of `size` bytes.
fn meta_bytes(h: &AddCowHeader, size: u64) -> Vec<u8> {
    let mut m = h.serialize().unwrap();
    m.resize(m.len() + h.bitmap_len(size) as usize, 0);
    m
}

fn backing_data(len: u64, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    (0..len).map(|_| rng.next() as u8 | 1).collect()
}

fn raw_backing(data: &[u8]) -> Arc<dyn Image> {
    Arc::new(Raw::open(Arc::new(MemStorage::new(data.to_vec())), false).unwrap())
}

fn read_all(img: &dyn Image) -> Vec<u8> {
    let mut v = vec![0u8; img.len() as usize];
    img.read_at(&mut v, 0).unwrap();
    v
}

/// The guest view before any write: the backing file, zeros past its end.
fn initial_model(size: u64, back: Option<&[u8]>) -> Vec<u8> {
    let mut m = vec![0u8; size as usize];
    if let Some(b) = back {
        let n = b.len().min(m.len());
        m[..n].copy_from_slice(&b[..n]);
    }
    m
}

fn random_range(rng: &mut Rng, size: u64, cs: u64) -> (u64, u64) {
    let len = match rng.below(4) {
        0 => 1 + rng.below(700),
        1 => cs,
        2 => 1 + rng.below(3 * cs),
        _ => cs * (1 + rng.below(3)),
    }
    .min(size);
    let off = if rng.below(3) == 0 {
        rng.below(size / cs) * cs
    } else {
        rng.below(size - len + 1)
    };
    (off, len.min(size - off))
}

/// Random writes, zero writes and discards on an add-cow image in memory, compared with a
/// plain buffer after every operation's range and in full at the end, then again after a
/// flush and a reopen from the stored bytes.
fn differential(size: u64, cluster_bits: u32, backing_len: Option<u64>, ops: usize, seed: u64) {
    let cs = 1u64 << cluster_bits;
    let back = backing_len.map(|l| backing_data(l, seed));
    let h = header(cluster_bits, back.is_some());
    let meta = Arc::new(MemStorage::new(meta_bytes(&h, size)));
    let image = Arc::new(MemStorage::new(vec![0u8; size as usize]));
    let img = AddCow::open(
        meta.clone(),
        h.clone(),
        image.clone(),
        back.as_deref().map(raw_backing),
        true,
    )
    .unwrap();
    let mut model = initial_model(size, back.as_deref());
    assert_eq!(read_all(&img), model, "initial contents");
    let mut rng = Rng(seed);
    for i in 0..ops {
        let (off, len) = random_range(&mut rng, size, cs);
        let r = off as usize..(off + len) as usize;
        match rng.below(8) {
            0..=3 => {
                let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                img.write_at(&data, off).unwrap();
                model[r.clone()].copy_from_slice(&data);
            }
            4 | 5 => {
                img.write_zeroes(off, len, rng.below(2) == 0).unwrap();
                model[r.clone()].fill(0);
            }
            6 => {
                // Discard zeroes what is copied and leaves the rest on the backing file.
                for e in layer_extents(&img, off, len).unwrap() {
                    if e.status.allocated {
                        model[e.start as usize..(e.start + e.len) as usize].fill(0);
                    }
                }
                img.discard(off, len).unwrap();
            }
            _ => img.flush().unwrap(),
        }
        let mut got = vec![0u8; r.len()];
        img.read_at(&mut got, off).unwrap();
        assert!(
            got == model[r.clone()],
            "seed {seed} op {i}: range {off}+{len} differs"
        );
    }
    assert!(
        read_all(&img) == model,
        "seed {seed}: final contents differ"
    );
    // Block status: copied clusters are host data at the guest offset, the rest falls
    // through to the backing file.
    for e in layer_extents(&img, 0, size).unwrap() {
        if e.status.allocated {
            assert_eq!(e.status.offset, Some(e.start));
        }
    }
    img.flush().unwrap();
    drop(img);
    let again = AddCow::open(
        Arc::new(MemStorage::new(meta.contents())),
        h,
        Arc::new(MemStorage::new(image.contents())),
        back.as_deref().map(raw_backing),
        false,
    )
    .unwrap();
    assert!(
        read_all(&again) == model,
        "seed {seed}: reopened contents differ"
    );
}

#[test]
fn random_io_64k_clusters() {
    for seed in 1..=3 {
        differential(1 << 20, 16, Some(1 << 20), 300, seed);
    }
}

#[test]
fn random_io_small_clusters_short_backing() {
    for seed in 11..=13 {
        // The image is larger than its backing file, and not a whole number of clusters.
        differential(300 * 1024 + 512, 12, Some(100_000), 400, seed);
    }
}

#[test]
fn random_io_without_backing() {
    differential(512 * 1024, 9, None, 300, 21);
}

#[test]
fn random_io_2m_clusters() {
    differential(5 << 20, 21, Some(3 << 20), 60, 31);
}

/// Many threads write disjoint pieces of the same clusters, all still on the backing file:
/// no piece may be lost to another writer's copy of the backing data.
#[test]
fn concurrent_writers_same_clusters() {
    let size = 1u64 << 20;
    let cluster_bits = 16;
    let back = backing_data(size, 77);
    let h = header(cluster_bits, true);
    for round in 0..5u64 {
        let img = Arc::new(
            AddCow::open(
                Arc::new(MemStorage::new(meta_bytes(&h, size))),
                h.clone(),
                Arc::new(MemStorage::new(vec![0u8; size as usize])),
                Some(raw_backing(&back)),
                true,
            )
            .unwrap(),
        );
        let threads = 8u64;
        let piece = 1000u64;
        let mut hs = Vec::new();
        for t in 0..threads {
            let img = img.clone();
            hs.push(std::thread::spawn(move || {
                // Thread t owns bytes [k*8000 + t*1000, +1000) for every k: each cluster
                // gets pieces from every thread.
                let mut k = 0u64;
                while (k + 1) * threads * piece <= size {
                    let off = k * threads * piece + t * piece;
                    let v = (t as u8 + 1) ^ (round as u8 * 16);
                    img.write_at(&vec![v; piece as usize], off).unwrap();
                    k += 1;
                }
            }));
        }
        for h in hs {
            h.join().unwrap();
        }
        let got = read_all(img.as_ref());
        let span = (size / (threads * piece)) * threads * piece;
        for (i, &b) in got.iter().enumerate() {
            let expect = if (i as u64) < span {
                let t = (i as u64 / piece) % threads;
                (t as u8 + 1) ^ (round as u8 * 16)
            } else {
                back[i]
            };
            assert_eq!(b, expect, "round {round}: byte {i}");
        }
    }
}

/// Storage that records, in one sequence shared by several files, the journal length of
/// the file after each of its operations: a power cut at a point of that sequence cuts
/// every file at once.
#[derive(Debug)]
struct Tracked {
    inner: Arc<FaultStorage>,
    id: usize,
    global: Arc<Mutex<Vec<(usize, usize)>>>,
}

impl Tracked {
    fn op<T>(&self, f: impl FnOnce(&FaultStorage) -> qimg::Result<T>) -> qimg::Result<T> {
        let mut g = self.global.lock().unwrap();
        let r = f(&self.inner);
        g.push((self.id, self.inner.journal_len()));
        r
    }
}

impl Storage for Tracked {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> qimg::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> qimg::Result<()> {
        self.op(|s| s.write_at(buf, offset))
    }
    fn len(&self) -> qimg::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> qimg::Result<()> {
        self.op(|s| s.set_len(len))
    }
    fn flush(&self) -> qimg::Result<()> {
        self.op(|s| s.flush())
    }
}

/// The journal length of each file at global point `cut` (exclusive).
fn cuts_at(global: &[(usize, usize)], cut: usize, files: usize) -> Vec<usize> {
    let mut c = vec![0; files];
    for &(id, len) in &global[..cut] {
        c[id] = len;
    }
    c
}

struct Done {
    global_end: usize,
    model: Vec<u8>,
}

struct Op {
    global_start: usize,
    off: u64,
    data: Vec<u8>,
}

/// Power cuts at every point of the combined journal of the add-cow file and the image
/// file, with unflushed writes kept, dropped or torn per sector at random. Every result
/// must open; bytes no operation touched since the last completed flush read exactly as
/// flushed; touched bytes read as flushed or as one of the values written since.
fn crash_case(size: u64, cluster_bits: u32, backing_len: u64, ops: usize, seed: u64) {
    let cs = 1u64 << cluster_bits;
    let back = backing_data(backing_len, seed);
    let h = header(cluster_bits, true);
    let meta0 = meta_bytes(&h, size);
    let global = Arc::new(Mutex::new(Vec::new()));
    let meta_fs = Arc::new(FaultStorage::new(meta0));
    let image_fs = Arc::new(FaultStorage::new(vec![0u8; size as usize]));
    let meta = Arc::new(Tracked {
        inner: meta_fs.clone(),
        id: 0,
        global: global.clone(),
    });
    let image = Arc::new(Tracked {
        inner: image_fs.clone(),
        id: 1,
        global: global.clone(),
    });
    let mut model = initial_model(size, Some(&back));
    let mut done = vec![Done {
        global_end: 0,
        model: model.clone(),
    }];
    let mut log: Vec<Op> = Vec::new();
    let glen = || global.lock().unwrap().len();
    {
        let img = AddCow::open(meta, h.clone(), image, Some(raw_backing(&back)), true).unwrap();
        let mut rng = Rng(seed);
        for _ in 0..ops {
            let (off, len) = random_range(&mut rng, size, cs);
            let start = glen();
            match rng.below(7) {
                0..=3 => {
                    let v = (rng.next() as u8) | 1;
                    let data = vec![v; len as usize];
                    img.write_at(&data, off).unwrap();
                    model[off as usize..(off + len) as usize].copy_from_slice(&data);
                    log.push(Op {
                        global_start: start,
                        off,
                        data,
                    });
                }
                4 => {
                    img.write_zeroes(off, len, rng.below(2) == 0).unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                    log.push(Op {
                        global_start: start,
                        off,
                        data: vec![0; len as usize],
                    });
                }
                _ => {
                    img.flush().unwrap();
                    done.push(Done {
                        global_end: glen(),
                        model: model.clone(),
                    });
                }
            }
        }
        // No final flush: the image is abandoned as a power cut leaves it.
        std::mem::forget(img);
    }
    let global = global.lock().unwrap().clone();
    assert!(global.len() > 10, "workload produced too little I/O");
    assert!(done.len() > 2, "workload flushed too rarely");
    let mut rng = Rng(seed ^ 0xdead_beef);
    for cut in 0..=global.len() {
        let c = cuts_at(&global, cut, 2);
        let meta_disk = meta_fs.crash_image(c[0], |_, _| rng.below(2) == 0);
        let image_disk = image_fs.crash_image(c[1], |_, _| rng.below(2) == 0);
        let flushed = done.iter().rev().find(|d| d.global_end <= cut).unwrap();
        let reopened = AddCow::open(
            Arc::new(MemStorage::new(meta_disk.clone())),
            qimg::addcow::read_header(&MemStorage::new(meta_disk)).unwrap(),
            Arc::new(MemStorage::new(image_disk)),
            Some(raw_backing(&back)),
            false,
        )
        .unwrap_or_else(|e| panic!("seed {seed} cut {cut}: reopen failed: {e}"));
        let got = read_all(&reopened);
        let since: Vec<&Op> = log
            .iter()
            .filter(|o| o.global_start >= flushed.global_end && o.global_start < cut)
            .collect();
        for (i, (&a, &b)) in got.iter().zip(&flushed.model).enumerate() {
            if a == b {
                continue;
            }
            let i64_ = i as u64;
            let written = since.iter().any(|o| {
                i64_ >= o.off
                    && i64_ < o.off + o.data.len() as u64
                    && o.data[(i64_ - o.off) as usize] == a
            });
            assert!(
                written,
                "seed {seed} cut {cut}: byte {i} reads {a:#x}, flushed {b:#x}, and no later write wrote it"
            );
        }
    }
}

/// `QIMG_CRASH_SEEDS=N` runs N seeds of each case (soak), as `crash.rs` does.
#[test]
fn crash_every_cut_point() {
    let seeds: u64 = std::env::var("QIMG_CRASH_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    for k in 0..seeds {
        crash_case(256 * 1024, 12, 200 * 1024, 60, 5 + 100 * k);
        crash_case(512 * 1024, 16, 512 * 1024, 40, 6 + 100 * k);
        crash_case(64 * 1024 + 512, 9, 40 * 1024, 80, 7 + 100 * k);
    }
}
