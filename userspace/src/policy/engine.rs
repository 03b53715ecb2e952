//! The decision engine: a [`Request`] in, a [`Decision`] out.
//!
//! Access rules are tried in file order and the first that matches decides
//! (allow, block, or require approval); masks are cumulative: every mask
//! whose scope covers the request applies to what comes back. A time-window
//! grant from an earlier approval turns a matching approval rule into an
//! allow for its holder.

use std::time::Duration;

use serde::Serialize;

use super::{
    file::{Action, MaskTarget, Policy, Rule, Scope},
    request::Request,
    sql::{same_table, Statement},
};
use crate::identity::Principal;

/// What the gateway does with a request.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    Allow,
    Block {
        reason: String,
        rule: String,
    },
    /// Allowed, with these masks (indices into [`Policy::masks`]) applied
    /// to what comes back.
    Mask {
        rules: Vec<usize>,
    },
    RequireApproval {
        rule: String,
        reason: String,
        approvers: Approvers,
        timeout: Duration,
        scope: ApprovalScope,
    },
}

/// Who may approve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Approvers {
    pub roles: Vec<String>,
    pub subjects: Vec<String>,
}

impl Approvers {
    /// Whether `approver` may decide a request made by `requester`.
    ///
    /// # Errors
    /// Why not, in words for the approver.
    pub fn check(&self, approver: &Principal, requester: &str) -> Result<(), String> {
        if approver.subject == requester {
            return Err("you cannot approve your own request".into());
        }
        let by_role = approver.roles.iter().any(|r| self.roles.contains(r));
        let by_subject = self.subjects.contains(&approver.subject);
        if by_role || by_subject {
            Ok(())
        } else {
            Err(format!(
                "{} is not an approver for this request (approvers: {})",
                approver.subject, self
            ))
        }
    }
}

impl std::fmt::Display for Approvers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts: Vec<String> = self.roles.iter().map(|r| format!("role {r}")).collect();
        parts.extend(self.subjects.iter().cloned());
        f.write_str(&parts.join(", "))
    }
}

/// What an approval may cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalScope {
    /// This statement only.
    Statement,
    /// The statement, or a grant of the rule for up to this long.
    UpTo(Duration),
}

/// Time-window grants the engine consults.
pub trait Grants {
    fn has_grant(&self, subject: &str, resource: &str, rule: &str) -> bool;
}

/// No grants (for `policy explain` and tests).
pub struct NoGrants;

impl Grants for NoGrants {
    fn has_grant(&self, _: &str, _: &str, _: &str) -> bool {
        false
    }
}

/// A decision and why.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub decision: Decision,
    /// The access rule that decided (name, line), if any.
    pub rule: Option<(String, usize)>,
    pub why: String,
}

impl Scope {
    pub fn applies(&self, resource: &str, principal: &Principal, protocol: &str) -> bool {
        let listed = |list: &[String], value: &str| {
            list.is_empty() || list.iter().any(|v| v == value || v == "*")
        };
        let who = (self.roles.is_empty() && self.subjects.is_empty())
            || principal.roles.iter().any(|r| self.roles.contains(r))
            || self.subjects.contains(&principal.subject)
            || self.subjects.contains(&principal.name);
        listed(&self.resources, resource)
            && listed(&self.protocols, protocol)
            && who
            && !principal
                .roles
                .iter()
                .any(|r| self.unless_roles.contains(r))
    }
}

impl Rule {
    /// The conditions that matched, or `None` if one did not.
    fn matches(&self, req: &Request) -> Option<Vec<String>> {
        if !self
            .scope
            .applies(&req.resource, &req.principal, req.protocol)
        {
            return None;
        }
        let mut why = Vec::new();
        if !self.commands.is_empty() {
            let hit = self.commands.iter().find(|c| {
                req.command == **c
                    || req
                        .command
                        .strip_prefix(c.as_str())
                        .is_some_and(|rest| rest.starts_with(' '))
            })?;
            why.push(format!("command {hit}"));
        }
        if !self.operations.is_empty() {
            if !self.operations.intersects(req.operations) {
                return None;
            }
            let ops: Vec<_> = self
                .operations
                .iter()
                .filter(|op| req.operations.contains(*op))
                .map(|op| op.name())
                .collect();
            why.push(format!("operation {}", ops.join("+")));
        }
        if !self.tables.is_empty() {
            let hit = req
                .objects
                .iter()
                .find(|t| self.tables.iter().any(|r| same_table(r, t)))?;
            why.push(format!("table {hit}"));
        }
        if !self.columns.is_empty() {
            let hit = req
                .columns
                .iter()
                .find(|c| *c == "*" || self.columns.contains(c))?;
            why.push(format!("column {hit}"));
        }
        if let Some(want) = self.filtered {
            (req.filtered == Some(want)).then_some(())?;
            why.push(if want { "has WHERE" } else { "no WHERE" }.into());
        }
        if let Some(want) = self.limited {
            (req.limited == Some(want)).then_some(())?;
            why.push(if want { "has LIMIT" } else { "no LIMIT" }.into());
        }
        if let Some(want) = self.unfiltered_write {
            (req.unfiltered_write == want).then_some(())?;
            why.push(
                if want {
                    "DELETE/UPDATE without WHERE"
                } else {
                    "no unfiltered write"
                }
                .into(),
            );
        }
        if why.is_empty() {
            why.push("matches everything in its scope".into());
        }
        Some(why)
    }
}

impl Policy {
    /// Judges one request.
    pub fn judge(&self, req: &Request, grants: &dyn Grants) -> Verdict {
        for rule in &self.rules {
            let Some(why) = rule.matches(req) else {
                continue;
            };
            let why = format!(
                "rule '{}' (line {}) matched: {}",
                rule.name,
                rule.line,
                why.join(", ")
            );
            let decided = Some((rule.name.clone(), rule.line));
            return match &rule.action {
                Action::Allow => self.allowed(req, decided, why),
                Action::Block { reason } => Verdict {
                    decision: Decision::Block {
                        reason: reason.clone(),
                        rule: rule.name.clone(),
                    },
                    rule: decided,
                    why,
                },
                Action::Approve {
                    reason,
                    roles,
                    subjects,
                    timeout,
                    max_window,
                } => {
                    if grants.has_grant(&req.principal.subject, &req.resource, &rule.name) {
                        return self.allowed(
                            req,
                            decided,
                            format!("{why}; allowed by an approved time-window grant"),
                        );
                    }
                    let mut subjects = subjects.clone();
                    subjects.extend(self.settings.approvers.iter().cloned());
                    Verdict {
                        decision: Decision::RequireApproval {
                            rule: rule.name.clone(),
                            reason: reason.clone(),
                            approvers: Approvers {
                                roles: roles.clone(),
                                subjects,
                            },
                            timeout: *timeout,
                            scope: max_window.map_or(ApprovalScope::Statement, ApprovalScope::UpTo),
                        },
                        rule: decided,
                        why,
                    }
                }
            };
        }
        if self.settings.default_allow {
            self.allowed(req, None, "no rule matched; the default is allow".into())
        } else {
            Verdict {
                decision: Decision::Block {
                    reason: "not allowed by any policy rule".into(),
                    rule: "default".into(),
                },
                rule: None,
                why: "no rule matched; the default is block".into(),
            }
        }
    }

    fn allowed(&self, req: &Request, rule: Option<(String, usize)>, why: String) -> Verdict {
        let masks = self.masks_for(req);
        Verdict {
            decision: if masks.is_empty() {
                Decision::Allow
            } else {
                Decision::Mask { rules: masks }
            },
            rule,
            why,
        }
    }

    /// The masks that apply to what `req` returns.
    pub fn masks_for(&self, req: &Request) -> Vec<usize> {
        self.masks
            .iter()
            .enumerate()
            .filter(|(_, m)| {
                m.scope.applies(&req.resource, &req.principal, req.protocol)
                    && match &m.target {
                        MaskTarget::Column { table: Some(t), .. } => {
                            req.objects.iter().any(|o| same_table(t, o))
                        }
                        _ => true,
                    }
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// Judges one classified SQL statement. Beyond [`Policy::judge`], a
    /// `COPY ... TO` that masks would have to change but cannot see into
    /// (binary format, or columns the statement does not name) is blocked.
    pub fn judge_statement(
        &self,
        statement: &Statement,
        resource: &str,
        principal: &Principal,
        grants: &dyn Grants,
    ) -> Verdict {
        let req = request_for(statement, resource, principal);
        let mut verdict = self.judge(&req, grants);
        if let (Decision::Mask { rules }, Some(copy)) = (&verdict.decision, &statement.copy_out) {
            let column_masks = rules
                .iter()
                .any(|&i| matches!(self.masks[i].target, MaskTarget::Column { .. }));
            let reason = if copy.binary {
                Some("COPY in binary format cannot be masked; use the text format")
            } else if copy.columns.is_none() && column_masks {
                Some("COPY of masked columns must name its columns: COPY t (a, b) TO ... or COPY (SELECT a, b FROM t) TO ...")
            } else {
                None
            };
            if let Some(reason) = reason {
                verdict = Verdict {
                    decision: Decision::Block {
                        reason: reason.into(),
                        rule: "masking".into(),
                    },
                    rule: None,
                    why: format!("{}; masks apply but {reason}", verdict.why),
                };
            }
        }
        verdict
    }
}

/// The protocol-neutral request for one SQL statement.
pub fn request_for(statement: &Statement, resource: &str, principal: &Principal) -> Request {
    Request {
        resource: resource.to_string(),
        principal: principal.clone(),
        protocol: "postgres",
        command: statement.command.clone(),
        operations: statement.operations,
        objects: statement.tables.clone(),
        columns: statement.columns.clone(),
        filtered: statement.filtered,
        unfiltered_write: statement.unfiltered_write,
        limited: statement.limited,
        text: statement.text.clone(),
    }
}

/// The decision for a whole message from several statement verdicts: the
/// first block wins, then the first approval; otherwise the masks of all.
pub fn combine<'a>(verdicts: impl IntoIterator<Item = &'a Verdict>) -> Decision {
    let mut masks: Vec<usize> = Vec::new();
    let mut approval = None;
    for v in verdicts {
        match &v.decision {
            Decision::Block { .. } => return v.decision.clone(),
            Decision::RequireApproval { .. } if approval.is_none() => {
                approval = Some(v.decision.clone());
            }
            Decision::Mask { rules } => {
                for r in rules {
                    if !masks.contains(r) {
                        masks.push(*r);
                    }
                }
            }
            _ => {}
        }
    }
    match approval {
        Some(a) => a,
        None if masks.is_empty() => Decision::Allow,
        None => Decision::Mask { rules: masks },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{identity::PrincipalKind, policy::sql::classify};

    const POLICY: &str = r#"
[settings]
large_tables = ["events"]
approvers = ["unix:carol"]

[[rule]]
name = "dba-anything"
roles = ["dba"]
action = "allow"

[[rule]]
name = "no-unfiltered-writes"
unfiltered_write = true
action = "block"
reason = "DELETE and UPDATE need a WHERE clause"

[[rule]]
name = "no-drop"
commands = ["DROP", "TRUNCATE"]
action = "block"
reason = "dropping is for DBAs"

[[rule]]
name = "no-grant"
operations = ["dcl"]
action = "block"
reason = "privileges are managed by the platform team"

[[rule]]
name = "exports-need-approval"
operations = ["export"]
action = "approve"
approvers = ["dba"]
window = "1h"

[[rule]]
name = "interns-no-salaries"
roles = ["intern"]
tables = ["salaries"]
action = "block"
reason = "interns cannot read salaries"

[[mask]]
name = "emails"
detector = "email"
style = "pseudonym"
unless_roles = ["dba"]

[[mask]]
name = "cards"
columns = ["card"]
table = "payments"
style = "partial"
"#;

    fn person(subject: &str, roles: &[&str]) -> Principal {
        Principal {
            subject: subject.into(),
            name: subject.into(),
            kind: PrincipalKind::Person,
            roles: roles.iter().map(|r| r.to_string()).collect(),
        }
    }

    fn decide(sql: &str, who: &Principal) -> Decision {
        let policy = Policy::parse(POLICY).unwrap();
        let statements = classify(sql, &policy.settings.large_tables).unwrap();
        let verdicts: Vec<_> = statements
            .iter()
            .map(|s| policy.judge_statement(s, "pg", who, &NoGrants))
            .collect();
        combine(&verdicts)
    }

    fn blocked_by(d: &Decision) -> &str {
        match d {
            Decision::Block { rule, .. } => rule,
            other => panic!("not blocked: {other:?}"),
        }
    }

    #[test]
    fn typical_blocks() {
        let bob = person("unix:bob", &["engineers"]);
        assert_eq!(
            blocked_by(&decide("DELETE FROM t", &bob)),
            "no-unfiltered-writes"
        );
        assert_eq!(
            blocked_by(&decide("UPDATE t SET a = 1", &bob)),
            "no-unfiltered-writes"
        );
        assert!(matches!(
            decide("DELETE FROM t WHERE id = 1", &bob),
            Decision::Mask { .. }
        ));
        assert_eq!(blocked_by(&decide("DROP TABLE t", &bob)), "no-drop");
        assert_eq!(blocked_by(&decide("TRUNCATE t", &bob)), "no-drop");
        assert_eq!(
            blocked_by(&decide("GRANT ALL ON t TO bob", &bob)),
            "no-grant"
        );
        assert_eq!(
            blocked_by(&decide("SELECT 1; DROP TABLE t", &bob)),
            "no-drop"
        );
        let intern = person("unix:ivy", &["intern"]);
        assert_eq!(
            blocked_by(&decide("SELECT * FROM public.salaries", &intern)),
            "interns-no-salaries"
        );
        assert!(matches!(
            decide("SELECT * FROM public.salaries", &bob),
            Decision::Mask { .. }
        ));
        let dba = person("unix:dora", &["dba"]);
        assert_eq!(decide("DROP TABLE t", &dba), Decision::Allow);
    }

    #[test]
    fn approvals_and_grants() {
        let bob = person("unix:bob", &["engineers"]);
        let Decision::RequireApproval {
            rule,
            approvers,
            scope,
            ..
        } = decide("COPY t TO STDOUT", &bob)
        else {
            panic!("expected approval")
        };
        assert_eq!(rule, "exports-need-approval");
        assert_eq!(scope, ApprovalScope::UpTo(Duration::from_secs(3600)));
        assert_eq!(approvers.subjects, ["unix:carol"]);
        assert!(approvers
            .check(&person("unix:carol", &[]), "unix:bob")
            .is_ok());
        assert!(approvers
            .check(&person("unix:dora", &["dba"]), "unix:bob")
            .is_ok());
        let own = approvers.check(&person("unix:carol", &[]), "unix:carol");
        assert!(own.unwrap_err().contains("your own request"));
        assert!(approvers.check(&bob, "unix:x").is_err());
        assert!(matches!(
            decide("SELECT * FROM events", &bob),
            Decision::RequireApproval { .. }
        ));

        struct One;
        impl Grants for One {
            fn has_grant(&self, s: &str, r: &str, rule: &str) -> bool {
                (s, r, rule) == ("unix:bob", "pg", "exports-need-approval")
            }
        }
        let policy = Policy::parse(POLICY).unwrap();
        let s = &classify("SELECT * FROM events", &policy.settings.large_tables).unwrap()[0];
        let v = policy.judge_statement(s, "pg", &bob, &One);
        assert!(matches!(v.decision, Decision::Mask { .. }), "{v:?}");
        assert!(v.why.contains("time-window grant"));
    }

    #[test]
    fn masks_by_scope_and_table() {
        let bob = person("unix:bob", &["engineers"]);
        let policy = Policy::parse(POLICY).unwrap();
        assert_eq!(decide("SELECT 1", &bob), Decision::Mask { rules: vec![0] });
        assert_eq!(
            decide("SELECT card FROM payments", &bob),
            Decision::Mask { rules: vec![0, 1] }
        );
        assert_eq!(policy.masks[1].name, "cards");
        let dba = person("unix:dora", &["dba"]);
        assert_eq!(
            decide("SELECT card FROM payments", &dba),
            Decision::Mask { rules: vec![1] }
        );
    }

    #[test]
    fn copy_that_cannot_be_masked_is_blocked() {
        let text = POLICY.replace("operations = [\"export\"]", "operations = [\"ddl\"]");
        let policy = Policy::parse(&text).unwrap();
        let bob = person("unix:bob", &["engineers"]);
        let judge = |sql: &str| {
            let s = &classify(sql, &[]).unwrap()[0];
            policy.judge_statement(s, "pg", &bob, &NoGrants).decision
        };
        assert_eq!(blocked_by(&judge("COPY payments TO STDOUT")), "masking");
        assert_eq!(
            blocked_by(&judge("COPY x TO STDOUT (FORMAT binary)")),
            "masking"
        );
        assert!(matches!(
            judge("COPY payments (card) TO STDOUT"),
            Decision::Mask { .. }
        ));
        assert!(matches!(judge("COPY x TO STDOUT"), Decision::Mask { .. }));
    }

    #[test]
    fn default_block() {
        let policy = Policy::parse("[settings]\ndefault = \"block\"\n").unwrap();
        let s = &classify("SELECT 1", &[]).unwrap()[0];
        let v = policy.judge_statement(s, "pg", &person("unix:x", &[]), &NoGrants);
        assert_eq!(blocked_by(&v.decision), "default");
    }
}
