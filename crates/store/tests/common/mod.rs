//! What the store's tests share: driving the store's futures, and the commits that stand for
//! what the registry's former single-purpose methods did (accepting a step, charging a failure,
//! recording a session).
#![allow(dead_code)]

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};

use portcullis_core::{
    Committed, Effects, GateStore, LockoutPolicy, RegistryError, SessionId, SessionRecord,
    SessionStore,
};

/// A lockout policy that never locks: failures are counted and nothing else. For tests where
/// many commits lose a race on purpose, so that the failures they are charged do not lock the
/// user out of the rounds that follow.
pub const NEVER_LOCK: LockoutPolicy = LockoutPolicy {
    threshold: u32::MAX,
    base_ms: 30_000,
    max_ms: 3_600_000,
};

/// Polls `future` once and returns its output: the SQLite and memory stores' futures are
/// ready at once (as is the gate's, on them).
#[track_caller]
pub fn now<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("an embedded store's future was not ready at once"),
    }
}

/// [`GateStore::commit`] on any store, at once.
pub fn commit(store: &dyn GateStore, effects: &Effects) -> Result<Committed, RegistryError> {
    now(store.commit(effects))
}

/// A code of `user` that matched `step` at `now_ms`, under the default lockout policy.
pub fn accept(user: &str, step: u64, now_ms: u64) -> Effects {
    Effects::AcceptStep {
        user: user.into(),
        step,
        now_ms,
        lockout: LockoutPolicy::default(),
        session: None,
    }
}

/// A failed code of `user` at `now_ms` under `lockout`.
pub fn charge(user: &str, now_ms: u64, lockout: LockoutPolicy) -> Effects {
    Effects::ChargeFailure {
        user: user.into(),
        now_ms,
        lockout,
    }
}

/// The commit that records `session` the way the gate records one: with an accepted step of
/// its user, at the session's TOTP time. Each call takes a step later than any before it in
/// this process (and than any step a test accepts by hand), so that the step is never the
/// reason a record is refused.
pub fn recording(session: &SessionRecord) -> Effects {
    static NEXT_STEP: AtomicU64 = AtomicU64::new(1 << 40);
    Effects::AcceptStep {
        user: session.user.clone(),
        step: NEXT_STEP.fetch_add(1, Ordering::Relaxed),
        now_ms: session.totp_time_ms,
        lockout: LockoutPolicy::default(),
        session: Some(session.clone()),
    }
}

/// Records `session` ([`recording`]), which must succeed.
#[track_caller]
pub fn record(store: &dyn GateStore, session: &SessionRecord) {
    assert_eq!(commit(store, &recording(session)), Ok(Committed::Applied));
}

/// Whether the session with this id is recorded and was revoked.
pub fn is_revoked(store: &dyn SessionStore, id: &SessionId) -> bool {
    store
        .session(id)
        .unwrap()
        .is_some_and(|s| s.revoked_ms.is_some())
}
