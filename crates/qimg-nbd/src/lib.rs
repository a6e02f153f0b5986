//! qimg-nbd: an NBD server for qimg images.
//!
//! Two front doors:
//! - the library: build [`Export`]s over open [`qimg::Image`]s and serve them on listeners
//!   you own with [`serve_listener`] or a [`Server`] (which also gives a
//!   [`ShutdownHandle`]);
//! - [`cli::main_serve`], a drop-in for `qemu-nbd`'s command line (binary `qimg-nbd`).
//!
//! The wire format lives in [`proto`] (constants, headers, chunk encoders; no I/O), the
//! block-status sources in [`meta`]. The protocol followed is the NBD specification
//! (fixed newstyle handshake, structured replies, extended headers, metadata contexts),
//! answering as QEMU's server does where the specification leaves room. With a
//! [`TlsConfig`] in the [`ServerConfig`], clients must negotiate TLS (`NBD_OPT_STARTTLS`)
//! before anything else, as with `qemu-nbd --tls-creds`.
//!
//! Threads, not an async runtime: each connection has its own thread for the handshake
//! and a bounded pool of workers in transmission (see `conn`), so one client can only
//! ever stall itself.
#![warn(missing_docs)]

pub mod cli;
pub mod client;
mod conn;
mod handshake;
pub mod imageopts;
pub mod meta;
pub mod offset;
pub mod overlay;
pub mod proto;
mod server;
pub mod stream;
pub mod tls;

pub use meta::MetaContext;
pub use server::{
    serve_listener, CacheMode, ConfigError, DetectZeroes, Discard, Export, Server, ServerConfig,
    ShutdownHandle,
};
pub use stream::{Listener, Stream};
pub use tls::{TlsConfig, TlsError};
