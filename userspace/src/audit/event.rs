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
    /// Expired payloads were replaced by their hashes (retention).
    RetentionPurge(RetentionPurge),
}

#[derive(Debug, Clone, Serialize)]
pub struct SessionStart {
    pub session: String,
    pub listener: String,
    pub protocol: &'static str,
    pub peer: SocketAddr,
    /// Who is behind the session, when known at its start.
    pub principal: Option<Principal>,
    #[serde(flatten)]
    pub origin: ConnectOrigin,
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
