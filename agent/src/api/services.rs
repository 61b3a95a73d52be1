//! `/v1/services/...`: services, their tasks, updates and rollbacks.

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use netagent_orchestrator::{NodeInfo, schedule};

use super::{ApiResult, ApiState, parse_body};
use crate::capacity;
use crate::error::AgentError;
use crate::model::{Availability, Service};
use crate::services::tasks::{self as svc_tasks, TaskView};
use crate::services::{self as svcs, ServiceCreate, ServiceUpdate, ServiceView};

/// The view of a service with its replica counts (and, after a change, its warnings).
async fn full_view(st: &ApiState, svc: &Service) -> Result<ServiceView, AgentError> {
    let eps = svcs::all_endpoints(&*st.store).await?;
    let tasks = svc_tasks::list(&*st.store, Some(svc)).await?;
    let mut v = svcs::view(svc, &eps);
    v.replicas = svc_tasks::replica_count(svc, &tasks, &st.runtime.reconciler.view());
    Ok(v)
}

/// Docker's warning: a constraint no node meets leaves the tasks pending (it may be met later).
fn warnings(st: &ApiState, svc: &Service) -> Vec<String> {
    let Some(spec) = &svc.spec else {
        return Vec::new();
    };
    let view = st.runtime.reconciler.view();
    let nodes: Vec<NodeInfo> = view
        .nodes
        .values()
        .map(|n| NodeInfo {
            name: n.name.clone(),
            ready: view.alive.contains(&n.name),
            active: n.availability == Availability::Active,
            labels: n.labels.clone(),
        })
        .collect();
    if schedule::satisfiable(&nodes, &spec.task) {
        return Vec::new();
    }
    let cs: Vec<String> = spec
        .task
        .constraints
        .iter()
        .map(ToString::to_string)
        .collect();
    vec![format!(
        "no node satisfies the constraints {}; the tasks stay pending until one does",
        cs.join(" and ")
    )]
}

pub async fn create(
    State(st): State<ApiState>,
    body: Bytes,
) -> Result<(StatusCode, axum::Json<ServiceView>), AgentError> {
    let req: ServiceCreate = parse_body(&body)?;
    let mode = svcs::parse_mode(req.endpoint_mode.as_deref())?;
    capacity::check_service(
        &st.runtime.reconciler.view(),
        req.networks.len(),
        req.publish.len(),
        mode,
    )?;
    let svc = svcs::create(&*st.store, &req).await?;
    let mut v = full_view(&st, &svc).await?;
    v.warnings = warnings(&st, &svc);
    Ok((StatusCode::CREATED, axum::Json(v)))
}

pub async fn list(State(st): State<ApiState>) -> ApiResult<Vec<ServiceView>> {
    let list = svcs::list(&*st.store).await?;
    let eps = svcs::all_endpoints(&*st.store).await?;
    let tasks = svc_tasks::list(&*st.store, None).await?;
    let view = st.runtime.reconciler.view();
    Ok(axum::Json(
        list.iter()
            .map(|s| {
                let mine: Vec<_> = tasks
                    .iter()
                    .filter(|(t, _)| t.service == s.name && t.service_id == s.id)
                    .cloned()
                    .collect();
                let mut v = svcs::view(s, &eps);
                v.replicas = svc_tasks::replica_count(s, &mine, &view);
                v
            })
            .collect(),
    ))
}

pub async fn inspect(
    State(st): State<ApiState>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<ServiceView> {
    let (svc, _) = svcs::get(&*st.store, &name).await?;
    Ok(axum::Json(full_view(&st, &svc).await?))
}

pub async fn remove(
    State(st): State<ApiState>,
    UrlPath(name): UrlPath<String>,
) -> Result<StatusCode, AgentError> {
    svcs::remove(&*st.store, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn update(
    State(st): State<ApiState>,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> ApiResult<ServiceView> {
    let req: ServiceUpdate = parse_body(&body)?;
    let svc = svcs::update(&*st.store, &name, &req).await?;
    let mut v = full_view(&st, &svc).await?;
    v.warnings = warnings(&st, &svc);
    Ok(axum::Json(v))
}

pub async fn rollback(
    State(st): State<ApiState>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<ServiceView> {
    let svc = svcs::rollback(&*st.store, &name).await?;
    Ok(axum::Json(full_view(&st, &svc).await?))
}

/// `service ps`: every task of the service, current ones first within each slot.
pub async fn tasks(
    State(st): State<ApiState>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Vec<TaskView>> {
    let (svc, _) = svcs::get(&*st.store, &name).await?;
    let tasks = svc_tasks::list(&*st.store, Some(&svc)).await?;
    Ok(axum::Json(svc_tasks::views(&tasks)))
}
