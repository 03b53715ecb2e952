//! The GDPR report as one self-contained HTML page (inline CSS, no
//! scripts, no external resources), readable on screen and printable.

use std::fmt::Write;

use super::{
    query::format_time,
    report::{EvidenceRow, GdprReport},
};

const STYLE: &str = r#"
:root { --ink:#1d2330; --muted:#5b6474; --line:#d9dee7; --ok:#17643a; --okbg:#e6f4ea; --bad:#a11d1d; --badbg:#fdecec; --head:#f3f5f9; }
* { box-sizing: border-box; }
body { font: 15px/1.5 -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif; color: var(--ink); margin: 0; background: #fff; }
main { max-width: 1180px; margin: 0 auto; padding: 32px 40px 64px; }
header { border-bottom: 3px solid var(--ink); padding-bottom: 12px; margin-bottom: 24px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 36px 0 8px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
.sub { color: var(--muted); margin: 0; }
.meta { display: grid; grid-template-columns: 180px 1fr; gap: 4px 16px; margin: 16px 0 0; }
.meta dt { color: var(--muted); }
.meta dd { margin: 0; }
.status { border-radius: 6px; padding: 14px 18px; margin: 8px 0 4px; font-weight: 600; }
.status.ok { background: var(--okbg); color: var(--ok); border: 1px solid #b7dfc3; }
.status.bad { background: var(--badbg); color: var(--bad); border: 1px solid #f2b8b8; }
table { width: 100%; border-collapse: collapse; margin: 8px 0; font-size: 13.5px; }
th, td { text-align: left; vertical-align: top; padding: 6px 8px; border-bottom: 1px solid var(--line); }
th { background: var(--head); font-weight: 600; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.nw, td.time { white-space: nowrap; font-variant-numeric: tabular-nums; }
code, .mono { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 12.5px; word-break: break-all; }
.empty { color: var(--muted); font-style: italic; }
.note { color: var(--muted); font-size: 13px; }
.cards { display: grid; grid-template-columns: repeat(5, 1fr); gap: 12px; margin: 16px 0; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 10px 12px; }
.card b { display: block; font-size: 22px; }
.card span { color: var(--muted); font-size: 13px; }
@media print { main { padding: 0; } h2 { break-after: avoid; } tr { break-inside: avoid; } }
"#;

fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

pub fn render(r: &GdprReport) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>GDPR record of processing {from} to {to}</title><style>{STYLE}</style></head><body><main>",
        from = esc(&r.period_from),
        to = esc(&r.period_to)
    );
    let _ = write!(
        h,
        "<header><h1>Record of processing activities</h1>\
         <p class=\"sub\">GDPR Article 30 &middot; Portcullis data-access gateway</p>\
         <dl class=\"meta\"><dt>Period</dt><dd>{} &ndash; {}</dd><dt>Host</dt><dd>{}</dd>\
         <dt>Generated</dt><dd>{}</dd></dl></header>",
        esc(&r.period_from),
        esc(&r.period_to),
        esc(&r.host),
        esc(&r.generated_at)
    );
    let _ = write!(
        h,
        "<div class=\"cards\">{}{}{}{}{}</div>",
        card(r.processing.len(), "sessions"),
        card(r.masking.len(), "masking events"),
        card(r.blocked.len(), "blocked attempts"),
        card(r.approvals.len(), "approval steps"),
        card(r.events_in_period as usize, "events in period")
    );
    integrity(&mut h, r);
    processing(&mut h, r);
    evidence_section(
        &mut h,
        "Masking evidence",
        "Personal data masked before it reached the person.",
        &r.masking,
    );
    evidence_section(&mut h, "Blocked and bypass attempts", "Connections the kernel blocked (attempts to reach protected data around the gateway) and connections the gateway refused.", &r.blocked);
    evidence_section(
        &mut h,
        "Approvals",
        "Approval requests and decisions.",
        &r.approvals,
    );
    evidence_section(
        &mut h,
        "Retention purges",
        "Payloads removed at the end of their retention; their hashes stay in the chain.",
        &r.purges,
    );
    h.push_str("</main></body></html>\n");
    h
}

/// `2026-11-22 19:58:53` from RFC 3339 (UTC, as the header says).
fn short(t: &str) -> String {
    let t = t.replacen('T', " ", 1);
    let end = t.find('.').unwrap_or(t.trim_end_matches('Z').len());
    t[..end].to_owned()
}

fn card(n: usize, label: &str) -> String {
    format!(
        "<div class=\"card\"><b>{n}</b><span>{}</span></div>",
        esc(label)
    )
}

fn integrity(h: &mut String, r: &GdprReport) {
    let v = &r.verification;
    h.push_str("<h2>Integrity of the evidence</h2>");
    if v.ok {
        let _ = write!(h, "<div class=\"status ok\">Verified: the hash chain of {} records and its {} signed checkpoint(s) are intact.</div>", v.records, v.checkpoints);
    } else {
        let _ = write!(
            h,
            "<div class=\"status bad\">Verification FAILED: {} problem(s). The first: {}</div>",
            v.problems.len(),
            esc(&v
                .first_problem()
                .map_or(String::new(), |p| format!("seq {}: {}", p.seq, p.message)))
        );
        h.push_str("<table><tr><th>Seq</th><th>Kind</th><th>Problem</th></tr>");
        for p in &v.problems {
            let _ = write!(
                h,
                "<tr><td class=\"num\">{}</td><td>{:?}</td><td>{}</td></tr>",
                p.seq,
                p.kind,
                esc(&p.message)
            );
        }
        h.push_str("</table>");
    }
    let cp = r.checkpoint.as_ref().or(v.last_checkpoint.as_ref());
    h.push_str("<dl class=\"meta\">");
    let _ = write!(
        h,
        "<dt>Records</dt><dd>{} (head seq {}; {} payloads purged by retention)</dd>",
        v.records, v.head_seq, v.purged
    );
    match cp {
        Some(cp) => {
            let _ = write!(
                h,
                "<dt>Signed checkpoint</dt><dd>#{} at seq {}, {}</dd>\
                 <dt>Chain hash</dt><dd class=\"mono\">{}</dd>\
                 <dt>Signature (ed25519)</dt><dd class=\"mono\">{}</dd>",
                cp.number,
                cp.seq,
                esc(&format_time(cp.at_us)),
                hex::encode(cp.hash),
                hex::encode(cp.signature)
            );
        }
        None => h.push_str("<dt>Signed checkpoint</dt><dd>none</dd>"),
    }
    let _ = write!(
        h,
        "<dt>Public key</dt><dd class=\"mono\">{}</dd></dl>",
        esc(&v.public_key)
    );
    h.push_str("<p class=\"note\">Check independently with <code>portcullis audit verify --public-key KEY</code> using the auditors' own copy of the public key.</p>");
}

fn processing(h: &mut String, r: &GdprReport) {
    h.push_str("<h2>Record of processing (Article 30)</h2><p class=\"note\">Who accessed which resource, when, and under which approval and justification.</p>");
    if r.processing.is_empty() {
        h.push_str("<p class=\"empty\">No sessions in this period.</p>");
        return;
    }
    h.push_str("<table><tr><th>When (UTC)</th><th>Who</th><th>Resource</th><th>Destination</th><th>Statements</th><th>Approval</th><th>Justification</th><th>Session</th></tr>");
    for p in &r.processing {
        let _ = write!(
            h,
            "<tr><td class=\"time\">{}<br><span class=\"note\">to {}</span></td><td>{}</td><td>{}<br><span class=\"note\">{}</span></td><td class=\"mono nw\">{}</td><td class=\"num\">{}</td><td>{}</td><td>{}</td><td class=\"mono\">{}</td></tr>",
            esc(&short(&p.start)),
            esc(&p.end.as_deref().map_or("open".into(), short)),
            esc(&p.identity),
            esc(&p.resource),
            esc(&p.protocol),
            esc(&p.destination),
            p.statements,
            esc(p.approval.as_deref().unwrap_or("none recorded")),
            esc(p.justification.as_deref().unwrap_or("none recorded")),
            esc(&p.session)
        );
    }
    h.push_str("</table>");
}

fn evidence_section(h: &mut String, title: &str, note: &str, rows: &[EvidenceRow]) {
    let _ = write!(
        h,
        "<h2>{}</h2><p class=\"note\">{}</p>",
        esc(title),
        esc(note)
    );
    if rows.is_empty() {
        h.push_str("<p class=\"empty\">None in this period.</p>");
        return;
    }
    h.push_str("<table><tr><th>Seq</th><th>At (UTC)</th><th>Event</th><th>Who</th><th>Resource</th><th>Details</th></tr>");
    for e in rows {
        let _ = write!(
            h,
            "<tr><td class=\"num\">{}</td><td class=\"time\">{}</td><td>{}</td><td>{}</td><td class=\"mono\">{}</td><td>{}</td></tr>",
            e.seq,
            esc(&short(&e.at)),
            esc(&e.event),
            esc(&e.identity),
            esc(&e.resource),
            esc(&e.details)
        );
    }
    h.push_str("</table>");
}
