//! The policy file: TOML, read in two steps (serde, then validation), with
//! every error naming the line it is about.
//!
//! ```toml
//! [settings]
//! default = "allow"              # when no [[rule]] matches: allow | block
//! large_tables = ["events"]      # unbounded reads of these count as export
//! approvers = ["unix:alice"]     # subjects who may approve any request
//! approval_timeout = "5m"
//! webhook = "http://127.0.0.1:9000/approvals"
//!
//! [[rule]]                       # first matching rule decides
//! name = "no-unfiltered-writes"
//! unfiltered_write = true
//! action = "block"
//! reason = "DELETE and UPDATE need a WHERE clause"
//!
//! [[mask]]                       # every matching mask applies
//! name = "emails"
//! detector = "email"
//! style = "pseudonym"
//! ```

use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::{
    detect::{Builtin, Detector},
    mask::Style,
    request::{Operation, Operations},
};

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// TOML syntax or a bad value; the message carries line and column.
    #[error("{0}")]
    Toml(Box<toml::de::Error>),
    #[error("line {line}: {what} '{name}': {reason}")]
    Invalid {
        line: usize,
        what: &'static str,
        name: String,
        reason: String,
    },
}

/// A compiled, validated policy.
#[derive(Debug, Clone)]
pub struct Policy {
    pub settings: Settings,
    pub rules: Vec<Rule>,
    pub masks: Vec<MaskRule>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// What happens when no rule matches.
    pub default_allow: bool,
    /// Whether statements the parser rejects are let through (never by
    /// default).
    pub allow_unparseable: bool,
    pub large_tables: Vec<String>,
    /// Subjects who may approve any approval rule, besides its roles.
    pub approvers: Vec<String>,
    pub approval_timeout: Duration,
    pub webhook: Option<String>,
}

/// Who and where a rule applies to. Empty lists match everything.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    pub resources: Vec<String>,
    pub protocols: Vec<String>,
    /// The principal has at least one of these roles.
    pub roles: Vec<String>,
    pub subjects: Vec<String>,
    /// The rule does not apply to principals with any of these roles.
    pub unless_roles: Vec<String>,
}

/// An access rule: conditions and an action.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub line: usize,
    pub scope: Scope,
    pub commands: Vec<String>,
    pub operations: Operations,
    pub tables: Vec<String>,
    pub columns: Vec<String>,
    pub filtered: Option<bool>,
    pub limited: Option<bool>,
    pub unfiltered_write: Option<bool>,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Allow,
    Block {
        reason: String,
    },
    Approve {
        reason: String,
        /// Roles whose members may approve.
        roles: Vec<String>,
        /// Subjects who may approve.
        subjects: Vec<String>,
        timeout: Duration,
        /// Longest time-window grant an approver may give; `None`: this
        /// statement only.
        max_window: Option<Duration>,
    },
}

/// A masking rule.
#[derive(Debug, Clone)]
pub struct MaskRule {
    pub name: String,
    pub line: usize,
    pub scope: Scope,
    pub target: MaskTarget,
    pub style: Style,
}

#[derive(Debug, Clone)]
pub enum MaskTarget {
    /// Whole values of matching columns.
    Column {
        names: Vec<String>,
        pattern: Option<regex::Regex>,
        table: Option<String>,
    },
    /// Matches of a detector inside any text value.
    Content(Detector),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    settings: RawSettings,
    #[serde(default, rename = "rule")]
    rules: Vec<RawRule>,
    #[serde(default, rename = "mask")]
    masks: Vec<RawMask>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    #[serde(default)]
    default: Option<AllowBlock>,
    #[serde(default)]
    unparseable: Option<AllowBlock>,
    #[serde(default)]
    large_tables: Vec<String>,
    #[serde(default)]
    approvers: Vec<String>,
    #[serde(default, deserialize_with = "duration")]
    approval_timeout: Option<Duration>,
    #[serde(default)]
    webhook: Option<String>,
}

#[derive(Deserialize, Clone, Copy, PartialEq)]
#[serde(rename_all = "lowercase")]
enum AllowBlock {
    Allow,
    Block,
}

#[derive(Deserialize, Clone, Copy, PartialEq)]
#[serde(rename_all = "lowercase")]
enum ActionKind {
    Allow,
    Block,
    Approve,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    protocols: Vec<String>,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    subjects: Vec<String>,
    #[serde(default)]
    unless_roles: Vec<String>,
    #[serde(default)]
    commands: Vec<String>,
    #[serde(default, deserialize_with = "operations")]
    operations: Operations,
    #[serde(default)]
    tables: Vec<String>,
    #[serde(default)]
    columns: Vec<String>,
    #[serde(default, rename = "where")]
    filtered: Option<bool>,
    #[serde(default, rename = "limit")]
    limited: Option<bool>,
    #[serde(default)]
    unfiltered_write: Option<bool>,
    action: ActionKind,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    approvers: Vec<String>,
    #[serde(default)]
    approver_subjects: Vec<String>,
    #[serde(default, deserialize_with = "duration")]
    timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    window: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMask {
    name: String,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    protocols: Vec<String>,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    subjects: Vec<String>,
    #[serde(default)]
    unless_roles: Vec<String>,
    #[serde(default)]
    columns: Vec<String>,
    #[serde(default)]
    column_pattern: Option<String>,
    #[serde(default)]
    table: Option<String>,
    #[serde(default)]
    detector: Option<String>,
    #[serde(default)]
    regex: Option<String>,
    style: String,
    #[serde(default)]
    keep_last: Option<usize>,
}

/// Longest approval timeout or grant window a policy may set. Longer is
/// not an approval any more but a rule; and times are computed from now,
/// which a duration of ages would overflow.
const LONGEST_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    let duration = humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!(
            "'{text}' is not a duration ({e}); write e.g. \"90s\", \"5m\", \"1h\""
        ))
    })?;
    if duration > LONGEST_DURATION {
        return Err(serde::de::Error::custom(format!(
            "'{text}' is longer than a year: write at most \"366d\" (for longer, allow it by a rule)"
        )));
    }
    Ok(Some(duration))
}

fn operations<'de, D: Deserializer<'de>>(d: D) -> Result<Operations, D::Error> {
    let names = Vec::<String>::deserialize(d)?;
    names
        .iter()
        .map(|n| {
            Operation::parse(n).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "unknown operation '{n}' (choose from read, write, ddl, dcl, export, session)"
                ))
            })
        })
        .collect()
}

macro_rules! scope_of {
    ($raw:expr) => {
        Scope {
            resources: $raw.resources,
            protocols: $raw.protocols,
            roles: $raw.roles,
            subjects: $raw.subjects,
            unless_roles: $raw.unless_roles,
        }
    };
}

/// Lines of the `[[header]]` tables in `text`, in order.
fn header_lines(text: &str, header: &str) -> Vec<usize> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| {
            let l = l.trim_start();
            l.starts_with("[[")
                && l[2..].trim_start().starts_with(header)
                && l[2..].trim_start()[header.len()..]
                    .trim_start()
                    .starts_with("]]")
        })
        .map(|(i, _)| i + 1)
        .collect()
}

impl Policy {
    /// Parses and validates policy text.
    ///
    /// # Errors
    /// [`FileError`] naming the line and what to change.
    pub fn parse(text: &str) -> Result<Self, FileError> {
        let raw: RawPolicy = toml::from_str(text).map_err(|e| FileError::Toml(Box::new(e)))?;
        let rule_lines = header_lines(text, "rule");
        let mask_lines = header_lines(text, "mask");
        let s = raw.settings;
        let settings = Settings {
            default_allow: s.default != Some(AllowBlock::Block),
            allow_unparseable: s.unparseable == Some(AllowBlock::Allow),
            large_tables: s.large_tables.iter().map(|t| t.to_lowercase()).collect(),
            approvers: s.approvers,
            approval_timeout: s.approval_timeout.unwrap_or(Duration::from_secs(300)),
            webhook: s.webhook,
        };
        if let Some(url) = &settings.webhook {
            if !url.starts_with("http://") {
                return Err(FileError::Invalid {
                    line: line_of(text, "webhook"),
                    what: "setting",
                    name: "webhook".into(),
                    reason: format!("'{url}' must be an http:// URL"),
                });
            }
        }
        let mut names = std::collections::HashSet::new();
        let mut rules = Vec::with_capacity(raw.rules.len());
        for (i, r) in raw.rules.into_iter().enumerate() {
            let line = rule_lines.get(i).copied().unwrap_or(0);
            let invalid = |reason: String| FileError::Invalid {
                line,
                what: "rule",
                name: r.name.clone(),
                reason,
            };
            if !names.insert(r.name.clone()) {
                return Err(invalid("another rule or mask has this name".into()));
            }
            let action = match r.action {
                ActionKind::Allow => Action::Allow,
                ActionKind::Block => Action::Block {
                    reason: r.reason.clone().ok_or_else(|| {
                        invalid("action = \"block\" needs a reason (shown to the user)".into())
                    })?,
                },
                ActionKind::Approve => {
                    if r.approvers.is_empty()
                        && r.approver_subjects.is_empty()
                        && settings.approvers.is_empty()
                    {
                        return Err(invalid(
                            "action = \"approve\" needs approvers (roles), approver_subjects, or [settings] approvers".into(),
                        ));
                    }
                    Action::Approve {
                        reason: r
                            .reason
                            .clone()
                            .unwrap_or_else(|| format!("rule '{}' requires approval", r.name)),
                        roles: r.approvers.clone(),
                        subjects: r.approver_subjects.clone(),
                        timeout: r.timeout.unwrap_or(settings.approval_timeout),
                        max_window: r.window,
                    }
                }
            };
            if r.action != ActionKind::Approve
                && (!r.approvers.is_empty() || r.timeout.is_some() || r.window.is_some())
            {
                return Err(invalid(
                    "approvers, timeout and window only apply to action = \"approve\"".into(),
                ));
            }
            rules.push(Rule {
                line,
                scope: scope_of!(r),
                commands: r.commands.iter().map(|c| c.to_uppercase()).collect(),
                operations: r.operations,
                tables: r.tables.iter().map(|t| t.to_lowercase()).collect(),
                columns: r.columns.iter().map(|c| c.to_lowercase()).collect(),
                filtered: r.filtered,
                limited: r.limited,
                unfiltered_write: r.unfiltered_write,
                action,
                name: r.name,
            });
        }
        let mut masks = Vec::with_capacity(raw.masks.len());
        for (i, m) in raw.masks.into_iter().enumerate() {
            let line = mask_lines.get(i).copied().unwrap_or(0);
            let invalid = |reason: String| FileError::Invalid {
                line,
                what: "mask",
                name: m.name.clone(),
                reason,
            };
            if !names.insert(m.name.clone()) {
                return Err(invalid("another rule or mask has this name".into()));
            }
            let by_column = !m.columns.is_empty() || m.column_pattern.is_some();
            let by_content = m.detector.is_some() || m.regex.is_some();
            let target = match (by_column, by_content) {
                (true, false) => MaskTarget::Column {
                    names: m.columns.iter().map(|c| c.to_lowercase()).collect(),
                    pattern: match &m.column_pattern {
                        Some(p) => Some(
                            regex::RegexBuilder::new(p)
                                .case_insensitive(true)
                                .build()
                                .map_err(|e| invalid(format!("column_pattern: {e}")))?,
                        ),
                        None => None,
                    },
                    table: m.table.as_ref().map(|t| t.to_lowercase()),
                },
                (false, true) => {
                    if m.table.is_some() {
                        return Err(invalid(
                            "table only applies to column masks (columns or column_pattern)".into(),
                        ));
                    }
                    MaskTarget::Content(match (&m.detector, &m.regex) {
                        (Some(d), None) => Detector::Builtin(Builtin::parse(d).ok_or_else(
                            || invalid(format!("unknown detector '{d}' (choose from {})", Builtin::NAMES)),
                        )?),
                        (None, Some(re)) => Detector::Regex(
                            regex::bytes::Regex::new(re)
                                .map_err(|e| invalid(format!("regex: {e}")))?,
                        ),
                        _ => return Err(invalid("give either detector or regex, not both".into())),
                    })
                }
                _ => {
                    return Err(invalid(
                        "a mask needs exactly one kind of target: columns/column_pattern, or detector/regex".into(),
                    ))
                }
            };
            let style = match (m.style.as_str(), m.keep_last) {
                ("redact", None) => Style::Redact,
                ("pseudonym", None) => Style::Pseudonym,
                ("partial", keep) => Style::Partial {
                    keep_last: keep.unwrap_or(4),
                },
                ("redact" | "pseudonym", Some(_)) => {
                    return Err(invalid(
                        "keep_last only applies to style = \"partial\"".into(),
                    ))
                }
                (other, _) => {
                    return Err(invalid(format!(
                        "unknown style '{other}' (choose from redact, partial, pseudonym)"
                    )))
                }
            };
            masks.push(MaskRule {
                line,
                scope: scope_of!(m),
                target,
                style,
                name: m.name,
            });
        }
        Ok(Self {
            settings,
            rules,
            masks,
        })
    }
}

fn line_of(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| l.trim_start().starts_with(key))
        .map_or(0, |i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Random;

    #[test]
    fn damaged_policies_are_errors_not_panics() {
        let mut random = Random::new(0x0fed_cba9_8765_4321);
        for _ in 0..20_000 {
            let _ = Policy::parse(&random.mutate(SAMPLE));
        }
    }

    const SAMPLE: &str = r#"
[settings]
default = "allow"
large_tables = ["Events"]
approvers = ["unix:alice"]

[[rule]]
name = "no-unfiltered-writes"
unfiltered_write = true
action = "block"
reason = "DELETE and UPDATE need a WHERE clause"

[[rule]]
name = "drops-need-approval"
commands = ["drop", "truncate"]
roles = ["engineers"]
action = "approve"
approvers = ["dba"]
timeout = "2m"
window = "1h"

[[mask]]
name = "emails"
detector = "email"
style = "pseudonym"

[[mask]]
name = "card-column"
columns = ["card_number"]
table = "payments"
style = "partial"
keep_last = 4
"#;

    #[test]
    fn parses_the_sample() {
        let p = Policy::parse(SAMPLE).unwrap();
        assert_eq!(p.rules.len(), 2);
        assert_eq!(p.rules[0].line, 7);
        assert_eq!(p.rules[1].line, 13);
        assert_eq!(p.rules[1].commands, ["DROP", "TRUNCATE"]);
        assert!(matches!(
            &p.rules[1].action,
            Action::Approve { timeout, max_window: Some(_), .. } if *timeout == Duration::from_secs(120)
        ));
        assert_eq!(p.masks[1].line, 27);
        assert_eq!(p.masks[1].style, Style::Partial { keep_last: 4 });
        assert_eq!(p.settings.large_tables, ["events"]);
    }

    fn error(text: &str) -> String {
        Policy::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_line_and_the_fix() {
        let e = error("[[rule]]\nname = \"x\"\naction = \"block\"\n");
        assert!(e.contains("line 1") && e.contains("needs a reason"), "{e}");
        let e = error("\n[[rule]]\nname = \"x\"\naction = \"explode\"\n");
        assert!(e.contains("line 4") && e.contains("explode"), "{e}");
        let e = error("[[mask]]\nname = \"m\"\ndetector = \"dna\"\nstyle = \"redact\"\n");
        assert!(
            e.contains("line 1") && e.contains("unknown detector 'dna'"),
            "{e}"
        );
        let e = error("[[mask]]\nname = \"m\"\nregex = \"(\"\nstyle = \"redact\"\n");
        assert!(e.contains("regex"), "{e}");
        let e = error("[settings]\napproval_timeout = \"soon\"\n");
        assert!(e.contains("line 2") && e.contains("not a duration"), "{e}");
        let e = error("[[rule]]\nname = \"x\"\naction = \"approve\"\nwindow = \"300000000000y\"\n");
        assert!(
            e.contains("line 4") && e.contains("longer than a year"),
            "{e}"
        );
        let e = error("[[rule]]\nname = \"x\"\noperations = [\"delete\"]\naction = \"allow\"\n");
        assert!(
            e.contains("line 3") && e.contains("unknown operation"),
            "{e}"
        );
        let e = error("[[rule]]\nname = \"x\"\naction = \"approve\"\n");
        assert!(e.contains("needs approvers"), "{e}");
        let e = error("[[rule]]\nname = \"x\"\nactoin = \"allow\"\n");
        assert!(e.contains("line 3") && e.contains("actoin"), "{e}");
        let e = error("[[mask]]\nname = \"m\"\nstyle = \"redact\"\n");
        assert!(e.contains("exactly one kind of target"), "{e}");
    }
}
