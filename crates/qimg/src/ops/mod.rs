//! Format-agnostic operations, written against the [`crate::image::Image`] trait.

pub mod commit;
pub mod compare;
pub mod convert;
pub mod dd;
pub mod rebase;
