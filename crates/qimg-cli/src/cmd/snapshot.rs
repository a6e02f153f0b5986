//! `qemu-img snapshot`: list, create, apply or delete internal snapshots.
//!
//! qemu-img 10.0.2 (Debian) declares `--apply`, `--create` and `--delete` without an
//! argument and then crashes (SIGSEGV) using the missing one; here they take the snapshot
//! name as their `--help` text says.
use crate::args::{HasArg, Item, Key, LongOpt};
use crate::ctx::{run_getopt, Ctx, Parsed};

const CMD: &str = "snapshot";

/// `qemu-img snapshot --help` text (`qemu-img` is replaced by the program name).
pub const HELP: &str = r#"Usage:
List or manipulate snapshots within image.  Usage:

  qemu-img snapshot [-f FMT | --image-opts] [-l | -a|-c|-d SNAPSHOT]
        [-U] [--object OBJDEF] FILENAME

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
      quiet operations
  -f, --format FMT
      specify FILENAME format explicitly
  --image-opts
      indicates that FILENAME is a complete image specification
   instead of a file name (incompatible with --format)
  -U, --force-share
      open image in shared mode for concurrent access
  --object OBJDEF
      QEMU user-creatable object (eg encryption key)
  Operation, one of:
    -l, --list
       list snapshots in FILENAME (the default)
    -c, --create SNAPSHOT
       create named snapshot
    -a, --apply SNAPSHOT
       apply named snapshot to the base
    -d, --delete SNAPSHOT
       delete named snapshot
  FILENAME - image file name (or specification with --image-opts)

"#;

/// Short options, in getopt syntax.
const SHORT: &str = "a:c:d:f:hlqU";
const IMAGE_OPTS: u16 = 1;
const OBJECT: u16 = 2;

/// Long options, in the table order that decides how ambiguities are listed.
const LONG: &[LongOpt] = &[
    LongOpt::new("help", HasArg::No, Key::Short('h')),
    LongOpt::new("apply", HasArg::Required, Key::Short('a')),
    LongOpt::new("create", HasArg::Required, Key::Short('c')),
    LongOpt::new("delete", HasArg::Required, Key::Short('d')),
    LongOpt::new("list", HasArg::No, Key::Short('l')),
    LongOpt::new("format", HasArg::Required, Key::Short('f')),
    LongOpt::new("force-share", HasArg::No, Key::Short('U')),
    LongOpt::new("image-opts", HasArg::No, Key::Long(IMAGE_OPTS)),
    LongOpt::new("object", HasArg::Required, Key::Long(OBJECT)),
    LongOpt::new("quiet", HasArg::No, Key::Short('q')),
];

/// The operation requested on the command line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SnapshotAction {
    /// `-l` (also the default): print the snapshot table.
    #[default]
    List,
    /// `-a NAME`: revert the image to the snapshot (looked up by ID, then by name).
    Apply(String),
    /// `-c NAME`: create a snapshot.
    Create(String),
    /// `-d NAME`: delete the snapshot with this name.
    Delete(String),
}

/// Everything `qemu-img snapshot` accepts on its command line.
#[derive(Clone, Debug, Default)]
pub struct SnapshotOpts {
    /// What to do (listing when no action option is given).
    pub action: SnapshotAction,
    /// `-f`: image format.
    pub format: Option<String>,
    /// `--image-opts`.
    pub image_opts: bool,
    /// `-U`.
    pub force_share: bool,
    /// `-q`.
    pub quiet: bool,
    /// `--object` definitions.
    pub objects: Vec<String>,
    /// The image.
    pub filename: String,
}

/// Parses the arguments after `snapshot`; usage errors are reported here, exactly as
/// qemu-img words them.
pub fn parse(ctx: &Ctx, args: &[String]) -> Parsed<SnapshotOpts> {
    let mut o = SnapshotOpts::default();
    let mut action_seen = false;
    let mut g = ctx.getopt(CMD, args, SHORT, LONG);
    let res = run_getopt(ctx, CMD, &mut g, |item| {
        let Item::Opt(key, arg) = item else {
            return Ok(());
        };
        let arg = arg.unwrap_or_default();
        match key {
            Key::Short('h') => {
                ctx.print_help(HELP);
                return Err(0);
            }
            Key::Short('a') => {
                if action_seen {
                    return Err(ctx.usage_error(CMD, "Cannot mix '-l', '-a', '-c', '-d'"));
                }
                action_seen = true;
                o.action = SnapshotAction::Apply(arg);
            }
            Key::Short('c') => {
                if action_seen {
                    return Err(ctx.usage_error(CMD, "Cannot mix '-l', '-a', '-c', '-d'"));
                }
                action_seen = true;
                o.action = SnapshotAction::Create(arg);
            }
            Key::Short('d') => {
                if action_seen {
                    return Err(ctx.usage_error(CMD, "Cannot mix '-l', '-a', '-c', '-d'"));
                }
                action_seen = true;
                o.action = SnapshotAction::Delete(arg);
            }
            Key::Short('l') => {
                if action_seen {
                    return Err(ctx.usage_error(CMD, "Cannot mix '-l', '-a', '-c', '-d'"));
                }
                action_seen = true;
                o.action = SnapshotAction::List;
            }
            Key::Short('f') => o.format = Some(arg),
            Key::Short('U') => o.force_share = true,
            Key::Long(IMAGE_OPTS) => o.image_opts = true,
            Key::Long(OBJECT) => o.objects.push(arg),
            Key::Short('q') => o.quiet = true,
            _ => {}
        }
        Ok(())
    });
    if let Err(code) = res {
        return Parsed::Exit(code);
    }
    let ops = g.operands();
    if ops.len() != 1 {
        return Parsed::Exit(ctx.usage_error(CMD, "Expecting one image file name"));
    }
    o.filename = ops[0].clone();
    Parsed::Run(o)
}

/// Runs `snapshot`; returns the process exit code.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    match parse(ctx, args) {
        Parsed::Run(opts) if crate::secrets::register(ctx, &opts.objects).is_err() => 1,
        Parsed::Run(opts) => snapshot_cmd(ctx, &opts),
        Parsed::Exit(code) => code,
    }
}

fn snapshot_cmd(ctx: &Ctx, o: &SnapshotOpts) -> i32 {
    use crate::cmd::common::{as_qcow2, image_spec, open, ro_options};
    use crate::fmt::{local_utc_offset, snapshot_header, snapshot_line};
    let (filename, format) = match image_spec(ctx, &o.filename, o.format.clone(), o.image_opts) {
        Ok(x) => x,
        Err(c) => return c,
    };
    if o.action != SnapshotAction::List {
        return change(ctx, o, &filename, format);
    }
    let mut opts = ro_options(format, o.force_share);
    opts.no_backing = true;
    opts.no_data_file = true;
    let img = match open(ctx, &filename, &opts) {
        Ok(i) => i,
        Err(c) => return c,
    };
    let Some(q) = as_qcow2(img.as_ref()) else {
        return 0;
    };
    if q.snapshots().is_empty() {
        return 0;
    }
    let mut out = String::from("Snapshot list:\n");
    out += &snapshot_header();
    out += "\n";
    for sn in q.snapshots() {
        let date = sn.date_sec as i64;
        out += &snapshot_line(
            &sn.id,
            &sn.name,
            sn.vm_state_size,
            date,
            local_utc_offset(date),
            sn.vm_clock_nsec,
            sn.icount,
        );
        out += "\n";
    }
    crate::ctx::print_ignore(&out);
    0
}

/// `-c`, `-a`, `-d`: open read-write (without the backing chain, as qemu-img does) and
/// change the snapshot table.
fn change(ctx: &Ctx, o: &SnapshotOpts, filename: &str, format: Option<String>) -> i32 {
    use crate::cmd::common::{errno_text, open_owned_rw};
    use qimg::open::OwnedImage;
    let img = match open_owned_rw(ctx, filename, format, true) {
        Ok(i) => i,
        Err(c) => return c,
    };
    let mut q = match img {
        OwnedImage::Qcow2(q) => q,
        OwnedImage::Other(_) => {
            let msg = match &o.action {
                SnapshotAction::Create(n) => {
                    format!("Could not create snapshot '{n}': Operation not supported")
                }
                SnapshotAction::Apply(n) => {
                    format!(
                        "Could not apply snapshot '{n}': Block driver does not support snapshots"
                    )
                }
                SnapshotAction::Delete(n) => {
                    format!("Could not delete snapshot '{n}': snapshot not found")
                }
                SnapshotAction::List => return 0,
            };
            ctx.error(&msg);
            return 1;
        }
    };
    let r = match &o.action {
        SnapshotAction::Create(n) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            q.snapshot_create(n, (now.as_secs() as u32, now.subsec_nanos()))
                .map_err(|e| format!("Could not create snapshot '{n}': {}", errno_text(&e)))
        }
        // The block layer refuses this before the driver looks for the snapshot.
        SnapshotAction::Apply(n) if !q.bitmap_list().is_empty() => Err(format!(
            "Could not apply snapshot '{n}': Device has active dirty bitmaps"
        )),
        SnapshotAction::Apply(n) => q.snapshot_apply(n).map_err(|e| {
            format!(
                "Could not apply snapshot '{n}': Failed to load snapshot: {}",
                errno_text(&e)
            )
        }),
        SnapshotAction::Delete(n) => q
            .snapshot_delete(n)
            .map_err(|e| format!("Could not delete snapshot '{n}': {}", errno_text(&e))),
        SnapshotAction::List => Ok(()),
    };
    let r = r.and_then(|()| q.close().map_err(|e| e.to_string()));
    match r {
        Ok(()) => 0,
        Err(m) => {
            ctx.error(&m);
            1
        }
    }
}
