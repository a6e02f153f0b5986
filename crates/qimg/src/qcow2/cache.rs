//! A bounded write-back cache of metadata slices (L2 tables).
//!
//! Memory is bounded by a byte budget, as QEMU's `l2-cache-size`, so it never grows with
//! the image beyond that. Clean slices are evicted approximately LRU; dirty slices stay
//! until a flush writes them (the owner flushes when too many are dirty). Lookups take one
//! short mutex hold and loads happen outside the lock.

use crate::error::Result;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A cached slice, the clock tick of its last use, and whether it must be written.
#[derive(Debug)]
struct Slot {
    data: Arc<Vec<u64>>,
    tick: u64,
    dirty: bool,
}

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
        if let Some(s) = self.map.lock().unwrap().get_mut(&key) {
            s.tick = tick;
            return Ok(s.data.clone());
        }
        let v = Arc::new(load()?);
        let mut map = self.map.lock().unwrap();
        // Another thread may have loaded (or dirtied) it meanwhile; keep theirs.
        if let Some(s) = map.get(&key) {
            return Ok(s.data.clone());
        }
        self.evict(&mut map);
        map.insert(
            key,
            Slot {
                data: v.clone(),
                tick,
                dirty: false,
            },
        );
        Ok(v)
    }

    fn evict(&self, map: &mut HashMap<u64, Slot>) {
        if map.len() < self.capacity {
            return;
        }
        // Evict the least recently used eighth of the clean slices in one pass so that the
        // cost amortizes.
        let mut ticks: Vec<u64> = map.values().filter(|s| !s.dirty).map(|s| s.tick).collect();
        if ticks.is_empty() {
            return;
        }
        let k = ticks.len() / 8;
        ticks.select_nth_unstable(k);
        let cutoff = ticks[k];
        map.retain(|_, s| s.dirty || s.tick > cutoff);
    }

    /// Installs new contents for a slice and marks it dirty.
    pub(crate) fn put_dirty(&self, key: u64, v: Vec<u64>) {
        let tick = self.clock.fetch_add(1, Ordering::Relaxed);
        let mut map = self.map.lock().unwrap();
        self.evict(&mut map);
        map.insert(
            key,
            Slot {
                data: Arc::new(v),
                tick,
                dirty: true,
            },
        );
    }

    /// Forgets every slice (the tables changed underneath); none may be dirty.
    pub(crate) fn clear(&self) {
        self.map.lock().unwrap().clear();
    }

    /// Number of dirty slices.
    pub(crate) fn dirty_count(&self) -> usize {
        self.map
            .lock()
            .unwrap()
            .values()
            .filter(|s| s.dirty)
            .count()
    }

    /// The dirty slices as they are now.
    pub(crate) fn dirty_snapshot(&self) -> Vec<(u64, Arc<Vec<u64>>)> {
        let map = self.map.lock().unwrap();
        let mut v: Vec<_> = map
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(k, s)| (*k, s.data.clone()))
            .collect();
        v.sort_by_key(|(k, _)| *k);
        v
    }

    /// Marks slices clean if they did not change since the snapshot was taken.
    pub(crate) fn mark_clean(&self, written: &[(u64, Arc<Vec<u64>>)]) {
        let mut map = self.map.lock().unwrap();
        for (k, data) in written {
            if let Some(s) = map.get_mut(k) {
                if Arc::ptr_eq(&s.data, data) {
                    s.dirty = false;
                }
            }
        }
    }
}
