//! `portcullis policy check|explain` and `portcullis approvals list|approve|deny`.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context};
use clap::Subcommand;

use crate::{
    config::Config,
    identity::{Principal, PrincipalKind},
    policy::{
        classify,
        control::{self, ControlRequest, SOCKET_NAME},
        engine::request_for,
        file::MaskTarget,
        Decision, NoGrants, Policy,
    },
};

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate the policy file; exit 1 with the line and reason if invalid.
    Check {
        /// A policy file to check instead of the configured one.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Say which rule decides a statement, and why, without running it.
    Explain {
        /// The resource the statement would run on.
        #[arg(long)]
        resource: String,
        /// Who runs it: a subject (`unix:alice`, `https://idp#sub`) or a
        /// login name (taken as `unix:<name>`).
        #[arg(long = "as")]
        user: String,
        /// Roles to assume the principal has (repeatable).
        #[arg(long = "role")]
        roles: Vec<String>,
        /// A policy file to use instead of the configured one.
        #[arg(long)]
        file: Option<PathBuf>,
        /// The SQL (one or more statements).
        sql: String,
    },
}

/// Where the daemon's approvals socket is.
#[derive(Debug, clap::Args)]
pub struct ApprovalsArgs {
    /// The approvals socket; defaults to approvals.sock in the config's
    /// state_dir.
    #[arg(long, global = true, env = "PORTCULLIS_APPROVALS_SOCKET")]
    pub socket: Option<PathBuf>,
    #[command(subcommand)]
    pub command: ApprovalsCommand,
}

#[derive(Debug, Subcommand)]
pub enum ApprovalsCommand {
    /// Requests waiting for you to decide.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Approve a request: that statement only, or `--for 30m` to grant the
    /// rule to the requester on that resource for a time window.
    Approve {
        id: String,
        #[arg(long = "for", value_parser = humantime::parse_duration)]
        window: Option<Duration>,
        /// Why (recorded).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Deny a request; the reason is shown to the requester and recorded.
    Deny {
        id: String,
        #[arg(long)]
        reason: String,
    },
}

fn policy_file(config: &Path, file: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(file) = file {
        return Ok(file.to_owned());
    }
    let loaded = Config::load(config)?;
    loaded.policy_path(config).with_context(|| {
        format!(
            "{} has no [policy] file = \"...\" setting; add one, or pass --file",
            config.display()
        )
    })
}

fn load(path: &Path) -> anyhow::Result<Policy> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading policy file {}", path.display()))?;
    Policy::parse(&text).with_context(|| format!("invalid policy file {}", path.display()))
}

pub fn run_policy(config: &Path, command: &PolicyCommand) -> anyhow::Result<()> {
    match command {
        PolicyCommand::Check { file } => {
            let path = policy_file(config, file.as_deref())?;
            let policy = load(&path)?;
            println!(
                "{}: ok ({} rules, {} masks)",
                path.display(),
                policy.rules.len(),
                policy.masks.len()
            );
            Ok(())
        }
        PolicyCommand::Explain {
            resource,
            user,
            roles,
            file,
            sql,
        } => {
            let policy = load(&policy_file(config, file.as_deref())?)?;
            let subject = if user.contains(':') {
                user.clone()
            } else {
                format!("unix:{user}")
            };
            let principal = Principal {
                name: user.clone(),
                subject,
                kind: PrincipalKind::Person,
                roles: roles.clone(),
            };
            explain(&policy, resource, &principal, sql);
            Ok(())
        }
    }
}

fn explain(policy: &Policy, resource: &str, principal: &Principal, sql: &str) {
    let statements = match classify(sql, &policy.settings.large_tables) {
        Ok(s) => s,
        Err(e) => {
            let verdict = if policy.settings.allow_unparseable {
                "allow (settings.unparseable = \"allow\")"
            } else {
                "BLOCK (rule: unparseable)"
            };
            println!("decision: {verdict}\nwhy: {e}");
            return;
        }
    };
    let mut verdicts = Vec::new();
    for (i, s) in statements.iter().enumerate() {
        let verdict = policy.judge_statement(s, resource, principal, &NoGrants);
        let ops: Vec<_> = s.operations.iter().map(|o| o.name()).collect();
        println!("statement {}: {}", i + 1, s.text);
        println!(
            "  command {}; operations {}; tables [{}]; columns [{}]{}{}",
            s.command,
            ops.join(", "),
            s.tables.join(", "),
            s.columns.join(", "),
            s.filtered.map_or(String::new(), |w| format!(
                "; WHERE {}",
                if w { "yes" } else { "no" }
            )),
            if s.unfiltered_write {
                "; DELETE/UPDATE without WHERE"
            } else {
                ""
            },
        );
        println!("  decision: {}", describe(policy, &verdict.decision));
        println!("  why: {}", verdict.why);
        if matches!(verdict.decision, Decision::RequireApproval { .. }) {
            let masks = policy.masks_for(&request_for(s, resource, principal));
            if !masks.is_empty() {
                println!(
                    "  if approved: {}",
                    describe(policy, &Decision::Mask { rules: masks })
                );
            }
        }
        verdicts.push(verdict);
    }
    if statements.len() > 1 {
        println!(
            "message as a whole: {}",
            describe(policy, &crate::policy::combine(&verdicts))
        );
    }
}

fn describe(policy: &Policy, decision: &Decision) -> String {
    match decision {
        Decision::Allow => "allow".into(),
        Decision::Block { reason, rule } => format!("BLOCK by '{rule}': {reason}"),
        Decision::Mask { rules } => {
            let names: Vec<String> = rules
                .iter()
                .filter_map(|&i| policy.masks.get(i))
                .map(|m| match &m.target {
                    MaskTarget::Column { .. } => format!("{} (column, line {})", m.name, m.line),
                    MaskTarget::Content(_) => format!("{} (content, line {})", m.name, m.line),
                })
                .collect();
            format!("allow, masking with {}", names.join(", "))
        }
        Decision::RequireApproval {
            rule,
            reason,
            approvers,
            timeout,
            ..
        } => format!(
            "REQUIRE APPROVAL by '{rule}': {reason} (approvers: {approvers}; timeout {})",
            humantime::format_duration(*timeout)
        ),
    }
}

pub fn run_approvals(config: &Path, args: &ApprovalsArgs) -> anyhow::Result<()> {
    let socket = match &args.socket {
        Some(socket) => socket.clone(),
        None => Config::load(config)?.state_dir.join(SOCKET_NAME),
    };
    let command = &args.command;
    let request = match command {
        ApprovalsCommand::List { .. } => ControlRequest::List,
        ApprovalsCommand::Approve { id, window, reason } => ControlRequest::Approve {
            id: id.clone(),
            window_secs: window.map(|w| w.as_secs().max(1)),
            reason: reason.clone(),
        },
        ApprovalsCommand::Deny { id, reason } => ControlRequest::Deny {
            id: id.clone(),
            reason: reason.clone(),
        },
    };
    let response = control::call(&socket, &request)?;
    if !response.ok {
        bail!(
            "{} (you are {})",
            response.error.unwrap_or_default(),
            if response.you.is_empty() {
                "not signed in"
            } else {
                &response.you
            }
        );
    }
    match command {
        ApprovalsCommand::List { json: true } => {
            println!("{}", serde_json::to_string_pretty(&response.pending)?)
        }
        ApprovalsCommand::List { json: false } => {
            if response.pending.is_empty() {
                println!("no requests waiting for {}", response.you);
            }
            for p in &response.pending {
                println!(
                    "{}  {} on {}  rule {}: {}\n    {}\n    expires at {}{}",
                    p.id,
                    p.requester,
                    p.resource,
                    p.rule,
                    p.reason,
                    p.statement,
                    humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + Duration::from_secs(p.expires_at)
                    ),
                    if p.max_window_secs > 0 {
                        format!(
                            "; a grant of up to {} may be given (--for)",
                            humantime::format_duration(Duration::from_secs(p.max_window_secs))
                        )
                    } else {
                        String::new()
                    }
                );
            }
        }
        ApprovalsCommand::Approve { window, .. } => {
            let d = response
                .decided
                .context("the daemon did not say what it decided")?;
            match window {
                Some(w) => println!(
                    "approved {}: {} may use rule {} on {} for {}",
                    d.id,
                    d.requester,
                    d.rule,
                    d.resource,
                    humantime::format_duration(*w)
                ),
                None => println!("approved {}: the statement of {} runs", d.id, d.requester),
            }
        }
        ApprovalsCommand::Deny { id, .. } => println!("denied {id}"),
    }
    Ok(())
}
