//! The data plane's threads.
//!
//! Sessions run on a few worker threads, each with its own single-threaded
//! event loop and its own handle on every listening socket: whichever
//! worker is free accepts the next connection, and a session lives on the
//! thread that accepted it. Nothing a session does wakes another
//! thread: the relay's reads, writes and timers all complete where they
//! started, which on a proxy for small statements is most of the cost a
//! work-stealing scheduler adds (cross-thread wake-ups, futex calls,
//! context switches). PgBouncer runs the same way, one event loop per
//! process.
//!
//! The control plane (sign-in, approvals, the audit socket, signals) stays
//! on the daemon's main runtime; the two meet only through shared state
//! and channels, which work across runtimes.

use std::{sync::Arc, thread::JoinHandle};

use tracing::{error, info};

use super::{listener, BoundListener, Gateway, Shutdown};

/// The running worker threads.
pub struct Workers {
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts one thread per handle of the listeners (see
    /// [`bind`](super::bind)), each serving its share of every listener
    /// until `shutdown`, then waiting for its sessions.
    pub fn start(
        listeners: Vec<BoundListener>,
        gateway: Arc<Gateway>,
        shutdown: Shutdown,
    ) -> std::io::Result<Self> {
        let mut shares_by_worker: Vec<Vec<listener::Share>> = Vec::new();
        for bound in listeners {
            info!(
                listener = %bound.name,
                address = %bound.local_addr,
                workers = bound.workers(),
                "listening"
            );
            for (worker, share) in bound.into_shares().into_iter().enumerate() {
                if shares_by_worker.len() <= worker {
                    shares_by_worker.push(Vec::new());
                }
                shares_by_worker[worker].push(share);
            }
        }
        let mut threads = Vec::with_capacity(shares_by_worker.len());
        for (index, shares) in shares_by_worker.into_iter().enumerate() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let gateway = Arc::clone(&gateway);
            let shutdown = shutdown.clone();
            let thread = std::thread::Builder::new()
                .name(format!("proxy-{index}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        let mut accepting = tokio::task::JoinSet::new();
                        for share in shares {
                            accepting.spawn(listener::run(
                                share,
                                Arc::clone(&gateway),
                                shutdown.clone(),
                            ));
                        }
                        while accepting.join_next().await.is_some() {}
                    });
                })?;
            threads.push(thread);
        }
        Ok(Self { threads })
    }

    /// Waits until every worker has finished (after shutdown, once its
    /// sessions have ended).
    pub async fn finished(self) {
        let joined = tokio::task::spawn_blocking(move || {
            for thread in self.threads {
                if thread.join().is_err() {
                    error!("a proxy worker thread panicked");
                }
            }
        });
        let _ = joined.await;
    }
}
