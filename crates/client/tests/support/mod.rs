//! Helpers of the client's integration tests on top of the test PCS1 server of `common`
//! (which the crate's unit tests share, so it cannot name the client crate): a client of the
//! test user, counting code sources and health checks through a Portcullis channel.
//!
//! A test crate that uses it declares `mod common;` too.

#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use portcullis_client::{Client, ClientBuilder, CodeSource, PortcullisChannel};
use portcullis_core::codec::Factor;
use rustls::ClientConfig;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::common::{Pki, TestServer};

/// A new PKI and a test server on it.
pub async fn start() -> (Pki, TestServer) {
    let pki = Pki::new();
    let server = TestServer::start(&pki).await;
    (pki, server)
}

/// A client builder for user alice with the TLS config `tls` and the code source `codes`, for
/// a test that sets more (a clock, a timeout).
pub fn client_builder(tls: Arc<ClientConfig>, codes: CodeSource) -> ClientBuilder {
    Client::builder()
        .tls_config(tls)
        .server_name("localhost")
        .user("alice")
        .code_source(codes)
}

/// A client of user alice with the PKI's device certificate.
pub fn client(pki: &Pki, codes: CodeSource) -> Client {
    client_builder(pki.client_config(), codes).build().unwrap()
}

/// A code source that hands out distinct valid codes (100001, 100002, ...) and counts how
/// often it was asked.
pub fn counting_codes() -> (CodeSource, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let source = CodeSource::callback(move || {
        let n = c.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(format!("{:06}", 100_000 + n))
    });
    (source, calls)
}

/// A client of user alice with the PKI's device certificate and a [`counting_codes`] source;
/// also returns how often that source was asked.
pub fn counting_client(pki: &Pki) -> (Client, Arc<AtomicUsize>) {
    let (codes, calls) = counting_codes();
    (client(pki, codes), calls)
}

/// One health check of `service` over `channel` (`""`: the whole server).
pub async fn check_service(
    channel: &PortcullisChannel,
    service: &str,
) -> Result<ServingStatus, tonic::Status> {
    let reply = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await?;
    Ok(reply.into_inner().status())
}

/// One health check of the whole server over `channel`.
pub async fn check(channel: &PortcullisChannel) -> Result<ServingStatus, tonic::Status> {
    check_service(channel, "").await
}

/// The code a Prefix's factor carries; `None` for a session ticket (or any other factor).
pub fn totp(factor: &Factor) -> Option<&str> {
    match factor {
        Factor::Totp(code) => Some(code),
        _ => None,
    }
}
