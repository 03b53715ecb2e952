//! Retention: which payloads have expired.
//!
//! An event's resource is its own `resource` field, else that of its
//! session (the session start's `resource`, else its `listener`); events
//! without one (kernel events, refusals) use the default. A purge replaces
//! each expired payload by nothing but the hash already in the record, so
//! the chain still verifies; the purge itself is a `retention_purge` record
//! naming the seqs it emptied, and those records point back to it.
//!
//! A purge does not read the whole chain: it starts after what earlier
//! purges settled ([`Settled`]) and stops at the first record too young to
//! have expired under any retention, so its cost follows the records that
//! came since the last purge, not the size of the store.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use super::{
    record::Record,
    store::{Line, Store, SubjectHit},
    AuditError,
};

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

    /// The shortest time any payload is kept, in µs.
    fn shortest_us(&self) -> u64 {
        let days = self
            .per_resource
            .values()
            .copied()
            .chain([self.default_days])
            .min()
            .unwrap_or(self.default_days);
        u64::from(days).saturating_mul(MICROS_PER_DAY)
    }
}

/// How far purges have settled the chain: no record up to `seq` holds a
/// payload a purge could empty (emptied already, a purge record, or none
/// to begin with). With it, the sessions open at `seq` and their
/// resources, for their records that come later. Whatever the retention
/// becomes, nothing up to `seq` has anything left to purge, so the next
/// purge starts after it.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settled {
    pub seq: u64,
    pub sessions: HashMap<String, String>,
}

/// One part of a purge: what it empties, carried out as one
/// `retention_purge` record.
#[derive(Debug, Default)]
pub struct PurgePlan {
    pub seqs: Vec<u64>,
    pub sessions: BTreeSet<String>,
    pub by_resource: BTreeMap<String, u64>,
    /// Sessions whose start it empties: they leave the sessions' index.
    pub starts: Vec<String>,
    /// The last part only: the data-subject index entries that go with
    /// every payload the purge empties.
    pub subject_keys: Vec<sled::IVec>,
    /// The last part only: where the chain is settled once it is done.
    pub settled: Option<Settled>,
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

/// Plans a purge part by part, each carried out before the next is
/// planned, so that the writer never holds commits up for longer than one
/// part takes to rewrite.
///
/// It reads the chain after `settled`, and stops at the first record too
/// young to have expired under the shortest retention. Records are in
/// commit order, so all later ones are younger, unless the clock was set
/// back: then a record after that one waits for a later purge, by at most
/// the time the clock went back.
pub struct Planner {
    retention: Retention,
    as_of_us: u64,
    shortest_us: u64,
    /// The next position to read.
    next: u64,
    resources: ResourceTracker,
    /// Where the settled prefix ends: grows while every record read is
    /// settled, and stays before the first one that is not.
    settled_seq: u64,
    /// The sessions open at `settled_seq`, once the settled prefix ended.
    open_sessions: Option<HashMap<String, String>>,
    /// Every payload planned so far, and their sessions: for the
    /// data-subject index, once the last part is planned.
    planned: Vec<[u64; 2]>,
    sessions: BTreeSet<String>,
    finished: bool,
}

impl Planner {
    pub fn new(retention: Retention, as_of_us: u64, settled: Settled) -> Self {
        Self {
            shortest_us: retention.shortest_us(),
            retention,
            as_of_us,
            next: settled.seq.saturating_add(1),
            resources: ResourceTracker(settled.sessions),
            settled_seq: settled.seq,
            open_sessions: None,
            planned: Vec::new(),
            sessions: BTreeSet::new(),
            finished: false,
        }
    }

    /// The next part, of at most `limit` payloads. The last part (see
    /// [`Planner::is_finished`]) also carries the data-subject index
    /// entries to remove and where the chain is then settled.
    pub fn next_part(&mut self, store: &Store, limit: usize) -> Result<PurgePlan, AuditError> {
        let mut part = PurgePlan::default();
        self.finished = true;
        for line in store.lines(self.next)? {
            let line = line?;
            if part.seqs.len() >= limit {
                self.next = line.key;
                self.finished = false;
                break;
            }
            if !self.read(&line, &mut part) {
                break;
            }
        }
        self.sessions.extend(part.sessions.iter().cloned());
        self.planned.extend(ranges(&part.seqs));
        if self.finished {
            part.subject_keys = self.subject_keys(store)?;
            part.settled = Some(Settled {
                seq: self.settled_seq,
                sessions: self
                    .open_sessions
                    .take()
                    .unwrap_or_else(|| std::mem::take(&mut self.resources.0)),
            });
        }
        Ok(part)
    }

    /// Whether the last part has been planned.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Sessions with a payload planned so far.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Takes one line into `part` if it has expired; false at the first
    /// record too young to have.
    fn read(&mut self, line: &Line, part: &mut PurgePlan) -> bool {
        let mut ended = None;
        // A record that does not decode (verify's to report) or has no
        // event (emptied) has no payload a purge could empty.
        let emptied = match Record::decode(line.bytes()) {
            Err(_) => true,
            Ok(record) => {
                if record.at_us.saturating_add(self.shortest_us) > self.as_of_us {
                    return false;
                }
                match record.event() {
                    None => true,
                    Some(event) => {
                        if event.get("event").and_then(|v| v.as_str()) == Some("session_end") {
                            ended = event
                                .get("session")
                                .and_then(|v| v.as_str())
                                .map(str::to_owned);
                        }
                        part.consider(
                            &record,
                            &event,
                            &self.retention,
                            self.as_of_us,
                            &mut self.resources,
                        )
                    }
                }
            }
        };
        if self.open_sessions.is_none() {
            if emptied {
                self.settled_seq = line.key;
            } else {
                // Taken before this record's session is forgotten: the
                // next purge reads this record again.
                self.open_sessions = Some(self.resources.0.clone());
            }
        }
        // Nothing of an ended session comes later.
        if let Some(session) = ended {
            self.resources.0.remove(&session);
        }
        self.next = line.key.saturating_add(1);
        true
    }

    /// The data-subject index entries of the payloads planned: found in
    /// one of those records, or reported in one of their sessions.
    fn subject_keys(&self, store: &Store) -> Result<Vec<sled::IVec>, AuditError> {
        let mut keys = Vec::new();
        if self.planned.is_empty() {
            return Ok(keys);
        }
        for item in store.subjects.iter() {
            let (key, value) = item?;
            let Ok(hit) = serde_json::from_slice::<SubjectHit>(&value) else {
                continue;
            };
            // Sorted and disjoint: the first range not below the seq.
            let at = self.planned.partition_point(|[_, last]| *last < hit.seq);
            let in_planned = self
                .planned
                .get(at)
                .is_some_and(|[first, _]| *first <= hit.seq);
            let in_session = hit
                .session
                .as_ref()
                .is_some_and(|s| self.sessions.contains(s));
            if in_planned || in_session {
                keys.push(key);
            }
        }
        Ok(keys)
    }
}

impl PurgePlan {
    /// Adds `record` if its payload has expired; true when nothing of it
    /// is left to purge after this plan.
    fn consider(
        &mut self,
        record: &Record,
        event: &serde_json::Map<String, serde_json::Value>,
        retention: &Retention,
        as_of_us: u64,
        resources: &mut ResourceTracker,
    ) -> bool {
        let resource = resources.resource_of(event);
        // Purge records hold no personal data and prove later purges.
        if event.get("event").and_then(|v| v.as_str()) == Some("retention_purge") {
            return true;
        }
        let days = retention.days_for(resource.as_deref());
        if !expired(record.at_us, days, as_of_us) {
            return false;
        }
        self.seqs.push(record.seq);
        if let Some(session) = event.get("session").and_then(|v| v.as_str()) {
            self.sessions.insert(session.to_owned());
            if event.get("event").and_then(|v| v.as_str()) == Some("session_start") {
                self.starts.push(session.to_owned());
            }
        }
        *self
            .by_resource
            .entry(resource.unwrap_or_else(|| "(none)".into()))
            .or_default() += 1;
        true
    }
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
