//! The CLI side of the control socket.

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use super::{ControlError, Request, Response, MAX_REQUEST_BYTES};

/// How long the daemon may take to answer (a login waits for the audit
/// record to be durable).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends one request to the daemon at `path` and returns its answer.
pub fn request(path: &Path, request: &Request) -> Result<Response, ControlError> {
    let at = || path.display().to_string();
    let mut stream =
        UnixStream::connect(path).map_err(|error| ControlError::Connect { path: at(), error })?;
    let io = |error| ControlError::Io { path: at(), error };
    stream
        .set_read_timeout(Some(RESPONSE_TIMEOUT))
        .map_err(io)?;
    let mut line =
        serde_json::to_vec(request).map_err(|e| ControlError::Protocol(e.to_string()))?;
    if line.len() > MAX_REQUEST_BYTES {
        return Err(ControlError::Protocol(format!(
            "request larger than {MAX_REQUEST_BYTES} bytes"
        )));
    }
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(stream.take(MAX_REQUEST_BYTES as u64))
        .read_line(&mut answer)
        .map_err(io)?;
    serde_json::from_str(&answer)
        .map_err(|e| ControlError::Protocol(format!("daemon answered {answer:?}: {e}")))
}
