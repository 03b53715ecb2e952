//! `portcullis audit ...` and `portcullis report ...`: the auditor tools.
//!
//! They read the store through the daemon's auditor socket while it runs,
//! else (root only) the files directly ([`crate::audit::source`]). Root and
//! members of the auditors role (signed in with `portcullis login`) may
//! use them; the daemon decides, per connection, from the kernel's word on
//! the caller's uid, and records every non-root command in the chain.

use std::{
    io::{BufWriter, Write},
    path::{Path, PathBuf},
    sync::atomic::AtomicBool,
};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::Value;

use crate::{
    audit::{
        export::{self, Target},
        keys,
        query::{self, EventView, Filter, SessionSummary},
        source::{self, now_us, Access, AuditSource},
        verify::{verify, ProblemKind, Verification},
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
    /// Check the chain, the signed checkpoints and the time index; exit 1 at
    /// the first sign of editing, deletion, reordering or truncation.
    Verify {
        /// The auditor's copy of the public key (else the host's key file).
        #[arg(long)]
        public_key: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Build the time index again from the chain (when `verify` finds it
    /// is not the chain's); the chain itself is not changed.
    Reindex,
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
    /// Create the signing and subject-index keys if missing (root; run by
    /// `cargo xtask install`); never replaces a key. Prints the public key.
    InitKeys,
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

/// Where the daemon's auditor socket is.
#[derive(Debug, Args)]
pub struct AuditSocketArg {
    /// The daemon's auditor socket; defaults to `[audit] socket` of the
    /// config (when you may read it), else <state_dir>/audit.sock.
    #[arg(long = "socket", global = true, env = "PORTCULLIS_AUDIT_SOCKET")]
    pub socket: Option<PathBuf>,
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
    /// The flags as given, for the access record.
    fn describe(&self) -> String {
        [
            ("identity", &self.identity),
            ("resource", &self.resource),
            ("protocol", &self.protocol),
            ("since", &self.since),
            ("until", &self.until),
            ("action", &self.action),
            ("rule", &self.rule),
        ]
        .iter()
        .filter_map(|(name, v)| v.as_ref().map(|v| format!(" --{name} {v}")))
        .collect()
    }

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

/// What the access record says the caller ran; a looked-up personal value
/// is left out (the daemon adds its keyed hash).
fn describe(command: &AuditCommand) -> String {
    let format = |f: &FormatArgs| match (f.json, f.csv) {
        (true, _) => " --json",
        (_, true) => " --csv",
        _ => "",
    };
    match command {
        AuditCommand::Sessions { filter, format: f } => {
            format!("audit sessions{}{}", filter.describe(), format(f))
        }
        AuditCommand::Events {
            filter,
            session,
            format: f,
        } => format!(
            "audit events{}{}{}",
            filter.describe(),
            session
                .as_ref()
                .map_or(String::new(), |s| format!(" --session {s}")),
            format(f)
        ),
        AuditCommand::Replay { session, .. } => format!("audit replay {session}"),
        AuditCommand::Subject { .. } => "audit subject (value withheld)".into(),
        AuditCommand::Verify { public_key, .. } => match public_key {
            Some(key) => format!("audit verify --public-key {key}"),
            None => "audit verify".into(),
        },
        AuditCommand::Reindex => "audit reindex".into(),
        AuditCommand::Export { from, follow, .. } => format!(
            "audit export{}{}",
            from.map_or(String::new(), |f| format!(" --from {f}")),
            if *follow { " --follow" } else { "" }
        ),
        AuditCommand::PublicKey => "audit public-key".into(),
        AuditCommand::InitKeys => "audit init-keys".into(),
        AuditCommand::Purge { as_of } => match as_of {
            Some(t) => format!("audit purge --as-of {t}"),
            None => "audit purge".into(),
        },
    }
}

/// The config (root must be able to read it; others use it when they
/// can) and how to reach the store.
fn access(
    config_path: &Path,
    socket: &AuditSocketArg,
    query: String,
) -> anyhow::Result<(Config, Access)> {
    let root = super::euid_is_root();
    let config = if root {
        Config::load(config_path)?
    } else {
        // The installed config is root's (0640): fall back to the defaults.
        Config::load(config_path).or_else(|_| Config::parse(""))?
    };
    let access = Access {
        socket: socket
            .socket
            .clone()
            .unwrap_or_else(|| config.audit.socket_path(&config.state_dir)),
        state_dir: config.state_dir.clone(),
        retention: config.audit.retention(),
        root,
        query,
    };
    Ok((config, access))
}

pub fn run(
    config_path: &Path,
    socket: &AuditSocketArg,
    command: &AuditCommand,
) -> anyhow::Result<()> {
    let (config, access) = access(config_path, socket, describe(command))?;
    let open = || -> anyhow::Result<Box<dyn AuditSource>> { Ok(source::open(&access)?) };
    match command {
        AuditCommand::Sessions { filter, format } => {
            let filter = filter.filter(None)?;
            let mut sessions = query::Sessions::default();
            let source = open()?;
            let (from, until) =
                source::seqs_between(source.as_ref(), filter.since_us, filter.until_us);
            query::for_each_event(source.as_ref(), from, until, Some(&filter), |e| {
                if filter.matches(&e) {
                    sessions.add(&e);
                }
                true
            })?;
            print_sessions(&sessions.finish(), format)
        }
        AuditCommand::Events {
            filter,
            session,
            format,
        } => {
            let filter = filter.filter(session.clone())?;
            print_events(open()?.as_ref(), &filter, format)
        }
        AuditCommand::Replay { session, json } => replay(open()?.as_ref(), session, *json),
        AuditCommand::Subject { value, json } => subject(open()?.as_ref(), value, *json),
        AuditCommand::Verify { public_key, json } => {
            let source = open()?;
            let key = match public_key {
                Some(text) => keys::parse_public_key(text)?,
                None => source
                    .public_key()
                    .context("reading the host's signing key (or pass --public-key)")?,
            };
            let result = verify(source.as_ref(), &key)?;
            print_verification(&result, *json)
        }
        AuditCommand::Reindex => {
            let read = open()?.rebuild_time_index()?;
            println!("the time index was built again from the chain's {read} records");
            Ok(())
        }
        AuditCommand::Export { to, from, follow } => {
            let source = open()?;
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
            // Root reads the key file (the daemon need not run); others ask
            // the daemon.
            let key = if access.root {
                keys::public_key(&config.state_dir).context(
                    "the key is created by `portcullis audit init-keys` (run by the installer) \
                     or at the daemon's first start",
                )?
            } else {
                open()?.public_key()?
            };
            println!("{}", hex::encode(key.to_bytes()));
            Ok(())
        }
        AuditCommand::InitKeys => init_keys(&config),
        AuditCommand::Purge { as_of } => {
            let as_of = match as_of {
                Some(t) => query::parse_time(t).map_err(anyhow::Error::msg)?,
                None => now_us(),
            };
            let summary = open()?.purge(as_of)?;
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

/// `audit init-keys`: creates missing keys, keeps existing ones, and
/// prints the public key on stdout (what happened on stderr).
fn init_keys(config: &Config) -> anyhow::Result<()> {
    if !super::euid_is_root() {
        bail!("`portcullis audit init-keys` writes root-only key files: run it as root");
    }
    let dir = &config.state_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let created = keys::init(dir)?;
    for name in [keys::SIGNING_KEY_FILE, keys::SUBJECT_KEY_FILE] {
        let path = dir.join(name);
        if created.contains(&path) {
            eprintln!("created {} (mode 0600)", path.display());
        } else {
            eprintln!("kept the existing {}", path.display());
        }
    }
    let key = keys::public_key(dir)?;
    println!("{}", hex::encode(key.to_bytes()));
    Ok(())
}

pub fn report(
    config_path: &Path,
    socket: &AuditSocketArg,
    command: &ReportCommand,
) -> anyhow::Result<()> {
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
    let query = format!(
        "report gdpr --from {from}{}",
        to.as_ref().map_or(String::new(), |t| format!(" --to {t}"))
    );
    let (_, access) = access(config_path, socket, query)?;
    let source = source::open(&access)?;
    let key = source.public_key()?;
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

const EVENT_HEADER: [&str; 7] = [
    "seq", "at", "event", "session", "identity", "resource", "details",
];

fn event_row(e: &EventView) -> Vec<String> {
    vec![
        e.seq.to_string(),
        query::format_time(e.at_us),
        e.name().to_owned(),
        e.session().unwrap_or("").to_owned(),
        e.context.identity.clone(),
        e.context.resource.clone(),
        e.summary(),
    ]
}

/// Prints the matching events as they are read: JSON and CSV in one walk,
/// a table in two (the first measures the columns, the second prints up to
/// where the first ended).
fn print_events(
    source: &dyn AuditSource,
    filter: &Filter,
    format: &FormatArgs,
) -> anyhow::Result<()> {
    let mut out = BufWriter::new(std::io::stdout().lock());
    let mut failed = None;
    // One session's events begin at its start, and the index of times
    // says where a time does.
    let session_from = filter
        .session
        .as_deref()
        .map_or(1, |session| source::first_seq_of(source, session));
    let (time_from, until) = source::seqs_between(source, filter.since_us, filter.until_us);
    let from = session_from.max(time_from);
    if format.json {
        out.write_all(b"[")?;
        let mut first = true;
        query::for_each_event(source, from, until, Some(filter), |e| {
            if !filter.matches(&e) {
                return true;
            }
            let lead: &[u8] = if std::mem::take(&mut first) {
                b""
            } else {
                b","
            };
            let written = out
                .write_all(lead)
                .and_then(|()| serde_json::to_writer(&mut out, &e.to_json()).map_err(Into::into));
            keep(written, &mut failed)
        })?;
        if let Some(e) = failed {
            return Err(e.into());
        }
        out.write_all(b"]\n")?;
    } else if format.csv {
        write_csv_row(&mut out, EVENT_HEADER.iter().copied())?;
        query::for_each_event(source, from, until, Some(filter), |e| {
            if !filter.matches(&e) {
                return true;
            }
            let row = event_row(&e);
            keep(
                write_csv_row(&mut out, row.iter().map(String::as_str)),
                &mut failed,
            )
        })?;
    } else {
        let mut table = Table::new(&EVENT_HEADER);
        let walked = query::for_each_event(source, from, until, Some(filter), |e| {
            if filter.matches(&e) {
                table.measure(&event_row(&e));
            }
            true
        })?;
        table.write_header(&mut out)?;
        query::for_each_event(source, from, Some(walked), Some(filter), |e| {
            if !filter.matches(&e) {
                return true;
            }
            keep(table.write_row(&mut out, &event_row(&e)), &mut failed)
        })?;
        table.write_end(&mut out)?;
    }
    if let Some(e) = failed {
        return Err(e.into());
    }
    out.flush()?;
    Ok(())
}

/// True to go on walking; a write error is kept for after the walk.
fn keep(result: std::io::Result<()>, failed: &mut Option<std::io::Error>) -> bool {
    match result {
        Ok(()) => true,
        Err(e) => {
            *failed = Some(e);
            false
        }
    }
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
        write_csv_row(out, header.iter().copied())?;
        for row in &rows {
            write_csv_row(out, row.iter().map(String::as_str))?;
        }
        return Ok(());
    }
    let mut table = Table::new(header);
    for row in &rows {
        table.measure(row);
    }
    table.write_header(out)?;
    for row in &rows {
        table.write_row(out, row)?;
    }
    table.write_end(out)?;
    Ok(())
}

fn write_csv_row<'a>(
    out: &mut impl Write,
    fields: impl Iterator<Item = &'a str>,
) -> std::io::Result<()> {
    let quote = |f: &str| {
        if f.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", f.replace('"', "\"\""))
        } else {
            f.to_owned()
        }
    };
    writeln!(out, "{}", fields.map(quote).collect::<Vec<_>>().join(","))
}

/// Columns as wide as their widest field (at most 60 characters),
/// measured before anything is printed.
struct Table {
    header: Vec<String>,
    widths: Vec<usize>,
    rows: u64,
}

impl Table {
    fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| h.to_string()).collect(),
            widths: header.iter().map(|h| h.len()).collect(),
            rows: 0,
        }
    }

    fn measure(&mut self, row: &[String]) {
        self.rows += 1;
        for (w, f) in self.widths.iter_mut().zip(row) {
            *w = (*w).max(f.chars().count()).min(60);
        }
    }

    fn line(&self, fields: &[String]) -> String {
        fields
            .iter()
            .zip(&self.widths)
            .map(|(f, w)| format!("{:<w$}", f.chars().take(*w).collect::<String>(), w = *w))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    }

    fn write_header(&self, out: &mut impl Write) -> std::io::Result<()> {
        writeln!(out, "{}", self.line(&self.header))
    }

    fn write_row(&self, out: &mut impl Write, row: &[String]) -> std::io::Result<()> {
        writeln!(out, "{}", self.line(row))
    }

    fn write_end(&self, out: &mut impl Write) -> std::io::Result<()> {
        if self.rows == 0 {
            writeln!(out, "(nothing matches)")?;
        }
        Ok(())
    }
}

/// `value` pretty-printed as an element of a pretty-printed array (what
/// `serde_json::to_string_pretty` of the whole array would write for it).
fn pretty_element(value: &Value) -> anyhow::Result<String> {
    let text = serde_json::to_string_pretty(value)?;
    Ok(text
        .lines()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n"))
}

/// One session, event by event: the matching events are read as they
/// come (a session can be long), twice for the text form, whose heading
/// names the session's latest context.
fn replay(source: &dyn AuditSource, session: &str, json: bool) -> anyhow::Result<()> {
    let missing = || {
        anyhow::anyhow!(
            "no session {session} in the store (list them with `portcullis audit sessions`)"
        )
    };
    let mut out = BufWriter::new(std::io::stdout().lock());
    let mut failed: Option<anyhow::Error> = None;
    let from = source::first_seq_of(source, session);
    if json {
        let mut first = true;
        query::for_each_event(source, from, None, None, |e| {
            if e.session() != Some(session) {
                return true;
            }
            let written = pretty_element(&e.to_json()).and_then(|text| {
                let lead = if std::mem::take(&mut first) {
                    "[\n"
                } else {
                    ",\n"
                };
                out.write_all(lead.as_bytes())?;
                out.write_all(text.as_bytes())?;
                Ok(())
            });
            written.map_err(|e| failed = Some(e)).is_ok()
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        if first {
            return Err(missing());
        }
        out.write_all(b"\n]\n")?;
        out.flush()?;
        return Ok(());
    }
    // The latest context: an adapter's login names the resource.
    let mut start = None;
    let mut context = None;
    let until = query::for_each_event(source, from, None, None, |e| {
        if e.session() == Some(session) {
            start.get_or_insert(e.at_us);
            context = Some(e.context);
        }
        true
    })?;
    let (Some(start), Some(c)) = (start, context) else {
        return Err(missing());
    };
    writeln!(
        out,
        "session {session}: {} on {} ({}) to {}",
        c.identity, c.resource, c.protocol, c.destination
    )?;
    let mut statement = 0;
    query::for_each_event(source, from, Some(until), None, |e| {
        if e.session() != Some(session) {
            return true;
        }
        replay_line(&mut out, &e, start, &mut statement)
            .map_err(|e| failed = Some(e.into()))
            .is_ok()
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    out.flush()?;
    Ok(())
}

fn replay_line(
    out: &mut impl Write,
    e: &EventView,
    start: u64,
    statement: &mut u64,
) -> std::io::Result<()> {
    let offset = e.at_us.saturating_sub(start) as f64 / 1e6;
    let label = match e.name() {
        // Numbered as recorded (what data-subject hits name); records
        // from before statements carried their number are counted.
        "statement" => {
            *statement = match e.fields.get("statement_seq").and_then(|n| n.as_u64()) {
                Some(number) => number,
                None => statement.saturating_add(1),
            };
            format!("statement {statement}")
        }
        other => other.to_owned(),
    };
    writeln!(
        out,
        "+{offset:>9.3}s  #{:<6} {label:<16} {}",
        e.seq,
        e.summary()
    )?;
    for key in [
        "parameters",
        "command_tag",
        "duration_us",
        "error",
        "rules",
        "reason",
    ] {
        if let Some(v) = e.fields.get(key).filter(|v| !v.is_null()) {
            writeln!(out, "{:>30} {key}: {}", "", v)?;
        }
    }
    Ok(())
}

fn subject(source: &dyn AuditSource, value: &str, json: bool) -> anyhow::Result<()> {
    let hits = source
        .subject_hits_for(value)
        .context("looking up the value in the data-subject index")?;
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
            h.source.name().to_string(),
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
        Some(p) if v.problems.iter().all(|p| p.kind == ProblemKind::Index) => bail!(
            "the chain and its checkpoints verify, but the audit store's time index is WRONG \
             at seq {}: {}",
            p.seq,
            p.message
        ),
        Some(p) => bail!(
            "audit store TAMPERED: first problem at seq {}: {}",
            p.seq,
            p.message
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_pretty_array_matches_serde_json() {
        let all = vec![
            serde_json::json!({"seq": 1, "event": "session_start", "principal": {"name": "a", "roles": ["x"]}}),
            serde_json::json!({"seq": 2, "fields": [], "nested": {"empty": {}}}),
        ];
        let streamed = format!(
            "[\n{}\n]",
            all.iter()
                .map(|v| pretty_element(v).unwrap())
                .collect::<Vec<_>>()
                .join(",\n")
        );
        assert_eq!(streamed, serde_json::to_string_pretty(&all).unwrap());
    }

    #[test]
    fn table_pads_to_the_widest_field_and_caps_at_60() {
        let mut table = Table::new(&["a", "bb"]);
        let rows = [
            vec!["xyz".to_string(), "1".to_string()],
            vec!["q".repeat(70), String::new()],
        ];
        for row in &rows {
            table.measure(row);
        }
        let mut out = Vec::new();
        table.write_header(&mut out).unwrap();
        for row in &rows {
            table.write_row(&mut out, row).unwrap();
        }
        table.write_end(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], format!("a{}  bb", " ".repeat(59)));
        assert_eq!(lines[1], format!("xyz{}  1", " ".repeat(57)));
        assert_eq!(lines[2], "q".repeat(60));
        let mut empty = Vec::new();
        Table::new(&["a"]).write_end(&mut empty).unwrap();
        assert_eq!(empty, b"(nothing matches)\n");
    }
}
