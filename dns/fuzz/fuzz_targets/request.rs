//! Arbitrary bytes as a DNS query, through the same parsing, handler and encoding as a real
//! listener (`ScopedHandler::answer_bytes`), over both transports. No upstream is configured,
//! so nothing leaves the process. Beyond "no panic", checks what every answer must satisfy.

#![no_main]

use std::net::Ipv4Addr;
use std::sync::{Arc, OnceLock};

use hickory_proto::op::Message;
use libfuzzer_sys::fuzz_target;
use netagent_dns::{
    DnsView, Endpoint, MAX_UDP_PAYLOAD, PortProto, PublishedPort, Resolver, ResolverConfig,
    ScopedHandler, Service, Transport,
};

struct Env {
    rt: tokio::runtime::Runtime,
    handler: ScopedHandler,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let resolver: Arc<Resolver> = Resolver::new(ResolverConfig::default());
        let mut v = DnsView::new();
        v.network_mut("front")
            .insert_service(
                "web",
                Service {
                    endpoint: Endpoint::Vip(Ipv4Addr::new(10, 1, 0, 2)),
                    tasks: (0..60).map(|i| Ipv4Addr::new(10, 1, 1, i)).collect(),
                    ports: vec![PublishedPort {
                        port: 80,
                        proto: PortProto::Tcp,
                    }],
                },
            )
            .insert_container("c1", Ipv4Addr::new(10, 1, 0, 10))
            .insert_alias("db", Ipv4Addr::new(10, 1, 0, 11));
        v.network_mut("back")
            .insert_container("c2", Ipv4Addr::new(10, 2, 0, 10));
        resolver.publish(&v);
        let handler = resolver.handler(["front"]);
        Env { rt, handler }
    })
}

fuzz_target!(|data: &[u8]| {
    let env = env();
    for transport in [Transport::Udp, Transport::Tcp] {
        let Some(out) = env.rt.block_on(env.handler.answer_bytes(data, transport)) else {
            continue;
        };
        assert!(out.len() >= 12, "an answer is at least a header");
        if transport == Transport::Udp {
            assert!(
                out.len() <= usize::from(MAX_UDP_PAYLOAD),
                "UDP answer too big"
            );
        }
        // The answer echoes the query's id.
        assert_eq!(out[..2], data[..2], "id not echoed");
        // And it is a DNS message a client can parse.
        if let Err(e) = Message::from_vec(&out) {
            panic!("unparsable answer ({e}): {out:02x?}");
        }
    }
});
