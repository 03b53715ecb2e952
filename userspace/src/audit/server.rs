//! The daemon's side of the auditor socket: auditor commands reach the
//! store the daemon owns through it.
//!
//! One JSON request line per connection, one JSON answer line (see
//! [`super::source::Envelope`]). The socket is world-connectable (0666),
//! like the control socket: who is asking comes from the kernel
//! (SO_PEERCRED), never from the request, and [`authorize`] decides per
//! connection: root, or a uid bound by `portcullis login` to a principal
//! with the auditors role. Every non-root command, granted or refused, is
//! recorded in the chain before anything is answered (fail closed).

use std::{
    collections::HashMap,
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};
use tracing::{debug, warn};

use super::{
    event::AuditorAccess,
    keys,
    record::Hash,
    retention::Retention,
    source::{Envelope, Request, Response},
    store::Store,
    subject::subject_hash,
    writer::SledRecorder,
    AuditError, AuditEvent, Recorder,
};
use crate::{
    identity::{IdentityProvider, Principal},
    lock,
    proxy::Shutdown,
};

/// Longest request line accepted.
const MAX_REQUEST: usize = 4096;

/// A client must send its request within this time.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// One access record per command: the same uid, process and command
/// within this time is not recorded again (a query reads many pages).
const ACCESS_DEDUP: Duration = Duration::from_secs(600);

/// Access records remembered for deduplication, at most.
const ACCESS_MEMORY: usize = 4096;

/// What the server needs from the daemon.
pub struct AuditServer {
    pub store: Store,
    pub recorder: Arc<SledRecorder>,
    pub retention: Retention,
    pub state_dir: PathBuf,
    /// The role whose members may use the tools besides root.
    pub auditors_role: String,
    /// Set once the daemon's OIDC identity is up; until then, and without
    /// an `[identity]` section, only root is served.
    pub identity: OnceLock<Arc<dyn IdentityProvider>>,
    /// Whether the config has an `[identity]` section, so that a caller
    /// served before it is up is told to wait rather than that there is
    /// none.
    identity_configured: bool,
    /// (uid, pid, query) -> when its access was last recorded; refusals
    /// as (uid, u32::MAX, "").
    recorded: Mutex<HashMap<(u32, u32, String), Instant>>,
}

/// Where auditors' sign-ins come from, as far as the daemon has got.
#[derive(Clone, Copy)]
pub enum SignIn<'a> {
    /// No `[identity]` section: the auditor tools are root only.
    NotConfigured,
    /// Configured, but the daemon is still starting it.
    Starting,
    Ready(&'a dyn IdentityProvider),
}

/// Who may use the auditor tools: root, or a uid bound (`portcullis
/// login`, not expired) to a principal with `role`. Returns the principal
/// (none for root).
///
/// # Errors
/// A message for the caller saying why and what to do.
pub async fn authorize(
    uid: u32,
    sign_in: SignIn<'_>,
    role: &str,
) -> Result<Option<Principal>, (Option<Principal>, String)> {
    if uid == 0 {
        return Ok(None);
    }
    let identity = match sign_in {
        SignIn::Ready(identity) => identity,
        SignIn::NotConfigured => {
            return Err((
                None,
                format!(
                    "uid {uid} may not read the audit store: this gateway has no [identity] \
                     section, so the auditor tools are root only"
                ),
            ))
        }
        SignIn::Starting => {
            return Err((
                None,
                format!(
                    "uid {uid} may not read the audit store yet: the gateway is still starting \
                     its sign-in service; try again in a few seconds"
                ),
            ))
        }
    };
    match identity.principal_for_uid(uid).await {
        None => Err((
            None,
            format!(
                "uid {uid} is not signed in (or the sign-in expired): the audit store is limited to \
                 root and the `{role}` role; run `portcullis login` as an auditor"
            ),
        )),
        Some(p) if p.roles.iter().any(|r| r == role) => Ok(Some(p)),
        Some(p) => {
            let message = format!(
                "{} (uid {uid}) lacks the `{role}` role: the audit store is limited to root and \
                 auditors; run `portcullis login` as an auditor",
                p.name
            );
            Err((Some(p), message))
        }
    }
}

/// Binds the auditor socket at `path` (world-connectable: every peer is
/// checked), creating its directory (0755) if missing. A stale socket is
/// replaced, a live one (another daemon) is not.
pub fn bind(path: &Path) -> Result<UnixListener, AuditError> {
    let io = |source| AuditError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        if !parent.exists() {
            std::fs::create_dir_all(parent).map_err(io)?;
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755)).map_err(io)?;
        }
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(AuditError::Daemon(format!(
            "another process already serves {}: stop it, or set [audit] socket to another path",
            path.display()
        )));
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path).map_err(io)?,
        Ok(_) => {
            return Err(io(std::io::Error::other(
                "exists and is not a socket; remove it or set [audit] socket to another path",
            )))
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(io)?;
    Ok(listener)
}

impl AuditServer {
    pub fn new(
        store: Store,
        recorder: Arc<SledRecorder>,
        retention: Retention,
        state_dir: PathBuf,
        auditors_role: String,
        identity_configured: bool,
    ) -> Self {
        Self {
            store,
            recorder,
            retention,
            state_dir,
            auditors_role,
            identity: OnceLock::new(),
            identity_configured,
            recorded: Mutex::new(HashMap::new()),
        }
    }

    /// Answers requests until `shutdown` fires.
    pub async fn serve(self: Arc<Self>, listener: UnixListener, mut shutdown: Shutdown) {
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        warn!("audit socket accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = shutdown.requested() => return,
            };
            let server = Arc::clone(&self);
            tokio::spawn(async move {
                if let Err(e) = server.answer(stream).await {
                    debug!("audit socket request failed: {e}");
                }
            });
        }
    }

    async fn answer(&self, stream: UnixStream) -> std::io::Result<()> {
        // The kernel's word on who connected; nothing the client says matters.
        let cred = stream.peer_cred()?;
        let (uid, pid) = (cred.uid(), cred.pid().unwrap_or(0).max(0) as u32);
        let (read, mut write) = stream.into_split();
        let mut line = String::new();
        let mut reader = BufReader::new(read).take(MAX_REQUEST as u64);
        match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await {
            Ok(result) => result?,
            Err(_) => return Ok(()),
        };
        if line.trim().is_empty() {
            // A probe (is the daemon there?): nothing asked, nothing read.
            return Ok(());
        }
        let answer = match serde_json::from_str::<Envelope>(&line) {
            Err(e) => error_line(format!("bad request: {e}")),
            Ok(envelope) => match self.admit(uid, pid, &envelope).await {
                Err(message) => error_line(message),
                Ok(()) => self.handle(envelope.request).await,
            },
        };
        write.write_all(&answer).await?;
        write.shutdown().await
    }

    /// Authorizes the caller and, unless root, records the access (once
    /// per command) before anything is read; a refusal is recorded too.
    async fn admit(&self, uid: u32, pid: u32, envelope: &Envelope) -> Result<(), String> {
        let sign_in = match (self.identity.get(), self.identity_configured) {
            (Some(identity), _) => SignIn::Ready(identity.as_ref()),
            (None, true) => SignIn::Starting,
            (None, false) => SignIn::NotConfigured,
        };
        let decision = authorize(uid, sign_in, &self.auditors_role).await;
        if uid == 0 {
            return Ok(());
        }
        let mut query = envelope
            .query
            .clone()
            .unwrap_or_else(|| "(not stated by the client)".into());
        if let Request::SubjectValue { value } = &envelope.request {
            // The value is personal data: record its keyed hash only.
            if let Ok(key) = keys::subject_key(&self.state_dir) {
                let hash = hex::encode(&subject_hash(&key, value)[..8]);
                query.push_str(&format!(" [value hmac {hash}]"));
            }
        }
        let (principal, granted, reason) = match &decision {
            Ok(principal) => (principal.clone(), true, None),
            Err((principal, message)) => (principal.clone(), false, Some(message.clone())),
        };
        if !granted {
            warn!(uid, pid, %query, "audit socket: refused");
        }
        // Refusals are recorded once per uid and period whatever the
        // command, so that a local user cannot flood the chain with them.
        let dedup = if granted {
            (pid, query.clone())
        } else {
            (u32::MAX, String::new())
        };
        if self.first_time(uid, dedup.0, &dedup.1) {
            let event = AuditEvent::AuditorAccess(AuditorAccess {
                uid,
                pid,
                principal,
                query: query.clone(),
                granted,
                reason,
            });
            if let Err(e) = self.recorder.record(event).durable().await {
                self.forget(uid, dedup.0, &dedup.1);
                warn!(uid, "auditor access not recorded, refusing it: {e}");
                return Err(format!(
                    "the gateway could not record this access, so it is refused: {e}"
                ));
            }
        }
        decision.map(|_| ()).map_err(|(_, message)| message)
    }

    /// True when (uid, pid, query) was not recorded within [`ACCESS_DEDUP`];
    /// marks it recorded.
    fn first_time(&self, uid: u32, pid: u32, query: &str) -> bool {
        let mut recorded = lock(&self.recorded);
        let now = Instant::now();
        if recorded.len() >= ACCESS_MEMORY {
            recorded.retain(|_, at| now.duration_since(*at) < ACCESS_DEDUP);
            if recorded.len() >= ACCESS_MEMORY {
                // Still full: forgetting only costs extra records.
                recorded.clear();
            }
        }
        let key = (uid, pid, query.to_owned());
        match recorded.get(&key) {
            Some(at) if now.duration_since(*at) < ACCESS_DEDUP => false,
            _ => {
                recorded.insert(key, now);
                true
            }
        }
    }

    fn forget(&self, uid: u32, pid: u32, query: &str) {
        let mut recorded = lock(&self.recorded);
        recorded.remove(&(uid, pid, query.to_owned()));
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
            Request::SubjectValue { value } => {
                let state_dir = self.state_dir.clone();
                blocking(move || {
                    let key = keys::subject_key(&state_dir)?;
                    store.subject_hits(&subject_hash(&key, &value))
                })
                .await
            }
            Request::PublicKey => {
                let state_dir = self.state_dir.clone();
                blocking(move || keys::public_key(&state_dir).map(|k| hex::encode(k.to_bytes())))
                    .await
            }
            Request::Checkpoint => ok_line(self.recorder.checkpoint().await),
            Request::Purge { as_of_us } => {
                let as_of = SystemTime::UNIX_EPOCH + Duration::from_micros(as_of_us);
                ok_line(self.recorder.purge(self.retention.clone(), as_of).await)
            }
            Request::SessionStart { session } => {
                blocking(move || store.session_start(&session)).await
            }
            Request::SeqBounds { since_us, until_us } => {
                blocking(move || store.seq_bounds(since_us, until_us)).await
            }
            Request::TimeIndex => blocking(move || store.time_index()).await,
            Request::RebuildTimeIndex => blocking(move || store.rebuild_time_index()).await,
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
    let mut line = serde_json::to_vec(&Response::<()>::Error(message))
        .unwrap_or_else(|e| format!("{{\"error\":\"encoding the answer: {e}\"}}").into_bytes());
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{IdentityError, IdentityFuture, PrincipalKind};

    /// A fixed uid -> principal table, as a login would leave it.
    struct Bound(Vec<(u32, Vec<&'static str>)>);

    impl IdentityProvider for Bound {
        fn principal_for_uid(&self, uid: u32) -> IdentityFuture<'_, Option<Principal>> {
            let found = self
                .0
                .iter()
                .find(|(u, _)| *u == uid)
                .map(|(_, roles)| Principal {
                    subject: format!("iss#{uid}"),
                    name: format!("user{uid}@example.test"),
                    kind: PrincipalKind::Person,
                    roles: roles.iter().map(|r| r.to_string()).collect(),
                });
            Box::pin(async move { found })
        }
        fn verify_token<'a>(
            &'a self,
            _: &'a str,
        ) -> IdentityFuture<'a, Result<crate::identity::TokenIdentity, IdentityError>> {
            Box::pin(async { Err(IdentityError::Rejected("no".into())) })
        }
    }

    #[tokio::test]
    async fn root_and_role_members_only() {
        let ids = Bound(vec![(1000, vec!["auditors"]), (1001, vec!["engineers"])]);
        let ids = SignIn::Ready(&ids);
        assert_eq!(
            authorize(0, SignIn::NotConfigured, "auditors")
                .await
                .unwrap(),
            None
        );
        let p = authorize(1000, ids, "auditors").await.unwrap().unwrap();
        assert_eq!(p.name, "user1000@example.test");
        let (who, message) = authorize(1001, ids, "auditors").await.unwrap_err();
        assert!(who.is_some());
        assert!(message.contains("lacks the `auditors` role"), "{message}");
        assert!(message.contains("portcullis login"), "{message}");
        let (who, message) = authorize(1002, ids, "auditors").await.unwrap_err();
        assert!(who.is_none());
        assert!(message.contains("not signed in"), "{message}");
        // The role name is configurable.
        assert!(authorize(1001, ids, "engineers").await.is_ok());
        let (_, message) = authorize(1000, SignIn::NotConfigured, "auditors")
            .await
            .unwrap_err();
        assert!(message.contains("no [identity] section"), "{message}");
        let (_, message) = authorize(1000, SignIn::Starting, "auditors")
            .await
            .unwrap_err();
        assert!(message.contains("still starting"), "{message}");
    }
}
