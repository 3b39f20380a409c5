//! The replay-nonce store: every NONCE is remembered until it expires, with a hard cap on the
//! number of entries; a full store fails closed.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

/// Why a nonce was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NonceError {
    /// The nonce is in the store and has not expired: a replay.
    #[error("nonce already seen")]
    Replay,
    /// The store holds its maximum of live entries.
    #[error("nonce store full")]
    Full,
}

/// Remembers nonces until their expiry, up to `capacity` live entries.
///
/// ```
/// use portcullis_core::{NonceError, NonceStore};
/// let store = NonceStore::new(2, 120_000);
/// assert_eq!(store.insert([1; 16], 0), Ok(()));
/// assert_eq!(store.insert([1; 16], 1), Err(NonceError::Replay));
/// assert_eq!(store.insert([2; 16], 1), Ok(()));
/// assert_eq!(store.insert([3; 16], 1), Err(NonceError::Full));
/// // After the retention time the entries expire and make room.
/// assert_eq!(store.insert([3; 16], 120_001), Ok(()));
/// ```
#[derive(Debug)]
pub struct NonceStore {
    entries: DashMap<[u8; 16], u64>,
    live: AtomicUsize,
    capacity: usize,
    retention_ms: u64,
    last_full_purge_ms: AtomicU64,
}

impl NonceStore {
    /// A store of at most `capacity` entries, each kept `retention_ms` after it was inserted.
    pub fn new(capacity: usize, retention_ms: u64) -> Self {
        Self {
            entries: DashMap::new(),
            live: AtomicUsize::new(0),
            capacity,
            retention_ms,
            last_full_purge_ms: AtomicU64::new(0),
        }
    }

    /// The maximum number of entries.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How long an entry is kept, in ms.
    pub fn retention_ms(&self) -> u64 {
        self.retention_ms
    }

    /// Entries currently held (some may have expired and not been purged yet).
    pub fn len(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Whether the store holds no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Remembers `nonce` at `now_ms`; a replay of a live entry is refused. When the store is
    /// full, expired entries are purged once before the insert is refused with
    /// [`NonceError::Full`].
    pub fn insert(&self, nonce: [u8; 16], now_ms: u64) -> Result<(), NonceError> {
        match self.try_insert(nonce, now_ms) {
            Err(NonceError::Full) => {
                // A full store is purged at most once per second: a flood against a full
                // store must not turn every insert into a walk over all entries.
                let last = self.last_full_purge_ms.load(Ordering::Acquire);
                if now_ms >= last.saturating_add(1000)
                    && self
                        .last_full_purge_ms
                        .compare_exchange(last, now_ms, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                {
                    self.purge_expired(now_ms);
                    return self.try_insert(nonce, now_ms);
                }
                Err(NonceError::Full)
            }
            other => other,
        }
    }

    fn try_insert(&self, nonce: [u8; 16], now_ms: u64) -> Result<(), NonceError> {
        let expires = now_ms.saturating_add(self.retention_ms);
        match self.entries.entry(nonce) {
            Entry::Occupied(mut e) => {
                if *e.get() > now_ms {
                    return Err(NonceError::Replay);
                }
                e.insert(expires);
                Ok(())
            }
            Entry::Vacant(v) => {
                if self.live.fetch_add(1, Ordering::AcqRel) >= self.capacity {
                    self.live.fetch_sub(1, Ordering::AcqRel);
                    return Err(NonceError::Full);
                }
                v.insert(expires);
                Ok(())
            }
        }
    }

    /// Drops the entries that expired at `now_ms`; returns how many.
    pub fn purge_expired(&self, now_ms: u64) -> usize {
        // Count what this call removes, entry by entry: inserts and other purges may run at
        // the same time, so the map's length before and after says nothing exact.
        let mut removed = 0usize;
        self.entries.retain(|_, expires| {
            let keep = *expires > now_ms;
            if !keep {
                removed += 1;
            }
            keep
        });
        self.live.fetch_sub(removed, Ordering::AcqRel);
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn expired_entries_can_be_reused_and_are_purged() {
        let store = NonceStore::new(10, 1000);
        store.insert([1; 16], 0).unwrap();
        assert_eq!(store.insert([1; 16], 999), Err(NonceError::Replay));
        assert_eq!(store.insert([1; 16], 1000), Ok(()));
        assert_eq!(store.len(), 1);
        store.insert([2; 16], 1500).unwrap();
        assert_eq!(store.purge_expired(2000), 1);
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn the_live_count_stays_exact_under_concurrent_purges_and_inserts() {
        let store = Arc::new(NonceStore::new(1_000_000, 10));
        let handles: Vec<_> = (0..4u8)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000u32 {
                        let mut n = [t; 16];
                        n[..4].copy_from_slice(&i.to_be_bytes());
                        let now = u64::from(i);
                        store.insert(n, now).unwrap();
                        if t % 2 == 0 && i % 100 == 0 {
                            store.purge_expired(now);
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(store.len(), store.entries.len());
        store.purge_expired(u64::MAX);
        assert_eq!(store.len(), 0);
        assert_eq!(store.entries.len(), 0);
    }

    #[test]
    fn a_full_store_is_purged_at_most_once_a_second() {
        let store = NonceStore::new(1, 10);
        store.insert([1; 16], 0).unwrap();
        // Expired at 10, but the first purge runs at 1000 at the earliest.
        assert_eq!(store.insert([2; 16], 500), Err(NonceError::Full));
        assert_eq!(store.insert([2; 16], 1000), Ok(()));
        assert_eq!(store.insert([3; 16], 1500), Err(NonceError::Full));
        assert_eq!(store.insert([3; 16], 2000), Ok(()));
    }

    #[test]
    fn cap_holds_under_concurrent_inserts() {
        let store = Arc::new(NonceStore::new(1000, 60_000));
        let handles: Vec<_> = (0..4u8)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    let mut ok = 0;
                    for i in 0..1000u16 {
                        let mut n = [t; 16];
                        n[..2].copy_from_slice(&i.to_be_bytes());
                        if store.insert(n, 0).is_ok() {
                            ok += 1;
                        }
                    }
                    ok
                })
            })
            .collect();
        let total: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(total, 1000);
        assert_eq!(store.len(), 1000);
        assert_eq!(store.insert([0xee; 16], 1), Err(NonceError::Full));
    }
}
