//! `GET /v1/monitor`: the node's drop (or, `type=trace`, trace) events as they happen, one
//! JSON object per line, until the client goes away or the agent stops.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use super::ApiState;
use crate::error::AgentError;
use crate::monitor::{Filter, Line};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorQuery {
    #[serde(rename = "type")]
    kind: Option<String>,
    network: Option<String>,
    container: Option<String>,
}

pub async fn follow(
    State(st): State<ApiState>,
    Query(q): Query<MonitorQuery>,
) -> Result<Response, AgentError> {
    let traces = match q.kind.as_deref() {
        None | Some("drop") => false,
        Some("trace") => true,
        Some(other) => {
            return Err(AgentError::BadRequest(format!(
                "unknown event type {other:?} (known: drop, trace)"
            )));
        }
    };
    let Some(monitor) = st.monitor.get() else {
        return Err(AgentError::Unavailable(
            "the datapath's event reader did not start (see the agent log)".into(),
        ));
    };
    let filter = Filter {
        traces,
        network: q.network,
        container: q.container,
    };
    let rx = monitor.subscribe();
    // Held by the stream: tracing stops when the client goes away.
    let tracing = traces.then(|| monitor.trace());
    let stop = st.shutdown.clone();
    let lines = futures::stream::unfold(
        (rx, stop, filter, tracing),
        |(mut rx, mut stop, filter, tracing)| async move {
            loop {
                let line = tokio::select! {
                    r = rx.recv() => match r {
                        Ok(line) => line,
                        Err(RecvError::Lagged(n)) => {
                            std::sync::Arc::new(Line::Lost { count: n, by: "client" })
                        }
                        Err(RecvError::Closed) => return None,
                    },
                    _ = stop.wait_for(|s| *s) => return None,
                };
                if !filter.matches(&line) {
                    continue;
                }
                let mut text = serde_json::to_vec(&*line).unwrap_or_default();
                text.push(b'\n');
                let state = (rx, stop, filter, tracing);
                return Some((Ok::<_, Infallible>(Bytes::from(text)), state));
            }
        },
    );
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response())
}
