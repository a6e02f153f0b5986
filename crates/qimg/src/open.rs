//! Opening images by name: format probing and backing chains.
