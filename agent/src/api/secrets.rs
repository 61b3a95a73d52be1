//! `/v1/secrets/...`: create, list, inspect and remove; no answer ever carries a value.

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;

use super::{ApiResult, ApiState, parse_body};
use crate::error::AgentError;
use crate::secrets::{self, SecretCreate, SecretView};

pub async fn create(
    State(st): State<ApiState>,
    body: Bytes,
) -> Result<(StatusCode, axum::Json<SecretView>), AgentError> {
    let req: SecretCreate = parse_body(&body)?;
    Ok((
        StatusCode::CREATED,
        axum::Json(secrets::create(&*st.store, &req).await?),
    ))
}

pub async fn list(State(st): State<ApiState>) -> ApiResult<Vec<SecretView>> {
    Ok(axum::Json(secrets::list(&*st.store).await?))
}

pub async fn inspect(
    State(st): State<ApiState>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<SecretView> {
    Ok(axum::Json(secrets::inspect(&*st.store, &name).await?))
}

pub async fn remove(
    State(st): State<ApiState>,
    UrlPath(name): UrlPath<String>,
) -> Result<StatusCode, AgentError> {
    secrets::remove(&*st.store, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}
