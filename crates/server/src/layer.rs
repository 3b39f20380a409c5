//! The tower layer that gives every request its [`AuthContext`].

use std::task::{Context, Poll};

use http::{Request, Response};
use tonic::body::Body;
use tower::{Layer, Service};

use crate::context::{AuthContext, PortcullisConnectInfo};

/// A tower layer for tonic's `Server::layer`: it moves the connection's
/// [`PortcullisConnectInfo`] into two request extensions, [`AuthContext`] and tonic's own
/// `TlsConnectInfo<TcpConnectInfo>` (so `request.peer_certs()` and `request.remote_addr()`
/// work). A request without Portcullis connection information is answered UNAUTHENTICATED and
/// never reaches a service (fail closed).
#[derive(Debug, Clone, Copy, Default)]
pub struct AuthLayer;

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService { inner }
    }
}

/// The service made by [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S> Service<Request<Body>> for AuthService<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let Some(info) = request.extensions_mut().remove::<PortcullisConnectInfo>() else {
            let status =
                tonic::Status::unauthenticated("no Portcullis authentication on this connection");
            return Box::pin(async move { Ok(status.into_http()) });
        };
        let auth: AuthContext = (*info.auth).clone();
        request.extensions_mut().insert(info.tls);
        request.extensions_mut().insert(auth);
        // Call the service that poll_ready readied, and keep a fresh clone for the next call.
        let clone = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, clone);
        Box::pin(ready.call(request))
    }
}
