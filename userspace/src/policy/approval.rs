//! Just-in-time approval: held requests, approver decisions, grants.
//!
//! A session whose statement needs approval registers it here and waits on
//! its [`Waiter`]; approvers list and decide through the control socket
//! ([`super::control`]). Every step is recorded: the request, the decision
//! (who, what, why, when) or the timeout. An approval may cover the one
//! statement or grant the requester the rule on that resource for a time
//! window, which the engine consults through [`Grants`].

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::engine::{ApprovalScope, Approvers, Grants};
use crate::{
    audit::{ApprovalStep, AuditEvent, Recorder},
    identity::Principal,
};

/// A held request, as approvers see it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PendingApproval {
    pub id: String,
    pub session: String,
    pub requester: String,
    pub requester_name: String,
    pub resource: String,
    pub rule: String,
    pub reason: String,
    pub statement: String,
    /// Who may approve, in words.
    pub approvers: String,
    /// Longest grant window an approver may give, in seconds (0: this
    /// statement only).
    pub max_window_secs: u64,
    /// Unix seconds.
    pub requested_at: u64,
    pub expires_at: u64,
}

/// How a held request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApprovalOutcome {
    Approved {
        approver: String,
        /// A time-window grant, if the approver gave one.
        window: Option<Duration>,
    },
    Denied {
        approver: String,
        reason: String,
    },
    TimedOut,
}

/// What a session needs to hold a request.
pub struct ApprovalRequest<'a> {
    pub session: &'a str,
    pub requester: &'a Principal,
    pub resource: &'a str,
    pub rule: &'a str,
    pub reason: &'a str,
    pub statement: &'a str,
    pub approvers: &'a Approvers,
    pub timeout: Duration,
    pub scope: ApprovalScope,
}

/// The session's end of a held request.
pub struct Waiter {
    pub info: PendingApproval,
    rx: oneshot::Receiver<ApprovalOutcome>,
    timeout: Duration,
    store: Arc<ApprovalStore>,
}

impl Waiter {
    /// Waits for the decision, or the timeout (recorded as such).
    pub async fn outcome(self) -> ApprovalOutcome {
        let outcome = self.outcome_unless(std::future::pending()).await;
        outcome.unwrap_or(ApprovalOutcome::TimedOut)
    }

    /// Waits like [`Waiter::outcome`] unless `cancel` completes first: then
    /// the request is withdrawn (recorded as a `cancelled` step, gone from
    /// the approvers' list) and `None` is returned. A decision taken just
    /// before the withdrawal stands and is returned instead.
    pub async fn outcome_unless(
        mut self,
        cancel: impl std::future::Future<Output = ()>,
    ) -> Option<ApprovalOutcome> {
        let decided = {
            let decision = tokio::time::timeout(self.timeout, &mut self.rx);
            tokio::select! {
                decided = decision => Some(decided),
                () = cancel => None,
            }
        };
        match decided {
            Some(Ok(Ok(outcome))) => Some(outcome),
            Some(Ok(Err(_)) | Err(_)) => {
                self.store.close(&self.info.id, "timed_out");
                Some(ApprovalOutcome::TimedOut)
            }
            None if self.store.close(&self.info.id, "cancelled") => None,
            // Decided (the reply is on its way) or expired meanwhile.
            None => Some((&mut self.rx).await.unwrap_or(ApprovalOutcome::TimedOut)),
        }
    }
}

struct Pending {
    info: PendingApproval,
    approvers: Approvers,
    scope: ApprovalScope,
    reply: oneshot::Sender<ApprovalOutcome>,
}

struct Grant {
    subject: String,
    resource: String,
    rule: String,
    until: SystemTime,
}

/// Pending approvals and active grants of one daemon.
pub struct ApprovalStore {
    recorder: Arc<dyn Recorder>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    next: u64,
    pending: HashMap<String, Pending>,
    grants: Vec<Grant>,
}

fn step(
    info: &PendingApproval,
    step: &'static str,
    approver: Option<String>,
    justification: Option<String>,
    window_secs: Option<u64>,
) -> ApprovalStep {
    ApprovalStep {
        step,
        id: info.id.clone(),
        session: info.session.clone(),
        requester: info.requester.clone(),
        resource: info.resource.clone(),
        rule: info.rule.clone(),
        statement: info.statement.clone(),
        approver,
        justification,
        window_secs,
        requested_at: info.requested_at,
        expires_at: info.expires_at,
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl ApprovalStore {
    pub fn new(recorder: Arc<dyn Recorder>) -> Arc<Self> {
        Arc::new(Self {
            recorder,
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, step: ApprovalStep) {
        // The step is ordered with the session's other events by the
        // recorder; durability is awaited by the callers that need it.
        drop(self.recorder.record(AuditEvent::Approval(step)));
    }

    /// Holds a request; the returned [`Waiter`] resolves with the decision.
    pub fn request(self: &Arc<Self>, req: ApprovalRequest<'_>) -> Waiter {
        let now = SystemTime::now();
        let (reply, rx) = oneshot::channel();
        let info = {
            let mut state = self.lock();
            state.next += 1;
            let id = format!("{:x}{:04}", unix_secs(now) & 0xffff, state.next);
            let info = PendingApproval {
                id: id.clone(),
                session: req.session.to_string(),
                requester: req.requester.subject.clone(),
                requester_name: req.requester.name.clone(),
                resource: req.resource.to_string(),
                rule: req.rule.to_string(),
                reason: req.reason.to_string(),
                statement: req.statement.to_string(),
                approvers: req.approvers.to_string(),
                max_window_secs: match req.scope {
                    ApprovalScope::Statement => 0,
                    ApprovalScope::UpTo(d) => d.as_secs(),
                },
                requested_at: unix_secs(now),
                expires_at: unix_secs(now + req.timeout),
            };
            state.pending.insert(
                id,
                Pending {
                    info: info.clone(),
                    approvers: req.approvers.clone(),
                    scope: req.scope,
                    reply,
                },
            );
            info
        };
        self.record(step(&info, "requested", None, None, None));
        Waiter {
            info,
            rx,
            timeout: req.timeout,
            store: Arc::clone(self),
        }
    }

    /// Ends a request nobody decided (`timed_out`, `cancelled`); false if
    /// it was no longer pending.
    fn close(&self, id: &str, how: &'static str) -> bool {
        let removed = self.lock().pending.remove(id);
        if let Some(p) = &removed {
            self.record(step(&p.info, how, None, None, None));
        }
        removed.is_some()
    }

    /// The requests `viewer` may decide.
    pub fn list(&self, viewer: &Principal) -> Vec<PendingApproval> {
        let mut list: Vec<_> = self
            .lock()
            .pending
            .values()
            .filter(|p| p.approvers.check(viewer, &p.info.requester).is_ok())
            .map(|p| p.info.clone())
            .collect();
        list.sort_by(|a, b| a.requested_at.cmp(&b.requested_at).then(a.id.cmp(&b.id)));
        list
    }

    /// Approves or denies request `id` as `approver`.
    ///
    /// # Errors
    /// Why the decision was refused (unknown id, self-approval, not an
    /// approver, window longer than the rule allows), for the approver.
    pub fn decide(
        &self,
        id: &str,
        approver: &Principal,
        approve: bool,
        window: Option<Duration>,
        justification: Option<String>,
    ) -> Result<PendingApproval, String> {
        let mut state = self.lock();
        let pending = state.pending.get(id).ok_or_else(|| {
            format!("no pending request {id} (it may have been decided or timed out)")
        })?;
        pending.approvers.check(approver, &pending.info.requester)?;
        if let (true, Some(w)) = (approve, window) {
            match pending.scope {
                ApprovalScope::Statement => {
                    return Err(format!(
                        "rule '{}' allows approving this statement only, not a time window",
                        pending.info.rule
                    ))
                }
                ApprovalScope::UpTo(max) if w > max => {
                    return Err(format!(
                        "rule '{}' allows grants of at most {}",
                        pending.info.rule,
                        humantime::format_duration(max)
                    ))
                }
                ApprovalScope::UpTo(_) => {}
            }
        }
        if !approve && justification.as_deref().is_none_or(str::is_empty) {
            return Err("a denial needs a reason: --reason \"...\"".into());
        }
        let Some(pending) = state.pending.remove(id) else {
            return Err(format!("no pending request {id}"));
        };
        if let (true, Some(w)) = (approve, window) {
            state.grants.push(Grant {
                subject: pending.info.requester.clone(),
                resource: pending.info.resource.clone(),
                rule: pending.info.rule.clone(),
                until: SystemTime::now() + w,
            });
        }
        drop(state);
        self.record(step(
            &pending.info,
            if approve { "approved" } else { "denied" },
            Some(approver.subject.clone()),
            justification.clone(),
            window.filter(|_| approve).map(|w| w.as_secs()),
        ));
        let outcome = if approve {
            ApprovalOutcome::Approved {
                approver: approver.subject.clone(),
                window: window.filter(|_| approve),
            }
        } else {
            ApprovalOutcome::Denied {
                approver: approver.subject.clone(),
                reason: justification.unwrap_or_default(),
            }
        };
        // The session may have gone away meanwhile; the decision stands.
        let _ = pending.reply.send(outcome);
        Ok(pending.info)
    }
}

impl Grants for ApprovalStore {
    fn has_grant(&self, subject: &str, resource: &str, rule: &str) -> bool {
        let now = SystemTime::now();
        let mut state = self.lock();
        state.grants.retain(|g| g.until > now);
        state
            .grants
            .iter()
            .any(|g| g.subject == subject && g.resource == resource && g.rule == rule)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{audit::Ack, identity::PrincipalKind};

    struct Memory(Mutex<Vec<String>>);
    impl Recorder for Memory {
        fn record(&self, event: AuditEvent) -> Ack {
            let json = serde_json::to_string(&event).unwrap();
            self.0.lock().unwrap().push(json);
            Ack::done(Ok(()))
        }
    }

    fn person(subject: &str, roles: &[&str]) -> Principal {
        Principal {
            subject: subject.into(),
            name: subject.into(),
            kind: PrincipalKind::Person,
            roles: roles.iter().map(|r| r.to_string()).collect(),
        }
    }

    fn hold(store: &Arc<ApprovalStore>, timeout: Duration) -> Waiter {
        let bob = person("unix:bob", &[]);
        let approvers = Approvers {
            roles: vec!["dba".into()],
            subjects: vec!["unix:carol".into()],
        };
        store.request(ApprovalRequest {
            session: "s1",
            requester: &bob,
            resource: "pg",
            rule: "drops",
            reason: "drops need approval",
            statement: "DROP TABLE t",
            approvers: &approvers,
            timeout,
            scope: ApprovalScope::UpTo(Duration::from_secs(3600)),
        })
    }

    #[tokio::test]
    async fn approve_with_a_window_grants_the_rule() {
        let memory = Arc::new(Memory(Mutex::new(Vec::new())));
        let store = ApprovalStore::new(memory.clone());
        let waiter = hold(&store, Duration::from_secs(10));
        let id = waiter.info.id.clone();
        let carol = person("unix:carol", &[]);
        assert_eq!(store.list(&carol).len(), 1);
        assert!(store.list(&person("unix:bob", &[])).is_empty());
        let own = store.decide(&id, &person("unix:bob", &["dba"]), true, None, None);
        assert!(own.unwrap_err().contains("own request"));
        let long = store.decide(&id, &carol, true, Some(Duration::from_secs(7200)), None);
        assert!(long.unwrap_err().contains("at most 1h"));
        store
            .decide(&id, &carol, true, Some(Duration::from_secs(60)), None)
            .unwrap();
        assert!(matches!(
            waiter.outcome().await,
            ApprovalOutcome::Approved {
                window: Some(_),
                ..
            }
        ));
        assert!(store.has_grant("unix:bob", "pg", "drops"));
        assert!(!store.has_grant("unix:bob", "pg", "other"));
        let events = memory.0.lock().unwrap().join("\n");
        assert!(events.contains("\"step\":\"requested\""), "{events}");
        assert!(events.contains("\"step\":\"approved\""), "{events}");
    }

    #[tokio::test]
    async fn denial_needs_a_reason_and_timeouts_are_recorded() {
        let memory = Arc::new(Memory(Mutex::new(Vec::new())));
        let store = ApprovalStore::new(memory.clone());
        let waiter = hold(&store, Duration::from_secs(10));
        let id = waiter.info.id.clone();
        let dora = person("unix:dora", &["dba"]);
        assert!(store.decide(&id, &dora, false, None, None).is_err());
        store
            .decide(
                &id,
                &dora,
                false,
                None,
                Some("not during business hours".into()),
            )
            .unwrap();
        assert!(matches!(
            waiter.outcome().await,
            ApprovalOutcome::Denied { reason, .. } if reason == "not during business hours"
        ));
        let waiter = hold(&store, Duration::from_millis(20));
        let id = waiter.info.id.clone();
        assert_eq!(waiter.outcome().await, ApprovalOutcome::TimedOut);
        assert!(store.decide(&id, &dora, true, None, None).is_err());
        assert!(memory.0.lock().unwrap().join("\n").contains("timed_out"));
    }

    #[tokio::test]
    async fn a_cancelled_request_is_withdrawn_and_recorded() {
        let memory = Arc::new(Memory(Mutex::new(Vec::new())));
        let store = ApprovalStore::new(memory.clone());
        let carol = person("unix:carol", &[]);
        let waiter = hold(&store, Duration::from_secs(10));
        let id = waiter.info.id.clone();
        assert_eq!(waiter.outcome_unless(async {}).await, None);
        assert!(store.list(&carol).is_empty());
        assert!(store.decide(&id, &carol, true, None, None).is_err());
        assert!(memory
            .0
            .lock()
            .unwrap()
            .join("\n")
            .contains("\"step\":\"cancelled\""));
        // A decision taken before the cancel arrives stands.
        let waiter = hold(&store, Duration::from_secs(10));
        let id = waiter.info.id.clone();
        store.decide(&id, &carol, true, None, None).unwrap();
        assert!(matches!(
            waiter.outcome_unless(async {}).await,
            Some(ApprovalOutcome::Approved { .. })
        ));
    }
}
