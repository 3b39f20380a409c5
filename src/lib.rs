//! # Portcullis
//!
//! Multi-factor authentication in the transport layer of gRPC (tonic) servers.
//!
//! - mTLS client certificates are **device** certificates, bound to users;
//! - inside TLS and before HTTP/2 starts, the client sends a short **Prefix** that proves a
//!   second factor (a TOTP code, or a session ticket earned by one), bound to the TLS session by
//!   the RFC 9266 exporter, with a nonce that the server remembers;
//! - connections that fail are refused before one byte of HTTP/2 is parsed, with a stable
//!   reason the client can act on;
//! - services get the authenticated user and device with every request ([`AuthContext`]).
//!
//! ## Start here
//!
//! A directory made by `portcullis init --dir pc` (see the README) holds everything; a server
//! and a client each open it in one line:
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use portcullis::{Client, PortcullisServer};
//!
//! // The server: CA, server identity, registry with its key, ticket key.
//! let portcullis = PortcullisServer::from_dir("pc")?;
//! let serving = portcullis
//!     .server()                                   // tonic's Server::builder() with the layer
//!     .add_service(portcullis::demo::service())   // your services, unchanged
//!     .serve_with_incoming(portcullis.bind("127.0.0.1:50051".parse()?).await?);
//!
//! // The client: device `laptop` of user alice, on the session `portcullis login` stored.
//! let channel = Client::from_dir("pc", "laptop", "alice")?
//!     .connect("https://localhost:50051")
//!     .await?;
//! # drop((serving, channel)); Ok(()) }
//! ```
//!
//! The same in one process, runnable as it stands: a dev PKI, user alice with TOTP, device
//! laptop, the demo Echo service behind the gate on a free loopback port, and one call.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use portcullis::core::codec::ALPN_PCS1;
//! use portcullis::core::SystemRandom;
//! use portcullis::demo::{EchoClient, SayRequest};
//! use portcullis::tls::devpki::DevCa;
//! use portcullis::{Admin, Client, Clock, CodeSource, MemoryRegistry, PortcullisServer,
//!                  SystemClock, TotpAlgorithm, TotpConfig};
//!
//! let ca = DevCa::generate("start-here CA")?;
//! let server_cert = ca.issue_server(&["localhost".into()])?;
//! let laptop = ca.issue_device("laptop")?;
//! let registry = Arc::new(MemoryRegistry::new());
//! let totp = TotpConfig::generate_secret(&SystemRandom::new(), 6, TotpAlgorithm::Sha1, 30)?;
//! registry.add_user("alice", totp.clone(), SystemClock.now_ms())?;
//! let fingerprint = portcullis::tls::fingerprint(laptop.cert_der().as_ref())?;
//! registry.bind_device("laptop", "alice", &fingerprint, SystemClock.now_ms())?;
//!
//! let portcullis = PortcullisServer::builder()
//!     .identity(vec![server_cert.cert_der()], server_cert.key_der(), &[ca.cert_der()])?
//!     .registry(registry)
//!     .build()?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let addr = listener.local_addr()?;
//! let incoming = portcullis.incoming(listener);
//! tokio::spawn(portcullis.server().add_service(portcullis::demo::service()).serve_with_incoming(incoming));
//!
//! let tls = portcullis::tls::client_config(
//!     &[ca.cert_der()], vec![laptop.cert_der()], laptop.key_der(), &[ALPN_PCS1])?;
//! let client = Client::builder()
//!     .tls_config(tls)
//!     .server_name("localhost")
//!     .user("alice")
//!     .code_source(CodeSource::secret(totp))
//!     .build()?;
//! let mut echo = EchoClient::new(client.connect(&addr.to_string()).await?);
//! let reply = echo.say(SayRequest { text: "hello".into() }).await?.into_inner();
//! assert_eq!((reply.user.as_str(), reply.auth_method.as_str()), ("alice", "totp"));
//! # Ok(()) }
//! ```
//!
//! Cargo features: `client`, `server` and `sqlite` (the SQLite registry, and `from_dir` for
//! the server) are on by default; a client-only application takes
//! `default-features = false, features = ["client"]` and compiles neither the server nor
//! SQLite. The benchmark harness of `portcullis bench` is a crate of its own
//! (`crates/bench`, `portcullis-bench`, not published).
//!
//! This crate gathers the workspace's crates:
//!
//! | module | crate | what |
//! |---|---|---|
//! | [`core`] | `portcullis-core` | sans-IO codec, decision, TOTP, nonces, tickets, lockout, the store traits |
//! | [`tls`] | `portcullis-tls` | rustls configs, PEM loading, device identity, exporter, dev PKI |
//! | [`server`] | `portcullis-server` | the acceptor and layer in front of tonic |
//! | [`client`] | `portcullis-client` | the tonic connector with the pipelined Prefix |
//! | [`store`] | `portcullis-store` | the SQLite registry |
//! | [`demo`] | (here) | the `portcullis.demo.v1.Echo` service |

#[cfg(feature = "client")]
pub use portcullis_client as client;
pub use portcullis_core as core;
#[cfg(feature = "server")]
pub use portcullis_server as server;
#[cfg(feature = "sqlite")]
pub use portcullis_store as store;
pub use portcullis_tls as tls;

// What an integration needs, from the crate root: the server and its context, the client,
// the registries and their key, the store traits, the policy layer.
#[cfg(feature = "client")]
pub use portcullis_client::{Client, ClientBuilder, CodeSource, PortcullisChannel, SessionFiles};
pub use portcullis_core::{
    Admin, AuthMethod, Clock, GateStore, MemoryRegistry, Registry, RejectCode, SessionStore,
    SystemClock, TotpAlgorithm, TotpConfig,
};
#[cfg(feature = "server")]
pub use portcullis_server::policy::{Policy, PolicyLayer};
#[cfg(feature = "server")]
pub use portcullis_server::{AuthContext, Builder as ServerBuilder, PortcullisServer};
#[cfg(feature = "sqlite")]
pub use portcullis_store::{SecretKey, SqliteRegistry, StoreError};

#[cfg(feature = "server")]
pub mod demo {
    //! The demo service `portcullis.demo.v1.Echo`, used by `portcullis serve`, the quickstart
    //! and outside tests: it answers each `Say` with the text and the identity the connection
    //! was authenticated as.

    /// The generated protobuf messages, client and server of `portcullis.demo.v1`.
    #[allow(missing_docs, clippy::all)]
    pub mod proto {
        tonic::include_proto!("portcullis.demo.v1");
    }

    /// The encoded `FileDescriptorSet` of `portcullis/demo/v1/echo.proto` (with its imports),
    /// for gRPC server reflection: give it to `tonic_reflection`'s
    /// `Builder::register_encoded_file_descriptor_set`, as `portcullis serve` does.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("portcullis_demo_v1_descriptor");

    pub use proto::echo_client::EchoClient;
    pub use proto::echo_server::{Echo, EchoServer};
    pub use proto::{SayReply, SayRequest};

    use crate::AuthContext;

    /// The Echo service: replies with the request's text, the user, the device fingerprint and
    /// the authentication method of the connection.
    #[derive(Debug, Clone, Copy, Default)]
    pub struct EchoService;

    #[tonic::async_trait]
    impl Echo for EchoService {
        async fn say(
            &self,
            request: tonic::Request<SayRequest>,
        ) -> Result<tonic::Response<SayReply>, tonic::Status> {
            let auth = AuthContext::of(&request)?.clone();
            Ok(tonic::Response::new(SayReply {
                text: request.into_inner().text,
                user: auth.user,
                device: auth.fingerprint.to_string(),
                auth_method: auth.method.as_str().to_owned(),
            }))
        }
    }

    /// The Echo service ready to add to a tonic server.
    pub fn service() -> EchoServer<EchoService> {
        EchoServer::new(EchoService)
    }
}
