//! Protocol adapters: the only protocol-specific step of the pipeline.
//!
//! An adapter gets a [`SessionContext`] (who, from where, to where) and the
//! client stream; it authenticates the client if the protocol carries
//! credentials, talks to the upstream, and reports what it relayed. Identity,
//! policy and recording stay in shared code behind the context. Before
//! anything of the client's reaches the upstream, an adapter waits for the
//! session's start record ([`StartRecord::durable`]), and it ends the
//! session when the identity it was admitted on ends
//! ([`SessionContext::identity_ended`]).

pub mod postgres;
pub mod tcp;

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::SystemTime,
};

use tokio::{sync::oneshot, task::JoinHandle};

use crate::{
    audit::{Ack, AuditError},
    identity::{Admission, Principal},
    kernel::ConnectOrigin,
    proxy::Gateway,
};

/// Resolves, with the reason, when a session's identity has ended.
///
/// A task of its own watches the identity, so that polling this future (on
/// every wake of a relay) reads one atomic, not the identity provider's
/// shared state. Dropping it stops the watch.
pub struct IdentityEnded {
    ended: oneshot::Receiver<String>,
    watch: Option<JoinHandle<()>>,
}

impl IdentityEnded {
    fn never() -> Self {
        let (_, ended) = oneshot::channel();
        Self { ended, watch: None }
    }

    fn watch(until: impl Future<Output = String> + Send + 'static) -> Self {
        let (tell, ended) = oneshot::channel();
        let watch = tokio::spawn(async move {
            let _ = tell.send(until.await);
        });
        Self {
            ended,
            watch: Some(watch),
        }
    }
}

impl Future for IdentityEnded {
    type Output = String;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<String> {
        match Pin::new(&mut self.ended).poll(cx) {
            Poll::Ready(Ok(reason)) => Poll::Ready(reason),
            // No watch, or it stopped without an end: never.
            Poll::Ready(Err(_)) | Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for IdentityEnded {
    fn drop(&mut self) {
        if let Some(watch) = &self.watch {
            watch.abort();
        }
    }
}

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

impl SessionContext {
    /// Resolves, with the reason, once the identity the session was
    /// admitted on ends: the token the client presented (`token_expires`),
    /// else the uid's binding its principal came from. Never for a session
    /// with neither, or when the identity provider keeps sessions going.
    pub fn identity_ended(&self, token_expires: Option<SystemTime>) -> IdentityEnded {
        if !self.gateway.identity.ends_sessions() {
            return IdentityEnded::never();
        }
        let admission = match (token_expires, &self.origin, &self.principal) {
            (Some(expires_at), _, _) => Admission::Token { expires_at },
            (None, Some(origin), Some(principal)) => Admission::Binding {
                uid: origin.uid,
                subject: principal.subject.clone(),
            },
            _ => return IdentityEnded::never(),
        };
        let identity = Arc::clone(&self.gateway.identity);
        IdentityEnded::watch(async move { identity.identity_ended(admission).await })
    }
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
