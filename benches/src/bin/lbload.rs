//! `lbload ADDR:PORT MODE WORKERS SECS`: the load generator of the
//! load-balancer benchmark (wrk is not installed here). MODE `new`: every
//! request on a new connection (connect, request, read the whole answer,
//! close); `keepalive`: each worker keeps one connection and sends requests
//! on it one after the other. Prints one JSON line: requests/s, errors,
//! latency p50/p99 in microseconds (per request, connect included for `new`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";

/// Reads one response (headers and Content-Length body); false on any error.
fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    buf.clear();
    let mut chunk = [0u8; 2048];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return head.starts_with("http/1.1 200");
            }
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn worker(addr: SocketAddr, keepalive: bool, until: Instant) -> (Vec<u32>, u64) {
    let mut lat = Vec::with_capacity(1 << 16);
    let mut errors = 0u64;
    let mut buf = Vec::with_capacity(512);
    let mut conn: Option<TcpStream> = None;
    let timeout = Some(Duration::from_secs(2));
    while Instant::now() < until {
        let t0 = Instant::now();
        let mut s = match conn.take() {
            Some(s) => s,
            None => match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    let _ = s.set_read_timeout(timeout);
                    let _ = s.set_write_timeout(timeout);
                    s
                }
                Err(_) => {
                    errors += 1;
                    thread::sleep(Duration::from_millis(10));
                    continue;
                }
            },
        };
        if s.write_all(REQUEST).is_err() || !read_response(&mut s, &mut buf) {
            errors += 1;
            continue;
        }
        lat.push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
        if keepalive {
            conn = Some(s);
        } else {
            // Close from our side, as a client does: our port goes to TIME_WAIT.
            drop(s);
        }
    }
    (lat, errors)
}

fn pct(sorted: &[u32], p: f64) -> Option<u32> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    Some(sorted[i])
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: lbload ADDR:PORT new|keepalive WORKERS SECS");
        std::process::exit(2);
    }
    let addr: SocketAddr = args[1].parse().expect("ADDR:PORT");
    let keepalive = match args[2].as_str() {
        "new" => false,
        "keepalive" => true,
        m => panic!("unknown mode {m}"),
    };
    let workers: usize = args[3].parse().expect("WORKERS");
    let secs: f64 = args[4].parse().expect("SECS");
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(secs);
    let handles: Vec<_> = (0..workers)
        .map(|_| thread::spawn(move || worker(addr, keepalive, until)))
        .collect();
    let mut lat = Vec::new();
    let mut errors = 0;
    for h in handles {
        let (l, e) = h.join().expect("worker");
        lat.extend(l);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let f = |v: Option<u32>| v.map_or("null".to_owned(), |v| v.to_string());
    println!(
        "{{\"mode\":\"{}\",\"workers\":{workers},\"secs\":{elapsed:.3},\"requests\":{},\"errors\":{errors},\"rps\":{:.1},\"p50_us\":{},\"p99_us\":{}}}",
        args[2],
        lat.len(),
        lat.len() as f64 / elapsed,
        f(pct(&lat, 0.50)),
        f(pct(&lat, 0.99)),
    )
}
