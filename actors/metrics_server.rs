//! MetricsServer: serves `GET /metrics` on `metrics_addr` in the Prometheus text format, and
//! `GET /health` for Kubernetes probes and load balancers (see [`inspect::health`]).
//!
//! Runs on the Supervisor's arbiter, away from the workers. A scrape takes a snapshot through
//! [`super::inspect`] (atomics and the census, whose lock is taken only by connects and
//! disconnects), so scraping never waits on, or holds up, a query. The HTTP it speaks is the
//! least Prometheus needs: one request per connection, then close. Takes no messages.

use std::sync::Arc;
use std::time::Duration;

use actix::fut::wrap_future;
use actix::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::actors::inspect;
use crate::actors::registry::Shared;
use crate::metrics;

/// A request head larger than this is not a scrape.
const MAX_REQUEST: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

pub struct MetricsServer {
    shared: Arc<Shared>,
    listener: Option<std::net::TcpListener>,
}

impl MetricsServer {
    pub fn new(shared: Arc<Shared>, listener: std::net::TcpListener) -> MetricsServer {
        MetricsServer { shared, listener: Some(listener) }
    }
}

/// Stop serving: the socket went to a new process (online restart).
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopServing;

impl Handler<StopServing> for MetricsServer {
    type Result = ();

    fn handle(&mut self, _: StopServing, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

impl Actor for MetricsServer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let Some(std) = self.listener.take() else { return };
        let shared = self.shared.clone();
        let serve = async move {
            let listener = match TcpListener::from_std(std) {
                Ok(listener) => listener,
                Err(e) => return log::error!("metrics_addr: cannot use the listener: {e}"),
            };
            if let Ok(addr) = listener.local_addr() {
                log::info!("serving Prometheus metrics on http://{addr}/metrics");
            }
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let shared = shared.clone();
                        actix::spawn(async move {
                            let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &shared)).await;
                        });
                    }
                    Err(e) => {
                        log::warn!("metrics_addr: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        };
        ctx.spawn(wrap_future(serve));
    }
}

/// The request line's method and path, once the whole head has arrived.
fn request_line(head: &[u8]) -> Option<(&str, &str)> {
    let end = head.windows(4).position(|w| w == b"\r\n\r\n")?;
    let text = std::str::from_utf8(&head[..end]).ok()?;
    let mut parts = text.lines().next()?.split_whitespace();
    Some((parts.next()?, parts.next()?))
}

async fn answer(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let (method, path) = loop {
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..n]);
        if let Some((method, path)) = request_line(&head) {
            break (method.to_string(), path.to_string());
        }
        if head.len() > MAX_REQUEST {
            return respond(&mut stream, "431 Request Header Fields Too Large", "text/plain", "").await;
        }
    };
    let path = path.split('?').next().unwrap_or("");
    match (method.as_str(), path) {
        ("GET", "/metrics") => {
            let body = metrics::render(&inspect::metrics_snapshot(shared));
            respond(&mut stream, "200 OK", "text/plain; version=0.0.4; charset=utf-8", &body).await
        }
        ("GET", "/health") => {
            let health = inspect::health(shared, std::time::Instant::now());
            let status = if health.serving { "200 OK" } else { "503 Service Unavailable" };
            respond(&mut stream, status, "application/json", &health.to_json()).await
        }
        ("GET", _) => respond(&mut stream, "404 Not Found", "text/plain", "try /metrics or /health\n").await,
        _ => respond(&mut stream, "405 Method Not Allowed", "text/plain", "").await,
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::request_line;

    #[test]
    fn request_line_waits_for_the_whole_head() {
        assert_eq!(request_line(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(request_line(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), Some(("GET", "/metrics")));
        assert_eq!(request_line(b"\r\n\r\n"), None);
    }
}
