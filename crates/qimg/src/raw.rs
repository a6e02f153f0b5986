//! Raw images.
