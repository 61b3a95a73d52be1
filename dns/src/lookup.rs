//! Answering one question from a compiled view, for one scope (the asker's networks).
//!
//! Pure: no I/O, no locks. The outcome is either records (NOERROR, possibly empty = NODATA),
//! NXDOMAIN, or "not ours, forward it".

use std::net::Ipv4Addr;

use hickory_proto::rr::rdata::{A, PTR, SRV};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use rand::seq::SliceRandom;

use crate::LOCAL_TTL;
use crate::view::{CompiledNetwork, CompiledView, Entry};

/// What the local view says about a question.
#[derive(Debug)]
pub(crate) enum Local {
    /// The name exists: NOERROR with these records (none = NODATA).
    Answer {
        answers: Vec<Record>,
        additionals: Vec<Record>,
    },
    /// The name is known, but only on networks the asker is not on.
    NxDomain,
    /// Not a local name: ask the upstream resolvers.
    Forward,
}

/// Resolves `name`/`qtype` for an asker on the networks `scope` (lower-case network names).
///
/// `owner` is the name as the client spelled it: answers carry it back unchanged, so clients
/// that randomise case (0x20) still match their question.
pub(crate) fn resolve(
    view: &CompiledView,
    scope: &[Box<str>],
    name: &LowerName,
    owner: &Name,
    qtype: RecordType,
) -> Local {
    let Some(labels) = labels_of(name) else {
        return Local::Forward;
    };
    if labels.is_empty() {
        // The root: never a local name.
        return Local::Forward;
    }
    if let Some(ip) = parse_reverse_v4(&labels) {
        return resolve_ptr(view, scope, ip, owner, qtype);
    }

    let key = labels.join(".");

    // 1. The name as is, on every network the asker shares with it.
    let in_scope = scope
        .iter()
        .filter_map(|n| view.networks.get(n).map(|net| &**net));
    if let Some(local) = answer_from(in_scope, &key, None, owner, qtype) {
        return local;
    }

    // 2. `<name>.<network>`: restricted to that one network.
    if let Some((&net_label, _)) = labels.split_last()
        && labels.len() >= 2
        && let Some(net) = view.networks.get(net_label)
    {
        let prefix = &key[..key.len() - net_label.len() - 1];
        if scope.iter().any(|s| &**s == net_label) {
            if let Some(local) = answer_from(
                std::iter::once(&**net),
                prefix,
                Some(net_label),
                owner,
                qtype,
            ) {
                return local;
            }
            // Not a name on that network: fall through and forward, so that a network that
            // happens to be called like a TLD ("com", "local") does not hide the real zone.
        } else if net.names.contains_key(prefix) {
            return Local::NxDomain;
        }
    }

    // 3. Known somewhere, but not where the asker is: no leak, no forward.
    if view.all_names.contains_key(key.as_str()) {
        return Local::NxDomain;
    }
    Local::Forward
}

/// The labels of a lower-case name as `&str`, or `None` when one cannot be a local name
/// (not UTF-8, or an escaped dot inside a label, which would alias a two-label key).
fn labels_of(name: &LowerName) -> Option<Vec<&str>> {
    let mut out = Vec::with_capacity(usize::from(name.num_labels()));
    for label in name.iter() {
        let s = std::str::from_utf8(label).ok()?;
        if s.is_empty() || s.contains('.') {
            return None;
        }
        out.push(s);
    }
    Some(out)
}

/// `d.c.b.a.in-addr.arpa` -> `a.b.c.d`; anything else (partial names, ip6.arpa) -> `None`.
fn parse_reverse_v4(labels: &[&str]) -> Option<Ipv4Addr> {
    let [d, c, b, a, "in-addr", "arpa"] = labels else {
        return None;
    };
    let octet = |s: &str| -> Option<u8> {
        // Only plain decimal: "+1" or "0x1" must not alias a real address.
        if s.is_empty() || s.len() > 3 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    Some(Ipv4Addr::new(octet(a)?, octet(b)?, octet(c)?, octet(d)?))
}

fn answer_from<'a>(
    nets: impl Iterator<Item = &'a CompiledNetwork> + Clone,
    key: &str,
    qualifier: Option<&str>,
    owner: &Name,
    qtype: RecordType,
) -> Option<Local> {
    let mut found = false;
    let mut addrs: Vec<Ipv4Addr> = Vec::new();
    let mut shuffle = false;
    let mut srvs: Vec<(u16, &str)> = Vec::new();
    for net in nets.clone() {
        let Some(entry) = net.names.get(key) else {
            continue;
        };
        found = true;
        match entry {
            Entry::Addrs {
                addrs: a,
                shuffle: s,
            } => {
                shuffle |= *s;
                for ip in a.iter() {
                    // The same container on two shared networks has two addresses; the same
                    // address twice (two networks, same VIP) is listed once.
                    if !addrs.contains(ip) {
                        addrs.push(*ip);
                    }
                }
            }
            Entry::Srv { port, service } => {
                if !srvs.iter().any(|(p, s)| p == port && *s == &**service) {
                    srvs.push((*port, service));
                }
            }
        }
    }
    if !found {
        return None;
    }

    let mut answers = Vec::new();
    let mut additionals = Vec::new();
    let wants = |t: RecordType| qtype == t || qtype == RecordType::ANY;
    if wants(RecordType::A) {
        if shuffle {
            addrs.shuffle(&mut rand::rng());
        }
        answers.extend(addrs.iter().map(|ip| a_record(owner, *ip)));
    }
    if wants(RecordType::SRV) {
        for (port, service) in srvs {
            let target = match qualifier {
                Some(net) => format!("{service}.{net}."),
                None => format!("{service}."),
            };
            // A name too long to encode cannot be answered; the rest of the answer still is.
            let Ok(target) = Name::from_ascii(&target) else {
                continue;
            };
            answers.push(Record::from_rdata(
                owner.clone(),
                LOCAL_TTL,
                RData::SRV(SRV::new(0, 0, port, target.clone())),
            ));
            // Saves the client the follow-up A query for the target.
            if let Some(Local::Answer { answers: a, .. }) =
                answer_from(nets.clone(), service, qualifier, &target, RecordType::A)
            {
                additionals.extend(a);
            }
        }
    }
    Some(Local::Answer {
        answers,
        additionals,
    })
}

fn resolve_ptr(
    view: &CompiledView,
    scope: &[Box<str>],
    ip: Ipv4Addr,
    owner: &Name,
    qtype: RecordType,
) -> Local {
    let mut targets: Vec<Name> = Vec::new();
    for net_name in scope {
        let Some(names) = view.networks.get(net_name).and_then(|n| n.reverse.get(&ip)) else {
            continue;
        };
        for n in names {
            // Qualified with the network: `<name>.<network>` resolves back to exactly this
            // address, so forward-confirmed reverse DNS holds.
            if let Ok(target) = Name::from_ascii(format!("{n}.{net_name}."))
                && !targets.contains(&target)
            {
                targets.push(target);
            }
        }
    }
    if targets.is_empty() {
        return if view.all_addrs.contains_key(&ip) {
            Local::NxDomain
        } else {
            Local::Forward
        };
    }
    let answers = if qtype == RecordType::PTR || qtype == RecordType::ANY {
        targets
            .into_iter()
            .map(|t| Record::from_rdata(owner.clone(), LOCAL_TTL, RData::PTR(PTR(t))))
            .collect()
    } else {
        Vec::new()
    };
    Local::Answer {
        answers,
        additionals: Vec::new(),
    }
}

fn a_record(owner: &Name, ip: Ipv4Addr) -> Record {
    Record::from_rdata(owner.clone(), LOCAL_TTL, RData::A(A(ip)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::{DnsView, Endpoint, PortProto, PublishedPort, Service};

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("test ip")
    }

    /// Two networks: `front` (web VIP, 3 tasks, container c1, alias db) and `back`
    /// (service api in dnsrr mode, container c2, and c1 again with another address).
    fn view() -> CompiledView {
        let mut v = DnsView::new();
        v.network_mut("front")
            .insert_service(
                "web",
                Service {
                    endpoint: Endpoint::Vip(ip("10.1.0.2")),
                    tasks: vec![ip("10.1.0.5"), ip("10.1.0.6"), ip("10.1.0.7")],
                    ports: vec![PublishedPort {
                        port: 80,
                        proto: PortProto::Tcp,
                    }],
                },
            )
            .insert_container("c1", ip("10.1.0.10"))
            .insert_alias("db", ip("10.1.0.11"));
        v.network_mut("back")
            .insert_service(
                "api",
                Service {
                    endpoint: Endpoint::DnsRr,
                    tasks: vec![ip("10.2.0.5"), ip("10.2.0.6")],
                    ports: vec![],
                },
            )
            .insert_container("c2", ip("10.2.0.10"))
            .insert_container("c1", ip("10.2.0.20"));
        CompiledView::compile(&v)
    }

    fn scope(nets: &[&str]) -> Vec<Box<str>> {
        nets.iter().map(|s| Box::from(*s)).collect()
    }

    fn ask(v: &CompiledView, sc: &[&str], name: &str, t: RecordType) -> Local {
        let n = Name::from_ascii(name).expect("name");
        resolve(v, &scope(sc), &LowerName::new(&n), &n, t)
    }

    fn a_of(l: &Local) -> Vec<Ipv4Addr> {
        match l {
            Local::Answer { answers, .. } => answers
                .iter()
                .filter_map(|r| match &r.data {
                    RData::A(a) => Some(a.0),
                    _ => None,
                })
                .collect(),
            other => panic!("expected answer, got {other:?}"),
        }
    }

    fn sorted(mut v: Vec<Ipv4Addr>) -> Vec<Ipv4Addr> {
        v.sort();
        v
    }

    #[test]
    fn service_vip() {
        let v = view();
        let l = ask(&v, &["front"], "web.", RecordType::A);
        assert_eq!(a_of(&l), vec![ip("10.1.0.2")]);
    }

    #[test]
    fn case_insensitive_and_relative() {
        let v = view();
        assert_eq!(
            a_of(&ask(&v, &["front"], "WeB.", RecordType::A)),
            vec![ip("10.1.0.2")]
        );
        assert_eq!(
            a_of(&ask(&v, &["front"], "web", RecordType::A)),
            vec![ip("10.1.0.2")]
        );
    }

    #[test]
    fn dnsrr_gives_tasks() {
        let v = view();
        let l = ask(&v, &["back"], "api.", RecordType::A);
        assert_eq!(sorted(a_of(&l)), vec![ip("10.2.0.5"), ip("10.2.0.6")]);
    }

    #[test]
    fn tasks_name_and_shuffle() {
        let v = view();
        let mut orders = std::collections::HashSet::new();
        for _ in 0..64 {
            let got = a_of(&ask(&v, &["front"], "tasks.web.", RecordType::A));
            assert_eq!(
                sorted(got.clone()),
                vec![ip("10.1.0.5"), ip("10.1.0.6"), ip("10.1.0.7")]
            );
            orders.insert(got);
        }
        assert!(orders.len() > 1, "order must vary between answers");
    }

    #[test]
    fn container_and_alias() {
        let v = view();
        assert_eq!(
            a_of(&ask(&v, &["front"], "c1.", RecordType::A)),
            vec![ip("10.1.0.10")]
        );
        assert_eq!(
            a_of(&ask(&v, &["front"], "db.", RecordType::A)),
            vec![ip("10.1.0.11")]
        );
        // On both networks: both addresses.
        assert_eq!(
            sorted(a_of(&ask(&v, &["front", "back"], "c1.", RecordType::A))),
            vec![ip("10.1.0.10"), ip("10.2.0.20")]
        );
    }

    #[test]
    fn scoping_no_leak() {
        let v = view();
        assert!(matches!(
            ask(&v, &["back"], "web.", RecordType::A),
            Local::NxDomain
        ));
        assert!(matches!(
            ask(&v, &["front"], "api.", RecordType::A),
            Local::NxDomain
        ));
        assert!(matches!(
            ask(&v, &["front"], "tasks.api.", RecordType::A),
            Local::NxDomain
        ));
        assert!(matches!(
            ask(&v, &["front"], "api.back.", RecordType::A),
            Local::NxDomain
        ));
        // No networks at all: local names are still not leaked.
        assert!(matches!(
            ask(&v, &[], "web.", RecordType::A),
            Local::NxDomain
        ));
    }

    #[test]
    fn network_qualified() {
        let v = view();
        let both = ["front", "back"];
        assert_eq!(
            a_of(&ask(&v, &both, "c1.back.", RecordType::A)),
            vec![ip("10.2.0.20")]
        );
        assert_eq!(
            a_of(&ask(&v, &both, "c1.front.", RecordType::A)),
            vec![ip("10.1.0.10")]
        );
        assert_eq!(
            a_of(&ask(&v, &both, "tasks.api.back.", RecordType::A)).len(),
            2
        );
        // Unknown name under a shared network: not ours to deny.
        assert!(matches!(
            ask(&v, &both, "nope.back.", RecordType::A),
            Local::Forward
        ));
    }

    #[test]
    fn other_types_nodata() {
        let v = view();
        for t in [RecordType::AAAA, RecordType::MX, RecordType::TXT] {
            match ask(&v, &["front"], "web.", t) {
                Local::Answer { answers, .. } => assert!(answers.is_empty()),
                other => panic!("{t}: {other:?}"),
            }
        }
        match ask(&v, &["front"], "web.", RecordType::ANY) {
            Local::Answer { answers, .. } => assert_eq!(answers.len(), 1),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn srv_with_additional() {
        let v = view();
        match ask(&v, &["front"], "_80._tcp.web.", RecordType::SRV) {
            Local::Answer {
                answers,
                additionals,
            } => {
                assert_eq!(answers.len(), 1);
                match &answers[0].data {
                    RData::SRV(srv) => {
                        assert_eq!(srv.port, 80);
                        assert_eq!(srv.target.to_ascii(), "web.");
                    }
                    other => panic!("{other:?}"),
                }
                assert_eq!(a_of_records(&additionals), vec![ip("10.1.0.2")]);
            }
            other => panic!("{other:?}"),
        }
        // Qualified: the target is qualified too.
        match ask(&v, &["front"], "_80._tcp.web.front.", RecordType::SRV) {
            Local::Answer { answers, .. } => match &answers[0].data {
                RData::SRV(srv) => assert_eq!(srv.target.to_ascii(), "web.front."),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
        // Unpublished port: forwarded (unknown name); wrong type: NODATA.
        assert!(matches!(
            ask(&v, &["front"], "_81._tcp.web.", RecordType::SRV),
            Local::Forward
        ));
        assert!(a_of(&ask(&v, &["front"], "_80._tcp.web.", RecordType::A)).is_empty());
    }

    fn a_of_records(r: &[Record]) -> Vec<Ipv4Addr> {
        r.iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect()
    }

    fn ptr_of(l: &Local) -> Vec<String> {
        match l {
            Local::Answer { answers, .. } => answers
                .iter()
                .filter_map(|r| match &r.data {
                    RData::PTR(p) => Some(p.0.to_ascii()),
                    _ => None,
                })
                .collect(),
            other => panic!("expected answer, got {other:?}"),
        }
    }

    #[test]
    fn ptr_every_kind_and_scoped() {
        let v = view();
        let q = |sc: &[&str], rev: &str| ask(&v, sc, rev, RecordType::PTR);
        assert_eq!(
            ptr_of(&q(&["front"], "2.0.1.10.in-addr.arpa.")),
            vec!["web.front."]
        );
        assert_eq!(
            ptr_of(&q(&["front"], "5.0.1.10.in-addr.arpa.")),
            vec!["tasks.web.front."]
        );
        assert_eq!(
            ptr_of(&q(&["front"], "10.0.1.10.in-addr.arpa.")),
            vec!["c1.front."]
        );
        assert_eq!(
            ptr_of(&q(&["front"], "11.0.1.10.IN-ADDR.ARPA.")),
            vec!["db.front."]
        );
        // Out of scope: NXDOMAIN; unknown: forward; partial: forward.
        assert!(matches!(
            q(&["front"], "10.0.2.10.in-addr.arpa."),
            Local::NxDomain
        ));
        assert!(matches!(
            q(&["front"], "8.8.8.8.in-addr.arpa."),
            Local::Forward
        ));
        assert!(matches!(
            q(&["front"], "1.10.in-addr.arpa."),
            Local::Forward
        ));
        assert!(matches!(
            q(&["front"], "0x2.0.1.10.in-addr.arpa."),
            Local::Forward
        ));
        // Known address, other type: NODATA.
        match ask(&v, &["front"], "2.0.1.10.in-addr.arpa.", RecordType::A) {
            Local::Answer { answers, .. } => assert!(answers.is_empty()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_forwards() {
        let v = view();
        assert!(matches!(
            ask(&v, &["front"], "example.com.", RecordType::A),
            Local::Forward
        ));
        assert!(matches!(
            ask(&v, &["front"], ".", RecordType::NS),
            Local::Forward
        ));
    }

    #[test]
    fn answers_keep_client_spelling() {
        let v = view();
        match ask(&v, &["front"], "wEb.", RecordType::A) {
            Local::Answer { answers, .. } => {
                assert!(
                    answers[0]
                        .name
                        .eq_case(&Name::from_ascii("wEb.").expect("n"))
                );
                assert_eq!(answers[0].ttl, LOCAL_TTL);
            }
            other => panic!("{other:?}"),
        }
    }
}
