//! `portcullis session ...`: the sessions the gate issued, and revoking one.

use clap::Args;
use portcullis_core::{Clock, DeviceRecord, SessionId, SessionRecord, SystemClock};
use serde_json::json;

use crate::dir::Layout;
use crate::text::format_time;
use crate::{CliResult, DirArg};

/// `portcullis session list`.
#[derive(Debug, Args)]
pub(crate) struct SessionListArgs {
    #[command(flatten)]
    dir: DirArg,
    #[command(flatten)]
    registry: crate::registry::RegistryArg,
    /// Print a JSON array.
    #[arg(long)]
    json: bool,
}

/// `portcullis session revoke`.
#[derive(Debug, Args)]
pub(crate) struct SessionRevokeArgs {
    /// The session id: 32 hex digits, as `session list` shows it.
    #[arg(value_parser = parse_session_id)]
    id: SessionId,
    #[command(flatten)]
    dir: DirArg,
    #[command(flatten)]
    registry: crate::registry::RegistryArg,
}

fn parse_session_id(s: &str) -> Result<SessionId, String> {
    let bad = || format!("session id `{s}`: expected 32 hex digits, as `session list` shows");
    if s.len() != 32 || !s.is_ascii() {
        return Err(bad());
    }
    let mut id = [0u8; 16];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(SessionId(id))
}

/// The name of the device a session was earned from: the binding of its fingerprint to its
/// user that was made last before the session.
fn device_of<'a>(devices: &'a [DeviceRecord], s: &SessionRecord) -> Option<&'a DeviceRecord> {
    devices
        .iter()
        .filter(|d| {
            d.fingerprint == s.fingerprint && d.user == s.user && d.created_ms <= s.totp_time_ms
        })
        .max_by_key(|d| d.created_ms)
}

fn status(s: &SessionRecord, now_ms: u64) -> String {
    match s.revoked_ms {
        Some(ms) => format!("revoked {}", format_time(ms)),
        None if s.is_live(now_ms) => "live".to_owned(),
        None => "expired".to_owned(),
    }
}

pub(crate) fn session_list(args: &SessionListArgs) -> CliResult {
    let layout = Layout::existing(&args.dir.dir)?;
    let registry = layout.open_registry(&args.registry)?;
    let now = SystemClock.now_ms();
    let sessions = registry.list_sessions(now).map_err(|e| e.to_string())?;
    let devices = registry.list_devices().map_err(|e| e.to_string())?;
    if args.json {
        let out: Vec<_> = sessions
            .iter()
            .map(|s| {
                json!({
                    "id": s.id.to_string(),
                    "user": s.user,
                    "device": device_of(&devices, s).map(|d| d.name.clone()),
                    "fingerprint": s.fingerprint.to_string(),
                    "totp_time": format_time(s.totp_time_ms),
                    "expires": format_time(s.expires_ms),
                    "revoked": s.revoked_ms.map(format_time),
                    "live": s.is_live(now),
                })
            })
            .collect();
        out!("{}", serde_json::Value::Array(out));
        return Ok(());
    }
    if sessions.is_empty() {
        out!("no sessions");
        return Ok(());
    }
    out!(
        "{:<32} {:<16} {:<16} {:<71} {:<20} {:<20} STATUS",
        "SESSION",
        "USER",
        "DEVICE",
        "FINGERPRINT",
        "TOTP TIME",
        "EXPIRES"
    );
    for s in &sessions {
        out!(
            "{:<32} {:<16} {:<16} {:<71} {:<20} {:<20} {}",
            s.id.to_string(),
            s.user,
            device_of(&devices, s).map_or("-", |d| d.name.as_str()),
            s.fingerprint.to_string(),
            format_time(s.totp_time_ms),
            format_time(s.expires_ms),
            status(s, now)
        );
    }
    Ok(())
}

pub(crate) fn session_revoke(args: &SessionRevokeArgs) -> CliResult {
    let layout = Layout::existing(&args.dir.dir)?;
    let registry = layout.open_registry(&args.registry)?;
    let record = registry
        .revoke_session(&args.id, SystemClock.now_ms())
        .map_err(|e| match e {
            portcullis_core::RegistryError::NotFound(_) => format!(
                "no session {} (it expired, or was never issued by this registry's servers)",
                args.id
            ),
            other => other.to_string(),
        })?;
    let devices = registry.list_devices().map_err(|e| e.to_string())?;
    let device = device_of(&devices, &record).map_or_else(
        || record.fingerprint.to_string(),
        |d| format!("{} ({})", d.name, record.fingerprint),
    );
    out!(
        "revoked session {} of {} on device {device}; its ticket is refused from now on, and \
         a running server closes the connections that earned or hold it",
        record.id,
        record.user
    );
    Ok(())
}
