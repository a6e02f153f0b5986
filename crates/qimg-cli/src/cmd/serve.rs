//! `qimg serve`: the NBD server, with qemu-nbd's options (see the qimg-nbd crate).

use crate::ctx::Ctx;

/// Runs the NBD server; returns the process exit code.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    qimg_nbd::cli::main_serve(&format!("{} serve", ctx.prog), args)
}
