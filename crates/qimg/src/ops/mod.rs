//! Format-agnostic operations.
