//! Just-in-time approval: held requests, approver decisions, grants.
//!
//! A session whose statement needs approval registers it here and waits on
//! its [`Waiter`]; approvers list and decide through the control socket
//! ([`super::control`]). Every step is recorded: the request, the decision
//! (who, what, why, when) or the timeout. An approval may cover the one
//! statement or grant the requester the rule on that resource for a time
//! window, which the engine consults through [`Grants`].
//!
//! Time-window grants outlive the daemon: each change is written to
//! `<state_dir>/grants.json` ([`GRANTS_NAME`]) atomically (temporary file,
//! fsync, rename, directory fsync; mode 0600), and a restart reloads the
//! grants that have not expired.

use std::{
    collections::HashMap,
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tracing::{error, warn};

use super::engine::{ApprovalScope, Approvers, Grants};
use crate::{
    audit::{ApprovalStep, AuditEvent, Recorder},
    identity::Principal,
    lock,
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

/// A session that goes away while its statement is held (the client hung
/// up, the upstream died, the daemon stops) drops its waiter: the request
/// is withdrawn then, recorded as `abandoned`, so approvers never see a
/// request nobody waits for. After a decision, timeout or cancel the
/// request is already gone and this does nothing.
impl Drop for Waiter {
    fn drop(&mut self) {
        self.store.close(&self.info.id, "abandoned");
    }
}

struct Pending {
    info: PendingApproval,
    approvers: Approvers,
    scope: ApprovalScope,
    reply: oneshot::Sender<ApprovalOutcome>,
}

/// File name of the time-window grants in the state directory.
pub const GRANTS_NAME: &str = "grants.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Grant {
    subject: String,
    resource: String,
    rule: String,
    #[serde(with = "unix_millis")]
    until: SystemTime,
}

/// The grants file: `{"version": 1, "grants": [...]}`.
#[derive(Serialize, Deserialize)]
struct GrantsFile {
    version: u32,
    grants: Vec<Grant>,
}

mod unix_millis {
    use std::time::{Duration, SystemTime};

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        let ms = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        s.serialize_u64(ms)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        Ok(SystemTime::UNIX_EPOCH + Duration::from_millis(u64::deserialize(d)?))
    }
}

/// Pending approvals and active grants of one daemon.
pub struct ApprovalStore {
    recorder: Arc<dyn Recorder>,
    state: Mutex<State>,
    /// Where grants are kept across restarts (none: memory only). The
    /// mutex orders writers, so an older snapshot never replaces a newer.
    grants_file: Mutex<Option<PathBuf>>,
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
    /// A store whose grants live in memory only.
    pub fn new(recorder: Arc<dyn Recorder>) -> Arc<Self> {
        Arc::new(Self {
            recorder,
            state: Mutex::new(State::default()),
            grants_file: Mutex::new(None),
        })
    }

    /// A store whose grants are kept in `path` ([`GRANTS_NAME`] in the
    /// state directory): the unexpired grants there are loaded now, and
    /// every change is written back. An unreadable or damaged file is
    /// logged and ignored (no grant is better than a wrong one); it is
    /// replaced at the next grant.
    pub fn with_grants_file(recorder: Arc<dyn Recorder>, path: PathBuf) -> Arc<Self> {
        let store = Self::new(recorder);
        match load_grants(&path) {
            Ok(grants) => {
                let now = SystemTime::now();
                store.lock().grants = grants.into_iter().filter(|g| g.until > now).collect();
            }
            Err(e) => error!(
                "time-window grants in {} not loaded, starting without any: {e}",
                path.display()
            ),
        }
        *lock(&store.grants_file) = Some(path);
        store
    }

    /// Writes the unexpired grants to the grants file, if there is one.
    fn save_grants(&self) {
        let file = lock(&self.grants_file);
        let Some(path) = file.as_deref() else {
            return;
        };
        let now = SystemTime::now();
        let grants: Vec<Grant> = {
            let mut state = self.lock();
            state.grants.retain(|g| g.until > now);
            state.grants.clone()
        };
        if let Err(e) = write_grants(path, &grants) {
            warn!(
                "time-window grants not saved to {} (they last until a restart): {e}",
                path.display()
            );
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
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

    /// Ends a request nobody decided (`timed_out`, `cancelled`,
    /// `abandoned`); false if
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
            drop(state);
            self.save_grants();
        } else {
            drop(state);
        }
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

fn load_grants(path: &Path) -> std::io::Result<Vec<Grant>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let file: GrantsFile = serde_json::from_slice(&bytes)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    if file.version != 1 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unknown version {}", file.version),
        ));
    }
    Ok(file.grants)
}

/// Replaces `path` atomically: a temporary file beside it (mode 0600),
/// fsynced, renamed over it, then the directory fsynced.
fn write_grants(path: &Path, grants: &[Grant]) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(&GrantsFile {
        version: 1,
        grants: grants.to_vec(),
    })?;
    let tmp = path.with_extension("json.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(&json)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
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
    use crate::{identity::PrincipalKind, testing::Collect};

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
        let memory = Arc::new(Collect::default());
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
        let events = memory.json();
        assert!(events.contains("\"step\":\"requested\""), "{events}");
        assert!(events.contains("\"step\":\"approved\""), "{events}");
    }

    #[tokio::test]
    async fn denial_needs_a_reason_and_timeouts_are_recorded() {
        let memory = Arc::new(Collect::default());
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
        assert!(memory.json().contains("timed_out"));
    }

    #[tokio::test]
    async fn a_cancelled_request_is_withdrawn_and_recorded() {
        let memory = Arc::new(Collect::default());
        let store = ApprovalStore::new(memory.clone());
        let carol = person("unix:carol", &[]);
        let waiter = hold(&store, Duration::from_secs(10));
        let id = waiter.info.id.clone();
        assert_eq!(waiter.outcome_unless(async {}).await, None);
        assert!(store.list(&carol).is_empty());
        assert!(store.decide(&id, &carol, true, None, None).is_err());
        assert!(memory.json().contains("\"step\":\"cancelled\""));
        // A decision taken before the cancel arrives stands.
        let waiter = hold(&store, Duration::from_secs(10));
        let id = waiter.info.id.clone();
        store.decide(&id, &carol, true, None, None).unwrap();
        assert!(matches!(
            waiter.outcome_unless(async {}).await,
            Some(ApprovalOutcome::Approved { .. })
        ));
    }

    #[tokio::test]
    async fn a_request_whose_session_went_away_is_abandoned() {
        let memory = Arc::new(Collect::default());
        let store = ApprovalStore::new(memory.clone());
        let carol = person("unix:carol", &[]);
        let waiter = hold(&store, Duration::from_secs(10));
        let id = waiter.info.id.clone();
        assert_eq!(store.list(&carol).len(), 1);
        drop(waiter);
        assert!(store.list(&carol).is_empty());
        assert!(store.decide(&id, &carol, true, None, None).is_err());
        let log = memory.json();
        assert_eq!(log.matches("\"step\":\"abandoned\"").count(), 1);

        // A request that ended normally records no extra step.
        let waiter = hold(&store, Duration::from_secs(10));
        assert_eq!(waiter.outcome_unless(async {}).await, None);
        let log = memory.json();
        assert_eq!(log.matches("\"step\":\"abandoned\"").count(), 1);
    }

    #[tokio::test]
    async fn grants_survive_a_new_store_until_they_expire() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(GRANTS_NAME);
        let memory = Arc::new(Collect::default());
        let carol = person("unix:carol", &[]);
        let store = ApprovalStore::with_grants_file(memory.clone(), path.clone());
        let long = hold(&store, Duration::from_secs(10));
        store
            .decide(
                &long.info.id,
                &carol,
                true,
                Some(Duration::from_secs(600)),
                None,
            )
            .unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let again = ApprovalStore::with_grants_file(memory.clone(), path.clone());
        assert!(again.has_grant("unix:bob", "pg", "drops"));
        assert!(!again.has_grant("unix:carol", "pg", "drops"));
        // A short grant given in the new store is saved with the old one,
        // and dropped once it has expired.
        let short = hold(&again, Duration::from_secs(10));
        again
            .decide(
                &short.info.id,
                &carol,
                true,
                Some(Duration::from_millis(50)),
                None,
            )
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.matches("\"rule\"").count(), 2, "{text}");
        tokio::time::sleep(Duration::from_millis(80)).await;
        let later = ApprovalStore::with_grants_file(memory.clone(), path.clone());
        assert_eq!(later.lock().grants.len(), 1);
        // A damaged file means no grants, not a failed start.
        std::fs::write(&path, b"{not json").unwrap();
        let damaged = ApprovalStore::with_grants_file(memory, path);
        assert!(!damaged.has_grant("unix:bob", "pg", "drops"));
    }
}
