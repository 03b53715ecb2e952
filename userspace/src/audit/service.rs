//! The audit store inside the daemon: the writer, `audit.sock` and the
//! periodic retention purge, started and stopped together.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use tracing::{error, info, warn};

use super::{
    keys::{self, Keys},
    server::{self, AuditServer},
    store::Store,
    writer::SledRecorder,
    AuditError, Recorder,
};
use crate::{
    config::Config,
    identity::IdentityProvider,
    proxy::{Shutdown, ShutdownSignal},
};

/// How often expired payloads are purged (also once at start).
const PURGE_EVERY: Duration = Duration::from_secs(6 * 3600);

/// The running audit store.
pub struct AuditService {
    recorder: Arc<SledRecorder>,
    server: Arc<AuditServer>,
    stop: ShutdownSignal,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl AuditService {
    /// Opens (or creates) the store and its keys, starts the writer and
    /// serves `audit.sock`. Must run inside the daemon's runtime.
    pub fn start(config: &Config) -> Result<Self, AuditError> {
        let store = Store::open(&config.state_dir)?;
        let created = keys::init(&config.state_dir)?;
        if !created.is_empty() {
            warn!(
                keys = ?created,
                "audit keys created now, not at install: run `portcullis audit public-key` \
                 and hand the key to your auditors"
            );
        }
        let keys = Keys::load_or_create(&config.state_dir)?;
        let recorder = Arc::new(SledRecorder::start(
            store.clone(),
            keys,
            config.audit.checkpoints(),
        )?);
        let socket = config.audit.socket_path(&config.state_dir);
        let listener = server::bind(&socket)?;
        if let Some(dir) = closed_to_others(&socket) {
            warn!(
                socket = %socket.display(),
                "auditors other than root cannot reach the audit socket: {} is not searchable \
                 by others (chmod o+x it, or set [audit] socket)",
                dir.display()
            );
        }
        let (stop, shutdown) = ShutdownSignal::new();
        let retention = config.audit.retention();
        let server = Arc::new(AuditServer::new(
            store.clone(),
            Arc::clone(&recorder),
            retention.clone(),
            config.state_dir.clone(),
            config.audit.auditors_role.clone(),
            config.identity.is_some(),
        ));
        let mut tasks = vec![tokio::spawn(
            Arc::clone(&server).serve(listener, shutdown.clone()),
        )];
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
            server,
            stop,
            tasks,
        })
    }

    /// Resolves if the writer stops on its own (see [`SledRecorder::stopped`]).
    pub async fn writer_stopped(&self) {
        self.recorder.stopped().await;
    }

    pub fn recorder(&self) -> Arc<dyn Recorder> {
        Arc::clone(&self.recorder) as Arc<dyn Recorder>
    }

    /// Lets members of the auditors role (principals bound to their uid by
    /// `portcullis login`) use the auditor tools; before this, only root.
    pub fn set_identity(&self, identity: Arc<dyn IdentityProvider>) {
        let _ = self.server.identity.set(identity);
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

/// The first directory above `path` that others cannot search, if any.
fn closed_to_others(path: &std::path::Path) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    path.ancestors().skip(1).find_map(|dir| {
        let mode = std::fs::metadata(dir).ok()?.permissions().mode();
        (mode & 0o001 == 0).then(|| dir.to_owned())
    })
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
