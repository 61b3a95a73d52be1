//! `service update` and `service rollback`: one compare-and-swap of the service record (with
//! the port keys it claims or frees); a changed task template starts a rolling update, which
//! the leader's orchestrator carries out.

use netagent_store::{Compare, Op, Store};

use super::{
    MAX_ATTEMPTS, ServiceUpdate, check_reserved, check_room, check_secrets, claim_ports, encode,
    get, parse_ports, spec, tasks,
};
use crate::error::{AgentError, Result};
use crate::model::{self, EndpointMode, PortConfig, Service, keys};

/// Applies a new spec to the record: the old one becomes the previous (for rollback), the
/// version goes up, and a changed template starts a rolling update.
fn set_spec(svc: &mut Service, new: netagent_orchestrator::ServiceSpec, rollback: bool) {
    use netagent_orchestrator::{UpdateState, UpdateStatus};
    let Some(old) = svc.spec.replace(new) else {
        return;
    };
    let template_changed = svc.spec.as_ref().is_some_and(|n| n.task != old.task);
    svc.previous_spec = Some(old);
    svc.version += 1;
    if template_changed {
        svc.update_status = Some(UpdateStatus {
            state: if rollback {
                UpdateState::RollbackStarted
            } else {
                UpdateState::Updating
            },
            started_ms: tasks::now_ms(),
            completed_ms: None,
            message: if rollback {
                "manually requested rollback".into()
            } else {
                "update in progress".into()
            },
        });
    }
}

pub async fn update(store: &dyn Store, name: &str, req: &ServiceUpdate) -> Result<Service> {
    if req.is_empty() {
        return Err(AgentError::BadRequest(
            "nothing to update: give at least one flag".into(),
        ));
    }
    let add = parse_ports(&req.publish_add)?;
    check_reserved(store, &add).await?;
    let mut rm = Vec::new();
    for s in &req.publish_rm {
        rm.push(PortConfig::parse_published(s)?);
    }
    let label_add = spec::parse_labels("label-add", &req.label_add)?;
    if req.rollback && req.spec.touches_spec() {
        return Err(AgentError::BadRequest(
            "--rollback cannot be combined with other spec changes".into(),
        ));
    }
    for _ in 0..MAX_ATTEMPTS {
        let (mut svc, rev) = get(store, name).await?;
        if svc.endpoint_mode == EndpointMode::Dnsrr && !add.is_empty() {
            return Err(AgentError::BadRequest(
                "published ports need --endpoint-mode vip".into(),
            ));
        }
        let mut compares = vec![Compare::mod_revision(keys::service(name), rev)];
        let mut ops = Vec::new();
        if req.spec.touches_spec() || req.rollback {
            let Some(current) = svc.spec.clone() else {
                return Err(AgentError::BadRequest(format!(
                    "service {name:?} runs no tasks (it was created without a command); only \
                     its ports and labels can change"
                )));
            };
            if req.rollback {
                let Some(prev) = svc.previous_spec.clone() else {
                    return Err(AgentError::BadRequest(format!(
                        "service {name:?} has no previous spec to roll back to"
                    )));
                };
                set_spec(&mut svc, prev, true);
            } else {
                let new = req.spec.apply(name, &current)?;
                compares.extend(check_secrets(store, &new.task).await?);
                for n in &svc.networks {
                    if let Some(net) = store.get(&keys::network(&n.network)).await? {
                        check_room(&serde_json::from_slice(&net.value)?, &new)?;
                    }
                }
                set_spec(&mut svc, new, false);
            }
        }
        for k in &req.label_rm {
            if svc.labels.remove(k).is_none() {
                return Err(AgentError::NotFound(format!(
                    "service {name:?} has no label {k:?}"
                )));
            }
        }
        svc.labels.extend(label_add.clone());
        for &(port, proto) in &rm {
            let before = svc.ports.len();
            svc.ports
                .retain(|p| !(p.published == port && p.protocol == proto));
            if svc.ports.len() == before {
                return Err(AgentError::NotFound(format!(
                    "service {name:?} does not publish {port}/{}",
                    proto.as_str()
                )));
            }
            ops.push(Op::delete(keys::port(proto, port)));
        }
        let new: Vec<PortConfig> = add
            .iter()
            .filter(|p| {
                !svc.ports
                    .iter()
                    .any(|q| q.published == p.published && q.protocol == p.protocol)
            })
            .copied()
            .collect();
        if new.len() != add.len() {
            let dup = add
                .iter()
                .find(|p| !new.contains(p))
                .map(|p| format!("{}/{}", p.published, p.protocol.as_str()))
                .unwrap_or_default();
            return Err(AgentError::Conflict(format!(
                "service {name:?} already publishes {dup}"
            )));
        }
        claim_ports(store, name, &new, &mut compares, &mut ops).await?;
        svc.ports.extend(new);
        svc.ports.sort();
        svc.updated = Some(model::now_rfc3339());
        ops.push(Op::put(keys::service(name), encode(&svc)?));
        if store.txn(compares, ops).await? {
            tracing::info!(service = %name, version = svc.version, ports = ?svc.ports, "service updated");
            return Ok(svc);
        }
    }
    Err(AgentError::Unavailable(
        "service update kept conflicting with concurrent changes; try again".into(),
    ))
}

/// `service rollback`: the previous spec again.
pub async fn rollback(store: &dyn Store, name: &str) -> Result<Service> {
    update(
        store,
        name,
        &ServiceUpdate {
            rollback: true,
            ..Default::default()
        },
    )
    .await
}
