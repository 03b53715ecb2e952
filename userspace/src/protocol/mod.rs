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
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::SystemTime,
};

use tokio::{sync::oneshot, task::JoinHandle};

use crate::{
    audit::{Ack, AuditError},
    identity::{Admission, Principal},
    kernel::ConnectOrigin,
    lock,
    proxy::Gateway,
};

/// Resolves, with the reason, when a session's identity has ended.
///
/// A task of its own watches the identity, so that polling this future (on
/// every wake of a relay) reads one atomic, not the identity provider's
/// shared state. Dropping it stops the watch.
pub struct IdentityEnded {
    /// None when the identity does not end.
    ended: Option<oneshot::Receiver<String>>,
    watch: Option<JoinHandle<()>>,
}

impl IdentityEnded {
    fn never() -> Self {
        Self {
            ended: None,
            watch: None,
        }
    }

    fn watch(until: impl Future<Output = String> + Send + 'static) -> Self {
        let (tell, ended) = oneshot::channel();
        let watch = tokio::spawn(async move {
            let _ = tell.send(until.await);
        });
        Self {
            ended: Some(ended),
            watch: Some(watch),
        }
    }
}

impl Future for IdentityEnded {
    type Output = String;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<String> {
        let Some(ended) = self.ended.as_mut() else {
            return Poll::Pending;
        };
        let Poll::Ready(outcome) = Pin::new(ended).poll(cx) else {
            return Poll::Pending;
        };
        // A receiver is polled to completion once.
        self.ended = None;
        match outcome {
            Ok(reason) => Poll::Ready(reason),
            // The watch stopped without an end: never.
            Err(_) => Poll::Pending,
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
    /// Shared with the adapter's relay tasks.
    pub relayed: Arc<Relayed>,
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
        lock(&self.0).take()
    }
}

/// What a session moved, counted as it goes: the session-end record has
/// it however the session ends (an error, its identity's end, shutdown).
#[derive(Debug, Default)]
pub struct Relayed {
    pub from_client: AtomicU64,
    pub from_server: AtomicU64,
}

impl Relayed {
    /// (from the client, from the server) so far.
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.from_client.load(Ordering::Relaxed),
            self.from_server.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Polls `ended` a few times over a short while: it must stay pending
    /// (and not panic, however often it is polled).
    async fn stays_pending(ended: &mut IdentityEnded) {
        for _ in 0..3 {
            let polled = tokio::time::timeout(Duration::from_millis(20), &mut *ended).await;
            assert!(polled.is_err());
        }
    }

    #[tokio::test]
    async fn an_identity_end_is_told_once_and_a_lost_watch_is_never() {
        stays_pending(&mut IdentityEnded::never()).await;

        let (end, ended) = oneshot::channel::<()>();
        let mut watched = IdentityEnded::watch(async move {
            let _ = ended.await;
            "logout".to_string()
        });
        stays_pending(&mut watched).await;
        end.send(()).unwrap();
        assert_eq!(watched.await, "logout");

        // A watch that fails without an end: the session goes on.
        let mut lost = IdentityEnded::watch(async { panic!("the watch failed") });
        stays_pending(&mut lost).await;
    }

    #[tokio::test]
    async fn dropping_it_stops_the_watch() {
        let (_keep, ended) = oneshot::channel::<()>();
        let watched = IdentityEnded::watch(async move {
            let _ = ended.await;
            String::new()
        });
        let watch = watched.watch.as_ref().unwrap().abort_handle();
        drop(watched);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(watch.is_finished());
    }
}
