//! `portcullis call`: one Echo call through the gate.

use clap::Args;
use portcullis::demo::{EchoClient, SayRequest};
use serde_json::json;

use crate::CliResult;
use crate::connect::{ConnectArgs, describe_status, runtime};

/// `portcullis call`.
#[derive(Debug, Args)]
pub(crate) struct CallArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// The text to send.
    #[arg(long, default_value = "hello")]
    text: String,
    /// Print the reply as JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) fn call(args: &CallArgs) -> CliResult {
    let source = args.connect.code_source_or_session()?;
    let client = args.connect.client(source)?;

    runtime()?.block_on(async {
        let channel = client
            .connect_lazy(&args.connect.server)
            .map_err(|e| e.to_string())?;
        let mut echo = EchoClient::new(channel);
        let reply = echo
            .say(SayRequest {
                text: args.text.clone(),
            })
            .await
            .map_err(|status| describe_status("call", &status))?
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
