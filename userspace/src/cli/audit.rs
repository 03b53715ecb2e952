//! `portcullis audit ...` and `portcullis report ...`: the auditor tools.
//!
//! They read the store through the daemon's `audit.sock` while it runs,
//! else the files directly ([`crate::audit::source`]).

use std::{io::Write, path::PathBuf, sync::atomic::AtomicBool};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::Value;

use crate::{
    audit::{
        export::{self, Target},
        keys,
        query::{self, EventView, Filter, SessionSummary},
        source::{self, now_us, AuditSource},
        subject::subject_hash,
        verify::{verify, Verification},
    },
    config::Config,
};

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// List sessions (who, which resource, when), newest last.
    Sessions {
        #[command(flatten)]
        filter: FilterArgs,
        #[command(flatten)]
        format: FormatArgs,
    },
    /// List events, in chain order.
    Events {
        #[command(flatten)]
        filter: FilterArgs,
        /// Only this session's events.
        #[arg(long)]
        session: Option<String>,
        #[command(flatten)]
        format: FormatArgs,
    },
    /// Show one session as it happened, event by event with timing.
    Replay {
        session: String,
        /// Print the events as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Sessions and statements that touched a personal value (e-mail, ...).
    Subject {
        value: String,
        #[arg(long)]
        json: bool,
    },
    /// Check the chain and the signed checkpoints; exit 1 at the first sign
    /// of editing, deletion, reordering or truncation.
    Verify {
        /// The auditor's copy of the public key (else the host's key file).
        #[arg(long)]
        public_key: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Stream the chain as JSON lines (with hashes) for log shippers.
    Export {
        /// A file (appended; resumes after its last line) or unix:PATH;
        /// standard output when omitted.
        #[arg(long)]
        to: Option<String>,
        /// First seq to export (default: resume, or 1).
        #[arg(long)]
        from: Option<u64>,
        /// Keep running and export new records as they come.
        #[arg(long)]
        follow: bool,
    },
    /// Print the checkpoint-signing public key (hex) for auditors to keep.
    PublicKey,
    /// Purge payloads past their retention now (the daemon does it every
    /// six hours).
    Purge {
        /// Purge as if it were this time (e.g. to apply retention early).
        #[arg(long)]
        as_of: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ReportCommand {
    /// GDPR Article 30 record of processing, masking evidence, blocked and
    /// bypass attempts, approvals, and the store's verification.
    Gdpr {
        /// Start of the period (2026-11-01, RFC 3339, or 30d for 30 days ago).
        #[arg(long)]
        from: String,
        /// End of the period (exclusive); now when omitted.
        #[arg(long)]
        to: Option<String>,
        /// The HTML report to write.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Also (or only) write the report as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct FilterArgs {
    /// Principal name or subject, or uid:N.
    #[arg(long)]
    identity: Option<String>,
    /// Resource or listener name, or destination address.
    #[arg(long)]
    resource: Option<String>,
    #[arg(long)]
    protocol: Option<String>,
    /// From this time (2026-11-22, RFC 3339, or 2h for two hours ago).
    #[arg(long)]
    since: Option<String>,
    /// Before this time.
    #[arg(long)]
    until: Option<String>,
    /// Event name (session_start, kernel, ...) or its action/decision
    /// (redirect, block, deny, ...).
    #[arg(long)]
    action: Option<String>,
    /// The rule that matched.
    #[arg(long)]
    rule: Option<String>,
}

#[derive(Debug, Args)]
pub struct FormatArgs {
    /// Print JSON.
    #[arg(long, conflicts_with = "csv")]
    json: bool,
    /// Print CSV.
    #[arg(long)]
    csv: bool,
}

impl FilterArgs {
    fn filter(&self, session: Option<String>) -> anyhow::Result<Filter> {
        let time = |t: &Option<String>| {
            t.as_deref()
                .map(query::parse_time)
                .transpose()
                .map_err(anyhow::Error::msg)
        };
        Ok(Filter {
            identity: self.identity.clone(),
            resource: self.resource.clone(),
            protocol: self.protocol.clone(),
            since_us: time(&self.since)?,
            until_us: time(&self.until)?,
            action: self.action.clone(),
            rule: self.rule.clone(),
            session,
        })
    }
}

/// Who may run the auditor tools.
///
/// Root only for now. Hook for the `auditors` role: when a local uid can be
/// mapped to a principal with roles (OIDC login), allow non-root members of
/// `auditors` here and in [`crate::audit::server::authorize`].
fn authorize() -> anyhow::Result<()> {
    if !super::euid_is_root() {
        bail!("the audit store is readable by root only (and, later, the auditors role): run this as root");
    }
    Ok(())
}

fn open(config: &Config) -> anyhow::Result<Box<dyn AuditSource>> {
    Ok(source::open(&config.state_dir, config.audit.retention())?)
}

pub fn run(config_path: &std::path::Path, command: &AuditCommand) -> anyhow::Result<()> {
    authorize()?;
    let config = Config::load(config_path)?;
    match command {
        AuditCommand::Sessions { filter, format } => {
            let filter = filter.filter(None)?;
            let events = query::events(open(&config)?.as_ref())?;
            let sessions = query::sessions(events.iter().filter(|e| filter.matches(e)));
            print_sessions(&sessions, format)
        }
        AuditCommand::Events {
            filter,
            session,
            format,
        } => {
            let filter = filter.filter(session.clone())?;
            let events = query::events(open(&config)?.as_ref())?;
            let events: Vec<_> = events.into_iter().filter(|e| filter.matches(e)).collect();
            print_events(&events, format)
        }
        AuditCommand::Replay { session, json } => replay(&config, session, *json),
        AuditCommand::Subject { value, json } => subject(&config, value, *json),
        AuditCommand::Verify { public_key, json } => {
            let key = match public_key {
                Some(text) => keys::parse_public_key(text)?,
                None => keys::public_key(&config.state_dir)
                    .context("reading the host's signing key (or pass --public-key)")?,
            };
            let result = verify(open(&config)?.as_ref(), &key)?;
            print_verification(&result, *json)
        }
        AuditCommand::Export { to, from, follow } => {
            let source = open(&config)?;
            let stop = AtomicBool::new(false);
            match to {
                None => {
                    let mut out = std::io::stdout().lock();
                    source::for_each_record(source.as_ref(), from.unwrap_or(1), |entry| {
                        crate::audit::record::Record::decode(entry.value.as_bytes())
                            .ok()
                            .and_then(|r| export::line(&r).ok())
                            .is_some_and(|l| out.write_all(&l).is_ok())
                    })?;
                    Ok(())
                }
                Some(to) => {
                    let target: Target = to.parse().map_err(anyhow::Error::msg)?;
                    let from = from.unwrap_or_else(|| export::resume_point(&target));
                    let next = export::export(source.as_ref(), &target, from, *follow, &stop)?;
                    eprintln!("exported up to seq {}", next.saturating_sub(1));
                    Ok(())
                }
            }
        }
        AuditCommand::PublicKey => {
            let key = keys::public_key(&config.state_dir)
                .context("the key is created when the daemon first starts")?;
            println!("{}", hex::encode(key.to_bytes()));
            Ok(())
        }
        AuditCommand::Purge { as_of } => {
            let as_of = match as_of {
                Some(t) => query::parse_time(t).map_err(anyhow::Error::msg)?,
                None => now_us(),
            };
            let summary = open(&config)?.purge(as_of)?;
            match summary.purge_seq {
                Some(seq) => println!(
                    "purged {} records of {} sessions (recorded as seq {seq})",
                    summary.records, summary.sessions
                ),
                None => println!("nothing has expired"),
            }
            Ok(())
        }
    }
}

pub fn report(config_path: &std::path::Path, command: &ReportCommand) -> anyhow::Result<()> {
    authorize()?;
    let config = Config::load(config_path)?;
    let ReportCommand::Gdpr {
        from,
        to,
        out,
        json,
    } = command;
    if out.is_none() && json.is_none() {
        bail!("say where to write the report: --out FILE.html and/or --json FILE.json");
    }
    let from_us = query::parse_time(from).map_err(anyhow::Error::msg)?;
    let to_us = match to {
        Some(t) => query::parse_time(t).map_err(anyhow::Error::msg)?,
        None => now_us(),
    };
    let source = open(&config)?;
    let key = keys::public_key(&config.state_dir)?;
    let report = crate::audit::report::build(source.as_ref(), &key, from_us, to_us)?;
    if let Some(path) = out {
        std::fs::write(path, crate::audit::report_html::render(&report))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if !report.verification.ok {
        bail!("the audit store failed verification: see the report");
    }
    Ok(())
}

fn print_events(events: &[EventView], format: &FormatArgs) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if format.json {
        let all: Vec<Value> = events.iter().map(EventView::to_json).collect();
        serde_json::to_writer(&mut out, &all)?;
        writeln!(out)?;
        return Ok(());
    }
    let rows = events.iter().map(|e| {
        vec![
            e.seq.to_string(),
            query::format_time(e.at_us),
            e.name().to_owned(),
            e.session().unwrap_or("").to_owned(),
            e.context.identity.clone(),
            e.context.resource.clone(),
            e.summary(),
        ]
    });
    print_rows(
        &mut out,
        &[
            "seq", "at", "event", "session", "identity", "resource", "details",
        ],
        rows,
        format.csv,
    )
}

fn print_sessions(sessions: &[SessionSummary], format: &FormatArgs) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if format.json {
        serde_json::to_writer(&mut out, sessions)?;
        writeln!(out)?;
        return Ok(());
    }
    let rows = sessions.iter().map(|s| {
        vec![
            s.session.clone(),
            s.start.clone(),
            s.end.clone().unwrap_or_else(|| "(open)".into()),
            s.context.identity.clone(),
            s.context.resource.clone(),
            s.context.protocol.clone(),
            s.context.destination.clone(),
            s.events.to_string(),
        ]
    });
    print_rows(
        &mut out,
        &[
            "session",
            "start",
            "end",
            "identity",
            "resource",
            "protocol",
            "destination",
            "events",
        ],
        rows,
        format.csv,
    )
}

/// A table with columns as wide as their content, or CSV (RFC 4180).
fn print_rows(
    out: &mut impl Write,
    header: &[&str],
    rows: impl Iterator<Item = Vec<String>>,
    csv: bool,
) -> anyhow::Result<()> {
    let rows: Vec<Vec<String>> = rows.collect();
    if csv {
        let quote = |f: &str| {
            if f.contains([',', '"', '\n', '\r']) {
                format!("\"{}\"", f.replace('"', "\"\""))
            } else {
                f.to_owned()
            }
        };
        writeln!(out, "{}", header.join(","))?;
        for row in &rows {
            writeln!(
                out,
                "{}",
                row.iter().map(|f| quote(f)).collect::<Vec<_>>().join(",")
            )?;
        }
        return Ok(());
    }
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, f) in widths.iter_mut().zip(row) {
            *w = (*w).max(f.chars().count()).min(60);
        }
    }
    let line = |fields: Vec<&str>| {
        fields
            .iter()
            .zip(&widths)
            .map(|(f, w)| format!("{:<w$}", f.chars().take(*w).collect::<String>(), w = *w))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    writeln!(out, "{}", line(header.to_vec()))?;
    for row in &rows {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
    }
    if rows.is_empty() {
        writeln!(out, "(nothing matches)")?;
    }
    Ok(())
}

fn replay(config: &Config, session: &str, json: bool) -> anyhow::Result<()> {
    let events = query::events(open(config)?.as_ref())?;
    let events: Vec<_> = events
        .into_iter()
        .filter(|e| e.session() == Some(session))
        .collect();
    let Some(first) = events.first() else {
        bail!("no session {session} in the store (list them with `portcullis audit sessions`)");
    };
    if json {
        let all: Vec<Value> = events.iter().map(EventView::to_json).collect();
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    // The latest context: an adapter's login names the resource.
    let c = &events[events.len() - 1].context;
    println!(
        "session {session}: {} on {} ({}) to {}",
        c.identity, c.resource, c.protocol, c.destination
    );
    let start = first.at_us;
    let mut statement = 0;
    for e in &events {
        let offset = e.at_us.saturating_sub(start) as f64 / 1e6;
        let label = match e.name() {
            "statement" => {
                statement += 1;
                format!("statement {statement}")
            }
            other => other.to_owned(),
        };
        println!("+{offset:>9.3}s  #{:<6} {label:<16} {}", e.seq, e.summary());
        for key in [
            "parameters",
            "command_tag",
            "duration_us",
            "error",
            "rules",
            "reason",
        ] {
            if let Some(v) = e.fields.get(key).filter(|v| !v.is_null()) {
                println!("{:>30} {key}: {}", "", v);
            }
        }
    }
    Ok(())
}

fn subject(config: &Config, value: &str, json: bool) -> anyhow::Result<()> {
    let key = keys::subject_key(&config.state_dir).context("reading the subject-index key")?;
    let hits = open(config)?.subject_hits(&subject_hash(&key, value))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&hits)?);
        return Ok(());
    }
    let rows = hits.iter().map(|h| {
        vec![
            h.session.clone().unwrap_or_else(|| "-".into()),
            h.statement_seq.map_or("-".into(), |s| s.to_string()),
            h.seq.to_string(),
            query::format_time(h.at_us),
            h.source.clone(),
        ]
    });
    print_rows(
        &mut std::io::stdout().lock(),
        &["session", "statement", "record", "at", "source"],
        rows,
        false,
    )
}

fn print_verification(v: &Verification, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(v)?);
    } else {
        println!(
            "records:      {} ({} purged by retention)",
            v.records, v.purged
        );
        println!("head:         seq {}", v.head_seq);
        match &v.last_checkpoint {
            Some(cp) => println!(
                "checkpoints:  {} (last #{} at seq {}, {}; {} records since)",
                v.checkpoints,
                cp.number,
                cp.seq,
                query::format_time(cp.at_us),
                v.unsigned_tail
            ),
            None => println!("checkpoints:  none yet"),
        }
        println!("public key:   {}", v.public_key);
        for p in &v.problems {
            println!("PROBLEM at seq {}: {}", p.seq, p.message);
        }
    }
    match v.first_problem() {
        None => {
            if !json {
                println!("OK: the chain and every signed checkpoint verify");
            }
            Ok(())
        }
        Some(p) => bail!(
            "audit store TAMPERED: first problem at seq {}: {}",
            p.seq,
            p.message
        ),
    }
}
