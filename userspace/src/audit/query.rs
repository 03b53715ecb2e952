//! Views of the chain for auditors: events with their session's context,
//! sessions, and the filters of `portcullis audit events|sessions`.
//!
//! Queries walk the chain page by page ([`for_each_event`]): memory grows
//! with what a query returns and with the sessions it has seen, never with
//! the number of events in the store.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    fmt::Write as _,
    time::{Duration, SystemTime},
};

use serde::Serialize;
use serde_json::{Map, Value};

use super::{
    record::Record,
    source::{for_each_record, AuditSource},
    AuditError,
};

/// Who, where and how for one session, from its start record.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SessionContext {
    pub identity: String,
    pub resource: String,
    pub protocol: String,
    pub destination: String,
}

/// One event as auditors see it.
#[derive(Debug, Clone)]
pub struct EventView {
    pub seq: u64,
    pub at_us: u64,
    /// The event's fields; empty once retention purged it.
    pub fields: Map<String, Value>,
    pub purged: bool,
    pub context: SessionContext,
}

impl EventView {
    pub fn name(&self) -> &str {
        if self.purged {
            return "(purged)";
        }
        self.fields
            .get("event")
            .and_then(Value::as_str)
            .unwrap_or("?")
    }

    pub fn session(&self) -> Option<&str> {
        self.fields.get("session").and_then(Value::as_str)
    }

    /// The JSON object printed by `audit events --json`: the event's own
    /// fields (flattened, as recorded) plus `seq` and `at`.
    pub fn to_json(&self) -> Value {
        let mut map = self.fields.clone();
        map.insert("seq".into(), self.seq.into());
        map.insert("at".into(), format_time(self.at_us).into());
        if self.purged {
            map.insert("event".into(), "purged".into());
        }
        Value::Object(map)
    }

    /// A short description of what happened, for tables.
    pub fn summary(&self) -> String {
        let f = &self.fields;
        let s = |k: &str| {
            f.get(k).map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
        };
        match self.name() {
            "kernel" => format!(
                "{} {} to {} by {} (pid {})",
                s("action").unwrap_or_default(),
                s("transport").unwrap_or_default(),
                s("original_destination").unwrap_or_default(),
                s("command").unwrap_or_default(),
                s("pid").unwrap_or_default()
            ),
            "session_start" => format!(
                "{} from {}",
                self.context.destination,
                s("command").unwrap_or_default()
            ),
            "session_end" => format!(
                "{} ms, {} bytes in, {} out{}",
                s("duration_ms").unwrap_or_default(),
                s("bytes_from_client").unwrap_or_default(),
                s("bytes_from_server").unwrap_or_default(),
                s("error")
                    .filter(|e| e != "null")
                    .map(|e| format!(", error: {e}"))
                    .unwrap_or_default()
            ),
            "statement" => {
                let rows = s("rows_returned").unwrap_or_default();
                let error = f.get("error").and_then(|e| e["message"].as_str());
                match error {
                    Some(e) => format!("{} -> error: {e}", s("text").unwrap_or_default()),
                    None => format!("{} -> {rows} rows", s("text").unwrap_or_default()),
                }
            }
            "database_login" => format!(
                "{} as {} on {}/{}",
                f.get("principal")
                    .and_then(|p| p["name"].as_str())
                    .unwrap_or(""),
                s("upstream_user").unwrap_or_default(),
                s("resource").unwrap_or_default(),
                s("database").unwrap_or_default()
            ),
            "policy_block" => format!(
                "rule {}: {} ({})",
                s("rule").unwrap_or_default(),
                s("reason").unwrap_or_default(),
                s("statement").unwrap_or_default()
            ),
            "masking_applied" => {
                let counts: Vec<String> = f
                    .get("rules")
                    .and_then(Value::as_object)
                    .map(|rules| {
                        rules
                            .iter()
                            .map(|(mask, n)| format!("{mask}: {n}"))
                            .collect()
                    })
                    .unwrap_or_default();
                format!("values masked by rule: {}", counts.join(", "))
            }
            "approval" => {
                let mut text = format!(
                    "{} {} by {}",
                    s("step").unwrap_or_default(),
                    s("id").unwrap_or_default(),
                    s("approver")
                        .filter(|a| a != "null")
                        .or_else(|| s("requester"))
                        .unwrap_or_default()
                );
                if let Some(statement) = s("statement").filter(|t| !t.is_empty()) {
                    text.push_str(&format!(": {statement}"));
                }
                if let Some(why) = s("justification").filter(|j| j != "null") {
                    text.push_str(&format!(" (justification: {why})"));
                }
                text
            }
            "retention_purge" => format!(
                "{} records of {} sessions purged (as of {})",
                s("records").unwrap_or_default(),
                s("sessions").unwrap_or_default(),
                s("as_of").unwrap_or_default()
            ),
            _ => [
                "statement",
                "text",
                "reason",
                "decision",
                "justification",
                "path",
            ]
            .iter()
            .find_map(|k| s(k))
            .unwrap_or_default(),
        }
    }
}

/// Ended sessions whose context is kept for events recorded after the end
/// (masking totals, late statements); older ones are forgotten, so memory
/// stays bounded by the open sessions plus this many.
const ENDED_KEPT: usize = 65_536;

/// How far past a session's start its login is looked for, and in pages
/// of how many records, when a walk looks up a session that started
/// before it.
const LOGIN_WITHIN: u64 = 4_096;
const LOGIN_PAGE: usize = 64;

/// The context of each session seen so far in a walk of the chain.
#[derive(Default)]
struct Contexts<'a> {
    by_session: HashMap<String, SessionContext>,
    ended: VecDeque<String>,
    /// Where to look up the sessions that started before the walk, and
    /// which of them the walk wants.
    earlier: Option<(&'a dyn AuditSource, &'a Filter)>,
    /// Sessions looked up without finding their start (purged).
    not_found: HashSet<String>,
}

impl Contexts<'_> {
    /// `record` as auditors see it, updating the session contexts.
    fn view(&mut self, record: &Record) -> EventView {
        let (earlier, not_found) = (self.earlier, &mut self.not_found);
        let view = view(record, &mut self.by_session, |id| {
            earlier_context(earlier, not_found, id)
        });
        if view.name() == "session_end" {
            if let Some(id) = view.session() {
                self.ended.push_back(id.to_owned());
                if self.ended.len() > ENDED_KEPT {
                    if let Some(old) = self.ended.pop_front() {
                        self.by_session.remove(&old);
                        self.not_found.remove(&old);
                    }
                }
            }
        }
        view
    }
}

/// The context of a session that started before a walk, for the walk.
fn earlier_context(
    earlier: Option<(&dyn AuditSource, &Filter)>,
    not_found: &mut HashSet<String>,
    session: &str,
) -> Option<SessionContext> {
    let (source, filter) = earlier?;
    if filter.session.as_deref().is_some_and(|s| s != session) || not_found.contains(session) {
        return None;
    }
    let context = session_context(source, session);
    if context.is_none() {
        not_found.insert(session.to_owned());
    }
    context
}

/// A session's context from its start and login: read from its start
/// (found in the sessions index) up to its first event after the start.
fn session_context(source: &dyn AuditSource, session: &str) -> Option<SessionContext> {
    let start = source.session_start(session).ok().flatten()?;
    let mut sessions = HashMap::new();
    let mut context = None;
    let mut next = start;
    while next < start.saturating_add(LOGIN_WITHIN) {
        let page = source.raw_records(next, LOGIN_PAGE).ok()?;
        for entry in &page {
            if !entry.value.contains(session) {
                continue;
            }
            let Ok(record) = Record::decode(entry.value.as_bytes()) else {
                continue;
            };
            let view = view(&record, &mut sessions, |_| None);
            if view.session() == Some(session) {
                let started = view.name() == "session_start";
                context = Some(view.context);
                if !started {
                    return context;
                }
            }
        }
        match page.last() {
            Some(last) if page.len() == LOGIN_PAGE => next = last.key.saturating_add(1),
            _ => break,
        }
    }
    context
}

/// Calls `f` on every event from seq `from` on with its session context,
/// in chain order, page by page, until it returns false or the chain ends
/// (or passes `until_seq`). Returns the last seq walked (0 for an empty
/// chain), so that a second walk can stop at the same place.
///
/// Contexts come from session starts read on the way. A walk that starts
/// later than 1 sees those of sessions that start from there on; given
/// `earlier`, it looks up the sessions that started before it and that
/// the filter may want (a walk that starts at a time).
pub fn for_each_event(
    source: &dyn AuditSource,
    from: u64,
    until_seq: Option<u64>,
    earlier: Option<&Filter>,
    mut f: impl FnMut(EventView) -> bool,
) -> Result<u64, AuditError> {
    let mut contexts = Contexts {
        earlier: earlier.filter(|_| from > 1).map(|filter| (source, filter)),
        ..Contexts::default()
    };
    let mut last = 0;
    for_each_record(source, from, |entry| {
        if until_seq.is_some_and(|until| entry.key > until) {
            return false;
        }
        last = entry.key;
        let Ok(record) = Record::decode(entry.value.as_bytes()) else {
            return true;
        };
        f(contexts.view(&record))
    })?;
    Ok(last)
}

/// `record` as auditors see it. `earlier` gives the context of a session
/// whose start the walk has not seen, if it can.
fn view(
    record: &Record,
    sessions: &mut HashMap<String, SessionContext>,
    mut earlier: impl FnMut(&str) -> Option<SessionContext>,
) -> EventView {
    let fields = record.event().unwrap_or_default();
    let session = fields
        .get("session")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let name = fields.get("event").and_then(Value::as_str);
    if let Some(id) = session
        .as_ref()
        .filter(|id| name != Some("session_start") && !sessions.contains_key(id.as_str()))
    {
        if let Some(context) = earlier(id) {
            sessions.insert(id.clone(), context);
        }
    }
    let context = if name == Some("session_start") {
        let context = start_context(&fields);
        if let Some(id) = &session {
            sessions.insert(id.clone(), context.clone());
        }
        context
    } else if let (Some("database_login"), Some(ctx)) =
        (name, session.as_ref().and_then(|s| sessions.get_mut(s)))
    {
        // The adapter names the resource and the verified principal.
        if let Some(resource) = str_field(&fields, "resource") {
            ctx.resource = resource;
        }
        if let Some(who) = fields.get("principal").and_then(|p| p["name"].as_str()) {
            ctx.identity = who.to_owned();
        }
        ctx.clone()
    } else if let Some(ctx) = session.as_ref().and_then(|s| sessions.get(s)) {
        ctx.clone()
    } else {
        SessionContext {
            identity: fields
                .get("uid")
                .and_then(Value::as_u64)
                .map(uid_identity)
                .unwrap_or_default(),
            resource: str_field(&fields, "resource")
                .or_else(|| str_field(&fields, "listener"))
                .unwrap_or_default(),
            protocol: str_field(&fields, "protocol")
                .or_else(|| str_field(&fields, "transport"))
                .unwrap_or_default(),
            destination: str_field(&fields, "original_destination").unwrap_or_default(),
        }
    };
    EventView {
        seq: record.seq,
        at_us: record.at_us,
        purged: record.payload.is_none(),
        fields,
        context,
    }
}

fn str_field(fields: &Map<String, Value>, key: &str) -> Option<String> {
    fields.get(key).and_then(Value::as_str).map(str::to_owned)
}

fn start_context(fields: &Map<String, Value>) -> SessionContext {
    let principal = fields.get("principal").filter(|p| !p.is_null());
    let identity = principal
        .and_then(|p| p["name"].as_str())
        .map(str::to_owned)
        .or_else(|| fields.get("uid").and_then(Value::as_u64).map(uid_identity))
        .unwrap_or_default();
    SessionContext {
        identity,
        resource: str_field(fields, "resource")
            .or_else(|| str_field(fields, "listener"))
            .unwrap_or_default(),
        protocol: str_field(fields, "protocol").unwrap_or_default(),
        destination: str_field(fields, "original_destination").unwrap_or_default(),
    }
}

/// `uid:1000 (alice)`, the local account name from /etc/passwd if known.
pub fn uid_identity(uid: u64) -> String {
    let name = std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|line| {
                let mut parts = line.split(':');
                let name = parts.next()?;
                (parts.nth(1)?.parse::<u64>().ok()? == uid).then(|| name.to_owned())
            })
        });
    match name {
        Some(name) => format!("uid:{uid} ({name})"),
        None => format!("uid:{uid}"),
    }
}

/// The filters of `audit events` and `audit sessions`.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub identity: Option<String>,
    pub resource: Option<String>,
    pub protocol: Option<String>,
    pub since_us: Option<u64>,
    pub until_us: Option<u64>,
    pub action: Option<String>,
    pub rule: Option<String>,
    pub session: Option<String>,
}

impl Filter {
    pub fn matches(&self, e: &EventView) -> bool {
        let contains =
            |hay: &str, needle: &String| hay.to_lowercase().contains(&needle.to_lowercase());
        let principal_matches = |want: &String| {
            contains(&e.context.identity, want)
                || e.fields.get("principal").is_some_and(|p| {
                    [p["subject"].as_str(), p["name"].as_str()]
                        .into_iter()
                        .flatten()
                        .any(|v| contains(v, want))
                })
        };
        self.identity.as_ref().is_none_or(principal_matches)
            && self.resource.as_ref().is_none_or(|r| {
                contains(&e.context.resource, r) || contains(&e.context.destination, r)
            })
            && self
                .protocol
                .as_ref()
                .is_none_or(|p| e.context.protocol.eq_ignore_ascii_case(p))
            && self.since_us.is_none_or(|t| e.at_us >= t)
            && self.until_us.is_none_or(|t| e.at_us < t)
            && self.action.as_ref().is_none_or(|a| {
                e.name() == a
                    || e.fields.get("action").and_then(Value::as_str) == Some(a.as_str())
                    || e.fields.get("step").and_then(Value::as_str) == Some(a.as_str())
                    || e.fields.get("decision").and_then(Value::as_str) == Some(a.as_str())
            })
            && self.rule.as_ref().is_none_or(|r| {
                e.fields.get("rule").is_some_and(|v| match v {
                    Value::String(s) => s == r,
                    Value::Number(n) => n.as_u64().is_some_and(|n| r.parse() == Ok(n)),
                    _ => false,
                })
            })
            && self
                .session
                .as_ref()
                .is_none_or(|s| e.session() == Some(s.as_str()))
    }
}

/// One session, summarised.
#[derive(Debug, Clone, Serialize)]
pub struct SessionSummary {
    pub session: String,
    pub start: String,
    pub end: Option<String>,
    #[serde(flatten)]
    pub context: SessionContext,
    pub command: String,
    pub uid: Option<u64>,
    pub events: u64,
    pub bytes_from_client: Option<u64>,
    pub bytes_from_server: Option<u64>,
    pub error: Option<String>,
    #[serde(skip)]
    pub start_us: u64,
}

/// Groups events by session, in order of first appearance.
pub fn sessions<'a>(events: impl Iterator<Item = &'a EventView>) -> Vec<SessionSummary> {
    let mut sessions = Sessions::default();
    for e in events {
        sessions.add(e);
    }
    sessions.finish()
}

/// Session summaries built one event at a time.
#[derive(Default)]
pub struct Sessions {
    order: Vec<String>,
    by_id: BTreeMap<String, SessionSummary>,
}

impl Sessions {
    pub fn add(&mut self, e: &EventView) {
        let Some(id) = e.session() else { return };
        let order = &mut self.order;
        let entry = self.by_id.entry(id.to_owned()).or_insert_with(|| {
            order.push(id.to_owned());
            SessionSummary {
                session: id.to_owned(),
                start: format_time(e.at_us),
                start_us: e.at_us,
                end: None,
                context: e.context.clone(),
                command: String::new(),
                uid: None,
                events: 0,
                bytes_from_client: None,
                bytes_from_server: None,
                error: None,
            }
        });
        entry.events += 1;
        match e.name() {
            "database_login" => entry.context = e.context.clone(),
            "session_start" => {
                entry.command = str_field(&e.fields, "command").unwrap_or_default();
                entry.uid = e.fields.get("uid").and_then(Value::as_u64);
            }
            "session_end" => {
                entry.end = Some(format_time(e.at_us));
                entry.bytes_from_client = e.fields.get("bytes_from_client").and_then(Value::as_u64);
                entry.bytes_from_server = e.fields.get("bytes_from_server").and_then(Value::as_u64);
                entry.error = str_field(&e.fields, "error");
            }
            _ => {}
        }
    }

    /// The summaries, in order of first appearance.
    pub fn finish(mut self) -> Vec<SessionSummary> {
        self.order
            .into_iter()
            .filter_map(|id| self.by_id.remove(&id))
            .collect()
    }
}

/// RFC 3339 UTC with milliseconds. A time past the year 9999, which RFC
/// 3339 cannot write (a record from a wrong clock, or an edited store), is
/// shown as its microseconds since 1970.
pub fn format_time(at_us: u64) -> String {
    let time = SystemTime::UNIX_EPOCH + Duration::from_micros(at_us);
    let mut text = String::new();
    match write!(text, "{}", humantime::format_rfc3339_millis(time)) {
        Ok(()) => text,
        Err(_) => format!("{at_us} µs after 1970 (past the year 9999)"),
    }
}

/// Parses `2026-11-22`, `2026-11-22T10:00:00Z` or a duration ago (`2h`).
pub fn parse_time(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let parsed = if t.len() == 10 {
        humantime::parse_rfc3339_weak(&format!("{t} 00:00:00")).ok()
    } else {
        humantime::parse_rfc3339_weak(t).ok()
    };
    if let Some(time) = parsed {
        return Ok(super::writer::micros(time));
    }
    // A duration reaching back past what the clock can hold means from the
    // start.
    humantime::parse_duration(t)
        .map(|ago| {
            SystemTime::now()
                .checked_sub(ago)
                .map_or(0, super::writer::micros)
        })
        .map_err(|_| format!("'{text}' is not a time (examples: 2026-11-22, 2026-11-22T10:00:00Z, 2h for two hours ago)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_dates_timestamps_or_durations_ago() {
        assert_eq!(parse_time("2026-11-22").unwrap(), 1_795_305_600_000_000);
        assert_eq!(
            parse_time("2026-11-22T10:00:00Z").unwrap(),
            1_795_305_600_000_000 + 10 * 3_600_000_000
        );
        let now = super::super::writer::micros(SystemTime::now());
        let ago = now - parse_time("2h").unwrap();
        assert!((7_100_000_000..=7_200_000_000).contains(&ago), "{ago}");
        // Before 1970, or further back than the clock reaches: from the
        // start, no panic.
        assert_eq!(parse_time("1000y").unwrap(), 0);
        assert_eq!(parse_time("300000000000y").unwrap(), 0);
        let err = parse_time("yesterday").unwrap_err();
        assert!(err.contains("'yesterday' is not a time"), "{err}");
    }

    #[test]
    fn times_past_the_year_9999_are_shown_raw() {
        assert_eq!(
            format_time(1_795_305_600_000_000),
            "2026-11-22T00:00:00.000Z"
        );
        assert!(format_time(u64::MAX).contains("past the year 9999"));
    }
}
