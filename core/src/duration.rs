//! Go-style duration strings (`30s`, `15m`, `1h30m`, `1.5h`), as the `Mesh` spells them,
//! and the waits between retries.

use std::time::Duration;

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("empty duration")]
    Empty,
    #[error("expected a number at {0:?}")]
    Number(String),
    #[error("unknown unit {0:?}; use ns, us, ms, s, m or h")]
    Unit(String),
    #[error("duration too long")]
    Overflow,
}

/// Parses a Go-style duration.
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    let mut rest = text;
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..num_len]
            .parse()
            .map_err(|_| DurationError::Number(rest.to_owned()))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let secs = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            other => return Err(DurationError::Unit(other.to_owned())),
        };
        rest = &rest[unit_len..];
        total += number * secs;
    }
    Duration::try_from_secs_f64(total).map_err(|_| DurationError::Overflow)
}

/// How long to wait before retry number `failures` (1 for the first) of something that
/// failed: `first`, doubling with each further failure, never more than `cap`.
pub fn backoff(failures: u32, first: Duration, cap: Duration) -> Duration {
    let doublings = failures.saturating_sub(1).min(31);
    first.saturating_mul(1 << doublings).min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_schema_admits() {
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("720h"), Ok(Duration::from_secs(720 * 3600)));
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
    }

    #[test]
    fn refuses_nonsense() {
        assert_eq!(parse(""), Err(DurationError::Empty));
        assert!(matches!(parse("5"), Err(DurationError::Unit(_))));
        assert!(matches!(parse("5d"), Err(DurationError::Unit(_))));
        assert!(matches!(parse("h"), Err(DurationError::Number(_))));
    }

    #[test]
    fn doubles_from_the_first_wait_up_to_the_cap() {
        let (first, cap) = (Duration::from_millis(500), Duration::from_secs(10));
        let waits: Vec<u128> = (1..=7)
            .map(|n| backoff(n, first, cap).as_millis())
            .collect();
        assert_eq!(waits, [500, 1000, 2000, 4000, 8000, 10_000, 10_000]);
        assert_eq!(backoff(0, first, cap), first);
        assert_eq!(backoff(u32::MAX, first, cap), cap);
    }
}
