//! Where a new task goes: the eligible node with the fewest tasks of its service, then the
//! fewest tasks overall, then the first by name (so the same state always gives the same
//! answer). Eligible: up, active (not drained) and meeting the template's constraints.

use std::collections::BTreeMap;

use crate::plan::NodeInfo;
use crate::spec::TaskTemplate;

/// Live tasks per node: of the service being planned, and of all services.
#[derive(Debug, Clone, Default)]
pub struct Load {
    pub service: BTreeMap<String, usize>,
    pub total: BTreeMap<String, usize>,
}

impl Load {
    pub fn add(&mut self, node: &str) {
        *self.service.entry(node.to_string()).or_default() += 1;
        *self.total.entry(node.to_string()).or_default() += 1;
    }

    pub fn remove(&mut self, node: &str) {
        for m in [&mut self.service, &mut self.total] {
            if let Some(n) = m.get_mut(node) {
                *n = n.saturating_sub(1);
            }
        }
    }

    fn of(&self, node: &str) -> (usize, usize) {
        (
            self.service.get(node).copied().unwrap_or(0),
            self.total.get(node).copied().unwrap_or(0),
        )
    }
}

/// Whether `node` may run tasks of `template` now.
pub fn eligible(node: &NodeInfo, template: &TaskTemplate) -> bool {
    node.ready && node.active && template.allows(&node.name, &node.labels)
}

/// The node for a new task, or why there is none.
pub fn pick<'a>(
    nodes: &'a [NodeInfo],
    template: &TaskTemplate,
    load: &Load,
) -> Result<&'a str, String> {
    nodes
        .iter()
        .filter(|n| eligible(n, template))
        .min_by(|a, b| {
            load.of(&a.name)
                .cmp(&load.of(&b.name))
                .then_with(|| a.name.cmp(&b.name))
        })
        .map(|n| n.name.as_str())
        .ok_or_else(|| no_node_reason(nodes, template))
}

/// "no suitable node (1 down, 1 drained, 1 not matching node.labels.zone==a)".
pub fn no_node_reason(nodes: &[NodeInfo], template: &TaskTemplate) -> String {
    if nodes.is_empty() {
        return "no suitable node (no nodes)".into();
    }
    let down = nodes.iter().filter(|n| !n.ready).count();
    let drained = nodes.iter().filter(|n| n.ready && !n.active).count();
    let unmatched = nodes
        .iter()
        .filter(|n| n.ready && n.active && !template.allows(&n.name, &n.labels))
        .count();
    let mut parts = Vec::new();
    if down > 0 {
        parts.push(format!("{down} down"));
    }
    if drained > 0 {
        parts.push(format!("{drained} drained"));
    }
    if unmatched > 0 {
        let cs: Vec<String> = template
            .constraints
            .iter()
            .map(ToString::to_string)
            .collect();
        parts.push(format!("{unmatched} not matching {}", cs.join(" and ")));
    }
    format!("no suitable node ({})", parts.join(", "))
}

/// Whether some node could ever run the template: one that meets the constraints, whatever its
/// state. `false` is worth a warning (Docker gives one) though the task stays pending.
pub fn satisfiable(nodes: &[NodeInfo], template: &TaskTemplate) -> bool {
    nodes.iter().any(|n| template.allows(&n.name, &n.labels))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Constraint;

    fn node(name: &str) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            ready: true,
            active: true,
            labels: BTreeMap::new(),
        }
    }

    fn t() -> TaskTemplate {
        TaskTemplate {
            command: vec!["x".into()],
            ..Default::default()
        }
    }

    #[test]
    fn fewest_of_the_service_then_fewest_overall() {
        let nodes = [node("n1"), node("n2"), node("n3")];
        let mut load = Load::default();
        let mut placed = Vec::new();
        for _ in 0..5 {
            let n = pick(&nodes, &t(), &load).unwrap().to_string();
            load.add(&n);
            placed.push(n);
        }
        assert_eq!(placed, ["n1", "n2", "n3", "n1", "n2"]);
        // Another service: n3 has fewest overall.
        let mut other = Load {
            service: BTreeMap::new(),
            total: load.total.clone(),
        };
        assert_eq!(pick(&nodes, &t(), &other).unwrap(), "n3");
        other.add("n3");
        assert_eq!(pick(&nodes, &t(), &other).unwrap(), "n1");
    }

    #[test]
    fn down_drained_and_constrained_nodes_get_nothing() {
        let mut nodes = [node("n1"), node("n2"), node("n3")];
        nodes[0].ready = false;
        nodes[1].active = false;
        let load = Load::default();
        assert_eq!(pick(&nodes, &t(), &load).unwrap(), "n3");
        let mut tpl = t();
        tpl.constraints = vec![Constraint::parse("node.labels.zone==a").unwrap()];
        let why = pick(&nodes, &tpl, &load).unwrap_err();
        assert_eq!(
            why,
            "no suitable node (1 down, 1 drained, 1 not matching node.labels.zone==a)"
        );
        assert!(!satisfiable(&nodes, &tpl));
        nodes[0].labels.insert("zone".into(), "a".into());
        assert!(satisfiable(&nodes, &tpl), "n1 could, once it is back");
    }
}
