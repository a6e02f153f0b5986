//! `qimg`: accepts `qemu-img`'s command line and dispatches to the subcommands.

use qimg_cli::args::{Getopt, HasArg, Item, Key, LongOpt};
use qimg_cli::cmd;
use qimg_cli::ctx::{eprint_ignore, print_ignore, Ctx};

/// A subcommand entry point: gets the arguments after its name, returns the exit code.
type Handler = fn(&Ctx, &[String]) -> i32;

/// Subcommands with the one-line descriptions `--help` lists (qemu-img's wording).
const COMMANDS: &[(&str, &str, Handler)] = &[
    (
        "amend",
        "Update format-specific options of the image",
        cmd::amend::run,
    ),
    ("bench", "Run simple image benchmark", cmd::bench::run),
    (
        "bitmap",
        "Perform modifications of the persistent bitmap in the image",
        cmd::bitmap::run,
    ),
    ("check", "Check basic image integrity", cmd::check::run),
    (
        "commit",
        "Commit image to its backing file",
        cmd::commit::run,
    ),
    (
        "compare",
        "Check if two images have the same contents",
        cmd::compare::run,
    ),
    (
        "convert",
        "Copy one image to another with optional format conversion",
        cmd::convert::run,
    ),
    (
        "create",
        "Create and format new image file",
        cmd::create::run,
    ),
    (
        "dd",
        "Copy input to output with optional format conversion",
        cmd::dd::run,
    ),
    ("info", "Display information about image", cmd::info::run),
    ("map", "Dump image metadata", cmd::map::run),
    (
        "measure",
        "Calculate file size requred for a new image",
        cmd::measure::run,
    ),
    (
        "meta",
        "List or change the GUID and key/value metadata of a qcow2 image (qimg only)",
        cmd::meta::run,
    ),
    (
        "rebase",
        "Change backing file of the image",
        cmd::rebase::run,
    ),
    (
        "serve",
        "Serve an image over NBD (takes qemu-nbd's options)",
        cmd::serve::run,
    ),
    (
        "resize",
        "Resize the image to the new size",
        cmd::resize::run,
    ),
    (
        "snapshot",
        "List or manipulate snapshots within image",
        cmd::snapshot::run,
    ),
];

/// Image formats qimg handles; listed by `--help`.
const FORMATS: &[&str] = &["file", "qcow2", "raw"];

/// The qemu-img release whose behaviour qimg reproduces.
const QEMU_VERSION: &str = "10.0.2";

const LONG: &[LongOpt] = &[
    LongOpt::new("help", HasArg::No, Key::Short('h')),
    LongOpt::new("version", HasArg::No, Key::Short('V')),
    LongOpt::new("trace", HasArg::Required, Key::Short('T')),
];

fn version(ctx: &Ctx) -> String {
    // Scripts parse "<name> version X.Y.Z", so lead with the qemu-img version we match.
    format!(
        "{} version {} (qimg {})\nqimg is not affiliated with the QEMU Project\n",
        ctx.prog,
        QEMU_VERSION,
        env!("CARGO_PKG_VERSION")
    )
}

fn help(ctx: &Ctx) -> String {
    let p = &ctx.prog;
    let mut s = version(ctx);
    s.push_str(&format!(
        "Disk image utility compatible with qemu-img.  Usage:\n\n  {p} [standard options] COMMAND [--help | command options]\n\n\
         Standard options:\n  -h, --help\n     display this help and exit\n  -V, --version\n     \
         display version info and exit\n  -T,--trace TRACE\n     specify tracing options:\n        \
         [[enable=]<pattern>][,events=<file>][,file=<file>]\n\n\
         Recognized commands (run {p} COMMAND --help for command-specific help):\n\n"
    ));
    for (name, desc, _) in COMMANDS {
        s.push_str(&format!("  {name} - {desc}\n"));
    }
    s.push_str("\nSupported image formats:\n\n ");
    for f in FORMATS {
        s.push(' ');
        s.push_str(f);
    }
    s.push_str("\n\n");
    s
}

fn run(argv: Vec<String>) -> i32 {
    let argv0 = argv.first().map(String::as_str).unwrap_or("qimg");
    let ctx = Ctx::new(argv0);
    let rest = argv.get(1..).unwrap_or_default();
    let try_top = format!("Try '{} --help' for more info", ctx.argv0);
    // '+': options stop at the command name, which owns everything after it.
    let mut g = Getopt::new(&ctx.argv0, rest, "+hVT:", LONG);
    while let Some(item) = g.next_item() {
        match item {
            Ok(Item::Opt(Key::Short('h'), _)) => {
                print_ignore(&help(&ctx));
                return 0;
            }
            Ok(Item::Opt(Key::Short('V'), _)) => {
                print_ignore(&version(&ctx));
                return 0;
            }
            // Tracing QEMU's event points has no meaning here; accept and ignore it.
            Ok(_) => {}
            Err(e) => {
                eprint_ignore(&format!("{}\n{try_top}\n", e.message));
                return 1;
            }
        }
    }
    let operands = g.operands();
    let Some((name, args)) = operands.split_first() else {
        eprint_ignore(&format!("{}: Not enough arguments\n{try_top}\n", ctx.prog));
        return 1;
    };
    match COMMANDS.iter().find(|(n, _, _)| n == name) {
        Some((_, _, handler)) => handler(&ctx, args),
        None => {
            eprint_ignore(&format!(
                "{}: Command not found: {name}\n{try_top}\n",
                ctx.prog
            ));
            1
        }
    }
}

fn main() {
    // Non-UTF-8 arguments are converted lossily for now.
    let argv: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    std::process::exit(run(argv));
}
