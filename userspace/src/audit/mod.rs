//! Recording: the one interface through which every part of the gateway
//! reports what happened, and its first sink.
//!
//! Callers build typed [`AuditEvent`]s and hand them to a [`Recorder`]; they
//! never format log lines. The tamper-evident store (sled, hash chain) will be
//! another `Recorder`; until then [`JsonLinesRecorder`] appends one JSON
//! object per line and flushes it before `record` returns.

use std::{
    fs::{File, OpenOptions},
    io::{BufWriter, Write},
    net::SocketAddr,
    path::Path,
    sync::Mutex,
    time::SystemTime,
};

use serde::Serialize;

use crate::{
    identity::Principal,
    kernel::{ConnectOrigin, KernelEvent},
};

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("writing audit record to {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("encoding audit record: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Everything the gateway records.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AuditEvent {
    /// The kernel redirected or blocked a connect() or sendto().
    Kernel(KernelEvent),
    SessionStart(SessionStart),
    SessionEnd(SessionEnd),
    /// A connection reached a listener without a kernel record.
    ConnectionRefused {
        listener: String,
        peer: SocketAddr,
        reason: String,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct SessionStart {
    pub session: String,
    pub listener: String,
    pub protocol: &'static str,
    pub peer: SocketAddr,
    /// Who is behind the session, when known at its start.
    pub principal: Option<Principal>,
    #[serde(flatten)]
    pub origin: ConnectOrigin,
}

#[derive(Debug, Clone, Serialize)]
pub struct SessionEnd {
    pub session: String,
    pub bytes_from_client: u64,
    pub bytes_from_server: u64,
    pub duration_ms: u64,
    /// Why the session ended abnormally, if it did.
    pub error: Option<String>,
}

/// Where events go. Implementations must have made the event durable (or
/// failed) by the time `record` returns.
pub trait Recorder: Send + Sync {
    fn record(&self, event: AuditEvent) -> Result<(), AuditError>;
}

/// Appends events as JSON lines to a file.
pub struct JsonLinesRecorder {
    path: String,
    file: Mutex<BufWriter<File>>,
}

#[derive(Serialize)]
struct Line<'a> {
    at: String,
    #[serde(flatten)]
    event: &'a AuditEvent,
}

impl JsonLinesRecorder {
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| AuditError::Write {
                path: path.display().to_string(),
                source,
            })?;
        Ok(Self {
            path: path.display().to_string(),
            file: Mutex::new(BufWriter::new(file)),
        })
    }
}

impl Recorder for JsonLinesRecorder {
    fn record(&self, event: AuditEvent) -> Result<(), AuditError> {
        let line = Line {
            at: humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
            event: &event,
        };
        let mut text = serde_json::to_vec(&line)?;
        text.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        file.write_all(&text)
            .and_then(|()| file.flush())
            .map_err(|source| AuditError::Write {
                path: self.path.clone(),
                source,
            })
    }
}
