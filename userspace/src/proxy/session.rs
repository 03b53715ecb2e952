//! One client connection through the pipeline: identify, relay, record.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Instant, SystemTime},
};

use tokio::net::TcpStream;
use tracing::{info, info_span, warn, Instrument};

use super::{relay, upstream, Gateway, Shutdown};
use crate::{
    audit::{AuditEvent, SessionEnd, SessionStart},
    config::Protocol,
    kernel::{normalise_addr, ConnectOrigin},
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

pub(super) async fn run(
    client: TcpStream,
    peer: SocketAddr,
    listener: Arc<str>,
    protocol: Protocol,
    gateway: Arc<Gateway>,
    mut shutdown: Shutdown,
) {
    let peer = normalise_addr(peer);
    let origin = match identify(&gateway, peer) {
        Ok(origin) => origin,
        Err(reason) => {
            warn!(%listener, %peer, "refused: {reason}");
            record(
                &gateway,
                AuditEvent::ConnectionRefused {
                    listener: listener.to_string(),
                    peer,
                    reason,
                },
            );
            return;
        }
    };
    let session = next_session_id();
    let span = info_span!("session", id = %session, %listener, %peer, uid = origin.uid, command = %origin.command);
    async move {
        let started = Instant::now();
        info!(destination = %origin.original_destination, pid = origin.pid, "session start");
        let destination = origin.original_destination;
        let recorded = record(
            &gateway,
            AuditEvent::SessionStart(SessionStart {
                session: session.clone(),
                listener: listener.to_string(),
                protocol: match protocol {
                    Protocol::Tcp => "tcp",
                },
                peer,
                origin,
            }),
        );
        if !recorded {
            // No session goes unrecorded: fail closed.
            return;
        }
        let outcome = tokio::select! {
            outcome = relay_to(client, destination, &gateway, protocol) => outcome,
            _ = shutdown.requested() => Err("gateway shutting down".to_string()),
        };
        let (relayed, error) = match outcome {
            Ok(r) => (r, None),
            Err(e) => (
                relay::Relayed {
                    from_client: 0,
                    from_server: 0,
                },
                Some(e),
            ),
        };
        info!(
            bytes_from_client = relayed.from_client,
            bytes_from_server = relayed.from_server,
            error = error.as_deref().unwrap_or(""),
            "session end"
        );
        record(
            &gateway,
            AuditEvent::SessionEnd(SessionEnd {
                session,
                bytes_from_client: relayed.from_client,
                bytes_from_server: relayed.from_server,
                duration_ms: started.elapsed().as_millis() as u64,
                error,
            }),
        );
    }
    .instrument(span)
    .await
}

/// The kernel's account of who connected and where they were going.
fn identify(gateway: &Gateway, peer: SocketAddr) -> Result<ConnectOrigin, String> {
    match gateway.connections.take(peer) {
        Ok(Some(origin)) => Ok(origin),
        Ok(None) => {
            Err("no kernel record for this connection (it was not redirected by Portcullis)".into())
        }
        Err(e) => Err(format!("kernel connection table unreadable: {e}")),
    }
}

async fn relay_to(
    client: TcpStream,
    destination: SocketAddr,
    gateway: &Gateway,
    protocol: Protocol,
) -> Result<relay::Relayed, String> {
    let server = upstream::connect(destination, gateway.exempt_mark)
        .await
        .map_err(|e| format!("upstream {destination}: {e}"))?;
    match protocol {
        Protocol::Tcp => relay::tcp(client, server).await.map_err(|e| e.to_string()),
    }
}

/// Records `event`; false (and an error in the log) if it could not be.
fn record(gateway: &Gateway, event: AuditEvent) -> bool {
    match gateway.recorder.record(event) {
        Ok(()) => true,
        Err(e) => {
            tracing::error!("audit record lost: {e}");
            false
        }
    }
}
