//! Micro benchmarks of the sans-IO core and of the certificate fingerprint: the pieces a
//! connection pays for between the end of the TLS handshake and its Verdict.
//!
//! Run them with `cargo bench --bench micro`; on a shared machine shorter runs do, e.g.
//! `cargo bench --bench micro -- --warm-up-time 1 --measurement-time 2`.
//!
//! | bench | what one iteration is |
//! |---|---|
//! | `codec/decode_prefix` | `Prefix::decode` of the 89-byte test vector of PROTOCOL.md section 8 |
//! | `decision/accept_session` | the four phases (plan, snapshot, decide, commit: `Gate::authenticate`) of a Prefix with a session ticket, accepted, on the in-memory registry |
//! | `decision/accept_totp` | the same for a Prefix with a TOTP code, accepted (issues a ticket and records its session) |
//! | `decision_sqlite/accept_session`, `decision_sqlite/accept_totp` | the same on a SQLite registry file (one read transaction; for a code, one write transaction) |
//! | `nonce/insert_1thread` | one fresh nonce into a store holding 1,000,000 to 2,000,000 |
//! | `nonce/insert_2threads_contending` | two threads each insert one fresh nonce into the same store |
//! | `totp/check` | `TotpConfig::matching_step` of a valid 6-digit SHA-1 code |
//! | `ticket/seal`, `ticket/open` | sealing and opening a session ticket |
//! | `tls/fingerprint` | `portcullis::tls::fingerprint` of a device certificate's DER |
//!
//! Every decision is checked to be an accept: a bench that silently measured refusals would
//! measure the wrong path, so it stops with the refusal's cause instead.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use portcullis::core::codec::{Factor, Prefix};
use portcullis::core::{
    Clock, ConnectionFacts, Decision, DeviceFingerprint, Gate, GateConfig, ManualClock,
    MemoryRegistry, NonceStore, Registry, SessionClaims, SessionId, SystemRandom, TicketKey,
    TotpAlgorithm, TotpConfig,
};
use portcullis::store::SqliteRegistry;

/// The Prefix test vector of PROTOCOL.md section 8 (USER `alice`, TOTP `287082`).
const PREFIX_VECTOR: &str = "50435331010052010005616c696365020006323837303832030010000102030405060708090a0b0c0d0e0f\
                             0400080000018bcfe56800050020abababababababababababababababababababababababababababababababab";

/// The server's clock when the decision fixtures start, Unix ms.
const START_MS: u64 = 1_700_000_000_000;

/// The tls-exporter value of the (imaginary) connection every decided Prefix arrives on.
const EXPORTER: [u8; 32] = [0x5e; 32];

/// The AGENT a client sends by default; the decision copies it into the audit record.
const AGENT: &str = "portcullis-client/0.1.0";

/// Distinct, random-looking nonces: splitmix64 over a process-wide counter, so no two calls
/// ever return the same 16 bytes (the store hashes them; their randomness is not the point).
fn next_nonce() -> [u8; 16] {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut nonce = [0u8; 16];
    nonce[..8].copy_from_slice(&mix(n).to_le_bytes());
    // The counter itself in the second half keeps the nonces distinct whatever the mix does.
    nonce[8..].copy_from_slice(&n.to_le_bytes());
    nonce
}

fn nonces(n: u64) -> Vec<[u8; 16]> {
    (0..n).map(|_| next_nonce()).collect()
}

fn codec(c: &mut Criterion) {
    let frame = hex::decode(PREFIX_VECTOR).unwrap();
    assert_eq!(frame.len(), 89);
    let decoded = Prefix::decode(&frame).unwrap();
    assert_eq!(decoded.user, "alice");
    assert_eq!(decoded.time_ms, 1_700_000_000_000);

    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Bytes(frame.len() as u64));
    group.bench_function("decode_prefix", |b| {
        b.iter(|| Prefix::decode(black_box(&frame)))
    });
    group.finish();
}

/// Runs a future that is ready at once (the in-memory and SQLite stores never wait).
fn ready<F: std::future::Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(value) => value,
        std::task::Poll::Pending => panic!("the store is expected to answer at once"),
    }
}

/// A gate over a registry holding the user `alice` with one bound device, on a
/// [`ManualClock`], with the default settings (60 s skew, 1,000,000 nonces) but sessions of
/// ten years.
struct GateFixture {
    gate: Gate,
    clock: Arc<ManualClock>,
    totp: TotpConfig,
    facts: ConnectionFacts,
    /// The SQLite registry's folder, kept as long as the fixture.
    _dir: Option<tempfile::TempDir>,
}

impl GateFixture {
    /// On a [`MemoryRegistry`].
    fn new() -> Self {
        Self::on(Arc::new(MemoryRegistry::new()), None)
    }

    /// On a SQLite registry file in a new temporary folder, its secrets sealed under a key as
    /// `portcullis init` makes it.
    fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = portcullis::store::SecretKey::create(&dir.path().join("registry.key")).unwrap();
        let registry =
            SqliteRegistry::create_with_key(&dir.path().join("portcullis.db"), key).unwrap();
        Self::on(Arc::new(registry), Some(dir))
    }

    fn on(registry: Arc<dyn Registry>, dir: Option<tempfile::TempDir>) -> Self {
        let totp =
            TotpConfig::new(b"12345678901234567890".to_vec(), 6, TotpAlgorithm::Sha1, 30).unwrap();
        registry.add_user("alice", totp.clone(), 0).unwrap();
        let fingerprint = DeviceFingerprint::from_bytes([0x42; 32]);
        registry
            .bind_device("laptop", "alice", &fingerprint, 0)
            .unwrap();
        let clock = Arc::new(ManualClock::new(START_MS));
        let rng = Arc::new(SystemRandom::new());
        let key = TicketKey::generate(rng.as_ref()).unwrap();
        // Sessions that outlive the bench: each TOTP iteration is 30 s later than the one
        // before, so with the default hour every accept after the 120th would find an expired
        // record to purge, where a server purges at most once a second of real time.
        let config = GateConfig {
            session_ttl_ms: Some(10 * 365 * 86_400_000),
            ..GateConfig::default()
        };
        let gate = Gate::new(config, registry, key, clock.clone(), rng);
        Self {
            gate,
            clock,
            totp,
            facts: ConnectionFacts {
                exporter: EXPORTER,
                fingerprint,
            },
            _dir: dir,
        }
    }

    /// All four phases of one frame.
    fn decide(&self, frame: &[u8]) -> Decision {
        ready(self.gate.authenticate(frame, &self.facts))
    }

    /// The Prefix frame a client sends at `now_ms` (its clock agrees with the server's).
    fn frame(&self, factor: Factor, now_ms: u64) -> Vec<u8> {
        Prefix {
            user: "alice".into(),
            factor,
            nonce: next_nonce(),
            time_ms: now_ms,
            binding: EXPORTER,
            agent: Some(AGENT.into()),
        }
        .encode()
        .unwrap()
    }

    /// A TOTP frame for the time step of `now_ms`.
    fn totp_frame(&self, now_ms: u64) -> Vec<u8> {
        self.frame(Factor::Totp(self.totp.generate(now_ms / 1000)), now_ms)
    }

    /// Decides `frame` and stops the bench if it was refused.
    fn accept(&self, frame: &[u8]) -> Decision {
        let decision = self.decide(frame);
        if let Err(refusal) = &decision.outcome {
            panic!("the bench decision was refused: {}", refusal.cause);
        }
        decision
    }

    /// A session ticket earned by a TOTP decision at the clock's time.
    fn earn_ticket(&self) -> Vec<u8> {
        let earned = self.accept(&self.totp_frame(self.clock.now_ms()));
        let (ticket, _expires) = earned.verdict.session.unwrap();
        ticket
    }

    /// Empties the nonce store outside the measured time once it holds `limit` entries, by
    /// moving the clock past the retention time (the store never fills up and refuses).
    /// Returns whether it did (the clock moved).
    fn purge_nonces_above(&self, limit: usize) -> bool {
        if self.gate.nonces().len() < limit {
            return false;
        }
        self.clock.advance_ms(self.gate.nonces().retention_ms() + 1);
        self.gate.purge_expired();
        true
    }
}

fn decision(c: &mut Criterion) {
    decision_on(c, "decision", GateFixture::new);
}

fn decision_sqlite(c: &mut Criterion) {
    decision_on(c, "decision_sqlite", GateFixture::sqlite);
}

fn decision_on(c: &mut Criterion, name: &str, fixture: fn() -> GateFixture) {
    let mut group = c.benchmark_group(name);
    let new_fixture = fixture;

    // A session ticket earned once, by a TOTP decision at setup; then every iteration decides a
    // SESSION Prefix with a nonce of its own, prepared outside the measured time.
    let fixture = new_fixture();
    let mut ticket = fixture.earn_ticket();
    group.bench_function("accept_session", |b| {
        b.iter_custom(|iters| {
            // Keep the store below its capacity: the measured decisions insert `iters` nonces.
            // When the clock moves for that, a new ticket keeps long runs within its lifetime.
            let limit = fixture.gate.config().nonce_capacity / 2;
            if fixture.purge_nonces_above(limit.saturating_sub(iters as usize)) {
                ticket = fixture.earn_ticket();
            }
            let now = fixture.clock.now_ms();
            let frames: Vec<Vec<u8>> = (0..iters)
                .map(|_| fixture.frame(Factor::Session(ticket.clone()), now))
                .collect();
            let mut refused = None;
            let start = Instant::now();
            for frame in &frames {
                let decision = fixture.decide(black_box(frame));
                if let Err(refusal) = &decision.outcome {
                    refused.get_or_insert(refusal.cause.clone());
                }
                drop(black_box(decision));
            }
            let elapsed = start.elapsed();
            if let Some(cause) = refused {
                panic!("a session decision was refused: {cause}");
            }
            elapsed
        })
    });

    // Every iteration is a later time step: the clock is set to the middle of that step
    // (inside the measured loop, one atomic store), the client's TIME moves with it and its
    // code is the one for that step, generated outside the measured time. So each accept is a
    // fresh (user, step): the replay rule never refuses it, and it issues a session ticket as a
    // real TOTP accept does.
    //
    // A step whose code equals the previous step's code is skipped: a code is good once, and
    // that one was just used (about once in a million steps for 6 digits).
    let fixture = new_fixture();
    let period_ms = fixture.totp.period() * 1000;
    let mut step = fixture.clock.now_ms() / period_ms;
    let mut previous_code = fixture.totp.generate(step * period_ms / 1000);
    group.bench_function("accept_totp", |b| {
        b.iter_custom(|iters| {
            let mut frames = Vec::with_capacity(iters as usize);
            while (frames.len() as u64) < iters {
                step += 1;
                let now = step * period_ms + period_ms / 2;
                let code = fixture.totp.generate(now / 1000);
                if code != previous_code {
                    frames.push((now, fixture.frame(Factor::Totp(code.clone()), now)));
                }
                previous_code = code;
            }
            let mut refused = None;
            let start = Instant::now();
            for (now, frame) in &frames {
                fixture.clock.set_ms(*now);
                let decision = fixture.decide(black_box(frame));
                if let Err(refusal) = &decision.outcome {
                    refused.get_or_insert(refusal.cause.clone());
                }
                drop(black_box(decision));
            }
            let elapsed = start.elapsed();
            if let Some(cause) = refused {
                panic!("a TOTP decision was refused: {cause}");
            }
            // The clock moved far ahead: drop the expired nonces outside the measured time.
            fixture.gate.purge_expired();
            elapsed
        })
    });
    // One check that the fixture itself is sound: the last code, sent again, is refused.
    let (now, frame) = (
        fixture.clock.now_ms(),
        fixture.totp_frame(fixture.clock.now_ms()),
    );
    assert_eq!(now / period_ms, step);
    assert!(!fixture.decide(&frame).is_accepted());
    group.finish();
}

/// Nonces of the store's base population are inserted at `now = RETENTION` and expire at
/// `2 * RETENTION`; the measured batches insert at `now = 1, 2, ...` and expire at
/// `batch + RETENTION`. Purging at `RETENTION + batch` therefore drops every measured entry and
/// keeps the base, so the store always holds at least [`BASE_ENTRIES`] live nonces.
const RETENTION: u64 = 1 << 40;
/// Live nonces in the store while inserts are measured: the default capacity of a server, the
/// size a store reaches under load.
const BASE_ENTRIES: u64 = 1_000_000;
/// The store is purged back to its base outside the measured time beyond this many entries.
const PURGE_ABOVE: u64 = 2_000_000;

struct NonceFixture {
    store: NonceStore,
    batch: u64,
}

impl NonceFixture {
    fn new() -> Self {
        let store = NonceStore::new(8_000_000, RETENTION);
        for nonce in nonces(BASE_ENTRIES) {
            store.insert(nonce, RETENTION).unwrap();
        }
        Self { store, batch: 0 }
    }

    /// The `now` for the next batch of `inserts` measured inserts, after purging the previous
    /// batches if they would grow the store too far.
    fn next_batch(&mut self, inserts: u64) -> u64 {
        if self.store.len() as u64 + inserts > PURGE_ABOVE {
            self.store.purge_expired(RETENTION + self.batch);
            assert_eq!(self.store.len() as u64, BASE_ENTRIES);
        }
        self.batch += 1;
        self.batch
    }
}

fn nonce(c: &mut Criterion) {
    let mut group = c.benchmark_group("nonce");

    // The stores are filled when their bench runs (not when a filter skips it), one at a time.
    let mut fixture = None;
    group.throughput(Throughput::Elements(1));
    group.bench_function("insert_1thread", |b| {
        let fixture = fixture.get_or_insert_with(NonceFixture::new);
        b.iter_custom(|iters| {
            let now = fixture.next_batch(iters);
            let batch = nonces(iters);
            let mut inserted = 0u64;
            let start = Instant::now();
            for nonce in &batch {
                inserted += u64::from(fixture.store.insert(black_box(*nonce), now).is_ok());
            }
            let elapsed = start.elapsed();
            assert_eq!(inserted, iters);
            elapsed
        })
    });

    // One iteration: each of two threads inserts one fresh nonce into the same store at the
    // same time. The time is per insert as one thread sees it under contention; the throughput
    // (2 elements per iteration) is the two threads' total.
    drop(fixture);
    let mut fixture = None;
    group.throughput(Throughput::Elements(2));
    group.bench_function("insert_2threads_contending", |b| {
        let fixture = fixture.get_or_insert_with(NonceFixture::new);
        b.iter_custom(|iters| {
            let now = fixture.next_batch(2 * iters);
            let batches = [nonces(iters), nonces(iters)];
            let barrier = Barrier::new(2);
            let store = &fixture.store;
            let spans: Vec<(Instant, Instant, u64)> = std::thread::scope(|s| {
                let handles: Vec<_> = batches
                    .iter()
                    .map(|batch| {
                        let barrier = &barrier;
                        s.spawn(move || {
                            barrier.wait();
                            let mut inserted = 0u64;
                            let start = Instant::now();
                            for nonce in batch {
                                inserted += u64::from(store.insert(black_box(*nonce), now).is_ok());
                            }
                            (start, Instant::now(), inserted)
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let first_start = spans.iter().map(|s| s.0).min().unwrap();
            let last_end = spans.iter().map(|s| s.1).max().unwrap();
            assert_eq!(spans.iter().map(|s| s.2).sum::<u64>(), 2 * iters);
            last_end.duration_since(first_start)
        })
    });
    group.finish();
}

fn totp(c: &mut Criterion) {
    let totp =
        TotpConfig::new(b"12345678901234567890".to_vec(), 6, TotpAlgorithm::Sha1, 30).unwrap();
    let now_s = START_MS / 1000;
    let code = totp.generate(now_s);
    let step = totp.step_at(now_s);
    assert_eq!(totp.matching_step(&code, now_s), Some(step));

    let mut group = c.benchmark_group("totp");
    group.bench_function("check", |b| {
        b.iter(|| totp.matching_step(black_box(&code), black_box(now_s)))
    });
    group.finish();
}

fn ticket(c: &mut Criterion) {
    let rng = SystemRandom::new();
    let key = TicketKey::generate(&rng).unwrap();
    let claims = SessionClaims {
        id: SessionId([7; 16]),
        user: "alice".into(),
        fingerprint: DeviceFingerprint::from_bytes([0x42; 32]),
        totp_time_ms: START_MS,
        expires_ms: START_MS + 3_600_000,
    };
    let sealed = key.seal(&claims, &rng).unwrap();
    assert_eq!(key.open(&sealed).as_ref(), Some(&claims));

    let mut group = c.benchmark_group("ticket");
    group.bench_function("seal", |b| b.iter(|| key.seal(black_box(&claims), &rng)));
    group.bench_function("open", |b| b.iter(|| key.open(black_box(&sealed))));
    group.finish();
}

fn tls(c: &mut Criterion) {
    let ca = portcullis::tls::devpki::DevCa::generate("Portcullis bench CA").unwrap();
    let der = ca.issue_device("laptop").unwrap().cert_der();
    let fingerprint = portcullis::tls::fingerprint(&der).unwrap();
    assert!(fingerprint.to_string().starts_with("sha256:"));

    let mut group = c.benchmark_group("tls");
    group.bench_function("fingerprint", |b| {
        b.iter(|| portcullis::tls::fingerprint(black_box(der.as_ref())))
    });
    group.finish();
}

/// Every bench runs a short warm-up so that a full run stays reasonable on a small machine;
/// the command line (`--warm-up-time`, `--measurement-time`, ...) overrides these.
fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(5))
}

criterion_group! {
    name = benches;
    config = config();
    targets = codec, decision, decision_sqlite, nonce, totp, ticket, tls
}
criterion_main!(benches);
