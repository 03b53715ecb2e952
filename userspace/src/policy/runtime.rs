//! The live policy: loading, safe reloads, and the calls adapters make.
//!
//! The policy in force is an `Arc<Policy>` behind a lock that is only held
//! to clone or swap the pointer: a session judges each message against one
//! consistent policy, and a reload never waits for sessions. A reload that
//! fails (unreadable file, invalid rule) is logged and recorded with its
//! line and reason, and the previous policy stays in force.

use std::{
    future::Future,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use tracing::{error, info, warn};

use super::{
    approval::{ApprovalOutcome, ApprovalRequest, ApprovalStore, Waiter, GRANTS_NAME},
    classify, combine,
    control::{self, SOCKET_NAME},
    engine::{request_for, Decision},
    mask::PseudonymKey,
    stream::{Field, Fired, RowMasker, SubjectKey},
    webhook, Policy, PolicyError, Statement,
};
use crate::{
    audit::{AuditEvent, MaskingApplied, PolicyBlock, PolicyLoad, Recorder},
    identity::{IdentityProvider, Principal},
    unpoisoned,
};

/// File name of the pseudonym key in the state directory.
pub const KEY_NAME: &str = "pseudonym.key";

/// The policy in force and everything that goes with it.
pub struct PolicyRuntime {
    path: Option<PathBuf>,
    current: RwLock<Arc<Policy>>,
    loaded_mtime: RwLock<Option<SystemTime>>,
    key: PseudonymKey,
    /// The audit store's subject-index key: masked values are reported to
    /// the index as keyed hashes (none: the store has no key yet).
    subjects: Option<SubjectKey>,
    pub approvals: Arc<ApprovalStore>,
    recorder: Arc<dyn Recorder>,
}

/// What to do with a client message.
pub enum Gate {
    /// Relay it; mask what comes back as [`Proceed`] says.
    Proceed(Proceed),
    /// Refuse it with SQLSTATE 42501 and this reason (already recorded).
    Refuse(Refusal),
    /// Hold it: tell the client `notice`, then await [`Hold::resolve`].
    Hold(Box<Hold>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub rule: String,
    pub reason: String,
}

/// An allowed message: its statements and the masks for each.
pub struct Proceed {
    pub policy: Arc<Policy>,
    pub statements: Vec<Statement>,
    /// Masks per statement (indices into `policy.masks`).
    pub masks: Vec<Vec<usize>>,
    key: PseudonymKey,
    subjects: Option<SubjectKey>,
}

impl Proceed {
    /// The row masker for the result of statement `index` (a simple Query
    /// string returns one result per statement), or `None` to forward rows
    /// untouched.
    pub fn rows(&self, index: usize, fields: &[Field<'_>]) -> Option<RowMasker> {
        let masks = self.masks.get(index).filter(|m| !m.is_empty())?;
        RowMasker::for_rows(
            Arc::clone(&self.policy),
            self.key.clone(),
            masks,
            self.statements.get(index),
            fields,
        )
        .map(|m| self.indexing(m))
    }

    fn indexing(&self, masker: RowMasker) -> RowMasker {
        match &self.subjects {
            Some(key) => masker.index_subjects(key.clone()),
            None => masker,
        }
    }

    /// The masker for `COPY ... TO` rows of statement `index`.
    pub fn copy_rows(&self, index: usize) -> Option<RowMasker> {
        let masks = self.masks.get(index).filter(|m| !m.is_empty())?;
        let columns = self
            .statements
            .get(index)?
            .copy_out
            .as_ref()
            .and_then(|c| c.columns.as_deref());
        RowMasker::for_copy(Arc::clone(&self.policy), self.key.clone(), masks, columns)
            .map(|m| self.indexing(m))
    }
}

/// A held message awaiting an approver.
pub struct Hold {
    /// What to tell the client (NoticeResponse) while it waits.
    pub notice: String,
    pub id: String,
    waiter: Waiter,
    proceed: Proceed,
}

/// Why a held message does not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stopped {
    /// Denied or not approved in time: answer like a block.
    Refused(Refusal),
    /// The requester cancelled the wait (a CancelRequest): answer 57014.
    Cancelled,
}

impl Hold {
    /// Waits for the decision: approved gives the [`Proceed`], denied or
    /// timed out a [`Refusal`]. If `cancel` completes first the request is
    /// withdrawn. The store records every step.
    pub async fn resolve(self, cancel: impl Future<Output = ()>) -> Result<Proceed, Stopped> {
        let rule = self.waiter.info.rule.clone();
        let refused = |reason| Err(Stopped::Refused(Refusal { rule, reason }));
        match self.waiter.outcome_unless(cancel).await {
            Some(ApprovalOutcome::Approved { .. }) => Ok(self.proceed),
            Some(ApprovalOutcome::Denied { approver, reason }) => refused(format!(
                "request {} denied by {approver}: {reason}",
                self.id
            )),
            Some(ApprovalOutcome::TimedOut) => {
                refused(format!("request {} was not approved in time", self.id))
            }
            None => Err(Stopped::Cancelled),
        }
    }
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl PolicyRuntime {
    /// Loads the policy at `path` (or an allow-everything policy without
    /// masks when none is configured) and the pseudonym key in `state_dir`.
    ///
    /// # Errors
    /// [`PolicyError`] if the file is unreadable or invalid: at start-up
    /// there is no previous policy to keep, so the daemon must not start.
    pub fn load(
        path: Option<&Path>,
        state_dir: &Path,
        recorder: Arc<dyn Recorder>,
    ) -> Result<Arc<Self>, PolicyError> {
        let policy = match path {
            Some(path) => read(path)?,
            None => Policy::parse("").map_err(|source| PolicyError::Invalid {
                path: PathBuf::new(),
                source,
            })?,
        };
        let key = PseudonymKey::load_or_create(&state_dir.join(KEY_NAME))?;
        Ok(Arc::new(Self {
            path: path.map(Path::to_owned),
            loaded_mtime: RwLock::new(path.and_then(mtime)),
            current: RwLock::new(Arc::new(policy)),
            key,
            subjects: crate::audit::keys::subject_key(state_dir)
                .ok()
                .map(|k| SubjectKey::new(&k)),
            approvals: ApprovalStore::with_grants_file(
                Arc::clone(&recorder),
                state_dir.join(GRANTS_NAME),
            ),
            recorder,
        }))
    }

    /// The policy in force.
    pub fn current(&self) -> Arc<Policy> {
        Arc::clone(&*unpoisoned(self.current.read()))
    }

    pub fn key(&self) -> PseudonymKey {
        self.key.clone()
    }

    /// Re-reads the file; on any error the running policy stays. Both
    /// outcomes are recorded.
    pub fn reload(&self) -> Result<(), PolicyError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        *unpoisoned(self.loaded_mtime.write()) = mtime(path);
        let result = read(path);
        let event = match &result {
            Ok(p) => PolicyLoad {
                path: path.display().to_string(),
                accepted: true,
                error: None,
                rules: p.rules.len(),
                masks: p.masks.len(),
            },
            Err(e) => PolicyLoad {
                path: path.display().to_string(),
                accepted: false,
                error: Some(e.to_string()),
                rules: 0,
                masks: 0,
            },
        };
        drop(self.recorder.record(AuditEvent::PolicyLoad(event)));
        let policy = result?;
        info!(
            rules = policy.rules.len(),
            masks = policy.masks.len(),
            "policy reloaded"
        );
        *unpoisoned(self.current.write()) = Arc::new(policy);
        Ok(())
    }

    /// Reloads whenever the file's modification time changes.
    pub async fn watch(self: Arc<Self>) {
        let Some(path) = self.path.clone() else {
            return;
        };
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            let now = mtime(&path);
            let seen = *unpoisoned(self.loaded_mtime.read());
            if now.is_some() && now != seen {
                if let Err(e) = self.reload() {
                    error!("policy reload rejected, the previous policy stays in force: {e}");
                }
            }
        }
    }

    /// Serves `portcullis approvals` on `<state_dir>/approvals.sock`.
    pub fn serve_approvals(
        self: &Arc<Self>,
        state_dir: &Path,
        identity: Arc<dyn IdentityProvider>,
    ) -> Result<(), PolicyError> {
        let listener = control::bind(&state_dir.join(SOCKET_NAME))?;
        tokio::spawn(control::serve(
            listener,
            Arc::clone(&self.approvals),
            identity,
        ));
        Ok(())
    }

    /// Judges one client message of SQL (a simple Query, or the query of
    /// an extended-protocol Parse).
    pub fn gate_sql(
        &self,
        session: &str,
        resource: &str,
        principal: &Principal,
        sql: &str,
    ) -> Gate {
        let policy = self.current();
        let statements = match classify(sql, &policy.settings.large_tables) {
            Ok(s) => s,
            Err(e) if !policy.settings.allow_unparseable => {
                return Gate::Refuse(self.refuse(
                    session,
                    resource,
                    principal,
                    "unparseable",
                    &e.to_string(),
                    sql,
                ));
            }
            Err(_) => Vec::new(),
        };
        let verdicts: Vec<_> = statements
            .iter()
            .map(|s| policy.judge_statement(s, resource, principal, self.approvals.as_ref()))
            .collect();
        let masks = statements
            .iter()
            .map(|s| policy.masks_for(&request_for(s, resource, principal)))
            .collect();
        let proceed = Proceed {
            policy: Arc::clone(&policy),
            statements,
            masks,
            key: self.key.clone(),
            subjects: self.subjects.clone(),
        };
        match combine(&verdicts) {
            Decision::Allow | Decision::Mask { .. } => Gate::Proceed(proceed),
            Decision::Block { reason, rule } => {
                Gate::Refuse(self.refuse(session, resource, principal, &rule, &reason, sql))
            }
            Decision::RequireApproval {
                rule,
                reason,
                approvers,
                timeout,
                scope,
            } => {
                let waiter = self.approvals.request(ApprovalRequest {
                    session,
                    requester: principal,
                    resource,
                    rule: &rule,
                    reason: &reason,
                    statement: sql,
                    approvers: &approvers,
                    timeout,
                    scope,
                });
                let id = waiter.info.id.clone();
                if let Some(url) = policy.settings.webhook.clone() {
                    let info = waiter.info.clone();
                    tokio::spawn(async move {
                        if let Err(e) = webhook::announce(&url, &info).await {
                            warn!("approval webhook failed: {e}");
                        }
                    });
                }
                Gate::Hold(Box::new(Hold {
                    notice: format!(
                        "approval request {id}: {reason}; waiting up to {} for an approver ({approvers}); they can run `portcullis approvals approve {id}`",
                        humantime::format_duration(timeout)
                    ),
                    id,
                    waiter,
                    proceed,
                }))
            }
        }
    }

    fn refuse(
        &self,
        session: &str,
        resource: &str,
        principal: &Principal,
        rule: &str,
        reason: &str,
        sql: &str,
    ) -> Refusal {
        drop(self.recorder.record(AuditEvent::PolicyBlock(PolicyBlock {
            session: session.into(),
            resource: resource.into(),
            principal: principal.subject.clone(),
            rule: rule.into(),
            reason: reason.into(),
            statement: sql.into(),
        })));
        Refusal {
            rule: rule.into(),
            reason: reason.into(),
        }
    }

    /// Indexes the keyed hashes of values masked since the last call,
    /// under the statements that returned them (see
    /// [`Fired::set_statement`]). Done
    /// as results go by, not at the session's end: a data-subject request
    /// must find a disclosure while the session is still open, and after
    /// a crash.
    pub fn index_masked(&self, session: &str, fired: &mut Fired) {
        for s in fired.take_subjects() {
            drop(
                self.recorder
                    .subject_index_hash(session, s.statement, s.hash),
            );
        }
    }

    /// Records a session's masking totals, if anything was masked, and
    /// indexes what [`PolicyRuntime::index_masked`] has not yet.
    pub fn record_masking(&self, session: &str, resource: &str, fired: &mut Fired) {
        if fired.is_empty() {
            return;
        }
        self.index_masked(session, fired);
        let rules = fired.counts();
        drop(
            self.recorder
                .record(AuditEvent::MaskingApplied(MaskingApplied {
                    session: session.into(),
                    resource: resource.into(),
                    rules,
                })),
        );
    }
}

fn read(path: &Path) -> Result<Policy, PolicyError> {
    let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
        path: path.to_owned(),
        source,
    })?;
    Policy::parse(&text).map_err(|source| PolicyError::Invalid {
        path: path.to_owned(),
        source,
    })
}
