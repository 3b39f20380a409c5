//! `portcullis call`: one Echo call through the gate.

use clap::Args;
use portcullis::demo::{EchoClient, SayRequest};
use portcullis_client::{Client, CodeSource};
use portcullis_core::codec::ALPN_PCS1;
use portcullis_core::{TotpAlgorithm, TotpConfig};
use serde_json::json;

use crate::dir::Layout;
use crate::{CliResult, DirArg};

/// `portcullis call`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("factor").required(true).args(["code", "secret"])))]
pub(crate) struct CallArgs {
    #[command(flatten)]
    dir: DirArg,
    /// The server address, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    server: String,
    /// The device whose certificate to use (DIR/devices/NAME.pem and NAME-key.pem).
    #[arg(long, value_name = "NAME")]
    device: String,
    /// The user to authenticate as.
    #[arg(long)]
    user: String,
    /// A one-time code.
    #[arg(long, value_name = "CODE")]
    code: Option<String>,
    /// The user's TOTP secret (base32): the code is computed from it.
    #[arg(long, value_name = "BASE32")]
    secret: Option<String>,
    /// Digits of codes computed from --secret.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u8).range(6..=8))]
    digits: u8,
    /// Hash of codes computed from --secret: SHA1, SHA256 or SHA512.
    #[arg(long, default_value = "SHA1", value_parser = parse_algorithm)]
    algorithm: TotpAlgorithm,
    /// The name to check in the server certificate (default: the host of --server).
    #[arg(long, value_name = "NAME")]
    server_name: Option<String>,
    /// The text to send.
    #[arg(long, default_value = "hello")]
    text: String,
    /// Print the reply as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_algorithm(s: &str) -> Result<TotpAlgorithm, String> {
    s.parse()
        .map_err(|e: portcullis_core::TotpError| e.to_string())
}

fn host_of(server: &str) -> CliResult<String> {
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

pub(crate) fn call(args: &CallArgs) -> CliResult {
    let host = host_of(&args.server)?;
    let layout = Layout::existing(&args.dir.dir)?;
    let roots = portcullis_tls::load_certs(&layout.ca_cert()).map_err(|e| e.to_string())?;
    let cert_path = layout.device_cert(&args.device);
    let key_path = layout.device_key(&args.device);
    let chain = portcullis_tls::load_certs(&cert_path).map_err(|e| e.to_string())?;
    let key = portcullis_tls::load_key(&key_path).map_err(|e| e.to_string())?;
    let tls = portcullis_tls::client_config(&roots, chain, key, &[ALPN_PCS1])
        .map_err(|e| e.to_string())?;
    let source = match (&args.code, &args.secret) {
        (Some(code), None) => {
            if !(6..=8).contains(&code.len()) || !code.bytes().all(|b| b.is_ascii_digit()) {
                return Err("--code: a one-time code is 6 to 8 digits".into());
            }
            CodeSource::fixed(code.clone())
        }
        (None, Some(secret)) => CodeSource::secret(
            TotpConfig::from_base32(
                secret,
                args.digits,
                args.algorithm,
                TotpConfig::DEFAULT_PERIOD,
            )
            .map_err(|e| format!("--secret: {e}"))?,
        ),
        _ => return Err("give exactly one of --code and --secret".into()),
    };
    let client = Client::builder()
        .tls_config(tls)
        .server_name(args.server_name.clone().unwrap_or(host))
        .user(args.user.clone())
        .code_source(source)
        .build()
        .map_err(|e| e.to_string())?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    runtime.block_on(async {
        let channel = client
            .connect_lazy(&args.server)
            .map_err(|e| e.to_string())?;
        let mut echo = EchoClient::new(channel);
        let reply = echo
            .say(SayRequest {
                text: args.text.clone(),
            })
            .await
            .map_err(|status| describe_status(&status))?
            .into_inner();
        if args.json {
            let out = json!({
                "text": reply.text,
                "user": reply.user,
                "device": reply.device,
                "auth_method": reply.auth_method,
            });
            out!("{out}");
        } else {
            out!(
                "{}  (user {}, device {}, via {})",
                reply.text,
                reply.user,
                reply.device,
                reply.auth_method
            );
        }
        Ok(())
    })
}

/// One line: the gRPC code, the reject name and the message, and the REF to find the server's
/// audit record.
fn describe_status(status: &tonic::Status) -> String {
    let reject = status
        .metadata()
        .get("portcullis-reject")
        .and_then(|v| v.to_str().ok());
    let reference = status
        .metadata()
        .get("portcullis-ref")
        .and_then(|v| v.to_str().ok());
    let mut line = format!(
        "call failed: {:?} ({})",
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
