//! Upstream resolvers from a resolv.conf.

use std::net::{IpAddr, SocketAddr};

/// The `nameserver` entries of a resolv.conf, in order, on port 53.
///
/// Loopback entries (e.g. systemd-resolved's 127.0.0.53) are kept: forwarding happens from the
/// agent's (host) namespace, where they are reachable. IPv6 zone suffixes (`fe80::1%eth0`) are
/// not representable in a `SocketAddr` and are skipped, as are malformed lines.
pub fn upstreams_from_resolv_conf(text: &str) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or("");
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(addr) = words.next() else {
            continue;
        };
        if let Ok(ip) = addr.parse::<IpAddr>() {
            let sa = SocketAddr::new(ip, 53);
            if !out.contains(&sa) {
                out.push(sa);
            }
        }
    }
    out
}

/// Parses a `--dns-upstream` value: `IP` or `IP:PORT` (`[v6]:PORT` for IPv6).
pub fn parse_upstream(s: &str) -> Option<SocketAddr> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(sa);
    }
    s.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nameservers() {
        let text = "# comment\nsearch example.com\nnameserver 10.0.0.1\nnameserver 127.0.0.53 # local\n\
                    nameserver ::1\nnameserver fe80::1%eth0\nnameserver\nnameserver 10.0.0.1\noptions ndots:0\n";
        let got = upstreams_from_resolv_conf(text);
        let want: Vec<SocketAddr> = vec![
            "10.0.0.1:53".parse().expect("a"),
            "127.0.0.53:53".parse().expect("a"),
            "[::1]:53".parse().expect("a"),
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn parses_upstream_flag() {
        assert_eq!(parse_upstream("1.2.3.4"), "1.2.3.4:53".parse().ok());
        assert_eq!(parse_upstream("1.2.3.4:5353"), "1.2.3.4:5353".parse().ok());
        assert_eq!(parse_upstream("[::1]:5353"), "[::1]:5353".parse().ok());
        assert_eq!(parse_upstream("::1"), "[::1]:53".parse().ok());
        assert_eq!(parse_upstream("nope"), None);
    }
}
