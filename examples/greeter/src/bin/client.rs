//! The greeter's client behind Portcullis: the device certificate, and the session `portcullis
//! login` stored (or codes from PORTCULLIS_TOTP_SECRET).
use greeter::pb::HelloRequest;
use greeter::pb::greeter_client::GreeterClient;
use portcullis::Client;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (dir, addr) = greeter::args("https://[::1]:50051");
    let channel = Client::from_dir(dir, "laptop", "alice")?
        .connect(&addr)
        .await?;
    let mut client = GreeterClient::new(channel);
    let reply = client
        .say_hello(HelloRequest {
            name: "Tonic".into(),
        })
        .await?;
    println!("{}", reply.into_inner().message);
    Ok(())
}
