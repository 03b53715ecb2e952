//! The approvals socket: `portcullis approvals list|approve|deny` talks to
//! the daemon here.
//!
//! The approver is authenticated by the kernel, not by anything they send:
//! the socket's peer credentials (SO_PEERCRED) give their uid, and the
//! identity layer gives the principal bound to that uid. The socket is
//! world-connectable on purpose; what a caller may see and decide follows
//! from who they are. One JSON request per line, one JSON answer per line.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt},
    net::{UnixListener, UnixStream},
};
use tracing::warn;

use super::approval::{ApprovalStore, PendingApproval};
use crate::identity::{IdentityProvider, Principal};

/// File name of the socket in the state directory.
pub const SOCKET_NAME: &str = "approvals.sock";

/// Longest request line accepted.
const MAX_LINE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot reach the daemon at {path}: {source} (is `portcullis run` running with this config?)")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the daemon's answer was not understood: {0}")]
    Protocol(String),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum ControlRequest {
    List,
    Approve {
        id: String,
        /// Grant the rule for this long instead of approving one statement.
        window_secs: Option<u64>,
        reason: Option<String>,
    },
    Deny {
        id: String,
        reason: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ControlResponse {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<PendingApproval>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided: Option<PendingApproval>,
    /// Who the daemon took the caller for.
    #[serde(default)]
    pub you: String,
}

impl ControlResponse {
    fn error(you: String, error: String) -> Self {
        Self {
            ok: false,
            error: Some(error),
            pending: Vec::new(),
            decided: None,
            you,
        }
    }
}

/// Binds the socket (replacing a stale one), open to every local user.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let err = |source| ControlError::Bind {
        path: path.to_owned(),
        source,
    };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(err)?;
    Ok(listener)
}

/// Serves approvers until the listener fails.
pub async fn serve(
    listener: UnixListener,
    store: Arc<ApprovalStore>,
    identity: Arc<dyn IdentityProvider>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let (store, identity) = (Arc::clone(&store), Arc::clone(&identity));
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, store, identity).await {
                        warn!("approvals socket: {e}");
                    }
                });
            }
            Err(e) => {
                warn!("approvals socket accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn connection(
    stream: UnixStream,
    store: Arc<ApprovalStore>,
    identity: Arc<dyn IdentityProvider>,
) -> std::io::Result<()> {
    let uid = stream.peer_cred()?.uid();
    let principal = identity.principal_for_uid(uid).await;
    let (read, mut write) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(read).take(MAX_LINE as u64 + 1);
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let you = principal
            .as_ref()
            .map_or(String::new(), |p| p.subject.clone());
        let response = match (&principal, serde_json::from_str::<ControlRequest>(&line)) {
            (_, Err(e)) => ControlResponse::error(you, format!("bad request: {e}")),
            (None, _) => ControlResponse::error(
                you,
                format!("no identity is bound to uid {uid}: sign in with `portcullis login` first"),
            ),
            (Some(p), Ok(request)) => handle(&store, p, request, you),
        };
        let mut text = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
        text.push(b'\n');
        write.write_all(&text).await?;
        if line.len() > MAX_LINE {
            return Ok(());
        }
        lines.set_limit(MAX_LINE as u64 + 1);
    }
}

fn handle(
    store: &ApprovalStore,
    caller: &Principal,
    request: ControlRequest,
    you: String,
) -> ControlResponse {
    let result = match request {
        ControlRequest::List => {
            return ControlResponse {
                ok: true,
                error: None,
                pending: store.list(caller),
                decided: None,
                you,
            }
        }
        ControlRequest::Approve {
            id,
            window_secs,
            reason,
        } => store.decide(
            &id,
            caller,
            true,
            window_secs.map(Duration::from_secs),
            reason,
        ),
        ControlRequest::Deny { id, reason } => store.decide(&id, caller, false, None, Some(reason)),
    };
    match result {
        Ok(info) => ControlResponse {
            ok: true,
            error: None,
            pending: Vec::new(),
            decided: Some(info),
            you,
        },
        Err(e) => ControlResponse::error(you, e),
    }
}

/// Sends one request to the daemon's socket (blocking: for the CLI).
pub fn call(path: &Path, request: &ControlRequest) -> Result<ControlResponse, ControlError> {
    let connect = |source| ControlError::Connect {
        path: path.to_owned(),
        source,
    };
    let mut stream = std::os::unix::net::UnixStream::connect(path).map_err(connect)?;
    let mut text =
        serde_json::to_vec(request).map_err(|e| ControlError::Protocol(e.to_string()))?;
    text.push(b'\n');
    stream.write_all(&text).map_err(connect)?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(connect)?;
    serde_json::from_str(&line).map_err(|e| ControlError::Protocol(format!("{e}: {line:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        identity::UnixIdentity,
        policy::{
            approval::ApprovalRequest,
            engine::{ApprovalScope, Approvers},
        },
        testing::Collect,
    };

    #[tokio::test]
    async fn root_lists_and_decides_over_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SOCKET_NAME);
        let store = ApprovalStore::new(Arc::new(Collect::default()));
        let listener = bind(&path).unwrap();
        tokio::spawn(serve(listener, Arc::clone(&store), Arc::new(UnixIdentity)));
        let requester = crate::identity::Principal {
            subject: "unix:bob".into(),
            name: "bob".into(),
            kind: crate::identity::PrincipalKind::Person,
            roles: vec![],
        };
        let me = UnixIdentity.principal_for_uid(0).await.unwrap();
        let waiter = store.request(ApprovalRequest {
            session: "s",
            requester: &requester,
            resource: "pg",
            rule: "r",
            reason: "because",
            statement: "DROP TABLE t",
            approvers: &Approvers {
                roles: vec![],
                subjects: vec![me.subject.clone()],
            },
            timeout: Duration::from_secs(10),
            scope: ApprovalScope::Statement,
        });
        let id = waiter.info.id.clone();
        let p = path.clone();
        let listed = tokio::task::spawn_blocking(move || call(&p, &ControlRequest::List))
            .await
            .unwrap()
            .unwrap();
        assert!(listed.ok);
        assert_eq!(listed.you, me.subject);
        assert_eq!(listed.pending[0].id, id);
        let p = path.clone();
        let approve = ControlRequest::Approve {
            id: id.clone(),
            window_secs: Some(60),
            reason: None,
        };
        let refused = tokio::task::spawn_blocking(move || call(&p, &approve))
            .await
            .unwrap()
            .unwrap();
        assert!(!refused.ok);
        assert!(refused.error.unwrap().contains("this statement only"));
        let approve = ControlRequest::Approve {
            id,
            window_secs: None,
            reason: Some("ok".into()),
        };
        let done = tokio::task::spawn_blocking(move || call(&path, &approve))
            .await
            .unwrap()
            .unwrap();
        assert!(done.ok, "{:?}", done.error);
        assert!(matches!(
            waiter.outcome().await,
            crate::policy::ApprovalOutcome::Approved { .. }
        ));
    }
}
