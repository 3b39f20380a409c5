//! Admission under a distributed slow flood, over real loopback TCP and TLS: 32 source
//! addresses (127.0.0.2 to 127.0.0.33), each within the per-source rate limit, open TCP
//! connections to a server on 127.0.0.1 and send nothing. A valid client from 127.0.0.1 must
//! still be let in every time: the first TLS bytes have a deadline of their own, one source may
//! hold only so many connections being authenticated, and a full server sheds the oldest
//! connection that has not finished TLS rather than refusing the newcomer.
//!
//! Bounded: about 4,000 connections over 8 s. The accept times and the process's RSS are
//! printed (`--nocapture`), not asserted.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use portcullis::core::codec::{ALPN_PCS1, Factor};
use tokio::net::{TcpSocket, TcpStream};

const SOURCES: u8 = 32;
/// Each source's pace: under the default limit of 20 a second.
const PER_SOURCE_PER_SEC: u64 = 18;
const VALID_ATTEMPTS: usize = 30;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

async fn idle_from(source: u8, server: SocketAddr) -> Option<TcpStream> {
    let socket = TcpSocket::new_v4().ok()?;
    socket
        .bind(SocketAddr::from(([127, 0, 0, source], 0)))
        .ok()?;
    tokio::time::timeout(Duration::from_secs(2), socket.connect(server))
        .await
        .ok()?
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_client_gets_in_through_a_slow_flood_from_32_sources() {
    let (server, portcullis) = start_configured(|b| b).await;
    let users: Vec<_> = (0..VALID_ATTEMPTS)
        .map(|i| server.enroll(&format!("user{i}"), &format!("device{i}")))
        .collect();
    let rss_before = rss_kib();

    // The flood: every source opens a connection every 1/18 s and holds it, sending nothing.
    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicUsize::new(0));
    let mut flooders = Vec::new();
    for source in 2..2 + SOURCES {
        let (stop, opened, addr) = (stop.clone(), opened.clone(), server.addr);
        flooders.push(tokio::spawn(async move {
            let mut held = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / PER_SOURCE_PER_SEC));
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                if let Some(tcp) = idle_from(source, addr).await {
                    opened.fetch_add(1, Ordering::Relaxed);
                    held.push(tcp);
                }
            }
            held.len()
        }));
    }
    // Let the flood fill the server first.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pending_at_start = portcullis.pending();

    let mut accepted = 0;
    let mut times = Vec::new();
    for enrolled in &users {
        let start = Instant::now();
        let verdict = async {
            let config = server.tls_config(&enrolled.device, &[ALPN_PCS1]);
            let mut tls = tls_with(server.addr, config).await.ok()?;
            let p = prefix(
                &tls,
                &enrolled.user,
                Factor::Totp(current_code(&enrolled.totp)),
            );
            tokio::io::AsyncWriteExt::write_all(&mut tls, &p.encode().ok()?)
                .await
                .ok()?;
            try_read_verdict(&mut tls).await
        };
        let verdict = tokio::time::timeout(Duration::from_secs(12), verdict)
            .await
            .ok()
            .flatten();
        times.push(start.elapsed());
        if verdict.is_some_and(|v| v.status == 0) {
            accepted += 1;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut held = 0;
    for flooder in flooders {
        held += flooder.await.unwrap();
    }
    let rss_after = rss_kib();
    times.sort();
    let p99 = times[(times.len() * 99 / 100).min(times.len() - 1)];
    println!(
        "flood: {} connections opened by {SOURCES} sources ({held} held at the end); pending {pending_at_start} when the valid client started; valid client accepted {accepted}/{VALID_ATTEMPTS}, accept median {:?}, p99 {p99:?}; RSS of the test process {rss_before} KiB -> {rss_after} KiB",
        opened.load(Ordering::Relaxed),
        times[times.len() / 2],
    );
    assert_eq!(
        accepted, VALID_ATTEMPTS,
        "every valid attempt gets in through the flood"
    );
    server.stop().await;
}
