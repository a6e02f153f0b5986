//! One module per qemu-img subcommand: its option table, `--help` text, an options
//! struct, `parse` (with qemu-img's usage errors) and `run`.

pub mod amend;
pub mod bench;
pub mod bitmap;
pub mod check;
pub mod commit;
pub mod common;
pub mod compare;
pub mod convert;
pub mod create;
pub mod dd;
pub mod info;
pub mod map;
pub mod measure;
pub mod meta;
pub mod rebase;
pub mod resize;
pub mod serve;
pub mod snapshot;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ctx::{Ctx, Parsed};

    fn sv(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn ok<T>(p: Parsed<T>) -> T {
        match p {
            Parsed::Run(t) => t,
            Parsed::Exit(code) => panic!("parse failed with exit code {code}"),
        }
    }

    fn exit<T>(p: Parsed<T>) -> i32 {
        match p {
            Parsed::Run(_) => panic!("parse unexpectedly succeeded"),
            Parsed::Exit(code) => code,
        }
    }

    #[test]
    fn typical_command_lines() {
        let ctx = Ctx::new("qimg");
        let o = ok(create::parse(
            &ctx,
            &sv(&[
                "-f",
                "qcow2",
                "-o",
                "cluster_size=4k",
                "x.qcow2",
                "-olazy_refcounts",
                "1G",
            ]),
        ));
        assert_eq!(o.format.as_deref(), Some("qcow2"));
        assert_eq!(o.options.raw, "cluster_size=4k,lazy_refcounts");
        assert_eq!((o.filename.as_str(), o.size), ("x.qcow2", Some(1 << 30)));

        let o = ok(info::parse(&ctx, &sv(&["--outp=json", "-bU", "img"])));
        assert_eq!(o.output, crate::opts::OutputFormat::Json);
        assert!(o.backing_chain && o.force_share);

        let o = ok(convert::parse(
            &ctx,
            &sv(&["-O", "qcow2", "-c", "a", "b", "-m4", "c"]),
        ));
        assert_eq!((o.sources, o.target), (sv(&["a", "b"]), "c".to_string()));
        assert_eq!(o.parallel, Some(4));
        assert!(o.compress);

        let o = ok(resize::parse(&ctx, &sv(&["img", "-1G"])));
        assert_eq!(o.size, resize::ResizeSize::Shrink(1 << 30));
        let o = ok(resize::parse(&ctx, &sv(&["--shrink", "img", "--", "+1M"])));
        assert_eq!(o.size, resize::ResizeSize::Grow(1 << 20));

        let o = ok(snapshot::parse(&ctx, &sv(&["-c", "s1", "img"])));
        assert_eq!(o.action, snapshot::SnapshotAction::Create("s1".into()));
        assert_eq!(
            exit(snapshot::parse(&ctx, &sv(&["-l", "-d", "x", "img"]))),
            1
        );

        let o = ok(bitmap::parse(
            &ctx,
            &sv(&[
                "--add", "--merge", "x", "-b", "src", "-g", "64k", "img", "bm",
            ]),
        ));
        assert_eq!(
            o.actions,
            vec![
                bitmap::BitmapAction::Add,
                bitmap::BitmapAction::Merge("x".into())
            ]
        );
        assert_eq!(o.granularity, Some(65536));

        let o = ok(dd::parse(&ctx, &sv(&["if=a", "of=b", "bs=4k", "count=2"])));
        assert_eq!((o.bs, o.count, o.skip), (4096, Some(2), 0));

        let o = ok(measure::parse(&ctx, &sv(&["--size", "10G", "-O", "qcow2"])));
        assert_eq!(o.size, Some(10 << 30));
        assert_eq!(o.filename, None);

        let o = ok(check::parse(&ctx, &sv(&["-r", "all", "img"])));
        assert_eq!(o.repair, Some(crate::opts::RepairMode::All));

        let o = ok(compare::parse(
            &ctx,
            &sv(&["-s", "--right-format=raw", "a", "b"]),
        ));
        assert!(o.strict);
        assert_eq!(o.format2.as_deref(), Some("raw"));

        let o = ok(rebase::parse(&ctx, &sv(&["-u", "-b", "", "img"])));
        assert_eq!(o.backing.as_deref(), Some(""));

        let o = ok(commit::parse(&ctx, &sv(&["-d", "-r", "1M", "img"])));
        assert_eq!(o.rate, Some(1 << 20));

        let o = ok(map::parse(
            &ctx,
            &sv(&["--start-offset=4k", "-l", "1M", "img"]),
        ));
        assert_eq!((o.start_offset, o.max_length), (Some(4096), Some(1 << 20)));

        let o = ok(amend::parse(
            &ctx,
            &sv(&["-o", "compat=0.10", "--force", "img"]),
        ));
        assert_eq!(o.options.get("compat").as_deref(), Some("0.10"));
        assert!(o.force);

        let o = ok(create::parse(&ctx, &sv(&["-f", "qcow2", "-o", "help"])));
        assert!(o.help_requested);
    }
}
