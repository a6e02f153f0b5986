//! Format-agnostic operations, written against the [`crate::image::Image`] trait.

pub mod compare;
pub mod convert;
