//! Streaming writer used by convert.
