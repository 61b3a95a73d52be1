//! The agents' API to each other, on their tunnel addresses: only WireGuard peers (the
//! cluster's nodes, authenticated by their keys) can reach it, and the tunnel engine lets
//! nothing but this port and the encrypted VXLAN through. It serves what only a task's own
//! node has: the task's output.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path as UrlPath, Query, State};
use http_body_util::BodyExt as _;

use crate::error::AgentError;
use crate::runner::Runner;

/// A request to another agent gives up after this long.
const PEER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, serde::Deserialize)]
pub struct ChunkQuery {
    #[serde(default)]
    pub offset: u64,
    pub max: Option<usize>,
}

/// A chunk of a task's output as the API sends it.
pub fn chunk_json(c: &crate::runtime::logs::Chunk) -> serde_json::Value {
    serde_json::json!({
        "log": String::from_utf8_lossy(&c.data),
        "offset": c.offset,
        "next": c.next,
        "end": c.end,
    })
}

async fn task_logs(
    State(runner): State<Arc<Runner>>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<ChunkQuery>,
) -> Result<axum::Json<serde_json::Value>, AgentError> {
    let max = q.max.unwrap_or(crate::runtime::logs::READ_MAX);
    let r = runner.clone();
    let chunk = tokio::task::spawn_blocking(move || r.logs(&id, q.offset, max))
        .await
        .map_err(|e| AgentError::Internal(e.to_string()))?
        .map_err(|e| AgentError::Internal(format!("reading the task's log: {e}")))?;
    Ok(axum::Json(chunk_json(&chunk)))
}

/// Serves the peer API on `addr:port` until the agent stops.
pub async fn serve(addr: Ipv4Addr, port: u16, runner: Arc<Runner>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(SocketAddrV4::new(addr, port)).await?;
    tracing::info!(%addr, port, "peer API listening on the tunnel address");
    let app = Router::new()
        .route("/v1/tasks/{id}/logs", axum::routing::get(task_logs))
        .with_state(runner);
    axum::serve(listener, app).await?;
    Ok(())
}

/// GET `path` from the agent at `addr:port` (a peer's tunnel address).
pub async fn get(addr: Ipv4Addr, port: u16, path: &str) -> Result<serde_json::Value, AgentError> {
    let unreachable = |e: String| AgentError::Unavailable(format!("node at {addr} (tunnel): {e}"));
    let fut = async {
        let stream = tokio::net::TcpStream::connect(SocketAddrV4::new(addr, port))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| unreachable(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = hyper::Request::builder()
            .uri(path)
            .header("host", "netagent")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| AgentError::Internal(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| unreachable(format!("invalid answer: {e}")))?;
        if !status.is_success() {
            let msg = v["error"].as_str().unwrap_or("error").to_string();
            return Err(AgentError::Unavailable(format!("node at {addr}: {msg}")));
        }
        Ok(v)
    };
    tokio::time::timeout(PEER_TIMEOUT, fut)
        .await
        .map_err(|_| unreachable(format!("no answer within {PEER_TIMEOUT:?}")))?
}
