//! Retention: which payloads have expired.
//!
//! An event's resource is its own `resource` field, else that of its
//! session (the session start's `resource`, else its `listener`); events
//! without one (kernel events, refusals) use the default. A purge replaces
//! each expired payload by nothing but the hash already in the record, so
//! the chain still verifies; the purge itself is a `retention_purge` record
//! naming the seqs it emptied, and those records point back to it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::{record::Record, store::Store, AuditError};

const MICROS_PER_DAY: u64 = 86_400 * 1_000_000;

/// How long payloads are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    pub default_days: u32,
    /// Overrides by resource name.
    pub per_resource: BTreeMap<String, u32>,
}

impl Retention {
    fn days_for(&self, resource: Option<&str>) -> u32 {
        resource
            .and_then(|r| self.per_resource.get(r))
            .copied()
            .unwrap_or(self.default_days)
    }
}

/// What a purge will empty.
#[derive(Debug, Default)]
pub struct PurgePlan {
    pub seqs: Vec<u64>,
    pub sessions: BTreeSet<String>,
    pub by_resource: BTreeMap<String, u64>,
}

/// The resource an event belongs to, learning sessions as they start.
#[derive(Default)]
pub struct ResourceTracker(HashMap<String, String>);

impl ResourceTracker {
    pub fn resource_of(
        &mut self,
        event: &serde_json::Map<String, serde_json::Value>,
    ) -> Option<String> {
        let own = event
            .get("resource")
            .and_then(|v| v.as_str())
            .map(str::to_owned);
        let session = event.get("session").and_then(|v| v.as_str());
        if event.get("event").and_then(|v| v.as_str()) == Some("session_start") {
            let resource = own.clone().or_else(|| {
                event
                    .get("listener")
                    .and_then(|v| v.as_str())
                    .map(str::to_owned)
            });
            if let (Some(session), Some(resource)) = (session, &resource) {
                self.0.insert(session.to_owned(), resource.clone());
            }
            return resource;
        }
        // An adapter naming the session's resource (database_login) makes
        // it the session's resource from then on.
        if let (Some(session), Some(resource)) = (session, &own) {
            self.0.insert(session.to_owned(), resource.clone());
        }
        own.or_else(|| session.and_then(|s| self.0.get(s).cloned()))
    }
}

/// Whether a payload recorded at `at_us` and kept `days` has expired at
/// `as_of_us`. A retention of ages (up to `u32::MAX` days in the config)
/// keeps it for good rather than wrap around and purge it now.
fn expired(at_us: u64, days: u32, as_of_us: u64) -> bool {
    let kept = u64::from(days).saturating_mul(MICROS_PER_DAY);
    at_us.saturating_add(kept) <= as_of_us
}

/// Scans the chain for payloads expired at `as_of_us`.
pub fn plan(store: &Store, retention: &Retention, as_of_us: u64) -> Result<PurgePlan, AuditError> {
    let mut plan = PurgePlan::default();
    let mut resources = ResourceTracker::default();
    for line in store.lines(1)? {
        // A record that does not decode is verify's to report; it has no
        // payload a purge could empty.
        let Ok(record) = Record::decode(line?.bytes()) else {
            continue;
        };
        let Some(event) = record.event() else {
            continue;
        };
        let resource = resources.resource_of(&event);
        // Purge records hold no personal data and prove later purges.
        if event.get("event").and_then(|v| v.as_str()) == Some("retention_purge") {
            continue;
        }
        let days = retention.days_for(resource.as_deref());
        if !expired(record.at_us, days, as_of_us) {
            continue;
        }
        plan.seqs.push(record.seq);
        if let Some(session) = event.get("session").and_then(|v| v.as_str()) {
            plan.sessions.insert(session.to_owned());
        }
        *plan
            .by_resource
            .entry(resource.unwrap_or_else(|| "(none)".into()))
            .or_default() += 1;
    }
    Ok(plan)
}

/// Sorted seqs as inclusive ranges: `[1,2,3,7]` -> `[[1,3],[7,7]]`.
pub fn ranges(seqs: &[u64]) -> Vec<[u64; 2]> {
    let mut out: Vec<[u64; 2]> = Vec::new();
    for &seq in seqs {
        match out.last_mut() {
            Some(last) if last[1] + 1 == seq => last[1] = seq,
            _ => out.push([seq, seq]),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_expire_after_their_days_and_never_with_ages_of_them() {
        let day = MICROS_PER_DAY;
        assert!(!expired(10 * day, 30, 39 * day));
        assert!(expired(10 * day, 30, 40 * day));
        assert!(!expired(10 * day, u32::MAX, u64::MAX - 1));
    }

    #[test]
    fn ranges_compress_runs() {
        assert_eq!(ranges(&[1, 2, 3, 7, 9, 10]), vec![[1, 3], [7, 7], [9, 10]]);
        assert!(ranges(&[]).is_empty());
    }

    #[test]
    fn session_events_inherit_the_session_resource() {
        let mut t = ResourceTracker::default();
        let start = serde_json::json!({"event":"session_start","session":"s","listener":"pg"});
        let end = serde_json::json!({"event":"session_end","session":"s"});
        assert_eq!(
            t.resource_of(start.as_object().unwrap()).as_deref(),
            Some("pg")
        );
        assert_eq!(
            t.resource_of(end.as_object().unwrap()).as_deref(),
            Some("pg")
        );
    }
}
