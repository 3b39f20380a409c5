//! The record of a channel's connections, so that a failed RPC can be matched to the Verdict
//! that refused its connection.
//!
//! tonic's `Channel` keeps one HTTP/2 connection at a time and makes a new one when the last
//! one closed. Every connection the connector starts gets the next id of its channel (ids only
//! grow), and the record keeps the outcome of the last [`LOG_LEN`] connections: pending,
//! accepted, or failed with a [`Failure`].
//!
//! A request that fails was carried by the connection that was newest when it started, or by
//! a newer one: never by an older one. So a failed request is matched only to connections
//! whose id is at least the newest id at the time of the call; among those, a failed one whose
//! error text is in the request's error chain (h2 keeps the text of the stream's `io::Error`),
//! else the newest connection if it failed and no connection from the call's snapshot up to
//! it was accepted. An accepted connection in between may have carried the request and failed
//! on its own (dropped while a newer connection was being refused): the newer connection's
//! rejection is not the request's. A rejection recorded before the connection that carried
//! the request is never reported for it.
//!
//! The record also keeps tonic from dialing again on its own: when a connection fails before
//! any request could use it, tonic's reconnect logic asks for a new connection for the same
//! requests. Each connection remembers the channel's call count when it started; while no
//! new call arrived since the newest connection failed, the connector returns that failure
//! instead of asking the code source (perhaps a person) for another code and spending another
//! attempt against the server's lockout.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::error::Failure;

/// How many connection outcomes a channel remembers.
pub(crate) const LOG_LEN: usize = 32;

/// The outcome of one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ConnState {
    /// Connecting, or waiting for the Verdict.
    Pending,
    /// The Verdict accepted the connection.
    Accepted,
    /// The connection failed before HTTP/2 took over.
    Failed(Failure),
}

/// One connection: its id, its outcome, and the channel's call count when it started.
struct Entry {
    id: u64,
    state: ConnState,
    calls: u64,
}

#[derive(Default)]
struct Inner {
    last_id: u64,
    entries: VecDeque<Entry>,
}

/// The connections of one channel.
#[derive(Default)]
pub(crate) struct ConnLog {
    inner: Mutex<Inner>,
    changed: Notify,
}

impl ConnLog {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a connection: its id, recorded as pending. `calls` is the channel's count of
    /// calls so far.
    pub(crate) fn begin(&self, calls: u64) -> u64 {
        let mut inner = self.lock();
        inner.last_id += 1;
        let id = inner.last_id;
        if inner.entries.len() == LOG_LEN {
            inner.entries.pop_front();
        }
        inner.entries.push_back(Entry {
            id,
            state: ConnState::Pending,
            calls,
        });
        id
    }

    /// The failure of the newest connection, if it failed and started when the channel's
    /// call count was already `calls`: then no call arrived since, and a new connection would
    /// only repeat the attempt for the same calls.
    pub(crate) fn failed_since(&self, calls: u64) -> Option<Failure> {
        match self.lock().entries.back() {
            Some(Entry {
                state: ConnState::Failed(f),
                calls: c,
                ..
            }) if *c == calls => Some(f.clone()),
            _ => None,
        }
    }

    /// Records the outcome of connection `id`.
    pub(crate) fn settle(&self, id: u64, state: ConnState) {
        {
            let mut inner = self.lock();
            if let Some(entry) = inner.entries.iter_mut().find(|e| e.id == id) {
                entry.state = state;
            }
        }
        self.changed.notify_waiters();
    }

    /// The newest id handed out (0 before the first connection).
    pub(crate) fn latest_id(&self) -> u64 {
        self.lock().last_id
    }

    /// The outcome of connection `id`, if still remembered.
    pub(crate) fn state(&self, id: u64) -> Option<ConnState> {
        self.lock()
            .entries
            .iter()
            .find(|e| e.id == id)
            .map(|e| e.state.clone())
    }

    /// Waits until connection `id` is no longer pending (or forgotten: then `None`).
    pub(crate) async fn wait_settled(&self, id: u64) -> Option<ConnState> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.state(id) {
                Some(ConnState::Pending) => notified.await,
                other => return other,
            }
        }
    }

    /// The failure that made a request fail, if a connection at least as new as `since`
    /// failed (see the module docs). `io_messages` are the texts of the `io::Error`s in the
    /// request's error chain.
    pub(crate) fn attribute(&self, since: u64, io_messages: &[String]) -> Option<Failure> {
        let inner = self.lock();
        let candidates = || {
            inner.entries.iter().rev().filter_map(|e| match &e.state {
                ConnState::Failed(f) if e.id >= since => Some(f),
                _ => None,
            })
        };
        if let Some(f) = candidates().find(|f| io_messages.contains(&f.io_message())) {
            return Some(f.clone());
        }
        let Some(Entry {
            id: newest,
            state: ConnState::Failed(f),
            ..
        }) = inner.entries.back()
        else {
            return None;
        };
        if *newest < since {
            return None;
        }
        // An accepted connection between the call's snapshot and the newest one may have
        // carried the request; entries older than the log remembers count as unknown, so the
        // oldest remembered id must not be newer than `since` either.
        let accepted_between = inner
            .entries
            .iter()
            .any(|e| e.state == ConnState::Accepted && e.id >= since && e.id < *newest);
        let history_known = inner.entries.front().is_some_and(|e| e.id <= since.max(1));
        (!accepted_between && history_known).then(|| f.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(detail: &str) -> Failure {
        Failure::Io {
            kind: std::io::ErrorKind::ConnectionReset,
            detail: detail.into(),
        }
    }

    #[test]
    fn a_stale_failure_is_not_reported() {
        let log = ConnLog::default();
        let one = log.begin(0);
        log.settle(one, ConnState::Failed(io("one")));
        // A call that started while connection 1 was the newest may have been carried by it.
        assert_eq!(log.attribute(one, &[]), Some(io("one")));
        // Connection 2 is accepted; a call on it that fails is not blamed on connection 1.
        let since = log.latest_id();
        let two = log.begin(0);
        log.settle(two, ConnState::Accepted);
        assert_eq!(log.attribute(since, &[]), None);
        assert_eq!(log.attribute(two, &[]), None);
        // Nor is a call that started after connection 2 existed, even by its text.
        assert_eq!(log.attribute(two, &["connect: one".into()]), None);
    }

    #[test]
    fn the_error_text_picks_the_connection() {
        let log = ConnLog::default();
        let one = log.begin(0);
        let two = log.begin(0);
        log.settle(one, ConnState::Failed(io("one")));
        log.settle(two, ConnState::Pending);
        // The newest is still pending: only the text can tie the request to connection 1.
        assert_eq!(log.attribute(one, &[]), None);
        assert_eq!(
            log.attribute(one, &["connect: one".into()]),
            Some(io("one"))
        );
    }

    #[test]
    fn a_request_on_an_accepted_connection_is_not_blamed_on_the_next_refusal() {
        let log = ConnLog::default();
        let one = log.begin(0);
        log.settle(one, ConnState::Accepted);
        // A call starts while connection 1 is the newest, and is carried by it.
        let since = log.latest_id();
        // Connection 1 drops; connection 2 is refused while the call's error comes in.
        let two = log.begin(1);
        log.settle(two, ConnState::Failed(io("two")));
        // The error names neither connection: the refusal of 2 is not the call's.
        assert_eq!(log.attribute(since, &[]), None);
        assert_eq!(
            log.attribute(since, &["connection reset by peer".into()]),
            None
        );
        // Its text still ties a request to connection 2.
        assert_eq!(
            log.attribute(since, &["connect: two".into()]),
            Some(io("two"))
        );
        // A call that started once connection 2 existed can only have been carried by it.
        assert_eq!(log.attribute(two, &[]), Some(io("two")));
        // Failed connections in between do not prevent the fallback.
        let three = log.begin(2);
        log.settle(three, ConnState::Failed(io("three")));
        assert_eq!(log.attribute(two, &[]), Some(io("three")));
        assert_eq!(log.attribute(since, &[]), None, "1 is still in between");
    }

    #[test]
    fn no_fallback_when_the_connections_in_between_are_forgotten() {
        let log = ConnLog::default();
        let since = log.latest_id();
        for _ in 0..LOG_LEN {
            let id = log.begin(0);
            log.settle(id, ConnState::Failed(io("old")));
        }
        // Connection 1 (perhaps accepted) is still remembered.
        assert_eq!(log.attribute(since, &[]), Some(io("old")));
        let last = log.begin(0);
        log.settle(last, ConnState::Failed(io("last")));
        // Connection 1 is forgotten: it may have been the accepted one that carried the call.
        assert_eq!(log.attribute(since, &[]), None);
        assert_eq!(log.attribute(last, &[]), Some(io("last")));
    }

    #[test]
    fn no_second_attempt_for_the_same_calls() {
        let log = ConnLog::default();
        let one = log.begin(1);
        assert_eq!(log.failed_since(1), None, "pending");
        log.settle(one, ConnState::Failed(io("one")));
        assert_eq!(log.failed_since(1), Some(io("one")));
        assert_eq!(log.failed_since(2), None, "a new call may try again");
        let two = log.begin(2);
        log.settle(two, ConnState::Accepted);
        assert_eq!(log.failed_since(2), None);
    }

    #[tokio::test]
    async fn waiting_for_a_verdict() {
        let log = std::sync::Arc::new(ConnLog::default());
        let id = log.begin(0);
        let waiter = tokio::spawn({
            let log = log.clone();
            async move { log.wait_settled(id).await }
        });
        tokio::task::yield_now().await;
        log.settle(id, ConnState::Accepted);
        assert_eq!(waiter.await.unwrap(), Some(ConnState::Accepted));
        assert_eq!(log.wait_settled(99).await, None);
    }
}
