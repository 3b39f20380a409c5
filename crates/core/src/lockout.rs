//! Lockout after repeated failed codes: 5 consecutive failures lock the user for 30 s, each
//! further failure doubles the wait up to 1 hour, and a success clears the count.

/// A user's failure count and lock deadline, as the registry stores it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LockState {
    /// Consecutive failed codes since the last success.
    pub failures: u32,
    /// Unix ms until which the user is locked out (0: not locked).
    pub locked_until_ms: u64,
}

impl LockState {
    /// Milliseconds left until the lock lifts at `now_ms`, or `None` when not locked.
    pub fn remaining_ms(&self, now_ms: u64) -> Option<u64> {
        (self.locked_until_ms > now_ms).then(|| self.locked_until_ms - now_ms)
    }
}

/// When to lock and for how long.
///
/// ```
/// use portcullis_core::{LockState, LockoutPolicy};
/// let policy = LockoutPolicy::default();
/// let mut state = LockState::default();
/// for _ in 0..4 { state = policy.after_failure(state, 0); }
/// assert_eq!(state.remaining_ms(0), None);
/// state = policy.after_failure(state, 0);
/// assert_eq!(state.remaining_ms(0), Some(30_000));
/// state = policy.after_failure(state, 30_000);
/// assert_eq!(state.remaining_ms(30_000), Some(60_000));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockoutPolicy {
    /// Consecutive failures that lock the user (default 5).
    pub threshold: u32,
    /// The first lock's length in ms (default 30 s).
    pub base_ms: u64,
    /// The longest lock in ms (default 1 hour).
    pub max_ms: u64,
}

impl Default for LockoutPolicy {
    fn default() -> Self {
        Self {
            threshold: 5,
            base_ms: 30_000,
            max_ms: 3_600_000,
        }
    }
}

impl LockoutPolicy {
    /// The state after one more failed code at `now_ms`.
    pub fn after_failure(&self, state: LockState, now_ms: u64) -> LockState {
        let failures = state.failures.saturating_add(1);
        if failures < self.threshold.max(1) {
            return LockState {
                failures,
                locked_until_ms: state.locked_until_ms,
            };
        }
        let doublings = (failures - self.threshold.max(1)).min(63);
        let wait = self
            .base_ms
            .checked_shl(doublings)
            .filter(|w| *w >> doublings == self.base_ms)
            .unwrap_or(self.max_ms)
            .min(self.max_ms);
        LockState {
            failures,
            locked_until_ms: now_ms.saturating_add(wait),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_one_hour() {
        let policy = LockoutPolicy::default();
        let mut state = LockState::default();
        let mut waits = Vec::new();
        for i in 0..20u64 {
            let now = i * 10_000_000;
            state = policy.after_failure(state, now);
            waits.push(state.remaining_ms(now).unwrap_or(0) / 1000);
        }
        assert_eq!(
            &waits[..12],
            &[0, 0, 0, 0, 30, 60, 120, 240, 480, 960, 1920, 3600]
        );
        assert!(waits[12..].iter().all(|w| *w == 3600));
    }

    #[test]
    fn huge_failure_counts_do_not_overflow() {
        let policy = LockoutPolicy::default();
        let state = LockState {
            failures: u32::MAX - 1,
            locked_until_ms: 0,
        };
        let next = policy.after_failure(state, u64::MAX - 5);
        assert_eq!(next.locked_until_ms, u64::MAX);
        assert_eq!(policy.after_failure(next, 0).failures, u32::MAX);
    }
}
