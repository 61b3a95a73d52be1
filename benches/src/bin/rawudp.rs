//! `rawudp`: sends one UDP datagram with any source address (a raw socket), for tests that
//! play an attacker on the fabric: `rawudp --src 198.18.0.12 --dst 198.18.0.11 --sport 4789
//! --dport 4789 --payload FILE [--count N]`.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    src: Ipv4Addr,
    #[arg(long)]
    dst: Ipv4Addr,
    #[arg(long)]
    sport: u16,
    #[arg(long)]
    dport: u16,
    /// The UDP payload.
    #[arg(long)]
    payload: PathBuf,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    count: u32,
}

fn sum(b: &[u8]) -> u32 {
    b.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let payload =
        std::fs::read(&a.payload).with_context(|| format!("reading {}", a.payload.display()))?;
    let total = 28 + payload.len();
    if total > 65_535 {
        bail!("payload too large");
    }
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&a.src.octets());
    p[16..20].copy_from_slice(&a.dst.octets());
    let c = fold(sum(&p[..20]));
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p[20..22].copy_from_slice(&a.sport.to_be_bytes());
    p[22..24].copy_from_slice(&a.dport.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(&payload);
    let pseudo = sum(&a.src.octets()) + sum(&a.dst.octets()) + 17 + (8 + payload.len()) as u32;
    let c = fold(pseudo + sum(&p[20..]));
    p[26..28].copy_from_slice(&(if c == 0 { 0xffff } else { c }).to_be_bytes());
    // SAFETY: socket(2) with constants.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("raw socket (needs root)");
    }
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.dst.octets()),
        },
        sin_zero: [0; 8],
    };
    for _ in 0..a.count {
        // SAFETY: a valid buffer and address.
        let n = unsafe {
            libc::sendto(
                fd,
                p.as_ptr().cast(),
                p.len(),
                0,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if n < 0 {
            bail!("sendto: {}", std::io::Error::last_os_error());
        }
    }
    // SAFETY: our fd.
    unsafe { libc::close(fd) };
    Ok(())
}
