//! What every command's settings share: the error that names a bad one
//! (the binary exits 64 with it) and the duration syntax.

use std::time::Duration;

/// A bad setting: which one and why.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {message}")]
pub struct ConfigError {
    /// The flag and value, e.g. `--credentials /etc/imgfleet`.
    pub setting: String,
    /// What is wrong and what was expected.
    pub message: String,
}

impl ConfigError {
    /// `setting` is wrong: `message` says why and what was expected.
    pub fn new(setting: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            setting: setting.into(),
            message: message.into(),
        }
    }
}

/// Parses a duration like `30m`, `24h` or `0s`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    // The model's durations are never zero; a zero grace period is useful here.
    if s.trim_end_matches(['s', 'm', 'h', 'd']) == "0" {
        return Some(Duration::ZERO);
    }
    imgfleet::model::parse_duration(s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_zero() {
        assert_eq!(parse_duration("0s"), Some(Duration::ZERO));
        assert_eq!(parse_duration("30m"), Some(Duration::from_secs(1800)));
        assert_eq!(parse_duration("soon"), None);
    }
}
