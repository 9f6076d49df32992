//! Label selectors in kubectl syntax (`env=prod,tier in (a,b),!legacy`),
//! parsed into the model's [`LabelSelector`] so that listing and placement
//! match labels the same way.

use imgfleet::model::{LabelSelector, LabelSelectorRequirement, SelectorOperator};

/// A selector that is not valid kubectl syntax; the message says where and
/// what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("label selector {selector:?}: {message}")]
pub struct SelectorError {
    pub selector: String,
    pub message: String,
}

/// Parse `text`. An empty selector matches everything.
///
/// Supported: `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k`
/// (exists) and `!k` (does not exist), joined by commas.
pub fn parse_selector(text: &str) -> Result<LabelSelector, SelectorError> {
    let err = |message: String| SelectorError {
        selector: text.to_string(),
        message,
    };
    let mut sel = LabelSelector::default();
    for part in split_top_level(text).map_err(&err)? {
        let part = part.trim();
        if part.is_empty() {
            if text.trim().is_empty() {
                continue;
            }
            return Err(err("empty requirement between commas".into()));
        }
        if let Some(key) = part.strip_prefix('!') {
            let key = check_key(key.trim()).map_err(&err)?;
            sel.match_expressions
                .push(req(key, SelectorOperator::DoesNotExist, vec![]));
        } else if let Some((k, v)) = part.split_once("!=") {
            let key = check_key(k.trim()).map_err(&err)?;
            let v = check_value(v.trim()).map_err(&err)?;
            sel.match_expressions
                .push(req(key, SelectorOperator::NotIn, vec![v]));
        } else if let Some((k, v)) = part.split_once('=') {
            let key = check_key(k.trim()).map_err(&err)?;
            let v = v.strip_prefix('=').unwrap_or(v);
            let v = check_value(v.trim()).map_err(&err)?;
            if let Some(old) = sel.match_labels.insert(key.clone(), v.clone())
                && old != v
            {
                return Err(err(format!(
                    "key {key:?} must equal both {old:?} and {v:?}"
                )));
            }
        } else if let Some((k, op, rest)) = set_based(part) {
            let key = check_key(k).map_err(&err)?;
            let inner = rest
                .trim()
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(|| err(format!("{part:?}: expected {k} {op} (v1,v2)")))?;
            let values = inner
                .split(',')
                .map(|v| check_value(v.trim()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(&err)?;
            if values.iter().all(String::is_empty) {
                return Err(err(format!("{part:?}: expected at least one value")));
            }
            let op = if op == "in" {
                SelectorOperator::In
            } else {
                SelectorOperator::NotIn
            };
            sel.match_expressions.push(req(key, op, values));
        } else {
            let key = check_key(part).map_err(&err)?;
            sel.match_expressions
                .push(req(key, SelectorOperator::Exists, vec![]));
        }
    }
    Ok(sel)
}

fn req(key: String, operator: SelectorOperator, values: Vec<String>) -> LabelSelectorRequirement {
    LabelSelectorRequirement {
        key,
        operator,
        values,
    }
}

/// `key in (...)` / `key notin (...)`: returns key, operator word and the rest.
fn set_based(part: &str) -> Option<(&str, &'static str, &str)> {
    let (key, rest) = part.split_once(char::is_whitespace)?;
    let rest = rest.trim_start();
    for op in ["notin", "in"] {
        if let Some(after) = rest.strip_prefix(op)
            && (after.starts_with(char::is_whitespace) || after.starts_with('('))
        {
            return Some((key, op, after));
        }
    }
    None
}

fn split_top_level(text: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err("unbalanced ')'".into());
                }
            }
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unbalanced '('".into());
    }
    parts.push(&text[start..]);
    Ok(parts)
}

fn check_key(key: &str) -> Result<String, String> {
    let ok = !key.is_empty()
        && key.len() <= 317
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if ok {
        Ok(key.to_string())
    } else {
        Err(format!(
            "key {key:?}: expected a label key (letters, digits, '-', '_', '.', optional prefix/)"
        ))
    }
}

fn check_value(v: &str) -> Result<String, String> {
    let ok = v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(v.to_string())
    } else {
        Err(format!(
            "value {v:?}: expected a label value (up to 63 letters, digits, '-', '_', '.')"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn check(selector: &str, pairs: &[(&str, &str)], want: bool) {
        let sel = parse_selector(selector).unwrap_or_else(|e| panic!("{selector}: {e}"));
        assert_eq!(sel.matches(&labels(pairs)), want, "{selector} on {pairs:?}");
    }

    #[test]
    fn matching_table() {
        check("", &[], true);
        check("env=prod", &[("env", "prod")], true);
        check("env==prod", &[("env", "dev")], false);
        check("env!=prod", &[], true);
        check("env!=prod", &[("env", "prod")], false);
        check("tier in (a, b)", &[("tier", "b")], true);
        check("tier in (a,b)", &[("tier", "c")], false);
        check("tier notin (a,b)", &[("tier", "c")], true);
        check("gpu", &[("gpu", "")], true);
        check("!gpu", &[("gpu", "x")], false);
        check(
            "env=prod, tier in (a,b), !legacy",
            &[("env", "prod"), ("tier", "a")],
            true,
        );
        check("region in (eu)", &[("region", "eu")], true);
    }

    #[test]
    fn bad_selectors_are_explained() {
        for bad in [
            "env=",
            "tier in (a",
            "tier in a",
            "a,,b",
            "=x",
            "k=v w",
            "a=1,a=2",
            "in)",
        ] {
            let e = parse_selector(bad);
            // "env=" is a valid selector for an empty value in kubectl; allow it.
            if bad == "env=" {
                assert!(e.is_ok());
                continue;
            }
            let msg = e.expect_err(bad).to_string();
            assert!(msg.contains(bad), "{msg}");
        }
    }
}
