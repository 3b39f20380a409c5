//! # portcullis-core
//!
//! The sans-IO heart of Portcullis: everything the gate decides, with no sockets, no async
//! runtime, and no hidden clock or randomness (a [`Clock`] and a [`Random`] source are passed
//! in), so that every rule runs with a fixed clock in microseconds.
//!
//! - [`codec`]: the PCS1 frames (Prefix and Verdict), strict in what they accept;
//! - [`Gate`]: the ordered decision of PROTOCOL.md section 5 (binding, clock skew, device
//!   binding, lockout, nonce, factor), in four phases: plan, fetch, decide, commit;
//! - [`TotpConfig`]: RFC 6238 codes on top of `totp-rs`, single use per time step through the
//!   conditional [`GateStore::commit`];
//! - [`NonceStore`]: the replay-nonce store (expiring entries, a hard cap, fail closed);
//! - [`TicketKey`]: session tickets sealed with AES-256-GCM;
//! - [`LockoutPolicy`]: 5 failed codes lock a user out, with doubling waits;
//! - [`store`]: what the gate reads and writes ([`GateStore`]: one snapshot, one conditional
//!   commit), the sessions ([`SessionStore`]) and the administration ([`Admin`]), with
//!   [`MemoryRegistry`] implementing all three;
//! - [`RejectCode`]: the stable reasons a client can act on;
//! - [`layout`]: the file names of a directory made by `portcullis init`.
//!
//! The I/O lives elsewhere: `portcullis-tls` (rustls), `portcullis-server` (the acceptor in front
//! of tonic), `portcullis-client` (the tonic connector), `portcullis-store` (SQLite).

pub mod advice;
pub mod codec;
#[cfg(feature = "test-util")]
pub mod conformance;
mod decision;
mod env;
mod fingerprint;
pub mod layout;
mod lockout;
mod memory;
mod nonce;
mod registry;
mod reject;
pub mod store;
mod ticket;
mod totp;

pub use decision::{
    AuthMethod, Cause, ConnectionFacts, ConnectionPolicy, Decision, Gate, GateConfig, Identity,
    Outcome, Plan, Planned, Ref, Rejection, ServerCause,
};
pub use env::{Clock, ManualClock, OffsetClock, Random, RandomError, SystemClock, SystemRandom};
pub use fingerprint::{DeviceFingerprint, FingerprintParseError};
pub use lockout::{LockState, LockoutPolicy};
pub use memory::MemoryRegistry;
pub use nonce::{NonceError, NonceStore};
pub use registry::{
    DeviceRecord, RegistryError, SessionRecord, UserRecord, check_name, check_role,
    is_hidden_format, normalize_roles,
};
pub use reject::RejectCode;
pub use store::{
    Admin, Change, ChangeTail, Committed, Effects, GateStore, MAX_CHANGES_PER_READ, Need, Registry,
    SessionNeed, SessionStore, Snapshot, StoreFuture, UserState,
};
pub use ticket::{SessionClaims, SessionId, TicketError, TicketKey, TicketKeyId, TicketRing};
pub use totp::{TotpAlgorithm, TotpConfig, TotpError};
