//! The change feed: the `changes` log a revocation round tails
//! ([`GateStore::changes_since`](portcullis_core::GateStore::changes_since)), and a connection of
//! its own that `LISTEN`s on [`CHANGES_CHANNEL`] and wakes the server's revocation round on every
//! notification, so that a revocation made through another instance (or the command line)
//! closes connections here at once, not at the next interval.
//!
//! A notification is a hint, never the truth: the round reads the log itself, numbered in
//! commit order without gaps, so a round that reads the numbers above its last one misses
//! nothing. A lost notification costs one interval. When the connection is lost (the database
//! restarted, the backend terminated) the listener reconnects with a growing pause (100 ms up
//! to 5 s) and wakes a round once it listens again, which reads everything anew (a resync).
//! A gap in the numbers (the log was pruned past the round's position) or numbers lower than
//! the round's (a failover to a replica that had not received them) also make a resync.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use portcullis_core::{
    Change, ChangeTail, DeviceFingerprint, MAX_CHANGES_PER_READ, RegistryError, SessionId,
};
use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;

use crate::{CHANGES_CHANNEL, PgRegistry};

/// The newest change's number.
const HEAD: &str = "SELECT coalesce(max(seq), 0)::bigint FROM changes";

/// The newest change's number, then the changes after `$1` (at most `$2`), oldest first; one
/// row with NULLs after the number when there is none.
const CHANGES_SINCE: &str = "
SELECT h.head, c.seq, c.fingerprint, c.user_name, c.session_id
FROM (SELECT coalesce(max(seq), 0)::bigint AS head FROM changes) h
LEFT JOIN LATERAL (
    SELECT seq, fingerprint, user_name, session_id FROM changes
    WHERE seq > $1::bigint ORDER BY seq LIMIT $2::bigint
) c ON true
ORDER BY c.seq";

impl PgRegistry {
    /// [`GateStore::changes_since`](portcullis_core::GateStore::changes_since) on the `changes`
    /// log: one statement.
    pub(crate) async fn changes_since_async(
        &self,
        after: Option<u64>,
    ) -> Result<ChangeTail, RegistryError> {
        let client = self.conn().await?;
        // Taken now, given back if the read fails: a resync the feed asked for is not lost.
        let resync = self.feed_resync.swap(false, Ordering::AcqRel);
        let read = self.read_changes(&client, after.filter(|_| !resync)).await;
        if read.is_err() && resync {
            self.feed_resync.store(true, Ordering::Release);
        }
        read
    }

    async fn read_changes(
        &self,
        client: &deadpool_postgres::Client,
        after: Option<u64>,
    ) -> Result<ChangeTail, RegistryError> {
        let Some(after) = after else {
            let statement = client
                .prepare_cached(HEAD)
                .await
                .map_err(|e| self.backend(&e))?;
            let row = client
                .query_one(&statement, &[])
                .await
                .map_err(|e| self.backend(&e))?;
            let head: i64 = row.try_get(0).map_err(|e| self.backend(&e))?;
            return Ok(ChangeTail::Resync {
                head: u64::try_from(head).unwrap_or(0),
            });
        };
        let statement = client
            .prepare_cached(CHANGES_SINCE)
            .await
            .map_err(|e| self.backend(&e))?;
        let from = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = MAX_CHANGES_PER_READ as i64;
        let rows = client
            .query(&statement, &[&from, &limit])
            .await
            .map_err(|e| self.backend(&e))?;
        let mut head = 0;
        let mut changes = Vec::new();
        for row in &rows {
            let newest: i64 = row.try_get(0).map_err(|e| self.backend(&e))?;
            head = u64::try_from(newest).unwrap_or(0);
            let Some(seq) = row
                .try_get::<_, Option<i64>>(1)
                .map_err(|e| self.backend(&e))?
            else {
                continue;
            };
            let fingerprint: Option<Vec<u8>> = row.try_get(2).map_err(|e| self.backend(&e))?;
            let session: Option<Vec<u8>> = row.try_get(4).map_err(|e| self.backend(&e))?;
            changes.push(Change {
                seq: u64::try_from(seq).unwrap_or(0),
                fingerprint: match fingerprint {
                    Some(bytes) => Some(DeviceFingerprint::from_bytes(
                        bytes.try_into().map_err(|_| self.bad_change(seq))?,
                    )),
                    None => None,
                },
                user: row.try_get(3).map_err(|e| self.backend(&e))?,
                session: match session {
                    Some(bytes) => Some(SessionId(
                        bytes.try_into().map_err(|_| self.bad_change(seq))?,
                    )),
                    None => None,
                },
            });
        }
        // Numbers lower than the round's (a failover lost them), or a gap (pruned past it):
        // the log cannot say what changed.
        let contiguous = changes
            .iter()
            .zip(after + 1..)
            .all(|(change, expected)| change.seq == expected);
        if head < after || !contiguous {
            return Ok(ChangeTail::Resync { head });
        }
        let head = changes.last().map_or(after, |c| c.seq);
        Ok(ChangeTail::Changes { changes, head })
    }

    fn bad_change(&self, seq: i64) -> RegistryError {
        RegistryError::Backend(format!(
            "PostgreSQL at {}: change {seq} holds a malformed fingerprint or session id",
            self.host
        ))
    }
}

/// The `application_name` of the listening connection (what `pg_stat_activity` shows).
pub const LISTENER_APPLICATION_NAME: &str = "portcullis-listen";

/// The longest pause between two attempts to listen again.
const MAX_PAUSE: Duration = Duration::from_secs(5);

/// A running change feed ([`PgRegistry::listen_changes`]); it stops when dropped.
#[derive(Debug)]
pub struct ChangeListener {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ChangeListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PgRegistry {
    /// Starts the change feed on the current tokio runtime: `wake` is notified on every change
    /// recorded in the registry (a revocation, a role change), and once each time the feed
    /// listens again after losing its connection. Give `wake` to
    /// `portcullis_server::Builder::revocation_wake`.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn listen_changes(&self, wake: Arc<Notify>) -> ChangeListener {
        let mut config = self.config.clone();
        config.application_name(LISTENER_APPLICATION_NAME);
        let tls = self.tls.clone();
        let host = self.host.clone();
        let resync = self.feed_resync.clone();
        let task = tokio::spawn(async move {
            let mut pause = Duration::from_millis(100);
            let mut lost = false;
            loop {
                match listen(&config, tls.clone(), &wake, &resync).await {
                    Listened::Then(cause) => {
                        // It listened: the next loss starts the pauses from the shortest again.
                        pause = Duration::from_millis(100);
                        tracing::warn!(
                            host = %host,
                            "registry change feed lost ({cause}); listening again"
                        );
                    }
                    Listened::Never(cause) => {
                        if !lost {
                            tracing::warn!(
                                host = %host,
                                "registry change feed cannot listen ({cause}); retrying, the revocation interval still applies"
                            );
                        }
                        lost = true;
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(MAX_PAUSE);
                        continue;
                    }
                }
                lost = false;
            }
        });
        ChangeListener { task }
    }
}

/// How one connection of the feed ended.
enum Listened {
    /// It listened, then the connection ended for this cause.
    Then(String),
    /// It never got to listen.
    Never(String),
}

/// Connects, listens, wakes a round (the resync), then wakes one per notification until the
/// connection ends.
async fn listen(
    config: &tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    wake: &Notify,
    resync: &AtomicBool,
) -> Listened {
    let (client, mut connection) = match config.connect(tls).await {
        Ok(pair) => pair,
        Err(e) => return Listened::Never(crate::db_cause(&e)),
    };
    let statement = format!("LISTEN {CHANGES_CHANNEL}");
    let listening = client.batch_execute(&statement);
    tokio::pin!(listening);
    // The connection is driven while the LISTEN goes out.
    loop {
        tokio::select! {
            done = &mut listening => match done {
                Ok(()) => break,
                Err(e) => return Listened::Never(crate::db_cause(&e)),
            },
            message = std::future::poll_fn(|cx| connection.poll_message(cx)) => match message {
                None => return Listened::Never("the connection closed".to_owned()),
                Some(Err(e)) => return Listened::Never(crate::db_cause(&e)),
                Some(Ok(_)) => {}
            },
        }
    }
    // Listening: whatever changed before now is read by this round, in full.
    resync.store(true, Ordering::Release);
    wake.notify_one();
    loop {
        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            Some(Ok(AsyncMessage::Notification(_))) => wake.notify_one(),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Listened::Then(crate::db_cause(&e)),
            None => return Listened::Then("the connection closed".to_owned()),
        }
    }
}
