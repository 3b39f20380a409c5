//! `portcullis`: set up a dev PKI and registry, enroll users and devices, run the demo Echo
//! service behind the gate, and call it.
//!
//! Every command exits 0 on success, and non-zero with a one-line message on a bad argument, a
//! missing file or a broken certificate.

/// Prints a line to stdout. A stdout that was closed early (`portcullis device list | head -1`)
/// ends the output quietly instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

mod bench;
mod call;
mod connect;
mod dir;
mod doctor;
mod enroll;
mod init;
mod keys;
mod login;
mod registry;
mod serve;
mod session;
mod text;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Multi-factor authentication in the transport layer of gRPC.
#[derive(Debug, Parser)]
#[command(name = "portcullis", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a dev CA, a server certificate and an empty registry in DIR.
    Init(init::InitArgs),
    /// Manage users.
    #[command(subcommand)]
    User(UserCommand),
    /// Manage device certificates and their bindings to users.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Run the demo Echo service behind the gate.
    Serve(serve::ServeArgs),
    /// Make one Echo call through the gate, on the session `login` stored or with a code.
    Call(call::CallArgs),
    /// Earn a session for a device with a one-time code (asked for on a terminal when no
    /// factor is given) and store its ticket under DIR/sessions/DEVICE/ for `call`, `doctor`
    /// and standard gRPC clients on the device.
    Login(login::LoginArgs),
    /// Remove the session ticket `login` stored for a user, device and server.
    Logout(login::LogoutArgs),
    /// Walk the path to a server step by step and say which step fails and how to fix it. Exits
    /// 0 when every step passes, else 10 + the number of the first failed step (docs/DOCTOR.md).
    Doctor(doctor::DoctorArgs),
    /// List and revoke the sessions the gate issued.
    #[command(subcommand)]
    Session(SessionCommand),
    /// Rotate the session-ticket key or replace the registry key.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Move a registry between backends.
    #[command(subcommand)]
    Registry(RegistryCommand),
    /// Measure what Portcullis costs.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// A new session-ticket key for new tickets; the old one opens the tickets it sealed until
    /// they expire (--keep), then it is deleted.
    RotateTicket(keys::RotateTicketArgs),
    /// A new registry key (registry.key), with every TOTP secret re-sealed under it in one
    /// transaction; the old key moves to DIR/replaced-<UTC time>/.
    Rekey(keys::RekeyArgs),
}

#[derive(Debug, Subcommand)]
enum RegistryCommand {
    /// Copy a SQLite registry (users, sealed secrets, lockout and single-use state, devices,
    /// roles, sessions) into an empty PostgreSQL database, in one transaction.
    Copy(registry::CopyArgs),
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Connection setup, per-RPC latency, throughput, memory and round trips against stock
    /// tonic mTLS, in one process on loopback. Build with --release for meaningful figures.
    Handshake(bench::HandshakeArgs),
    /// Server instructions per accepted connection for stock tonic mTLS and Portcullis, counted
    /// by valgrind's callgrind (valgrind must be installed). Build with --release.
    Instructions(bench::InstructionsArgs),
    /// One scenario's server for `bench instructions`, which runs it under valgrind.
    #[command(hide = true)]
    InstructionsServer(bench::InstructionsServerArgs),
}

#[derive(Debug, Subcommand)]
enum SessionCommand {
    /// List the sessions that have not expired, revoked ones included, newest first.
    List(session::SessionListArgs),
    /// Revoke a session: its ticket is refused from now on.
    Revoke(session::SessionRevokeArgs),
}

#[derive(Debug, Subcommand)]
enum UserCommand {
    /// Add a user with a new TOTP secret; prints the otpauth URI and a QR code. With
    /// `--service`, a service account without TOTP.
    Add(enroll::UserAddArgs),
    /// Replace the roles of a user.
    Set(enroll::UserSetArgs),
    /// List users with their roles and whether they are service accounts.
    List(enroll::UserListArgs),
    /// Revoke every device of a user: running servers close their connections and refuse them.
    Revoke(enroll::UserRevokeArgs),
}

#[derive(Debug, Subcommand)]
enum DeviceCommand {
    /// Issue a client certificate from the dev CA and bind it to a user.
    Issue(enroll::DeviceIssueArgs),
    /// Bind a certificate made elsewhere to a user.
    Bind(enroll::DeviceBindArgs),
    /// List device bindings.
    List(enroll::DeviceListArgs),
    /// Revoke a device binding.
    Revoke(enroll::DeviceRevokeArgs),
}

/// The `--dir DIR` flag shared by every command.
#[derive(Debug, Args)]
pub(crate) struct DirArg {
    /// The Portcullis directory made by `portcullis init`.
    #[arg(long, value_name = "DIR")]
    pub(crate) dir: std::path::PathBuf,
}

/// A command's failure: one line for the person.
pub(crate) type CliResult<T = ()> = Result<T, String>;

/// One line for a command-line error: clap's first line, with the flags it lists below it
/// (missing arguments) folded in.
fn clap_error_line(e: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if e.kind() == ErrorKind::MissingRequiredArgument
        && let Some(ContextValue::Strings(args)) = e.get(ContextKind::InvalidArg)
        && !args.is_empty()
    {
        let noun = if args.len() == 1 {
            "argument"
        } else {
            "arguments"
        };
        return format!("missing required {noun} {}", args.join(", "));
    }
    let rendered = e.render().to_string();
    let line = rendered
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("error: invalid arguments");
    line.strip_prefix("error: ").unwrap_or(line).to_owned()
}

/// A bug must still end in one line, not a panic message and a backtrace.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown cause".to_owned());
        let location = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = message.lines().next().unwrap_or("");
        eprintln!("portcullis: internal error{location}: {message}");
    }));
}

fn main() -> ExitCode {
    install_panic_hook();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                let _ = e.print();
                return ExitCode::from(2);
            }
            eprintln!("portcullis: {} (see --help)", clap_error_line(&e));
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Init(args) => init::init(&args),
        Command::User(UserCommand::Add(args)) => enroll::user_add(&args),
        Command::User(UserCommand::Set(args)) => enroll::user_set(&args),
        Command::User(UserCommand::List(args)) => enroll::user_list(&args),
        Command::User(UserCommand::Revoke(args)) => enroll::user_revoke(&args),
        Command::Device(DeviceCommand::Issue(args)) => enroll::device_issue(&args),
        Command::Device(DeviceCommand::Bind(args)) => enroll::device_bind(&args),
        Command::Device(DeviceCommand::List(args)) => enroll::device_list(&args),
        Command::Device(DeviceCommand::Revoke(args)) => enroll::device_revoke(&args),
        Command::Serve(args) => serve::serve(&args),
        Command::Call(args) => call::call(&args),
        Command::Login(args) => login::login(&args),
        Command::Logout(args) => login::logout(&args),
        Command::Doctor(args) => match doctor::doctor(&args) {
            Ok(0) => Ok(()),
            Ok(code) => return ExitCode::from(code),
            Err(e) => Err(e),
        },
        Command::Session(SessionCommand::List(args)) => session::session_list(&args),
        Command::Session(SessionCommand::Revoke(args)) => session::session_revoke(&args),
        Command::Registry(RegistryCommand::Copy(args)) => registry::copy(&args),
        Command::Keys(KeysCommand::RotateTicket(args)) => keys::rotate_ticket(&args),
        Command::Keys(KeysCommand::Rekey(args)) => keys::rekey(&args),
        Command::Bench(BenchCommand::Handshake(args)) => bench::handshake(&args),
        Command::Bench(BenchCommand::Instructions(args)) => bench::instructions(&args),
        Command::Bench(BenchCommand::InstructionsServer(args)) => bench::instructions_server(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("portcullis: {}", message.lines().next().unwrap_or("failed"));
            ExitCode::FAILURE
        }
    }
}
