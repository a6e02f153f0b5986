//! qimg: qcow2, raw and add-cow disk images in Rust.
//!
//! Layers, from the bottom: [`storage`] (files), [`ondisk`] (pure on-disk types), the
//! formats ([`qcow2`], [`raw`], [`addcow`]) implementing the [`image::Image`] trait, and [`ops`]
//! (format-agnostic operations such as convert and compare). See `../shared/DESIGN.md`.
#![warn(missing_docs)]

pub mod addcow;
pub mod buf;
pub mod crypto;
pub mod error;
pub mod fault;
pub mod image;
pub mod mapped;
pub mod ondisk;
pub mod open;
pub mod ops;
pub mod qcow2;
pub mod raw;
pub mod storage;

pub use error::{Error, Result};
pub use image::{Extent, Image, Status};
