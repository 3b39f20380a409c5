//! The greeter behind Portcullis: a bound device certificate and a second factor get in.
use greeter::MyGreeter;
use greeter::pb::greeter_server::GreeterServer;
use portcullis::PortcullisServer;
use tonic::transport::Server;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (dir, addr) = greeter::args("[::1]:50051");
    let portcullis = PortcullisServer::from_dir(dir)?;
    Server::builder()
        .layer(portcullis.layer())
        .add_service(GreeterServer::new(MyGreeter))
        .serve_with_incoming(portcullis.bind(addr.parse()?).await?)
        .await?;
    Ok(())
}
