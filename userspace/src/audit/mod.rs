//! Recording: the one interface through which every part of the gateway
//! reports what happened, and the tamper-evident store behind it.
//!
//! Callers build typed [`AuditEvent`]s and hand them to a [`Recorder`]; they
//! never format log lines. The daemon's recorder is [`SledRecorder`]: one
//! hash chain in sled with signed checkpoints (see docs/audit.md).
//!
//! * [`config`]: the `[audit]` section.
//! * [`record`]: a chain record and a signed checkpoint, and their hashes.
//! * [`keys`]: the signing key and the subject-index key.
//! * [`block`]: consecutive records sharing one sled value.
//! * [`store`]: the sled trees and reads.
//! * [`writer`]: the single writer, group commit, checkpoints, purges.
//! * [`verify`]: walking the chain and checkpoints for tampering.
//! * [`subject`]: keyed hashes of personal values, and their detection.
//! * [`retention`]: which payloads have expired.
//! * [`source`]: reading the store directly or through the daemon.
//! * [`server`]: the daemon's side of `audit.sock`.
//! * [`service`]: the store's life in the daemon.
//! * [`query`]: event and session views and filters for the auditor tools.
//! * [`report`], [`report_html`]: the GDPR report.
//! * [`export`]: JSON-lines export for log shippers.

mod block;
mod commit;
pub mod config;
mod event;
pub mod export;
mod json;
pub mod keys;
pub mod query;
pub mod record;
pub mod report;
pub mod report_html;
pub mod retention;
pub mod segment;
pub mod server;
pub mod service;
pub mod source;
pub mod store;
pub mod subject;
pub mod verify;
pub mod writer;

use std::sync::Arc;

use self::commit::Progress;

pub use config::AuditConfig;
pub use event::{ApprovalStep, AuditorAccess, MaskingApplied, PolicyBlock, PolicyLoad};
pub use event::{
    AuditEvent, DatabaseLogin, RetentionPurge, SessionEnd, SessionStart, Statement, StatementError,
};
pub use event::{IdentityBinding, IdentityLogout, SessionRefused};
pub use store::Store;
pub use writer::{CheckpointPolicy, SledRecorder};

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("audit store: {0}")]
    Store(#[from] sled::Error),
    #[error("audit key {path}: {message}")]
    Key {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("no audit store at {0}: the daemon creates it on first start (check state_dir in the config)")]
    NoStore(std::path::PathBuf),
    #[error(
        "the audit store {0} is locked by another process, but the daemon does not answer on audit.sock; \
         wait for the daemon to finish starting or stop it"
    )]
    Locked(std::path::PathBuf),
    #[error("audit store damaged: {0}")]
    Corrupt(String),
    #[error("encoding audit record: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("audit records not stored: {0}")]
    Commit(String),
    #[error("audit daemon: {0}")]
    Daemon(String),
    #[error("the audit writer stopped before confirming the record")]
    WriterGone,
    #[error("this recorder keeps no data-subject index")]
    NoSubjectIndex,
}

/// Where events go.
///
/// `record` takes the event in call order (so a session's events keep their
/// order) and returns at once; the [`Ack`] resolves when the event is durable.
/// Callers that must not proceed unrecorded (a session start) await it;
/// hot paths (per statement) may await it later or in batches, so group
/// commit can amortise the flush across sessions.
pub trait Recorder: Send + Sync {
    fn record(&self, event: AuditEvent) -> Ack;

    /// Indexes a personal value seen in statement `statement_seq` of
    /// `session` (before masking) as a keyed hash, for data-subject
    /// requests; the value itself is never stored. Adapters and the policy
    /// engine call this for each detected personal value.
    fn subject_index(&self, session: &str, statement_seq: u64, value: &str) -> Ack {
        let _ = (session, statement_seq, value);
        Ack::done(Err(AuditError::NoSubjectIndex))
    }

    /// Like [`Recorder::subject_index`], for a value the caller has already
    /// hashed with the subject key (`audit-subject.key`), normalised as
    /// [`subject::subject_hash`] does: the raw value never leaves the caller
    /// (the masker, which hashes each distinct masked value once).
    fn subject_index_hash(&self, session: &str, statement_seq: u64, hash: record::Hash) -> Ack {
        let _ = (session, statement_seq, hash);
        Ack::done(Err(AuditError::NoSubjectIndex))
    }
}

/// Resolves once an event is durable, or with the reason it is not.
pub struct Ack(AckInner);

enum AckInner {
    Done(Option<Result<(), AuditError>>),
    /// The event's place in the writer's queue.
    Ticket {
        ticket: u64,
        progress: Arc<Progress>,
    },
}

impl Ack {
    /// An event already durable (or already failed).
    pub fn done(result: Result<(), AuditError>) -> Self {
        Self(AckInner::Done(Some(result)))
    }

    fn ticket(ticket: u64, progress: Arc<Progress>) -> Self {
        Self(AckInner::Ticket { ticket, progress })
    }

    /// Waits until the event is durable; asks the writer to commit now
    /// rather than at the end of its group-commit interval.
    pub async fn durable(self) -> Result<(), AuditError> {
        self.wait(true).await
    }

    /// Waits until the event is durable, committed with whatever comes
    /// next: for records nobody is held up by (a session's end), which
    /// would otherwise each cost a commit of their own.
    pub async fn durable_unhurried(self) -> Result<(), AuditError> {
        self.wait(false).await
    }

    async fn wait(self, hurry: bool) -> Result<(), AuditError> {
        match self.0 {
            AckInner::Done(result) => result.unwrap_or(Ok(())),
            AckInner::Ticket { ticket, progress } => progress.durable(ticket, ticket, hurry).await,
        }
    }
}

/// The acknowledgements of a stream of events (a session's statements),
/// kept in constant space and awaited together at the end.
#[derive(Default)]
pub struct Acks {
    /// First and last ticket seen, from one writer.
    tickets: Option<(u64, u64, Arc<Progress>)>,
    /// The first error already known.
    failed: Option<AuditError>,
}

impl Acks {
    pub fn push(&mut self, ack: Ack) {
        match ack.0 {
            AckInner::Ticket { ticket, progress } => match &mut self.tickets {
                Some((_, last, same)) if Arc::ptr_eq(same, &progress) => *last = ticket,
                Some(_) => {
                    // A second writer cannot happen in one daemon; refuse
                    // to pretend otherwise.
                    self.failed.get_or_insert(AuditError::Commit(
                        "events of one stream went to two audit writers".into(),
                    ));
                }
                None => self.tickets = Some((ticket, ticket, progress)),
            },
            AckInner::Done(Some(Err(e))) => {
                self.failed.get_or_insert(e);
            }
            AckInner::Done(_) => {}
        }
    }

    /// Waits until every pushed event is durable, committed with whatever
    /// comes next (as [`Ack::durable_unhurried`]: the stream has ended and
    /// nobody waits on it); the first failure is the error. Failures are
    /// known per commit batch, so an error means a batch overlapping this
    /// stream's events was lost.
    pub async fn durable_unhurried(self) -> Result<(), AuditError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        match self.tickets {
            Some((first, last, progress)) => progress.durable(first, last, false).await,
            None => Ok(()),
        }
    }
}
