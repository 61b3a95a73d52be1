//! Query counters and a latency histogram, shared by every listener of a [`crate::Resolver`]:
//! plain atomics, read by the agent's metrics endpoint.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// How a query ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueryResult {
    /// Answered from the view (a name of the asker's networks).
    Local,
    /// A name nobody may see from there: NXDOMAIN from the view.
    NxDomain,
    /// Forwarded, and the upstream's answer relayed (whatever its code).
    Forwarded,
    /// Malformed, refused, unsupported, or forwarding failed (SERVFAIL).
    Error,
}

impl QueryResult {
    pub const ALL: [QueryResult; 4] = [
        QueryResult::Local,
        QueryResult::NxDomain,
        QueryResult::Forwarded,
        QueryResult::Error,
    ];

    pub fn name(self) -> &'static str {
        match self {
            QueryResult::Local => "local",
            QueryResult::NxDomain => "nxdomain",
            QueryResult::Forwarded => "forwarded",
            QueryResult::Error => "error",
        }
    }
}

/// Upper bounds (seconds) of the latency buckets: 50 us (a local answer) to 5 s (an
/// upstream timing out and the next one answering).
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0, 5.0,
];

#[derive(Debug, Default)]
pub struct QueryStats {
    results: [AtomicU64; 4],
    /// Per bucket (not cumulative); the last slot is +Inf.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

/// A consistent-enough copy for one scrape.
#[derive(Debug, Clone, PartialEq)]
pub struct StatsSnapshot {
    pub results: [(QueryResult, u64); 4],
    /// (upper bound, count in that bucket alone), +Inf last.
    pub buckets: Vec<(f64, u64)>,
    pub sum_secs: f64,
    pub count: u64,
}

impl QueryStats {
    pub fn record(&self, result: QueryResult, took: Duration) {
        self.results[result as usize].fetch_add(1, Relaxed);
        let secs = took.as_secs_f64();
        let slot = LATENCY_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[slot].fetch_add(1, Relaxed);
        self.sum_ns
            .fetch_add(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let results = QueryResult::ALL.map(|r| (r, self.results[r as usize].load(Relaxed)));
        let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.buckets.iter().map(|b| b.load(Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        StatsSnapshot {
            results,
            buckets,
            sum_secs: self.sum_ns.load(Relaxed) as f64 / 1e9,
            count,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_results_and_sorts_latencies_into_buckets() {
        let s = QueryStats::default();
        s.record(QueryResult::Local, Duration::from_micros(30));
        s.record(QueryResult::Local, Duration::from_micros(400));
        s.record(QueryResult::Forwarded, Duration::from_millis(3));
        s.record(QueryResult::Error, Duration::from_secs(9));
        let snap = s.snapshot();
        assert_eq!(snap.results[0], (QueryResult::Local, 2));
        assert_eq!(snap.results[2], (QueryResult::Forwarded, 1));
        assert_eq!(snap.results[3], (QueryResult::Error, 1));
        assert_eq!(snap.count, 4);
        assert_eq!(snap.buckets[0], (0.00005, 1));
        assert_eq!(snap.buckets[3], (0.0005, 1));
        assert_eq!(snap.buckets[6], (0.005, 1));
        assert_eq!(snap.buckets.last().unwrap().1, 1, "over 5 s: +Inf");
        assert!((snap.sum_secs - 9.00343).abs() < 1e-9);
    }
}
