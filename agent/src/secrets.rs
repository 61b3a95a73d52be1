//! Secrets: small blobs a task reads at `/run/secrets/<name>`.
//!
//! Stored under `keys::SECRETS`, outside the prefix every agent watches, so a value is never in
//! any agent's view, saved view or log: an agent reads one (by name) only to start a task that
//! uses it, and hands it to the task's tmpfs in memory. Nothing here ever returns the value to
//! an API client.

use std::collections::BTreeMap;

use base64::Engine as _;
use netagent_store::{Compare, Op, Revision, Store};
use serde::{Deserialize, Serialize};

use crate::error::{AgentError, Result};
use crate::model::{self, keys};

/// Docker's limit.
pub const MAX_SIZE: usize = 500 * 1024;

#[derive(Clone, Serialize, Deserialize)]
struct SecretRecord {
    name: String,
    id: String,
    created: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    /// Base64.
    data: String,
}

/// What `secret ls` and `secret inspect` show: never the value.
#[derive(Debug, Clone, Serialize)]
pub struct SecretView {
    pub name: String,
    pub id: String,
    pub created: String,
    pub labels: BTreeMap<String, String>,
    pub size: usize,
}

/// `secret create`'s body.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretCreate {
    pub name: String,
    /// Base64 of the value.
    pub data: String,
    #[serde(default)]
    pub labels: Vec<String>,
}

fn view(r: &SecretRecord) -> SecretView {
    SecretView {
        name: r.name.clone(),
        id: r.id.clone(),
        created: r.created.clone(),
        labels: r.labels.clone(),
        size: base64::engine::general_purpose::STANDARD
            .decode(&r.data)
            .map_or(0, |d| d.len()),
    }
}

fn decode(kv: &netagent_store::KeyValue) -> Result<SecretRecord> {
    serde_json::from_slice(&kv.value).map_err(AgentError::from)
}

pub async fn create(store: &dyn Store, req: &SecretCreate) -> Result<SecretView> {
    model::validate_name("secret", &req.name)?;
    let data = base64::engine::general_purpose::STANDARD
        .decode(&req.data)
        .map_err(|_| AgentError::BadRequest("secret data is not valid base64".into()))?;
    if data.is_empty() {
        return Err(AgentError::BadRequest("secret data is empty".into()));
    }
    if data.len() > MAX_SIZE {
        return Err(AgentError::BadRequest(format!(
            "secret {:?} is {} bytes; the limit is {MAX_SIZE}",
            req.name,
            data.len()
        )));
    }
    let labels = crate::services::spec::parse_labels("label", &req.labels)?;
    let record = SecretRecord {
        name: req.name.clone(),
        id: model::new_id(),
        created: model::now_rfc3339(),
        labels,
        data: req.data.clone(),
    };
    let value = serde_json::to_vec(&record)?;
    if !store.create(&keys::secret(&req.name), value, None).await? {
        return Err(AgentError::Conflict(format!(
            "secret {:?} already exists",
            req.name
        )));
    }
    tracing::info!(secret = %req.name, "secret created");
    Ok(view(&record))
}

pub async fn list(store: &dyn Store) -> Result<Vec<SecretView>> {
    let (kvs, _) = store.list(keys::SECRETS).await?;
    kvs.iter().map(|kv| decode(kv).map(|r| view(&r))).collect()
}

pub async fn inspect(store: &dyn Store, name: &str) -> Result<SecretView> {
    match store.get(&keys::secret(name)).await? {
        Some(kv) => Ok(view(&decode(&kv)?)),
        None => Err(AgentError::NotFound(format!("secret {name:?} not found"))),
    }
}

/// The value, for a task about to start, and the record's revision (a service that names the
/// secret compares it, so a concurrent `secret rm` cannot leave it dangling).
pub async fn value(store: &dyn Store, name: &str) -> Result<(Vec<u8>, Revision)> {
    let Some(kv) = store.get(&keys::secret(name)).await? else {
        return Err(AgentError::NotFound(format!("secret {name:?} not found")));
    };
    let r = decode(&kv)?;
    let data = base64::engine::general_purpose::STANDARD
        .decode(&r.data)
        .map_err(|_| AgentError::Internal(format!("secret {name:?} is corrupt in the store")))?;
    Ok((data, kv.mod_revision))
}

/// `secret rm`: refused while a service uses it.
pub async fn remove(store: &dyn Store, name: &str) -> Result<()> {
    let Some(kv) = store.get(&keys::secret(name)).await? else {
        return Err(AgentError::NotFound(format!("secret {name:?} not found")));
    };
    let (services, _) = store.list(keys::SERVICES).await?;
    let mut compares = vec![Compare::mod_revision(keys::secret(name), kv.mod_revision)];
    for skv in &services {
        let svc: model::Service = serde_json::from_slice(&skv.value)?;
        let uses = svc
            .spec
            .iter()
            .any(|s| s.task.secrets.iter().any(|x| x.name == name));
        if uses {
            return Err(AgentError::Conflict(format!(
                "secret {name:?} is in use by service {:?}",
                svc.name
            )));
        }
        // A service changed meanwhile may have started using it: try again then.
        compares.push(Compare::mod_revision(skv.key.clone(), skv.mod_revision));
    }
    if !store
        .txn(compares, vec![Op::delete(keys::secret(name))])
        .await?
    {
        return Err(AgentError::Unavailable(format!(
            "services changed while secret {name:?} was being removed; try again"
        )));
    }
    tracing::info!(secret = %name, "secret removed");
    Ok(())
}
