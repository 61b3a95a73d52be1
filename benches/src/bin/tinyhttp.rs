//! `tinyhttp PORT [NAME]`: a minimal HTTP/1.1 responder for the load-balancer
//! benchmark (nginx is not installed here). Every request gets
//! `200 OK` with NAME (default: the host name) as its body; connections are
//! kept alive until the client closes them. A fixed pool of threads, one per
//! CPU, accepts; each serves one connection at a time to its end.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;

fn serve(mut s: TcpStream, reply: &[u8]) {
    let _ = s.set_nodelay(true);
    let mut buf = [0u8; 4096];
    let mut have = 0usize;
    loop {
        // Answer every complete request in the buffer.
        while let Some(end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
            if s.write_all(reply).is_err() {
                return;
            }
            let used = end + 4;
            buf.copy_within(used..have, 0);
            have -= used;
        }
        if have == buf.len() {
            return; // a header too large: not our client
        }
        match s.read(&mut buf[have..]) {
            Ok(0) | Err(_) => return,
            Ok(n) => have += n,
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let port: u16 = args.get(1).and_then(|p| p.parse().ok()).unwrap_or(80);
    let name = args.get(2).cloned().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "tinyhttp".to_owned())
    });
    let reply = Arc::new(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{}",
            name.len(),
            name
        )
        .into_bytes(),
    );
    let listener = Arc::new(TcpListener::bind(("0.0.0.0", port)).expect("bind"));
    // Enough threads that keep-alive clients holding connections do not
    // starve new ones: connections per thread are served one at a time.
    let threads = std::env::var("TINYHTTP_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(64usize);
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let l = Arc::clone(&listener);
            let r = Arc::clone(&reply);
            thread::spawn(move || {
                loop {
                    if let Ok((s, _)) = l.accept() {
                        serve(s, &r);
                    }
                }
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
}
