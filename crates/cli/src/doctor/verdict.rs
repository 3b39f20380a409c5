//! What the Verdict says about each step, and the fix for a refusal.

use super::*;

/// Fills in the steps the Verdict answers; whether it accepted.
pub(super) fn interpret(
    env: &Env,
    verdict: &Verdict,
    sent_ms: u64,
    received_ms: u64,
    report: &mut Report,
) -> bool {
    let reason = verdict.reason.clone().unwrap_or_default();
    let reference = hex(&verdict.reference);
    let fingerprint = env.ours.fingerprint.to_string();
    // The server's clock against the middle of the round trip.
    let midpoint = sent_ms / 2 + received_ms / 2;
    let diff = i128::from(verdict.server_time_ms) - i128::from(midpoint);
    let clock = if diff >= 0 {
        format!("the server clock is {} ms ahead of ours", diff)
    } else {
        format!("the server clock is {} ms behind ours", -diff)
    };
    let not_reached = "not checked: the server stops at the first failed check";
    let Some(reject) = verdict.reject_code() else {
        if verdict.status != 0 {
            report.fail(
                "device",
                format!(
                    "unknown Verdict status {} ({reason}, ref {reference})",
                    verdict.status
                ),
                "update this client to the server's version",
            );
            return false;
        }
        report.pass(
            "device",
            format!(
                "fingerprint {fingerprint}: known to the server and bound to {}",
                env.user
            ),
        );
        report.pass("clock", format!("{clock}: within the allowed skew"));
        report.pass("channel_binding", "the server saw the same TLS connection");
        if let Some(until) = env.stored_until {
            report.pass(
                "code",
                "no code needed: the session ticket `portcullis login` stored was accepted",
            );
            report.pass(
                "session",
                format!(
                    "the stored session is live, valid until {}",
                    crate::text::format_time(until)
                ),
            );
            return true;
        }
        report.pass("code", "the code was accepted");
        match &verdict.session {
            Some((_, expires)) => report.pass(
                "session",
                format!(
                    "session ticket issued, valid until {}",
                    crate::text::format_time(*expires)
                ),
            ),
            None => report.fail(
                "session",
                "the server accepted the code but issued no session ticket",
                "turn sessions on at the server (sessions are off there), or reconnect with a \
                 code each time",
            ),
        }
        return true;
    };
    let saw = format!("{} ({reason}, ref {reference})", reject.name());
    let binding_ok = "the server saw the same TLS connection";
    match reject {
        RejectCode::BindingMismatch => {
            for step in ["device", "clock", "code"] {
                report.skip(step, not_reached);
            }
            report.fail(
                "channel_binding",
                saw,
                format!(
                    "a TLS-terminating proxy or load balancer sits between client and server: {}",
                    advice(reject).fix
                ),
            );
        }
        RejectCode::ClockSkew => {
            report.pass("channel_binding", binding_ok);
            report.skip("device", not_reached);
            report.skip("code", not_reached);
            report.fail(
                "clock",
                format!("{saw}; {clock}"),
                "set the clock right on the machine that is off (run NTP on both)",
            );
        }
        RejectCode::DeviceUnknown | RejectCode::DeviceRevoked | RejectCode::UserMismatch => {
            report.pass("channel_binding", binding_ok);
            report.pass("clock", format!("{clock}: within the allowed skew"));
            report.skip("code", not_reached);
            let fix = match reject {
                RejectCode::DeviceUnknown => format!(
                    "bind this device on the server: `portcullis device bind --user {}` (or \
                     `device issue` there)",
                    env.user
                ),
                RejectCode::DeviceRevoked => {
                    "the device was revoked: issue and bind a new device certificate".to_owned()
                }
                _ => "use the user this device is bound to (see `portcullis device list`), or \
                      bind a device of your own"
                    .to_owned(),
            };
            report.fail("device", format!("fingerprint {fingerprint}: {saw}"), fix);
        }
        RejectCode::LockedOut
        | RejectCode::Replay
        | RejectCode::MfaFailed
        | RejectCode::MfaRequired => {
            report.pass("channel_binding", binding_ok);
            report.pass("clock", format!("{clock}: within the allowed skew"));
            report.pass(
                "device",
                format!(
                    "fingerprint {fingerprint}: known to the server and bound to {}",
                    env.user
                ),
            );
            let fix = match reject {
                RejectCode::LockedOut => format!(
                    "wait {} s, then try again with a correct code",
                    verdict.retry_after_s.unwrap_or(0)
                ),
                RejectCode::Replay => "run doctor again (the nonce was seen before)".to_owned(),
                RejectCode::MfaFailed if reason.contains("already used") => {
                    "wait for the next code, or run `portcullis login` once and let `call` and \
                     `doctor` use the stored session"
                        .to_owned()
                }
                RejectCode::MfaFailed => "use the current code of the user's authenticator, \
                                          once: a code is accepted one time only"
                    .to_owned(),
                RejectCode::MfaRequired if env.stored_until.is_some() => {
                    "the stored session ended (expired, revoked or refused): run `portcullis \
                     login` again, or give a code with --code or --secret-file"
                        .to_owned()
                }
                _ => "give a code with --code or --secret".to_owned(),
            };
            let saw = match (reject, verdict.retry_after_s) {
                (RejectCode::LockedOut, Some(s)) => format!("{saw}; wait {s} s"),
                (RejectCode::MfaFailed, _) if reason.contains("already used") => format!(
                    "{saw}; the code is right but was already accepted once (it does not count \
                     towards the lockout)"
                ),
                (RejectCode::MfaFailed, _) => format!(
                    "{saw}; the code is wrong (or the user has no TOTP factor: the audit record \
                     of ref {reference} says code_wrong or no_factor)"
                ),
                _ => saw,
            };
            report.fail("code", saw, fix);
        }
        RejectCode::PolicyDenied => {
            report.pass("channel_binding", binding_ok);
            report.pass("clock", format!("{clock}: within the allowed skew"));
            report.pass("device", format!("fingerprint {fingerprint}: known"));
            report.pass("code", "the code was accepted");
            report.skip("session", not_reached);
            report.fail(
                "echo",
                saw,
                format!("{}: {}", advice(reject).cause, advice(reject).fix),
            );
        }
        _ => {
            let fix = match reject {
                RejectCode::Overloaded | RejectCode::RateLimited => {
                    format!(
                        "the server is busy: try again in {} s",
                        verdict.retry_after_s.unwrap_or(1)
                    )
                }
                other => advice(other).fix.to_owned(),
            };
            report.fail("device", format!("the server answered {saw}"), fix);
        }
    }
    false
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
