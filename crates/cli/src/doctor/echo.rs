//! The steps after the Verdict: one Echo call over the same stream, and a standard client's
//! live session.

use super::*;

/// How one Echo call over a stream went.
pub(super) enum EchoOutcome {
    Reply(SayReply),
    /// The server answered with a gRPC status.
    Status(tonic::Status),
    /// HTTP/2 did not start, or no answer came in time.
    Failed(String),
}

/// HTTP/2 over `tls` (from its first byte) and one Echo call on it.
pub(super) async fn call_echo(tls: TlsStream<TcpStream>) -> EchoOutcome {
    let slot = Arc::new(Mutex::new(Some(tls)));
    let connector = tower::service_fn(move |_uri: tonic::transport::Uri| {
        let stream = slot.lock().ok().and_then(|mut s| s.take());
        async move {
            stream.map(hyper_util::rt::TokioIo::new).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotConnected,
                    "the accepted connection was already used",
                )
            })
        }
    });
    let endpoint = match tonic::transport::Endpoint::from_shared("http://portcullis.doctor") {
        Ok(e) => e,
        Err(e) => return EchoOutcome::Failed(format!("endpoint: {e}")),
    };
    let result = tokio::time::timeout(STEP_TIMEOUT, async {
        let channel = match endpoint.connect_with_connector(connector).await {
            Ok(c) => c,
            Err(e) => return EchoOutcome::Failed(format!("HTTP/2 did not start: {e}")),
        };
        match EchoClient::new(channel)
            .say(SayRequest {
                text: "doctor".into(),
            })
            .await
        {
            Ok(r) => EchoOutcome::Reply(r.into_inner()),
            Err(s) => EchoOutcome::Status(s),
        }
    })
    .await;
    result.unwrap_or_else(|_| EchoOutcome::Failed(format!("no Echo reply within {STEP_TIMEOUT:?}")))
}

/// One Echo call over the accepted connection: HTTP/2 from the first byte after the Verdict.
pub(super) async fn echo(tls: TlsStream<TcpStream>, report: &mut Report) {
    match call_echo(tls).await {
        EchoOutcome::Reply(reply) => report.pass(
            "echo",
            format!(
                "Echo answered `{}` (user {}, device {}, via {})",
                reply.text, reply.user, reply.device, reply.auth_method
            ),
        ),
        EchoOutcome::Status(s) => report.fail(
            "echo",
            crate::connect::describe_status("Echo", &s),
            "the gate let the connection in but the service failed: check the server's log",
        ),
        EchoOutcome::Failed(e) => report.fail("echo", e, "check the server's log"),
    }
}

/// `--standard`: one Echo call over h2 without a Prefix; the server lets it in only while the
/// device has a live session, and otherwise answers UNAUTHENTICATED naming the cause.
pub(super) async fn live_session(
    env: &Env,
    tls: TlsStream<TcpStream>,
    expected: Option<Vec<String>>,
    report: &mut Report,
) {
    let fingerprint = env.ours.fingerprint.to_string();
    let known = format!("fingerprint {fingerprint}: known to the server");
    let status = match call_echo(tls).await {
        EchoOutcome::Reply(reply) => {
            report.pass("client_certificate", client_accepted(env));
            report.pass("device", format!("{known} and bound to {}", reply.user));
            report.pass(
                "live_session",
                format!(
                    "Echo answered over h2 via {} (user {}, device {})",
                    reply.auth_method, reply.user, reply.device
                ),
            );
            return;
        }
        EchoOutcome::Failed(e) => {
            let expected = expected.unwrap_or_default();
            let issuer = if !expected.is_empty() && !chain_named(env, &expected) {
                format!(
                    "; the server accepts client certificates issued by {}, ours is issued by {}",
                    expected.join(" or "),
                    env.ours.issuer
                )
            } else {
                String::new()
            };
            report.fail(
                "client_certificate",
                format!(
                    "{e}; the server may have refused our certificate ({}){issuer}",
                    env.ours.subject
                ),
                "check that the server trusts the CA that issued this device and that the \
                 certificate is valid with clientAuth (`portcullis device issue`)",
            );
            return;
        }
        EchoOutcome::Status(s) => s,
    };
    let message = status.message().replace('\n', " ");
    let reject = message
        .split(':')
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    if status.code() != tonic::Code::Unauthenticated {
        if matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown
        ) && status.metadata().get("portcullis-reject").is_none()
        {
            report.fail(
                "client_certificate",
                crate::connect::describe_status("Echo", &status),
                "check that the server trusts the CA that issued this device and that the \
                 certificate is valid with clientAuth (`portcullis device issue`)",
            );
            return;
        }
        report.pass("client_certificate", client_accepted(env));
        report.pass("device", known);
        report.fail(
            "live_session",
            crate::connect::describe_status("Echo", &status),
            "the gate let the connection in but the service failed: check the server's log",
        );
        return;
    }
    report.pass("client_certificate", client_accepted(env));
    match reject.as_str() {
        "device_unknown" | "device_revoked" => {
            let fix = if reject == "device_unknown" {
                format!(
                    "bind this device on the server: `portcullis device bind --user {}` (or \
                     `device issue` there)",
                    env.user
                )
            } else {
                "the device was revoked: issue and bind a new device certificate".to_owned()
            };
            report.fail(
                "device",
                format!("fingerprint {fingerprint}: {message}"),
                fix,
            );
        }
        "mfa_required" => {
            report.pass("device", known);
            report.fail(
                "live_session",
                message,
                "run portcullis login from this device",
            );
        }
        _ => {
            report.pass("device", known);
            report.fail(
                "live_session",
                crate::connect::describe_status("Echo", &status),
                "see the message; the row of docs/TROUBLESHOOTING.md for its reject names the fix",
            );
        }
    }
}

/// What the client certificate step says once the server answered over the connection.
pub(super) fn client_accepted(env: &Env) -> String {
    format!(
        "accepted ({}, valid until {})",
        env.ours.subject,
        format_unix_s(env.ours.not_after_unix)
    )
}

/// A certificate time (Unix seconds) as RFC 3339; times before 1970 as the epoch.
pub(super) fn format_unix_s(secs: i64) -> String {
    crate::text::format_time(u64::try_from(secs).unwrap_or(0).saturating_mul(1000))
}
