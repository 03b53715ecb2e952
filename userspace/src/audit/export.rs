//! Export for a fleet: the chain as JSON lines, one record per line with
//! its seq and hashes, to a file or a Unix socket that a log shipper
//! (Vector, Fluent Bit) reads. Resumable from any seq; a line may repeat
//! after a reconnect (at-least-once), so the central store deduplicates by
//! `seq` and `hash`. See docs/audit.md.

use std::{
    fs::{File, OpenOptions},
    io::Write,
    os::unix::{fs::FileExt, net::UnixStream},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use serde::Serialize;
use serde_json::value::RawValue;
use tracing::warn;

use super::{
    record::Record,
    source::{for_each_record, AuditSource, LocalSource},
    store::Store,
    AuditError,
};
use crate::proxy::Shutdown;

/// How often `--follow` looks for new records.
const POLL: Duration = Duration::from_millis(500);

/// Where exported lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    File(PathBuf),
    /// A listening Unix stream socket (Vector `socket` source, mode unix).
    Unix(PathBuf),
}

impl std::str::FromStr for Target {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.strip_prefix("unix:") {
            Some("") => {
                Err("unix: needs a socket path, e.g. unix:/run/vector/portcullis.sock".into())
            }
            Some(path) => Ok(Self::Unix(path.into())),
            None if text.is_empty() => Err("export target is empty".into()),
            None => Ok(Self::File(text.into())),
        }
    }
}

/// One exported line.
#[derive(Serialize)]
struct Line<'a> {
    seq: u64,
    at: String,
    at_us: u64,
    prev: String,
    hash: String,
    payload_hash: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    purged_by: Option<u64>,
}

pub fn line(record: &Record) -> Result<Vec<u8>, AuditError> {
    let mut out = serde_json::to_vec(&Line {
        seq: record.seq,
        at: super::query::format_time(record.at_us),
        at_us: record.at_us,
        prev: hex::encode(record.prev),
        hash: hex::encode(record.hash),
        payload_hash: hex::encode(record.payload_hash),
        event: record.payload.as_deref(),
        purged_by: record.purged_by,
    })?;
    out.push(b'\n');
    Ok(out)
}

/// Where to resume a file export: after the seq of the last line that is
/// a record. Read from the file's end, so that the daemon's start does not
/// grow with the file; lines that are not records (a write cut short) are
/// passed over.
pub fn resume_point(target: &Target) -> u64 {
    let Target::File(path) = target else { return 1 };
    let Ok(file) = File::open(path) else {
        return 1;
    };
    last_exported_seq(&file).map_or(1, |seq| seq.saturating_add(1))
}

/// The seq of the last line of `file` that is an exported record.
fn last_exported_seq(file: &File) -> Option<u64> {
    let len = file.metadata().ok()?.len();
    let mut window: u64 = 64 * 1024;
    loop {
        let start = len.saturating_sub(window);
        let mut bytes = vec![0; usize::try_from(len - start).ok()?];
        file.read_exact_at(&mut bytes, start).ok()?;
        // The window's first piece may be the end of a longer line.
        let whole = match start {
            0 => 0,
            _ => memchr::memchr(b'\n', &bytes).map_or(bytes.len(), |at| at + 1),
        };
        let seq = bytes[whole..].rsplit(|&b| b == b'\n').find_map(|line| {
            serde_json::from_slice::<serde_json::Value>(line).ok()?["seq"].as_u64()
        });
        if seq.is_some() || start == 0 {
            return seq;
        }
        window = window.saturating_mul(4);
    }
}

/// Opens an export file for appending, on a line of its own: a write cut
/// short (a crash, a full disk) leaves part of a line, which the record
/// written again after it must not continue.
fn open_for_append(path: &Path) -> std::io::Result<File> {
    let mut file = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)?;
    let len = file.metadata()?.len();
    if len > 0 {
        let mut last = [0];
        file.read_exact_at(&mut last, len - 1)?;
        if last != *b"\n" {
            file.write_all(b"\n")?;
        }
    }
    Ok(file)
}

/// Writes records from `from` on; with `follow`, keeps polling until
/// `stop` is set. Returns the next seq to export.
pub fn export(
    source: &dyn AuditSource,
    target: &Target,
    mut from: u64,
    follow: bool,
    stop: &AtomicBool,
) -> Result<u64, AuditError> {
    loop {
        match write_from(source, target, from) {
            Ok(next) => from = next,
            Err(e) if follow => {
                warn!("audit export to {target:?}: {e}; retrying");
            }
            Err(e) => return Err(e),
        }
        if !follow || stop.load(Ordering::Relaxed) {
            return Ok(from);
        }
        std::thread::sleep(POLL);
        if stop.load(Ordering::Relaxed) {
            return Ok(from);
        }
    }
}

fn write_from(source: &dyn AuditSource, target: &Target, from: u64) -> Result<u64, AuditError> {
    let mut next = from;
    let mut out: Box<dyn Write> = match target {
        Target::File(path) => Box::new(open_for_append(path).map_err(|source| AuditError::Io {
            path: path.clone(),
            source,
        })?),
        Target::Unix(path) => {
            Box::new(UnixStream::connect(path).map_err(|source| AuditError::Io {
                path: path.clone(),
                source,
            })?)
        }
    };
    let path = match target {
        Target::File(p) | Target::Unix(p) => p.clone(),
    };
    let mut failure = None;
    for_each_record(source, from, |entry| {
        let written = Record::decode(entry.value.as_bytes())
            .map_err(AuditError::from)
            .and_then(|r| line(&r))
            .and_then(|l| {
                out.write_all(&l).map_err(|source| AuditError::Io {
                    path: path.clone(),
                    source,
                })
            });
        match written {
            Ok(()) => {
                next = entry.key.saturating_add(1);
                true
            }
            Err(e) => {
                failure = Some(e);
                false
            }
        }
    })?;
    out.flush().map_err(|source| AuditError::Io {
        path: path.clone(),
        source,
    })?;
    match failure {
        Some(e) => Err(e),
        None => Ok(next),
    }
}

/// The daemon's exporter (`[audit] export`), on its own thread.
pub fn spawn_in_daemon(
    store: Store,
    target: &str,
    mut shutdown: Shutdown,
) -> Result<tokio::task::JoinHandle<()>, AuditError> {
    let target: Target = target
        .parse()
        .map_err(|e: String| AuditError::Daemon(format!("[audit] export: {e}")))?;
    let from = resume_point(&target);
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let worker = std::thread::Builder::new()
        .name("audit-export".into())
        .spawn(move || {
            let source = LocalSource::new(store);
            if let Err(e) = export(&source, &target, from, true, &flag) {
                warn!("audit export stopped: {e}");
            }
        })
        .map_err(|e| AuditError::Daemon(format!("cannot start the audit exporter: {e}")))?;
    Ok(tokio::spawn(async move {
        shutdown.requested().await;
        stop.store(true, Ordering::Relaxed);
        let _ = tokio::task::spawn_blocking(move || worker.join()).await;
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exported(seq: u64, filler: usize) -> String {
        format!("{{\"seq\":{seq},\"filler\":\"{}\"}}\n", "x".repeat(filler))
    }

    #[test]
    fn an_export_resumes_after_its_last_record_whatever_follows_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("export.jsonl");
        let target = Target::File(path.clone());
        assert_eq!(resume_point(&target), 1, "no file yet");
        std::fs::write(&path, "").unwrap();
        assert_eq!(resume_point(&target), 1, "an empty file");

        // Lines longer than the first window read from the end, a line
        // that is not UTF-8, and a write cut short.
        let mut text = exported(1, 10).into_bytes();
        text.extend_from_slice(b"\xff\xfe not a record\n");
        text.extend_from_slice(exported(2, 300_000).as_bytes());
        text.extend_from_slice(exported(3, 100_000).as_bytes());
        text.extend_from_slice(br#"{"seq":4,"fill"#);
        std::fs::write(&path, &text).unwrap();
        assert_eq!(resume_point(&target), 4);

        // The record written again starts a line of its own.
        let mut file = open_for_append(&path).unwrap();
        file.write_all(exported(4, 10).as_bytes()).unwrap();
        drop(file);
        let written = std::fs::read(&path).unwrap();
        let records: Vec<u64> = written
            .split(|&b| b == b'\n')
            .filter_map(|l| serde_json::from_slice::<serde_json::Value>(l).ok())
            .filter_map(|v| v["seq"].as_u64())
            .collect();
        assert_eq!(records, [1, 2, 3, 4]);
        assert_eq!(resume_point(&target), 5);
        // A file that ends a line is appended to as it is.
        let before = written.len();
        drop(open_for_append(&path).unwrap());
        assert_eq!(std::fs::metadata(&path).unwrap().len() as usize, before);
    }
}
