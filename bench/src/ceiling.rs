//! The ceiling: a bare axum server, on the same stack as Twofold's planes
//! (tokio's default multi-threaded runtime, `axum::serve`), that answers
//! `POST /v1/verify` with a constant `{"valid":false}` after reading the body.
//! It runs as a child process (`twofold-bench ceiling-server`), pinned like the
//! data plane, so Twofold's throughput can be put next to what the machine can
//! do at all with the same framework and the same load generator.

use axum::Router;
use axum::body::Bytes;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::post;

/// The line the server prints before its address.
pub const READY_PREFIX: &str = "twofold-bench ceiling listening on http://";

async fn verify(body: Bytes) -> impl IntoResponse {
    // Read, never looked at: the same work up to the handler as Twofold's.
    drop(body);
    ([(CONTENT_TYPE, "application/json")], r#"{"valid":false}"#)
}

/// Serve on `127.0.0.1:0` until killed, or until stdin closes: the bench holds
/// the other end, so the server never outlives it.
pub fn serve() -> anyhow::Result<()> {
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("{READY_PREFIX}{}", listener.local_addr()?);
        let app = Router::new().route("/v1/verify", post(verify));
        axum::serve(listener, app).await?;
        Ok(())
    })
}
