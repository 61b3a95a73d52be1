//! `/v1/tasks/{id}/logs`: a task's output, read on its node: here, or through the peer API
//! of the node that ran it.

use axum::extract::{Path as UrlPath, Query, State};
use netagent_orchestrator::Task;

use super::peer::{self, ChunkQuery};
use super::{ApiResult, ApiState};
use crate::error::AgentError;
use crate::model::keys;

pub async fn logs(
    State(st): State<ApiState>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<ChunkQuery>,
) -> ApiResult<serde_json::Value> {
    let Some(kv) = st.store.get(&keys::task(&id)).await? else {
        return Err(AgentError::NotFound(format!("task {id:?} not found")));
    };
    let task: Task = serde_json::from_slice(&kv.value)?;
    let Some(node) = task.node.clone() else {
        return Ok(axum::Json(
            serde_json::json!({"log": "", "offset": 0, "next": 0, "end": 0}),
        ));
    };
    let max = q.max.unwrap_or(crate::runtime::logs::READ_MAX);
    if node == st.node_name {
        let runner = st.runner.clone();
        let chunk = tokio::task::spawn_blocking(move || runner.logs(&id, q.offset, max))
            .await
            .map_err(|e| AgentError::Internal(e.to_string()))?
            .map_err(|e| AgentError::Internal(format!("reading the task's log: {e}")))?;
        return Ok(axum::Json(peer::chunk_json(&chunk)));
    }
    let view = st.runtime.reconciler.view();
    let Some(addr) = view
        .nodes
        .get(&node)
        .and_then(|n| n.wireguard.as_ref())
        .map(|w| w.tunnel_addr)
    else {
        return Err(AgentError::Unavailable(format!(
            "node {node:?} has no tunnel yet; its tasks' logs cannot be read from here"
        )));
    };
    let path = format!("/v1/tasks/{id}/logs?offset={}&max={max}", q.offset);
    Ok(axum::Json(
        peer::get(addr, crate::agent::CONTROL_PORT, &path).await?,
    ))
}
