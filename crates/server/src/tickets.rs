//! Session-ticket keys read from a Portcullis directory ([`crate::Builder::ticket_keys_from`]):
//! `ticket.key` (the current key) and `ticket-retired/` (keys replaced by
//! `portcullis keys rotate-ticket`), read again whenever they change.
//!
//! Every [`TICKET_KEYS_CHECK_INTERVAL`] the server looks at the two paths (modification time,
//! length and inode, no read); when they changed it loads the ring and puts it in the gate at
//! once: tickets are sealed under the new current key from the next accept on, and tickets
//! sealed under a retired key keep opening until no ticket it sealed can be valid (the rotation
//! time plus the session lifetime). Files that fail to load leave the previous ring in force,
//! with a warning naming the file.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use portcullis_core::Gate;
use portcullis_core::layout::DirLayout;
use tokio::time::MissedTickBehavior;

use crate::stamp::Stamp;

/// How often the ticket key files are looked at for a change.
pub const TICKET_KEYS_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The ticket key files of a directory, and the version last loaded.
pub(crate) struct TicketFiles {
    layout: DirLayout,
    seen: Mutex<[Option<Stamp>; 2]>,
    started: AtomicBool,
}

impl TicketFiles {
    /// The files of `layout`, their versions taken now: call it before loading them.
    pub(crate) fn new(layout: DirLayout) -> Self {
        let seen = Self::stamps(&layout);
        Self {
            layout,
            seen: Mutex::new(seen),
            started: AtomicBool::new(false),
        }
    }

    fn stamps(layout: &DirLayout) -> [Option<Stamp>; 2] {
        [
            Stamp::of(&layout.ticket_key()),
            Stamp::of(&layout.retired_ticket_keys()),
        ]
    }

    /// Loads the ring again when a file changed; whether the gate's ring was replaced.
    pub(crate) fn check(&self, gate: &Gate) -> bool {
        let now = Self::stamps(&self.layout);
        {
            let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
            if *seen == now {
                return false;
            }
            *seen = now;
        }
        match self.layout.load_ticket_ring() {
            Ok(Some(ring)) => {
                tracing::info!(
                    current = %ring.current().id(),
                    retired = ring.retired().count(),
                    "session ticket keys loaded"
                );
                gate.set_tickets(ring);
                true
            }
            Ok(None) => {
                tracing::warn!(
                    file = %self.layout.ticket_key().display(),
                    "ticket key file gone; the keys loaded before stay in force"
                );
                false
            }
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "session ticket keys not reloaded; the keys loaded before stay in force"
                );
                false
            }
        }
    }
}

/// Starts the task that reloads `files` into `gate`, once. It stops when the gate is gone.
pub(crate) fn start(files: &Arc<TicketFiles>, gate: &Arc<Gate>) {
    if files.started.swap(true, Ordering::AcqRel) {
        return;
    }
    let (files, gate): (Arc<TicketFiles>, Weak<Gate>) = (files.clone(), Arc::downgrade(gate));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TICKET_KEYS_CHECK_INTERVAL);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(gate) = gate.upgrade() else {
                break;
            };
            let files = files.clone();
            let _ = tokio::task::spawn_blocking(move || files.check(&gate)).await;
        }
    });
}
