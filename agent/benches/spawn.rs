//! Cost of starting a sandbox process as the agent's memory grows (`cargo bench -p netagent
//! --bench spawn`, root): (a) `sandbox::spawn` (clone with CLONE_VM | CLONE_VFORK: nothing
//! of the agent is copied) against (b) what it did before, std's `Command` with a `pre_exec`
//! step (setsid, setns), which forks. Each start runs `true` in the bench's own network
//! namespace and waits for it; the process holds `MB` of touched heap, as an agent holds its
//! view (60 MB at 3000 endpoints). Wall time and the CPU time of the process and its children
//! (getrusage) per start, medians of 5 rounds of 100 starts, one thread.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use netagent::sandbox::{self, LogTarget, SpawnRequest};

const STARTS: u32 = 100;
const ROUNDS: usize = 5;

fn cpu() -> Duration {
    let mut total = Duration::ZERO;
    for who in [libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN] {
        // SAFETY: rusage is plain data, filled by getrusage.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: a valid out pointer.
        unsafe { libc::getrusage(who, &mut ru) };
        for tv in [ru.ru_utime, ru.ru_stime] {
            total += Duration::new(tv.tv_sec as u64, tv.tv_usec as u32 * 1000);
        }
    }
    total
}

/// (wall, cpu) per start of `start`, median of the rounds.
fn measure(mut start: impl FnMut()) -> (Duration, Duration) {
    let mut walls = Vec::new();
    let mut cpus = Vec::new();
    for _ in 0..ROUNDS {
        let (t, c) = (Instant::now(), cpu());
        for _ in 0..STARTS {
            start();
        }
        walls.push(t.elapsed() / STARTS);
        cpus.push((cpu() - c) / STARTS);
    }
    walls.sort();
    cpus.sort();
    (walls[ROUNDS / 2], cpus[ROUNDS / 2])
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("spawn bench: needs root (setns); skipped");
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let netns = std::path::PathBuf::from("/proc/self/ns/net");
    let log = std::env::temp_dir().join(format!("spawn-bench-{}.log", std::process::id()));
    let req = SpawnRequest {
        netns: netns.clone(),
        argv: vec!["true".into()],
        resolv_conf: None,
        log: LogTarget::File(log.clone()),
        env: Vec::new(),
        hosts_file: None,
        hostname: None,
        mounts: Vec::new(),
        secrets: Vec::new(),
    };
    let mut ballast: Vec<Vec<u8>> = Vec::new();
    println!("start `true` in a network namespace and wait for it, per start:");
    println!(
        "| agent memory | (a) clone(VM, VFORK) wall / CPU | (b) fork + pre_exec wall / CPU | a/b wall | a/b CPU |"
    );
    println!("|---:|---:|---:|---:|---:|");
    for mb in [20usize, 60, 200] {
        while ballast.len() < mb {
            // Touched, so it is resident and in the page tables a fork copies.
            ballast.push(vec![1u8; 1 << 20]);
        }
        let (a_wall, a_cpu) = measure(|| {
            let handle = sandbox::spawn(&req).expect("spawn");
            rt.block_on(sandbox::wait_exit(&handle, Duration::from_secs(10)))
                .expect("wait")
                .expect("exited");
        });
        let ns = std::fs::File::open(&netns).expect("netns");
        let ns_fd = ns.as_raw_fd();
        let (b_wall, b_cpu) = measure(|| {
            let mut cmd = Command::new("true");
            cmd.env_clear();
            // SAFETY: only async-signal-safe system calls between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setsid() < 0 || libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            cmd.spawn().expect("spawn").wait().expect("wait");
        });
        println!(
            "| {mb} MB | {:.0} / {:.0} us | {:.0} / {:.0} us | {:.2} | {:.2} |",
            a_wall.as_secs_f64() * 1e6,
            a_cpu.as_secs_f64() * 1e6,
            b_wall.as_secs_f64() * 1e6,
            b_cpu.as_secs_f64() * 1e6,
            a_wall.as_secs_f64() / b_wall.as_secs_f64(),
            a_cpu.as_secs_f64() / b_cpu.as_secs_f64(),
        );
    }
    let _ = std::fs::remove_file(&log);
    drop(ballast);
}
