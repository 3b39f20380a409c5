//! Limits on the accept path, checked when a TCP connection is accepted, before any TLS or
//! registry work is spent on it.
//!
//! | limit | builder setting | default | answer |
//! |---|---|---|---|
//! | absolute deadline for handshake, Prefix and decision | [`crate::Builder::deadline`] | 10 s ([`crate::DEFAULT_DEADLINE`]) | TIMEOUT once TLS is up; closed before that |
//! | time for the first TLS byte | [`crate::Builder::hello_deadline`] | 2 s ([`DEFAULT_HELLO_DEADLINE`]) | closed (`client_hello_timeout`) |
//! | connections being authenticated at once | [`crate::Builder::max_pending`] | 1024 ([`DEFAULT_MAX_PENDING`]) | OVERLOADED, RETRY_AFTER [`OVERLOADED_RETRY_AFTER_S`] |
//! | connections from one source being authenticated at once | [`crate::Builder::max_pending_per_source`] | 64 ([`DEFAULT_MAX_PENDING_PER_SOURCE`]) | OVERLOADED, RETRY_AFTER [`OVERLOADED_RETRY_AFTER_S`] |
//! | attempts per source address | [`crate::Builder::rate_limit`] | 20/s, burst 40 ([`DEFAULT_RATE_LIMIT`]) | RATE_LIMITED, RETRY_AFTER = seconds until the next permitted attempt |
//! | early refusals with a TLS handshake at once | [`crate::Builder::refusal_budget`] | 64 ([`DEFAULT_REFUSAL_BUDGET`]) | beyond it: closed at TCP accept |
//! | time for the PROXY protocol header, with [`crate::Builder::proxy_protocol`] | fixed | [`PROXY_HEADER_DEADLINE`], 2 s (or the deadline, if shorter) | closed before TLS |
//! | size of the PROXY protocol header | fixed | [`portcullis_proxy::MAX_HEADER_LEN`], 1024 bytes | closed before TLS, refused from its 16-byte fixed part |
//! | size of the Prefix frame | fixed by PROTOCOL.md section 2 | header + 4096 bytes ([`MAX_PREFIX_FRAME`]) | MALFORMED from the header alone |
//!
//! ## Admission under a flood
//!
//! Three rules keep connections that are held open (silent after TCP, or a byte now and then)
//! from filling [`crate::Builder::max_pending`] for everyone: the first TLS byte must come
//! within [`crate::Builder::hello_deadline`] (2 s); one source may have at most
//! [`crate::Builder::max_pending_per_source`] (64) connections being authenticated; and when
//! the cap is full, a new connection closes the oldest connection still in its TLS handshake
//! (audited `shed_for_newer`) and takes its place, waiting at most 250 ms for it. A valid
//! client finishes its handshake in milliseconds, so it is never the oldest for long; only
//! when no connection is in its handshake is the newcomer refused with OVERLOADED.
//!
//! ## Early refusals
//!
//! A connection over the rate limit or over [`crate::Builder::max_pending`] is refused before
//! its Prefix is read: no registry work, no nonce, no lockout count is spent on it. A Verdict
//! can only be written inside TLS, so such a connection still costs a TLS handshake; those
//! handshakes run in a small separate budget ([`crate::Builder::refusal_budget`], each under
//! [`REFUSAL_DEADLINE`] or the connection deadline, whichever is shorter), so that they never
//! take the place of connections being authenticated. When that budget is spent too, a new
//! connection is closed right at TCP accept, without a handshake and without a Verdict: the
//! client sees the connection closed and retries later.
//!
//! ## The rate limit
//!
//! Attempts are counted per source address with the GCRA of the [`governor`] crate: `burst`
//! attempts at once, then `per_second` attempts a second. IPv4 addresses (also IPv4-mapped
//! IPv6 ones) count one by one; IPv6 addresses count by their /64 network, the block one
//! subscriber usually holds. Time is measured on the monotonic clock, not on the gate's clock.
//! The limiter's memory is bounded: the sources whose state is the same as a fresh one are
//! dropped every few seconds, and at most [`RATE_LIMIT_MAX_SOURCES`] sources are tracked at
//! once; while the table is full, a new attempt is refused with OVERLOADED (fail closed) and
//! the table is swept at once.
//!
//! ## Frame size
//!
//! The Prefix is read as a 7-byte header, checked before anything else is read (a length
//! over 4096 is MALFORMED at once), then exactly the body the header announces: the server
//! never holds more than [`MAX_PREFIX_FRAME`] bytes of one connection's Prefix.

use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, MonotonicClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};
use portcullis_core::codec::{HEADER_LEN, MAX_BODY_LEN};

/// The default time a new connection has to send its first TLS byte
/// ([`crate::Builder::hello_deadline`]): a client's ClientHello follows its TCP handshake at
/// once, so a connection silent for this long is closed well before the whole deadline.
pub const DEFAULT_HELLO_DEADLINE: Duration = Duration::from_secs(2);

/// The default cap on connections from one source (IPv4 address, IPv6 /64) being
/// authenticated at once ([`crate::Builder::max_pending_per_source`]): whoever holds
/// connections open from a few addresses cannot fill the server's cap.
pub const DEFAULT_MAX_PENDING_PER_SOURCE: usize = 64;

/// The default cap on connections being authenticated at once ([`crate::Builder::max_pending`]).
pub const DEFAULT_MAX_PENDING: usize = 1024;

/// The largest value [`crate::Builder::max_pending`] and [`crate::Builder::refusal_budget`]
/// take.
pub const MAX_CONNECTION_CAP: usize = 1 << 20;

/// The default number of early refusals (OVERLOADED, RATE_LIMITED) that may be in their TLS
/// handshake at once ([`crate::Builder::refusal_budget`]).
pub const DEFAULT_REFUSAL_BUDGET: usize = 64;

/// The most time an early refusal gets for its TLS handshake and Verdict.
pub const REFUSAL_DEADLINE: Duration = Duration::from_secs(2);

/// How long a connection may take to send its PROXY protocol header, with
/// [`crate::Builder::proxy_protocol`]: a balancer writes it as soon as it has connected.
pub const PROXY_HEADER_DEADLINE: Duration = Duration::from_secs(2);

/// RETRY_AFTER, in seconds, of an OVERLOADED Verdict sent because the server is at its limit of
/// connections being authenticated.
pub const OVERLOADED_RETRY_AFTER_S: u32 = 1;

/// The most source addresses the rate limiter tracks at once.
pub const RATE_LIMIT_MAX_SOURCES: usize = 100_000;

/// The most bytes the server holds for one connection's Prefix: the 7-byte header and a body
/// of at most 4096 bytes.
pub const MAX_PREFIX_FRAME: usize = HEADER_LEN + MAX_BODY_LEN;

/// The default rate limit per source address: 20 attempts a second, bursts of 40.
pub const DEFAULT_RATE_LIMIT: RateLimit = RateLimit {
    per_second: 20,
    burst: 40,
};

/// A rate limit on connection attempts from one source address ([`crate::Builder::rate_limit`]).
///
/// ```
/// use portcullis_server::RateLimit;
/// let limit = RateLimit::new(5, 10); // bursts of 10, then 5 a second
/// assert_eq!(limit.burst, 10);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Attempts a second, once a burst is spent; at least 1.
    pub per_second: u32,
    /// Attempts allowed at once from a source that was quiet; at least 1.
    pub burst: u32,
}

impl RateLimit {
    /// `burst` attempts at once, then `per_second` a second.
    pub const fn new(per_second: u32, burst: u32) -> Self {
        Self { per_second, burst }
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        DEFAULT_RATE_LIMIT
    }
}

/// Why the rate limiter refused an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limited {
    /// The source is over its limit; the next attempt is permitted after this many seconds.
    Source { retry_after_s: u32 },
    /// The table of sources is full.
    Full,
}

/// The key an address is counted under: IPv4 addresses one by one, IPv6 by /64.
pub(crate) fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let network = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(network))
            }
        },
    }
}

/// Per-source rate limiter with a bounded table.
pub(crate) struct SourceLimiter<C: Clock = MonotonicClock> {
    limiter: RateLimiter<IpAddr, DashMapStateStore<IpAddr>, C, NoOpMiddleware<C::Instant>>,
    max_sources: usize,
}

impl SourceLimiter<MonotonicClock> {
    pub(crate) fn new(limit: RateLimit) -> Option<Self> {
        Self::with_clock(limit, RATE_LIMIT_MAX_SOURCES, MonotonicClock)
    }
}

impl<C: Clock> SourceLimiter<C> {
    /// `None` when a number is zero.
    pub(crate) fn with_clock(limit: RateLimit, max_sources: usize, clock: C) -> Option<Self> {
        let quota = Quota::per_second(NonZeroU32::new(limit.per_second)?)
            .allow_burst(NonZeroU32::new(limit.burst)?);
        Some(Self {
            limiter: RateLimiter::dashmap_with_clock(quota, clock),
            max_sources,
        })
    }

    /// Counts one attempt from `ip`.
    pub(crate) fn check(&self, ip: IpAddr) -> Result<(), Limited> {
        if self.limiter.len() >= self.max_sources {
            return Err(Limited::Full);
        }
        self.limiter
            .check_key(&source_key(ip))
            .map_err(|not_until| {
                let wait = not_until.wait_time_from(self.limiter.clock().now());
                let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                Limited::Source {
                    retry_after_s: u32::try_from(secs).unwrap_or(u32::MAX).max(1),
                }
            })
    }

    /// Drops the sources whose state is the same as a fresh one, and gives memory back.
    pub(crate) fn sweep(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// How many sources are tracked.
    pub(crate) fn len(&self) -> usize {
        self.limiter.len()
    }
}

/// Connections being authenticated, counted by source ([`source_key`]).
#[derive(Debug, Default)]
pub(crate) struct SourceSlots {
    counts: dashmap::DashMap<IpAddr, usize>,
}

/// One connection's place in [`SourceSlots`], given back when dropped.
#[derive(Debug)]
pub(crate) struct SourceSlot {
    slots: std::sync::Arc<SourceSlots>,
    key: IpAddr,
}

impl SourceSlots {
    /// A place for a connection from `ip`, unless `max` from its source hold one.
    pub(crate) fn take(self: &std::sync::Arc<Self>, ip: IpAddr, max: usize) -> Option<SourceSlot> {
        let key = source_key(ip);
        let mut count = self.counts.entry(key).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(SourceSlot {
            slots: self.clone(),
            key,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        // The entry goes when its count does: the map holds only sources with connections.
        self.slots.counts.remove_if_mut(&self.key, |_, count| {
            *count -= 1;
            *count == 0
        });
    }
}

/// What a side endpoint does with a new connection while `max` are open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WhenFull {
    /// The new connection is closed at once.
    CloseNew,
    /// The oldest open connection is closed to make room: whoever holds connections open
    /// (idle, or sending nothing) cannot keep a newcomer out.
    ShedOldest,
}

/// Serves each connection accepted on `listener` with `serve` in a task of its own while at
/// most `max` are open; beyond that, `full` decides. An accept error is logged (naming `what`)
/// and retried after 50 ms. Aborting the task ends every connection it serves. For the side
/// endpoints (metrics, health); must be called within a tokio runtime.
pub(crate) fn spawn_bounded_endpoint<F, Fut>(
    listener: tokio::net::TcpListener,
    max: usize,
    full: WhenFull,
    what: &'static str,
    serve: F,
) -> tokio::task::AbortHandle
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        // Oldest first. Dropping the set (when the task is aborted) ends every connection.
        let mut open: std::collections::VecDeque<tokio::task::AbortHandle> =
            std::collections::VecDeque::new();
        let mut connections = tokio::task::JoinSet::new();
        loop {
            while connections.try_join_next().is_some() {}
            open.retain(|task| !task.is_finished());
            let tcp = match listener.accept().await {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "{what} endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            open.retain(|task| !task.is_finished());
            if open.len() >= max.max(1) {
                match full {
                    WhenFull::CloseNew => continue,
                    WhenFull::ShedOldest => {
                        if let Some(oldest) = open.pop_front() {
                            oldest.abort();
                        }
                    }
                }
            }
            open.push_back(connections.spawn(serve(tcp)));
        }
    })
    .abort_handle()
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use std::net::Ipv4Addr;

    fn limiter(
        limit: RateLimit,
        max: usize,
    ) -> (SourceLimiter<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (
            SourceLimiter::with_clock(limit, max, clock.clone()).unwrap(),
            clock,
        )
    }

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));

    #[test]
    fn a_burst_then_the_rate_with_the_wait_in_whole_seconds() {
        let (l, clock) = limiter(RateLimit::new(1, 3), 100);
        for _ in 0..3 {
            assert_eq!(l.check(A), Ok(()));
        }
        assert_eq!(l.check(A), Err(Limited::Source { retry_after_s: 1 }));
        // Another source has its own budget.
        assert_eq!(l.check(B), Ok(()));
        clock.advance(Duration::from_millis(1000));
        assert_eq!(l.check(A), Ok(()));
        assert_eq!(l.check(A), Err(Limited::Source { retry_after_s: 1 }));

        // 200 ms into a 1 s wait: rounded up to whole seconds, never 0.
        let (l, clock) = limiter(RateLimit::new(1, 1), 100);
        assert_eq!(l.check(A), Ok(()));
        clock.advance(Duration::from_millis(200));
        assert_eq!(l.check(A), Err(Limited::Source { retry_after_s: 1 }));
        clock.advance(Duration::from_millis(800));
        assert_eq!(l.check(A), Ok(()));
    }

    #[test]
    fn zero_is_not_a_limit() {
        assert!(SourceLimiter::new(RateLimit::new(0, 10)).is_none());
        assert!(SourceLimiter::new(RateLimit::new(10, 0)).is_none());
        assert!(SourceLimiter::new(RateLimit::default()).is_some());
    }

    #[test]
    fn ipv6_counts_by_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source_key(a), source_key(b));
        assert_ne!(source_key(a), source_key(other));
        assert_eq!(source_key(a), "2001:db8:1:2::".parse::<IpAddr>().unwrap());
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(source_key(mapped), A);

        let (l, _) = limiter(RateLimit::new(1, 2), 100);
        assert_eq!(l.check(a), Ok(()));
        assert_eq!(l.check(b), Ok(()));
        assert!(l.check(a).is_err(), "a and b share one /64 budget");
        assert_eq!(l.check(other), Ok(()));
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn the_table_is_bounded_and_swept() {
        let (l, clock) = limiter(RateLimit::new(10, 20), 50);
        for i in 0..50u32 {
            let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            assert_eq!(l.check(ip), Ok(()));
        }
        assert_eq!(l.len(), 50);
        // Full: a new source is refused, fail closed.
        assert_eq!(l.check(A), Err(Limited::Full));
        // A sweep right away keeps them: each still differs from a fresh state.
        l.sweep();
        assert_eq!(l.len(), 50);
        // Once a burst's worth of time has passed, their state is a fresh one and goes.
        clock.advance(Duration::from_secs(2));
        l.sweep();
        assert_eq!(l.len(), 0);
        assert_eq!(l.check(A), Ok(()));
    }
}
