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

use std::{fmt::Write as _, sync::OnceLock};

use hmac::{Hmac, Mac};
use regex::Regex;
use sha2::Sha256;

use super::record::Hash;
use crate::policy::detect::{Builtin, Detector, Stats};

/// Personal data worth taking out of recorded statement text: shapes or
/// checksums that ordinary SQL does not have, so a statement stays readable.
const STATEMENT_DETECTORS: [(Builtin, &str); 4] = [
    (Builtin::Email, "email"),
    (Builtin::Card, "card"),
    (Builtin::Iban, "iban"),
    (Builtin::Ssn, "ssn"),
];

/// Replaces the personal values in `text` (a statement, a bound parameter,
/// an error message) by `[kind:1a2b3c4d]`, the start of the value's keyed
/// hash, and pushes each value's full keyed hash onto `found` for the
/// subject index. The raw value is never stored; `audit subject VALUE`
/// still finds the statement.
pub fn redact(key: &[u8; 32], text: &mut String, found: &mut Vec<Hash>) {
    let stats = Stats::of(text.as_bytes());
    let mut hits: Vec<(usize, usize, &str)> = Vec::new();
    for (builtin, name) in STATEMENT_DETECTORS {
        let detector = Detector::Builtin(builtin);
        if detector.may_match(&stats) {
            detector.each_match(text.as_bytes(), &mut |start, end| {
                hits.push((start, end, name))
            });
        }
    }
    if hits.is_empty() {
        return;
    }
    hits.sort_unstable();
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for (start, end, name) in hits {
        // Overlapping matches (a card inside an IBAN): the first one wins.
        if start < at || !text.is_char_boundary(start) || !text.is_char_boundary(end) {
            continue;
        }
        let hash = subject_hash(key, &text[start..end]);
        found.push(hash);
        out.push_str(&text[at..start]);
        let _ = write!(out, "[{name}:{}]", hex::encode(&hash[..4]));
        at = end;
    }
    out.push_str(&text[at..]);
    *text = out;
}

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
    // The memchr crate's search, several times faster than `str::contains`
    // over a statement's few hundred bytes: every record passes here.
    if memchr::memchr(b'@', payload.as_bytes()).is_none() {
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
    fn statement_values_are_replaced_by_their_hash() {
        let key = [3; 32];
        let mut text = "select * from t where mail = 'Ann@Example.com' and card = '4111 1111 1111 1111' and id = 4111111111111112".to_string();
        let mut found = Vec::new();
        redact(&key, &mut text, &mut found);
        assert!(!text.contains("Ann@"), "{text}");
        assert!(!text.contains("4111 1111"), "{text}");
        // Failing Luhn: not a card, kept.
        assert!(text.contains("4111111111111112"), "{text}");
        let email = subject_hash(&key, "ann@example.com");
        assert_eq!(found[0], email);
        assert!(text.contains(&format!("[email:{}]", hex::encode(&email[..4]))));
        assert_eq!(found.len(), 2);

        let mut plain = "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;".to_string();
        redact(&key, &mut plain, &mut found);
        assert_eq!(
            plain,
            "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;"
        );
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
