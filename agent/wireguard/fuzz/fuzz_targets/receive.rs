//! Arbitrary datagrams at the WireGuard port, from a peer's endpoint or a stranger's, against
//! an engine with an established session: nothing may panic, and nothing but VXLAN from the
//! peer's tunnel address may come out.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netagent_wireguard::fuzzing::{Pair, check_receive};

fuzz_target!(|data: &[u8]| {
    thread_local! {
        static PAIR: Pair = Pair::new();
    }
    PAIR.with(|p| check_receive(p, data));
});
