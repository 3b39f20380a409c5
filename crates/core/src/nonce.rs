//! The replay-nonce store: every NONCE is remembered until it expires, with a hard cap on the
//! number of entries; a full store fails closed.

use std::sync::atomic::{AtomicUsize, Ordering};

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
}

impl NonceStore {
    /// A store of at most `capacity` entries, each kept `retention_ms` after it was inserted.
    pub fn new(capacity: usize, retention_ms: u64) -> Self {
        Self {
            entries: DashMap::new(),
            live: AtomicUsize::new(0),
            capacity,
            retention_ms,
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
                self.purge_expired(now_ms);
                self.try_insert(nonce, now_ms)
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
        let before = self.entries.len();
        self.entries.retain(|_, expires| *expires > now_ms);
        let removed = before.saturating_sub(self.entries.len());
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
