//! One client connection through the pipeline: identify, relay, record.

use std::{
    any::Any,
    net::SocketAddr,
    panic::AssertUnwindSafe,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Instant, SystemTime},
};

use futures_util::FutureExt;
use tokio::net::TcpStream;
use tracing::{debug, info, info_span, warn, Instrument};

use super::{Gateway, Shutdown};
use crate::{
    audit::{AuditEvent, SessionEnd, SessionRefused, SessionStart},
    config::Protocol,
    kernel::{normalise_addr, ConnectOrigin, KernelError},
    protocol::{self, SessionContext, StartRecord},
};

/// Session ids: start time of the process plus a counter, unique per host.
fn next_session_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let start = *START.get_or_init(|| {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    });
    format!("{start:x}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Puts a redirected PostgreSQL client on the kernel fast path, before
/// anything is read from it (see [`FastPath::join`](crate::kernel::FastPath::join): PostgreSQL clients
/// wait for the server's answer at every step of the start-up, so nothing
/// they send can overtake earlier bytes).
fn join_fast_path(gateway: &Gateway, client: &TcpStream, protocol: Protocol, peer: SocketAddr) {
    let (Some(fast_path), Protocol::Postgres) = (&gateway.fast_path, protocol) else {
        return;
    };
    let joined = client
        .local_addr()
        .map_err(KernelError::Io)
        .and_then(|local| fast_path.join(client, normalise_addr(local), peer));
    if let Err(e) = joined {
        // The TCP path still works: only slower.
        debug!(%peer, "not on the kernel fast path: {e}");
    }
}

pub(super) async fn run(
    client: TcpStream,
    peer: SocketAddr,
    listener: Arc<str>,
    protocol: Protocol,
    direct: bool,
    gateway: Arc<Gateway>,
    mut shutdown: Shutdown,
) {
    let peer = normalise_addr(peer);
    let origin = match identify(&gateway, peer) {
        Ok(origin) => {
            join_fast_path(&gateway, &client, protocol, peer);
            Some(origin)
        }
        // A direct listener serves remote clients too: the adapter asks them
        // for a token instead of relying on the kernel's uid.
        Err(Unidentified::NoRecord) if direct => None,
        Err(unidentified) => {
            let reason = unidentified.to_string();
            warn!(%listener, %peer, "refused: {reason}");
            record_refusal(
                &gateway,
                AuditEvent::ConnectionRefused {
                    listener: listener.to_string(),
                    peer,
                    reason,
                },
            )
            .await;
            return;
        }
    };
    let principal = match &origin {
        Some(origin) => gateway.identity.principal_for_uid(origin.uid).await,
        None => None,
    };
    // Opaque TCP cannot ask the client for a token: without a uid binding
    // there is nobody to attribute the session to (OIDC configured, the
    // user has not run `portcullis login`).
    if let (Protocol::Tcp, None, Some(origin)) = (protocol, &principal, &origin) {
        let reason = format!(
            "no identity bound to uid {}: run `portcullis login`",
            origin.uid
        );
        warn!(%listener, %peer, "refused: {reason}");
        record_refusal(
            &gateway,
            AuditEvent::SessionRefused(SessionRefused {
                session: next_session_id(),
                listener: listener.to_string(),
                protocol: protocol.name(),
                peer,
                reason,
                origin: origin.clone(),
            }),
        )
        .await;
        return;
    }
    let id = next_session_id();
    let span = info_span!(
        "session",
        %id,
        %listener,
        %peer,
        uid = ?origin.as_ref().map(|o| o.uid),
        principal = principal.as_ref().map_or("-", |p| p.name.as_str()),
    );
    span.in_scope(|| match &origin {
        Some(o) => info!(destination = %o.original_destination, pid = o.pid, command = %o.command, "session start"),
        None => info!("session start (direct client)"),
    });
    // Adapters wait for this record before relaying (see StartRecord).
    let start = StartRecord::new(
        gateway
            .recorder
            .record(AuditEvent::SessionStart(SessionStart {
                session: id.clone(),
                listener: listener.to_string(),
                protocol: protocol.name(),
                peer,
                principal: principal.clone(),
                origin: origin.clone(),
            })),
    );
    let ctx = SessionContext {
        id,
        listener,
        peer,
        origin,
        principal,
        gateway,
        span,
        start,
        relayed: Arc::default(),
    };
    let started = Instant::now();
    // Adapters run their set-up under the span, the relay outside it.
    // A bug that panics ends this session alone (tokio keeps the worker
    // thread and its other sessions), and the session's end is still
    // recorded, the panic as its error.
    let serving = AssertUnwindSafe(serve(&ctx, client, protocol)).catch_unwind();
    let outcome = tokio::select! {
        outcome = serving => outcome.unwrap_or_else(|panic| Err(internal_error(&*panic))),
        _ = shutdown.requested() => Err("gateway shutting down".to_string()),
    };
    let error = outcome.err();
    let (bytes_from_client, bytes_from_server) = ctx.relayed.bytes();
    async {
        // Sessions that ended before relaying did not wait for it.
        if let Err(e) = ctx.start.durable_unhurried().await {
            tracing::error!("audit record lost: {e}");
        }
        info!(
            bytes_from_client,
            bytes_from_server,
            error = error.as_deref().unwrap_or(""),
            "session end"
        );
        // Nobody waits for the end record: it goes with the next commit.
        let end = ctx
            .gateway
            .recorder
            .record(AuditEvent::SessionEnd(SessionEnd {
                session: ctx.id.clone(),
                bytes_from_client,
                bytes_from_server,
                duration_ms: started.elapsed().as_millis() as u64,
                error,
            }));
        if let Err(e) = end.durable_unhurried().await {
            tracing::error!("audit record lost: {e}");
        }
    }
    .instrument(ctx.span.clone())
    .await
}

/// A session's error for a panic in its adapter.
fn internal_error(panic: &(dyn Any + Send)) -> String {
    let message = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("no message");
    format!("internal error, the session was ended: {message} (please report this)")
}

/// Why a connection has no kernel record.
#[derive(Debug, thiserror::Error)]
enum Unidentified {
    /// Not redirected: a direct client, or a bypass attempt.
    #[error("no kernel record for this connection (it was not redirected by Portcullis)")]
    NoRecord,
    #[error("kernel connection table unreadable: {0}")]
    Table(String),
}

/// The kernel's account of who connected and where they were going.
fn identify(gateway: &Gateway, peer: SocketAddr) -> Result<ConnectOrigin, Unidentified> {
    match gateway.connections.take(peer) {
        Ok(Some(origin)) => Ok(origin),
        Ok(None) => Err(Unidentified::NoRecord),
        Err(e) => Err(Unidentified::Table(e.to_string())),
    }
}

/// Hands the session to its protocol adapter.
async fn serve(ctx: &SessionContext, client: TcpStream, protocol: Protocol) -> Result<(), String> {
    match protocol {
        Protocol::Tcp => protocol::tcp::serve(ctx, client).await,
        Protocol::Postgres => protocol::postgres::serve(ctx, client).await,
    }
}

/// Records a refusal and waits until it is durable, committed with
/// whatever comes next: nobody waits on it but the refused client's
/// socket, which closes after it. A flood of refused connections then
/// costs a commit per commit interval, not one each.
async fn record_refusal(gateway: &Gateway, event: AuditEvent) {
    if let Err(e) = gateway.recorder.record(event).durable_unhurried().await {
        tracing::error!("audit record lost: {e}");
    }
}
