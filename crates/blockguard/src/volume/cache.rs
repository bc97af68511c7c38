//! A bounded cache of group metadata, sharded so that readers on different groups do not
//! contend. Memory is bounded by the configured capacity, independent of volume size.

use super::group::GroupState;
use crate::cast::usize_of;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

const SHARDS: usize = 16;

struct Shard {
    map: HashMap<u64, (Arc<GroupState>, u64)>,
    tick: u64,
    capacity: usize,
}

/// Group number → metadata state, least recently used entries evicted first.
pub(crate) struct MetaCache {
    shards: Vec<Mutex<Shard>>,
}

/// A locked shard. Loading a missing group happens while it is held, so a load can never
/// overwrite a newer state that a commit installed concurrently.
pub(crate) struct ShardGuard<'a> {
    shard: MutexGuard<'a, Shard>,
}

/// Locks a shard. A shard poisoned by a panic may hold a half-installed entry: it is emptied
/// (every group in it is read from disk again), which is always safe for a cache.
fn lock_shard(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    match shard.lock() {
        Ok(g) => g,
        Err(poisoned) => {
            let mut g = poisoned.into_inner();
            g.map.clear();
            shard.clear_poison();
            g
        }
    }
}

impl MetaCache {
    /// A cache holding at most `groups` groups (at least one). Tiny caches (tests force
    /// eviction with them) get fewer shards, so the bound holds exactly.
    pub(crate) fn new(groups: usize) -> MetaCache {
        let shards = SHARDS.min(groups).max(1);
        let per = groups.div_ceil(shards).max(1);
        MetaCache {
            shards: (0..shards)
                .map(|_| {
                    Mutex::new(Shard {
                        map: HashMap::new(),
                        tick: 0,
                        capacity: per,
                    })
                })
                .collect(),
        }
    }

    /// Forgets every cached group (they are reloaded from disk when next needed).
    pub(crate) fn clear(&self) {
        for shard in &self.shards {
            lock_shard(shard).map.clear();
        }
    }

    /// Locks the shard of `group`.
    pub(crate) fn lock(&self, group: u64) -> ShardGuard<'_> {
        let shard = lock_shard(&self.shards[usize_of(group % self.shards.len() as u64)]);
        ShardGuard { shard }
    }
}

impl ShardGuard<'_> {
    /// The cached state of `group`.
    pub(crate) fn get(&mut self, group: u64) -> Option<Arc<GroupState>> {
        self.shard.tick += 1;
        let tick = self.shard.tick;
        let e = self.shard.map.get_mut(&group)?;
        e.1 = tick;
        Some(e.0.clone())
    }

    /// Installs `state` for `group`, evicting the least recently used entry when full.
    pub(crate) fn put(&mut self, group: u64, state: Arc<GroupState>) {
        self.shard.tick += 1;
        let tick = self.shard.tick;
        if !self.shard.map.contains_key(&group) && self.shard.map.len() >= self.shard.capacity {
            if let Some(victim) = self.shard.map.iter().min_by_key(|(_, v)| v.1).map(|(k, _)| *k) {
                self.shard.map.remove(&victim);
            }
        }
        self.shard.map.insert(group, (state, tick));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{Geometry, Mode};
    use crate::volume::group::Origin;

    fn st() -> Arc<GroupState> {
        let geo = Geometry::for_size(512 * 62, 512, 8).unwrap();
        let origin = Origin::Loaded {
            after_crash: false,
            first_write: false,
            confirmed: true,
        };
        Arc::new(GroupState::parse(
            &geo,
            Mode::Dual,
            &[0; 16],
            0,
            vec![0; 1024].into(),
            origin,
            crate::volume::bitmaps::MapBit::Clear,
        ))
    }

    #[test]
    fn bounded_and_lru() {
        let c = MetaCache::new(1);
        c.lock(0).put(0, st());
        c.lock(1).put(1, st()); // one entry in all: evicts 0
        assert!(c.lock(0).get(0).is_none());
        let c = MetaCache::new(16); // one entry per shard
        c.lock(0).put(0, st());
        c.lock(16).put(16, st()); // same shard: evicts 0
        assert!(c.lock(0).get(0).is_none());
        assert!(c.lock(16).get(16).is_some());
        let c = MetaCache::new(32); // two per shard
        c.lock(0).put(0, st());
        c.lock(16).put(16, st());
        c.lock(0).get(0);
        c.lock(32).put(32, st()); // evicts 16, the least recently used
        assert!(c.lock(16).get(16).is_none());
        assert!(c.lock(0).get(0).is_some());
    }
}
