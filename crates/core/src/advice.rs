//! Each reject code's cause and fix, written once: the client adds the fix to a REASON that
//! lacks it (and shows the cause when there is no REASON), and `portcullis doctor` gives the
//! same fix where it has nothing more precise to say.

use crate::RejectCode;

/// What a reject code means and what to do about it: the cause when the server gave no
/// REASON, and the fix, which a client adds to a REASON that lacks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Advice {
    /// The cause, in a few words.
    pub cause: &'static str,
    /// What to do.
    pub fix: &'static str,
    /// A REASON containing one of these phrases already states the fix (the phrases are
    /// fixes, not single words, so that a REASON merely naming the subject does not count).
    pub markers: &'static [&'static str],
    /// Whether the fix is to wait the Verdict's RETRY_AFTER.
    pub retry: bool,
}

impl Advice {
    /// Whether `reason` (a Verdict's REASON) already states this fix.
    pub fn stated_in(&self, reason: &str) -> bool {
        self.markers.iter().any(|m| reason.contains(m))
    }
}

/// The advice for each reject code.
///
/// ```
/// use portcullis_core::{RejectCode, advice::advice};
/// let a = advice(RejectCode::ClockSkew);
/// assert!(a.fix.contains("NTP"));
/// assert!(a.stated_in("clock skew: you are 94 s ahead; sync with NTP"));
/// ```
pub const fn advice(code: RejectCode) -> Advice {
    const fn a(cause: &'static str, fix: &'static str, markers: &'static [&'static str]) -> Advice {
        Advice {
            cause,
            fix,
            markers,
            retry: false,
        }
    }
    const fn retry(mut advice: Advice) -> Advice {
        advice.retry = true;
        advice
    }
    match code {
        RejectCode::Malformed => a(
            "the server could not decode the Prefix",
            "use a client that speaks PCS1 version 1 (update portcullis)",
            &["update portcullis"],
        ),
        RejectCode::Unsupported => a(
            "the server does not support this PCS version",
            "use a client and a server of the same PCS version (update portcullis)",
            &["update portcullis"],
        ),
        RejectCode::DeviceUnknown => a(
            "this device certificate is bound to no user",
            "bind the device to the user with `portcullis device bind`",
            &["device bind"],
        ),
        RejectCode::DeviceRevoked => a(
            "the binding of this device was revoked",
            "ask an administrator to bind this device again, or use another bound device",
            &["ask an administrator"],
        ),
        RejectCode::UserMismatch => a(
            "this device is bound to another user",
            "connect as the user the device is bound to, or bind the device to this user",
            &["use the user", "connect as the user"],
        ),
        RejectCode::MfaFailed => a(
            "the one-time code was wrong, already used, or the user has no factor",
            "enter the current code of this user's authenticator (a code is accepted once; \
             wait for the next one); if every code fails, check the authenticator's clock",
            &["current code", "wait for the next one"],
        ),
        RejectCode::MfaRequired => a(
            "the session is expired, revoked or not valid for this device",
            "connect with a one-time code (portcullis login) to start a new session",
            &[
                "connect with a one-time code",
                "send a one-time code",
                "run portcullis login",
                "use a Portcullis client",
            ],
        ),
        RejectCode::ClockSkew => a(
            "this machine's clock differs from the server's by more than the allowed skew",
            "sync this machine's clock (NTP, e.g. `timedatectl set-ntp true`)",
            &["NTP"],
        ),
        RejectCode::Replay => a(
            "the server saw this connection's NONCE before",
            "do not replay connections; if this client did not, report a bug in its random source",
            &["random source"],
        ),
        RejectCode::BindingMismatch => a(
            "the TLS connection the server sees is not the client's: something between them \
             terminates TLS (a TLS-terminating proxy or load balancer)",
            "connect to the Portcullis server directly, or let the proxy pass TLS through \
             (TCP mode, TLS passthrough) instead of terminating it",
            &[
                "connect directly",
                "pass TLS through",
                "pass TCP through",
                "passthrough",
            ],
        ),
        RejectCode::LockedOut => retry(a(
            "too many failed codes for this user",
            "wait for the lockout to end, then enter a correct code",
            &["wait for the lockout"],
        )),
        RejectCode::RateLimited => retry(a(
            "too many connection attempts from this address",
            "connect less often (reuse the channel)",
            &["less often"],
        )),
        RejectCode::Overloaded => retry(a(
            "the server is at its limit of connections being authenticated",
            "retry shortly",
            &["retry shortly"],
        )),
        RejectCode::Timeout => a(
            "the Prefix did not reach the server within its deadline",
            "check the network between client and server (slow link, stalled proxy)",
            &["check the network"],
        ),
        RejectCode::PolicyDenied => a(
            "the server's policy refuses this user or device",
            "ask an administrator about the policy",
            &["ask an administrator"],
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_a_cause_a_fix_and_a_marker_the_fix_states() {
        for code in RejectCode::ALL {
            let a = advice(code);
            assert!(!a.cause.is_empty() && !a.fix.is_empty(), "{code}");
            assert!(a.stated_in(a.fix), "{code}");
        }
    }
}
