//! Upstream connections kept between sessions.
//!
//! Scripts and agents often connect once per query; each of their sessions
//! would cost a PostgreSQL backend start and the gateway's login upstream,
//! several milliseconds of CPU that most of the session's time goes to. A
//! session whose client terminates cleanly (nothing outstanding, no
//! transaction open) leaves its upstream here instead, after `DISCARD ALL`
//! has reset everything a session can change (settings, prepared
//! statements, temporary tables, LISTENs, advisory locks, the role). The
//! next session with the same [`PoolKey`] (resource, upstream role,
//! database, the client's start-up parameters) takes it instead of logging
//! in; the client sees the start-up's ParameterStatus messages replayed, as
//! from a new backend.
//!
//! This is PgBouncer's session pooling with its default reset. Each client
//! still gets its own gateway session, identity check, grant and records;
//! only the upstream role's connection is shared, so no session gains a
//! privilege it did not have.

use std::{
    collections::HashMap,
    path::PathBuf,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, Weak,
    },
    task::{Context, Poll, Waker},
    time::{Duration, Instant},
};

use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};

use super::{
    upstream::{read_message, Upstream},
    PgError, PgStream, Resource,
};
use crate::{lock, resource::UpstreamTls};

/// How long an idle upstream is kept (PostgreSQL's side keeps a backend
/// process for each).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Time the upstream has to answer the reset.
const RESET_TIMEOUT: Duration = Duration::from_secs(5);

/// What makes two sessions' upstreams interchangeable. Made on the
/// session's worker thread.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    resource: String,
    address: std::net::SocketAddr,
    tls: UpstreamTls,
    ca_file: Option<PathBuf>,
    server_name: Option<String>,
    upstream_user: String,
    database: String,
    /// The client's other start-up parameters, as sent upstream: after the
    /// reset, the backend's settings are these.
    params: Vec<(String, String)>,
    /// The worker whose event loop the connection is registered with: a
    /// session takes only its own worker's, so that none of its reads
    /// wakes another thread (see [`crate::proxy::Workers`]).
    worker: std::thread::ThreadId,
}

impl PoolKey {
    pub fn new(
        resource: &Resource,
        upstream_user: &str,
        database: &str,
        params: &[(String, String)],
    ) -> Self {
        Self {
            resource: resource.config.name.clone(),
            address: resource.config.address,
            tls: resource.config.tls,
            ca_file: resource.config.ca_file.clone(),
            server_name: resource.config.server_name.clone(),
            upstream_user: upstream_user.to_string(),
            database: database.to_string(),
            params: params.to_vec(),
            worker: std::thread::current().id(),
        }
    }
}

struct Idle {
    upstream: Upstream,
    since: Instant,
}

/// Idle upstreams by key, most recently used last.
#[derive(Default)]
pub struct UpstreamPool {
    idle: Mutex<HashMap<PoolKey, Vec<Idle>>>,
    /// Whether the task that closes expired upstreams runs.
    reaping: AtomicBool,
}

impl UpstreamPool {
    fn idle(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Vec<Idle>>> {
        lock(&self.idle)
    }

    /// An idle upstream for `key` that is still open, if there is one.
    pub fn take(&self, key: &PoolKey) -> Option<Upstream> {
        loop {
            let idle = {
                let mut all = self.idle();
                let list = all.get_mut(key)?;
                let idle = list.pop();
                if list.is_empty() {
                    all.remove(key);
                }
                idle?
            };
            let mut upstream = idle.upstream;
            if !quiet(&mut upstream.stream) {
                // It spoke (an error before closing) or hung up: gone.
                continue;
            }
            if idle.since.elapsed() < IDLE_TIMEOUT {
                return Some(upstream);
            }
            // Expired before the reaper came by: ended as the reaper ends
            // them, so PostgreSQL does not log an unexpected EOF.
            tokio::spawn(terminate(upstream.stream));
        }
    }

    /// Resets `upstream` and keeps it for the next session with `key`, if
    /// fewer than `limit` are idle there; otherwise, or if the reset fails,
    /// terminates it.
    pub async fn give_back(self: Arc<Self>, key: PoolKey, mut upstream: Upstream, limit: usize) {
        let room = |pool: &Self| pool.idle().get(&key).map_or(0, Vec::len) < limit;
        if !room(&self) || reset(&mut upstream.stream).await.is_err() {
            terminate(upstream.stream).await;
            return;
        }
        let surplus = {
            let mut all = self.idle();
            let list = all.entry(key).or_default();
            if list.len() < limit {
                list.push(Idle {
                    upstream,
                    since: Instant::now(),
                });
                None
            } else {
                Some(upstream)
            }
        };
        match surplus {
            Some(upstream) => terminate(upstream.stream).await,
            None => self.reap_in_background(),
        }
    }

    /// Starts the task that terminates upstreams idle for longer than
    /// [`IDLE_TIMEOUT`], once; it ends with the pool.
    fn reap_in_background(self: &Arc<Self>) {
        if self.reaping.swap(true, Ordering::Relaxed) {
            return;
        }
        let pool: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(IDLE_TIMEOUT / 4).await;
                let Some(pool) = pool.upgrade() else {
                    return;
                };
                let expired: Vec<Upstream> = {
                    let mut all = pool.idle();
                    let mut expired = Vec::new();
                    for list in all.values_mut() {
                        let (old, fresh) = std::mem::take(list)
                            .into_iter()
                            .partition(|idle| idle.since.elapsed() >= IDLE_TIMEOUT);
                        *list = fresh;
                        expired.extend(old.into_iter().map(|idle: Idle| idle.upstream));
                    }
                    all.retain(|_, list| !list.is_empty());
                    expired
                };
                for upstream in expired {
                    terminate(upstream.stream).await;
                }
            }
        });
    }
}

/// `DISCARD ALL`, and its answer: the backend as a new one would be.
async fn reset(stream: &mut PgStream) -> Result<(), PgError> {
    let reset = async {
        stream.write_all(b"Q\0\0\0\x10DISCARD ALL\0").await?;
        stream.flush().await?;
        let mut completed = false;
        loop {
            match read_message(stream).await? {
                (b'C', _) => completed = true,
                // ParameterStatus for the settings the reset reverted;
                // notices.
                (b'S' | b'N', _) => {}
                (b'Z', status) if completed && status == b"I" => return Ok(()),
                (kind, _) => {
                    return Err(PgError::Upstream(format!(
                        "unexpected {:?} while resetting an upstream for reuse",
                        char::from(kind)
                    )))
                }
            }
        }
    };
    tokio::time::timeout(RESET_TIMEOUT, reset)
        .await
        .unwrap_or_else(|_| Err(PgError::Upstream("the reset timed out".into())))
}

/// True when nothing has arrived on an idle upstream: no hang-up, no
/// message (an idle backend only speaks to say it is going away).
fn quiet(stream: &mut PgStream) -> bool {
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    let mut cx = Context::from_waker(Waker::noop());
    matches!(Pin::new(stream).poll_read(&mut cx, &mut buf), Poll::Pending)
}

/// Says goodbye to an upstream that is not kept.
async fn terminate(mut stream: PgStream) {
    let _ = tokio::time::timeout(RESET_TIMEOUT, async {
        stream.write_all(b"X\0\0\0\x04").await?;
        stream.shutdown().await
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn quiet_tells_an_idle_stream_from_a_closed_or_talking_one() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let connect = || tokio::net::TcpStream::connect(address);
        let idle = connect().await.unwrap();
        let (_idle_peer, _) = listener.accept().await.unwrap();
        let closed = connect().await.unwrap();
        drop(listener.accept().await.unwrap());
        let talking = connect().await.unwrap();
        let (mut talking_peer, _) = listener.accept().await.unwrap();
        talking_peer.write_all(b"E").await.unwrap();
        // Let the events reach the runtime's reactor.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(quiet(&mut PgStream::Plain(idle)));
        assert!(!quiet(&mut PgStream::Plain(closed)));
        assert!(!quiet(&mut PgStream::Plain(talking)));
    }
}
