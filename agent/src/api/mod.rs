//! HTTP/JSON API on a unix socket. `netctl` speaks only to this; validation lives behind it so
//! every client gets the same errors.

use std::path::Path;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use netagent_store::Store;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::containers::{self, ContainerCreate};
use crate::error::AgentError;
use crate::model::{Availability, NetworkCreate};
use crate::runtime::{ContainerView, Runtime, lock};
use crate::{capacity, networks, nodes};

mod attach;
mod listener;
mod monitor;
pub mod peer;
mod secrets;
mod services;
mod tasks;

#[derive(Clone)]
pub struct ApiState {
    pub store: Arc<dyn Store>,
    pub node_name: String,
    pub runtime: Arc<Runtime>,
    /// Operations that change the node (containers, attachments) run as tasks of their own,
    /// tracked here: a client that disconnects (netctl timing out, Ctrl-C) cannot cancel one
    /// half-way, and shutdown waits for them.
    pub ops: tokio_util::task::TaskTracker,
    /// The encrypted networks' tunnels, once they are up.
    pub tunnels: Arc<std::sync::OnceLock<Arc<crate::tunnels::Tunnels>>>,
    /// This node's record as the agent keeps publishing it.
    pub registration: tokio::sync::watch::Sender<nodes::Registration>,
    /// Runs this node's tasks (and has their logs).
    pub runner: Arc<crate::runner::Runner>,
    /// Decoded drop events (`netctl monitor`), once the reader runs.
    pub monitor: Arc<std::sync::OnceLock<Arc<crate::monitor::Monitor>>>,
    /// Turns true when the agent stops: streams (the monitor) end then.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

impl ApiState {
    /// Runs `op` to completion whatever happens to the request that asked for it.
    async fn run_op<T, F>(&self, op: F) -> Result<T, AgentError>
    where
        F: std::future::Future<Output = Result<T, AgentError>> + Send + 'static,
        T: Send + 'static,
    {
        match self.ops.spawn(op).await {
            Ok(r) => r,
            Err(e) => Err(AgentError::Internal(format!("operation failed: {e}"))),
        }
    }
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/ping", get(ping))
        .route("/v1/networks", get(network_list).post(network_create))
        .route(
            "/v1/networks/{name}",
            get(network_inspect).delete(network_remove),
        )
        .route("/v1/nodes", get(node_list))
        .route("/v1/nodes/{name}", get(node_inspect).delete(node_remove))
        .route("/v1/nodes/{name}/availability", put(node_availability))
        .route("/v1/nodes/{name}/rotate-key", post(node_rotate_key))
        .route("/v1/containers", get(container_list).post(container_run))
        .route(
            "/v1/containers/{name}",
            get(container_inspect).delete(container_remove),
        )
        .route("/v1/containers/{name}/wait", post(container_wait))
        .route("/v1/containers/{name}/logs", get(container_logs))
        .route("/v1/services", get(services::list).post(services::create))
        .route(
            "/v1/services/{name}",
            get(services::inspect).delete(services::remove),
        )
        .route("/v1/services/{name}/update", post(services::update))
        .route("/v1/services/{name}/rollback", post(services::rollback))
        .route("/v1/services/{name}/tasks", get(services::tasks))
        .route("/v1/tasks/{id}/logs", get(tasks::logs))
        .route("/v1/secrets", get(secrets::list).post(secrets::create))
        .route(
            "/v1/secrets/{name}",
            get(secrets::inspect).delete(secrets::remove),
        )
        .route("/v1/nodes/{name}/update", post(node_update))
        .route("/v1/monitor", get(monitor::follow))
        .route("/v1/attach", get(attach::list).post(attach::attach))
        .route("/v1/attach/{id}", delete(attach::detach))
        .route("/v1/attach/{id}/check", get(attach::check))
        .fallback(|| async { AgentError::NotFound("no such API path".into()) })
        .with_state(state)
}

/// Serves the API until `shutdown` resolves. The socket is root-only (0600): the API can
/// reprogram the node's network.
pub async fn serve(
    socket: &Path,
    state: ApiState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use anyhow::Context as _;

    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating socket directory {}", dir.display()))?;
    }
    // A socket file left by a previous run blocks bind; only remove it if nobody answers on it.
    if socket.exists() {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            anyhow::bail!(
                "another agent is already serving {}; stop it or use --socket",
                socket.display()
            );
        }
        std::fs::remove_file(socket)
            .with_context(|| format!("removing stale socket {}", socket.display()))?;
    }
    let listener = listener::bind(socket)?;
    tracing::info!(socket = %socket.display(), "API listening");
    // Everything before this (datapath, view, DNS, tunnels) is up: systemd may go on.
    if let Err(e) = crate::sd_notify::notify("READY=1") {
        tracing::warn!(error = %e, "could not tell systemd the agent is ready");
    }
    let result = axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await;
    let _ = std::fs::remove_file(socket);
    result.context("serving API")
}

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        let status = match &self {
            AgentError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AgentError::NotFound(_) => StatusCode::NOT_FOUND,
            AgentError::Conflict(_) => StatusCode::CONFLICT,
            AgentError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            AgentError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let body = serde_json::json!({ "error": self.to_string() });
        (status, axum::Json(body)).into_response()
    }
}

type ApiResult<T> = Result<axum::Json<T>, AgentError>;

/// Parses a JSON body ourselves so a malformed one gets our error shape, not axum's text.
fn parse_body<T: DeserializeOwned>(body: &Bytes) -> Result<T, AgentError> {
    serde_json::from_slice(body)
        .map_err(|e| AgentError::BadRequest(format!("invalid request body: {e}")))
}

async fn ping(State(st): State<ApiState>) -> ApiResult<serde_json::Value> {
    Ok(axum::Json(serde_json::json!({
        "node": st.node_name,
        "store": st.store.describe(),
        "version": env!("CARGO_PKG_VERSION"),
    })))
}

/// A network as this node sees it: `mtu` is what its containers get here (uplink MTU less
/// VXLAN, and WireGuard for encrypted networks), unless set with `--opt mtu`.
fn network_view(st: &ApiState, mut net: crate::model::Network) -> crate::model::Network {
    net.mtu = Some(net.effective_mtu(st.runtime.uplink_mtu));
    net
}

async fn network_list(State(st): State<ApiState>) -> ApiResult<Vec<crate::model::Network>> {
    let nets = networks::list(&*st.store).await?;
    Ok(axum::Json(
        nets.into_iter().map(|n| network_view(&st, n)).collect(),
    ))
}

async fn network_create(
    State(st): State<ApiState>,
    body: Bytes,
) -> Result<(StatusCode, axum::Json<crate::model::Network>), AgentError> {
    let req: NetworkCreate = parse_body(&body)?;
    capacity::check_network(&st.runtime.reconciler.view())?;
    let net = networks::create(&*st.store, &req).await?;
    Ok((StatusCode::CREATED, axum::Json(network_view(&st, net))))
}

async fn network_inspect(
    State(st): State<ApiState>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<crate::model::Network> {
    let net = networks::get(&*st.store, &name).await?;
    Ok(axum::Json(network_view(&st, net)))
}

async fn network_remove(
    State(st): State<ApiState>,
    UrlPath(name): UrlPath<String>,
) -> Result<StatusCode, AgentError> {
    networks::remove(&*st.store, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn node_list(State(st): State<ApiState>) -> ApiResult<Vec<nodes::NodeView>> {
    Ok(axum::Json(nodes::list(&*st.store).await?))
}

async fn node_inspect(
    State(st): State<ApiState>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<nodes::NodeView> {
    let mut view = nodes::get(&*st.store, &name).await?;
    if name == st.node_name {
        view.datapath = Some(datapath_status(&st));
        view.wireguard = Some(match st.tunnels.get() {
            Some(t) => t.status(),
            None => serde_json::json!({ "error": "the tunnels are not up (see the agent log)" }),
        });
    }
    Ok(axum::Json(view))
}

async fn node_remove(
    State(st): State<ApiState>,
    UrlPath(name): UrlPath<String>,
) -> Result<StatusCode, AgentError> {
    if name == st.node_name {
        return Err(AgentError::BadRequest(format!(
            "{name:?} is the node this agent runs on; remove it from another node once it is down"
        )));
    }
    nodes::remove(&*st.store, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `node rotate-key`: a new WireGuard key for this node.
async fn node_rotate_key(
    State(st): State<ApiState>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<serde_json::Value> {
    if name != st.node_name {
        return Err(AgentError::BadRequest(format!(
            "node {name:?} rotates its own key: talk to its agent (this is {:?})",
            st.node_name
        )));
    }
    let Some(t) = st.tunnels.get().cloned() else {
        return Err(AgentError::Unavailable(
            "the tunnels are not up yet; no key to rotate".into(),
        ));
    };
    let (store, registration) = (st.store.clone(), st.registration.clone());
    let key = st
        .run_op(async move { t.rotate_key(&*store, &registration).await })
        .await?;
    Ok(axum::Json(
        serde_json::json!({ "node": name, "public_key": key }),
    ))
}

fn datapath_status(st: &ApiState) -> serde_json::Value {
    let reconcile = serde_json::to_value(st.runtime.reconciler.status()).unwrap_or_default();
    let dp = lock(st.runtime.reconciler.datapath());
    match dp.drop_counters().and_then(|c| Ok((c, dp.device_encap()?))) {
        Ok((counters, device)) => {
            let drops: serde_json::Map<String, serde_json::Value> = counters
                .into_iter()
                .map(|(name, n)| (name.to_string(), n.into()))
                .collect();
            // Who puts plain overlay traffic in VXLAN, as the programs see it.
            let encap = if device { "device" } else { "ebpf" };
            serde_json::json!({ "drops": drops, "overlay_encap": encap, "reconcile": reconcile })
        }
        Err(e) => serde_json::json!({ "error": e.to_string(), "reconcile": reconcile }),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AvailabilityRequest {
    availability: String,
}

async fn node_availability(
    State(st): State<ApiState>,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> ApiResult<nodes::NodeView> {
    let req: AvailabilityRequest = parse_body(&body)?;
    let availability: Availability = req.availability.parse()?;
    Ok(axum::Json(
        nodes::set_availability(&*st.store, &name, availability).await?,
    ))
}

async fn node_update(
    State(st): State<ApiState>,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> ApiResult<nodes::NodeView> {
    let req: nodes::NodeUpdate = parse_body(&body)?;
    Ok(axum::Json(nodes::update(&*st.store, &name, &req).await?))
}

async fn container_run(
    State(st): State<ApiState>,
    body: Bytes,
) -> Result<(StatusCode, axum::Json<ContainerView>), AgentError> {
    let req: ContainerCreate = parse_body(&body)?;
    let rt = st.runtime.clone();
    let view = st.run_op(async move { rt.run(&req).await }).await?;
    Ok((StatusCode::CREATED, axum::Json(view)))
}

async fn container_list(State(st): State<ApiState>) -> ApiResult<Vec<ContainerView>> {
    let recs = containers::list(&*st.store).await?;
    Ok(axum::Json(
        recs.iter().map(|r| st.runtime.view(r)).collect(),
    ))
}

async fn container_inspect(
    State(st): State<ApiState>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<ContainerView> {
    let rec = match containers::get(&*st.store, &name).await {
        // With the store unreachable the node still knows its containers from its view
        // (`netctl container exec` keeps working); anything else is the store's answer.
        Err(AgentError::Unavailable(why)) => st
            .runtime
            .reconciler
            .view()
            .container_record(&name)
            .ok_or(AgentError::Unavailable(why))?,
        other => other?,
    };
    Ok(axum::Json(st.runtime.view(&rec)))
}

async fn container_remove(
    State(st): State<ApiState>,
    UrlPath(name): UrlPath<String>,
) -> Result<StatusCode, AgentError> {
    let rt = st.runtime.clone();
    st.run_op(async move { rt.remove(&name).await }).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct WaitRequest {
    #[serde(default)]
    timeout_secs: Option<u64>,
}

async fn container_wait(
    State(st): State<ApiState>,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> ApiResult<serde_json::Value> {
    let req: WaitRequest = if body.is_empty() {
        WaitRequest::default()
    } else {
        parse_body(&body)?
    };
    // Bounded so a forgotten client never pins a task forever; netctl asks again.
    let timeout = std::time::Duration::from_secs(req.timeout_secs.unwrap_or(10).min(60));
    let ended = st.runtime.wait(&name, timeout).await?;
    let rec = containers::get(&*st.store, &name).await?;
    let state = match ended {
        Some(_) => "exited",
        None => st.runtime.state_of(&rec),
    };
    Ok(axum::Json(serde_json::json!({
        "state": state,
        "exit_code": ended.flatten(),
    })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LogQuery {
    #[serde(default)]
    offset: u64,
    #[serde(default)]
    max: Option<usize>,
}

/// A chunk of a container's output from `offset`: `{log, offset, next, end}`. Read until
/// `next == end` for everything there is now.
async fn container_logs(
    State(st): State<ApiState>,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<LogQuery>,
) -> ApiResult<serde_json::Value> {
    let chunk = st
        .runtime
        .logs(
            &name,
            q.offset,
            q.max.unwrap_or(crate::runtime::logs::READ_MAX),
        )
        .await?;
    Ok(axum::Json(serde_json::json!({
        "log": String::from_utf8_lossy(&chunk.data),
        "offset": chunk.offset,
        "next": chunk.next,
        "end": chunk.end,
    })))
}
