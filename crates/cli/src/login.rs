//! `portcullis login`: earns a session for a device with one Portcullis connection, so that
//! standard gRPC clients on that device are let in while the session lasts, and stores its
//! ticket for `call`, `doctor` and `Client::from_dir`; `portcullis logout` drops it.

use std::io::{BufRead, IsTerminal, Write};
use std::process::{Command, Stdio};

use clap::Args;
use portcullis_client::{CodeSource, SessionFiles};
use portcullis_core::{Clock, SystemClock};
use serde_json::json;
use zeroize::Zeroizing;

use crate::CliResult;
use crate::connect::{ConnectArgs, check_code, describe_status, host_of, runtime};
use crate::dir::Layout;
use crate::text::format_time;

/// `portcullis login`.
#[derive(Debug, Args)]
pub(crate) struct LoginArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Print a JSON object with the user, the device and the session's expiry.
    #[arg(long)]
    json: bool,
}

pub(crate) fn login(args: &LoginArgs) -> CliResult {
    let c = &args.connect;
    let source = match c.given_code_source()? {
        Some(source) => source,
        None => {
            c.check_files()?;
            CodeSource::fixed(prompt_code(&c.user)?.as_str())
        }
    };
    // A login earns a new session with a code: the stored one (if any) is not used.
    let stored = c.stored_sessions();
    stored
        .remove_stored(&c.server_name()?, &c.server)
        .map_err(|e| format!("cannot remove the stored session: {e}"))?;
    let client = c.client(source)?;
    let expires_ms = runtime()?.block_on(async {
        client
            .connect(&c.server)
            .await
            .map_err(|e| match e.status() {
                Some(status) => describe_status("login", status),
                None => format!("login failed: {e}"),
            })?;
        client.session().map(|s| s.expires_ms).ok_or_else(|| {
            "login failed: the server accepted the code but issued no session (sessions are \
             off on this server)"
                .to_owned()
        })
    })?;
    let expires = format_time(expires_ms);
    if args.json {
        let out = json!({
            "user": c.user,
            "device": c.device,
            "session_expires": expires,
        });
        out!("{out}");
    } else {
        out!(
            "logged in as {} from device {}: the device now holds a live session until {expires}; \
             `portcullis call` and `doctor` use it from {} (`portcullis logout` drops it)",
            c.user,
            c.device,
            Layout::new(&c.dir.dir).sessions(&c.device).display()
        );
    }
    Ok(())
}

/// `portcullis logout`.
#[derive(Debug, Args)]
pub(crate) struct LogoutArgs {
    #[command(flatten)]
    dir: crate::DirArg,
    /// The server address, HOST:PORT, as given to `login`.
    #[arg(long, value_name = "HOST:PORT")]
    server: String,
    /// The device the session was stored for.
    #[arg(long, value_name = "NAME")]
    device: String,
    /// The user who logged in.
    #[arg(long)]
    user: String,
    /// The TLS server name, when `login` was given one.
    #[arg(long, value_name = "NAME")]
    server_name: Option<String>,
}

/// Removes the stored session ticket of that user, device and server. The server's session
/// itself lives on until it expires (`portcullis session revoke` on the server ends it).
pub(crate) fn logout(args: &LogoutArgs) -> CliResult {
    let name = match &args.server_name {
        Some(name) => name.clone(),
        None => host_of(&args.server)?,
    };
    let stored = SessionFiles::new(
        Layout::existing(&args.dir.dir)?.sessions(&args.device),
        args.user.clone(),
    );
    let info = stored.info(&name, &args.server, SystemClock.now_ms());
    let removed = stored
        .remove_stored(&name, &args.server)
        .map_err(|e| format!("cannot remove the stored session: {e}"))?;
    match (removed, info) {
        (true, Some(info)) => out!(
            "logged out {} on device {} from {}: the stored ticket is removed; the server's \
             session stays valid until {} unless revoked (`portcullis session revoke`)",
            args.user,
            args.device,
            args.server,
            format_time(info.expires_ms)
        ),
        (true, None) => out!(
            "logged out {} on device {} from {}: removed an expired or unusable stored ticket",
            args.user,
            args.device,
            args.server
        ),
        (false, _) => out!(
            "no stored session of {} on device {} for {}: nothing to do",
            args.user,
            args.device,
            args.server
        ),
    }
    Ok(())
}

/// Asks for the code on the terminal, without echo where `stty` can turn it off. Without a
/// terminal there is nobody to ask: a one-line error.
fn prompt_code(user: &str) -> CliResult<Zeroizing<String>> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(
            "no one-time code: give --code, --secret-file or --secret, or set PORTCULLIS_TOTP_SECRET (stdin is not a terminal to ask on)".into(),
        );
    }
    let mut stderr = std::io::stderr();
    let _ = write!(stderr, "one-time code for {user}: ");
    let _ = stderr.flush();
    let echo_off = stty("-echo");
    let mut line = Zeroizing::new(String::new());
    let read = stdin.lock().read_line(&mut line);
    if echo_off {
        stty("echo");
        let _ = writeln!(stderr);
    }
    read.map_err(|e| format!("reading the one-time code: {e}"))?;
    let code = Zeroizing::new(line.trim().to_owned());
    check_code("the code typed", &code)?;
    Ok(code)
}

/// Runs `stty MODE` on the terminal; whether it worked.
fn stty(mode: &str) -> bool {
    Command::new("stty")
        .arg(mode)
        .stdin(Stdio::inherit())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
