//! Real-socket tests: the crate's `serve` on 127.0.0.1 ephemeral ports, queried over UDP and
//! TCP, with fake upstream resolvers run by the test. Every wait is bounded.

use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use netagent_dns::{
    DnsView, Endpoint, LOCAL_TTL, PortProto, PublishedPort, Resolver, ResolverConfig,
    ScopedHandler, Service, serve,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// Bound on any single client wait in these tests.
const WAIT: Duration = Duration::from_secs(5);

fn ip(s: &str) -> Ipv4Addr {
    s.parse().expect("test ip")
}

fn service(endpoint: Endpoint, tasks: Vec<Ipv4Addr>, ports: Vec<PublishedPort>) -> Service {
    Service {
        endpoint,
        tasks,
        ports,
    }
}

/// `front`: web (VIP, 3 tasks, port 80/tcp), big (dnsrr, 100 tasks), container c1, alias db.
/// `back`: api (VIP), container c2.
fn test_view() -> DnsView {
    let mut v = DnsView::new();
    v.network_mut("front")
        .insert_service(
            "web",
            service(
                Endpoint::Vip(ip("10.1.0.2")),
                vec![ip("10.1.0.5"), ip("10.1.0.6"), ip("10.1.0.7")],
                vec![PublishedPort {
                    port: 80,
                    proto: PortProto::Tcp,
                }],
            ),
        )
        .insert_service(
            "big",
            service(
                Endpoint::DnsRr,
                (0..100u8).map(|i| Ipv4Addr::new(10, 1, 1, i)).collect(),
                vec![],
            ),
        )
        .insert_container("c1", ip("10.1.0.10"))
        .insert_alias("db", ip("10.1.0.11"));
    v.network_mut("back")
        .insert_service(
            "api",
            service(Endpoint::Vip(ip("10.2.0.2")), vec![ip("10.2.0.5")], vec![]),
        )
        .insert_container("c2", ip("10.2.0.10"));
    v
}

struct Running {
    udp: SocketAddr,
    tcp: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), netagent_dns::DnsError>>,
}

impl Running {
    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let res = timeout(WAIT, &mut self.task)
            .await
            .expect("serve stops in time")
            .expect("serve task not panicked");
        assert!(res.is_ok(), "serve returned {res:?}");
    }
}

async fn start(handler: ScopedHandler) -> Running {
    let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind udp");
    let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind tcp");
    let (udp_addr, tcp_addr) = (
        udp.local_addr().expect("addr"),
        tcp.local_addr().expect("addr"),
    );
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(handler, udp, tcp, async move {
        let _ = rx.await;
    }));
    Running {
        udp: udp_addr,
        tcp: tcp_addr,
        stop: Some(tx),
        task,
    }
}

fn resolver(upstreams: Vec<SocketAddr>, per_upstream: Duration) -> Arc<Resolver> {
    let r = Resolver::new(ResolverConfig {
        upstreams,
        upstream_timeout: per_upstream,
    });
    r.publish(test_view());
    r
}

fn query_bytes(name: &str, t: RecordType, edns: Option<u16>) -> (u16, Vec<u8>) {
    let id: u16 = rand::random();
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_str(name).expect("name"), t));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    (id, m.to_vec().expect("encode"))
}

async fn raw_udp(server: SocketAddr, bytes: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    sock.connect(server).await.expect("connect");
    sock.send(bytes).await.expect("send");
    let mut buf = vec![0u8; 65535];
    match timeout(wait, sock.recv(&mut buf)).await {
        Ok(Ok(n)) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

async fn udp(server: SocketAddr, name: &str, t: RecordType, edns: Option<u16>) -> (Message, usize) {
    let (id, q) = query_bytes(name, t, edns);
    let raw = raw_udp(server, &q, WAIT).await.expect("udp answer");
    let m = Message::from_vec(&raw).expect("parse answer");
    assert_eq!(m.metadata.id, id);
    assert_eq!(m.metadata.message_type, MessageType::Response);
    (m, raw.len())
}

async fn raw_tcp(server: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    let fut = async {
        let mut s = TcpStream::connect(server).await.ok()?;
        let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(bytes);
        s.write_all(&out).await.ok()?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await.ok()?;
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut buf).await.ok()?;
        Some(buf)
    };
    timeout(WAIT, fut).await.ok().flatten()
}

async fn tcp(server: SocketAddr, name: &str, t: RecordType) -> Message {
    let (id, q) = query_bytes(name, t, None);
    let raw = raw_tcp(server, &q).await.expect("tcp answer");
    let m = Message::from_vec(&raw).expect("parse answer");
    assert_eq!(m.metadata.id, id);
    m
}

fn a_records(m: &Message) -> Vec<Ipv4Addr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

fn sorted(mut v: Vec<Ipv4Addr>) -> Vec<Ipv4Addr> {
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------------
// Fake upstreams

#[derive(Clone, Copy, Debug)]
enum Behavior {
    /// NOERROR with one A record, over UDP and TCP.
    Answer(Ipv4Addr),
    /// NXDOMAIN.
    NxDomain,
    /// Never answers.
    Silent,
    /// SERVFAIL.
    ServFail,
    /// Bytes that are not a DNS message.
    Garbage,
    /// UDP: TC set and no records; TCP: 50 A records starting at the address.
    TruncateUdp(Ipv4Addr),
}

struct Fake {
    addr: SocketAddr,
    udp_hits: Arc<AtomicUsize>,
    tcp_hits: Arc<AtomicUsize>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn fake_answer(query: &Message, b: Behavior, over_tcp: bool) -> Option<Vec<u8>> {
    let q = query.queries.first()?.clone();
    let mut m = Message::new(query.metadata.id, MessageType::Response, OpCode::Query);
    m.metadata.recursion_desired = query.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.add_query(q.clone());
    match b {
        Behavior::Answer(a) => {
            m.add_answer(Record::from_rdata(q.name().clone(), 60, RData::A(A(a))));
        }
        Behavior::NxDomain => m.metadata.response_code = ResponseCode::NXDomain,
        Behavior::Silent => return None,
        Behavior::ServFail => m.metadata.response_code = ResponseCode::ServFail,
        Behavior::Garbage => return Some(b"\x13\x37garbage".to_vec()),
        Behavior::TruncateUdp(a) => {
            if over_tcp {
                let base = u32::from(a);
                for i in 0..50 {
                    m.add_answer(Record::from_rdata(
                        q.name().clone(),
                        60,
                        RData::A(A(Ipv4Addr::from(base + i))),
                    ));
                }
            } else {
                m.metadata.truncation = true;
            }
        }
    }
    m.to_vec().ok()
}

async fn fake_upstream(b: Behavior) -> Fake {
    // UDP and TCP on the same port, like a real resolver: retry on the rare port collision.
    let (udp, tcp) = loop {
        let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let port = udp.local_addr().expect("addr").port();
        if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)).await {
            break (udp, tcp);
        }
    };
    let addr = udp.local_addr().expect("addr");
    let udp_hits = Arc::new(AtomicUsize::new(0));
    let tcp_hits = Arc::new(AtomicUsize::new(0));
    let uh = udp_hits.clone();
    let udp_task = tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, from)) = udp.recv_from(&mut buf).await {
            uh.fetch_add(1, Ordering::SeqCst);
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            if let Some(ans) = fake_answer(&q, b, false) {
                let _ = udp.send_to(&ans, from).await;
            }
        }
    });
    let th = tcp_hits.clone();
    let tcp_task = tokio::spawn(async move {
        while let Ok((mut s, _)) = tcp.accept().await {
            th.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut len = [0u8; 2];
                if s.read_exact(&mut len).await.is_err() {
                    return;
                }
                let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
                if s.read_exact(&mut buf).await.is_err() {
                    return;
                }
                let Ok(q) = Message::from_vec(&buf) else {
                    return;
                };
                if let Some(ans) = fake_answer(&q, b, true) {
                    let mut out = (ans.len() as u16).to_be_bytes().to_vec();
                    out.extend_from_slice(&ans);
                    let _ = s.write_all(&out).await;
                } else {
                    // Silent: hold the connection open until the test ends.
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
            });
        }
    });
    Fake {
        addr,
        udp_hits,
        tcp_hits,
        tasks: vec![udp_task, tcp_task],
    }
}

/// A local port with nothing listening (bound then released).
async fn dead_port() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    s.local_addr().expect("addr")
}

// ---------------------------------------------------------------------------------------------
// Local records

#[tokio::test]
async fn every_local_record_kind_over_udp() {
    let r = resolver(vec![], Duration::from_millis(300));
    let srv = start(r.handler(["front"])).await;

    // Service VIP; flags, TTL, echo of the question.
    let (m, _) = udp(srv.udp, "web.", RecordType::A, None).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert!(m.metadata.recursion_available);
    assert_eq!(a_records(&m), vec![ip("10.1.0.2")]);
    assert_eq!(m.answers[0].ttl, LOCAL_TTL);
    assert_eq!(m.queries.len(), 1);
    assert_eq!(m.queries[0].name().to_ascii(), "web.");

    // Case-insensitive, answer keeps the client's spelling.
    let (m, _) = udp(srv.udp, "WEB.", RecordType::A, None).await;
    assert_eq!(a_records(&m), vec![ip("10.1.0.2")]);
    assert!(
        m.answers[0]
            .name
            .eq_case(&Name::from_str("WEB.").expect("name"))
    );

    // tasks.<svc>
    let (m, _) = udp(srv.udp, "tasks.web.", RecordType::A, None).await;
    assert_eq!(
        sorted(a_records(&m)),
        vec![ip("10.1.0.5"), ip("10.1.0.6"), ip("10.1.0.7")]
    );

    // Container, alias, qualified.
    let (m, _) = udp(srv.udp, "c1.", RecordType::A, None).await;
    assert_eq!(a_records(&m), vec![ip("10.1.0.10")]);
    let (m, _) = udp(srv.udp, "db.", RecordType::A, None).await;
    assert_eq!(a_records(&m), vec![ip("10.1.0.11")]);
    let (m, _) = udp(srv.udp, "c1.front.", RecordType::A, None).await;
    assert_eq!(a_records(&m), vec![ip("10.1.0.10")]);

    // PTR.
    let (m, _) = udp(srv.udp, "10.0.1.10.in-addr.arpa.", RecordType::PTR, None).await;
    match &m.answers[..] {
        [r] => match &r.data {
            RData::PTR(p) => assert_eq!(p.0.to_ascii(), "c1.front."),
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }

    // SRV with the target's address in the additional section.
    let (m, _) = udp(srv.udp, "_80._tcp.web.", RecordType::SRV, None).await;
    match &m.answers[..] {
        [r] => match &r.data {
            RData::SRV(s) => {
                assert_eq!(s.port, 80);
                assert_eq!(s.target.to_ascii(), "web.");
            }
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
    assert!(
        m.additionals
            .iter()
            .any(|r| r.data == RData::A(A(ip("10.1.0.2"))))
    );

    // AAAA for an existing name: NOERROR, no records.
    let (m, _) = udp(srv.udp, "web.", RecordType::AAAA, None).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());

    // Other network: NXDOMAIN, also qualified.
    for name in [
        "api.",
        "c2.",
        "tasks.api.",
        "api.back.",
        "2.0.2.10.in-addr.arpa.",
    ] {
        let (m, _) = udp(srv.udp, name, RecordType::A, None).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{name}");
        assert!(m.answers.is_empty());
    }

    // EDNS in, EDNS out.
    let (m, _) = udp(srv.udp, "web.", RecordType::A, Some(1232)).await;
    assert!(m.edns.is_some());
    let (m, _) = udp(srv.udp, "web.", RecordType::A, None).await;
    assert!(m.edns.is_none());

    srv.stop().await;
}

#[tokio::test]
async fn scoping_between_two_networks() {
    let r = resolver(vec![], Duration::from_millis(300));
    let a = start(r.handler(["front"])).await;
    let b = start(r.handler(["back"])).await;
    let both = start(r.handler(["front", "back"])).await;

    let (m, _) = udp(a.udp, "api.", RecordType::A, None).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    let (m, _) = udp(b.udp, "api.", RecordType::A, None).await;
    assert_eq!(a_records(&m), vec![ip("10.2.0.2")]);
    let (m, _) = udp(b.udp, "web.", RecordType::A, None).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    let (m, _) = udp(b.udp, "web.front.", RecordType::A, None).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    let (m, _) = udp(both.udp, "api.back.", RecordType::A, None).await;
    assert_eq!(a_records(&m), vec![ip("10.2.0.2")]);
    let (m, _) = udp(both.udp, "web.", RecordType::A, None).await;
    assert_eq!(a_records(&m), vec![ip("10.1.0.2")]);

    a.stop().await;
    b.stop().await;
    both.stop().await;
}

#[tokio::test]
async fn set_networks_changes_scope() {
    let r = resolver(vec![], Duration::from_millis(300));
    let h = r.handler(["back"]);
    let keep = h.clone();
    let srv = start(h).await;
    let (m, _) = udp(srv.udp, "web.", RecordType::A, None).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    keep.set_networks(["back", "FRONT"]);
    assert_eq!(
        keep.networks(),
        vec!["back".to_string(), "front".to_string()]
    );
    let (m, _) = udp(srv.udp, "web.", RecordType::A, None).await;
    assert_eq!(a_records(&m), vec![ip("10.1.0.2")]);
    srv.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Truncation

#[tokio::test]
async fn udp_truncates_and_tcp_completes() {
    let r = resolver(vec![], Duration::from_millis(300));
    let srv = start(r.handler(["front"])).await;

    // 100 A records (~1.6 KB) do not fit 512 bytes: TC, partial answer, within 512.
    let (m, len) = udp(srv.udp, "tasks.big.", RecordType::A, None).await;
    assert!(m.metadata.truncation, "TC must be set");
    assert!(len <= 512, "{len} bytes");
    assert!(m.answers.len() < 100);

    // The client's EDNS size is honoured: 4096 fits everything.
    let (m, len) = udp(srv.udp, "tasks.big.", RecordType::A, Some(4096)).await;
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 100);
    assert!(len > 512);

    // A small EDNS size is honoured too.
    let (m, len) = udp(srv.udp, "tasks.big.", RecordType::A, Some(1000)).await;
    assert!(m.metadata.truncation);
    assert!(len <= 1000, "{len} bytes");

    // TCP: complete.
    let m = tcp(srv.tcp, "tasks.big.", RecordType::A).await;
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 100);
    // dnsrr name too.
    let m = tcp(srv.tcp, "big.", RecordType::A).await;
    assert_eq!(m.answers.len(), 100);

    srv.stop().await;
}

#[tokio::test]
async fn tcp_connection_serves_several_queries() {
    let r = resolver(vec![], Duration::from_millis(300));
    let srv = start(r.handler(["front"])).await;
    let fut = async {
        let mut s = TcpStream::connect(srv.tcp).await.expect("connect");
        for name in ["web.", "c1.", "db."] {
            let (id, q) = query_bytes(name, RecordType::A, None);
            let mut out = (q.len() as u16).to_be_bytes().to_vec();
            out.extend_from_slice(&q);
            s.write_all(&out).await.expect("write");
            let mut len = [0u8; 2];
            s.read_exact(&mut len).await.expect("len");
            let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
            s.read_exact(&mut buf).await.expect("body");
            let m = Message::from_vec(&buf).expect("parse");
            assert_eq!(m.metadata.id, id);
            assert_eq!(a_records(&m).len(), 1, "{name}");
        }
    };
    timeout(WAIT, fut).await.expect("bounded");
    srv.stop().await;
}

// ---------------------------------------------------------------------------------------------
// View updates

#[tokio::test]
async fn view_update_visible_on_next_query() {
    let r = resolver(vec![], Duration::from_millis(300));
    let srv = start(r.handler(["front"])).await;
    let (m, _) = udp(srv.udp, "tasks.web.", RecordType::A, None).await;
    assert_eq!(m.answers.len(), 3);

    let mut v = test_view();
    v.network_mut("front").insert_service(
        "web",
        service(
            Endpoint::Vip(ip("10.1.0.2")),
            vec![
                ip("10.1.0.5"),
                ip("10.1.0.6"),
                ip("10.1.0.7"),
                ip("10.1.0.8"),
            ],
            vec![],
        ),
    );
    v.network_mut("front")
        .insert_container("new", ip("10.1.0.99"));
    r.publish(v.clone());

    let (m, _) = udp(srv.udp, "tasks.web.", RecordType::A, None).await;
    assert_eq!(m.answers.len(), 4);
    let (m, _) = udp(srv.udp, "new.", RecordType::A, None).await;
    assert_eq!(a_records(&m), vec![ip("10.1.0.99")]);

    // Removal too: an empty view makes the name unknown (no upstream -> SERVFAIL).
    r.publish(DnsView::new());
    let (m, _) = udp(srv.udp, "new.", RecordType::A, None).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    srv.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Forwarding

#[tokio::test]
async fn forwards_to_upstream_udp_and_tcp() {
    let up = fake_upstream(Behavior::Answer(ip("192.0.2.1"))).await;
    let r = resolver(vec![up.addr], Duration::from_millis(500));
    let srv = start(r.handler(["front"])).await;

    let (m, _) = udp(srv.udp, "example.com.", RecordType::A, None).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(a_records(&m), vec![ip("192.0.2.1")]);
    assert!(m.metadata.recursion_available);
    assert!(!m.metadata.authoritative);
    assert_eq!(up.udp_hits.load(Ordering::SeqCst), 1);

    // A query that came over TCP goes upstream over TCP.
    let m = tcp(srv.tcp, "example.org.", RecordType::A).await;
    assert_eq!(a_records(&m), vec![ip("192.0.2.1")]);
    assert_eq!(up.tcp_hits.load(Ordering::SeqCst), 1);

    // Unknown name under a shared network is not ours: forwarded.
    let (m, _) = udp(srv.udp, "nope.front.", RecordType::A, None).await;
    assert_eq!(a_records(&m), vec![ip("192.0.2.1")]);
    srv.stop().await;
}

#[tokio::test]
async fn upstream_nxdomain_is_relayed_without_failover() {
    let nx = fake_upstream(Behavior::NxDomain).await;
    let good = fake_upstream(Behavior::Answer(ip("192.0.2.1"))).await;
    let r = resolver(vec![nx.addr, good.addr], Duration::from_millis(500));
    let srv = start(r.handler(["front"])).await;
    let (m, _) = udp(srv.udp, "missing.example.", RecordType::A, None).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(good.udp_hits.load(Ordering::SeqCst), 0);
    srv.stop().await;
}

#[tokio::test]
async fn failover_after_timeout_within_bound() {
    let silent = fake_upstream(Behavior::Silent).await;
    let good = fake_upstream(Behavior::Answer(ip("192.0.2.7"))).await;
    let per = Duration::from_millis(300);
    let r = resolver(vec![silent.addr, good.addr], per);
    let srv = start(r.handler(["front"])).await;
    let t0 = Instant::now();
    let (m, _) = udp(srv.udp, "example.com.", RecordType::A, None).await;
    let took = t0.elapsed();
    assert_eq!(a_records(&m), vec![ip("192.0.2.7")]);
    assert_eq!(silent.udp_hits.load(Ordering::SeqCst), 1);
    assert!(took >= per, "waited the first upstream's budget: {took:?}");
    assert!(took < per * 2 + Duration::from_millis(500), "{took:?}");
    srv.stop().await;
}

#[tokio::test]
async fn failover_after_servfail_garbage_and_dead_port() {
    let sf = fake_upstream(Behavior::ServFail).await;
    let garbage = fake_upstream(Behavior::Garbage).await;
    let dead = dead_port().await;
    let good = fake_upstream(Behavior::Answer(ip("192.0.2.9"))).await;
    let per = Duration::from_millis(1000);
    let r = resolver(vec![sf.addr, garbage.addr, dead, good.addr], per);
    let srv = start(r.handler(["front"])).await;
    let t0 = Instant::now();
    let (m, _) = udp(srv.udp, "example.com.", RecordType::A, None).await;
    // None of the failures needs a timeout to be detected.
    assert!(t0.elapsed() < per, "{:?}", t0.elapsed());
    assert_eq!(a_records(&m), vec![ip("192.0.2.9")]);
    assert_eq!(sf.udp_hits.load(Ordering::SeqCst), 1);
    assert_eq!(garbage.udp_hits.load(Ordering::SeqCst), 1);
    srv.stop().await;
}

#[tokio::test]
async fn all_upstreams_failing_is_servfail() {
    let sf = fake_upstream(Behavior::ServFail).await;
    let silent = fake_upstream(Behavior::Silent).await;
    let per = Duration::from_millis(200);
    let r = resolver(vec![sf.addr, silent.addr], per);
    let srv = start(r.handler(["front"])).await;
    let t0 = Instant::now();
    let (m, _) = udp(srv.udp, "example.com.", RecordType::A, None).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(t0.elapsed() < per * 2 + Duration::from_millis(500));
    srv.stop().await;
}

#[tokio::test]
async fn no_upstream_is_fast_servfail() {
    let r = resolver(vec![], Duration::from_millis(1500));
    let srv = start(r.handler(["front"])).await;
    let t0 = Instant::now();
    let (m, _) = udp(srv.udp, "example.com.", RecordType::A, None).await;
    let took = t0.elapsed();
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(took < Duration::from_millis(200), "{took:?}");
    let m = tcp(srv.tcp, "example.com.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    srv.stop().await;
}

#[tokio::test]
async fn truncated_upstream_answer_is_refetched_over_tcp() {
    let up = fake_upstream(Behavior::TruncateUdp(ip("198.51.100.0"))).await;
    let r = resolver(vec![up.addr], Duration::from_millis(1000));
    let srv = start(r.handler(["front"])).await;

    // The client over TCP gets all 50.
    let m = tcp(srv.tcp, "many.example.", RecordType::A).await;
    assert_eq!(m.answers.len(), 50);

    // Over UDP without EDNS: we fetched all 50 over TCP, and truncate for the client.
    let (m, len) = udp(srv.udp, "many.example.", RecordType::A, None).await;
    assert!(m.metadata.truncation);
    assert!(len <= 512);
    assert!(up.udp_hits.load(Ordering::SeqCst) >= 1);
    assert_eq!(up.tcp_hits.load(Ordering::SeqCst), 2);
    // With room for it, UDP carries everything.
    let (m, _) = udp(srv.udp, "many.example.", RecordType::A, Some(4096)).await;
    assert_eq!(m.answers.len(), 50);
    assert!(!m.metadata.truncation);
    srv.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Bad input

fn header(id: u16, flags: u16, qd: u16, an: u16, ns: u16, ar: u16) -> Vec<u8> {
    let mut v = Vec::new();
    for x in [id, flags, qd, an, ns, ar] {
        v.extend_from_slice(&x.to_be_bytes());
    }
    v
}

fn question(name_wire: &[u8], qtype: u16, qclass: u16) -> Vec<u8> {
    let mut v = name_wire.to_vec();
    v.extend_from_slice(&qtype.to_be_bytes());
    v.extend_from_slice(&qclass.to_be_bytes());
    v
}

const WEB: &[u8] = b"\x03web\x00";

fn rcode_of(raw: &[u8]) -> ResponseCode {
    Message::from_vec(raw)
        .expect("error response parses")
        .metadata
        .response_code
}

/// Each malformed input gets an error response or nothing; the listener keeps answering.
#[tokio::test]
async fn malformed_queries_get_errors_or_drops() {
    let r = resolver(vec![], Duration::from_millis(300));
    let srv = start(r.handler(["front"])).await;
    let short = Duration::from_millis(300);

    // Random bytes of various sizes (some shorter than a header).
    for len in [0usize, 1, 5, 11, 12, 13, 40, 300, 1400] {
        let bytes: Vec<u8> = (0..len).map(|_| rand::random::<u8>()).collect();
        if let Some(raw) = raw_udp(srv.udp, &bytes, short).await {
            assert!(raw.len() >= 12, "an answer is at least a header");
        }
    }

    // No question: FORMERR.
    let raw = raw_udp(srv.udp, &header(1, 0x0100, 0, 0, 0, 0), WAIT)
        .await
        .expect("answer");
    assert_eq!(rcode_of(&raw), ResponseCode::FormErr);

    // Two questions: FORMERR.
    let mut two = header(2, 0x0100, 2, 0, 0, 0);
    two.extend(question(WEB, 1, 1));
    two.extend(question(WEB, 1, 1));
    let raw = raw_udp(srv.udp, &two, WAIT).await.expect("answer");
    assert_eq!(rcode_of(&raw), ResponseCode::FormErr);

    // Question count larger than the message: FORMERR.
    let mut lying = header(3, 0x0100, 60000, 0, 0, 0);
    lying.extend(question(WEB, 1, 1));
    let raw = raw_udp(srv.udp, &lying, WAIT).await.expect("answer");
    assert_eq!(rcode_of(&raw), ResponseCode::FormErr);

    // Compression loop: the name points at itself.
    let mut looped = header(4, 0x0100, 1, 0, 0, 0);
    looped.extend(question(b"\xc0\x0c", 1, 1));
    let raw = raw_udp(srv.udp, &looped, WAIT).await.expect("answer");
    assert_eq!(rcode_of(&raw), ResponseCode::FormErr);
    // Two pointers pointing at each other.
    let mut pingpong = header(5, 0x0100, 1, 0, 0, 0);
    pingpong.extend(question(b"\x01a\xc0\x0e\xc0\x0c", 1, 1));
    let raw = raw_udp(srv.udp, &pingpong, WAIT).await.expect("answer");
    assert_eq!(rcode_of(&raw), ResponseCode::FormErr);

    // Question compressed into the header (fuzz finding): FORMERR that parses.
    let mut into_header = header(0x0209, 0x0100, 1, 0, 0, 0);
    into_header.extend(question(b"\xc0\x00", 0x0311, 0));
    let raw = raw_udp(srv.udp, &into_header, WAIT).await.expect("answer");
    assert_eq!(rcode_of(&raw), ResponseCode::FormErr);

    // Oversized name: 5 labels of 63 bytes (> 255).
    let mut long_name = Vec::new();
    for _ in 0..5 {
        long_name.push(63u8);
        long_name.extend(std::iter::repeat_n(b'a', 63));
    }
    long_name.push(0);
    let mut oversized = header(6, 0x0100, 1, 0, 0, 0);
    oversized.extend(question(&long_name, 1, 1));
    let raw = raw_udp(srv.udp, &oversized, WAIT).await.expect("answer");
    assert_eq!(rcode_of(&raw), ResponseCode::FormErr);

    // Chaos class (version.bind): REFUSED.
    let mut chaos = header(7, 0x0100, 1, 0, 0, 0);
    chaos.extend(question(b"\x07version\x04bind\x00", 16, 3));
    let raw = raw_udp(srv.udp, &chaos, WAIT).await.expect("answer");
    assert_eq!(rcode_of(&raw), ResponseCode::Refused);

    // Unknown class number: REFUSED.
    let mut odd_class = header(8, 0x0100, 1, 0, 0, 0);
    odd_class.extend(question(WEB, 1, 0x1234));
    let raw = raw_udp(srv.udp, &odd_class, WAIT).await.expect("answer");
    assert_eq!(rcode_of(&raw), ResponseCode::Refused);

    // Opcodes other than QUERY (NOTIFY=4, UPDATE=5, STATUS=2): NOTIMP.
    for op in [2u16, 4, 5] {
        let mut m = header(9, op << 11, 1, 0, 0, 0);
        m.extend(question(WEB, 6, 1));
        let raw = raw_udp(srv.udp, &m, WAIT).await.expect("answer");
        assert_eq!(rcode_of(&raw), ResponseCode::NotImp, "opcode {op}");
    }

    // AXFR over UDP: REFUSED.
    let mut axfr = header(10, 0x0000, 1, 0, 0, 0);
    axfr.extend(question(WEB, 252, 1));
    let raw = raw_udp(srv.udp, &axfr, WAIT).await.expect("answer");
    assert_eq!(rcode_of(&raw), ResponseCode::Refused);

    // EDNS version 1: BADVERS.
    let mut badvers = header(11, 0x0100, 1, 0, 0, 1);
    badvers.extend(question(WEB, 1, 1));
    // OPT: root name, type 41, class=payload 1232, ttl = ext-rcode 0, version 1, flags 0.
    badvers.extend_from_slice(b"\x00\x00\x29\x04\xd0\x00\x01\x00\x00\x00\x00");
    let raw = raw_udp(srv.udp, &badvers, WAIT).await.expect("answer");
    // Code 16 is both BADVERS and BADSIG; hickory decodes it as BADSIG, so compare numbers.
    assert_eq!(u16::from(rcode_of(&raw)), u16::from(ResponseCode::BADVERS));

    // A response (QR=1) is never answered: no reflection.
    let mut resp = header(12, 0x8100, 1, 0, 0, 0);
    resp.extend(question(WEB, 1, 1));
    assert!(raw_udp(srv.udp, &resp, short).await.is_none());

    // Still alive, on UDP and TCP.
    let (m, _) = udp(srv.udp, "web.", RecordType::A, None).await;
    assert_eq!(a_records(&m), vec![ip("10.1.0.2")]);

    // TCP: garbage on one connection, then a good query on another.
    let garbage: Vec<u8> = (0..64).map(|_| rand::random::<u8>()).collect();
    let _ = raw_tcp(srv.tcp, &garbage).await;
    let _ = raw_tcp(srv.tcp, &looped).await;
    // A connection that promises more than it sends, left hanging.
    let hanging = TcpStream::connect(srv.tcp).await.expect("connect");
    let mut hanging = hanging;
    hanging.write_all(b"\x01\x00abc").await.expect("write");
    let m = tcp(srv.tcp, "web.", RecordType::A).await;
    assert_eq!(a_records(&m), vec![ip("10.1.0.2")]);
    drop(hanging);

    srv.stop().await;
}

#[tokio::test]
async fn serve_stops_promptly_with_forwards_in_flight() {
    let silent = fake_upstream(Behavior::Silent).await;
    let r = resolver(vec![silent.addr], Duration::from_secs(5));
    let srv = start(r.handler(["front"])).await;
    // Leave a forward hanging on the silent upstream.
    let (_, q) = query_bytes("example.com.", RecordType::A, None);
    let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    client.send_to(&q, srv.udp).await.expect("send");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t0 = Instant::now();
    srv.stop().await;
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
}

// ---------------------------------------------------------------------------------------------
// The batching UDP loop

/// A burst larger than one `recvmmsg` batch, from many sockets, local and forwarded mixed:
/// every query gets exactly its own answer (id, records) at its own sender.
#[tokio::test]
async fn a_burst_of_mixed_queries_is_answered_to_each_sender() {
    let up = fake_upstream(Behavior::Answer(ip("192.0.2.9"))).await;
    let r = resolver(vec![up.addr], Duration::from_millis(1500));
    let srv = start(r.handler(["front"])).await;

    let mut clients = Vec::new();
    for _ in 0..8 {
        let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        s.connect(srv.udp).await.expect("connect");
        clients.push(s);
    }
    // 8 sockets x 25 queries, all sent before any answer is read.
    let mut sent: Vec<Vec<(u16, Ipv4Addr)>> = vec![Vec::new(); clients.len()];
    for (c, s) in clients.iter().enumerate() {
        for i in 0..25 {
            let (name, want) = match i % 5 {
                4 => ("far.example.", ip("192.0.2.9")),
                n if n % 2 == 0 => ("c1.", ip("10.1.0.10")),
                _ => ("db.", ip("10.1.0.11")),
            };
            let (id, q) = query_bytes(name, RecordType::A, None);
            s.send(&q).await.expect("send");
            sent[c].push((id, want));
        }
    }
    for (c, s) in clients.iter().enumerate() {
        let mut seen = std::collections::HashSet::new();
        let mut buf = vec![0u8; 4096];
        while seen.len() < sent[c].len() {
            let n = timeout(WAIT, s.recv(&mut buf))
                .await
                .expect("every query answered in time")
                .expect("recv");
            let m = Message::from_vec(&buf[..n]).expect("parse");
            let (id, want) = sent[c]
                .iter()
                .find(|(id, _)| *id == m.metadata.id)
                .copied()
                .expect("an answer to a query of this socket");
            assert_eq!(a_records(&m), vec![want], "id {id}");
            assert!(seen.insert(id), "answered twice: {id}");
        }
    }
    assert_eq!(up.udp_hits.load(Ordering::SeqCst), 8 * 5);
    srv.stop().await;
}

/// A query waiting for an upstream that does not answer holds back nothing: a local query
/// sent after it on the same socket is answered at once.
#[tokio::test]
async fn a_pending_forward_does_not_delay_local_answers() {
    let silent = fake_upstream(Behavior::Silent).await;
    let r = resolver(vec![silent.addr], Duration::from_millis(1500));
    let srv = start(r.handler(["front"])).await;
    let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    s.connect(srv.udp).await.expect("connect");
    let (_, far) = query_bytes("far.example.", RecordType::A, None);
    let (id, near) = query_bytes("c1.", RecordType::A, None);
    s.send(&far).await.expect("send");
    s.send(&near).await.expect("send");
    let started = Instant::now();
    let mut buf = vec![0u8; 4096];
    let n = timeout(WAIT, s.recv(&mut buf))
        .await
        .expect("answer")
        .expect("recv");
    let m = Message::from_vec(&buf[..n]).expect("parse");
    assert_eq!(m.metadata.id, id, "the local answer comes first");
    assert_eq!(a_records(&m), vec![ip("10.1.0.10")]);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    srv.stop().await;
}
