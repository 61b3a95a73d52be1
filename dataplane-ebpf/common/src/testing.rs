//! Input and output of the test-hook programs.

/// Input of the test hooks (see [`program_names::FROM_OVERLAY_TEST`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TestInput {
    /// The VNI `from_overlay_test` treats the packet as received with.
    pub vni: u32,
    /// The outer source address (the sending node, network order) `from_overlay_test`
    /// treats the packet as received from.
    pub remote_node: [u8; 4],
    /// Non-zero: as received on the tunnel's VXLAN device (out of WireGuard).
    pub encrypted: u32,
}

/// What a test hook saw of the skb after the program's decision, so tests can check side
/// effects that BPF_PROG_TEST_RUN does not report (it copies out only data and a few fields).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TestObservation {
    /// Incremented by every test-hook run, so a test can tell a fresh record from a stale one.
    pub runs: u32,
    /// The verdict the program returned.
    pub verdict: u32,
    /// Return value of `bpf_skb_get_tunnel_key` on the skb after the program (0: a tunnel
    /// key is set and the fields below are valid; negative errno otherwise, e.g. -EINVAL
    /// when the skb carries no tunnel metadata).
    pub tunnel_key_status: i32,
    /// `tunnel_id` of the key: the VNI.
    pub tunnel_id: u32,
    /// Outer destination address of the key, octets in network order.
    pub tunnel_remote: [u8; 4],
    /// Outer TTL of the key.
    pub tunnel_ttl: u8,
    /// Outer TOS of the key.
    pub tunnel_tos: u8,
    /// `skb->pkt_type` after the program (0 = PACKET_HOST).
    pub pkt_type: u8,
    /// Explicit padding.
    pub _pad: u8,
}
