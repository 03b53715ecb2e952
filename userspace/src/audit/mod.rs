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
    path::Path,
    sync::Mutex,
    time::SystemTime,
};

use serde::Serialize;
use tokio::sync::oneshot;

mod event;

pub use event::{AuditEvent, SessionEnd, SessionStart};

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("writing audit record to {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("encoding audit record: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("the audit writer stopped before confirming the record")]
    WriterGone,
}

/// Where events go.
///
/// `record` takes the event in call order (so a session's events keep their
/// order) and returns at once; the [`Ack`] resolves when the event is durable.
/// Callers that must not proceed unrecorded (a session start) await it;
/// hot paths (per statement) may await it later or in batches, so group
/// commit can amortise the flush across sessions.
pub trait Recorder: Send + Sync {
    fn record(&self, event: AuditEvent) -> Ack;
}

/// Resolves once an event is durable, or with the reason it is not.
pub struct Ack(AckInner);

enum AckInner {
    Done(Option<Result<(), AuditError>>),
    Pending(oneshot::Receiver<Result<(), AuditError>>),
}

impl Ack {
    /// An event already durable (or already failed).
    pub fn done(result: Result<(), AuditError>) -> Self {
        Self(AckInner::Done(Some(result)))
    }

    /// An event a writer task will confirm through the sender.
    pub fn pending() -> (oneshot::Sender<Result<(), AuditError>>, Self) {
        let (tx, rx) = oneshot::channel();
        (tx, Self(AckInner::Pending(rx)))
    }

    /// Waits until the event is durable.
    pub async fn durable(self) -> Result<(), AuditError> {
        match self.0 {
            AckInner::Done(result) => result.unwrap_or(Ok(())),
            AckInner::Pending(rx) => rx.await.unwrap_or(Err(AuditError::WriterGone)),
        }
    }
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
    fn record(&self, event: AuditEvent) -> Ack {
        Ack::done(self.append(&event))
    }
}

impl JsonLinesRecorder {
    fn append(&self, event: &AuditEvent) -> Result<(), AuditError> {
        let line = Line {
            at: humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
            event,
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
