//! The change feed: a connection of its own that `LISTEN`s on [`CHANGES_CHANNEL`] and wakes the
//! server's revocation round on every notification, so that a revocation made through another
//! instance (or the command line) closes connections here at once, not at the next interval.
//!
//! A notification is a hint, never the truth: the round reads the registry itself. A lost
//! notification costs one interval. When the connection is lost (the database restarted, the
//! backend terminated) the listener reconnects with a growing pause (100 ms up to 5 s) and wakes
//! a round once it listens again, which reads everything anew (a resync): what changed while it
//! was away is not missed.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;

use crate::{CHANGES_CHANNEL, PgRegistry};

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
        let task = tokio::spawn(async move {
            let mut pause = Duration::from_millis(100);
            let mut lost = false;
            loop {
                match listen(&config, tls.clone(), &wake).await {
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
    // Listening: whatever changed before now is read by this round.
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
