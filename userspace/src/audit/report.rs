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

use std::collections::HashMap;

use ed25519_dalek::VerifyingKey;
use serde::Serialize;
use serde_json::Value;

use super::{
    query::{self, EventView},
    record::Checkpoint,
    source::{seqs_between, AuditSource},
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

/// Builds the report for `[from_us, to_us)`, walking the chain page by
/// page: memory grows with the report (its sessions and evidence rows),
/// not with the store.
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
    let mut sessions = query::Sessions::default();
    let mut extra: HashMap<String, SessionExtra> = HashMap::new();
    let (mut masking, mut blocked, mut approvals, mut purges) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut events_in_period = 0;
    let (first, last) = seqs_between(source, Some(from_us), Some(to_us));
    let everyone = query::Filter::default();
    query::for_each_event(source, first, last, Some(&everyone), |e| {
        if e.at_us < from_us || e.at_us >= to_us {
            return true;
        }
        events_in_period += 1;
        sessions.add(&e);
        if let Some(id) = e.session() {
            let x = extra.entry(id.to_owned()).or_default();
            if e.name().contains("statement") {
                x.statements += 1;
            }
            // The first value of these fields the session recorded ...
            if x.approval_field.is_none() {
                x.approval_field = e.fields.get("approval").and_then(text);
            }
            if x.justification.is_none() {
                x.justification = e.fields.get("justification").and_then(text);
            }
            // ... else its latest approval step says where it stands.
            if e.name().contains("approval") {
                x.last_step = Some(approval_step(&e));
            }
        }
        if e.name().contains("mask")
            || e.fields
                .get("masked")
                .is_some_and(|m| !m.is_null() && m != &Value::Array(vec![]))
        {
            masking.push(evidence(&e));
        }
        if is_blocked(&e) {
            blocked.push(evidence(&e));
        }
        if e.name().contains("approval") {
            approvals.push(evidence(&e));
        }
        if e.name() == "retention_purge" {
            purges.push(evidence(&e));
        }
        true
    })?;
    let processing = sessions
        .finish()
        .into_iter()
        .map(|s| {
            let x = extra.remove(&s.session).unwrap_or_default();
            ProcessingRow {
                statements: x.statements,
                approval: x.approval_field.or(x.last_step),
                justification: x.justification,
                session: s.session,
                identity: s.context.identity,
                resource: s.context.resource,
                protocol: s.context.protocol,
                destination: s.context.destination,
                start: s.start,
                end: s.end,
            }
        })
        .collect();
    Ok(GdprReport {
        period_from: query::format_time(from_us),
        period_to: query::format_time(to_us),
        generated_at: query::format_time(super::source::now_us()),
        host: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default(),
        verification,
        checkpoint,
        masking,
        blocked,
        approvals,
        purges,
        events_in_period,
        processing,
    })
}

/// What a processing row needs beyond the session summary.
#[derive(Default)]
struct SessionExtra {
    statements: u64,
    approval_field: Option<String>,
    justification: Option<String>,
    last_step: Option<String>,
}

fn approval_step(e: &EventView) -> String {
    let f = |k: &str| e.fields.get(k).and_then(Value::as_str).unwrap_or("");
    match f("approver") {
        "" => format!("{} (request {}, seq {})", f("step"), f("id"), e.seq),
        by => format!("{} by {by} (request {}, seq {})", f("step"), f("id"), e.seq),
    }
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
