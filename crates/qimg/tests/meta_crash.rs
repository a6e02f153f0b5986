//! Power cuts during a metadata change (`update_header_metadata`): at every point of the
//! storage journal, with the header write torn at every combination of the 512-byte
//! sectors it changes, what does the image say afterwards?
//!
//! When the change lies in one sector the answer must be the old or the new metadata.
//! When it spans several sectors (as QEMU's own header rewrites can) a torn header may
//! fail to open or to decode; the test measures that and requires that it never reads
//! as metadata that was neither written before nor asked for, and that nothing but the
//! header cluster is ever touched.

use qimg::fault::FaultStorage;
use qimg::ondisk::meta::{Guid, Metadata};
use qimg::qcow2::meta::{update_header_metadata, MetaEdit};
use qimg::qcow2::{Qcow2, Qcow2Options};
use qimg::storage::MemStorage;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

fn qemu_img(dir: &Path, args: &[&str]) {
    let o = Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("qemu-img");
    assert!(o.status.success(), "{args:?}: {o:?}");
}

/// What a reader sees in an image: (GUID, keys, backing file name), or why it could not
/// read them.
type Seen = Result<(Option<Guid>, Metadata, Option<String>), String>;

fn seen(disk: Vec<u8>) -> Seen {
    let q = Qcow2::open(Arc::new(MemStorage::new(disk)), Qcow2Options::default())
        .map_err(|e| e.to_string())?;
    let g = q.guid().map_err(|e| e.to_string())?;
    let m = q.metadata().map_err(|e| e.to_string())?;
    Ok((g, m, q.header().backing_file.clone()))
}

fn apply(disk: Vec<u8>, edits: &[MetaEdit]) -> (FaultStorage, Vec<u8>) {
    let st = FaultStorage::new(disk);
    update_header_metadata(&st, edits).unwrap();
    let after = st.crash_image(st.journal_len(), |_, _| true);
    (st, after)
}

/// Outcome counts of every crash state.
#[derive(Debug, Default)]
struct Counts {
    old: usize,
    new: usize,
    /// The GUID and the keys each old, new or gone, everything else intact (a staged
    /// change between cutting the chain and the switch).
    none: usize,
    /// The image does not open, or its metadata does not decode.
    unreadable: usize,
}

fn crash_all(disk: Vec<u8>, edits: &[MetaEdit], cs: usize) -> Counts {
    let old = seen(disk.clone()).unwrap();
    let (st, new_disk) = apply(disk.clone(), edits);
    let new = seen(new_disk.clone()).unwrap();
    assert_ne!(old, new);
    assert_eq!(
        disk[cs..],
        new_disk[cs..],
        "only the header cluster changes"
    );
    let sectors: Vec<usize> = (0..cs / 512)
        .filter(|&s| disk[s * 512..(s + 1) * 512] != new_disk[s * 512..(s + 1) * 512])
        .collect();
    assert!(sectors.len() <= 12, "{} sectors change", sectors.len());
    let mut c = Counts::default();
    let journal = st.journal();
    for cut in 0..=journal.len() {
        // Each write after the last flush may be torn at any of the changed sectors.
        for mask in 0u32..1 << sectors.len() {
            let img = st.crash_image(cut, |_, s| match sectors.iter().position(|&x| x == s) {
                Some(i) => mask & (1 << i) != 0,
                None => true,
            });
            assert_eq!(img[cs..], disk[cs..]);
            match seen(img) {
                Ok(s) if s == old => c.old += 1,
                Ok(s) if s == new => c.new += 1,
                Ok((g, m, name))
                    if [None, old.0, new.0].contains(&g)
                        && (m.is_empty() || m == old.1 || m == new.1)
                        && name == old.2 =>
                {
                    c.none += 1
                }
                Ok(s) => panic!("a crash state reads as other metadata: {s:?}"),
                Err(_) => c.unreadable += 1,
            }
        }
    }
    c
}

fn image(dir: &Path, opts: &str, backing: bool) -> Vec<u8> {
    let mut a = vec!["create", "-q", "-f", "qcow2", "-o", opts];
    if backing {
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
        a.extend_from_slice(&["-b", "base.qcow2", "-F", "qcow2"]);
    }
    a.extend_from_slice(&["img.qcow2", "4M"]);
    qemu_img(dir, &a);
    std::fs::read(dir.join("img.qcow2")).unwrap()
}

fn set(k: &str, v: &str) -> MetaEdit {
    MetaEdit::Set(k.into(), v.as_bytes().to_vec())
}

#[test]
fn single_sector_changes_leave_old_or_new() {
    let dir = tempfile::tempdir().unwrap();
    let guid = Guid::parse("1b4e28ba-2fa1-41d2-883f-0016d3cca427").unwrap();
    // 512-byte clusters: the whole header is one sector, backing file name included.
    let disk = image(dir.path(), "cluster_size=512", true);
    let (_, with) = apply(disk.clone(), &[set("a", "1")]);
    for edits in [
        vec![set("owner", "alice"), MetaEdit::SetGuid(guid)],
        vec![MetaEdit::Clear],
    ] {
        let start = if edits == [MetaEdit::Clear] {
            with.clone()
        } else {
            disk.clone()
        };
        let c = crash_all(start, &edits, 512);
        assert!(
            c.old > 0 && c.new > 0 && c.none == 0 && c.unreadable == 0,
            "{c:?}"
        );
    }
    // 64 KiB clusters without a backing file: the feature table fills sector 0, an
    // existing GUID ends in sector 1, and a small key/value change stays in sector 1.
    let disk = image(dir.path(), "cluster_size=65536", false);
    let (_, with) = apply(disk, &[MetaEdit::SetGuid(guid), set("a", "1")]);
    let c = crash_all(with, &[set("a", "2"), set("b", "3")], 65536);
    assert!(
        c.old > 0 && c.new > 0 && c.none == 0 && c.unreadable == 0,
        "{c:?}"
    );
}

#[test]
fn multi_sector_changes_leave_old_new_or_no_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let long = |c: &str| c.repeat(600);
    let grow = [
        MetaEdit::NewGuid,
        set("owner", "alice"),
        set("blob", &long("x")),
    ];
    let change = [set("blob", &long("y")), set("c", &long("z"))];
    for (opts, backing) in [
        ("cluster_size=65536", true),
        ("cluster_size=65536", false),
        ("cluster_size=4096,compat=0.10", true),
        ("cluster_size=2M", true),
    ] {
        let disk = image(dir.path(), opts, backing);
        let cs = Qcow2::open(
            Arc::new(MemStorage::new(disk.clone())),
            Qcow2Options::default(),
        )
        .unwrap()
        .cluster_size() as usize;
        // From nothing: the old chain ends before the switch sector, never "none".
        let c = crash_all(disk.clone(), &grow, cs);
        assert!(
            c.old > 0 && c.new > 0 && c.none == 0 && c.unreadable == 0,
            "{opts}: {c:?}"
        );
        // Large to larger, and large to nothing: the chain is cut first.
        let (_, big) = apply(disk.clone(), &grow);
        let c = crash_all(big.clone(), &change, cs);
        assert!(c.old > 0 && c.new > 0 && c.unreadable == 0, "{opts}: {c:?}");
        eprintln!("{opts} backing={backing} change: {c:?}");
        let c = crash_all(big, &[MetaEdit::Clear, MetaEdit::RemoveGuid], cs);
        assert!(c.old > 0 && c.new > 0 && c.unreadable == 0, "{opts}: {c:?}");
    }
}
