//! A small PCS1 server for the client's tests: TLS 1.3 with a required client certificate and
//! ALPN `portcullis/1`, one Prefix read exactly, a scripted Verdict, then a real tonic server
//! (the gRPC health service) on accepted connections.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use portcullis_core::RejectCode;
use portcullis_core::codec::{
    ALPN_PCS1, Factor, FrameKind, FrameReader, HEADER_LEN, Prefix, Progress, Verdict,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::UnboundedReceiverStream;

/// The HTTP/2 client connection preface.
pub const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A CA, a server certificate for localhost / 127.0.0.1 and a client (device) certificate.
pub struct Pki {
    pub ca: CertificateDer<'static>,
    server: (CertificateDer<'static>, Vec<u8>),
    client: (CertificateDer<'static>, Vec<u8>),
}

impl Pki {
    pub fn new() -> Self {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        static CA_SERIAL: AtomicUsize = AtomicUsize::new(0);
        let serial = CA_SERIAL.fetch_add(1, Ordering::SeqCst);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("portcullis test CA {serial}"));
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

        let server_key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server = params.signed_by(&server_key, &ca).unwrap();

        let client_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "alice-laptop");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client = params.signed_by(&client_key, &ca).unwrap();

        Self {
            ca: ca.der().clone(),
            server: (server.der().clone(), server_key.serialize_der()),
            client: (client.der().clone(), client_key.serialize_der()),
        }
    }

    fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.clone()).unwrap();
        roots
    }

    pub fn server_config(&self) -> Arc<ServerConfig> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(self.roots()), provider())
                .build()
                .unwrap();
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![self.server.0.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server.1.clone())),
            )
            .unwrap();
        config.alpn_protocols = vec![ALPN_PCS1.to_vec()];
        Arc::new(config)
    }

    /// The device's client config (no ALPN: the client sets it).
    pub fn client_config(&self) -> Arc<ClientConfig> {
        Arc::new(
            ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(self.roots())
                .with_client_auth_cert(
                    vec![self.client.0.clone()],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.client.1.clone())),
                )
                .unwrap(),
        )
    }

    /// A client config that trusts the CA but has no client certificate.
    pub fn client_config_without_cert(&self) -> Arc<ClientConfig> {
        Arc::new(
            ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(self.roots())
                .with_no_client_auth(),
        )
    }
}

/// How the server answers one connection.
#[derive(Debug, Clone)]
pub enum Answer {
    /// A code is accepted with a new ticket; a ticket is accepted if the server issued it and
    /// no ticket refusal is pending, else MFA_REQUIRED.
    Normal,
    /// A rejection with this code, hint and RETRY_AFTER.
    Reject(RejectCode, &'static str, Option<u32>),
    /// Accept (as `Normal`), then close the connection at once.
    AcceptThenDrop,
    /// Read the Prefix and never answer; the connection stays open until the client closes it.
    Silent,
}

/// What the server saw on one connection.
#[derive(Debug, Clone)]
pub struct Seen {
    pub prefix: Prefix,
    pub exporter: [u8; 32],
    /// The HTTP/2 preface was readable right behind the Prefix before the Verdict was written.
    pub preface_before_verdict: bool,
    /// The first TLS record of application data held the whole Prefix and, right behind it,
    /// the HTTP/2 preface: they left the client in one record (so in one write).
    pub preface_in_prefix_record: bool,
    pub verdict: Verdict,
}

#[derive(Default)]
pub struct State {
    pub seen: Mutex<Vec<Seen>>,
    pub plan: Mutex<VecDeque<Answer>>,
    pub refuse_tickets: AtomicUsize,
    pub issued: Mutex<Vec<Vec<u8>>>,
    pub tls_failures: AtomicUsize,
    /// Connections whose Prefix was read and never answered ([`Answer::Silent`]).
    pub unanswered: AtomicUsize,
    /// Notified (one permit) whenever a Prefix was read, before the server waits for the
    /// HTTP/2 preface behind it.
    pub prefix_read: Notify,
    /// How many of the next calls are refused with `step_up_required` (as a server's policy
    /// does), before any service sees them.
    pub step_up: AtomicUsize,
    /// How many calls were refused so.
    pub stepped_up: AtomicUsize,
    next_ref: AtomicU64,
}

impl State {
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn plan(&self, answers: impl IntoIterator<Item = Answer>) {
        self.plan.lock().unwrap().extend(answers);
    }

    /// The Verdict and whether to drop the connection after it; `None`: do not answer.
    fn decide(&self, prefix: &Prefix, exporter: &[u8; 32]) -> Option<(Verdict, bool)> {
        let answer = self
            .plan
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Answer::Normal);
        if matches!(answer, Answer::Silent) {
            return None;
        }
        Some(self.answer(answer, prefix, exporter))
    }

    fn answer(&self, answer: Answer, prefix: &Prefix, exporter: &[u8; 32]) -> (Verdict, bool) {
        let n = self.next_ref.fetch_add(1, Ordering::SeqCst) + 1;
        let mut reference = [0u8; 16];
        reference[8..].copy_from_slice(&n.to_be_bytes());
        reference[0] = 0xa5;
        let now = now_ms();
        if prefix.binding != *exporter {
            return (
                Verdict::reject(
                    RejectCode::BindingMismatch,
                    "not this connection",
                    now,
                    reference,
                    None,
                ),
                false,
            );
        }
        let drop_after = matches!(answer, Answer::AcceptThenDrop);
        if let Answer::Reject(code, hint, retry) = answer {
            return (Verdict::reject(code, hint, now, reference, retry), false);
        }
        match &prefix.factor {
            Factor::Totp(_) => {
                let ticket = format!("TICKET-{n:04}-0123456789abcdef").into_bytes();
                self.issued.lock().unwrap().push(ticket.clone());
                (
                    Verdict::accept(now, reference, Some((ticket, now + 3_600_000))),
                    drop_after,
                )
            }
            Factor::Session(ticket) => {
                let refuse = self
                    .refuse_tickets
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                if refuse || !self.issued.lock().unwrap().contains(ticket) {
                    (
                        Verdict::reject(
                            RejectCode::MfaRequired,
                            "the session is no longer valid: enter a code",
                            now,
                            reference,
                            None,
                        ),
                        false,
                    )
                } else {
                    (Verdict::accept(now, reference, None), drop_after)
                }
            }
            // A factor this fake server does not know.
            _ => (
                Verdict::reject(
                    RejectCode::Unsupported,
                    "unknown factor",
                    now,
                    reference,
                    None,
                ),
                false,
            ),
        }
    }
}

/// The accepted stream, with the bytes the gate read past the Prefix put back in front.
pub struct Gated {
    front: Vec<u8>,
    pos: usize,
    inner: TlsStream<TcpStream>,
}

impl AsyncRead for Gated {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.front.len() {
            let n = buf.remaining().min(self.front.len() - self.pos);
            let start = self.pos;
            buf.put_slice(&self.front[start..start + n]);
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Gated {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Gated {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub state: Arc<State>,
    pub reporter: tonic_health::server::HealthReporter,
}

impl TestServer {
    pub async fn start(pki: &Pki) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let acceptor = TlsAcceptor::from(pki.server_config());
        let (tx, rx) = mpsc::unbounded_channel::<Result<Gated, io::Error>>();
        let (reporter, health) = tonic_health::server::health_reporter();
        let policy = state.clone();
        tokio::spawn(
            tonic::transport::Server::builder()
                .layer(tonic::service::InterceptorLayer::new(
                    move |request: tonic::Request<()>| {
                        let refuse = policy
                            .step_up
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                            .is_ok();
                        if !refuse {
                            return Ok(request);
                        }
                        policy.stepped_up.fetch_add(1, Ordering::SeqCst);
                        let mut status = tonic::Status::unauthenticated(
                            "step_up_required: this call needs a one-time code from the last 60 s",
                        );
                        status.metadata_mut().insert(
                            "portcullis-reject",
                            tonic::metadata::MetadataValue::from_static("step_up_required"),
                        );
                        Err(status)
                    },
                ))
                .add_service(health)
                .serve_with_incoming(UnboundedReceiverStream::new(rx)),
        );
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(gate(tcp, acceptor.clone(), st.clone(), tx.clone()));
            }
        });
        Self {
            addr,
            state,
            reporter,
        }
    }

    pub fn addr(&self) -> String {
        self.addr.to_string()
    }
}

async fn gate(
    tcp: TcpStream,
    acceptor: TlsAcceptor,
    state: Arc<State>,
    tx: mpsc::UnboundedSender<Result<Gated, io::Error>>,
) {
    tcp.set_nodelay(true).unwrap();
    let mut tls = match acceptor.accept(tcp).await {
        Ok(tls) => tls,
        Err(_) => {
            state.tls_failures.fetch_add(1, Ordering::SeqCst);
            return;
        }
    };
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(ALPN_PCS1));
    let exporter = portcullis_tls::exporter(tls.get_ref().1).unwrap();

    // The first record of application data, exactly as rustls decrypted it: rustls keeps the
    // plaintext of each record as a chunk of its own, and `fill_buf` returns the first one.
    let first_record = match tls.fill_buf().await {
        Ok(chunk) if !chunk.is_empty() => chunk.to_vec(),
        _ => return,
    };
    tls.consume(first_record.len());
    let mut front = first_record.clone();
    if read_at_least(&mut tls, &mut front, HEADER_LEN)
        .await
        .is_err()
    {
        return;
    }
    // The frame reader takes the header from what came, then says how long the Prefix is.
    let mut reader = FrameReader::new(FrameKind::Prefix);
    reader.unfilled().copy_from_slice(&front[..HEADER_LEN]);
    if reader.filled(HEADER_LEN).unwrap() == Progress::More {
        let prefix_len = HEADER_LEN + reader.unfilled().len();
        read_at_least(&mut tls, &mut front, prefix_len)
            .await
            .unwrap();
        let body = &front[HEADER_LEN..prefix_len];
        reader.unfilled().copy_from_slice(body);
        assert_eq!(reader.filled(body.len()).unwrap(), Progress::Done);
    }
    let prefix_len = reader.frame().len();
    let prefix = Prefix::decode_body(reader.body()).unwrap();
    state.prefix_read.notify_one();
    let preface_in_prefix_record =
        first_record.get(prefix_len..prefix_len + H2_PREFACE.len()) == Some(H2_PREFACE.as_slice());

    // Before answering, wait for the bytes the client pipelined behind the Prefix.
    let preface_before_verdict = matches!(
        tokio::time::timeout(
            Duration::from_secs(20),
            read_at_least(&mut tls, &mut front, prefix_len + H2_PREFACE.len())
        )
        .await,
        Ok(Ok(()))
    ) && front[prefix_len..].starts_with(H2_PREFACE);
    // What followed the Prefix goes to HTTP/2 first.
    let after_prefix = front.split_off(prefix_len);

    let Some((verdict, drop_after)) = state.decide(&prefix, &exporter) else {
        state.unanswered.fetch_add(1, Ordering::SeqCst);
        let mut sink = [0u8; 4096];
        while let Ok(n) = tls.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
        return;
    };
    state.seen.lock().unwrap().push(Seen {
        prefix,
        exporter,
        preface_before_verdict,
        preface_in_prefix_record,
        verdict: verdict.clone(),
    });
    tls.write_all(&verdict.encode().unwrap()).await.unwrap();
    tls.flush().await.unwrap();

    if verdict.is_accepted() && !drop_after {
        let _ = tx.send(Ok(Gated {
            front: after_prefix,
            pos: 0,
            inner: tls,
        }));
        return;
    }
    // Refused (or accepted-then-dropped): close, after letting the client read the Verdict and
    // close its side, so that no reset overtakes the Verdict.
    let _ = tls.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let mut sink = [0u8; 4096];
        while let Ok(n) = tls.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// Reads from `tls` onto the end of `buf` until it holds at least `len` bytes.
async fn read_at_least(
    tls: &mut TlsStream<TcpStream>,
    buf: &mut Vec<u8>,
    len: usize,
) -> io::Result<()> {
    let mut chunk = [0u8; 4096];
    while buf.len() < len {
        let n = tls.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(())
}
