//! The greeter with stock tonic mTLS: any certificate of the CA gets in.
use greeter::MyGreeter;
use greeter::pb::greeter_server::GreeterServer;
use std::fs;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (dir, addr) = greeter::args("[::1]:50051");
    let identity = Identity::from_pem(
        fs::read(format!("{dir}/server.pem"))?,
        fs::read(format!("{dir}/server-key.pem"))?,
    );
    let ca = Certificate::from_pem(fs::read(format!("{dir}/ca.pem"))?);
    Server::builder()
        .tls_config(ServerTlsConfig::new().identity(identity).client_ca_root(ca))?
        .add_service(GreeterServer::new(MyGreeter))
        .serve(addr.parse()?)
        .await?;
    Ok(())
}
