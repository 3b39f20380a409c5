//! `portcullis keys`: the session-ticket keys rotated, the registry key replaced.
//!
//! - `keys rotate-ticket`: a new `ticket.key` seals every new ticket; the key it replaces moves
//!   to `ticket-retired/<Unix ms>.key` and keeps opening the tickets it sealed until they expire.
//!   Servers of the directory load the keys again within a second of the change.
//! - `keys rekey`: a new `registry.key` and every TOTP secret re-sealed under it in one
//!   transaction (SQLite or PostgreSQL); the old key moves to `replaced-<UTC time>/`.
//!
//! A rekey is ordered so that a crash anywhere leaves the registry readable under exactly one
//! key: (1) the new key is written to `registry.key.new` and made durable; (2) one transaction
//! re-seals every secret; (3) the old `registry.key` moves aside and `registry.key.new` takes its
//! place. Until (3) is done, every command that opens the registry refuses with one line naming
//! the interrupted rekey; `keys rekey` run again finds which of the two keys opens the registry
//! and finishes (or drops the unused new key and starts over).

use std::fs;
use std::path::PathBuf;

use clap::Args;
use portcullis_core::{Clock, Random, SystemClock, SystemRandom, TicketKey};
use portcullis_postgres::{PgError, PgRegistry};
use portcullis_store::{SecretKey, SqliteRegistry, StoreError};
use zeroize::Zeroizing;

use crate::CliResult;
use crate::dir::{Layout, replaced_dir, sync_dir, write_private};
use crate::registry::{Location, RegistryArg};

/// The default of `rotate-ticket --keep`: the default session lifetime of `serve`.
const DEFAULT_KEEP_SECS: u64 = 3600;

/// A rekey prints a progress line every this many rows.
const PROGRESS_EVERY: usize = 1000;

/// `portcullis keys rotate-ticket`.
#[derive(Debug, Args)]
pub(crate) struct RotateTicketArgs {
    #[command(flatten)]
    dir: crate::DirArg,
    /// How long a retired key is kept, in seconds: at least the longest session lifetime of the
    /// servers (`serve --session-ttl`), so that no ticket is cut short. Retired keys older than
    /// this are deleted.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_KEEP_SECS,
          value_parser = clap::value_parser!(u64).range(1..))]
    keep: u64,
}

/// Rotates the session-ticket key of a directory.
pub(crate) fn rotate_ticket(args: &RotateTicketArgs) -> CliResult {
    let layout = Layout::existing(&args.dir.dir)?;
    let current = layout.ticket_key();
    let old = match fs::read(&current) {
        Ok(bytes) => Zeroizing::new(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "{}: no ticket key to rotate; `portcullis init` makes one",
                current.display()
            ));
        }
        Err(e) => return Err(format!("{}: cannot read: {e}", current.display())),
    };
    let old_id = TicketKey::from_bytes(&old)
        .map_err(|_| {
            format!(
                "{}: a ticket key file holds exactly 32 bytes",
                current.display()
            )
        })?
        .id();
    let now = SystemClock.now_ms();
    let retired_dir = layout.retired_ticket_keys();
    if !retired_dir.is_dir() {
        let mut builder = fs::DirBuilder::new();
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            builder.mode(0o700);
        }
        builder
            .create(&retired_dir)
            .map_err(|e| format!("{}: cannot create: {e}", retired_dir.display()))?;
    }
    // The old key is kept first: a server that reads the files between the two steps finds the
    // old key twice, never a ticket it cannot open.
    let mut at = now;
    let retired = loop {
        let path = retired_dir.join(format!("{at}.key"));
        if !path.exists() {
            break path;
        }
        at += 1;
    };
    write_key(&retired, &old)?;
    sync_dir(&retired_dir)?;
    let mut fresh = Zeroizing::new([0u8; 32]);
    SystemRandom::new()
        .fill(fresh.as_mut())
        .map_err(|e| format!("new ticket key: {e}"))?;
    let new_id = TicketKey::from_bytes(fresh.as_ref())
        .map_err(|e| e.to_string())?
        .id();
    let staged = layout.dir.join("ticket.key.tmp");
    let _ = fs::remove_file(&staged);
    write_key(&staged, fresh.as_ref())?;
    fs::rename(&staged, &current)
        .map_err(|e| format!("{}: cannot replace: {e}", current.display()))?;
    sync_dir(&layout.dir)?;
    let keep_ms = args.keep.saturating_mul(1000);
    let mut dropped = 0;
    // Other names are left alone here; the server refuses them, naming them.
    let retired_files = layout
        .retired_ticket_key_files()
        .map_err(|e| e.to_string())?;
    for (path, retired_ms) in retired_files {
        let Some(retired_ms) = retired_ms else {
            continue;
        };
        if retired_ms.saturating_add(keep_ms) <= now {
            fs::remove_file(&path)
                .map_err(|e| format!("{}: cannot remove: {e}", path.display()))?;
            dropped += 1;
        }
    }
    out!(
        "ticket key rotated: new tickets are sealed under key {new_id} ({})",
        current.display()
    );
    out!(
        "  key {old_id} moved to {}; it opens the tickets it sealed for {} s more",
        retired.display(),
        args.keep
    );
    if dropped > 0 {
        out!(
            "  {dropped} retired key(s) older than {} s deleted",
            args.keep
        );
    }
    out!(
        "  servers of this directory load the keys within {} s; copy ticket.key and ticket-retired/ to the other members of a fleet",
        portcullis_server::TICKET_KEYS_CHECK_INTERVAL.as_secs()
    );
    Ok(())
}

/// Writes a new key file, owner only, and makes it durable.
fn write_key(path: &std::path::Path, bytes: &[u8]) -> CliResult {
    write_private(path, bytes)?;
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("{}: cannot sync: {e}", path.display()))
}

/// `portcullis keys rekey`.
#[derive(Debug, Args)]
pub(crate) struct RekeyArgs {
    #[command(flatten)]
    dir: crate::DirArg,
    #[command(flatten)]
    registry: RegistryArg,
}

/// A registry opened for a rekey.
enum Opened {
    Sqlite(SqliteRegistry),
    Postgres(PgRegistry),
}

/// The registry a rekey works on.
struct Target<'a> {
    layout: &'a Layout,
    location: Location,
    arg: &'a RegistryArg,
}

impl Target<'_> {
    /// The registry opened under `key`; `None` when its secrets are sealed under another key.
    fn open(&self, key: SecretKey) -> CliResult<Option<Opened>> {
        match &self.location {
            Location::Postgres(url) => {
                let roots = self.arg.roots()?;
                match PgRegistry::open_blocking(url, key, &roots) {
                    Ok(registry) => Ok(Some(Opened::Postgres(registry))),
                    Err(PgError::WrongKey { .. }) => Ok(None),
                    Err(e) => Err(e.to_string()),
                }
            }
            location => {
                let path = match location {
                    Location::Sqlite(path) => path.clone(),
                    _ => {
                        self.layout.check_registry_file()?;
                        self.layout.registry()
                    }
                };
                match SqliteRegistry::open_with_key(&path, key) {
                    Ok(registry) => Ok(Some(Opened::Sqlite(registry))),
                    Err(StoreError::WrongKey { .. }) => Ok(None),
                    Err(e) => Err(self.layout.store_error(e)),
                }
            }
        }
    }

    /// What the registry is called in messages.
    fn name(&self) -> String {
        match &self.location {
            Location::Postgres(_) => "the PostgreSQL registry".to_owned(),
            Location::Sqlite(path) => path.display().to_string(),
            Location::Dir => self.layout.registry().display().to_string(),
        }
    }
}

/// How an interrupted rekey was settled.
enum Settled {
    /// The registry was sealed under the new key: the key files are now in place.
    Finished(PathBuf),
    /// The registry was still under the old key: the unused new key was deleted.
    Dropped,
}

/// Replaces the registry key and re-seals every TOTP secret under it.
pub(crate) fn rekey(args: &RekeyArgs) -> CliResult {
    let layout = Layout::existing(&args.dir.dir)?;
    let target = Target {
        layout: &layout,
        location: args.registry.location()?,
        arg: &args.registry,
    };
    let pending = layout.registry_key_new();
    if pending.exists() {
        match settle(&target)? {
            Settled::Finished(aside) => {
                out!(
                    "finished an interrupted rekey: {} is sealed under {}; the old key is in {}",
                    target.name(),
                    layout.registry_key().display(),
                    aside.display()
                );
                return Ok(());
            }
            Settled::Dropped => out!(
                "an interrupted rekey had changed nothing; its unused key was deleted, starting again"
            ),
        }
    }
    let current = SecretKey::load(&layout.registry_key()).map_err(|e| layout.store_error(e))?;
    let registry = target.open(current)?.ok_or_else(|| {
        layout.store_error(StoreError::WrongKey {
            path: layout.registry(),
        })
    })?;
    // (1) The new key on disk, durable, before any secret is sealed under it.
    let key = SecretKey::create(&pending).map_err(|e| e.to_string())?;
    sync_dir(&layout.dir)?;
    // (2) One transaction.
    let progress = |done: usize, total: usize| {
        if done.is_multiple_of(PROGRESS_EVERY) && done < total {
            eprintln!("re-sealed {done} of {total} TOTP secrets");
        }
    };
    let resealed = match registry {
        Opened::Sqlite(registry) => registry.rekey(key, progress),
        Opened::Postgres(registry) => registry.rekey(key, progress),
    };
    let count = match resealed {
        Ok(count) => count,
        Err(e) => {
            // Nothing was committed: the registry is under the old key still.
            let _ = fs::remove_file(&pending);
            return Err(e.to_string());
        }
    };
    // (3) The key files.
    let aside = put_in_place(&layout)?;
    out!(
        "re-sealed {count} TOTP secrets in {} under a new key, {}",
        target.name(),
        layout.registry_key().display()
    );
    out!(
        "  the old key is in {} (keep it while backups sealed under it matter)",
        aside.display()
    );
    out!(
        "  restart the servers of this registry (every member of a fleet with the new registry.key): a server holding the old key refuses connections that need a TOTP secret"
    );
    Ok(())
}

/// Settles an interrupted rekey: whichever of `registry.key` and `registry.key.new` opens the
/// registry becomes `registry.key`.
fn settle(target: &Target<'_>) -> CliResult<Settled> {
    let layout = target.layout;
    let pending = layout.registry_key_new();
    let new = match SecretKey::load(&pending) {
        Ok(key) => key,
        Err(StoreError::KeyLength { .. }) => {
            // Not a whole key (the crash came while it was written): nothing was sealed under
            // it, since the rows change only once the key is whole and durable.
            fs::remove_file(&pending)
                .map_err(|e| format!("{}: cannot remove: {e}", pending.display()))?;
            return Ok(Settled::Dropped);
        }
        Err(e) => return Err(layout.store_error(e)),
    };
    let old_path = layout.registry_key();
    if old_path.exists() {
        let old = SecretKey::load(&old_path).map_err(|e| layout.store_error(e))?;
        if target.open(old)?.is_some() {
            fs::remove_file(&pending)
                .map_err(|e| format!("{}: cannot remove: {e}", pending.display()))?;
            sync_dir(&layout.dir)?;
            return Ok(Settled::Dropped);
        }
    }
    if target.open(new)?.is_none() {
        return Err(format!(
            "{}: neither {} nor {} opens the TOTP secrets of {}; restore the registry.key it was sealed with",
            layout.dir.display(),
            old_path.display(),
            pending.display(),
            target.name()
        ));
    }
    put_in_place(layout).map(Settled::Finished)
}

/// Step (3): `registry.key` (when there is one) to `replaced-<time>/`, `registry.key.new` in its
/// place. Returns where the old key went.
fn put_in_place(layout: &Layout) -> CliResult<PathBuf> {
    let current = layout.registry_key();
    let aside = replaced_dir(layout)?;
    if current.exists() {
        let to = aside.join("registry.key");
        fs::rename(&current, &to).map_err(|e| {
            format!(
                "{}: cannot move to {}: {e}",
                current.display(),
                to.display()
            )
        })?;
    }
    let pending = layout.registry_key_new();
    fs::rename(&pending, &current).map_err(|e| {
        format!(
            "{}: cannot move to {}: {e}",
            pending.display(),
            current.display()
        )
    })?;
    sync_dir(&layout.dir)?;
    Ok(aside)
}
