//! The typed events every part of the gateway records. Add a variant (or a
//! struct) per new kind of fact; never log lines.

use std::{collections::BTreeMap, net::SocketAddr};

use serde::Serialize;

use crate::{
    identity::Principal,
    kernel::{ConnectOrigin, KernelEvent},
};

/// Everything the gateway records.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AuditEvent {
    /// The kernel redirected or blocked a connect() or sendto().
    Kernel(KernelEvent),
    SessionStart(SessionStart),
    SessionEnd(SessionEnd),
    /// A connection reached a listener without a kernel record.
    ConnectionRefused {
        listener: String,
        peer: SocketAddr,
        reason: String,
    },
    /// `portcullis login` bound a principal to a local uid.
    IdentityLogin(IdentityBinding),
    /// A refresh token renewed a uid binding without a new login.
    IdentityRefresh(IdentityBinding),
    /// A uid binding ended: `logout`, expiry, or a refused refresh.
    IdentityLogout(IdentityLogout),
    /// A login over the control socket was refused.
    IdentityRejected {
        uid: u32,
        reason: String,
    },
    /// A redirected connection was refused before anything was relayed
    /// (for example: no identity bound to its uid on a protocol that cannot
    /// ask for a token).
    SessionRefused(SessionRefused),
    /// A database client was identified and authorized for a resource.
    DatabaseLogin(DatabaseLogin),
    /// One statement relayed to a database.
    Statement(Statement),
    /// Expired payloads were replaced by their hashes (retention).
    RetentionPurge(RetentionPurge),
    /// The policy refused a statement, command or request.
    PolicyBlock(PolicyBlock),
    /// Masks changed what a session returned (which rules, how often).
    MaskingApplied(MaskingApplied),
    /// A step of a just-in-time approval: requested, approved, denied,
    /// timed out, cancelled (by the client), abandoned (the session ended).
    Approval(ApprovalStep),
    /// A policy file was loaded, or rejected (the previous one stays).
    PolicyLoad(PolicyLoad),
    /// A non-root user used the auditor tools through the daemon, or was
    /// refused: reading the store is processing too.
    AuditorAccess(AuditorAccess),
}

#[derive(Debug, Clone, Serialize)]
pub struct SessionStart {
    pub session: String,
    pub listener: String,
    pub protocol: &'static str,
    pub peer: SocketAddr,
    /// Who is behind the session, when known at its start.
    pub principal: Option<Principal>,
    /// The kernel's record; absent for direct (remote) clients.
    #[serde(flatten)]
    pub origin: Option<ConnectOrigin>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SessionEnd {
    pub session: String,
    pub bytes_from_client: u64,
    pub bytes_from_server: u64,
    pub duration_ms: u64,
    /// Why the session ended abnormally, if it did.
    pub error: Option<String>,
}

/// A retention purge: which records lost their payloads (their hashes stay,
/// so the chain still verifies).
#[derive(Debug, Clone, Serialize)]
pub struct RetentionPurge {
    /// Payloads recorded before their resource's retention at this time
    /// were purged.
    pub as_of: String,
    pub records: u64,
    /// Purged seqs as inclusive ranges.
    pub ranges: Vec<[u64; 2]>,
    pub sessions: u64,
    /// Purged records per resource (`(none)` for events without one).
    pub by_resource: BTreeMap<String, u64>,
}

/// Who opened a database session, as which upstream role, on what.
#[derive(Debug, Clone, Serialize)]
pub struct DatabaseLogin {
    pub session: String,
    pub resource: String,
    pub principal: Principal,
    pub upstream_user: String,
    pub database: String,
    /// The user name the client asked for (informational: the grant decides).
    pub client_user: Option<String>,
    pub application_name: Option<String>,
    /// Whether the client's connection to the gateway is encrypted.
    pub client_tls: bool,
    /// Whether the client connected directly (token) rather than redirected.
    pub direct: bool,
    /// The upstream backend's process id (PostgreSQL's logs name it).
    pub upstream_pid: i32,
    /// Whether that backend served an earlier session (reset in between).
    pub upstream_reused: bool,
}

/// One statement: a simple Query, or an Execute of the extended protocol.
#[derive(Debug, Clone, Serialize)]
pub struct Statement {
    pub session: String,
    /// The statement's number in its session, from 1: what the
    /// data-subject index's `statement_seq` points at.
    pub statement_seq: u64,
    pub resource: String,
    /// `simple`, `extended` or `function`.
    pub protocol: &'static str,
    pub text: String,
    /// Bound parameters: text as sent, binary as `\x` hex, SQL NULL as null.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub parameters: Vec<Option<String>>,
    pub duration_us: u64,
    /// Rows returned (DataRow messages).
    pub rows_returned: u64,
    /// Rows affected or returned as the command tag reports them.
    pub rows: Option<u64>,
    pub command_tag: Option<String>,
    pub error: Option<StatementError>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StatementError {
    pub sqlstate: String,
    pub message: String,
}

/// A uid bound to a principal until `expires_at` (Unix seconds).
#[derive(Debug, Clone, Serialize)]
pub struct IdentityBinding {
    pub uid: u32,
    pub principal: Principal,
    pub expires_at: u64,
    /// Whether the daemon holds a refresh token for it.
    pub refreshable: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct IdentityLogout {
    pub uid: u32,
    pub principal: Principal,
    /// `logout`, `expired` or `refresh failed: ...`.
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct SessionRefused {
    pub session: String,
    pub listener: String,
    pub protocol: &'static str,
    pub peer: SocketAddr,
    pub reason: String,
    #[serde(flatten)]
    pub origin: ConnectOrigin,
}

/// A request the policy refused.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyBlock {
    pub session: String,
    pub resource: String,
    pub principal: String,
    /// The rule that decided (`default`, `unparseable`, `masking`, or a rule name).
    pub rule: String,
    pub reason: String,
    pub statement: String,
}

/// Masking totals of one session: mask name to values masked.
#[derive(Debug, Clone, Serialize)]
pub struct MaskingApplied {
    pub session: String,
    pub resource: String,
    pub rules: BTreeMap<String, u64>,
}

/// One step of a just-in-time approval.
#[derive(Debug, Clone, Serialize)]
pub struct ApprovalStep {
    /// `requested`, `approved`, `denied`, `timed_out`, `cancelled` or
    /// `abandoned`.
    pub step: &'static str,
    pub id: String,
    pub session: String,
    pub requester: String,
    pub resource: String,
    pub rule: String,
    pub statement: String,
    pub approver: Option<String>,
    pub justification: Option<String>,
    /// For an approval granting a time window: its length.
    pub window_secs: Option<u64>,
    /// Unix seconds.
    pub requested_at: u64,
    pub expires_at: u64,
}

/// A policy (re)load.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyLoad {
    pub path: String,
    pub accepted: bool,
    /// Why it was rejected (with the line).
    pub error: Option<String>,
    pub rules: usize,
    pub masks: usize,
}

/// One auditor command run through the daemon's auditor socket (recorded
/// once per command, not per page it reads).
#[derive(Debug, Clone, Serialize)]
pub struct AuditorAccess {
    pub uid: u32,
    pub pid: u32,
    /// The principal bound to the uid, if any.
    pub principal: Option<Principal>,
    /// The command as the CLI describes it (`audit events --identity bob`);
    /// a looked-up personal value is never stored, only its keyed hash.
    pub query: String,
    pub granted: bool,
    /// Why access was refused.
    pub reason: Option<String>,
}
