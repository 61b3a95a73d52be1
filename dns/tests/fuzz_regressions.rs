//! Inputs found by the fuzz target (dns/fuzz), kept as regression tests: each must get an
//! answer a client can parse (or none), on both transports, and never a panic.

use std::net::Ipv4Addr;

use hickory_proto::op::{Message, ResponseCode};
use netagent_dns::{
    DnsView, Endpoint, Resolver, ResolverConfig, ScopedHandler, Service, Transport,
};

fn handler() -> ScopedHandler {
    let r = Resolver::new(ResolverConfig::default());
    let mut v = DnsView::new();
    v.network_mut("front").insert_service(
        "web",
        Service {
            endpoint: Endpoint::Vip(Ipv4Addr::new(10, 1, 0, 2)),
            tasks: vec![Ipv4Addr::new(10, 1, 1, 1)],
            ports: vec![],
        },
    );
    r.publish(v.clone());
    r.handler(["front"])
}

async fn check(input: &[u8]) -> Option<Message> {
    let h = handler();
    let mut last = None;
    for t in [Transport::Udp, Transport::Tcp] {
        if let Some(out) = h.answer_bytes(input, t).await {
            assert_eq!(out[..2], input[..2], "id echoed");
            let m =
                Message::from_vec(&out).unwrap_or_else(|e| panic!("unparsable ({e}): {out:02x?}"));
            last = Some(m);
        }
    }
    last
}

/// The question name is a compression pointer to offset 0, i.e. into the header. It decodes
/// (to a label made of header bytes), but hickory echoes the question verbatim and the
/// answer's header differs, so the echoed question was garbage: now FORMERR, no question.
#[tokio::test]
async fn question_pointing_into_header() {
    let input = [
        0x02, 0x09, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xc0, 0x00, 0x03,
        0x11, 0x00, 0x00, 0x01, 0x00, 0x00, 0xff,
    ];
    let m = check(&input).await.expect("an answer");
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    assert!(m.queries.is_empty());
}

/// Same trick hidden behind a normal first label.
#[tokio::test]
async fn question_label_then_pointer_into_header() {
    let mut input = vec![
        0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    ];
    input.extend_from_slice(b"\x03web\xc0\x04\x00\x01\x00\x01");
    if let Some(m) = check(&input).await {
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    }
}
