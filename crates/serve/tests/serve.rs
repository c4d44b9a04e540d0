//! The serve loop over real sockets on 127.0.0.1: HTTPS with a certificate made
//! here, the limits against slow and oversized clients, and graceful shutdown.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use twofold_serve::{Config, Tls};

/// Longest a test waits for something that should happen well before.
const WAIT: Duration = Duration::from_secs(5);

/// A CA certificate (PEM) and a leaf for localhost and 127.0.0.1 it signed
/// (certificate PEM, key PEM).
struct Pki {
    ca: String,
    cert: String,
    key: String,
}

fn new_pki() -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("test set-up");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("test set-up"))
        .expect("test set-up");
    let leaf_key = KeyPair::generate().expect("test set-up");
    let leaf = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .expect("test set-up")
        .signed_by(&leaf_key, &ca)
        .expect("test set-up");
    Pki {
        ca: ca.pem(),
        cert: leaf.pem(),
        key: leaf_key.serialize_pem(),
    }
}

/// `/healthz`, and `/slow`, which says it has started on `entered` and then
/// takes 300 ms.
fn app(entered: Arc<Notify>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/slow",
            get(move || async move {
                entered.notify_one();
                tokio::time::sleep(Duration::from_millis(300)).await;
                "done"
            }),
        )
}

struct Running {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
    /// Notified when `/slow` starts.
    entered: Arc<Notify>,
}

async fn start(config: Config) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("test set-up");
    let addr = listener.local_addr().expect("test set-up");
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let entered = Arc::new(Notify::new());
    let router = app(entered.clone());
    let task =
        tokio::spawn(async move { twofold_serve::serve(listener, router, &config, token).await });
    Running {
        addr,
        shutdown,
        task,
        entered,
    }
}

fn tls_from(dir: &Path, pki: &Pki) -> Tls {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, &pki.cert).expect("test set-up");
    std::fs::write(&key, &pki.key).expect("test set-up");
    Tls::from_pem_files(&cert, &key).expect("test set-up")
}

fn client_trusting(ca_pem: &str) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("test set-up");
    reqwest::Client::builder()
        .tls_certs_only([ca])
        .timeout(WAIT)
        .build()
        .expect("test set-up")
}

/// Read until the server closes the connection, or fail after `within`.
/// Returns what was read and how long it took.
async fn until_closed(stream: &mut TcpStream, within: Duration) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = within.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (got, started.elapsed()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the server kept the connection open for {within:?}"),
        }
    }
}

#[tokio::test]
async fn https_answers_with_a_certificate_the_client_trusts() {
    let dir = tempfile::tempdir().unwrap();
    let pki = new_pki();
    let server = start(Config {
        tls: Some(tls_from(dir.path(), &pki)),
        ..Config::default()
    })
    .await;
    let url = format!("https://127.0.0.1:{}/healthz", server.addr.port());
    let reply = client_trusting(&pki.ca).get(&url).send().await.unwrap();
    assert_eq!(reply.status(), 200);
    assert_eq!(reply.text().await.unwrap(), "ok");
    let localhost = format!("https://localhost:{}/healthz", server.addr.port());
    let reply = client_trusting(&pki.ca)
        .get(&localhost)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);

    // Another CA's client refuses the certificate; plain HTTP gets no answer.
    let other = new_pki();
    assert!(client_trusting(&other.ca).get(&url).send().await.is_err());
    let plain = format!("http://127.0.0.1:{}/healthz", server.addr.port());
    assert!(client_trusting(&pki.ca).get(&plain).send().await.is_err());
}

#[test]
fn a_missing_or_mismatched_key_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let pki = new_pki();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, &pki.cert).unwrap();
    let err = Tls::from_pem_files(&cert, &key).unwrap_err().to_string();
    assert!(err.starts_with("cannot read private key file"), "{err}");
    // The key of another certificate does not fit this one.
    std::fs::write(&key, new_pki().key).unwrap();
    let err = Tls::from_pem_files(&cert, &key).unwrap_err().to_string();
    assert!(err.starts_with("certificate and key do not"), "{err}");
    // A key file where the certificate should be holds no certificate.
    std::fs::write(&key, &pki.key).unwrap();
    let err = Tls::from_pem_files(&key, &key).unwrap_err().to_string();
    assert!(err.starts_with("no certificate in"), "{err}");
}

#[tokio::test]
async fn a_client_trickling_its_headers_is_disconnected() {
    let server = start(Config {
        header_read_timeout: Duration::from_millis(200),
        ..Config::default()
    })
    .await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\n")
        .await
        .unwrap();
    // One header line every 50 ms, never the blank line that ends the head.
    let started = Instant::now();
    let closed = loop {
        let line = format!("x-trickle-{}: a\r\n", started.elapsed().as_millis());
        if stream.write_all(line.as_bytes()).await.is_err() {
            break started.elapsed();
        }
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(Duration::from_millis(50), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break started.elapsed(),
            // hyper may answer 408 before closing; keep reading until closed.
            Ok(Ok(_)) => {}
            Err(_) => {}
        }
        assert!(started.elapsed() < WAIT, "still connected after {WAIT:?}");
    };
    assert!(
        closed >= Duration::from_millis(150),
        "closed too early: {closed:?}"
    );
    assert!(closed < Duration::from_secs(2), "closed late: {closed:?}");

    // A prompt client on the same server is served.
    let reply = reqwest::get(format!("http://{}/healthz", server.addr))
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
}

#[tokio::test]
async fn a_stalled_tls_handshake_is_disconnected() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(Config {
        tls: Some(tls_from(dir.path(), &new_pki())),
        header_read_timeout: Duration::from_millis(200),
        ..Config::default()
    })
    .await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    // Half a TLS record header, then nothing.
    stream.write_all(&[0x16, 0x03]).await.unwrap();
    let (_, took) = until_closed(&mut stream, WAIT).await;
    assert!(took < Duration::from_secs(2), "closed late: {took:?}");
}

#[tokio::test]
async fn a_silent_connection_is_closed_when_idle() {
    let server = start(Config {
        idle_timeout: Duration::from_millis(200),
        ..Config::default()
    })
    .await;
    // A kept-alive connection that sends one request, then nothing.
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    let (got, took) = until_closed(&mut stream, WAIT).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        took >= Duration::from_millis(150),
        "closed too early: {took:?}"
    );
    assert!(took < Duration::from_secs(2), "closed late: {took:?}");
}

#[tokio::test]
async fn oversized_or_too_many_headers_are_refused() {
    let server = start(Config {
        max_header_bytes: 8 * 1024,
        max_headers: 16,
        ..Config::default()
    })
    .await;
    let big = format!(
        "GET /healthz HTTP/1.1\r\nhost: t\r\nx-big: {}\r\n\r\n",
        "a".repeat(16 * 1024)
    );
    let mut many = String::from("GET /healthz HTTP/1.1\r\nhost: t\r\n");
    for i in 0..32 {
        many.push_str(&format!("x-{i}: a\r\n"));
    }
    many.push_str("\r\n");
    for request in [big, many] {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        // The server may close before it has read everything.
        let _ = stream.write_all(request.as_bytes()).await;
        let (got, _) = until_closed(&mut stream, WAIT).await;
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 431"), "{text}");
    }
    // Within the limits, the same server answers.
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let (got, _) = until_closed(&mut stream, WAIT).await;
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn shutdown_finishes_the_request_in_flight_then_returns() {
    let server = start(Config::default()).await;
    let url = format!("http://{}/slow", server.addr);
    let request = tokio::spawn(async move { reqwest::get(url).await?.text().await });
    // Once the request is being handled, ask the server to stop.
    tokio::time::timeout(WAIT, server.entered.notified())
        .await
        .unwrap();
    server.shutdown.cancel();
    let answer = tokio::time::timeout(WAIT, request)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(answer, "done");
    tokio::time::timeout(WAIT, server.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // New connections are refused once it has returned.
    assert!(TcpStream::connect(server.addr).await.is_err());
}
