//! Listeners and their accept loops.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::Semaphore};
use tracing::{error, info};

use super::{session, Gateway, Shutdown};
use crate::config::{ListenerConfig, Protocol};

/// Concurrent sessions per listener before accept() waits.
const MAX_SESSIONS: usize = 4096;

/// A listener bound to its address, ready to serve.
pub struct BoundListener {
    pub name: String,
    pub protocol: Protocol,
    /// Accepts clients the kernel did not redirect (see ListenerConfig).
    pub direct: bool,
    pub local_addr: SocketAddr,
    socket: TcpListener,
}

/// Binds every listener before anything is announced ready, so a bad address
/// fails start-up instead of the first client.
pub async fn bind(configs: &[ListenerConfig]) -> std::io::Result<Vec<BoundListener>> {
    let mut bound = Vec::with_capacity(configs.len());
    for config in configs {
        let socket = TcpListener::bind(config.address).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "listener '{}' cannot bind {}: {e}",
                    config.name, config.address
                ),
            )
        })?;
        bound.push(BoundListener {
            name: config.name.clone(),
            protocol: config.protocol,
            direct: config.direct,
            local_addr: socket.local_addr()?,
            socket,
        });
    }
    Ok(bound)
}

pub(super) async fn run(listener: BoundListener, gateway: Arc<Gateway>, mut shutdown: Shutdown) {
    let limit = Arc::new(Semaphore::new(MAX_SESSIONS));
    let name: Arc<str> = listener.name.clone().into();
    info!(listener = %name, address = %listener.local_addr, "listening");
    let mut sessions = tokio::task::JoinSet::new();
    let mut backoff = Duration::from_millis(10);
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&limit).acquire_owned() => permit.expect("semaphore is never closed"),
            _ = shutdown.requested() => break,
        };
        let accepted = tokio::select! {
            accepted = listener.socket.accept() => accepted,
            _ = shutdown.requested() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(10);
                let gateway = Arc::clone(&gateway);
                let name = Arc::clone(&name);
                let shutdown = shutdown.clone();
                let (protocol, direct) = (listener.protocol, listener.direct);
                sessions.spawn(async move {
                    session::run(stream, peer, name, protocol, direct, gateway, shutdown).await;
                    drop(permit);
                });
            }
            Err(e) => {
                // Typically EMFILE: wait instead of spinning.
                error!(listener = %name, "accept failed: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
        while sessions.try_join_next().is_some() {}
    }
    info!(listener = %name, open = sessions.len(), "listener closed; waiting for sessions");
    while sessions.join_next().await.is_some() {}
}
