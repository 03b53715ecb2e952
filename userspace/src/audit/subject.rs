//! The data-subject index: personal values as keyed hashes.
//!
//! Raw personal data is never stored, yet a data-subject request ("which
//! sessions touched alice@example.com?") must be answerable. Each detected
//! value is normalised and hashed with HMAC-SHA256 under a key only root can
//! read ([`super::keys`]); the index maps that hash to sessions and
//! statements. Looking a value up means hashing it with the same key.
//!
//! Values reach the index two ways: adapters and the policy engine report
//! values they saw before masking through [`super::Recorder::subject_index`];
//! and the writer scans every recorded event for obvious personal values
//! (e-mail addresses) with [`detect`].

use std::sync::OnceLock;

use hmac::{Hmac, Mac};
use regex::Regex;
use sha2::Sha256;

use super::record::Hash;

/// The keyed hash of a personal value.
pub fn subject_hash(key: &[u8; 32], value: &str) -> Hash {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(normalise(value).as_bytes());
    mac.finalize().into_bytes().into()
}

/// Case and surrounding space do not make another person.
fn normalise(value: &str) -> String {
    value.trim().to_lowercase()
}

fn email() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
            .expect("valid e-mail pattern")
    })
}

/// A personal value found in a recorded event, with where it was.
#[derive(Debug, PartialEq, Eq)]
pub struct Detected {
    pub value: String,
    pub session: Option<String>,
    pub statement_seq: Option<u64>,
}

/// Personal values (e-mail addresses) in an event's JSON text. Masked
/// values (`a***@example.com`) do not match.
///
/// The session is the event's `session` field; the statement its
/// `statement_seq` field (adapters: name it so).
pub fn detect(payload: &str) -> Vec<Detected> {
    if !payload.contains('@') {
        return Vec::new();
    }
    let Ok(event) = serde_json::from_str::<serde_json::Value>(payload) else {
        return Vec::new();
    };
    let mut values = Vec::new();
    collect(&event, &mut values);
    values.sort();
    values.dedup();
    let session = event["session"].as_str().map(str::to_owned);
    let statement_seq = event["statement_seq"].as_u64();
    values
        .into_iter()
        .map(|value| Detected {
            value,
            session: session.clone(),
            statement_seq,
        })
        .collect()
}

fn collect(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::String(s) => {
            out.extend(email().find_iter(s).map(|m| normalise(m.as_str())));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect(v, out)),
        serde_json::Value::Object(map) => map.values().for_each(|v| collect(v, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_addresses_in_statement_text_and_parameters() {
        let found = detect(
            r#"{"event":"statement","session":"s1","statement_seq":4,
                "text":"SELECT * FROM users WHERE email = 'Alice@Example.com'",
                "parameters":["bob@example.org","x"]}"#,
        );
        let values: Vec<_> = found.iter().map(|d| d.value.as_str()).collect();
        assert_eq!(values, ["alice@example.com", "bob@example.org"]);
        assert_eq!(found[0].session.as_deref(), Some("s1"));
        assert_eq!(found[0].statement_seq, Some(4));
    }

    #[test]
    fn masked_values_are_not_personal_data() {
        assert!(detect(r#"{"text":"a***@example.com, ***@***"}"#).is_empty());
    }

    #[test]
    fn hash_ignores_case_and_depends_on_the_key() {
        let a = subject_hash(&[1; 32], "Alice@Example.com ");
        assert_eq!(a, subject_hash(&[1; 32], "alice@example.com"));
        assert_ne!(a, subject_hash(&[2; 32], "alice@example.com"));
    }
}
