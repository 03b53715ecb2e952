//! Protocol adapters: the only protocol-specific step of the pipeline.
//!
//! An adapter gets a [`SessionContext`] (who, from where, to where) and the
//! client stream; it authenticates the client if the protocol carries
//! credentials, talks to the upstream, and reports what it relayed. Identity,
//! policy and recording stay in shared code behind the context.

pub mod postgres;
pub mod tcp;

use std::{net::SocketAddr, sync::Arc};

use crate::{identity::Principal, kernel::ConnectOrigin, proxy::Gateway};

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
}

/// What an adapter moved, for the session-end record.
#[derive(Debug, Default)]
pub struct Relayed {
    pub from_client: u64,
    pub from_server: u64,
}
