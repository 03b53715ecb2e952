//! The daemon side of the control socket.

use std::{os::unix::fs::PermissionsExt, path::Path, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};
use tracing::{debug, warn};

use super::{ControlError, Request, Response, MAX_REQUEST_BYTES};
use crate::{identity::OidcIdentity, proxy::Shutdown};

/// A client must send its request within this time.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the control socket at `path`, world-connectable (0666): the uid
/// comes from the kernel, not from the client. The parent directory is
/// created 0755 if missing; a stale socket left by a crash is replaced, a
/// live one is not.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let io = |error| ControlError::Io {
        path: path.display().to_string(),
        error,
    };
    if let Some(parent) = path.parent() {
        if !parent.exists() {
            std::fs::create_dir_all(parent).map_err(io)?;
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755)).map_err(io)?;
        }
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(ControlError::InUse(path.display().to_string()));
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
            std::fs::remove_file(path).map_err(io)?;
        }
        Ok(_) => {
            return Err(io(std::io::Error::other(
                "exists and is not a socket; remove it or choose another control_socket",
            )))
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(io)?;
    Ok(listener)
}

/// Answers control requests until `shutdown` fires.
pub async fn serve(listener: UnixListener, identity: Arc<OidcIdentity>, mut shutdown: Shutdown) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!("control socket accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.requested() => return,
        };
        let identity = Arc::clone(&identity);
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &identity).await {
                debug!("control connection: {e}");
            }
        });
    }
}

async fn handle(stream: UnixStream, identity: &OidcIdentity) -> Result<(), std::io::Error> {
    // The kernel's word on who connected; nothing the client says matters.
    let uid = stream.peer_cred()?.uid();
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let read = tokio::time::timeout(
        REQUEST_TIMEOUT,
        BufReader::new(read)
            .take(MAX_REQUEST_BYTES as u64 + 1)
            .read_until(b'\n', &mut line),
    )
    .await;
    let response = match read {
        Err(_) => Response::Error {
            message: "no request within 10 seconds".into(),
        },
        Ok(Err(e)) => return Err(e),
        Ok(Ok(_)) if line.len() > MAX_REQUEST_BYTES => Response::Error {
            message: format!("request larger than {MAX_REQUEST_BYTES} bytes"),
        },
        Ok(Ok(_)) => match serde_json::from_slice::<Request>(&line) {
            Ok(request) => dispatch(request, uid, identity).await,
            Err(e) => Response::Error {
                message: format!("malformed request: {e}"),
            },
        },
    };
    let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

async fn dispatch(request: Request, uid: u32, identity: &OidcIdentity) -> Response {
    let result = match request {
        Request::LoginParams => Ok(Response::LoginParams(identity.login_params())),
        Request::Login(tokens) => identity.login(uid, tokens).await.map(Response::Bound),
        Request::Whoami => Ok(identity
            .whoami(uid)
            .map_or(Response::NotBound { uid }, Response::Bound)),
        Request::Logout => identity
            .logout(uid)
            .await
            .map(|info| info.map_or(Response::NotBound { uid }, Response::LoggedOut)),
    };
    result.unwrap_or_else(|e| Response::Error {
        message: e.to_string(),
    })
}
