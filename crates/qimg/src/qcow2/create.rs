//! Creating qcow2 images laid out as qemu-img lays them out.
