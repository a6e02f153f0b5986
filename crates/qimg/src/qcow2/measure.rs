//! Size estimates for `qemu-img measure`.
