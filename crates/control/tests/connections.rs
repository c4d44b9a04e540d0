//! The control plane's connection limits over a raw socket: a client that
//! trickles its headers is disconnected within the header timeout, and an
//! oversized head is refused, while the same server keeps serving others.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use twofold_control::state::Clock;

/// Read until the server closes the connection; what was read and how long it
/// took. Fails if the connection is still open after [`WAIT`].
async fn until_closed(stream: &mut TcpStream) -> (String, Duration) {
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = WAIT.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return (
                    String::from_utf8_lossy(&got).into_owned(),
                    started.elapsed(),
                );
            }
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the connection is still open after {WAIT:?}"),
        }
    }
}

/// The server still answers a well-behaved client.
async fn assert_still_serving(server: &TestServer) {
    let reply = server
        .client
        .get(server.url("/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(reply.status(), 200);
}

fn addr(server: &TestServer) -> String {
    server.base.trim_start_matches("http://").to_owned()
}

#[tokio::test]
async fn a_client_trickling_its_headers_is_disconnected() {
    let server = TestServer::start_with(Clock::system(), None, |config| {
        config.http.header_read_timeout = Duration::from_millis(200);
    })
    .await;
    let mut stream = TcpStream::connect(addr(&server)).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    // A header line every 50 ms, never the blank line that ends the head.
    let closed = loop {
        let line = format!("x-slow-{}: a\r\n", started.elapsed().as_millis());
        if stream.write_all(line.as_bytes()).await.is_err() {
            break started.elapsed();
        }
        let mut buf = [0u8; 512];
        match tokio::time::timeout(Duration::from_millis(50), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break started.elapsed(),
            Ok(Ok(_)) | Err(_) => {}
        }
        assert!(started.elapsed() < WAIT, "still connected after {WAIT:?}");
    };
    assert!(
        closed >= Duration::from_millis(150),
        "closed too early: {closed:?}"
    );
    assert!(closed < Duration::from_secs(2), "closed late: {closed:?}");

    assert_still_serving(&server).await;
}

#[tokio::test]
async fn an_oversized_head_is_refused() {
    let server = TestServer::start_system_clock().await;
    let mut stream = TcpStream::connect(addr(&server)).await.unwrap();
    let request = format!(
        "GET /healthz HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let _ = stream.write_all(request.as_bytes()).await;
    let (got, _) = until_closed(&mut stream).await;
    assert!(got.starts_with("HTTP/1.1 431"), "{got}");

    assert_still_serving(&server).await;
}
