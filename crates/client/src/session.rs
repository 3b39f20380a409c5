//! The session-ticket cache and what a caller may see of tickets and Verdicts.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use portcullis_core::RejectCode;
use portcullis_core::codec::Verdict;
use portcullis_core::layout::{PrivateFileError, read_private, session_file_name};
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

impl CachedTicket {
    /// What a caller may know of the ticket.
    fn info(&self) -> SessionInfo {
        SessionInfo {
            server: self.server.clone(),
            server_name: self.server_name.clone(),
            expires_ms: self.expires_ms,
        }
    }
}

/// One session ticket per client, for the server that issued it. Replaced tickets are wiped.
///
/// A ticket is keyed by the TLS server name the issuing server's certificate was verified
/// against and the address it was reached at: it is only ever sent over a connection to the
/// same address whose certificate was verified for the same name.
///
/// With a [`SessionFiles`] directory, tickets are also kept in files (one per user, server name
/// and address, mode 0600), so that the next process of the same device finds them.
#[derive(Default)]
pub(crate) struct TicketCache {
    slot: Mutex<Option<CachedTicket>>,
    files: Option<SessionFiles>,
}

impl TicketCache {
    /// A cache that also keeps its tickets in `files`.
    pub(crate) fn persisted(files: SessionFiles) -> Self {
        Self {
            slot: Mutex::default(),
            files: Some(files),
        }
    }

    fn slot(&self) -> MutexGuard<'_, Option<CachedTicket>> {
        self.slot
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Keeps a new ticket from the server at `server` verified as `server_name`; the old one
    /// is wiped.
    pub(crate) fn store(&self, server_name: &str, server: &str, ticket: Vec<u8>, expires_ms: u64) {
        let cached = CachedTicket {
            server_name: server_name.to_owned(),
            server: server.to_owned(),
            ticket: Zeroizing::new(ticket),
            expires_ms,
        };
        if let Some(files) = &self.files {
            files.write(&cached);
        }
        *self.slot() = Some(cached);
    }

    /// A copy of the ticket issued by the server at `server` verified as `server_name`, if it
    /// has not expired at `now_ms`: the one held, or else the one in its file. An expired
    /// ticket is wiped (and its file removed).
    pub(crate) fn valid_for(
        &self,
        server_name: &str,
        server: &str,
        now_ms: u64,
    ) -> Option<Zeroizing<Vec<u8>>> {
        let mut slot = self.slot();
        match slot.as_ref() {
            Some(t) if t.expires_ms <= now_ms => {
                self.remove_file(t);
                *slot = None;
            }
            Some(t) if t.server_name == server_name && t.server == server => {
                return Some(t.ticket.clone());
            }
            _ => {}
        }
        let loaded = self.files.as_ref()?.read(server_name, server, now_ms)?;
        let ticket = loaded.ticket.clone();
        *slot = Some(loaded);
        Some(ticket)
    }

    /// Drops the cached ticket if it is `ticket` (a newer one stays), and its file.
    pub(crate) fn discard(&self, ticket: &[u8]) {
        let mut slot = self.slot();
        if let Some(t) = slot.as_ref().filter(|t| t.ticket.as_slice() == ticket) {
            self.remove_file(t);
            *slot = None;
        }
    }

    /// Drops the cached ticket, and its file.
    pub(crate) fn forget(&self) {
        let mut slot = self.slot();
        if let Some(t) = slot.as_ref() {
            self.remove_file(t);
        }
        *slot = None;
    }

    /// Removes the file of `t`, when tickets are kept in files.
    fn remove_file(&self, t: &CachedTicket) {
        if let Some(files) = &self.files {
            files.remove(&t.server_name, &t.server);
        }
    }

    /// What a caller may know of the ticket, if it has not expired at `now_ms`.
    pub(crate) fn info(&self, now_ms: u64) -> Option<SessionInfo> {
        self.slot()
            .as_ref()
            .filter(|t| t.expires_ms > now_ms)
            .map(CachedTicket::info)
    }
}

/// The largest ticket file read, in bytes (a ticket is at most 1024 bytes, 2048 in hex).
pub(crate) const MAX_TICKET_FILE: u64 = 4096;

/// The first line of a ticket file.
const TICKET_FILE_MAGIC: &str = "portcullis-session-ticket 1";

/// Where a client keeps its session tickets on disk ([`ClientBuilder::session_dir`]): a
/// directory of one device (`portcullis_core::layout::DirLayout::sessions`), one file per
/// user, server name and address.
///
/// Files are written whole (a new file renamed over the old one) with mode 0600 in a directory
/// of mode 0700; a file readable by others, too large or not matching its name is not used.
/// Failures to write or remove a file are logged, never an error of the connection: the ticket
/// still works from memory. A ticket is worth nothing without the device key that earned it.
///
/// [`ClientBuilder::session_dir`]: crate::ClientBuilder::session_dir
#[derive(Debug, Clone)]
pub struct SessionFiles {
    dir: PathBuf,
    user: String,
}

impl SessionFiles {
    /// The stored sessions of `user` in the device directory `dir`.
    pub fn new(dir: impl Into<PathBuf>, user: impl Into<String>) -> Self {
        Self {
            dir: dir.into(),
            user: user.into(),
        }
    }

    /// What is known of the stored ticket of the server at `addr` verified as `server_name`,
    /// if there is a usable one that has not expired at `now_ms`.
    pub fn info(&self, server_name: &str, addr: &str, now_ms: u64) -> Option<SessionInfo> {
        self.read(server_name, addr, now_ms).map(|t| t.info())
    }

    /// The stored ticket itself and what is known of it (one read of the file), for a tool
    /// that writes its own Prefix (`portcullis doctor`).
    pub fn ticket(
        &self,
        server_name: &str,
        addr: &str,
        now_ms: u64,
    ) -> Option<(SessionInfo, Zeroizing<Vec<u8>>)> {
        self.read(server_name, addr, now_ms)
            .map(|t| (t.info(), t.ticket))
    }

    /// Removes the stored ticket of that server; whether there was one.
    pub fn remove_stored(&self, server_name: &str, addr: &str) -> std::io::Result<bool> {
        match std::fs::remove_file(self.path(server_name, addr)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}

impl SessionFiles {
    fn path(&self, server_name: &str, server: &str) -> PathBuf {
        self.dir
            .join(session_file_name(&self.user, server_name, server))
    }

    fn write(&self, t: &CachedTicket) {
        if let Err(e) = self.try_write(t) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot store the session ticket; it is kept in memory only");
        }
    }

    fn try_write(&self, t: &CachedTicket) -> std::io::Result<()> {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            builder.mode(0o700);
        }
        builder.create(&self.dir)?;
        let text = Zeroizing::new(format!(
            "{TICKET_FILE_MAGIC}\nuser {}\nserver_name {}\nserver {}\nexpires_ms {}\nticket {}\n",
            self.user,
            t.server_name,
            t.server,
            t.expires_ms,
            Zeroizing::new(hex::encode(t.ticket.as_slice())).as_str()
        ));
        // A temporary file is created with mode 0600.
        let mut file = tempfile::NamedTempFile::new_in(&self.dir)?;
        file.write_all(text.as_bytes())?;
        file.as_file().sync_all()?;
        file.persist(self.path(&t.server_name, &t.server))
            .map_err(|e| e.error)?;
        Ok(())
    }

    fn remove(&self, server_name: &str, server: &str) {
        match std::fs::remove_file(self.path(server_name, server)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot remove a session ticket file")
            }
        }
    }

    /// The ticket in the file of `server_name` and `server`, if there is a usable one that has
    /// not expired at `now_ms` (an expired one's file is removed).
    fn read(&self, server_name: &str, server: &str, now_ms: u64) -> Option<CachedTicket> {
        let path = self.path(server_name, server);
        let text = match read_ticket_file(&path) {
            Ok(Some(text)) => text,
            Ok(None) => return None,
            Err(why) => {
                tracing::warn!(file = %path.display(), "session ticket file not used: {why}");
                return None;
            }
        };
        let Some(ticket) = parse_ticket_file(&text, &self.user, server_name, server) else {
            tracing::warn!(file = %path.display(), "session ticket file not used: not a ticket file of this user and server");
            return None;
        };
        if ticket.expires_ms <= now_ms {
            self.remove(server_name, server);
            return None;
        }
        Some(ticket)
    }
}

/// The text of a ticket file ([`read_private`], at most [`MAX_TICKET_FILE`] bytes); `None` when
/// there is no such file.
fn read_ticket_file(path: &Path) -> Result<Option<Zeroizing<String>>, String> {
    match read_private(path, MAX_TICKET_FILE) {
        Ok(text) => Ok(Some(text)),
        Err(PrivateFileError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(PrivateFileError::Io(e)) => Err(e.to_string()),
        Err(PrivateFileError::Exposed { mode }) => {
            Err(format!("it is open to other users (mode {mode:o})"))
        }
        Err(PrivateFileError::TooLarge { max }) => Err(format!("larger than {max} bytes")),
    }
}

/// Parses a ticket file written by [`SessionFiles`]; `None` unless it is one, for `user` and the
/// server `server_name` at `server`.
fn parse_ticket_file(
    text: &str,
    user: &str,
    server_name: &str,
    server: &str,
) -> Option<CachedTicket> {
    let mut lines = text.lines();
    if lines.next()? != TICKET_FILE_MAGIC {
        return None;
    }
    let mut field = |name: &str| {
        lines
            .next()
            .and_then(|line| line.strip_prefix(name))
            .and_then(|rest| rest.strip_prefix(' '))
    };
    let (file_user, file_name, file_server) =
        (field("user")?, field("server_name")?, field("server")?);
    if file_user != user || file_name != server_name || file_server != server {
        return None;
    }
    let expires_ms = field("expires_ms")?.parse().ok()?;
    let ticket = Zeroizing::new(hex::decode(field("ticket")?).ok()?);
    if ticket.is_empty() || ticket.len() > 1024 || lines.next().is_some() {
        return None;
    }
    Some(CachedTicket {
        server_name: server_name.to_owned(),
        server: server.to_owned(),
        ticket,
        expires_ms,
    })
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

    fn files(dir: &Path, user: &str) -> SessionFiles {
        SessionFiles::new(dir.join("sessions/laptop"), user)
    }

    #[test]
    fn a_stored_ticket_is_found_by_the_next_cache_of_the_same_user_and_server() {
        let tmp = tempfile::tempdir().unwrap();
        let first = TicketCache::persisted(files(tmp.path(), "alice"));
        first.store("localhost", "127.0.0.1:1", b"ticket".to_vec(), 1_000);
        let file = tmp
            .path()
            .join("sessions/laptop/alice@localhost@127.0.0.1:1");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&file), 0o600);
            assert_eq!(mode(file.parent().unwrap()), 0o700);
        }
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.contains(&hex::encode(b"ticket")), "{text}");

        let next = TicketCache::persisted(files(tmp.path(), "alice"));
        assert_eq!(
            next.valid_for("localhost", "127.0.0.1:1", 999)
                .as_deref()
                .map(Vec::as_slice),
            Some(&b"ticket"[..])
        );
        // Another user, server name or address: not this file.
        let bob = TicketCache::persisted(files(tmp.path(), "bob"));
        assert!(bob.valid_for("localhost", "127.0.0.1:1", 0).is_none());
        let other = TicketCache::persisted(files(tmp.path(), "alice"));
        assert!(other.valid_for("evil", "127.0.0.1:1", 0).is_none());
        assert!(other.valid_for("localhost", "127.0.0.1:2", 0).is_none());

        // Expired: not used, and the file goes.
        let late = TicketCache::persisted(files(tmp.path(), "alice"));
        assert!(late.valid_for("localhost", "127.0.0.1:1", 1_000).is_none());
        assert!(!file.exists());
    }

    #[test]
    fn a_refused_or_forgotten_ticket_loses_its_file() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = TicketCache::persisted(files(tmp.path(), "alice"));
        cache.store("n", "h:1", b"one".to_vec(), 10);
        let file = tmp.path().join("sessions/laptop/alice@n@h:1");
        cache.discard(b"other");
        assert!(file.exists(), "a newer ticket stays");
        cache.discard(b"one");
        assert!(!file.exists());
        cache.store("n", "h:1", b"two".to_vec(), 10);
        cache.forget();
        assert!(!file.exists());
    }

    #[test]
    fn a_ticket_file_others_can_read_or_that_is_malformed_is_not_used() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = TicketCache::persisted(files(tmp.path(), "alice"));
        cache.store("n", "h:1", b"one".to_vec(), 10);
        let file = tmp.path().join("sessions/laptop/alice@n@h:1");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
            let fresh = TicketCache::persisted(files(tmp.path(), "alice"));
            assert!(fresh.valid_for("n", "h:1", 0).is_none());
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let text = std::fs::read_to_string(&file).unwrap();
        for bad in [
            text.replace("ticket ", "ticket zz"),
            text.replace("user alice", "user bob"),
            text.replace("expires_ms 10", "expires_ms ten"),
            format!("{text}extra\n"),
            "x".repeat(MAX_TICKET_FILE as usize + 1),
        ] {
            std::fs::write(&file, &bad).unwrap();
            let fresh = TicketCache::persisted(files(tmp.path(), "alice"));
            assert!(fresh.valid_for("n", "h:1", 0).is_none(), "{bad:.80}");
        }
    }
}
