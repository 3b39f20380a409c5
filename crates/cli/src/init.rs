//! `portcullis init`: a new directory (dev PKI, registry, keys), `--force` to replace one (the
//! old files kept in `replaced-<UTC time>/`), `--add-key` for a directory made before
//! registries were sealed.

use std::fs;
use std::path::{Path, PathBuf};

use clap::Args;
use portcullis_core::Admin;
use portcullis_core::{Random, SystemRandom};
use portcullis_store::{SecretKey, SqliteRegistry, StoreError};
use portcullis_tls::devpki::DevCa;

use crate::CliResult;
use crate::dir::{Layout, replaced_dir, write_private, write_public};
use crate::registry::Location;

/// `portcullis init`.
#[derive(Debug, Args)]
pub(crate) struct InitArgs {
    /// The directory to create.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Another name (DNS name or IP address) for the server certificate, besides localhost,
    /// 127.0.0.1 and ::1. Repeatable.
    #[arg(long = "server-name", value_name = "NAME")]
    server_names: Vec<String>,
    /// Replace an existing directory's CA, server certificate, registry and keys; the previous
    /// ones (and the devices directory) are moved to `DIR/replaced-<UTC time>/`.
    #[arg(long)]
    force: bool,
    /// Give an existing directory made by an older portcullis a registry key (registry.key)
    /// and seal its registry's TOTP secrets with it; nothing else changes.
    #[arg(long, conflicts_with_all = ["force", "server_names"])]
    add_key: bool,
    /// Where to create the registry: `postgres://…` (an empty database, shared later by every
    /// server of a fleet: give them copies of this directory) or `sqlite:PATH`; without it,
    /// DIR/portcullis.db.
    #[command(flatten)]
    registry: crate::registry::RegistryArg,
}

pub(crate) fn init(args: &InitArgs) -> CliResult {
    if args.add_key {
        return add_key(&args.dir);
    }
    let layout = Layout::new(&args.dir);
    if args.dir.exists() && !args.force {
        return Err(format!(
            "{}: already exists; pass --force to replace its CA, server certificate and registry (the old ones are kept in a replaced-<time> directory)",
            args.dir.display()
        ));
    }
    for name in &args.server_names {
        if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "--server-name `{name}`: not a DNS name or IP address"
            ));
        }
    }
    // A database that cannot be reached or already holds a registry is refused before anything
    // is written.
    let location = args.registry.location()?;
    if let Location::Postgres(url) = &location {
        let probe = SecretKey::generate().map_err(|_| "the system random generator failed")?;
        let roots = args.registry.roots()?;
        let taken = |host: &str| {
            format!(
                "PostgreSQL at {host}: the database already holds a registry; a server joins it with a copy of the directory that made it (its registry.key), or start from an empty database"
            )
        };
        let registry = match portcullis_postgres::PgRegistry::open_blocking(url, probe, &roots) {
            Ok(registry) => registry,
            // Secrets sealed under a key of its own: someone's registry.
            Err(portcullis_postgres::PgError::WrongKey { host }) => return Err(taken(&host)),
            Err(e) => return Err(e.to_string()),
        };
        if !registry.is_empty().map_err(|e| e.to_string())? {
            return Err(taken(registry.host()));
        }
    }
    // Said at once, so that it is known also when a later step fails.
    if args.force
        && let Some((aside, devices)) = set_aside(&layout)?
    {
        out!(
            "moved the previous CA, server certificate, registry, keys and {devices} device \
             files to {} (the old devices cannot connect to the new CA)",
            aside.display()
        );
    }
    fs::create_dir_all(layout.devices())
        .map_err(|e| format!("{}: cannot create: {e}", layout.devices().display()))?;

    // A name of its own for every directory's CA, so that a server naming the CAs it accepts
    // (and `portcullis doctor` comparing them) tells two directories' CAs apart.
    let mut id = [0u8; 4];
    SystemRandom::new()
        .fill(&mut id)
        .map_err(|e| format!("random source: {e}"))?;
    let ca = DevCa::generate(&format!("Portcullis dev CA {:08x}", u32::from_be_bytes(id)))
        .map_err(|e| e.to_string())?;
    let mut names: Vec<String> = ["localhost", "127.0.0.1", "::1"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for name in &args.server_names {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    let server = ca.issue_server(&names).map_err(|e| e.to_string())?;

    let registry_key = SecretKey::create(&layout.registry_key()).map_err(|e| e.to_string())?;
    let registry_line = match &location {
        Location::Dir => {
            let db = layout.registry();
            SqliteRegistry::create_with_key(&db, registry_key).map_err(|e| e.to_string())?;
            db.display().to_string()
        }
        Location::Sqlite(db) => {
            SqliteRegistry::create_with_key(db, registry_key).map_err(|e| e.to_string())?;
            format!("sqlite:{}", db.display())
        }
        Location::Postgres(url) => {
            drop(registry_key);
            let registry = layout.open_postgres(url, &args.registry)?;
            format!(
                "PostgreSQL at {} (schema version {})",
                registry.host(),
                portcullis_postgres::SCHEMA_VERSION
            )
        }
    };

    write_public(&layout.ca_cert(), ca.cert_pem().as_bytes())?;
    write_private(&layout.ca_key(), ca.key_pem().as_bytes())?;
    server
        .write(&layout.server_cert(), &layout.server_key())
        .map_err(|e| e.to_string())?;
    let mut key = zeroize::Zeroizing::new([0u8; 32]);
    SystemRandom::new()
        .fill(key.as_mut())
        .map_err(|e| e.to_string())?;
    write_private(&layout.ticket_key(), key.as_ref())?;

    out!("initialised {}", args.dir.display());
    out!("  CA              {}", layout.ca_cert().display());
    out!(
        "  server cert     {} (names: {})",
        layout.server_cert().display(),
        names.join(", ")
    );
    out!("  registry        {registry_line}");
    out!(
        "  registry key    {} (seals the TOTP secrets; keep it with the registry, and private)",
        layout.registry_key().display()
    );
    out!(
        "next: portcullis user add USER --dir {}",
        args.dir.display()
    );
    Ok(())
}

/// `init --force`: moves the files a previous `init` made (and the devices issued since) into
/// `DIR/replaced-<UTC time>/`, so that nothing is lost: the new CA makes the old device
/// certificates useless, and the new registry starts empty. Returns that directory and how many
/// files the devices directory held, or `None` when there was nothing to move. On an error the
/// files already moved are put back.
fn set_aside(layout: &Layout) -> CliResult<Option<(PathBuf, usize)>> {
    let db = layout.registry();
    let present: Vec<PathBuf> = [
        layout.ca_cert(),
        layout.ca_key(),
        layout.server_cert(),
        layout.server_key(),
        db.clone(),
        db.with_extension("db-wal"),
        db.with_extension("db-shm"),
        layout.registry_key(),
        layout.ticket_key(),
        layout.devices(),
    ]
    .into_iter()
    .filter(|p| p.exists())
    .collect();
    if present.is_empty() {
        return Ok(None);
    }
    let devices = fs::read_dir(layout.devices()).map_or(0, |entries| entries.count());
    let aside = replaced_dir(layout)?;
    let mut moved: Vec<(PathBuf, PathBuf)> = Vec::new();
    for from in present {
        let to = aside.join(from.file_name().unwrap_or_default());
        if let Err(e) = fs::rename(&from, &to) {
            for (back_from, back_to) in moved.iter().rev() {
                let _ = fs::rename(back_to, back_from);
            }
            let _ = fs::remove_dir(&aside);
            return Err(format!(
                "{}: cannot move to {}: {e}",
                from.display(),
                aside.display()
            ));
        }
        moved.push((from, to));
    }
    Ok(Some((aside, devices)))
}

/// `portcullis init --add-key`: a registry key for a directory made before registries were
/// sealed. Opening the registry with the new key migrates it (its secrets are sealed); a registry
/// whose secrets are already sealed under another key refuses the new key when it is opened (or,
/// failing that, when its users are read), is left alone, and the new key is removed.
fn add_key(dir: &Path) -> CliResult {
    let layout = Layout::existing(dir)?;
    let key_path = layout.registry_key();
    if key_path.exists() {
        return Err(format!(
            "{}: already exists; the registry is sealed with it",
            key_path.display()
        ));
    }
    let key = SecretKey::create(&key_path).map_err(|e| e.to_string())?;
    let checked = SqliteRegistry::open_with_key(&layout.registry(), key)
        .map_err(|e| match e {
            StoreError::WrongKey { path } => format!(
                "{}: the registry's TOTP secrets are sealed under another key: restore its registry.key",
                path.display()
            ),
            other => other.to_string(),
        })
        .and_then(|registry| {
            registry.list_users().map_err(|e| {
                format!(
                    "{e}; the registry's secrets are sealed under another key: restore its registry.key"
                )
            })
        });
    let users = match checked {
        Ok(users) => users,
        Err(e) => {
            let _ = fs::remove_file(&key_path);
            return Err(e);
        }
    };
    let sealed = users.iter().filter(|u| u.totp.is_some()).count();
    out!(
        "created {}; the TOTP secrets of {sealed} users in {} are sealed with it",
        key_path.display(),
        layout.registry().display()
    );
    Ok(())
}
