//! What every command needs from the process: program names and output helpers.

use std::io::Write;

use crate::args::{Getopt, GetoptError, Item, LongOpt};

/// Per-invocation context handed to every command.
///
/// qemu-img uses two spellings of its own name: error messages start with the basename of
/// argv[0] (`qemu-img: ...`), while getopt diagnostics and the `Try '... --help'` hints
/// repeat argv[0] exactly as it was invoked (`./qemu-img info: ...`).
#[derive(Clone, Debug)]
pub struct Ctx {
    /// argv[0] as given.
    pub argv0: String,
    /// Basename of argv[0].
    pub prog: String,
}

impl Ctx {
    /// Builds the context from argv[0].
    pub fn new(argv0: &str) -> Self {
        let prog = argv0.rsplit('/').next().unwrap_or(argv0);
        let prog = if prog.is_empty() { argv0 } else { prog };
        Self {
            argv0: argv0.to_string(),
            prog: prog.to_string(),
        }
    }

    /// Prints `<prog>: <msg>` to stderr (QEMU's `error_report`).
    pub fn error(&self, msg: &str) {
        eprint_ignore(&format!("{}: {}\n", self.prog, msg));
    }

    /// Prints `<prog>: warning: <msg>` to stderr.
    pub fn warn(&self, msg: &str) {
        eprint_ignore(&format!("{}: warning: {}\n", self.prog, msg));
    }

    /// The `Try '<argv0> <cmd> --help' for more info` hint.
    pub fn try_help(&self, cmd: &str) -> String {
        format!("Try '{} {} --help' for more info", self.argv0, cmd)
    }

    /// A usage error (qemu-img's `error_exit`): the message, the help hint, exit code 1.
    pub fn usage_error(&self, cmd: &str, msg: &str) -> i32 {
        eprint_ignore(&format!("{}: {}\n{}\n", self.prog, msg, self.try_help(cmd)));
        1
    }

    /// Reports a getopt diagnostic with the help hint; returns exit code 1.
    pub fn getopt_error(&self, cmd: &str, e: &GetoptError) -> i32 {
        eprint_ignore(&format!("{}\n{}\n", e.message, self.try_help(cmd)));
        1
    }

    /// The name getopt prints before its diagnostics for subcommand `cmd`.
    pub fn getopt_name(&self, cmd: &str) -> String {
        format!("{} {}", self.argv0, cmd)
    }

    /// Starts option parsing for subcommand `cmd`.
    pub fn getopt<'a>(
        &self,
        cmd: &str,
        args: &'a [String],
        short: &'a str,
        long: &'a [LongOpt],
    ) -> Getopt<'a> {
        Getopt::new(&self.getopt_name(cmd), args, short, long)
    }

    /// Prints a command's `--help` text, naming the program as invoked.
    pub fn print_help(&self, text: &str) {
        print_ignore(&text.replace("qemu-img", &self.prog));
    }

    /// The placeholder every command prints until its body exists; returns exit code 1.
    pub fn not_implemented(&self, cmd: &str) -> i32 {
        self.error(&format!("{cmd}: not implemented yet"));
        1
    }
}

/// Writes to stdout, ignoring errors: a closed pipe (`qimg info x | head -1`) must not
/// turn into a panic.
pub fn print_ignore(s: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(s.as_bytes());
    let _ = out.flush();
}

/// Writes to stderr, ignoring errors.
pub fn eprint_ignore(s: &str) {
    let _ = std::io::stderr().lock().write_all(s.as_bytes());
}

/// What a command's option parser produced.
#[derive(Debug)]
pub enum Parsed<T> {
    /// Options and operands are valid; run the command.
    Run(T),
    /// The command is already finished (help printed, or a usage error reported) and the
    /// process should exit with this code.
    Exit(i32),
}

/// Drives a getopt loop: calls `on_item` for every option or operand, turning getopt
/// errors into qemu-img's diagnostics. `on_item` returns `Err(code)` to stop with an
/// exit code (after printing whatever it needs to).
pub fn run_getopt(
    ctx: &Ctx,
    cmd: &str,
    g: &mut Getopt<'_>,
    mut on_item: impl FnMut(Item) -> Result<(), i32>,
) -> Result<(), i32> {
    while let Some(item) = g.next_item() {
        match item {
            Ok(item) => on_item(item)?,
            Err(e) => return Err(ctx.getopt_error(cmd, &e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let c = Ctx::new("/usr/bin/qemu-img");
        assert_eq!(c.prog, "qemu-img");
        assert_eq!(c.getopt_name("info"), "/usr/bin/qemu-img info");
        assert_eq!(
            c.try_help("info"),
            "Try '/usr/bin/qemu-img info --help' for more info"
        );
        assert_eq!(Ctx::new("qimg").prog, "qimg");
        assert_eq!(Ctx::new("").prog, "");
        assert_eq!(Ctx::new("dir/").prog, "dir/");
    }
}
