//! Protocol adapters: the only protocol-specific step of the pipeline.
//!
//! An adapter gets a [`SessionContext`] (who, from where, to where) and the
//! client stream; it authenticates the client if the protocol carries
//! credentials, talks to the upstream, and reports what it relayed. Identity,
//! policy and recording stay in shared code behind the context. Before
//! anything of the client's reaches the upstream, an adapter waits for the
//! session's start record ([`StartRecord::durable`]).

pub mod postgres;
pub mod tcp;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use crate::{
    audit::{Ack, AuditError},
    identity::Principal,
    kernel::ConnectOrigin,
    proxy::Gateway,
};

/// Everything an adapter knows about its session.
pub struct SessionContext {
    pub id: String,
    pub listener: Arc<str>,
    /// The client's address as accept() returned it.
    pub peer: SocketAddr,
    /// The kernel's record of the connect(), for redirected clients; None
    /// for a client that reached a `direct` listener on its own.
    pub origin: Option<ConnectOrigin>,
    /// Who is behind the session, when already known (uid binding).
    pub principal: Option<Principal>,
    pub gateway: Arc<Gateway>,
    /// The session's fields for log lines. Set-up and the session's end
    /// run under it, the relay does not: entering a span on every poll of
    /// the relay cost about a microsecond per statement, and the relay
    /// logs nothing of its own.
    pub span: tracing::Span,
    pub start: StartRecord,
}

/// The session's start record, committing while the adapter sets the
/// session up (the client's start-up and login, the upstream's): a new
/// connection waits for one commit less than if it were awaited first.
/// No session goes unrecorded all the same: adapters wait for it before
/// anything of the client's reaches the upstream, and fail closed if it
/// cannot be stored.
pub struct StartRecord(Mutex<Option<Ack>>);

impl StartRecord {
    pub fn new(ack: Ack) -> Self {
        Self(Mutex::new(Some(ack)))
    }

    /// Waits until the start record is durable. The first caller gets the
    /// outcome; later ones return at once.
    pub async fn durable(&self) -> Result<(), AuditError> {
        match self.take() {
            Some(ack) => ack.durable().await,
            None => Ok(()),
        }
    }

    /// As [`StartRecord::durable`], committed with whatever comes next: for
    /// a session that ended without relaying (a refused login), which
    /// nobody waits on. A flood of refused logins then costs a commit per
    /// commit interval, not one each.
    pub async fn durable_unhurried(&self) -> Result<(), AuditError> {
        match self.take() {
            Some(ack) => ack.durable_unhurried().await,
            None => Ok(()),
        }
    }

    fn take(&self) -> Option<Ack> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// What an adapter moved, for the session-end record.
#[derive(Debug, Default)]
pub struct Relayed {
    pub from_client: u64,
    pub from_server: u64,
}
