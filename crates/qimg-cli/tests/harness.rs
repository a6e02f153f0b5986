//! Tests of the test harness itself: the limits really stop runaway children, and the
//! normalizers change only what they claim to.

mod common;

use common::*;
use std::path::Path;
use std::time::Duration;

#[test]
fn timeout_kills_the_child() {
    let t = Tmp::new("harness_timeout");
    let o = run_with(
        Path::new("sleep"),
        ["30"],
        t.path(),
        Limits {
            timeout: Duration::from_millis(300),
            as_bytes: DEFAULT_AS_LIMIT,
        },
    );
    assert!(o.timed_out);
    assert!(o.elapsed < Duration::from_secs(10), "{:?}", o.elapsed);
    assert!(!o.success());
}

#[test]
fn address_space_limit_stops_large_allocations() {
    let t = Tmp::new("harness_as");
    // 2 GiB under a 1 GiB limit must fail; 64 MiB must work.
    let lim = Limits {
        timeout: Duration::from_secs(30),
        as_bytes: 1 << 30,
    };
    let big = run_with(
        Path::new("python3"),
        ["-c", "b = bytearray(2 << 30)"],
        t.path(),
        lim,
    );
    assert!(
        !big.success(),
        "allocation beyond RLIMIT_AS succeeded: {}",
        big.describe()
    );
    assert!(big.stderr.contains("MemoryError"), "{}", big.describe());
    let small = run_with(
        Path::new("python3"),
        ["-c", "b = bytearray(64 << 20)"],
        t.path(),
        lim,
    );
    assert!(small.success(), "{}", small.describe());
}

#[test]
fn outputs_and_exit_codes_are_captured() {
    let t = Tmp::new("harness_out");
    let o = run_with(
        Path::new("sh"),
        ["-c", "echo out; echo err >&2; exit 3"],
        t.path(),
        Limits::default(),
    );
    assert_eq!(o.code(), Some(3));
    assert_eq!(o.stdout, "out\n");
    assert_eq!(o.stderr, "err\n");
    let s = run_with(
        Path::new("sh"),
        ["-c", "kill -SEGV $$"],
        t.path(),
        Limits::default(),
    );
    assert_eq!(s.signal(), Some(libc::SIGSEGV));
}

#[test]
#[should_panic(expected = "panic")]
fn sanity_check_catches_panics() {
    let t = Tmp::new("harness_panic");
    let o = run_with(
        Path::new("sh"),
        [
            "-c",
            "echo \"thread 'main' panicked at src/x.rs:1:1\" >&2; exit 101",
        ],
        t.path(),
        Limits::default(),
    );
    assert_sane(&o);
}

#[test]
fn program_name_normalization() {
    assert_eq!(
        normalize_prog("qemu-img: Could not open 'qemu-img.qcow2'\n", "qemu-img"),
        "PROG: Could not open 'qemu-img.qcow2'\n"
    );
    assert_eq!(
        normalize_prog(
            "qimg info: unrecognized option '--x'\nTry 'qimg info --help' for more info\n",
            "qimg"
        ),
        "PROG info: unrecognized option '--x'\nTry 'PROG info --help' for more info\n"
    );
    // A file name that starts like the program is left alone.
    assert_eq!(normalize_prog("qimgfoo: x\n", "qimg"), "qimgfoo: x\n");
}

#[test]
fn info_normalization_touches_only_volatile_fields() {
    let json = "{\n    \"virtual-size\": 1048576,\n    \"actual-size\": 200704,\n    \"children\": [\n        {\"x\": 1,\n            \"actual-size\": 4096\n        }\n    ]\n}";
    let n = normalize_info_json_text(json);
    assert!(!n.contains("200704") && !n.contains("4096"));
    assert!(n.contains("\"virtual-size\": 1048576,"));
    assert!(n.contains("\"actual-size\": 0,"));
    parse_json(&n);
    let human = "virtual size: 1 MiB (1048576 bytes)\ndisk size: 196 KiB\n    disk size: 4 KiB";
    assert_eq!(
        normalize_info_human(human),
        "virtual size: 1 MiB (1048576 bytes)\ndisk size: X\n    disk size: X"
    );
}

#[test]
fn file_comparison_finds_the_first_difference() {
    let t = Tmp::new("harness_cmp");
    let a = t.join("a");
    let b = t.join("b");
    write_pseudo_random(&a, 3 << 20, 1);
    std::fs::copy(&a, &b).unwrap();
    assert!(compare_files(&a, &b).is_ok());
    write_at(&b, (2 << 20) + 5, &[!read_at(&a, (2 << 20) + 5, 1)[0]]);
    let e = compare_files(&a, &b).unwrap_err();
    assert!(e.contains("at byte 2097157"), "{e}");
    std::fs::copy(&a, &b).unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(&b)
        .unwrap()
        .set_len((3 << 20) + 1)
        .unwrap();
    assert!(compare_files(&a, &b)
        .unwrap_err()
        .contains("different sizes"));
}
