//! Runtime corruption handling: a write that would land on metadata is refused, the image
//! is marked corrupt (as QEMU does), and the metadata stays intact.

use qimg::open::{open_image, OpenOptions};
use std::os::unix::fs::FileExt;
use std::process::Command;

fn qemu(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(cmd).args(args).output().unwrap()
}

/// Builds an image whose L2 entry for guest cluster 0 points at the active L1 table.
fn image_with_l2_entry_on_l1(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("c.qcow2");
    let ps = p.to_str().unwrap();
    assert!(qemu("qemu-img", &["create", "-q", "-f", "qcow2", ps, "1M"])
        .status
        .success());
    assert!(qemu("qemu-io", &["-c", "write -P 1 0 64k", ps])
        .status
        .success());
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    // Default layout: L1 at 0x30000, the first L2 table at 0x40000.
    let mut l1 = [0u8; 8];
    f.read_exact_at(&mut l1, 0x30000).unwrap();
    assert_eq!(u64::from_be_bytes(l1) & 0x00ff_ffff_ffff_fe00, 0x40000);
    f.write_all_at(&(0x8000_0000_0003_0000u64).to_be_bytes(), 0x40000)
        .unwrap();
    p
}

#[test]
fn write_onto_metadata_marks_corrupt_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    // QEMU's behaviour on the same damage, for reference.
    let q = image_with_l2_entry_on_l1(dir.path());
    let out = qemu("qemu-io", &["-c", "write -P 2 0 4k", q.to_str().unwrap()]);
    let qemu_err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(qemu_err.contains("Marking image as corrupt"), "{qemu_err}");
    let qemu_info =
        String::from_utf8_lossy(&qemu("qemu-img", &["info", q.to_str().unwrap()]).stdout)
            .to_string();
    assert!(qemu_info.contains("corrupt: true"));
    std::fs::remove_file(&q).unwrap();

    let p = image_with_l2_entry_on_l1(dir.path());
    let before = std::fs::read(&p).unwrap();
    {
        let img = open_image(
            &p,
            &OpenOptions {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap();
        let e = img.write_at(&[2u8; 4096], 0).unwrap_err();
        assert!(e.to_string().contains("corrupt"), "{e}");
        // Every later write fails too.
        assert!(img.write_at(&[3u8; 512], 512 * 1024).is_err());
    }
    let after = std::fs::read(&p).unwrap();
    // The L1 table is untouched; only the corrupt bit changed in the header.
    assert_eq!(before[0x30000..0x40000], after[0x30000..0x40000]);
    assert_eq!(u64::from_be_bytes(after[72..80].try_into().unwrap()) & 2, 2);
    let info = String::from_utf8_lossy(&qemu("qemu-img", &["info", p.to_str().unwrap()]).stdout)
        .to_string();
    assert!(info.contains("corrupt: true"), "{info}");
    // A corrupt image is refused for writing, and still readable.
    assert!(open_image(
        &p,
        &OpenOptions {
            writable: true,
            ..Default::default()
        }
    )
    .is_err());
    assert!(open_image(&p, &OpenOptions::default()).is_ok());
}
