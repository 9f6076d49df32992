//! Durations as written in resources (`30m`, `1h`, `1h30m`, `90s`, `7d`): parsing and formatting.

use std::time::Duration;

/// Why a duration string was refused. The text says what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected a duration like 30m, 1h or 24h")]
pub struct DurationError;

/// Parses a duration made of one or more `<digits><unit>` parts, units `d`, `h`,
/// `m`, `s` in that order, each at most once (`1h30m`, `90s`, `24h`, `7d`).
///
/// Zero, negative, fractional, empty and unit-less values are refused: every
/// place a duration appears in a resource (an interval, a grace period) needs a
/// positive span, and `0` is more likely a mistake than "never".
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    const UNITS: [(char, u64); 4] = [('d', 86_400), ('h', 3_600), ('m', 60), ('s', 1)];
    if text.is_empty() {
        return Err(DurationError);
    }
    let mut total: u64 = 0;
    // Index into UNITS of the next unit allowed, so units come largest first and once.
    let mut next_unit = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 12 {
            return Err(DurationError);
        }
        let value: u64 = rest[..digits].parse().map_err(|_| DurationError)?;
        let unit = rest[digits..].chars().next().ok_or(DurationError)?;
        let pos = UNITS[next_unit..]
            .iter()
            .position(|(u, _)| *u == unit)
            .ok_or(DurationError)?;
        let (_, secs) = UNITS[next_unit + pos];
        next_unit += pos + 1;
        total = value
            .checked_mul(secs)
            .and_then(|v| total.checked_add(v))
            .ok_or(DurationError)?;
        rest = &rest[digits + unit.len_utf8()..];
    }
    if total == 0 {
        return Err(DurationError);
    }
    Ok(Duration::from_secs(total))
}

/// Formats a duration in the canonical form [`parse_duration`] reads back:
/// whole seconds, largest units first, zero parts left out (`1h30m`, `90s` is `1m30s`).
/// Hours are not folded into days so that `24h` stays `24h`.
pub fn format_duration(d: Duration) -> String {
    let mut secs = d.as_secs();
    if secs == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    for (unit, size) in [('h', 3_600), ('m', 60), ('s', 1)] {
        let n = secs / size;
        secs %= size;
        if n > 0 {
            out.push_str(&n.to_string());
            out.push(unit);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_and_refuses() {
        for (text, secs) in [
            ("30m", 1800),
            ("1h", 3600),
            ("24h", 86_400),
            ("90s", 90),
            ("1h30m", 5400),
            ("7d", 604_800),
            ("1d12h", 129_600),
        ] {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_secs(secs)),
                "{text}"
            );
        }
        for text in [
            "",
            "0",
            "0s",
            "1x",
            "-1h",
            "1",
            "h",
            "1.5h",
            "30m1h",
            "1h1h",
            " 1h",
            "1h ",
            "1H",
            "99999999999999h",
        ] {
            assert_eq!(parse_duration(text), Err(DurationError), "{text:?}");
        }
    }

    proptest! {
        #[test]
        fn format_then_parse_round_trips(secs in 1u64..10_000_000_000) {
            let d = Duration::from_secs(secs);
            let text = format_duration(d);
            prop_assert_eq!(parse_duration(&text), Ok(d));
        }

        #[test]
        fn parse_then_format_is_canonical(h in 0u64..1000, m in 0u64..60, s in 0u64..60) {
            prop_assume!(h + m + s > 0);
            let mut text = String::new();
            if h > 0 { text.push_str(&format!("{h}h")); }
            if m > 0 { text.push_str(&format!("{m}m")); }
            if s > 0 { text.push_str(&format!("{s}s")); }
            let d = parse_duration(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(format_duration(d), text);
        }
    }
}
