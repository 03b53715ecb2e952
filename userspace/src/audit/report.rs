//! The GDPR report's content (rendered by [`super::report_html`], or
//! written as JSON): the Article 30 record of processing for a period,
//! masking evidence, blocked and bypass attempts, approvals, retention
//! purges, and the store's verification with its signed checkpoint.
//!
//! Events are classified by name and fields, so that event kinds other
//! parts of the gateway add (statements, masking, approvals) appear
//! without changes here: a name containing `mask` or a `masked` field is
//! masking evidence; `approval` in the name is an approval step;
//! `approval` / `justification` fields attach to their session.

use ed25519_dalek::VerifyingKey;
use serde::Serialize;
use serde_json::Value;

use super::{
    query::{self, EventView},
    record::Checkpoint,
    source::AuditSource,
    verify::{verify, Verification},
    AuditError,
};

#[derive(Debug, Serialize)]
pub struct GdprReport {
    pub period_from: String,
    pub period_to: String,
    pub generated_at: String,
    pub host: String,
    pub verification: Verification,
    /// The checkpoint signed for this report (over the head at the time).
    pub checkpoint: Option<Checkpoint>,
    pub processing: Vec<ProcessingRow>,
    pub masking: Vec<EvidenceRow>,
    pub blocked: Vec<EvidenceRow>,
    pub approvals: Vec<EvidenceRow>,
    pub purges: Vec<EvidenceRow>,
    pub events_in_period: u64,
}

/// One session: who accessed which resource, when, under which approval.
#[derive(Debug, Serialize)]
pub struct ProcessingRow {
    pub session: String,
    pub identity: String,
    pub resource: String,
    pub protocol: String,
    pub destination: String,
    pub start: String,
    pub end: Option<String>,
    pub statements: u64,
    pub approval: Option<String>,
    pub justification: Option<String>,
}

/// One event cited as evidence.
#[derive(Debug, Serialize)]
pub struct EvidenceRow {
    pub seq: u64,
    pub at: String,
    pub event: String,
    pub identity: String,
    pub resource: String,
    pub details: String,
}

pub fn build(
    source: &dyn AuditSource,
    key: &VerifyingKey,
    from_us: u64,
    to_us: u64,
) -> Result<GdprReport, AuditError> {
    // Sign the current head so the report's checkpoint covers everything
    // it cites; a damaged store refuses, and verification says why.
    let checkpoint = source.checkpoint().ok().flatten();
    let verification = verify(source, key)?;
    let all = query::events(source)?;
    let events: Vec<&EventView> = all
        .iter()
        .filter(|e| e.at_us >= from_us && e.at_us < to_us)
        .collect();
    let mut processing = Vec::new();
    for s in query::sessions(events.iter().copied()) {
        let of_session = || {
            events
                .iter()
                .filter(|e| e.session() == Some(s.session.as_str()))
        };
        let field = |k: &str| of_session().find_map(|e| text(e.fields.get(k)?));
        processing.push(ProcessingRow {
            statements: of_session()
                .filter(|e| e.name().contains("statement"))
                .count() as u64,
            // The session's latest approval step says where it stands.
            approval: field("approval").or_else(|| {
                of_session()
                    .rfind(|e| e.name().contains("approval"))
                    .map(|e| {
                        let f = |k: &str| e.fields.get(k).and_then(Value::as_str).unwrap_or("");
                        match f("approver") {
                            "" => format!("{} (request {}, seq {})", f("step"), f("id"), e.seq),
                            by => format!(
                                "{} by {by} (request {}, seq {})",
                                f("step"),
                                f("id"),
                                e.seq
                            ),
                        }
                    })
            }),
            justification: field("justification"),
            session: s.session,
            identity: s.context.identity,
            resource: s.context.resource,
            protocol: s.context.protocol,
            destination: s.context.destination,
            start: s.start,
            end: s.end,
        });
    }
    let pick = |pred: &dyn Fn(&EventView) -> bool| -> Vec<EvidenceRow> {
        events
            .iter()
            .filter(|e| pred(e))
            .map(|e| evidence(e))
            .collect()
    };
    Ok(GdprReport {
        period_from: query::format_time(from_us),
        period_to: query::format_time(to_us),
        generated_at: query::format_time(super::source::now_us()),
        host: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default(),
        verification,
        checkpoint,
        masking: pick(&|e| {
            e.name().contains("mask")
                || e.fields
                    .get("masked")
                    .is_some_and(|m| !m.is_null() && m != &Value::Array(vec![]))
        }),
        blocked: pick(&is_blocked),
        approvals: pick(&|e| e.name().contains("approval")),
        purges: pick(&|e| e.name() == "retention_purge"),
        events_in_period: events.len() as u64,
        processing,
    })
}

fn is_blocked(e: &EventView) -> bool {
    let field = |k: &str| e.fields.get(k).and_then(Value::as_str).unwrap_or("");
    match e.name() {
        "kernel" => field("action") != "redirect",
        name if name.ends_with("refused") || name.ends_with("rejected") => true,
        name => {
            name.contains("block")
                || name.contains("denied")
                || matches!(field("decision"), "deny" | "block" | "denied")
        }
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

fn evidence(e: &EventView) -> EvidenceRow {
    EvidenceRow {
        seq: e.seq,
        at: query::format_time(e.at_us),
        event: e.name().to_owned(),
        identity: e.context.identity.clone(),
        resource: if e.context.resource.is_empty() {
            e.context.destination.clone()
        } else {
            e.context.resource.clone()
        },
        details: e.summary(),
    }
}
