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
//! | [`bench`](mod@bench) | (here) | the benchmarks of `portcullis bench handshake` and `bench instructions` |
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub use portcullis_client as client;
pub use portcullis_core as core;
pub use portcullis_server as server;
pub use portcullis_store as store;
pub use portcullis_tls as tls;

// What an integration needs, from the crate root: the server and its context, the client,
// the registries and their key, the store traits, the policy layer.
pub use portcullis_client::{Client, ClientBuilder, CodeSource, PortcullisChannel};
pub use portcullis_core::{
    Admin, AuthMethod, Clock, GateStore, MemoryRegistry, Registry, RejectCode, SessionStore,
    SystemClock, TotpAlgorithm, TotpConfig,
};
pub use portcullis_server::policy::{Policy, PolicyLayer};
pub use portcullis_server::{AuthContext, Builder as ServerBuilder, PortcullisServer};
pub use portcullis_store::{SecretKey, SqliteRegistry, StoreError};

pub mod bench;

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
