//! What `call` and `login` share: the flags that say where to connect, as whom and with which
//! device and code, the client built from them, and one line for a refusal.

use clap::Args;
use portcullis_client::{Client, CodeSource, SessionFiles};
use portcullis_core::layout::{PrivateFileError, read_private};
use portcullis_core::{Clock, TotpAlgorithm, TotpConfig};
use zeroize::Zeroizing;

use crate::dir::Layout;
use crate::{CliResult, DirArg};

/// The flags of a Portcullis connection. `--code` and `--secret` exclude each other; whether
/// one of them is required is up to the command.
#[derive(Debug, Args)]
pub(crate) struct ConnectArgs {
    #[command(flatten)]
    pub(crate) dir: DirArg,
    /// The server address, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) server: String,
    /// The device whose certificate to use (DIR/devices/NAME.pem and NAME-key.pem).
    #[arg(long, value_name = "NAME")]
    pub(crate) device: String,
    /// The user to authenticate as.
    #[arg(long)]
    pub(crate) user: String,
    /// A one-time code. Used when no live session is stored for this device, user and server
    /// (`portcullis login` and every accepted `call` store one under DIR/sessions/DEVICE/):
    /// a stored session is sent instead, and the code is kept unspent.
    #[arg(long, value_name = "CODE", conflicts_with_all = ["secret", "secret_file"])]
    pub(crate) code: Option<String>,
    /// A file holding the user's TOTP secret (base32), readable by its owner only: the code is
    /// computed from it. Without --code, --secret-file or --secret, the secret is read from
    /// the environment variable PORTCULLIS_TOTP_SECRET when it is set.
    #[arg(long, value_name = "FILE", conflicts_with = "secret")]
    pub(crate) secret_file: Option<std::path::PathBuf>,
    /// The user's TOTP secret (base32) on the command line, for scripts and tests: other
    /// local users can read a process's command line, so prefer --secret-file.
    #[arg(long, value_name = "BASE32")]
    pub(crate) secret: Option<String>,
    /// Digits of codes computed from --secret.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u8).range(6..=8))]
    pub(crate) digits: u8,
    /// Hash of codes computed from --secret: SHA1, SHA256 or SHA512.
    #[arg(long, default_value = "SHA1", value_parser = parse_algorithm)]
    pub(crate) algorithm: TotpAlgorithm,
    /// The name to check in the server certificate (default: the host of --server).
    #[arg(long, value_name = "NAME")]
    pub(crate) server_name: Option<String>,
}

/// Reads a TOTP secret file: refused when the group or others may read or write it, or when it
/// is larger than a secret can be.
fn read_secret_file(path: &std::path::Path) -> CliResult<Zeroizing<String>> {
    read_private(path, MAX_SECRET_FILE).map_err(|e| match e {
        PrivateFileError::Exposed { mode } => format!(
            "{}: the TOTP secret file is open to other users (mode {mode:o}); run chmod 600 {}",
            path.display(),
            path.display()
        ),
        PrivateFileError::TooLarge { max } => format!(
            "{}: more than {max} bytes; a TOTP secret file holds one base32 secret",
            path.display()
        ),
        PrivateFileError::Io(e) => format!("{}: {e}", path.display()),
    })
}

/// The largest TOTP secret file read, in bytes (a base32 secret of 512 bytes, with room to
/// spare).
const MAX_SECRET_FILE: u64 = 1024;

fn parse_algorithm(s: &str) -> Result<TotpAlgorithm, String> {
    s.parse()
        .map_err(|e: portcullis_core::TotpError| e.to_string())
}

pub(crate) fn host_of(server: &str) -> CliResult<String> {
    let (host, port) = server
        .rsplit_once(':')
        .ok_or_else(|| format!("--server `{server}`: expected HOST:PORT"))?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(format!("--server `{server}`: expected HOST:PORT"));
    }
    Ok(host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned())
}

/// Checks the shape of a one-time code: 6 to 8 digits. `what` names where it came from.
pub(crate) fn check_code(what: &str, code: &str) -> CliResult {
    if !(6..=8).contains(&code.len()) || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{what}: a one-time code is 6 to 8 digits"));
    }
    Ok(())
}

/// The environment variable a TOTP secret (base32) may come from, as for `Client::from_dir`.
pub(crate) use portcullis_client::SECRET_ENV;

/// What to say when no factor is given.
pub(crate) const NO_FACTOR: &str =
    "give one of --code, --secret-file or --secret (or set PORTCULLIS_TOTP_SECRET)";

impl ConnectArgs {
    /// The code source that `--code`, `--secret-file`, `--secret` or `PORTCULLIS_TOTP_SECRET`
    /// gives, or `None` when none does.
    pub(crate) fn given_code_source(&self) -> CliResult<Option<CodeSource>> {
        if let Some(code) = &self.code {
            check_code("--code", code)?;
            return Ok(Some(CodeSource::fixed(code.clone())));
        }
        Ok(self.totp_config()?.map(CodeSource::secret))
    }

    /// The TOTP parameters from `--secret-file`, `--secret` or `PORTCULLIS_TOTP_SECRET` (in
    /// that order; the variable only without `--code`), or `None` when none gives a secret.
    pub(crate) fn totp_config(&self) -> CliResult<Option<TotpConfig>> {
        let (what, secret) = if let Some(path) = &self.secret_file {
            (path.display().to_string(), read_secret_file(path)?)
        } else if let Some(secret) = &self.secret {
            eprintln!(
                "portcullis: warning: --secret puts the TOTP secret in this process's command \
                 line, which other local users can read; prefer --secret-file FILE or {SECRET_ENV}"
            );
            ("--secret".to_owned(), Zeroizing::new(secret.clone()))
        } else if self.code.is_none()
            && let Some(secret) = std::env::var_os(SECRET_ENV)
        {
            let secret = secret
                .into_string()
                .map_err(|_| format!("{SECRET_ENV}: not UTF-8"))?;
            (SECRET_ENV.to_owned(), Zeroizing::new(secret))
        } else {
            return Ok(None);
        };
        TotpConfig::from_base32(
            secret.trim(),
            self.digits,
            self.algorithm,
            TotpConfig::DEFAULT_PERIOD,
        )
        .map(Some)
        .map_err(|e| format!("{what}: {e}"))
    }

    /// Checks `--server` and the device files, and builds the client with `source`. The
    /// client keeps its session ticket in the device's sessions directory
    /// (`DIR/sessions/DEVICE/`), where the next command finds it.
    pub(crate) fn client(&self, source: CodeSource) -> CliResult<Client> {
        let host = host_of(&self.server)?;
        let layout = Layout::existing(&self.dir.dir)?;
        Client::builder()
            .dir(&layout.dir, &self.device)
            .map_err(|e| e.to_string())?
            .server_name(self.server_name.clone().unwrap_or(host))
            .user(self.user.clone())
            .code_source(source)
            .build()
            .map_err(|e| e.to_string())
    }

    /// The TLS server name a session of `--server` is stored under.
    pub(crate) fn server_name(&self) -> CliResult<String> {
        match &self.server_name {
            Some(name) => Ok(name.clone()),
            None => host_of(&self.server),
        }
    }

    /// The stored sessions of `--user` on `--device`.
    pub(crate) fn stored_sessions(&self) -> SessionFiles {
        SessionFiles::new(
            Layout::new(&self.dir.dir).sessions(&self.device),
            self.user.clone(),
        )
    }

    /// The code source `--code`, `--secret-file`, `--secret` or `PORTCULLIS_TOTP_SECRET` give;
    /// without one, a stored live session of this server must be there (a connection that
    /// still needs a code then fails, saying to log in again).
    pub(crate) fn code_source_or_session(&self) -> CliResult<CodeSource> {
        if let Some(source) = self.given_code_source()? {
            return Ok(source);
        }
        self.check_files()?;
        let now = portcullis_core::SystemClock.now_ms();
        let login = format!(
            "portcullis login --dir {} --server {} --device {} --user {}",
            self.dir.dir.display(),
            self.server,
            self.device,
            self.user
        );
        if self
            .stored_sessions()
            .info(&self.server_name()?, &self.server, now)
            .is_none()
        {
            return Err(format!(
                "no stored session of {} on device {} for {}: run `{login}`, or {NO_FACTOR}",
                self.user, self.device, self.server
            ));
        }
        Ok(CodeSource::callback(move || {
            Err(format!(
                "the stored session ended (expired, revoked or refused): run `{login}` again"
            ))
        }))
    }

    /// Checks `--server` and the device files before anything else is asked for.
    pub(crate) fn check_files(&self) -> CliResult {
        host_of(&self.server)?;
        let layout = Layout::existing(&self.dir.dir)?;
        for path in [
            layout.device_cert(&self.device),
            layout.device_key(&self.device),
        ] {
            if !path.exists() {
                return Err(format!(
                    "{}: no such file (is --device {} issued in this directory?)",
                    path.display(),
                    self.device
                ));
            }
        }
        Ok(())
    }
}

/// A current-thread tokio runtime for one command.
pub(crate) fn runtime() -> CliResult<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))
}

/// One line: `WHAT failed: `, the gRPC code, the reject name and the message, and the REF to
/// find the server's audit record.
pub(crate) fn describe_status(what: &str, status: &tonic::Status) -> String {
    let reject = status
        .metadata()
        .get("portcullis-reject")
        .and_then(|v| v.to_str().ok());
    let reference = status
        .metadata()
        .get("portcullis-ref")
        .and_then(|v| v.to_str().ok());
    let mut line = format!(
        "{what} failed: {:?} ({})",
        status.code(),
        i32::from(status.code())
    );
    if let Some(reject) = reject {
        line.push_str(&format!(" [{reject}]"));
    }
    line.push_str(&format!(": {}", status.message().replace('\n', " ")));
    if let Some(reference) = reference {
        line.push_str(&format!(" (ref {reference})"));
    }
    line
}
