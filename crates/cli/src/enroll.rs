//! `portcullis user ...` and `portcullis device ...`: enrolling users and devices.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Args;
use portcullis_core::{
    Admin, Clock, DeviceRecord, SystemClock, SystemRandom, TotpAlgorithm, TotpConfig,
    normalize_roles,
};
use portcullis_tls::DeviceIdentity;
use serde::Serialize;
use serde_json::json;
use zeroize::Zeroizing;

use crate::dir::Layout;
use crate::text::format_time;
use crate::{CliResult, DirArg};

const ISSUER: &str = "Portcullis";

fn now_ms() -> u64 {
    SystemClock.now_ms()
}

/// `portcullis user add`.
#[derive(Debug, Args)]
pub(crate) struct UserAddArgs {
    /// The user name.
    user: String,
    #[command(flatten)]
    dir: DirArg,
    #[command(flatten)]
    registry: crate::registry::RegistryArg,
    /// Digits of a code: 6, 7 or 8.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u8).range(6..=8))]
    digits: u8,
    /// HMAC hash: SHA1, SHA256 or SHA512.
    #[arg(long, default_value = "SHA1", value_parser = parse_algorithm)]
    algorithm: TotpAlgorithm,
    /// Give the user this role (repeat for several); per-method policy rules can require roles.
    #[arg(long = "role", value_name = "ROLE")]
    roles: Vec<String>,
    /// Make a service account: no TOTP; its devices are exempt from the second factor (the
    /// device key is its factor), and it may call only the methods a policy rule grants it by
    /// name or role.
    #[arg(long, conflicts_with_all = ["digits", "algorithm"])]
    service: bool,
    /// Print only a JSON object with the user, the secret and the otpauth URI.
    #[arg(long)]
    json: bool,
}

/// The `--json` output of `user add`.
#[derive(Serialize)]
struct UserJson<'a> {
    user: &'a str,
    secret: &'a str,
    otpauth: &'a str,
    digits: u8,
    period: u64,
    algorithm: &'a str,
}

fn parse_algorithm(s: &str) -> Result<TotpAlgorithm, String> {
    s.parse()
        .map_err(|e: portcullis_core::TotpError| e.to_string())
}

pub(crate) fn user_add(args: &UserAddArgs) -> CliResult {
    // Checked before anything is written: a bad role leaves no user behind.
    let roles = normalize_roles(&args.roles).map_err(|e| e.to_string())?;
    let layout = Layout::existing(&args.dir.dir)?;
    let registry = layout.open_registry(&args.registry)?;
    if args.service {
        registry
            .add_service_user(&args.user, now_ms())
            .map_err(|e| e.to_string())?;
        set_roles(&*registry, &args.user, &roles)?;
        if args.json {
            out!(
                "{}",
                json!({ "user": args.user, "service": true, "roles": roles })
            );
        } else {
            out!(
                "added service account {} (no TOTP: its devices are exempt from the second \
                 factor, and it may call only the methods a policy rule grants it){}",
                args.user,
                roles_suffix(&roles)
            );
        }
        return Ok(());
    }
    let totp = TotpConfig::generate_secret(
        &SystemRandom::new(),
        args.digits,
        args.algorithm,
        TotpConfig::DEFAULT_PERIOD,
    )
    .map_err(|e| e.to_string())?;
    // Every text that holds the secret is wiped when dropped.
    let uri = Zeroizing::new(totp.otpauth_uri(ISSUER, &args.user));
    let secret = Zeroizing::new(totp.secret_base32());
    registry
        .add_user(&args.user, totp.clone(), now_ms())
        .map_err(|e| e.to_string())?;
    set_roles(&*registry, &args.user, &roles)?;
    if args.json {
        let out = Zeroizing::new(
            serde_json::to_string(&UserJson {
                user: &args.user,
                secret: &secret,
                otpauth: &uri,
                digits: totp.digits(),
                period: totp.period(),
                algorithm: totp.algorithm().name(),
            })
            .map_err(|e| format!("JSON output: {e}"))?,
        );
        out!("{}", out.as_str());
        return Ok(());
    }
    out!("added user {}{}", args.user, roles_suffix(&roles));
    out!("scan this with an authenticator app, or enter the secret by hand:");
    out!();
    if let Ok(code) = qrcode::QrCode::new(uri.as_bytes()) {
        use qrcode::render::unicode::Dense1x2;
        let image = code
            .render::<Dense1x2>()
            .dark_color(Dense1x2::Light)
            .light_color(Dense1x2::Dark)
            .quiet_zone(true)
            .build();
        let image = Zeroizing::new(image);
        out!("{}", image.as_str());
    }
    out!("otpauth URI: {}", uri.as_str());
    out!(
        "secret:      {}  ({} digits, {}, {} s)",
        secret.as_str(),
        totp.digits(),
        totp.algorithm(),
        totp.period()
    );
    Ok(())
}

fn set_roles(registry: &dyn Admin, user: &str, roles: &[String]) -> CliResult {
    if roles.is_empty() {
        return Ok(());
    }
    registry
        .set_user_roles(user, roles)
        .map_err(|e| format!("user {user}: cannot set roles: {e}"))
}

fn roles_suffix(roles: &[String]) -> String {
    if roles.is_empty() {
        String::new()
    } else {
        format!(" with roles {}", roles.join(", "))
    }
}

/// `portcullis user set`.
#[derive(Debug, Args)]
pub(crate) struct UserSetArgs {
    /// The user name.
    user: String,
    #[command(flatten)]
    dir: DirArg,
    #[command(flatten)]
    registry: crate::registry::RegistryArg,
    /// The user's roles from now on, replacing those held (repeat for several).
    #[arg(
        long = "role",
        value_name = "ROLE",
        required_unless_present = "clear_roles"
    )]
    roles: Vec<String>,
    /// Remove every role of the user.
    #[arg(long, conflicts_with = "roles")]
    clear_roles: bool,
}

pub(crate) fn user_set(args: &UserSetArgs) -> CliResult {
    let roles = normalize_roles(&args.roles).map_err(|e| e.to_string())?;
    let layout = Layout::existing(&args.dir.dir)?;
    let registry = layout.open_registry(&args.registry)?;
    ensure_user(&*registry, &args.user)?;
    registry
        .set_user_roles(&args.user, &roles)
        .map_err(|e| e.to_string())?;
    if roles.is_empty() {
        out!("user {} now has no role", args.user);
    } else {
        out!("user {} now has roles {}", args.user, roles.join(", "));
    }
    Ok(())
}

/// `portcullis user list`.
#[derive(Debug, Args)]
pub(crate) struct UserListArgs {
    #[command(flatten)]
    dir: DirArg,
    #[command(flatten)]
    registry: crate::registry::RegistryArg,
    /// Print a JSON array.
    #[arg(long)]
    json: bool,
}

pub(crate) fn user_list(args: &UserListArgs) -> CliResult {
    let layout = Layout::existing(&args.dir.dir)?;
    let registry = layout.open_registry(&args.registry)?;
    let users = registry.list_users().map_err(|e| e.to_string())?;
    let mut rows = Vec::with_capacity(users.len());
    for u in &users {
        let roles = registry.user_roles(&u.name).map_err(|e| e.to_string())?;
        rows.push((u, roles));
    }
    if args.json {
        let out: Vec<_> = rows
            .iter()
            .map(|(u, roles)| {
                json!({
                    "user": u.name,
                    "roles": roles,
                    "service": u.service,
                    "totp": u.totp.is_some(),
                    "created": format_time(u.created_ms),
                })
            })
            .collect();
        out!("{}", serde_json::Value::Array(out));
        return Ok(());
    }
    if rows.is_empty() {
        out!("no users");
        return Ok(());
    }
    out!("{:<24} {:<8} {:<20} ROLES", "USER", "KIND", "CREATED");
    for (u, roles) in &rows {
        let kind = if u.service { "service" } else { "person" };
        let roles = if roles.is_empty() {
            "-".to_owned()
        } else {
            roles.join(",")
        };
        out!(
            "{:<24} {:<8} {:<20} {roles}",
            u.name,
            kind,
            format_time(u.created_ms)
        );
    }
    Ok(())
}

/// `portcullis device issue`.
#[derive(Debug, Args)]
pub(crate) struct DeviceIssueArgs {
    /// The device name (also the certificate's common name).
    name: String,
    /// The user the device is bound to.
    #[arg(long)]
    user: String,
    #[command(flatten)]
    dir: DirArg,
    #[command(flatten)]
    registry: crate::registry::RegistryArg,
    /// Print only a JSON object.
    #[arg(long)]
    json: bool,
}

fn check_device_name(name: &str) -> CliResult {
    portcullis_core::check_name("device", name).map_err(|e| e.to_string())?;
    if name.starts_with('.')
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "device name `{name}`: use letters, digits, `-`, `_` and `.` (it names files)"
        ));
    }
    Ok(())
}

fn ensure_user(registry: &dyn Admin, user: &str) -> CliResult {
    match registry.user(user).map_err(|e| e.to_string())? {
        Some(_) => Ok(()),
        None => Err(format!(
            "no user {user}; add it first with `portcullis user add {user}`"
        )),
    }
}

fn ensure_device_name_free(registry: &dyn Admin, name: &str) -> CliResult {
    match registry.device_by_name(name).map_err(|e| e.to_string())? {
        Some(d) if !d.is_revoked() => Err(format!(
            "device {name} already exists (bound to {})",
            d.user
        )),
        _ => Ok(()),
    }
}

pub(crate) fn device_issue(args: &DeviceIssueArgs) -> CliResult {
    check_device_name(&args.name)?;
    let layout = Layout::existing(&args.dir.dir)?;
    let registry = layout.open_registry(&args.registry)?;
    ensure_user(&*registry, &args.user)?;
    ensure_device_name_free(&*registry, &args.name)?;
    let ca = layout.load_ca()?;
    let issued = ca.issue_device(&args.name).map_err(|e| e.to_string())?;
    let fingerprint =
        portcullis_tls::fingerprint(issued.cert_der().as_ref()).map_err(|e| e.to_string())?;
    let cert_path = layout.device_cert(&args.name);
    let key_path = layout.device_key(&args.name);
    std::fs::create_dir_all(layout.devices())
        .map_err(|e| format!("{}: cannot create: {e}", layout.devices().display()))?;
    issued
        .write(&cert_path, &key_path)
        .map_err(|e| e.to_string())?;
    if let Err(e) = registry.bind_device(&args.name, &args.user, &fingerprint, now_ms()) {
        // Leave nothing half-made behind.
        let _ = std::fs::remove_file(&cert_path);
        let _ = std::fs::remove_file(&key_path);
        return Err(e.to_string());
    }
    if args.json {
        let out = json!({
            "device": args.name,
            "user": args.user,
            "fingerprint": fingerprint.to_string(),
            "cert": cert_path.display().to_string(),
            "key": key_path.display().to_string(),
        });
        out!("{out}");
    } else {
        out!(
            "issued device {} for {}\n  fingerprint {}\n  certificate {}\n  key         {}",
            args.name,
            args.user,
            fingerprint,
            cert_path.display(),
            key_path.display()
        );
    }
    Ok(())
}

/// `portcullis device bind`.
#[derive(Debug, Args)]
pub(crate) struct DeviceBindArgs {
    /// The device name.
    name: String,
    /// The user the device is bound to.
    #[arg(long)]
    user: String,
    /// The device certificate (PEM); its first certificate is the leaf.
    #[arg(long, value_name = "PEM")]
    cert: PathBuf,
    #[command(flatten)]
    dir: DirArg,
    #[command(flatten)]
    registry: crate::registry::RegistryArg,
    /// Print only a JSON object.
    #[arg(long)]
    json: bool,
}

pub(crate) fn device_bind(args: &DeviceBindArgs) -> CliResult {
    portcullis_core::check_name("device", &args.name).map_err(|e| e.to_string())?;
    let certs = portcullis_tls::load_certs(&args.cert).map_err(|e| e.to_string())?;
    let leaf = certs
        .first()
        .ok_or_else(|| format!("{}: no certificate", args.cert.display()))?;
    let identity = DeviceIdentity::from_der(leaf.as_ref())
        .map_err(|e| format!("{}: {e}", args.cert.display()))?;
    if !identity.client_auth {
        return Err(format!(
            "{}: the certificate does not allow client authentication (extended key usage clientAuth)",
            args.cert.display()
        ));
    }
    let now_s = i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    )
    .unwrap_or(i64::MAX);
    if now_s > identity.not_after_unix {
        return Err(format!(
            "{}: the certificate has expired",
            args.cert.display()
        ));
    }
    let layout = Layout::existing(&args.dir.dir)?;
    let registry = layout.open_registry(&args.registry)?;
    ensure_user(&*registry, &args.user)?;
    let record = registry
        .bind_device(&args.name, &args.user, &identity.fingerprint, now_ms())
        .map_err(|e| e.to_string())?;
    if args.json {
        let out = json!({
            "device": record.name,
            "user": record.user,
            "fingerprint": record.fingerprint.to_string(),
            "subject": identity.subject,
        });
        out!("{out}");
    } else {
        out!(
            "bound device {} ({}) to {}\n  fingerprint {}",
            record.name,
            identity.subject,
            record.user,
            record.fingerprint
        );
    }
    Ok(())
}

/// `portcullis device list`.
#[derive(Debug, Args)]
pub(crate) struct DeviceListArgs {
    #[command(flatten)]
    dir: DirArg,
    #[command(flatten)]
    registry: crate::registry::RegistryArg,
    /// Print a JSON array.
    #[arg(long)]
    json: bool,
}

fn device_json(d: &DeviceRecord, service: Option<bool>) -> serde_json::Value {
    json!({
        "device": d.name,
        "user": d.user,
        "service": service,
        "fingerprint": d.fingerprint.to_string(),
        "created": format_time(d.created_ms),
        "revoked": d.revoked_ms.map(format_time),
    })
}

pub(crate) fn device_list(args: &DeviceListArgs) -> CliResult {
    let layout = Layout::existing(&args.dir.dir)?;
    let registry = layout.open_registry(&args.registry)?;
    let devices = registry.list_devices().map_err(|e| e.to_string())?;
    // Devices of service accounts are exempt from the second factor: shown as such. Users are
    // read with their TOTP secrets; when that fails (e.g. a damaged secret row) devices are
    // still listed, without the service flag (`null` in JSON).
    let services: Option<std::collections::HashSet<String>> =
        registry.list_users().ok().map(|users| {
            users
                .into_iter()
                .filter(|u| u.service)
                .map(|u| u.name)
                .collect()
        });
    let service_of = |d: &DeviceRecord| services.as_ref().map(|s| s.contains(&d.user));
    let is_service = |d: &DeviceRecord| service_of(d) == Some(true);
    if args.json {
        let out: Vec<_> = devices
            .iter()
            .map(|d| device_json(d, service_of(d)))
            .collect();
        out!("{}", serde_json::Value::Array(out));
        return Ok(());
    }
    if devices.is_empty() {
        out!("no devices");
        return Ok(());
    }
    out!(
        "{:<16} {:<16} {:<71} {:<20} STATUS",
        "DEVICE",
        "USER",
        "FINGERPRINT",
        "CREATED"
    );
    for d in &devices {
        let status = match d.revoked_ms {
            Some(ms) => format!("revoked {}", format_time(ms)),
            None if is_service(d) => "active (service: no second factor)".to_owned(),
            None => "active".to_owned(),
        };
        out!(
            "{:<16} {:<16} {:<71} {:<20} {status}",
            d.name,
            d.user,
            d.fingerprint.to_string(),
            format_time(d.created_ms)
        );
    }
    Ok(())
}

/// `portcullis device revoke`.
#[derive(Debug, Args)]
pub(crate) struct DeviceRevokeArgs {
    /// The device name.
    name: String,
    #[command(flatten)]
    dir: DirArg,
    #[command(flatten)]
    registry: crate::registry::RegistryArg,
}

pub(crate) fn device_revoke(args: &DeviceRevokeArgs) -> CliResult {
    let layout = Layout::existing(&args.dir.dir)?;
    let registry = layout.open_registry(&args.registry)?;
    let record = registry
        .revoke_device(&args.name, now_ms())
        .map_err(|e| e.to_string())?;
    out!(
        "revoked device {} ({}) of {}, and its sessions; running servers close its connections \
         within a second and refuse new ones",
        record.name,
        record.fingerprint,
        record.user
    );
    Ok(())
}

/// `portcullis user revoke`.
#[derive(Debug, Args)]
pub(crate) struct UserRevokeArgs {
    /// The user name.
    user: String,
    #[command(flatten)]
    dir: DirArg,
    #[command(flatten)]
    registry: crate::registry::RegistryArg,
}

pub(crate) fn user_revoke(args: &UserRevokeArgs) -> CliResult {
    let layout = Layout::existing(&args.dir.dir)?;
    let registry = layout.open_registry(&args.registry)?;
    let revoked = registry
        .revoke_user(&args.user, now_ms())
        .map_err(|e| e.to_string())?;
    if revoked.is_empty() {
        out!("user {} has no active device; nothing to revoke", args.user);
        return Ok(());
    }
    let devices: Vec<String> = revoked
        .iter()
        .map(|d| format!("{} ({})", d.name, d.fingerprint))
        .collect();
    out!(
        "revoked user {}: devices {}, and the user's sessions; running servers close their \
         connections within a second and refuse new ones (binding a new device lets the user in \
         again)",
        args.user,
        devices.join(", ")
    );
    Ok(())
}
