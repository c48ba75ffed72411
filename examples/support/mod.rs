//! Shared by the examples (included with `#[path = "support/mod.rs"] mod support;`).

use std::io::IsTerminal;

/// Whether log lines written to `stream` may carry ANSI colours: only on a terminal, and never
/// when `NO_COLOR` is set to anything but the empty string (<https://no-color.org>).
pub fn colour(stream: &impl IsTerminal) -> bool {
    stream.is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// A minimal `/metrics` endpoint on `listener` (one request per connection): the registry in
/// the Prometheus text format, 404 for anything else.
#[allow(dead_code)] // not every example serves metrics
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    registry: kvs_frames::prometheus::Registry,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    loop {
        let Ok((mut socket, _)) = listener.accept().await else {
            continue;
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let mut request = vec![0u8; 8192];
            let n = socket.read(&mut request).await.unwrap_or(0);
            let head = String::from_utf8_lossy(&request[..n]);
            let response = if head.starts_with("GET /metrics") {
                let body = kvs_frames::metrics::encode_text(&registry)
                    .unwrap_or_else(|e| format!("# encoding failed: {e}\n"));
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    kvs_frames::metrics::TEXT_CONTENT_TYPE,
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_owned()
            };
            let _ = socket.write_all(response.as_bytes()).await;
        });
    }
}
