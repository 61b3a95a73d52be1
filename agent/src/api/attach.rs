//! `/v1/attach`: what the CNI plugin (`netagent-cni`) calls. ADD is `POST`, DEL `DELETE`,
//! CHECK `GET .../check`, and GC lists (`GET`) and deletes.

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use serde::Deserialize;

use super::{ApiResult, ApiState, parse_body};
use crate::error::AgentError;
use crate::model::CniIdentity;
use crate::runtime::{AttachRequest, Attachment, CniResult};

/// Names the CNI attachment an id must be (both or neither).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    container_id: Option<String>,
    ifname: Option<String>,
}

impl Identity {
    fn get(self) -> Result<Option<CniIdentity>, AgentError> {
        match (self.container_id, self.ifname) {
            (Some(container_id), Some(ifname)) => Ok(Some(CniIdentity {
                container_id,
                ifname,
                network: None,
            })),
            (None, None) => Ok(None),
            _ => Err(AgentError::BadRequest(
                "container_id and ifname go together".into(),
            )),
        }
    }
}

pub async fn attach(State(st): State<ApiState>, body: Bytes) -> ApiResult<CniResult> {
    let req: AttachRequest = parse_body(&body)?;
    let rt = st.runtime.clone();
    Ok(axum::Json(
        st.run_op(async move { rt.attach_external(&req).await })
            .await?,
    ))
}

pub async fn list(State(st): State<ApiState>) -> ApiResult<Vec<Attachment>> {
    Ok(axum::Json(st.runtime.attachments().await?))
}

pub async fn detach(
    State(st): State<ApiState>,
    UrlPath(id): UrlPath<String>,
    Query(who): Query<Identity>,
) -> Result<StatusCode, AgentError> {
    let who = who.get()?;
    let rt = st.runtime.clone();
    st.run_op(async move { rt.detach_external(&id, who.as_ref()).await })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn check(
    State(st): State<ApiState>,
    UrlPath(id): UrlPath<String>,
    Query(who): Query<Identity>,
) -> ApiResult<Attachment> {
    let who = who.get()?;
    Ok(axum::Json(
        st.runtime.check_external(&id, who.as_ref()).await?,
    ))
}
