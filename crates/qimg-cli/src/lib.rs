//! The `qimg` command line: a drop-in for `qemu-img`'s syntax, messages and output formats.
//!
//! The binary (`main.rs`) only dispatches; everything testable lives here:
//! [`args`] (glibc `getopt_long` behaviour), [`opts`] (sizes and `-o` strings),
//! [`fmt`] (human sizes, QEMU JSON, map and snapshot tables), [`ctx`] (program names and
//! diagnostics) and one module per subcommand in [`cmd`].
#![warn(missing_docs)]

pub mod args;
pub mod cmd;
pub mod ctx;
pub mod fmt;
pub mod opts;
pub mod secrets;
