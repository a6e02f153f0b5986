//! The qcow2 format engine.
