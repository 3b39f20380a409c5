//! tonic's helloworld greeter with mTLS, twice: as stock tonic (`stock-server`,
//! `stock-client`) and behind Portcullis (`server`, `client`). The service is the same; the
//! binaries differ in the lines the README shows.
//!
//! Both take the directory `portcullis init` made (default `pc`) and the address as arguments.

/// The generated helloworld messages, client and server.
pub mod pb {
    #![allow(missing_docs)]
    tonic::include_proto!("helloworld");
}

use pb::greeter_server::Greeter;
use pb::{HelloReply, HelloRequest};
use tonic::{Request, Response, Status};

/// The greeter: says hello, and with Portcullis also who is calling from which device.
#[derive(Debug, Default)]
pub struct MyGreeter;

#[tonic::async_trait]
impl Greeter for MyGreeter {
    async fn say_hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloReply>, Status> {
        // Behind Portcullis every request carries the authenticated user and device.
        let who = match portcullis::AuthContext::of(&request) {
            Ok(auth) => format!(" (user {}, device {})", auth.user, auth.device_name),
            Err(_) => String::new(),
        };
        let message = format!("Hello {}!{who}", request.into_inner().name);
        Ok(Response::new(HelloReply { message }))
    }
}

/// The directory and the address from the command line: `[DIR [ADDR]]`.
pub fn args(default_addr: &str) -> (String, String) {
    let mut args = std::env::args().skip(1);
    let dir = args.next().unwrap_or_else(|| "pc".to_owned());
    let addr = args.next().unwrap_or_else(|| default_addr.to_owned());
    (dir, addr)
}
