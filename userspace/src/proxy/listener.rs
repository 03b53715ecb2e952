//! Listeners and their accept loops.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use socket2::{Domain, Socket, Type};
use tokio::{net::TcpListener, sync::Semaphore};
use tracing::{debug, error, info};

use super::{session, Gateway, Shutdown};
use crate::config::{ListenerConfig, Protocol};

/// Concurrent sessions per listener and worker before accept() waits.
const MAX_SESSIONS: usize = 4096;

/// A listener bound to its address, ready to serve.
pub struct BoundListener {
    pub name: String,
    pub protocol: Protocol,
    /// Accepts clients the kernel did not redirect (see ListenerConfig).
    pub direct: bool,
    pub local_addr: SocketAddr,
    /// One handle on the listening socket per proxy worker.
    sockets: Vec<std::net::TcpListener>,
}

/// One worker's share of a listener: its own handle on the socket.
pub(super) struct Share {
    name: Arc<str>,
    protocol: Protocol,
    direct: bool,
    local_addr: SocketAddr,
    socket: std::net::TcpListener,
}

impl BoundListener {
    /// How many workers share this listener.
    pub fn workers(&self) -> usize {
        self.sockets.len()
    }

    /// Splits the listener into one share per worker.
    pub(super) fn into_shares(self) -> Vec<Share> {
        let name: Arc<str> = self.name.into();
        self.sockets
            .into_iter()
            .map(|socket| Share {
                name: Arc::clone(&name),
                protocol: self.protocol,
                direct: self.direct,
                local_addr: self.local_addr,
                socket,
            })
            .collect()
    }
}

/// Binds every listener once, before anything is announced ready, so a bad
/// address fails start-up instead of the first client; each of the
/// `workers` gets its own handle on the socket.
///
/// Handles on one socket rather than SO_REUSEPORT: another process of the
/// same user could join a reuse-port group and take a share of the
/// connections, while a second bind of a bound address simply fails. The
/// workers share one accept queue and whichever is free takes the next
/// connection.
pub fn bind(configs: &[ListenerConfig], workers: usize) -> std::io::Result<Vec<BoundListener>> {
    let mut bound = Vec::with_capacity(configs.len());
    for config in configs {
        let socket = listen(config.address).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "listener '{}' cannot bind {}: {e}",
                    config.name, config.address
                ),
            )
        })?;
        let local_addr = socket.local_addr()?;
        let mut sockets = Vec::with_capacity(workers);
        for _ in 1..workers {
            sockets.push(socket.try_clone()?);
        }
        sockets.push(socket);
        bound.push(BoundListener {
            name: config.name.clone(),
            protocol: config.protocol,
            direct: config.direct,
            local_addr,
            sockets,
        });
    }
    Ok(bound)
}

/// A non-blocking listening socket, not yet registered with any runtime
/// (each worker registers its handle with its own). Bound as tokio's bind
/// does it: SO_REUSEADDR, so a restarted daemon can bind while old
/// connections linger in TIME_WAIT, and a backlog of 1024 (std's bind
/// would give 128).
fn listen(address: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// A worker's accept loop on its share of a listener; runs on that
/// worker's runtime, which the socket is registered with here.
pub(super) async fn run(share: Share, gateway: Arc<Gateway>, mut shutdown: Shutdown) {
    let socket = match TcpListener::from_std(share.socket) {
        Ok(socket) => socket,
        Err(e) => {
            error!(listener = %share.name, "cannot serve {}: {e}", share.local_addr);
            return;
        }
    };
    let limit = Arc::new(Semaphore::new(MAX_SESSIONS));
    let name = share.name;
    debug!(listener = %name, address = %share.local_addr, "accepting");
    let mut sessions = tokio::task::JoinSet::new();
    let mut backoff = Duration::from_millis(10);
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&limit).acquire_owned() => permit.expect("semaphore is never closed"),
            _ = shutdown.requested() => break,
        };
        let accepted = tokio::select! {
            accepted = socket.accept() => accepted,
            _ = shutdown.requested() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(10);
                let gateway = Arc::clone(&gateway);
                let name = Arc::clone(&name);
                let shutdown = shutdown.clone();
                let (protocol, direct) = (share.protocol, share.direct);
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
    // Sessions that ended since the last accept are still in the set.
    while sessions.try_join_next().is_some() {}
    info!(listener = %name, open = sessions.len(), "listener closed; waiting for sessions");
    while sessions.join_next().await.is_some() {}
}
