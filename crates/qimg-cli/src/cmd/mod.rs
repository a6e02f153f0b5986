//! One module per qemu-img subcommand: its option table, `--help` text, an options
//! struct, `parse` (with qemu-img's usage errors) and `run`.

pub mod amend;
pub mod bitmap;
pub mod check;
pub mod commit;
pub mod compare;
pub mod convert;
pub mod create;
pub mod dd;
pub mod info;
pub mod map;
pub mod measure;
pub mod rebase;
pub mod resize;
pub mod snapshot;
