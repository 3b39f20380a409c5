//! The greeter's client with stock tonic mTLS: the device certificate, nothing else.
use greeter::pb::HelloRequest;
use greeter::pb::greeter_client::GreeterClient;
use std::fs;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (dir, addr) = greeter::args("https://[::1]:50051");
    let identity = Identity::from_pem(
        fs::read(format!("{dir}/devices/laptop.pem"))?,
        fs::read(format!("{dir}/devices/laptop-key.pem"))?,
    );
    let ca = Certificate::from_pem(fs::read(format!("{dir}/ca.pem"))?);
    let channel = Channel::from_shared(addr)?
        .tls_config(ClientTlsConfig::new().ca_certificate(ca).identity(identity))?
        .connect()
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
