//! `synflood`: sends a bounded burst of TCP SYNs to one address and port from one source
//! address, each from another source port, through a raw socket. The test suite uses it to show
//! that a flood of half-open connections larger than the conntrack tables cannot push out
//! established connections. Never runs unbounded: `--count` SYNs, then it exits.
//!
//! `synflood --dst 198.18.0.11 --port 8080 --count 20000 [--src 198.18.0.100]`

use std::net::Ipv4Addr;

use anyhow::{Context as _, bail};
use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    dst: Ipv4Addr,
    #[arg(long)]
    port: u16,
    /// How many SYNs (at most 10 million).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    count: u32,
    /// Source address (default: the one the route to --dst uses is not known to a raw
    /// socket, so it must be given).
    #[arg(long)]
    src: Ipv4Addr,
}

fn sum(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

fn fold(mut s: u32) -> [u8; 2] {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    (!(s as u16)).to_be_bytes()
}

fn syn(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, seq: u32) -> [u8; 40] {
    let mut p = [0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let ip_csum = fold(sum(&p[..20]));
    p[10..12].copy_from_slice(&ip_csum);
    let t = &mut p[20..];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = 0x02; // SYN
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let pseudo = sum(&src.octets()) + sum(&dst.octets()) + 6 + 20;
    let csum = fold(pseudo + sum(t));
    t[16..18].copy_from_slice(&csum);
    p
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("raw socket (needs root)");
    }
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(args.dst.octets()),
        },
        sin_zero: [0; 8],
    };
    let mut sent = 0u32;
    for i in 0..args.count {
        // Source ports cycle through 1024..65535; the sequence number keeps repeats distinct.
        let sport = 1024 + (i % 64_000) as u16;
        let pkt = syn(args.src, args.dst, sport, args.port, 0x1000_0000 ^ i);
        // SAFETY: a valid buffer and address of the right length.
        let n = unsafe {
            libc::sendto(
                fd,
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            // A full socket buffer under a flood is expected: wait a little and go on.
            if e.raw_os_error() == Some(libc::ENOBUFS) {
                std::thread::sleep(std::time::Duration::from_micros(200));
                continue;
            }
            bail!("sendto: {e}");
        }
        sent += 1;
    }
    // SAFETY: closing our own fd.
    unsafe { libc::close(fd) };
    println!("sent {sent} SYNs to {}:{}", args.dst, args.port);
    Ok(())
}
