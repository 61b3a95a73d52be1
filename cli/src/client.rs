//! A minimal HTTP/1.1 client for the agent's unix socket.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;

/// Longer than the agent's own store timeouts, so the agent's error (naming the store) wins.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

pub struct Client {
    socket: PathBuf,
}

/// An error the agent answered with: its one-line message.
#[derive(Debug)]
pub struct ApiError {
    pub message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

impl Client {
    /// `host` is `unix:///path/to.sock` (Docker's -H spelling) or a bare path.
    pub fn new(host: &str) -> anyhow::Result<Self> {
        let path = match host.strip_prefix("unix://") {
            Some(p) => p,
            None if host.starts_with('/') => host,
            None => bail!("invalid host {host:?}: expected unix:///path/to/netagent.sock"),
        };
        if path.is_empty() {
            bail!("invalid host {host:?}: empty socket path");
        }
        Ok(Self {
            socket: PathBuf::from(path),
        })
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        self.request(Method::GET, path, None).await
    }

    pub async fn post(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        self.request(Method::POST, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        self.request(Method::DELETE, path, None).await
    }

    /// GET `path` and hand each line of the (endless) answer to `f` as it arrives; returns
    /// when the agent ends the stream. Only connecting is bounded in time.
    pub async fn follow_lines(
        &self,
        path: &str,
        mut f: impl FnMut(&str) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let mut sender = tokio::time::timeout(REQUEST_TIMEOUT, self.connect())
            .await
            .map_err(|_| anyhow!("netagent at {} did not answer", self.socket.display()))??;
        let req = Request::builder()
            .method(Method::GET)
            .uri(path)
            .header("host", "netagent")
            .body(Full::new(Bytes::new()))?;
        let resp = sender
            .send_request(req)
            .await
            .context("request to netagent")?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = body.collect().await?.to_bytes();
            return Err(api_error(status, &bytes).into());
        }
        let mut pending: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.context("reading from netagent")?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            pending.extend_from_slice(data);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                f(String::from_utf8_lossy(&line[..end]).trim_end())?;
            }
        }
        Ok(())
    }

    async fn connect(
        &self,
    ) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .with_context(|| {
                format!(
                    "cannot connect to netagent at {} (is it running?)",
                    self.socket.display()
                )
            })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP handshake with netagent")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.request_inner(method, path, body))
            .await
            .map_err(|_| {
                anyhow!(
                    "netagent at {} did not answer within {}s",
                    self.socket.display(),
                    REQUEST_TIMEOUT.as_secs()
                )
            })?
    }

    async fn request_inner(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let mut sender = self.connect().await?;
        let body = match body {
            Some(v) => Full::new(Bytes::from(serde_json::to_vec(v)?)),
            None => Full::new(Bytes::new()),
        };
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "netagent")
            .header("content-type", "application/json")
            .body(body)?;
        let resp = sender
            .send_request(req)
            .await
            .context("request to netagent")?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        if status.is_success() {
            if bytes.is_empty() {
                return Ok(serde_json::Value::Null);
            }
            return serde_json::from_slice(&bytes).context("netagent sent invalid JSON");
        }
        Err(api_error(status, &bytes).into())
    }
}

/// The agent's one-line message from an error answer.
fn api_error(status: hyper::StatusCode, bytes: &[u8]) -> ApiError {
    let message = serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| format!("netagent answered {status}"));
    ApiError { message }
}
