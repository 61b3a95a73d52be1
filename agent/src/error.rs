//! The agent's error vocabulary. Every error a client can cause or see maps to one kind, and
//! the API turns the kind into an HTTP status; the message is the one line the user reads.

use netagent_store::StoreError;

use crate::model::ValidationError;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// The store (etcd) cannot be reached: the request changed nothing and can be retried.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl From<ValidationError> for AgentError {
    fn from(e: ValidationError) -> Self {
        AgentError::BadRequest(e.to_string())
    }
}

impl From<StoreError> for AgentError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(msg) => AgentError::Unavailable(msg),
            other => AgentError::Internal(other.to_string()),
        }
    }
}

impl From<serde_json::Error> for AgentError {
    fn from(e: serde_json::Error) -> Self {
        AgentError::Internal(format!("corrupt record in store: {e}"))
    }
}

pub type Result<T, E = AgentError> = std::result::Result<T, E>;
