//! The audit store inside the daemon: the writer, `audit.sock` and the
//! periodic retention purge, started and stopped together.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use tracing::{error, info};

use super::{
    keys::Keys,
    server::{self, AuditServer},
    store::Store,
    writer::SledRecorder,
    AuditError, Recorder,
};
use crate::{
    config::Config,
    proxy::{Shutdown, ShutdownSignal},
};

/// How often expired payloads are purged (also once at start).
const PURGE_EVERY: Duration = Duration::from_secs(6 * 3600);

/// The running audit store.
pub struct AuditService {
    recorder: Arc<SledRecorder>,
    stop: ShutdownSignal,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl AuditService {
    /// Opens (or creates) the store and its keys, starts the writer and
    /// serves `audit.sock`. Must run inside the daemon's runtime.
    pub fn start(config: &Config) -> Result<Self, AuditError> {
        let store = Store::open(&config.state_dir)?;
        let keys = Keys::load_or_create(&config.state_dir)?;
        let recorder = Arc::new(SledRecorder::start(
            store.clone(),
            keys,
            config.audit.checkpoints(),
        )?);
        let (listener, socket) = server::bind(&config.state_dir)?;
        let (stop, shutdown) = ShutdownSignal::new();
        let retention = config.audit.retention();
        let server = Arc::new(AuditServer {
            store: store.clone(),
            recorder: Arc::clone(&recorder),
            retention: retention.clone(),
        });
        let mut tasks = vec![tokio::spawn(server.serve(listener, shutdown.clone()))];
        tasks.push(tokio::spawn(purge_loop(
            Arc::clone(&recorder),
            retention,
            shutdown.clone(),
        )));
        if let Some(target) = &config.audit.export {
            tasks.push(super::export::spawn_in_daemon(store, target, shutdown)?);
        }
        info!(store = %config.state_dir.join("audit").display(), socket = %socket.display(), "audit store open");
        Ok(Self {
            recorder,
            stop,
            tasks,
        })
    }

    pub fn recorder(&self) -> Arc<dyn Recorder> {
        Arc::clone(&self.recorder) as Arc<dyn Recorder>
    }

    /// Stops serving, commits what is queued and signs a final checkpoint.
    pub async fn stop(self) {
        self.stop.fire();
        for task in self.tasks {
            let _ = task.await;
        }
        let recorder = self.recorder;
        match tokio::task::spawn_blocking(move || recorder.close()).await {
            Ok(Ok(())) => info!("audit store closed with a final signed checkpoint"),
            Ok(Err(e)) => error!("closing the audit store: {e}"),
            Err(e) => error!("closing the audit store: {e}"),
        }
    }
}

async fn purge_loop(
    recorder: Arc<SledRecorder>,
    retention: super::retention::Retention,
    mut shutdown: Shutdown,
) {
    loop {
        match recorder.purge(retention.clone(), SystemTime::now()).await {
            Ok(summary) if summary.records > 0 => {
                info!(records = summary.records, "retention purge done")
            }
            Ok(_) => {}
            Err(e) => error!("retention purge failed: {e}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(PURGE_EVERY) => {}
            _ = shutdown.requested() => return,
        }
    }
}
