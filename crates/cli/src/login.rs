//! `portcullis login`: earns a session for a device with one Portcullis connection, so that
//! standard gRPC clients on that device are let in while the session lasts.

use std::io::{BufRead, IsTerminal, Write};
use std::process::{Command, Stdio};

use clap::Args;
use portcullis_client::CodeSource;
use serde_json::json;
use zeroize::Zeroizing;

use crate::CliResult;
use crate::connect::{ConnectArgs, check_code, describe_status, runtime};
use crate::enroll::format_time;

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
            "logged in as {} from device {}: the device now holds a live session until {expires}",
            c.user,
            c.device
        );
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
