//! Broken images: a valid image made by qemu-img is edited byte by byte. For each class of
//! damage, `info`, `check` and `convert -O raw` of the binary under test must:
//! - end within 10 s under a 1 GiB address-space limit, without a signal or a panic;
//! - fail where qemu-img fails (non-zero exit, non-empty stderr) and succeed where it
//!   succeeds (then with the same output: info text, converted bytes);
//! - for `check`: exit with the same code as qemu-img (0 clean, 1 not checked, 2
//!   corruptions, 3 leaks);
//! - where qemu-img cannot open the image: print the same error (modulo program name).
//!
//! All commands are given `-f qcow2`, so no format probing hides the damage.

mod common;

use common::*;
use std::path::Path;
use std::time::Duration;

/// 10 s and 1 GiB of address space for the binary under test. When the suite checks itself
/// against qemu-img, qemu-img gets 4 GiB: it reserves address space per thread (glibc arenas,
/// coroutine stacks) and aborts in `qemu_thread_create` under 1 GiB on some of these images.
fn limits() -> Limits {
    let as_bytes = if testing_qemu_img_itself() {
        4 << 30
    } else {
        1 << 30
    };
    Limits {
        timeout: Duration::from_secs(10),
        as_bytes,
    }
}

const CS: u64 = 65536;

fn mk(cwd: &Path, opts: &str, name: &str, size: &str) {
    let mut a = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        a.extend_from_slice(&["-o", opts]);
    }
    a.extend_from_slice(&[name, size]);
    qemu_img_ok(cwd, &a);
}

/// A valid v3 image (64 KiB clusters) with data, a zero cluster and a compressed cluster.
fn base(cwd: &Path) -> std::path::PathBuf {
    mk(cwd, "", "img", "4M");
    io(
        cwd,
        "qcow2",
        "img",
        &[
            "write -P 1 0 128k",
            "write -z 128k 64k",
            "write -c -P 2 1M 64k",
            "write -P 3 3M 4k",
        ],
    );
    cwd.join("img")
}

fn opened_failed(stderr: &str) -> bool {
    stderr.contains("Could not open")
}

/// Runs info, check and convert on `img` with both tools and asserts the rules above.
fn assert_robust(cwd: &Path, img: &str) {
    let verbose = std::env::var_os("QIMG_TEST_VERBOSE").is_some();
    for cmd in ["info", "check", "convert"] {
        let (args_q, args_t): (Vec<&str>, Vec<&str>) = match cmd {
            "info" => (
                vec!["info", "-f", "qcow2", img],
                vec!["info", "-f", "qcow2", img],
            ),
            "check" => (
                vec!["check", "-f", "qcow2", img],
                vec!["check", "-f", "qcow2", img],
            ),
            _ => (
                vec!["convert", "-f", "qcow2", "-O", "raw", img, "ref.raw"],
                vec!["convert", "-f", "qcow2", "-O", "raw", img, "out.raw"],
            ),
        };
        let theirs = qemu_img(cwd, &args_q);
        let ours = qimg_with(cwd, &args_t, limits());
        if verbose {
            eprintln!(
                "qemu-img {cmd}: {:?}\n{}{}",
                theirs.code(),
                theirs.stdout,
                theirs.stderr
            );
        }
        if cmd == "check" {
            assert_eq!(
                ours.code(),
                theirs.code(),
                "check exit code differs\n--- ours ---\n{}\n--- qemu-img ---\n{}",
                ours.describe(),
                theirs.describe()
            );
        }
        if theirs.success() {
            assert!(
                ours.success(),
                "qemu-img {cmd} succeeds on this image but ours fails\n{}\n--- qemu-img ---\n{}",
                ours.describe(),
                theirs.describe()
            );
            match cmd {
                "info" => assert_eq!(norm_ours(&ours.stdout), norm_theirs(&theirs.stdout)),
                "convert" => assert_files_equal(&cwd.join("out.raw"), &cwd.join("ref.raw")),
                _ => {}
            }
        } else {
            assert_ne!(
                ours.code(),
                Some(0),
                "qemu-img {cmd} fails but ours succeeds\n{}",
                ours.describe()
            );
            assert!(
                !ours.stderr.trim().is_empty(),
                "{cmd}: failure without a message\n{}",
                ours.describe()
            );
            if opened_failed(&theirs.stderr) {
                assert_eq!(
                    norm_ours(&ours.stderr),
                    norm_theirs(&theirs.stderr),
                    "{cmd}: open error message differs\n--- ours ---\n{}\n--- qemu-img ---\n{}",
                    ours.describe(),
                    theirs.describe()
                );
            }
        }
        for f in ["out.raw", "ref.raw"] {
            let _ = std::fs::remove_file(cwd.join(f));
        }
    }
}

/// Asserts that qemu-img refuses to open the image (the case is what it claims to be).
fn assert_qemu_refuses(cwd: &Path, img: &str) {
    let o = qemu_img(cwd, ["info", "-f", "qcow2", img]);
    assert!(
        !o.success(),
        "qemu-img opens this image; the case is not malformed enough: {}",
        o.describe()
    );
}

macro_rules! malformed {
    ($name:ident, refused: $refused:expr, |$cwd:ident, $p:ident| $edit:block) => {
        #[test]
        fn $name() {
            let t = Tmp::new(stringify!($name));
            let $cwd: &Path = t.path();
            let $p = base($cwd);
            $edit
            if $refused {
                assert_qemu_refuses($cwd, "img");
            }
            assert_robust($cwd, "img");
        }
    };
}

// ---- header fields -------------------------------------------------------------------------

malformed!(bad_magic, refused: true, |_c, p| {
    write_at(&p, 0, b"QFI\0");
});

malformed!(version_1, refused: true, |_c, p| {
    put_be32(&p, 4, 1);
});

malformed!(version_4, refused: true, |_c, p| {
    put_be32(&p, 4, 4);
});

malformed!(cluster_bits_8, refused: true, |_c, p| {
    put_be32(&p, 20, 8);
});

malformed!(cluster_bits_22, refused: true, |_c, p| {
    put_be32(&p, 20, 22);
});

malformed!(cluster_bits_huge, refused: true, |_c, p| {
    put_be32(&p, 20, 0xffff_fff0);
});

malformed!(crypt_method_unknown, refused: true, |_c, p| {
    put_be32(&p, 32, 7);
});

malformed!(size_huge, refused: true, |_c, p| {
    // Virtual size far beyond what the L1 table can map.
    put_be64(&p, 24, u64::MAX - 511);
});

malformed!(l1_size_huge, refused: true, |_c, p| {
    put_be32(&p, 36, 0x7fff_ffff);
});

malformed!(l1_size_max_u32, refused: true, |_c, p| {
    put_be32(&p, 36, u32::MAX);
});

malformed!(l1_size_too_small, refused: true, |_c, p| {
    // 4 MiB needs one L1 entry; make the disk need two.
    put_be64(&p, 24, 1 << 30);
});

malformed!(l1_beyond_eof, refused: false, |_c, p| {
    put_be64(&p, 40, 1000 * CS);
});

malformed!(l1_unaligned, refused: true, |_c, p| {
    let h = Qcow2Hdr::read(&p);
    put_be64(&p, 40, h.l1_table_offset + 8);
});

malformed!(l1_overlaps_header, refused: false, |_c, p| {
    put_be64(&p, 40, 0);
});

malformed!(l1_offset_huge, refused: true, |_c, p| {
    put_be64(&p, 40, 0xffff_ffff_ffff_0000);
});

malformed!(reftable_beyond_eof, refused: false, |_c, p| {
    put_be64(&p, 48, 1000 * CS);
});

malformed!(reftable_unaligned, refused: true, |_c, p| {
    let h = Qcow2Hdr::read(&p);
    put_be64(&p, 48, h.refcount_table_offset + 512);
});

malformed!(reftable_zero_clusters, refused: true, |_c, p| {
    put_be32(&p, 56, 0);
});

malformed!(reftable_huge_clusters, refused: true, |_c, p| {
    put_be32(&p, 56, 0x0100_0000);
});

malformed!(reftable_overlaps_header, refused: false, |_c, p| {
    put_be64(&p, 48, 0);
});

malformed!(refcount_order_7, refused: true, |_c, p| {
    put_be32(&p, 96, 7);
});

malformed!(header_length_too_small, refused: true, |_c, p| {
    put_be32(&p, 100, 96);
});

malformed!(header_length_too_large, refused: true, |_c, p| {
    put_be32(&p, 100, (CS + 8) as u32);
});

malformed!(header_length_unaligned, refused: false, |_c, p| {
    // Not a multiple of 8: qemu does not enforce the spec's rule; extensions then start at 108
    // where there are none (only zeros or garbage).
    put_be32(&p, 100, 108);
});

// ---- feature bits ------------------------------------------------------------------------

malformed!(unknown_incompatible_bit_unnamed, refused: true, |_c, p| {
    put_be64(&p, 72, be64(&p, 72) | (1 << 9));
});

malformed!(unknown_incompatible_bits_many, refused: true, |_c, p| {
    put_be64(&p, 72, be64(&p, 72) | 0xffff_0000_0000_0000);
});

malformed!(unknown_incompatible_bit_named, refused: true, |_c, p| {
    // Rename an entry of the feature name table to describe incompatible bit 9.
    let h = Qcow2Hdr::read(&p);
    let (off, _, len) = h.extensions(&p).into_iter().find(|e| e.1 == 0x6803_f857).expect("feature table");
    assert!(len >= 48);
    let mut entry = [0u8; 48];
    entry[0] = 0; // incompatible
    entry[1] = 9;
    entry[2..2 + 17].copy_from_slice(b"future frobnicate");
    write_at(&p, off + 8, &entry);
    put_be64(&p, 72, be64(&p, 72) | (1 << 9));
});

malformed!(compression_type_unknown, refused: true, |_c, p| {
    put_be64(&p, 72, be64(&p, 72) | 8);
    write_at(&p, 104, &[7]);
});

malformed!(compression_type_without_bit, refused: true, |_c, p| {
    write_at(&p, 104, &[1]);
});

malformed!(compression_bit_without_type, refused: true, |_c, p| {
    put_be64(&p, 72, be64(&p, 72) | 8);
});

malformed!(extended_l2_small_clusters, refused: true, |c, p| {
    // Extended L2 on a 4 KiB-cluster image: subclusters of 128 bytes.
    std::fs::remove_file(&p).unwrap();
    mk(c, "cluster_size=4k", "img", "4M");
    put_be64(&p, 72, be64(&p, 72) | 0x10);
});

malformed!(data_file_bit_without_name, refused: false, |_c, p| {
    put_be64(&p, 72, be64(&p, 72) | 4);
});

malformed!(data_file_raw_without_data_file, refused: false, |_c, p| {
    put_be64(&p, 88, be64(&p, 88) | 2);
});

// ---- header extensions --------------------------------------------------------------------

malformed!(extension_length_overflow, refused: true, |_c, p| {
    let h = Qcow2Hdr::read(&p);
    let (off, _, _) = h.extensions(&p)[0];
    put_be32(&p, off + 4, 0xffff_fff0);
});

malformed!(extension_past_cluster_end, refused: true, |_c, p| {
    // An extension header in the last 8 bytes of the first cluster whose data runs past it.
    let h = Qcow2Hdr::read(&p);
    let (off, _, _) = h.extensions(&p)[0];
    put_be32(&p, off, 0x1111_1111);
    put_be32(&p, off + 4, (CS - off - 8) as u32 + 1);
});

malformed!(backing_format_too_long, refused: true, |c, p| {
    std::fs::remove_file(&p).unwrap();
    mk(c, "", "base", "4M");
    qemu_img_ok(c, &["create", "-q", "-f", "qcow2", "-b", "base", "-F", "qcow2", "img"]);
    let h = Qcow2Hdr::read(&p);
    let (off, _, _) = h.extensions(&p).into_iter().find(|e| e.1 == 0xe279_2aca).unwrap();
    put_be32(&p, off + 4, 20);
});

malformed!(bitmaps_extension_bad_length, refused: true, |c, p| {
    qemu_img_ok(c, &["bitmap", "--add", "img", "bm"]);
    let h = Qcow2Hdr::read(&p);
    let (off, _, _) = h.extensions(&p).into_iter().find(|e| e.1 == 0x2385_2875).unwrap();
    put_be32(&p, off + 4, 16);
});

malformed!(bitmaps_zero_bitmaps, refused: true, |c, p| {
    qemu_img_ok(c, &["bitmap", "--add", "img", "bm"]);
    let h = Qcow2Hdr::read(&p);
    let (off, _, _) = h.extensions(&p).into_iter().find(|e| e.1 == 0x2385_2875).unwrap();
    put_be32(&p, off + 8, 0);
});

malformed!(bitmap_directory_garbage, refused: true, |c, p| {
    qemu_img_ok(c, &["bitmap", "--add", "img", "bm"]);
    let h = Qcow2Hdr::read(&p);
    let (off, _, _) = h.extensions(&p).into_iter().find(|e| e.1 == 0x2385_2875).unwrap();
    let dir_size = be64(&p, off + 16);
    let dir_off = be64(&p, off + 24);
    let garbage: Vec<u8> = (0..dir_size).map(|i| (i as u8).wrapping_mul(151).wrapping_add(7)).collect();
    write_at(&p, dir_off, &garbage);
});

malformed!(bitmap_directory_beyond_eof, refused: true, |c, p| {
    qemu_img_ok(c, &["bitmap", "--add", "img", "bm"]);
    let h = Qcow2Hdr::read(&p);
    let (off, _, _) = h.extensions(&p).into_iter().find(|e| e.1 == 0x2385_2875).unwrap();
    put_be64(&p, off + 24, 1 << 40);
});

malformed!(bitmap_directory_huge_size, refused: true, |c, p| {
    qemu_img_ok(c, &["bitmap", "--add", "img", "bm"]);
    let h = Qcow2Hdr::read(&p);
    let (off, _, _) = h.extensions(&p).into_iter().find(|e| e.1 == 0x2385_2875).unwrap();
    put_be64(&p, off + 16, 1 << 40);
});

// ---- backing file name --------------------------------------------------------------------

malformed!(backing_name_too_long, refused: true, |c, p| {
    std::fs::remove_file(&p).unwrap();
    mk(c, "", "base", "4M");
    qemu_img_ok(c, &["create", "-q", "-f", "qcow2", "-b", "base", "-F", "qcow2", "img"]);
    put_be32(&p, 16, 2000);
});

malformed!(backing_offset_beyond_cluster, refused: true, |c, p| {
    std::fs::remove_file(&p).unwrap();
    mk(c, "", "base", "4M");
    qemu_img_ok(c, &["create", "-q", "-f", "qcow2", "-b", "base", "-F", "qcow2", "img"]);
    put_be64(&p, 8, CS + 512);
});

/// Backing-file loops. qemu-img 10.0.2 detects them only in `info --backing-chain`; its
/// `check` and `convert` never return (they recurse until killed), so for those commands the
/// binary under test is only required to fail in time with a message.
fn backing_loop(cwd: &Path) {
    // `info --backing-chain` reports the loop; plain `info` does not open the backing file.
    assert_same(cwd, &["info", "--backing-chain", "img"]);
    assert_same(cwd, &["info", "-f", "qcow2", "img"]);
    if testing_qemu_img_itself() {
        return;
    }
    for args in [
        &["check", "-f", "qcow2", "img"][..],
        &["convert", "-f", "qcow2", "-O", "raw", "img", "out.raw"],
    ] {
        let o = qimg_with(cwd, args, limits());
        assert!(!o.success(), "a backing loop must fail: {}", o.describe());
        assert!(
            !o.stderr.trim().is_empty(),
            "failure without a message: {}",
            o.describe()
        );
    }
}

#[test]
fn backing_self_loop() {
    let t = Tmp::new("backing_self_loop");
    let c = t.path();
    mk(c, "", "base", "4M");
    qemu_img_ok(
        c,
        &[
            "create", "-q", "-f", "qcow2", "-b", "base", "-F", "qcow2", "img",
        ],
    );
    qemu_img_ok(c, &["rebase", "-u", "-F", "qcow2", "-b", "img", "img"]);
    backing_loop(c);
}

#[test]
fn backing_two_image_loop() {
    let t = Tmp::new("backing_two_loop");
    let c = t.path();
    mk(c, "", "other", "4M");
    qemu_img_ok(
        c,
        &[
            "create", "-q", "-f", "qcow2", "-b", "other", "-F", "qcow2", "img",
        ],
    );
    qemu_img_ok(c, &["rebase", "-u", "-F", "qcow2", "-b", "img", "other"]);
    backing_loop(c);
}

// ---- tables and clusters -----------------------------------------------------------------

fn l2_table0(p: &Path) -> u64 {
    be64(p, Qcow2Hdr::read(p).l1_table_offset) & 0x00ff_ffff_ffff_fe00
}

malformed!(l1_entry_beyond_eof, refused: false, |_c, p| {
    let l1 = Qcow2Hdr::read(&p).l1_table_offset;
    put_be64(&p, l1, (1 << 63) | (5000 * CS));
});

malformed!(l1_entry_unaligned, refused: false, |_c, p| {
    let l1 = Qcow2Hdr::read(&p).l1_table_offset;
    put_be64(&p, l1, be64(&p, l1) + 512);
});

malformed!(l1_entry_points_to_metadata, refused: false, |_c, p| {
    // The first L2 table "is" the refcount table; the second L1 entry has reserved bits set.
    let h = Qcow2Hdr::read(&p);
    put_be64(&p, h.l1_table_offset, (1 << 63) | h.refcount_table_offset);
    put_be64(&p, h.l1_table_offset + 8, 0x0200_0000_0000_0000);
});

malformed!(l2_entries_beyond_eof, refused: false, |_c, p| {
    let l2 = l2_table0(&p);
    for i in 0..4u64 {
        put_be64(&p, l2 + 8 * (4 + i), (1 << 63) | ((100_000 + i) * CS));
    }
});

malformed!(l2_entry_offset_max, refused: false, |_c, p| {
    let l2 = l2_table0(&p);
    put_be64(&p, l2 + 8 * 5, (1 << 63) | 0x00ff_ffff_ffff_0000);
});

malformed!(compressed_descriptor_beyond_eof, refused: false, |_c, p| {
    // Guest cluster 16 (1 MiB) is compressed; move its data far past the end of the file.
    let l2 = l2_table0(&p);
    let e = be64(&p, l2 + 8 * 16);
    assert_ne!(e & (1 << 62), 0, "cluster 16 should be compressed");
    put_be64(&p, l2 + 8 * 16, (e & !((1u64 << 54) - 1)) | (1u64 << 50));
});

malformed!(compressed_descriptor_huge_sectors, refused: false, |_c, p| {
    let l2 = l2_table0(&p);
    let e = be64(&p, l2 + 8 * 16);
    put_be64(&p, l2 + 8 * 16, e | (0xffu64 << 54));
});

malformed!(compressed_data_garbage, refused: false, |_c, p| {
    let l2 = l2_table0(&p);
    let e = be64(&p, l2 + 8 * 16);
    let host = e & ((1u64 << 54) - 1);
    write_at(&p, host, &[0xff; 64]);
});

malformed!(zero_flag_in_v2_image, refused: false, |c, p| {
    std::fs::remove_file(&p).unwrap();
    mk(c, "compat=0.10", "img", "4M");
    io(c, "qcow2", "img", &["write -P 1 0 128k"]);
    let l2 = l2_table0(&p);
    put_be64(&p, l2 + 8, be64(&p, l2 + 8) | 1);
});

malformed!(refcount_block_beyond_eof, refused: false, |_c, p| {
    let rt = Qcow2Hdr::read(&p).refcount_table_offset;
    put_be64(&p, rt, 7000 * CS);
});

malformed!(refcount_block_unaligned, refused: false, |_c, p| {
    let rt = Qcow2Hdr::read(&p).refcount_table_offset;
    put_be64(&p, rt, be64(&p, rt) + 8);
});

malformed!(refcount_table_all_garbage, refused: false, |_c, p| {
    let rt = Qcow2Hdr::read(&p).refcount_table_offset;
    let garbage: Vec<u8> = (0..CS).map(|i| (i as u8).wrapping_mul(37) ^ 0x5a).collect();
    write_at(&p, rt, &garbage);
});

// ---- snapshot table ----------------------------------------------------------------------

malformed!(snapshot_table_garbage, refused: true, |c, p| {
    qemu_img_ok(c, &["snapshot", "-c", "s1", "img"]);
    let h = Qcow2Hdr::read(&p);
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    write_at(&p, h.snapshots_offset, &garbage);
});

malformed!(snapshot_count_huge, refused: true, |c, p| {
    qemu_img_ok(c, &["snapshot", "-c", "s1", "img"]);
    put_be32(&p, 60, 100_000);
});

malformed!(snapshot_count_beyond_eof, refused: false, |c, p| {
    qemu_img_ok(c, &["snapshot", "-c", "s1", "img"]);
    put_be32(&p, 60, 5_000); // the table runs ~200 KiB past EOF
});

malformed!(snapshot_offset_unaligned, refused: true, |c, p| {
    qemu_img_ok(c, &["snapshot", "-c", "s1", "img"]);
    let h = Qcow2Hdr::read(&p);
    put_be64(&p, 64, h.snapshots_offset + 8);
});

malformed!(snapshot_extra_data_huge, refused: true, |c, p| {
    qemu_img_ok(c, &["snapshot", "-c", "s1", "img"]);
    let h = Qcow2Hdr::read(&p);
    put_be32(&p, h.snapshots_offset + 36, 0xffff_fff0);
});

malformed!(snapshot_l1_huge, refused: false, |c, p| {
    qemu_img_ok(c, &["snapshot", "-c", "s1", "img"]);
    let h = Qcow2Hdr::read(&p);
    put_be32(&p, h.snapshots_offset + 8, 0x7fff_ffff);
});

// ---- truncation -----------------------------------------------------------------------------

malformed!(empty_file, refused: true, |_c, p| {
    std::fs::write(&p, b"").unwrap();
});

malformed!(truncated_in_header, refused: true, |_c, p| {
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(50).unwrap();
});

malformed!(truncated_after_header, refused: false, |_c, p| {
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(CS).unwrap();
});

malformed!(truncated_mid_data, refused: false, |_c, p| {
    let len = file_len(&p);
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(len - 3 * CS - 100).unwrap();
});
