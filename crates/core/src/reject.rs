//! Reject codes (PROTOCOL.md section 4) and the gRPC status each maps to.

use std::fmt;

/// Why a server refused a connection: the STATUS byte of a rejecting Verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
#[non_exhaustive]
pub enum RejectCode {
    /// The Prefix breaks section 2 or 3.
    Malformed = 1,
    /// Another PCS version, or the wrong kind.
    Unsupported = 2,
    /// The certificate's fingerprint is bound to no user.
    DeviceUnknown = 3,
    /// The device binding was revoked.
    DeviceRevoked = 4,
    /// The device is bound to another user than USER.
    UserMismatch = 5,
    /// The code is wrong, already used, or the user has no factor.
    MfaFailed = 6,
    /// SESSION given but expired, revoked or not valid for this device.
    MfaRequired = 7,
    /// TIME differs from the server clock by more than the allowed skew.
    ClockSkew = 8,
    /// This NONCE was already seen.
    Replay = 9,
    /// BINDING is not this connection's exporter.
    BindingMismatch = 10,
    /// Too many failed codes for this user.
    LockedOut = 11,
    /// Too many attempts from this source.
    RateLimited = 12,
    /// The server is at its limit of connections being authenticated.
    Overloaded = 13,
    /// The Prefix did not arrive within the deadline.
    Timeout = 14,
    /// Authenticated, but policy refuses this user or device.
    PolicyDenied = 15,
}

impl RejectCode {
    /// Every code, in numeric order.
    pub const ALL: [RejectCode; 15] = [
        Self::Malformed,
        Self::Unsupported,
        Self::DeviceUnknown,
        Self::DeviceRevoked,
        Self::UserMismatch,
        Self::MfaFailed,
        Self::MfaRequired,
        Self::ClockSkew,
        Self::Replay,
        Self::BindingMismatch,
        Self::LockedOut,
        Self::RateLimited,
        Self::Overloaded,
        Self::Timeout,
        Self::PolicyDenied,
    ];

    /// The code from its STATUS byte (0 is "accepted", not a reject code).
    pub fn from_u8(value: u8) -> Option<Self> {
        Self::ALL.get(usize::from(value).checked_sub(1)?).copied()
    }

    /// The STATUS byte.
    pub const fn as_u8(self) -> u8 {
        self as u8
    }

    /// The name in lower case, as REASON starts with it: `mfa_failed`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Unsupported => "unsupported",
            Self::DeviceUnknown => "device_unknown",
            Self::DeviceRevoked => "device_revoked",
            Self::UserMismatch => "user_mismatch",
            Self::MfaFailed => "mfa_failed",
            Self::MfaRequired => "mfa_required",
            Self::ClockSkew => "clock_skew",
            Self::Replay => "replay",
            Self::BindingMismatch => "binding_mismatch",
            Self::LockedOut => "locked_out",
            Self::RateLimited => "rate_limited",
            Self::Overloaded => "overloaded",
            Self::Timeout => "timeout",
            Self::PolicyDenied => "policy_denied",
        }
    }

    /// The code from its lower-case name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The numeric gRPC status a client library reports for this code: UNAUTHENTICATED (16),
    /// except RATE_LIMITED (RESOURCE_EXHAUSTED, 8), OVERLOADED (UNAVAILABLE, 14) and
    /// POLICY_DENIED (PERMISSION_DENIED, 7).
    pub const fn grpc_code(self) -> i32 {
        match self {
            Self::RateLimited => 8,
            Self::Overloaded => 14,
            Self::PolicyDenied => 7,
            _ => 16,
        }
    }

    /// Whether a Verdict with this code carries RETRY_AFTER.
    pub const fn has_retry_after(self) -> bool {
        matches!(self, Self::LockedOut | Self::RateLimited | Self::Overloaded)
    }
}

impl fmt::Display for RejectCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for (i, code) in RejectCode::ALL.into_iter().enumerate() {
            assert_eq!(code.as_u8() as usize, i + 1);
            assert_eq!(RejectCode::from_u8(code.as_u8()), Some(code));
            assert_eq!(RejectCode::from_name(code.name()), Some(code));
        }
        assert_eq!(RejectCode::from_u8(0), None);
        assert_eq!(RejectCode::from_u8(16), None);
    }
}
