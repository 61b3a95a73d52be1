//! The shared [`Resolver`] and the per-container [`ScopedHandler`] hickory serves.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_proto::op::{Edns, Header, HeaderCounts, Message, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncoder};
use hickory_server::net::NetError;
use hickory_server::net::runtime::{Time, TokioTime};
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder, Queries};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::forward::{self, ForwardError, ForwardOptions};
use crate::lookup::{self, Local};
use crate::stats::{QueryResult, QueryStats, StatsSnapshot};
use crate::view::{CompiledView, DnsView, NetworkNames, normalize};

/// Default time budget for one upstream before failing over to the next.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_millis(1500);
/// Largest UDP answer we send, whatever the client's EDNS says: beyond it the answer is
/// truncated and the client retries over TCP. 127.0.0.11 is loopback, so fragmentation is not
/// the concern; this only bounds what one datagram costs us.
pub const MAX_UDP_PAYLOAD: u16 = 4096;
/// Forwarded queries one listener (one container) may have in flight; past it, SERVFAIL at
/// once. Local answers are never limited. Bounds the sockets and tasks a flooding container
/// can make the agent hold while upstreams are slow.
pub const MAX_FORWARDS_IN_FLIGHT: usize = 256;

/// Upstream configuration of a [`Resolver`].
#[derive(Clone, Debug)]
pub struct ResolverConfig {
    /// Upstream resolvers, asked in this order.
    pub upstreams: Vec<SocketAddr>,
    /// Time budget per upstream (UDP try plus TCP retry of a truncated answer).
    pub upstream_timeout: Duration,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        Self {
            upstreams: Vec::new(),
            upstream_timeout: DEFAULT_UPSTREAM_TIMEOUT,
        }
    }
}

/// The node-wide resolver: the current view and the upstreams. One per agent, shared by every
/// container's [`ScopedHandler`].
#[derive(Debug)]
pub struct Resolver {
    view: ArcSwap<CompiledView>,
    /// The view `view` was compiled from: the next publish compiles only what differs.
    source: Mutex<DnsView>,
    upstreams: ArcSwap<Vec<SocketAddr>>,
    upstream_timeout: Duration,
    stats: QueryStats,
}

impl Resolver {
    /// A resolver with an empty view.
    pub fn new(config: ResolverConfig) -> Arc<Self> {
        Arc::new(Self {
            view: ArcSwap::from_pointee(CompiledView::default()),
            source: Mutex::new(DnsView::default()),
            upstreams: ArcSwap::from_pointee(config.upstreams),
            upstream_timeout: config.upstream_timeout,
            stats: QueryStats::default(),
        })
    }

    /// Queries answered by every listener so far, by result, and their latency.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Replaces the view. Compiles, on the calling task, the networks whose names differ
    /// from the last view's (and compares the others); the next query on any listener sees
    /// it, queries in progress finish on the old one.
    pub fn publish(&self, view: DnsView) {
        // Held while compiling: two publishers would otherwise diff against the same source.
        let mut source = self.source.lock().unwrap_or_else(PoisonError::into_inner);
        let compiled = CompiledView::compile_from(&view, &source, &self.view.load());
        debug!(
            networks = compiled.networks.len(),
            names = compiled.all_names.len(),
            "dns view published"
        );
        self.view.store(Arc::new(compiled));
        *source = view;
    }

    /// Replaces the names of the networks in `changed` (`None`: the network has no names any
    /// more) and keeps every other network as it is: the cost is that of the changed networks
    /// alone, whatever the size of the rest.
    pub fn publish_networks(&self, changed: Vec<(String, Option<NetworkNames>)>) {
        let mut source = self.source.lock().unwrap_or_else(PoisonError::into_inner);
        let changed: Vec<(String, Option<NetworkNames>)> = changed
            .into_iter()
            .map(|(name, names)| (normalize(&name), names))
            .filter(|(key, _)| !key.is_empty())
            .collect();
        let compiled = CompiledView::with_networks(&self.view.load(), &changed);
        self.view.store(Arc::new(compiled));
        for (key, names) in changed {
            // Every spelling of the network goes; the new names stay under the normalised one.
            source.networks.retain(|name, _| normalize(name) != key);
            if let Some(names) = names {
                source.networks.insert(key, names);
            }
        }
    }

    /// Replaces the upstream list (e.g. after the node's resolv.conf changed).
    pub fn set_upstreams(&self, upstreams: Vec<SocketAddr>) {
        self.upstreams.store(Arc::new(upstreams));
    }

    /// The current upstream list.
    pub fn upstreams(&self) -> Vec<SocketAddr> {
        self.upstreams.load().as_ref().clone()
    }

    /// A handler answering for a container on `networks`.
    pub fn handler<S: AsRef<str>>(
        self: &Arc<Self>,
        networks: impl IntoIterator<Item = S>,
    ) -> ScopedHandler {
        ScopedHandler::new(self.clone(), networks)
    }
}

/// How a query reached us; decides the answer size limit and how upstreams are asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Datagram: answers limited to 512 bytes or the client's EDNS size, TC set beyond.
    Udp,
    /// Stream: answers up to 64 KiB.
    Tcp,
}

/// Answers the DNS queries of one container: the view restricted to the container's networks,
/// and forwarding for the rest. Cheap to clone; clones share the scope, so the agent can keep
/// one to call [`ScopedHandler::set_networks`] when the container joins or leaves a network.
#[derive(Clone, Debug)]
pub struct ScopedHandler {
    resolver: Arc<Resolver>,
    scope: Arc<ArcSwap<Vec<Box<str>>>>,
    forward_slots: Arc<Semaphore>,
}

impl ScopedHandler {
    /// A handler for a container on `networks`.
    pub fn new<S: AsRef<str>>(
        resolver: Arc<Resolver>,
        networks: impl IntoIterator<Item = S>,
    ) -> Self {
        Self {
            resolver,
            scope: Arc::new(ArcSwap::from_pointee(scope_of(networks))),
            forward_slots: Arc::new(Semaphore::new(MAX_FORWARDS_IN_FLIGHT)),
        }
    }

    /// Changes the networks this handler (and all its clones) answers for.
    pub fn set_networks<S: AsRef<str>>(&self, networks: impl IntoIterator<Item = S>) {
        self.scope.store(Arc::new(scope_of(networks)));
    }

    /// The networks this handler answers for (normalised: lower case).
    pub fn networks(&self) -> Vec<String> {
        self.scope.load().iter().map(|s| s.to_string()).collect()
    }

    /// The shared resolver.
    pub fn resolver(&self) -> &Arc<Resolver> {
        &self.resolver
    }

    /// Answers one raw DNS message as the server would, without sockets: parsing, the same
    /// handler, and encoding with the size limit of `transport`. `None` means the server would
    /// send nothing (shorter than a header, or not a query). Used by tests and the fuzz target.
    pub async fn answer_bytes(&self, message: &[u8], transport: Transport) -> Option<Vec<u8>> {
        self.answer_vec(message.to_vec(), transport).await
    }

    /// [`Self::answer_bytes`] taking the message by value (the UDP loop's path: no copy).
    pub async fn answer_vec(&self, message: Vec<u8>, transport: Transport) -> Option<Vec<u8>> {
        let src: SocketAddr = (Ipv4Addr::LOCALHOST, 53000).into();
        let protocol = match transport {
            Transport::Udp => Protocol::Udp,
            Transport::Tcp => Protocol::Tcp,
        };
        let capture = Capture {
            out: Arc::default(),
            tcp: transport == Transport::Tcp,
        };
        // Kept for FORMERR: the request takes the message.
        let header = message.get(..12).map(<[u8]>::to_vec);
        match Request::from_bytes(message, src, protocol) {
            Ok(request) => {
                if request.metadata.message_type != hickory_proto::op::MessageType::Query {
                    return None;
                }
                self.handle_request::<_, TokioTime>(&request, capture.clone())
                    .await;
            }
            Err(_) => {
                // Like hickory's server: FORMERR if at least the header can be read, else drop.
                let header = header?;
                let mut decoder = BinDecoder::new(&header);
                let header = Header::read(&mut decoder).ok()?;
                let mut meta = Metadata::response_from_request(&header.metadata);
                meta.response_code = ResponseCode::FormErr;
                let mut msg = Message::new(meta.id, meta.message_type, meta.op_code);
                msg.metadata = meta;
                return msg.to_vec().ok();
            }
        }
        capture.out.lock().ok()?.take()
    }

    async fn decide(&self, request: &Request) -> Outcome {
        let meta = &request.metadata;
        if question_has_pointer(request.queries.as_bytes(), request.queries.len()) {
            return Outcome::FormErrWithoutQuestion;
        }
        if meta.op_code != OpCode::Query {
            return Outcome::Error(ResponseCode::NotImp);
        }
        // Exactly one question: that is what every resolver sends, and RFC 9619 makes it the
        // rule for QUERY.
        let [query] = request.queries.queries() else {
            return Outcome::Error(ResponseCode::FormErr);
        };
        if let Some(edns) = &request.edns
            && edns.version() > 0
        {
            return Outcome::Error(ResponseCode::BADVERS);
        }
        if query.query_class() != DNSClass::IN {
            return Outcome::Error(ResponseCode::Refused);
        }
        let qtype = query.query_type();
        if matches!(
            qtype,
            RecordType::AXFR | RecordType::IXFR | RecordType::OPT | RecordType::TSIG
        ) {
            // Zone transfers and meta types are not questions a stub resolver asks.
            return Outcome::Error(ResponseCode::Refused);
        }

        let local = {
            // Lock-free loads; the guards are dropped before any await.
            let view = self.resolver.view.load();
            let scope = self.scope.load();
            lookup::resolve(&view, &scope, query.name(), query.original().name(), qtype)
        };
        match local {
            Local::Answer {
                answers,
                additionals,
            } => Outcome::Local {
                rcode: ResponseCode::NoError,
                answers,
                additionals,
            },
            Local::NxDomain => Outcome::Local {
                rcode: ResponseCode::NXDomain,
                answers: Vec::new(),
                additionals: Vec::new(),
            },
            Local::Forward => self.forward(request, query.original()).await,
        }
    }

    async fn forward(&self, request: &Request, query: &hickory_proto::op::Query) -> Outcome {
        let upstreams = self.resolver.upstreams.load_full();
        if upstreams.is_empty() {
            debug!(name = %query.name(), "no upstream resolver: SERVFAIL");
            return Outcome::Error(ResponseCode::ServFail);
        }
        let Ok(_permit) = self.forward_slots.try_acquire() else {
            // debug, not warn: under a flood this fires per query.
            debug!(error = %ForwardError::Busy, "not forwarding: SERVFAIL");
            return Outcome::Error(ResponseCode::ServFail);
        };
        let opts = ForwardOptions {
            tcp: request.protocol() == Protocol::Tcp,
            recursion_desired: request.metadata.recursion_desired,
            checking_disabled: request.metadata.checking_disabled,
            dnssec_ok: request.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok),
        };
        match forward::forward(&upstreams, self.resolver.upstream_timeout, query, opts).await {
            Ok(msg) => Outcome::Forwarded(Box::new(msg)),
            Err(e) => {
                debug!(name = %query.name(), error = %e, "forwarding failed: SERVFAIL");
                Outcome::Error(ResponseCode::ServFail)
            }
        }
    }
}

fn scope_of<S: AsRef<str>>(networks: impl IntoIterator<Item = S>) -> Vec<Box<str>> {
    let mut out: Vec<Box<str>> = Vec::new();
    for n in networks {
        let n = normalize(n.as_ref());
        if !n.is_empty() && !out.iter().any(|o| **o == *n) {
            out.push(n.into_boxed_str());
        }
    }
    out
}

/// Whether a name in the raw question section uses compression (or a reserved label type).
///
/// hickory echoes the question section byte for byte. The only thing before the first question
/// is the header, which differs between query and answer, so a pointer there decodes to another
/// (often invalid) name in the answer. No real client compresses its question, so such a query
/// is malformed for us. Found by the fuzz target; truncated input also counts as malformed.
fn question_has_pointer(raw: &[u8], count: usize) -> bool {
    let mut pos = 0usize;
    for _ in 0..count {
        loop {
            let Some(&len) = raw.get(pos) else {
                return true;
            };
            if len == 0 {
                pos += 1;
                break;
            }
            if len & 0xC0 != 0 {
                return true;
            }
            pos += 1 + usize::from(len);
        }
        // QTYPE and QCLASS.
        pos += 4;
    }
    false
}

enum Outcome {
    Error(ResponseCode),
    /// FORMERR without echoing a question that cannot be echoed faithfully.
    FormErrWithoutQuestion,
    Local {
        rcode: ResponseCode,
        answers: Vec<Record>,
        additionals: Vec<Record>,
    },
    Forwarded(Box<Message>),
}

/// The EDNS record of our answer: present iff the query had one (RFC 6891), and its payload
/// size is what hickory truncates UDP answers to, so it carries the client's size, capped.
fn response_edns(request: &Request) -> Option<Edns> {
    let req = request.edns.as_ref()?;
    let mut edns = Edns::new();
    edns.set_max_payload(request.max_payload().clamp(512, MAX_UDP_PAYLOAD));
    edns.set_dnssec_ok(req.flags().dnssec_ok);
    Some(edns)
}

#[async_trait::async_trait]
impl RequestHandler for ScopedHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let edns = response_edns(request);
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(e) = &edns {
            builder.edns(e);
        }
        let mut meta = Metadata::response_from_request(&request.metadata);
        // We recurse (by forwarding) for every client.
        meta.recursion_available = true;

        let started = std::time::Instant::now();
        let outcome = self.decide(request).await;
        let result = match &outcome {
            Outcome::Local { rcode, .. } if *rcode == ResponseCode::NXDomain => {
                QueryResult::NxDomain
            }
            Outcome::Local { .. } => QueryResult::Local,
            Outcome::Forwarded(_) => QueryResult::Forwarded,
            Outcome::Error(_) | Outcome::FormErrWithoutQuestion => QueryResult::Error,
        };
        let no_question = Queries::read(&mut BinDecoder::new(&[]), 0).ok();
        let sent = match &outcome {
            Outcome::FormErrWithoutQuestion => {
                meta.response_code = ResponseCode::FormErr;
                let mut builder = match &no_question {
                    Some(q) => MessageResponseBuilder::new(q, None),
                    // Reading zero questions cannot fail; if it ever did, echoing is the
                    // lesser evil compared to not answering.
                    None => MessageResponseBuilder::from_message_request(request),
                };
                if let Some(e) = &edns {
                    builder.edns(e);
                }
                response_handle
                    .send_response(builder.build_no_records(meta))
                    .await
            }
            Outcome::Error(rcode) => {
                meta.response_code = *rcode;
                response_handle
                    .send_response(builder.build_no_records(meta))
                    .await
            }
            Outcome::Local {
                rcode,
                answers,
                additionals,
            } => {
                meta.response_code = *rcode;
                meta.authoritative = true;
                response_handle
                    .send_response(builder.build(meta, answers, [], [], additionals))
                    .await
            }
            Outcome::Forwarded(msg) => {
                meta.response_code = msg.metadata.response_code;
                meta.authentic_data = msg.metadata.authentic_data;
                response_handle
                    .send_response(builder.build(
                        meta,
                        &msg.answers,
                        &msg.authorities,
                        [],
                        &msg.additionals,
                    ))
                    .await
            }
        };
        self.resolver.stats.record(result, started.elapsed());
        match sent {
            Ok(info) => info,
            Err(e) => {
                warn!(error = %e, "failed to send DNS response");
                let mut meta = Metadata::response_from_request(&request.metadata);
                meta.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata: meta,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }
}

/// A [`ResponseHandler`] that encodes into memory with the limits hickory's UDP and TCP
/// servers apply (its own encoder is crate-private).
#[derive(Clone)]
struct Capture {
    out: Arc<Mutex<Option<Vec<u8>>>>,
    tcp: bool,
}

#[async_trait::async_trait]
impl ResponseHandler for Capture {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let max = if self.tcp {
            u16::MAX
        } else {
            response.edns().map_or(512, |e| e.max_payload())
        };
        let mut bytes = Vec::with_capacity(512);
        let mut encoder = BinEncoder::new(&mut bytes);
        encoder.set_max_size(max);
        let info = response
            .destructive_emit(&mut encoder)
            .map_err(|e| NetError::from(e.to_string()))?;
        if let Ok(mut slot) = self.out.lock() {
            *slot = Some(bytes);
        }
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::{Endpoint, Service};
    use hickory_proto::op::{MessageType, Query};
    use hickory_proto::rr::Name;

    fn handler() -> ScopedHandler {
        let r = Resolver::new(ResolverConfig::default());
        let mut v = DnsView::new();
        v.network_mut("front").insert_service(
            "web",
            Service {
                endpoint: Endpoint::Vip(Ipv4Addr::new(10, 1, 0, 2)),
                tasks: (0..100).map(|i| Ipv4Addr::new(10, 1, 1, i)).collect(),
                ports: vec![],
            },
        );
        r.publish(v.clone());
        r.handler(["front"])
    }

    #[test]
    fn published_networks_leave_the_resolver_as_a_whole_publish_would() {
        let r = Resolver::new(ResolverConfig::default());
        let mut v = DnsView::new();
        v.network_mut("a")
            .insert_container("x", Ipv4Addr::new(10, 0, 0, 3));
        v.network_mut("Old")
            .insert_container("y", Ipv4Addr::new(10, 9, 0, 3));
        r.publish(v.clone());
        let mut a = v.networks["a"].clone();
        a.insert_container("z", Ipv4Addr::new(10, 0, 0, 4));
        r.publish_networks(vec![("a".into(), Some(a.clone())), ("old".into(), None)]);
        let after = r.view.load_full();
        assert!(after.networks["a"].names.contains_key("z"));
        assert!(!after.networks.contains_key("old"));
        assert!(!after.all_names.contains_key("y"));
        // The source followed: publishing the equivalent whole view compiles nothing again.
        let mut whole = DnsView::new();
        whole.networks.insert("a".into(), a);
        r.publish(whole);
        assert!(Arc::ptr_eq(
            &after.networks["a"],
            &r.view.load().networks["a"]
        ));
    }

    fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::new(7, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).expect("name"), t));
        m.to_vec().expect("encode")
    }

    fn rcode(bytes: &[u8]) -> ResponseCode {
        Message::from_vec(bytes)
            .expect("parse")
            .metadata
            .response_code
    }

    #[tokio::test]
    async fn answers_bytes_like_the_server() {
        let h = handler();
        let out = h
            .answer_bytes(&query("web.", RecordType::A), Transport::Udp)
            .await
            .expect("answer");
        let m = Message::from_vec(&out).expect("parse");
        assert_eq!(m.metadata.id, 7);
        assert_eq!(m.answers.len(), 1);

        let out = h
            .answer_bytes(&query("tasks.web.", RecordType::A), Transport::Udp)
            .await
            .expect("answer");
        assert!(out.len() <= 512);
        assert!(Message::from_vec(&out).expect("parse").metadata.truncation);
        let out = h
            .answer_bytes(&query("tasks.web.", RecordType::A), Transport::Tcp)
            .await
            .expect("answer");
        assert_eq!(Message::from_vec(&out).expect("parse").answers.len(), 100);
    }

    #[tokio::test]
    async fn no_upstream_servfail() {
        let h = handler();
        let out = h
            .answer_bytes(&query("example.com.", RecordType::A), Transport::Udp)
            .await
            .expect("answer");
        assert_eq!(rcode(&out), ResponseCode::ServFail);
    }

    #[tokio::test]
    async fn malformed_inputs() {
        let h = handler();
        // Shorter than a header: dropped.
        assert!(h.answer_bytes(&[1, 2, 3], Transport::Udp).await.is_none());
        // Header only, no question: FORMERR.
        let hdr = [0u8, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let out = h.answer_bytes(&hdr, Transport::Udp).await.expect("answer");
        assert_eq!(rcode(&out), ResponseCode::FormErr);
        // Compression loop in the question: FORMERR.
        let mut looped = vec![0u8, 2, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        looped.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
        let out = h
            .answer_bytes(&looped, Transport::Udp)
            .await
            .expect("answer");
        assert_eq!(rcode(&out), ResponseCode::FormErr);
        // A response is not answered.
        let mut resp = query("web.", RecordType::A);
        resp[2] |= 0x80;
        assert!(h.answer_bytes(&resp, Transport::Udp).await.is_none());
    }

    #[tokio::test]
    async fn busy_forwarding_is_servfail_not_a_wait() {
        let r = Resolver::new(ResolverConfig {
            // Never contacted: the semaphore decides before any socket is opened.
            upstreams: vec![(Ipv4Addr::LOCALHOST, 9).into()],
            upstream_timeout: Duration::from_secs(5),
        });
        let h = r.handler(["front"]);
        let permits = h
            .forward_slots
            .clone()
            .try_acquire_many_owned(MAX_FORWARDS_IN_FLIGHT as u32)
            .expect("all permits");
        let out = tokio::time::timeout(
            Duration::from_secs(1),
            h.answer_bytes(&query("example.com.", RecordType::A), Transport::Udp),
        )
        .await
        .expect("immediate")
        .expect("answer");
        assert_eq!(rcode(&out), ResponseCode::ServFail);
        drop(permits);
    }
}
