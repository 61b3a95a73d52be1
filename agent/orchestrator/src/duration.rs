//! Durations as Docker's flags spell them: `300ms`, `2s`, `1m30s`, `1h`, or `0`.

use std::time::Duration;

/// Parses `s`; the error names what is wrong with it.
pub fn parse(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    if t.is_empty() {
        return Err("empty duration".into());
    }
    if t.starts_with('-') {
        return Err(format!("invalid duration {s:?}: must not be negative"));
    }
    let mut total: u128 = 0;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("invalid duration {s:?}: expected a number"));
        }
        let (num, tail) = rest.split_at(digits);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let nanos_per: u128 = match unit {
            "ns" => 1,
            "us" | "µs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => {
                return Err(format!(
                    "invalid duration {s:?}: missing unit (ms, s, m or h)"
                ));
            }
            other => return Err(format!("invalid duration {s:?}: unknown unit {other:?}")),
        };
        let value: f64 = num
            .parse()
            .map_err(|_| format!("invalid duration {s:?}: bad number {num:?}"))?;
        total += (value * nanos_per as f64) as u128;
        rest = next;
    }
    // A day is far beyond anything these settings mean; larger values are typos.
    if total > 24 * 3_600_000_000_000 {
        return Err(format!("invalid duration {s:?}: longer than 24h"));
    }
    Ok(Duration::from_nanos(total as u64))
}

/// Milliseconds of a parsed duration, the unit specs store.
pub fn parse_ms(s: &str) -> Result<u64, String> {
    parse(s).map(|d| d.as_millis() as u64)
}

/// Docker-like text for a duration given in milliseconds: `0s`, `500ms`, `2s`, `1m30s`.
pub fn format_ms(ms: u64) -> String {
    if ms == 0 {
        return "0s".into();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, m, s, rest) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if rest > 0 {
        out.push_str(&format!("{}s", s as f64 + rest as f64 / 1000.0));
    } else if s > 0 {
        out.push_str(&format!("{s}s"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_spellings() {
        assert_eq!(parse_ms("2s"), Ok(2000));
        assert_eq!(parse_ms("300ms"), Ok(300));
        assert_eq!(parse_ms("1m30s"), Ok(90_000));
        assert_eq!(parse_ms("1.5s"), Ok(1500));
        assert_eq!(parse_ms("1h"), Ok(3_600_000));
        assert_eq!(parse_ms("0"), Ok(0));
        for bad in ["", "5", "-1s", "s", "2x", "1s2", "25h"] {
            assert!(parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(parse("5").unwrap_err().contains("missing unit"));
    }

    #[test]
    fn formatting() {
        assert_eq!(format_ms(0), "0s");
        assert_eq!(format_ms(250), "250ms");
        assert_eq!(format_ms(2000), "2s");
        assert_eq!(format_ms(90_000), "1m30s");
        assert_eq!(format_ms(1500), "1.5s");
        assert_eq!(format_ms(3_600_000), "1h");
    }
}
