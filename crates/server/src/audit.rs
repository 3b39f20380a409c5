//! The audit trail: one record per connection attempt.
//!
//! Every connection the server accepts at TCP level ends in exactly one [`AuditRecord`],
//! whatever becomes of it: accepted, refused with a Verdict, or closed without one (a failed
//! TLS handshake, a refused ALPN, a client that went away, a connection closed at accept
//! because even its refusal could not be afforded). The record says who came (peer address,
//! device fingerprint, claimed user, agent), what the server answered (outcome, reject code,
//! REF) and why (the precise internal cause, such as `code_reused` behind `mfa_failed`, which
//! the client never learns), and how long it took.
//!
//! Records go to three places:
//!
//! - a `tracing` event on the target [`AUDIT_TARGET`] (`portcullis::audit`) at INFO level,
//!   with the record's fields as structured fields: any subscriber can keep, filter or render
//!   them (as JSON lines with `tracing-subscriber`'s JSON formatter, for example);
//! - every [`AuditSink`] given to [`crate::Builder::audit_sink`], such as [`JsonLinesFile`]
//!   ([`crate::Builder::audit_log`]), which needs no `tracing` set-up at all;
//! - the server's metrics ([`crate::PortcullisServer::metrics_text`]).
//!
//! A server given no audit sink, in a process with no `tracing` subscriber, writes each
//! refusal and close to stderr instead (one line with its REF, cause and peer), so that no
//! refusal goes unrecorded.
//!
//! A record never holds a secret: no TOTP code, no session ticket, no key. The user and agent
//! are the client's own text; serialized as JSON they are escaped, so they cannot forge a line.
//!
//! ## The JSON form
//!
//! [`AuditRecord::to_json`] gives one line (without the newline):
//!
//! ```text
//! {"time":"2025-06-01T09:30:12.345Z","ref":"5f0c…","peer":"192.0.2.7:50122","proxy":null,
//!  "fingerprint":"sha256:9a3e…","user":"alice","agent":"portcullis-client/0.1",
//!  "alpn":"portcullis/1","device":null,"method":null,"outcome":"rejected","code":"mfa_failed",
//!  "cause":"code_reused","detail":null,"decision_us":41,"accept_us":2210}
//! ```
//!
//! | field | meaning |
//! |---|---|
//! | `time` | when the record was made, RFC 3339 in UTC with milliseconds, on the gate's clock |
//! | `ref` | the REF of the Verdict, 32 hex digits; `null` when no Verdict was made |
//! | `peer` | the client's address and port (behind a trusted balancer with PROXY protocol: the client its header names) |
//! | `proxy` | the balancer's address and port, when the connection came with a PROXY header that named a client; `null` otherwise |
//! | `fingerprint` | `sha256:<hex>` of the client certificate's key; `null` before a finished TLS handshake |
//! | `user` | the user the Prefix claimed; `null` when no Prefix was decoded |
//! | `agent` | the AGENT the Prefix sent, if any |
//! | `alpn` | the application protocol negotiated: `portcullis/1`, or `h2` for a standard gRPC client (see [`crate::standard`]); `null` before a finished TLS handshake or when the ALPN was refused |
//! | `device` | the device name, on accept |
//! | `method` | `totp`, `session` or `device`, on accept |
//! | `outcome` | `accepted`, `rejected` (a rejecting Verdict was made), `closed` (closed without a Verdict), or `ended` (a live connection accepted before, closed by the server: `ref` is its accepting Verdict's, `cause` one of `device_revoked`, `device_rebound`, `device_unknown`, `certificate_revoked`, `cert_expired`, `session_revoked`, `session_expired`, `registry_unreachable`, `server_stopping`; `accept_us` is then the connection's age) |
//! | `code` | the reject code's name (`mfa_failed`); for `closed`, the code that could not be sent, if any |
//! | `cause` | the precise cause (`code_reused`, `alpn_refused`, `tls_handshake_failed`, ...); `null` on accept |
//! | `detail` | more about the cause when there is more (the TLS error, the codec rule, the clock offset) |
//! | `decision_us` | how long the decision itself took, in microseconds; `null` without a Verdict |
//! | `accept_us` | microseconds from TCP accept to the decision (or to the close) |
//!
//! The causes of a `closed` record: `not_tls` (the first bytes were no TLS record: a plaintext
//! client such as `grpcurl -plaintext`), `tls_handshake_failed`, `tls_handshake_timeout`,
//! `alpn_refused`, `tls_version_refused`, `no_usable_client_certificate`,
//! `prefix_read_failed`, the limit that refused it at accept (`rate_limited`,
//! `too_many_pending`, `too_many_pending_from_source`, `rate_limiter_full`),
//! `client_hello_timeout` (no TLS byte within the hello deadline), `shed_for_newer` (closed in
//! its TLS handshake to make room while the server was full), `abandoned` when the server stopped while the
//! attempt was under way, and with PROXY protocol on: `proxy_untrusted` (the peer is not a
//! trusted balancer), `proxy_header_refused` (no valid v2 header), `proxy_header_timeout`.

use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portcullis_core::codec::DecodeError;
use portcullis_core::{
    AuthMethod, Cause, Clock, Decision, DeviceFingerprint, Ref, RejectCode, ServerCause,
};
use serde::{Serialize, Serializer};

use crate::metrics::Metrics;

/// The `tracing` target of audit records.
pub const AUDIT_TARGET: &str = "portcullis::audit";

/// How a connection attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditOutcome {
    /// Authenticated and handed to tonic.
    Accepted,
    /// Refused with a Verdict.
    Rejected,
    /// Closed without a Verdict.
    Closed,
    /// A connection accepted before, closed by the server while it was live: its device,
    /// certificate or session was revoked, its certificate or session expired, the registry
    /// could not confirm it under strict revocation, or the server stopped. The record carries
    /// the REF of the connection's accepting Verdict and the cause.
    Ended,
}

impl AuditOutcome {
    /// `accepted`, `rejected`, `closed` or `ended`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Rejected => "rejected",
            Self::Closed => "closed",
            Self::Ended => "ended",
        }
    }
}

impl fmt::Display for AuditOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One connection attempt, as the audit trail keeps it. See the [module](self) for the
/// fields' JSON form.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct AuditRecord {
    /// When the record was made, in ms since the Unix epoch on the gate's clock.
    #[serde(rename = "time", serialize_with = "rfc3339")]
    pub time_ms: u64,
    /// The REF of the Verdict; `None` when no Verdict was made.
    #[serde(rename = "ref", serialize_with = "display_or_null")]
    pub reference: Option<Ref>,
    /// The client's address: with [`crate::Builder::proxy_protocol`], the one the PROXY
    /// header named.
    pub peer: SocketAddr,
    /// The balancer the connection came through, with [`crate::Builder::proxy_protocol`]
    /// (`None` without it, and for a connection refused before its header named a client).
    pub proxy: Option<SocketAddr>,
    /// The client certificate's fingerprint, once the TLS handshake finished.
    #[serde(serialize_with = "display_or_null")]
    pub fingerprint: Option<DeviceFingerprint>,
    /// The user the Prefix claimed, when it decoded (the client's text).
    pub user: Option<String>,
    /// The AGENT the Prefix sent (the client's text).
    pub agent: Option<String>,
    /// The application protocol negotiated (`portcullis/1`, or `h2` for a standard client).
    pub alpn: Option<&'static str>,
    /// The device name, on accept.
    pub device: Option<String>,
    /// How the second factor was proven, on accept.
    #[serde(serialize_with = "display_or_null")]
    pub method: Option<AuthMethod>,
    /// How the attempt ended.
    pub outcome: AuditOutcome,
    /// The reject code: the one sent for [`AuditOutcome::Rejected`], the one that could not be
    /// sent (if any) for [`AuditOutcome::Closed`].
    #[serde(serialize_with = "display_or_null")]
    pub code: Option<RejectCode>,
    /// The precise cause of a refusal or close (`code_reused`, `alpn_refused`, ...).
    pub cause: Option<&'static str>,
    /// More about the cause, when there is more (never a secret).
    pub detail: Option<String>,
    /// How long the decision took, in µs; `None` when no Verdict was made.
    pub decision_us: Option<u64>,
    /// µs from TCP accept to the decision, or to the close.
    pub accept_us: u64,
}

impl AuditRecord {
    /// The record as one line of JSON, without the trailing newline.
    pub fn to_json(&self) -> String {
        // Only strings, numbers and nulls: serializing cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    fn message(&self) -> &'static str {
        match self.outcome {
            AuditOutcome::Accepted => "connection accepted",
            AuditOutcome::Rejected => "connection refused",
            AuditOutcome::Closed => "connection closed",
            AuditOutcome::Ended => "live connection closed",
        }
    }
}

fn display_or_null<T: fmt::Display, S: Serializer>(
    value: &Option<T>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some(v) => serializer.collect_str(v),
        None => serializer.serialize_none(),
    }
}

fn rfc3339<S: Serializer>(time_ms: &u64, serializer: S) -> Result<S::Ok, S::Error> {
    match format_time(*time_ms) {
        Some(text) => serializer.serialize_str(&text),
        None => serializer.serialize_u64(*time_ms),
    }
}

/// `2025-06-01T09:30:12.345Z`; `None` for a time out of the calendar's range.
/// A time in Unix seconds as RFC 3339 in UTC (`2026-12-03T10:00:00Z`), or the number when it
/// has no such form.
pub(crate) fn format_time_s(unix_s: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix_s)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("Unix second {unix_s}"))
}

fn format_time(time_ms: u64) -> Option<String> {
    const FORMAT: &[time::format_description::BorrowedFormatItem<'_>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    let nanos = i128::from(time_ms).checked_mul(1_000_000)?;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()?
        .format(FORMAT)
        .ok()
}

/// Where audit records go, besides `tracing`: a file, a channel, a collector.
///
/// Called once per connection attempt, in the connection's task (or the accept loop, for a
/// connection closed at accept): keep it quick, and hand slow work to a thread of its own.
/// A closure `Fn(&AuditRecord)` is a sink.
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use portcullis_server::{AuditRecord, AuditSink};
///
/// let seen: Arc<Mutex<Vec<String>>> = Arc::default();
/// let keep = seen.clone();
/// let sink: Arc<dyn AuditSink> = Arc::new(move |record: &AuditRecord| {
///     keep.lock().unwrap().push(record.to_json());
/// });
/// # let _ = sink;
/// ```
pub trait AuditSink: Send + Sync + 'static {
    /// Takes one record.
    fn record(&self, record: &AuditRecord);

    /// Whether the sink keeps its records now (its last write worked). With
    /// [`crate::Builder::audit_required`] new connections are refused while a sink is not
    /// healthy. The default: always.
    fn healthy(&self) -> bool {
        true
    }

    /// Opens the sink's file again (after logrotate moved it). The default does nothing.
    fn reopen(&self) {}
}

impl<F> AuditSink for F
where
    F: Fn(&AuditRecord) + Send + Sync + 'static,
{
    fn record(&self, record: &AuditRecord) {
        self(record)
    }
}

/// Why an audit log could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("{}: cannot open the audit log: {source}", path.display())]
pub struct AuditLogError {
    /// The file.
    pub path: PathBuf,
    /// What went wrong.
    #[source]
    pub source: io::Error,
}

/// When [`JsonLinesFile`] syncs its records to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditFsync {
    /// After every record (`fdatasync`): a record the server made survives a power loss.
    Always,
    /// At the first record written at least this long after the last sync: a power loss can
    /// lose the records of at most one interval, plus those written since the last sync when
    /// none followed.
    Interval(Duration),
    /// Never: the kernel writes the records back when it will (a crash of the process loses
    /// nothing, a power loss may).
    Never,
}

/// An [`AuditSink`] that appends each record to a file as one line of JSON.
///
/// The file is opened for appending and, when new, created with mode 0600 (on Unix). Each line
/// goes to the kernel in one `write` as soon as its record is made (no buffer to lose on a
/// crash of the process, and lines of several writers do not interleave), and is synced to disk
/// by the rule of [`JsonLinesFile::fsync`] (by default [`AuditFsync::Interval`] of 1 s).
/// [`JsonLinesFile::reopen`] opens the path again (for logrotate: call it on SIGHUP, as
/// `portcullis serve` does). A failed write or sync is reported once as a `tracing` warning,
/// and again after the file worked again; while it fails [`AuditSink::healthy`] says so.
///
/// ```no_run
/// # fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use portcullis_server::JsonLinesFile;
///
/// let sink = Arc::new(JsonLinesFile::create("/var/log/portcullis/audit.jsonl")?);
/// let builder = portcullis_server::PortcullisServer::builder().audit_sink(sink);
/// # let _ = builder; Ok(()) }
/// ```
#[derive(Debug)]
pub struct JsonLinesFile {
    path: PathBuf,
    file: Mutex<OpenFile>,
    fsync: AuditFsync,
    max_bytes: Option<u64>,
    failing: AtomicBool,
}

#[derive(Debug)]
struct OpenFile {
    file: File,
    synced: Instant,
    /// The file's length, as far as this sink wrote it.
    len: u64,
}

/// The default [`AuditFsync`] of [`JsonLinesFile`].
pub const DEFAULT_AUDIT_FSYNC: AuditFsync = AuditFsync::Interval(Duration::from_secs(1));

fn open_append(path: &Path) -> Result<File, AuditLogError> {
    let mut options = std::fs::OpenOptions::new();
    options.append(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path).map_err(|source| AuditLogError {
        path: path.to_path_buf(),
        source,
    })
}

impl JsonLinesFile {
    /// Opens `path` for appending, creating it (mode 0600) when it does not exist.
    pub fn create(path: impl AsRef<Path>) -> Result<Self, AuditLogError> {
        let path = path.as_ref().to_path_buf();
        let file = open_append(&path)?;
        let len = file.metadata().map_or(0, |m| m.len());
        Ok(Self {
            path,
            file: Mutex::new(OpenFile {
                file,
                synced: Instant::now(),
                len,
            }),
            fsync: DEFAULT_AUDIT_FSYNC,
            max_bytes: None,
            failing: AtomicBool::new(false),
        })
    }

    /// Rotates the file by size: a record that would take it past `max` bytes first moves it
    /// to `PATH.<Unix ms>` (synced; never overwritten, never deleted: removing old files is
    /// the operator's) and starts a new file at the path. At least 4096.
    pub fn max_bytes(mut self, max: u64) -> Self {
        self.max_bytes = Some(max.max(4096));
        self
    }

    /// The rule by which records are synced to disk (default [`DEFAULT_AUDIT_FSYNC`]).
    pub fn fsync(mut self, rule: AuditFsync) -> Self {
        self.fsync = rule;
        self
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the path again, creating the file when it is gone (logrotate moved it away), and
    /// writes the next records there; the old file is synced and closed. On error the old file
    /// stays in use.
    pub fn reopen(&self) -> Result<(), AuditLogError> {
        let file = open_append(&self.path)?;
        let len = file.metadata().map_or(0, |m| m.len());
        let mut open = self.lock();
        let _ = open.file.sync_data();
        open.file = file;
        open.synced = Instant::now();
        open.len = len;
        drop(open);
        tracing::info!(path = %self.path.display(), "audit log reopened");
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OpenFile> {
        self.file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write_line(&self, line: &[u8]) -> io::Result<()> {
        let mut open = self.lock();
        let size = u64::try_from(line.len()).unwrap_or(u64::MAX);
        if let Some(max) = self.max_bytes
            && open.len > 0
            && open.len.saturating_add(size) > max
        {
            self.rotate(&mut open)?;
        }
        open.file.write_all(line)?;
        open.len = open.len.saturating_add(size);
        let sync = match self.fsync {
            AuditFsync::Always => true,
            AuditFsync::Interval(every) => open.synced.elapsed() >= every,
            AuditFsync::Never => false,
        };
        if sync {
            open.file.sync_data()?;
            open.synced = Instant::now();
        }
        Ok(())
    }
}

impl JsonLinesFile {
    /// Moves the full file aside and opens a new one at the path.
    fn rotate(&self, open: &mut OpenFile) -> io::Result<()> {
        open.file.sync_data()?;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let mut aside = self.path.as_os_str().to_owned();
        aside.push(format!(".{stamp}"));
        let aside = PathBuf::from(aside);
        if aside.exists() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists", aside.display()),
            ));
        }
        std::fs::rename(&self.path, &aside)?;
        open.file = open_append(&self.path).map_err(|e| e.source)?;
        open.len = 0;
        open.synced = Instant::now();
        tracing::info!(path = %self.path.display(), rotated = %aside.display(), "audit log rotated by size");
        Ok(())
    }
}

impl AuditSink for JsonLinesFile {
    fn record(&self, record: &AuditRecord) {
        let mut line = record.to_json().into_bytes();
        line.push(b'\n');
        match self.write_line(&line) {
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::warn!(path = %self.path.display(), "the audit log can be written again");
                }
            }
            Err(e) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot write the audit log; records are lost until it works again");
                }
            }
        }
    }

    fn healthy(&self) -> bool {
        !self.failing.load(Ordering::Relaxed)
    }

    fn reopen(&self) {
        if let Err(e) = JsonLinesFile::reopen(self) {
            tracing::warn!(error = %e, "audit log not reopened; the old file stays in use");
        }
    }
}

/// Makes the records and sends them on: to `tracing`, the metrics and the sinks.
pub(crate) struct Auditor {
    sinks: Vec<Arc<dyn AuditSink>>,
    pub(crate) metrics: Metrics,
    clock: Arc<dyn Clock>,
}

impl Auditor {
    pub(crate) fn new(sinks: Vec<Arc<dyn AuditSink>>, clock: Arc<dyn Clock>) -> Self {
        Self {
            sinks,
            metrics: Metrics::new(),
            clock,
        }
    }

    /// A live connection (accepted as `auth` says, `age` ago) closed by the server for
    /// `cause`: one [`AuditOutcome::Ended`] record.
    pub(crate) fn live_closed(
        &self,
        auth: &crate::AuthContext,
        cause: &'static str,
        detail: &str,
        age: Duration,
    ) {
        let record = AuditRecord {
            time_ms: self.clock.now_ms(),
            reference: Some(auth.reference),
            peer: auth.peer_addr,
            proxy: None,
            fingerprint: Some(auth.fingerprint),
            user: Some(auth.user.clone()),
            agent: None,
            alpn: None,
            device: Some(auth.device_name.clone()),
            method: Some(auth.method),
            outcome: AuditOutcome::Ended,
            code: None,
            cause: Some(cause),
            detail: Some(detail.to_owned()),
            decision_us: None,
            accept_us: micros(age),
        };
        self.emit(&record);
    }

    /// Whether every sink keeps its records now.
    pub(crate) fn healthy(&self) -> bool {
        self.sinks.iter().all(|sink| sink.healthy())
    }

    /// Asks every sink to open its file again.
    pub(crate) fn reopen(&self) {
        for sink in &self.sinks {
            sink.reopen();
        }
    }

    fn emit(&self, record: &AuditRecord) {
        if record.outcome == AuditOutcome::Ended {
            self.metrics.observe_closed(record.cause.unwrap_or(""));
        } else {
            self.metrics.observe_attempt(&crate::metrics::Attempt {
                outcome: record.outcome.as_str(),
                code: record.code.map_or("", |c| c.name()),
                cause: if record.outcome == AuditOutcome::Accepted {
                    ""
                } else {
                    record.cause.unwrap_or("")
                },
                accept_us: record.reference.is_some().then_some(record.accept_us),
                decision_us: record.decision_us,
            });
        }
        trace(record);
        for sink in &self.sinks {
            sink.record(record);
            if !sink.healthy() {
                self.metrics.audit_write_failed();
            }
        }
        // A server with no audit sink and no `tracing` subscriber would refuse connections
        // without a trace: its refusals go to stderr, one line each, with the REF a client
        // quotes.
        if self.sinks.is_empty()
            && record.outcome != AuditOutcome::Accepted
            && !tracing::dispatcher::has_been_set()
        {
            eprintln!("{}", fallback_line(record));
        }
    }
}

/// The stderr line of a refusal when nothing else records it: `INFO portcullis::audit:
/// connection refused ref=… peer=… code=… cause=…`, the client's text (user, agent) escaped.
fn fallback_line(record: &AuditRecord) -> String {
    use std::fmt::Write;
    let mut line = format!("INFO {AUDIT_TARGET}: {}", record.message());
    if let Some(reference) = &record.reference {
        let _ = write!(line, " ref={reference}");
    }
    let _ = write!(line, " peer={}", record.peer);
    if let Some(proxy) = &record.proxy {
        let _ = write!(line, " proxy={proxy}");
    }
    if let Some(user) = &record.user {
        let _ = write!(line, " user={}", user.escape_debug());
    }
    if let Some(fingerprint) = &record.fingerprint {
        let _ = write!(line, " fingerprint={fingerprint}");
    }
    if let Some(code) = record.code {
        let _ = write!(line, " code={}", code.name());
    }
    if let Some(cause) = record.cause {
        let _ = write!(line, " cause={cause}");
    }
    line
}

fn trace(record: &AuditRecord) {
    use tracing::field::display;
    let reference = record.reference.as_ref().map(display);
    let fingerprint = record.fingerprint.as_ref().map(display);
    tracing::info!(
        target: AUDIT_TARGET,
        reference,
        peer = %record.peer,
        proxy = record.proxy.map(display),
        fingerprint,
        user = record.user.as_deref(),
        agent = record.agent.as_deref(),
        alpn = record.alpn,
        device = record.device.as_deref(),
        method = record.method.map(|m| m.as_str()),
        outcome = record.outcome.as_str(),
        code = record.code.map(|c| c.name()),
        cause = record.cause,
        detail = record.detail.as_deref(),
        decision_us = record.decision_us,
        accept_us = record.accept_us,
        "{}",
        record.message()
    );
}

/// One connection attempt under way. It ends in exactly one record: [`Attempt::decided`] or
/// [`Attempt::closed`]; an attempt dropped without either (the server stopped, a task ended
/// early) is recorded as closed with cause `abandoned`.
pub(crate) struct Attempt {
    auditor: Arc<Auditor>,
    peer: SocketAddr,
    proxy: Option<SocketAddr>,
    started: Instant,
    fingerprint: Option<DeviceFingerprint>,
    alpn: Option<&'static str>,
    done: bool,
}

impl Attempt {
    /// An attempt from `peer`, accepted at TCP level now.
    pub(crate) fn new(auditor: &Arc<Auditor>, peer: SocketAddr) -> Self {
        Self {
            auditor: auditor.clone(),
            peer,
            proxy: None,
            started: Instant::now(),
            fingerprint: None,
            alpn: None,
            done: false,
        }
    }

    /// The client's address.
    pub(crate) fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The connection's PROXY header named `client`: it becomes the attempt's peer, and the
    /// balancer it came through its proxy.
    pub(crate) fn forwarded(&mut self, client: SocketAddr) {
        self.proxy = Some(self.peer);
        self.peer = client;
    }

    /// When the attempt started.
    pub(crate) fn started(&self) -> Instant {
        self.started
    }

    /// The client certificate's fingerprint, once the handshake has finished.
    pub(crate) fn device(&mut self, fingerprint: DeviceFingerprint) {
        self.fingerprint = Some(fingerprint);
    }

    /// The application protocol the TLS handshake negotiated.
    pub(crate) fn alpn(&mut self, alpn: &'static str) {
        self.alpn = Some(alpn);
    }

    fn record(&self, outcome: AuditOutcome) -> AuditRecord {
        AuditRecord {
            time_ms: self.auditor.clock.now_ms(),
            reference: None,
            peer: self.peer,
            proxy: self.proxy,
            fingerprint: self.fingerprint,
            user: None,
            agent: None,
            alpn: self.alpn,
            device: None,
            method: None,
            outcome,
            code: None,
            cause: None,
            detail: None,
            decision_us: None,
            accept_us: micros(self.started.elapsed()),
        }
    }

    /// The attempt got a Verdict: `decision`, made in `took`.
    pub(crate) fn decided(mut self, decision: &Decision, took: Duration) {
        self.done = true;
        let mut record = self.record(match decision.outcome {
            Ok(_) => AuditOutcome::Accepted,
            Err(_) => AuditOutcome::Rejected,
        });
        record.reference = Some(decision.reference);
        record.user = decision.claimed_user.clone();
        record.agent = decision.agent.clone();
        record.decision_us = Some(micros(took));
        match &decision.outcome {
            Ok(identity) => {
                record.device = Some(identity.device_name.clone());
                record.method = Some(identity.method);
            }
            Err(rejection) => {
                record.code = Some(rejection.code);
                record.cause = Some(rejection.cause.as_str());
                record.detail = cause_detail(&rejection.cause);
            }
        }
        self.auditor.emit(&record);
    }

    /// The connection was closed without a Verdict: `cause`, with the reject code that could
    /// not be sent (if any) and more detail.
    pub(crate) fn closed(
        mut self,
        code: Option<RejectCode>,
        cause: ServerCause,
        detail: Option<String>,
    ) {
        self.close(code, cause, detail);
    }

    fn close(&mut self, code: Option<RejectCode>, cause: ServerCause, detail: Option<String>) {
        self.done = true;
        let mut record = self.record(AuditOutcome::Closed);
        record.code = code;
        record.cause = Some(cause.as_str());
        record.detail = detail;
        self.auditor.emit(&record);
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.done {
            self.close(None, ServerCause::Abandoned, None);
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// What a [`Cause`] knows beyond its name.
fn cause_detail(cause: &Cause) -> Option<String> {
    match cause {
        Cause::Decode(DecodeError::Malformed(d) | DecodeError::Unsupported(d)) => Some(d.clone()),
        Cause::ClockSkew(ms) => Some(format!("the client clock is {ms} ms off")),
        Cause::Registry(e) => Some(e.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_core::ManualClock;

    fn sample() -> AuditRecord {
        AuditRecord {
            time_ms: 1_748_770_212_345,
            reference: Some(Ref([0xab; 16])),
            peer: "192.0.2.7:50122".parse().unwrap(),
            proxy: None,
            fingerprint: Some(DeviceFingerprint::from_bytes([0x11; 32])),
            user: Some("al\"ice\n{".into()),
            agent: None,
            alpn: Some("portcullis/1"),
            device: None,
            method: None,
            outcome: AuditOutcome::Rejected,
            code: Some(RejectCode::MfaFailed),
            cause: Some("code_reused"),
            detail: None,
            decision_us: Some(41),
            accept_us: 2210,
        }
    }

    #[test]
    fn the_stderr_fallback_is_one_line_with_the_ref_and_escapes_the_user() {
        let line = fallback_line(&sample());
        assert_eq!(
            line,
            format!(
                "INFO portcullis::audit: connection refused ref={} peer=192.0.2.7:50122 \
                 user=al\\\"ice\\n{{ fingerprint=sha256:{} code=mfa_failed cause=code_reused",
                "ab".repeat(16),
                "11".repeat(32)
            )
        );
        assert!(!line.contains('\n'));
    }

    #[test]
    fn the_json_line_has_every_field_in_its_form() {
        let line = sample().to_json();
        assert!(!line.contains('\n'), "{line}");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["time"], "2025-06-01T09:30:12.345Z");
        assert_eq!(v["ref"], "ab".repeat(16));
        assert_eq!(v["peer"], "192.0.2.7:50122");
        assert_eq!(v["proxy"], serde_json::Value::Null);
        assert_eq!(v["fingerprint"], format!("sha256:{}", "11".repeat(32)));
        assert_eq!(v["user"], "al\"ice\n{");
        assert_eq!(v["agent"], serde_json::Value::Null);
        assert_eq!(v["alpn"], "portcullis/1");
        assert_eq!(v["outcome"], "rejected");
        assert_eq!(v["code"], "mfa_failed");
        assert_eq!(v["cause"], "code_reused");
        assert_eq!(v["decision_us"], 41);
        assert_eq!(v["accept_us"], 2210);
        assert_eq!(v.as_object().unwrap().len(), 16, "{line}");
    }

    #[test]
    fn times_are_utc_with_milliseconds() {
        assert_eq!(format_time(0).unwrap(), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_time(951_782_400_007).unwrap(),
            "2000-02-29T00:00:00.007Z"
        );
    }

    #[test]
    fn an_attempt_dropped_unfinished_is_recorded_once_as_abandoned() {
        let seen: Arc<Mutex<Vec<AuditRecord>>> = Arc::default();
        let keep = seen.clone();
        let auditor = Arc::new(Auditor::new(
            vec![Arc::new(move |r: &AuditRecord| {
                keep.lock().unwrap().push(r.clone())
            })],
            Arc::new(ManualClock::new(1_000)),
        ));
        let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        drop(Attempt::new(&auditor, peer));
        Attempt::new(&auditor, peer).closed(
            Some(RejectCode::RateLimited),
            ServerCause::RateLimited,
            None,
        );
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].outcome, AuditOutcome::Closed);
        assert_eq!(seen[0].cause, Some("abandoned"));
        assert_eq!(seen[0].time_ms, 1_000);
        assert_eq!(seen[1].code, Some(RejectCode::RateLimited));
        assert_eq!(seen[1].reference, None);
        assert_eq!(seen[1].decision_us, None);
    }

    #[test]
    fn the_file_sink_appends_one_line_per_record_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let sink = JsonLinesFile::create(&path).unwrap();
        sink.record(&sample());
        sink.record(&sample());
        drop(sink);
        // Reopening appends.
        JsonLinesFile::create(&path).unwrap().record(&sample());
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(text.ends_with('\n'));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let missing = dir.path().join("no/such/dir/audit.jsonl");
        let err = JsonLinesFile::create(&missing).unwrap_err().to_string();
        assert!(err.contains("no/such/dir/audit.jsonl"), "{err}");
        assert!(err.contains("cannot open the audit log"), "{err}");
    }

    #[test]
    fn a_size_limit_rotates_the_file_and_keeps_every_record_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let file = JsonLinesFile::create(&path)
            .unwrap()
            .fsync(AuditFsync::Always)
            .max_bytes(4096);
        let line_len = sample().to_json().len() + 1;
        for _ in 0..60 {
            file.record(&sample());
            // A new rotated name every millisecond at most.
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert!(file.healthy());
        let mut lines = 0;
        let mut files = 0;
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let entry = entry.unwrap();
            let text = std::fs::read_to_string(entry.path()).unwrap();
            assert!(
                text.len() <= 4096,
                "{} holds {} bytes",
                entry.path().display(),
                text.len()
            );
            assert!(text.ends_with('\n'), "whole lines only");
            lines += text.lines().count();
            files += 1;
        }
        assert_eq!(lines, 60, "every record once");
        assert!(files >= (60 * line_len) / 4096, "{files} files");
        // The newest records are in the file at the path.
        assert!(std::fs::metadata(&path).unwrap().len() > 0);
    }
}
