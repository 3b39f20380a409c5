//! The handshake scenarios of `portcullis bench handshake` as criterion benches: a new TCP
//! connection, the handshake and the first unary call, per scenario.
//!
//! `cargo bench --bench handshake`. The CLI's round-robin run is the one to compare scenarios
//! with (it interleaves them so that machine drift hits all alike); this one gives criterion's
//! statistics per scenario.

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use portcullis_bench::{Fixture, Scenario};

/// Distinct TOTP users: each code is good once per user and 30 s step, and criterion decides
/// the iteration count itself (about 4,000 at most with the times below).
const TOTP_USERS: usize = 8_000;

fn handshake(c: &mut Criterion) {
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("pc-bench-server")
        .enable_all()
        .build()
        .expect("server runtime");
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("client runtime");
    let fixture = Fixture::start(&server_rt, TOTP_USERS, None).expect("bench fixture");
    client_rt
        .block_on(fixture.warm_up())
        .expect("warm-up connections");

    let mut group = c.benchmark_group("handshake");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for scenario in Scenario::ALL {
        group.bench_function(scenario.name(), |b| {
            b.iter_custom(|iters| {
                client_rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += fixture
                            .connect_and_call(scenario)
                            .await
                            .expect("connection setup");
                    }
                    total
                })
            })
        });
    }
    group.finish();
    drop(fixture);
    client_rt.shutdown_timeout(Duration::from_secs(2));
    server_rt.shutdown_timeout(Duration::from_secs(2));
}

criterion_group!(benches, handshake);
criterion_main!(benches);
