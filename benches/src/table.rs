//! The result tables, as plain text for the terminal and as Markdown for
//! the README: the overlay benchmark's here, and the layout every table uses.

use crate::overlay::{Medians, Ratio, Report};
use crate::setups::Kind;

/// One metric row: how to read it from the medians and from a ratio.
struct Metric {
    label: &'static str,
    value: fn(&Medians) -> Option<f64>,
    ratio: fn(&Ratio) -> Option<f64>,
    /// Decimal places of the values.
    places: usize,
}

const METRICS: &[Metric] = &[
    Metric {
        label: "TCP throughput, Gbit/s",
        value: |m| m.throughput_bps.map(|b| b / 1e9),
        ratio: |r| r.throughput,
        places: 2,
    },
    Metric {
        label: "CPU s per GB (machine)",
        value: |m| m.cpu_s_per_gb,
        ratio: |r| r.cpu_per_gb,
        places: 2,
    },
    Metric {
        label: "TCP RTT avg, us",
        value: |m| m.rtt_avg_us,
        ratio: |r| r.rtt_avg,
        places: 1,
    },
    Metric {
        label: "TCP RTT p50, us",
        value: |m| m.rtt_p50_us,
        ratio: |r| r.rtt_p50,
        places: 1,
    },
    Metric {
        label: "TCP RTT p99, us",
        value: |m| m.rtt_p99_us,
        ratio: |r| r.rtt_p99,
        places: 1,
    },
];

pub fn fmt(v: Option<f64>, places: usize) -> String {
    v.map_or("-".to_owned(), |v| format!("{v:.places$}"))
}

/// Header cells and rows: metric, a, b, c, a/b, a/c ("-" where not measured).
fn cells(report: &Report) -> (Vec<String>, Vec<Vec<String>>) {
    let setup = |k: Kind| report.setups.iter().find(|s| s.key == k);
    let ratio = |name: &str| report.ratios.iter().find(|r| r.name == name);
    let columns = report.suite.columns;
    let mut header = vec!["".to_owned()];
    header.extend(
        columns
            .iter()
            .map(|k| format!("({}) {}", report.suite.letter(*k), k.short())),
    );
    header.extend(["a/b".to_owned(), "a/c".to_owned()]);

    let mut rows = vec![{
        let mut row = vec!["MTU".to_owned()];
        row.extend(
            columns
                .iter()
                .map(|&k| setup(k).map_or("-".to_owned(), |s| s.mtu.to_string())),
        );
        row.extend(["".to_owned(), "".to_owned()]);
        row
    }];
    for m in METRICS {
        let mut row = vec![m.label.to_owned()];
        row.extend(
            columns
                .iter()
                .map(|&k| fmt(setup(k).and_then(|s| (m.value)(&s.median)), m.places)),
        );
        row.extend(["a/b", "a/c"].map(|n| fmt(ratio(n).and_then(|r| (m.ratio)(r)), 2)));
        rows.push(row);
    }
    (header, rows)
}

fn preamble(report: &Report) -> Vec<String> {
    let m = &report.method;
    vec![
        format!("{} benchmark, {}", report.bench, report.date),
        format!("machine: {}", report.machine.summary()),
        format!("path: {}", m.path),
        format!(
            "medians of {} runs each, interleaved; throughput: {}; RTT: {}",
            m.runs, m.throughput, m.rtt
        ),
        format!("placement: {}", crate::overlay::describe_pin(m.pin)),
        format!(
            "tools: {}; {}; netagent {} build (eBPF programs: release); took {:.0} s",
            m.iperf3_version, m.sockperf_version, m.netagent_build, report.elapsed_secs
        ),
    ]
}

/// What each column is, with its notes.
fn legend(report: &Report) -> Vec<String> {
    report
        .setups
        .iter()
        .map(|s| {
            let notes = match s.notes.is_empty() {
                true => String::new(),
                false => format!(" ({})", s.notes.join("; ")),
            };
            format!(
                "({}) {}{notes}; lab {}",
                report.suite.letter(s.key),
                s.key,
                s.lab
            )
        })
        .collect()
}

pub fn plain(report: &Report) -> String {
    let (header, rows) = cells(report);
    let mut out = preamble(report);
    out.push(String::new());
    out.extend(grid_plain(&header, &rows));
    out.push(String::new());
    out.extend(legend(report));
    out.push(format!("a/b, a/c: {}", report.suite.targets));
    out.join("\n")
}

pub fn markdown(report: &Report) -> String {
    let (header, rows) = cells(report);
    let mut out: Vec<String> = preamble(report).into_iter().map(|l| l + "  ").collect();
    out.push(String::new());
    out.extend(grid_markdown(&header, &rows));
    out.push(String::new());
    out.extend(legend(report).into_iter().map(|l| format!("- {l}")));
    out.join("\n")
}

/// Aligned columns: the first left-aligned (labels), the others right-aligned (numbers).
pub fn grid_plain(header: &[String], rows: &[Vec<String>]) -> Vec<String> {
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            std::iter::once(header)
                .chain(rows.iter().map(Vec::as_slice))
                .map(|r| r[i].len())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |r: &[String]| {
        r.iter()
            .enumerate()
            .map(|(i, c)| match i {
                0 => format!("{c:<w$}", w = widths[i]),
                _ => format!("{c:>w$}", w = widths[i]),
            })
            .collect::<Vec<_>>()
            .join("   ")
            .trim_end()
            .to_owned()
    };
    std::iter::once(line(header))
        .chain(rows.iter().map(|r| line(r)))
        .collect()
}

/// A Markdown table, numbers right-aligned.
pub fn grid_markdown(header: &[String], rows: &[Vec<String>]) -> Vec<String> {
    let line = |r: &[String]| format!("| {} |", r.join(" | "));
    let rule = format!(
        "|{}|",
        header
            .iter()
            .enumerate()
            .map(|(i, _)| if i == 0 { "---" } else { "---:" })
            .collect::<Vec<_>>()
            .join("|")
    );
    [line(header), rule]
        .into_iter()
        .chain(rows.iter().map(|r| line(r)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids() {
        let header = vec!["".to_owned(), "a".to_owned(), "bb".to_owned()];
        let rows = vec![vec![
            "long label".to_owned(),
            "1.5".to_owned(),
            "-".to_owned(),
        ]];
        assert_eq!(
            grid_plain(&header, &rows),
            ["               a   bb", "long label   1.5    -"]
        );
        assert_eq!(
            grid_markdown(&header, &rows),
            [
                "|  | a | bb |",
                "|---|---:|---:|",
                "| long label | 1.5 | - |"
            ]
        );
        assert_eq!(fmt(Some(2.0 / 3.0), 2), "0.67");
        assert_eq!(fmt(None, 2), "-");
    }
}
