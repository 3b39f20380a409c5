//! Write-ahead log checkpoints off the accept path.
//!
//! In WAL mode SQLite copies the log back into the database file (a checkpoint, with its
//! `fsync`s) on the commit that finds the log past 1,000 pages: one accept in a few hundred
//! would pay for it, and hold the writer connection meanwhile. A registry runs the checkpoint
//! on a thread of its own instead, on a connection of its own, every
//! [`CHECKPOINT_INTERVAL`]: a `PASSIVE` checkpoint, which neither waits for nor blocks the
//! gate's readers and writer. The writer keeps SQLite's automatic checkpoint as a backstop at
//! [`BACKSTOP_PAGES`], should the thread fall behind.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;

/// How often the checkpoint thread copies the log back.
pub(crate) const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(200);

/// The log size, in pages, at which a commit on the writer checkpoints by itself.
pub(crate) const BACKSTOP_PAGES: i64 = 10_000;

/// The checkpoint thread of a registry; stopped (and joined) when dropped.
pub(crate) struct Checkpointer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Starts checkpointing the registry file at `path` on `conn`. `None` when no thread can be
    /// started: the writer's automatic checkpoint then does the work, as SQLite's default.
    pub(crate) fn start(conn: Connection) -> Option<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("pc-checkpoint".into())
            .spawn(move || {
                while !stopping.load(Ordering::Acquire) {
                    std::thread::park_timeout(CHECKPOINT_INTERVAL);
                    if stopping.load(Ordering::Acquire) {
                        break;
                    }
                    // Best effort: a log that is busy now is checkpointed on the next turn, and the
                    // writer's backstop bounds it meanwhile.
                    let _ = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
                }
            })
            .ok()?;
        Some(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}
