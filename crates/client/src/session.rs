//! The session-ticket cache and what a caller may see of tickets and Verdicts.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use portcullis_core::RejectCode;
use portcullis_core::codec::Verdict;
use zeroize::Zeroizing;

/// What the client knows about its session ticket; never the ticket itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// The address (`host:port`) of the server that issued the ticket.
    pub server: String,
    /// The TLS server name the issuing server's certificate was verified against.
    pub server_name: String,
    /// When the ticket stops working, Unix milliseconds (server clock).
    pub expires_ms: u64,
}

/// The last Verdict the client received, accepting or rejecting; never the ticket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerdictInfo {
    /// The STATUS byte: 0 accepted, else a reject code.
    pub status: u8,
    /// The reject code, when rejected with a code this version knows.
    pub reject: Option<RejectCode>,
    /// The REASON: the reject name, `: `, a hint for a person.
    pub reason: Option<String>,
    /// The server clock, Unix milliseconds.
    pub server_time_ms: u64,
    /// The REF in lower-case hex: quote it to find the server's audit record.
    pub reference: String,
    /// How long the server asks the client to wait before retrying.
    pub retry_after: Option<Duration>,
}

impl VerdictInfo {
    /// Whether the Verdict accepted the connection.
    pub fn is_accepted(&self) -> bool {
        self.status == 0
    }

    pub(crate) fn of(verdict: &Verdict) -> Self {
        Self {
            status: verdict.status,
            reject: verdict.reject_code(),
            reason: verdict.reason.clone(),
            server_time_ms: verdict.server_time_ms,
            reference: hex::encode(verdict.reference),
            retry_after: verdict
                .retry_after_s
                .map(|s| Duration::from_secs(u64::from(s))),
        }
    }
}

struct CachedTicket {
    /// The verified TLS server name of the issuing connection.
    server_name: String,
    /// The address of the issuing connection.
    server: String,
    ticket: Zeroizing<Vec<u8>>,
    expires_ms: u64,
}

/// One session ticket per client, for the server that issued it. Replaced tickets are wiped.
///
/// A ticket is keyed by the TLS server name the issuing server's certificate was verified
/// against and the address it was reached at: it is only ever sent over a connection to the
/// same address whose certificate was verified for the same name.
#[derive(Default)]
pub(crate) struct TicketCache(Mutex<Option<CachedTicket>>);

impl TicketCache {
    fn slot(&self) -> MutexGuard<'_, Option<CachedTicket>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Keeps a new ticket from the server at `server` verified as `server_name`; the old one
    /// is wiped.
    pub(crate) fn store(&self, server_name: &str, server: &str, ticket: Vec<u8>, expires_ms: u64) {
        *self.slot() = Some(CachedTicket {
            server_name: server_name.to_owned(),
            server: server.to_owned(),
            ticket: Zeroizing::new(ticket),
            expires_ms,
        });
    }

    /// A copy of the ticket issued by the server at `server` verified as `server_name`, if it
    /// has not expired at `now_ms`. An expired ticket is wiped.
    pub(crate) fn valid_for(
        &self,
        server_name: &str,
        server: &str,
        now_ms: u64,
    ) -> Option<Zeroizing<Vec<u8>>> {
        let mut slot = self.slot();
        match slot.as_ref() {
            Some(t) if t.expires_ms <= now_ms => {
                *slot = None;
                None
            }
            Some(t) if t.server_name == server_name && t.server == server => Some(t.ticket.clone()),
            _ => None,
        }
    }

    /// Drops the cached ticket if it is `ticket` (a newer one stays).
    pub(crate) fn discard(&self, ticket: &[u8]) {
        let mut slot = self.slot();
        if slot.as_ref().is_some_and(|t| t.ticket.as_slice() == ticket) {
            *slot = None;
        }
    }

    /// Drops the cached ticket.
    pub(crate) fn forget(&self) {
        *self.slot() = None;
    }

    /// What a caller may know of the ticket, if it has not expired at `now_ms`.
    pub(crate) fn info(&self, now_ms: u64) -> Option<SessionInfo> {
        self.slot()
            .as_ref()
            .filter(|t| t.expires_ms > now_ms)
            .map(|t| SessionInfo {
                server: t.server.clone(),
                server_name: t.server_name.clone(),
                expires_ms: t.expires_ms,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_are_per_server_and_expire() {
        let cache = TicketCache::default();
        cache.store("a", "a:1", b"ticket-one".to_vec(), 1_000);
        assert_eq!(
            cache
                .valid_for("a", "a:1", 999)
                .as_deref()
                .map(Vec::as_slice),
            Some(&b"ticket-one"[..])
        );
        assert!(cache.valid_for("a", "b:1", 999).is_none());
        assert_eq!(cache.info(999).unwrap().expires_ms, 1_000);
        assert!(cache.valid_for("a", "a:1", 1_000).is_none());
        assert!(cache.info(0).is_none(), "an expired ticket is wiped");
    }

    #[test]
    fn discard_keeps_a_newer_ticket() {
        let cache = TicketCache::default();
        cache.store("a", "a:1", b"new".to_vec(), 10);
        cache.discard(b"old");
        assert!(cache.valid_for("a", "a:1", 0).is_some());
        cache.discard(b"new");
        assert!(cache.valid_for("a", "a:1", 0).is_none());
        cache.store("a", "a:1", b"x".to_vec(), 10);
        cache.forget();
        assert!(cache.info(0).is_none());
    }

    #[test]
    fn a_ticket_goes_only_to_the_server_name_it_was_issued_under() {
        let cache = TicketCache::default();
        cache.store(
            "portcullis.example",
            "10.0.0.1:7443",
            b"ticket".to_vec(),
            10,
        );
        // Same address, another verified name (a different server behind the address, or the
        // same address reached under another name): no ticket.
        assert!(
            cache
                .valid_for("evil.example", "10.0.0.1:7443", 0)
                .is_none()
        );
        assert!(cache.valid_for("10.0.0.1", "10.0.0.1:7443", 0).is_none());
        // Same name, another address: no ticket either.
        assert!(
            cache
                .valid_for("portcullis.example", "10.0.0.2:7443", 0)
                .is_none()
        );
        // Only the pair it was issued under gets it; a miss does not drop it.
        assert_eq!(
            cache
                .valid_for("portcullis.example", "10.0.0.1:7443", 0)
                .as_deref()
                .map(Vec::as_slice),
            Some(&b"ticket"[..])
        );
        let info = cache.info(0).unwrap();
        assert_eq!(info.server_name, "portcullis.example");
        assert_eq!(info.server, "10.0.0.1:7443");
    }
}
