//! A small HTTP/1.1 client on hyper: one keep-alive connection per [`Conn`],
//! opened lazily and reopened after an error. The load generator gives each
//! worker its own `Conn`, so connections are never shared or pooled.

use std::net::SocketAddr;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;

/// An answer: status and the whole body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON, if the status is `expected`.
    pub fn json<T: DeserializeOwned>(&self, expected: StatusCode) -> anyhow::Result<T> {
        if self.status != expected {
            bail!(
                "expected {expected}, got {}: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            );
        }
        serde_json::from_slice(&self.body).context("unexpected JSON in the answer")
    }
}

/// `Bearer <token>` as a header value.
pub fn bearer(token: &str) -> anyhow::Result<HeaderValue> {
    HeaderValue::from_str(&format!("Bearer {token}")).context("token is not a valid header")
}

/// The socket address in `http://ADDR`.
pub fn addr_of(base: &str) -> anyhow::Result<SocketAddr> {
    base.trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .with_context(|| format!("not an http://IP:PORT address: {base}"))
}

/// One keep-alive connection to `addr`.
#[derive(Debug)]
pub struct Conn {
    addr: SocketAddr,
    host: HeaderValue,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Conn {
    pub fn new(addr: SocketAddr) -> Conn {
        let host = HeaderValue::from_str(&addr.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        Conn {
            addr,
            host,
            sender: None,
        }
    }

    /// Open the connection now rather than on the first request.
    pub async fn connect(&mut self) -> anyhow::Result<()> {
        if self.sender.is_none() {
            let stream = TcpStream::connect(self.addr)
                .await
                .with_context(|| format!("cannot connect to {}", self.addr))?;
            // Requests are small and answered one at a time: never wait for Nagle.
            stream.set_nodelay(true)?;
            let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(async move {
                // Ends when the sender is dropped or the peer closes.
                let _ = connection.await;
            });
            self.sender = Some(sender);
        }
        Ok(())
    }

    /// Send one request and read the whole answer. On any error the connection
    /// is dropped, and the next request opens a new one.
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        auth: Option<&HeaderValue>,
        body: Option<Bytes>,
    ) -> anyhow::Result<Reply> {
        let result = self.try_send(method, path, auth, body).await;
        if result.is_err() {
            self.sender = None;
        }
        result
    }

    async fn try_send(
        &mut self,
        method: Method,
        path: &str,
        auth: Option<&HeaderValue>,
        body: Option<Bytes>,
    ) -> anyhow::Result<Reply> {
        self.connect().await?;
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, self.host.clone());
        if let Some(auth) = auth {
            request = request.header(AUTHORIZATION, auth.clone());
        }
        if body.is_some() {
            request = request.header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        let request = request.body(Full::new(body.unwrap_or_default()))?;
        let sender = self.sender.as_mut().context("no connection")?;
        sender.ready().await?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok(Reply { status, body })
    }

    pub async fn get(&mut self, path: &str, auth: Option<&HeaderValue>) -> anyhow::Result<Reply> {
        self.send(Method::GET, path, auth, None).await
    }

    pub async fn post(
        &mut self,
        path: &str,
        auth: Option<&HeaderValue>,
        body: &serde_json::Value,
    ) -> anyhow::Result<Reply> {
        let body = Bytes::from(serde_json::to_vec(body)?);
        self.send(Method::POST, path, auth, Some(body)).await
    }
}
