//! `bench` against qemu-img: same messages and exit codes, and write runs leave the same
//! data and allocation (so the requests went to the same offsets).

mod common;

use common::*;
use std::path::Path;

fn no_time(s: &str) -> String {
    s.lines()
        .map(|l| match l.strip_prefix("Run completed in ") {
            Some(_) => "Run completed in X seconds.".to_string(),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn fresh(dir: &Path, opts: &str, size: &str) {
    let _ = std::fs::remove_file(dir.join("b.qcow2"));
    qemu_img_ok(
        dir,
        &["create", "-q", "-f", "qcow2", "-o", opts, "b.qcow2", size],
    );
}

#[test]
fn bench_matches_qemu_img() {
    let t = Tmp::new("bench");
    let (q, o) = (t.path().join("q"), t.path().join("t"));
    std::fs::create_dir(&q).unwrap();
    std::fs::create_dir(&o).unwrap();
    let cases: &[&[&str]] = &[
        &["-c", "100"],
        &["-c", "100", "-d", "4", "-s", "1k", "-S", "3000"],
        &["-w", "-c", "20", "-s", "512", "-S", "5000", "--pattern=7"],
        &[
            "-w",
            "-c",
            "50",
            "-s",
            "64k",
            "-o",
            "8k",
            "--pattern",
            "0x5a",
        ],
        &[
            "-w",
            "-c",
            "40",
            "-s",
            "4k",
            "-S",
            "12k",
            "-d",
            "4",
            "--flush-interval=7",
        ],
        &[
            "-w",
            "-c",
            "40",
            "-d",
            "7",
            "--flush-interval=7",
            "--no-drain",
            "-t",
            "unsafe",
        ],
        &["-w", "-c", "40", "--flush-interval=7"],
        &["-c", "4", "--flush-interval=2"],
        &["-w", "-c", "9", "-s", "1M", "-S", "0", "-d", "1"],
        &["-c", "5", "-s", "100000"],
        &["-c", "5", "-o", "70000", "-d", "1"],
        &["-c", "0"],
        &["-d", "0"],
        &["-c", "abc"],
        &["--pattern=256", "-w"],
        &["--flush-interval=5"],
        &["-i", "foo"],
        &["-n"],
        &["-t", "bogus"],
        &["-t", "none", "-n", "-c", "3"],
        &["-S", "1G", "-c", "3"],
        &["-c", "3", "-q"],
    ];
    for args in cases {
        for d in [&q, &o] {
            fresh(d, "cluster_size=512", "64k");
        }
        let mut a = vec!["bench"];
        a.extend_from_slice(args);
        a.push("b.qcow2");
        let theirs = qemu_img(&q, &a);
        let ours = qimg(&o, &a);
        assert_outputs_equal(&ours, &theirs, &no_time);
        if theirs.success() && args.contains(&"-w") {
            let c = qemu_img(t.path(), ["compare", "q/b.qcow2", "t/b.qcow2"]);
            assert_eq!(c.code(), Some(0), "{args:?}: {}", c.describe());
            // Which guest ranges hold data (host offsets, and so how map merges
            // extents, depend on the order concurrent requests completed).
            let coverage = |d: &Path| {
                let m = parse_json(&qemu_img(d, ["map", "--output=json", "b.qcow2"]).ok().stdout);
                let mut out: Vec<(u64, u64, bool, bool)> = Vec::new();
                for e in m.as_array().unwrap() {
                    let (st, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
                    let (data, zero) = (e["data"].as_bool().unwrap(), e["zero"].as_bool().unwrap());
                    match out.last_mut() {
                        Some(l) if l.0 + l.1 == st && l.2 == data && l.3 == zero => l.1 += len,
                        _ => out.push((st, len, data, zero)),
                    }
                }
                out
            };
            assert_eq!(coverage(&o), coverage(&q), "{args:?}: allocation");
            let c = qemu_img(&o, ["check", "b.qcow2"]);
            assert_eq!(c.code(), Some(0), "{}", c.describe());
        }
    }
}

#[test]
fn bench_help_and_usage() {
    let t = Tmp::new("bench-usage");
    assert_same(t.path(), &["bench"]);
    assert_same(t.path(), &["bench", "a", "b"]);
    assert_same(t.path(), &["bench", "-c", "1", "missing.qcow2"]);
}
