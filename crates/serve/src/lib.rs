//! The HTTP(S) serve loop both planes run: plain HTTP or TLS (rustls) on one
//! listener, connection limits against slow or oversized clients, and graceful
//! shutdown.
//!
//! It knows nothing about either plane: each hands over its axum `Router`, its
//! [`Config`] and its shutdown token. Keeping it in its own crate lets both
//! planes share one loop while the data plane still never depends on the
//! control plane.
//!
//! The limits, per connection:
//! - a request head (request line and headers) must arrive within
//!   `header_read_timeout`; hyper starts that timer whenever the connection
//!   waits for a head, so it also bounds how long a kept-alive connection may sit
//!   between requests. The TLS handshake gets the same time.
//! - a head larger than `max_header_bytes`, or with more than `max_headers`
//!   fields, is answered `431` and the connection closed.
//! - a connection that moves no byte either way for `idle_timeout` is closed,
//!   which also ends a body trickled in slowly.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Time a client has to send a request head (and to finish a TLS handshake).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a connection may move no byte before it is closed. Longer than the
/// control plane's feed heartbeat, so a quiet change stream stays open.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest request head accepted. Hyper cannot go below 8 KiB.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 16 * 1024;
/// Most header fields accepted in one request.
pub const DEFAULT_MAX_HEADERS: usize = 64;
/// The smallest `max_header_bytes` hyper accepts.
pub const MIN_MAX_HEADER_BYTES: usize = 8 * 1024;

/// How a plane serves HTTP: with TLS or not, and its connection limits.
#[derive(Debug, Clone)]
pub struct Config {
    /// Serve HTTPS with this certificate; plain HTTP when `None`.
    pub tls: Option<Tls>,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    /// Raised to [`MIN_MAX_HEADER_BYTES`] if set lower.
    pub max_header_bytes: usize,
    pub max_headers: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            tls: None,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
        }
    }
}

/// Why a certificate and key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate file {path}: {reason}")]
    Certificate { path: PathBuf, reason: String },
    #[error("no certificate in {0}")]
    NoCertificate(PathBuf),
    #[error("cannot read private key file {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("certificate and key do not make a TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// A server certificate chain and its private key, ready to accept TLS.
#[derive(Clone)]
pub struct Tls {
    config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for Tls {
    /// Never the key; the configuration holds it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").finish_non_exhaustive()
    }
}

impl Tls {
    /// Load a PEM certificate chain (leaf first) and a PEM private key (PKCS#8,
    /// PKCS#1 or SEC1).
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Tls, TlsError> {
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| TlsError::Certificate {
                path: cert.to_owned(),
                reason: e.to_string(),
            })?;
        if chain.is_empty() {
            return Err(TlsError::NoCertificate(cert.to_owned()));
        }
        // The pem error names the file problem, never the key's bytes.
        let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
            path: key.to_owned(),
            reason: e.to_string(),
        })?;
        Tls::new(chain, key_der)
    }

    /// A TLS 1.2/1.3 server configuration on aws-lc-rs (the provider reqwest's
    /// rustls uses too), offering HTTP/1.1 only.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Tls, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls {
            config: Arc::new(config),
        })
    }
}

/// Serve `app` on `listener` until `shutdown` is cancelled; then stop accepting,
/// let every open connection finish its request in flight, and return.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    config: &Config,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let addr = listener.local_addr()?;
    announce(addr, config.tls.is_some());
    let acceptor = config
        .tls
        .as_ref()
        .map(|t| TlsAcceptor::from(t.config.clone()));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .max_buf_size(config.max_header_bytes.max(MIN_MAX_HEADER_BYTES))
        .max_headers(config.max_headers)
        .keep_alive(true);
    let limits = Limits {
        http,
        handshake_timeout: config.header_read_timeout,
        idle_timeout: config.idle_timeout,
    };
    let tracker = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::error!(error = %e, "cannot accept a connection");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        () = shutdown.cancelled() => break,
                    }
                }
            },
            () = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let limits = limits.clone();
        let shutdown = shutdown.clone();
        let acceptor = acceptor.clone();
        tracker.spawn(async move {
            match acceptor {
                None => connection(stream, peer, app, &limits, &shutdown).await,
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(limits.handshake_timeout, acceptor.accept(stream));
                    let stream = tokio::select! {
                        done = handshake => match done {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "TLS handshake timed out");
                                return;
                            }
                        },
                        () = shutdown.cancelled() => return,
                    };
                    connection(stream, peer, app, &limits, &shutdown).await;
                }
            }
        });
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
    Ok(())
}

fn announce(addr: SocketAddr, tls: bool) {
    if tls {
        tracing::info!(%addr, "serving HTTPS");
    } else if addr.ip().is_loopback() {
        tracing::info!(%addr, "serving plain HTTP on a loopback address");
    } else {
        tracing::warn!(
            %addr,
            "serving plain HTTP on a non-loopback address: tokens and codes cross the network \
             in clear; give a certificate and key (--tls-cert, --tls-key) or put a TLS proxy in front"
        );
    }
}

/// Errors that concern one connection only, after which accepting goes on.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

#[derive(Clone)]
struct Limits {
    http: http1::Builder,
    handshake_timeout: Duration,
    idle_timeout: Duration,
}

/// Serve one connection until it closes, stays idle too long, or shutdown asks
/// it to finish its request in flight.
async fn connection<I>(
    io: I,
    peer: SocketAddr,
    app: Router,
    limits: &Limits,
    shutdown: &CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let watched = Watched::new(io);
    let activity = watched.activity.clone();
    let conn = limits
        .http
        .serve_connection(TokioIo::new(watched), TowerToHyperService::new(app));
    tokio::pin!(conn);
    let mut finishing = false;
    loop {
        tokio::select! {
            done = conn.as_mut() => {
                if let Err(e) = done {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            () = shutdown.cancelled(), if !finishing => {
                conn.as_mut().graceful_shutdown();
                finishing = true;
            }
            () = activity.idle_for(limits.idle_timeout) => {
                tracing::debug!(%peer, "idle connection closed");
                return;
            }
        }
    }
}

/// When a connection last moved a byte, in milliseconds since it opened.
struct Activity {
    opened: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = self.opened.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolve once nothing has moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.opened + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// An I/O stream that records when it last read or wrote a byte.
struct Watched<I> {
    inner: I,
    activity: Arc<Activity>,
}

impl<I> Watched<I> {
    fn new(inner: I) -> Watched<I> {
        Watched {
            inner,
            activity: Arc::new(Activity {
                opened: Instant::now(),
                last_ms: AtomicU64::new(0),
            }),
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &polled
            && *n > 0
        {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &polled
            && *n > 0
        {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
