//! The daemon's side of `audit.sock`: auditor commands reach the store the
//! daemon owns through it.
//!
//! One JSON request line per connection, one JSON answer line (see
//! [`super::source::Request`]). The socket is mode 0600 in the state
//! directory and every peer's uid is checked with SO_PEERCRED: root only
//! for now (see [`authorize`]).

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde::Serialize;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};
use tracing::{debug, warn};

use super::{
    record::Hash,
    retention::Retention,
    source::{Request, Response, SOCKET_FILE},
    store::Store,
    writer::SledRecorder,
    AuditError,
};
use crate::proxy::Shutdown;

/// Longest request line accepted.
const MAX_REQUEST: usize = 4096;

/// What the server needs from the daemon.
pub struct AuditServer {
    pub store: Store,
    pub recorder: Arc<SledRecorder>,
    pub retention: Retention,
}

/// Who may use the auditor commands.
///
/// Root only, for now. This is the hook for the `auditors` role: once
/// principals carry roles for local uids (OIDC login), allow a uid here
/// whose principal has the `auditors` role, and make the socket group- or
/// ACL-readable for them.
pub fn authorize(uid: u32) -> Result<(), String> {
    if uid == 0 {
        Ok(())
    } else {
        Err(format!(
            "uid {uid} may not read the audit store: auditor commands are limited to root (and, later, the auditors role)"
        ))
    }
}

/// Binds `<state_dir>/audit.sock` (mode 0600), replacing a stale one.
pub fn bind(state_dir: &Path) -> Result<(UnixListener, PathBuf), AuditError> {
    let path = state_dir.join(SOCKET_FILE);
    let io = |source| AuditError::Io {
        path: path.clone(),
        source,
    };
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let listener = UnixListener::bind(&path).map_err(io)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok((listener, path))
}

impl AuditServer {
    /// Answers requests until `shutdown` fires.
    pub async fn serve(self: Arc<Self>, listener: UnixListener, mut shutdown: Shutdown) {
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        warn!("audit.sock accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = shutdown.requested() => return,
            };
            let server = Arc::clone(&self);
            tokio::spawn(async move {
                if let Err(e) = server.answer(stream).await {
                    debug!("audit.sock request failed: {e}");
                }
            });
        }
    }

    async fn answer(&self, stream: UnixStream) -> std::io::Result<()> {
        let uid = stream.peer_cred()?.uid();
        let (read, mut write) = stream.into_split();
        let mut line = String::new();
        let mut reader = BufReader::new(read).take(MAX_REQUEST as u64);
        reader.read_line(&mut line).await?;
        let answer = match authorize(uid) {
            Err(message) => {
                warn!(uid, "audit.sock: refused");
                error_line(message)
            }
            Ok(()) => match serde_json::from_str::<Request>(&line) {
                Err(e) => error_line(format!("bad request: {e}")),
                Ok(request) => self.handle(request).await,
            },
        };
        write.write_all(&answer).await?;
        write.shutdown().await
    }

    async fn handle(&self, request: Request) -> Vec<u8> {
        let store = self.store.clone();
        match request {
            Request::Records { from, limit } => {
                blocking(move || store.raw_records(from, limit.min(super::source::PAGE))).await
            }
            Request::Checkpoints => blocking(move || store.raw_checkpoints()).await,
            Request::Meta => blocking(move || store.checkpoint_meta()).await,
            Request::FileCheckpoint => blocking(move || store.file_checkpoint()).await,
            Request::Subject { hash } => {
                let mut key: Hash = [0; 32];
                if hex::decode_to_slice(&hash, &mut key).is_err() {
                    return error_line("subject hash must be 64 hex digits".into());
                }
                blocking(move || store.subject_hits(&key)).await
            }
            Request::Checkpoint => ok_line(self.recorder.checkpoint().await),
            Request::Purge { as_of_us } => {
                let as_of = SystemTime::UNIX_EPOCH + Duration::from_micros(as_of_us);
                ok_line(self.recorder.purge(self.retention.clone(), as_of).await)
            }
        }
    }
}

async fn blocking<T: Serialize + Send + 'static>(
    f: impl FnOnce() -> Result<T, AuditError> + Send + 'static,
) -> Vec<u8> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => ok_line(result),
        Err(e) => error_line(format!("request task failed: {e}")),
    }
}

fn ok_line<T: Serialize>(result: Result<T, AuditError>) -> Vec<u8> {
    let mut line = match result {
        Ok(value) => serde_json::to_vec(&Response::Ok(value)),
        Err(e) => serde_json::to_vec(&Response::<()>::Error(e.to_string())),
    }
    .unwrap_or_else(|e| format!("{{\"error\":\"encoding the answer: {e}\"}}").into_bytes());
    line.push(b'\n');
    line
}

fn error_line(message: String) -> Vec<u8> {
    ok_line::<()>(Err(AuditError::Daemon(message)))
}
