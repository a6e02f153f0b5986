//! A bounded cache of metadata slices (L2 tables, later refcount blocks).
//!
//! Memory is bounded by a byte budget, as QEMU's `l2-cache-size`, so it never grows with
//! the image beyond that. Eviction is approximately LRU with a clock counter; lookups take
//! one short mutex hold and loads happen outside the lock.

use crate::error::Result;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A cached slice and the clock tick of its last use.
type Slot = (Arc<Vec<u64>>, u64);

#[derive(Debug)]
pub(crate) struct SliceCache {
    slice_bytes: usize,
    capacity: usize,
    map: Mutex<HashMap<u64, Slot>>,
    clock: AtomicU64,
}

impl SliceCache {
    pub(crate) fn new(slice_bytes: usize, budget: usize) -> SliceCache {
        SliceCache {
            slice_bytes,
            capacity: (budget / slice_bytes).max(8),
            map: Mutex::new(HashMap::new()),
            clock: AtomicU64::new(0),
        }
    }

    pub(crate) fn slice_bytes(&self) -> usize {
        self.slice_bytes
    }

    /// Returns the slice at host offset `key`, loading it with `load` on a miss.
    pub(crate) fn get_or_load(
        &self,
        key: u64,
        load: impl FnOnce() -> Result<Vec<u64>>,
    ) -> Result<Arc<Vec<u64>>> {
        let tick = self.clock.fetch_add(1, Ordering::Relaxed);
        if let Some((v, t)) = self.map.lock().unwrap().get_mut(&key) {
            *t = tick;
            return Ok(v.clone());
        }
        let v = Arc::new(load()?);
        let mut map = self.map.lock().unwrap();
        if map.len() >= self.capacity {
            // Evict the least recently used eighth in one pass so eviction cost amortizes.
            let mut ticks: Vec<u64> = map.values().map(|(_, t)| *t).collect();
            let k = ticks.len() / 8;
            ticks.select_nth_unstable(k);
            let cutoff = ticks[k];
            map.retain(|_, (_, t)| *t > cutoff);
        }
        map.insert(key, (v.clone(), tick));
        Ok(v)
    }

    /// Replaces a cached slice after the caller wrote it to disk.
    #[allow(dead_code)]
    pub(crate) fn put(&self, key: u64, v: Arc<Vec<u64>>) {
        let tick = self.clock.fetch_add(1, Ordering::Relaxed);
        self.map.lock().unwrap().insert(key, (v, tick));
    }

    /// Forgets everything (after metadata changed underneath).
    #[allow(dead_code)]
    pub(crate) fn clear(&self) {
        self.map.lock().unwrap().clear();
    }
}
