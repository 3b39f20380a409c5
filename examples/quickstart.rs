//! Portcullis end to end in one process: a dev PKI in a temporary folder, user `alice` with
//! TOTP, device `laptop`, the demo Echo service behind the gate on an ephemeral port; then an
//! accepted call, a reconnect on the session ticket, and refusals as the client sees them.
//!
//! Run it with `cargo run --example quickstart`.

use std::error::Error;
use std::sync::Arc;

use portcullis::client::{Client, CodeSource};
use portcullis::core::codec::ALPN_PCS1;
use portcullis::core::{
    Admin, Clock, OffsetClock, SystemClock, SystemRandom, TotpAlgorithm, TotpConfig,
};
use portcullis::demo::{self, EchoClient, SayRequest};
use portcullis::server::PortcullisServer;
use portcullis::store::{SecretKey, SqliteRegistry};
use portcullis::tls::devpki::{DevCa, Issued};

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let dir = tempfile::tempdir()?;
    println!(
        "Portcullis quickstart (files in {})\n",
        dir.path().display()
    );

    // 1. A dev PKI and a registry.
    let ca = DevCa::generate("Portcullis quickstart CA")?;
    let server_cert = ca.issue_server(&["localhost".into(), "127.0.0.1".into()])?;
    // TOTP secrets are sealed at rest under a registry key (AES-256-GCM).
    let registry_key = SecretKey::create(&dir.path().join("registry.key"))?;
    let registry = Arc::new(SqliteRegistry::create_with_key(
        &dir.path().join("portcullis.db"),
        registry_key,
    )?);

    // 2. User alice with a TOTP secret, and her device certificate `laptop`.
    let totp = TotpConfig::generate_secret(&SystemRandom::new(), 6, TotpAlgorithm::Sha1, 30)?;
    registry.add_user("alice", totp.clone(), SystemClock.now_ms())?;
    let laptop = ca.issue_device("laptop")?;
    let laptop_fp = portcullis::tls::fingerprint(laptop.cert_der().as_ref())?;
    registry.bind_device("laptop", "alice", &laptop_fp, SystemClock.now_ms())?;
    println!("enrolled user alice (TOTP, 6 digits) and device laptop ({laptop_fp})");

    // 3. The demo Echo service behind the gate, on an ephemeral port.
    let portcullis = PortcullisServer::builder()
        .identity(
            vec![server_cert.cert_der()],
            server_cert.key_der(),
            &[ca.cert_der()],
        )?
        .registry(registry.clone())
        .build()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let incoming = portcullis.incoming(listener);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        portcullis
            .server()
            .add_service(demo::service())
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            }),
    );
    println!("server listening on {addr}\n");

    let client_for = |device: &Issued, source: CodeSource, clock: Option<Arc<dyn Clock>>| {
        let tls = portcullis::tls::client_config(
            &[ca.cert_der()],
            vec![device.cert_der()],
            device.key_der(),
            &[ALPN_PCS1],
        )?;
        let mut builder = Client::builder()
            .tls_config(tls)
            .server_name("localhost")
            .user("alice")
            .code_source(source);
        if let Some(clock) = clock {
            builder = builder.clock(clock);
        }
        Ok::<_, Box<dyn Error>>(builder.build()?)
    };

    // 4. An accepted call: the code comes from alice's secret, as an authenticator app shows it.
    let code = totp.generate(SystemClock.now_ms() / 1000);
    let alice = client_for(&laptop, CodeSource::fixed(code.clone()), None)?;
    call(&alice, &addr, "accepted call with a TOTP code").await;

    // 5. A new connection from the same client: it sends the session ticket, no code.
    call(&alice, &addr, "reconnect on the session ticket").await;

    // 6. Refusals, each as the client sees it.
    let mut wrong = code.clone().into_bytes();
    wrong[0] = if wrong[0] == b'9' { b'0' } else { wrong[0] + 1 };
    let wrong = String::from_utf8(wrong)?;
    let refused = client_for(&laptop, CodeSource::fixed(wrong), None)?;
    call(&refused, &addr, "a wrong code").await;

    let reused = client_for(&laptop, CodeSource::fixed(code), None)?;
    call(&reused, &addr, "the code from step 4 again").await;

    let stray = ca.issue_device("stray")?;
    let unbound = client_for(&stray, CodeSource::secret(totp.clone()), None)?;
    call(
        &unbound,
        &addr,
        "a certificate of the right CA, never bound",
    )
    .await;

    let ahead: Arc<dyn Clock> = Arc::new(OffsetClock::new(SystemClock, 94_000));
    let skewed = client_for(&laptop, CodeSource::secret(totp.clone()), Some(ahead))?;
    call(&skewed, &addr, "a client clock 94 s ahead").await;

    registry.revoke_device("laptop", SystemClock.now_ms())?;
    let revoked = client_for(&laptop, CodeSource::secret(totp), None)?;
    call(&revoked, &addr, "the laptop after `device revoke`").await;

    let _ = stop.send(());
    server.await??;
    println!("\nserver stopped");
    Ok(())
}

/// One Echo call on a new connection; prints the reply or the refusal.
async fn call(client: &Client, addr: &str, what: &str) {
    println!("-> {what}");
    let channel = match client.connect_lazy(addr) {
        Ok(channel) => channel,
        Err(e) => {
            println!("   error: {e}\n");
            return;
        }
    };
    match EchoClient::new(channel)
        .say(SayRequest {
            text: "hello".into(),
        })
        .await
    {
        Ok(reply) => {
            let reply = reply.into_inner();
            println!(
                "   OK  {:?} from user {} on device {} via {}\n",
                reply.text, reply.user, reply.device, reply.auth_method
            );
        }
        Err(status) => {
            let reference = status
                .metadata()
                .get("portcullis-ref")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            println!(
                "   REFUSED  {:?}: {}  (ref {reference})\n",
                status.code(),
                status.message()
            );
        }
    }
}
