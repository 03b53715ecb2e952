//! Where the auditor tools read from: the daemon over its auditor socket
//! while it runs (it owns the sled database: sled allows one process), or
//! the files directly when it does not (root only: the files are root's).
//!
//! Non-root auditors always go through the daemon, which checks their
//! role, records their access, and does what needs the root-only keys for
//! them (the public key, hashing a data subject's value).

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::SystemTime,
};

use ed25519_dalek::VerifyingKey;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::{
    keys::{self, Keys},
    record::{Checkpoint, Hash},
    retention::Retention,
    store::{CheckpointMeta, RawEntry, Store, SubjectHit, TimeIndex},
    subject::subject_hash,
    writer::{micros, CheckpointPolicy, PurgeSummary, SledRecorder},
    AuditError,
};

/// The daemon's socket for auditor requests, in the state directory unless
/// `[audit] socket` says otherwise.
pub const SOCKET_FILE: &str = "audit.sock";

/// Records per request page.
pub const PAGE: usize = 10_000;

/// Read access to a store, and the two writes auditors trigger.
pub trait AuditSource {
    fn raw_records(&self, from: u64, limit: usize) -> Result<Vec<RawEntry>, AuditError>;
    fn raw_checkpoints(&self) -> Result<Vec<RawEntry>, AuditError>;
    fn checkpoint_meta(&self) -> Result<Option<CheckpointMeta>, AuditError>;
    fn file_checkpoint(&self) -> Result<Option<Checkpoint>, AuditError>;
    fn subject_hits(&self, hash: &Hash) -> Result<Vec<SubjectHit>, AuditError>;
    /// Index entries for a personal value, hashed with the subject-index
    /// key (which only root and the daemon can read).
    fn subject_hits_for(&self, value: &str) -> Result<Vec<SubjectHit>, AuditError>;
    /// The host's checkpoint-signing public key.
    fn public_key(&self) -> Result<VerifyingKey, AuditError>;
    /// Signs a checkpoint over the current head (if it moved) and returns
    /// the latest one.
    fn checkpoint(&self) -> Result<Option<Checkpoint>, AuditError>;
    /// Purges payloads expired at `as_of_us` under the configured retention.
    fn purge(&self, as_of_us: u64) -> Result<PurgeSummary, AuditError>;
    /// Where `session`'s records begin, if the store knows
    /// ([`Store::session_start`]).
    fn session_start(&self, session: &str) -> Result<Option<u64>, AuditError>;
    /// The part of the chain that holds the records of `since_us` or
    /// later and earlier than `until_us` ([`Store::seq_bounds`]).
    fn seq_bounds(
        &self,
        since_us: Option<u64>,
        until_us: Option<u64>,
    ) -> Result<(u64, Option<u64>), AuditError>;
    /// The time index as stored ([`Store::time_index`]).
    fn time_index(&self) -> Result<TimeIndex, AuditError>;
    /// Builds the time index again from the chain; returns the records
    /// read ([`Store::rebuild_time_index`]).
    fn rebuild_time_index(&self) -> Result<u64, AuditError>;
}

/// Where to start reading for `session`'s records: its start when known,
/// else the chain's start (older stores, a daemon that does not answer
/// the question).
pub fn first_seq_of(source: &dyn AuditSource, session: &str) -> u64 {
    source.session_start(session).ok().flatten().unwrap_or(1)
}

/// The first and last seq to read for records of `since_us` or later and
/// earlier than `until_us`: the whole chain when the store cannot say (a
/// daemon that does not know the question).
pub fn seqs_between(
    source: &dyn AuditSource,
    since_us: Option<u64>,
    until_us: Option<u64>,
) -> (u64, Option<u64>) {
    if since_us.is_none() && until_us.is_none() {
        return (1, None);
    }
    source.seq_bounds(since_us, until_us).unwrap_or((1, None))
}

/// Calls `f` on every chain entry from `from` on, page by page, until it
/// returns false.
pub fn for_each_record(
    source: &dyn AuditSource,
    from: u64,
    mut f: impl FnMut(&RawEntry) -> bool,
) -> Result<(), AuditError> {
    let mut next = from;
    loop {
        let page = source.raw_records(next, PAGE)?;
        let Some(last) = page.last() else {
            return Ok(());
        };
        let last_key = last.key;
        for entry in &page {
            if !f(entry) {
                return Ok(());
            }
        }
        if page.len() < PAGE || last_key == u64::MAX {
            return Ok(());
        }
        next = last_key + 1;
    }
}

/// How the auditor tools reach a store.
#[derive(Debug, Clone)]
pub struct Access {
    /// The daemon's auditor socket.
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub retention: Retention,
    /// Root may fall back to the files when the daemon is not running.
    pub root: bool,
    /// The command being run, recorded by the daemon for non-root callers.
    pub query: String,
}

/// The daemon's socket when it answers, else (root only) the store files.
///
/// # Errors
/// For non-root callers, a daemon that cannot be reached, with what to do.
pub fn open(access: &Access) -> Result<Box<dyn AuditSource>, AuditError> {
    let daemon = || DaemonSource {
        socket: access.socket.clone(),
        query: Some(access.query.clone()),
    };
    match UnixStream::connect(&access.socket) {
        Ok(stream) => {
            drop(stream);
            return Ok(Box::new(daemon()));
        }
        Err(e) if !access.root => {
            return Err(AuditError::Daemon(format!(
            "cannot reach the gateway's auditor socket {}: {e}. Auditors other than root use the \
                 tools through the running daemon: check that it runs, and pass --socket (or set \
                 PORTCULLIS_AUDIT_SOCKET) if [audit] socket puts it elsewhere",
            access.socket.display()
        )))
        }
        Err(_) => {}
    }
    let store = Store::open_existing(&access.state_dir)?;
    // The daemon stopped without syncing the index (a crash): read what
    // it would find when it starts. A store too damaged for that is read
    // as it is, for `audit verify` to report on.
    if let Err(e) = store.reindex_tail() {
        tracing::warn!("records after the audit index's last entry not looked for: {e}");
    }
    Ok(Box::new(LocalSource {
        store,
        state_dir: access.state_dir.clone(),
        retention: access.retention.clone(),
    }))
}

/// A request on `audit.sock`: one JSON line; the answer is one JSON line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Records {
        from: u64,
        limit: usize,
    },
    Checkpoints,
    Meta,
    FileCheckpoint,
    Subject {
        hash: String,
    },
    /// Look up a value: the daemon hashes it with the subject-index key.
    SubjectValue {
        value: String,
    },
    PublicKey,
    Checkpoint,
    Purge {
        as_of_us: u64,
    },
    SessionStart {
        session: String,
    },
    SeqBounds {
        since_us: Option<u64>,
        until_us: Option<u64>,
    },
    TimeIndex,
    RebuildTimeIndex,
}

/// What goes on the wire: a request and the command it serves (recorded
/// by the daemon for non-root callers).
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope {
    #[serde(flatten)]
    pub request: Request,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
}

/// The answer to a [`Request`].
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response<T> {
    Ok(T),
    Error(String),
}

/// Asks the running daemon.
pub struct DaemonSource {
    socket: PathBuf,
    query: Option<String>,
}

impl DaemonSource {
    fn ask<T: DeserializeOwned>(&self, request: Request) -> Result<T, AuditError> {
        let io = |source| AuditError::Io {
            path: self.socket.clone(),
            source,
        };
        let mut stream = UnixStream::connect(&self.socket).map_err(io)?;
        // A purge of a large store takes a while; a hung daemon must not
        // hang the auditor for ever. A rebuild reads the whole chain and
        // ends when it has (the auditor can interrupt the wait).
        let timeout = match request {
            Request::RebuildTimeIndex => None,
            _ => Some(std::time::Duration::from_secs(300)),
        };
        stream.set_read_timeout(timeout).map_err(io)?;
        let mut line = serde_json::to_vec(&Envelope {
            request,
            query: self.query.clone(),
        })?;
        line.push(b'\n');
        stream.write_all(&line).map_err(io)?;
        let mut answer = String::new();
        BufReader::new(stream).read_line(&mut answer).map_err(io)?;
        if answer.is_empty() {
            return Err(AuditError::Daemon(
                "closed the connection without answering (see its log)".into(),
            ));
        }
        match serde_json::from_str::<Response<T>>(&answer)? {
            Response::Ok(value) => Ok(value),
            Response::Error(message) => Err(AuditError::Daemon(message)),
        }
    }
}

impl AuditSource for DaemonSource {
    fn raw_records(&self, from: u64, limit: usize) -> Result<Vec<RawEntry>, AuditError> {
        self.ask(Request::Records { from, limit })
    }
    fn raw_checkpoints(&self) -> Result<Vec<RawEntry>, AuditError> {
        self.ask(Request::Checkpoints)
    }
    fn checkpoint_meta(&self) -> Result<Option<CheckpointMeta>, AuditError> {
        self.ask(Request::Meta)
    }
    fn file_checkpoint(&self) -> Result<Option<Checkpoint>, AuditError> {
        self.ask(Request::FileCheckpoint)
    }
    fn subject_hits(&self, hash: &Hash) -> Result<Vec<SubjectHit>, AuditError> {
        self.ask(Request::Subject {
            hash: hex::encode(hash),
        })
    }
    fn subject_hits_for(&self, value: &str) -> Result<Vec<SubjectHit>, AuditError> {
        self.ask(Request::SubjectValue {
            value: value.to_owned(),
        })
    }
    fn public_key(&self) -> Result<VerifyingKey, AuditError> {
        let hex: String = self.ask(Request::PublicKey)?;
        keys::parse_public_key(&hex)
    }
    fn checkpoint(&self) -> Result<Option<Checkpoint>, AuditError> {
        self.ask(Request::Checkpoint)
    }
    fn purge(&self, as_of_us: u64) -> Result<PurgeSummary, AuditError> {
        self.ask(Request::Purge { as_of_us })
    }
    fn session_start(&self, session: &str) -> Result<Option<u64>, AuditError> {
        self.ask(Request::SessionStart {
            session: session.to_owned(),
        })
    }
    fn seq_bounds(
        &self,
        since_us: Option<u64>,
        until_us: Option<u64>,
    ) -> Result<(u64, Option<u64>), AuditError> {
        self.ask(Request::SeqBounds { since_us, until_us })
    }
    fn time_index(&self) -> Result<TimeIndex, AuditError> {
        self.ask(Request::TimeIndex)
    }
    fn rebuild_time_index(&self) -> Result<u64, AuditError> {
        self.ask(Request::RebuildTimeIndex)
    }
}

/// Reads the files directly (daemon stopped).
pub struct LocalSource {
    store: Store,
    state_dir: PathBuf,
    retention: Retention,
}

impl LocalSource {
    /// Reads an open store (the daemon's exporter); purges and checkpoints
    /// through it use the default retention.
    pub fn new(store: Store) -> Self {
        let state_dir = store
            .dir()
            .parent()
            .map_or_else(PathBuf::new, Path::to_path_buf);
        Self {
            store,
            state_dir,
            retention: crate::audit::AuditConfig::default().retention(),
        }
    }

    /// Runs `f` with a writer over the store, then closes it (which signs
    /// a final checkpoint).
    fn with_writer<T>(
        &self,
        f: impl FnOnce(&SledRecorder, &tokio::runtime::Runtime) -> Result<T, AuditError>,
    ) -> Result<T, AuditError> {
        let keys = Keys::load_or_create(&self.state_dir)?;
        let writer = SledRecorder::start(self.store.clone(), keys, CheckpointPolicy::default())?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(|source| AuditError::Io {
                path: self.state_dir.clone(),
                source,
            })?;
        let result = f(&writer, &runtime);
        writer.close()?;
        result
    }
}

impl AuditSource for LocalSource {
    fn raw_records(&self, from: u64, limit: usize) -> Result<Vec<RawEntry>, AuditError> {
        self.store.raw_records(from, limit)
    }
    fn raw_checkpoints(&self) -> Result<Vec<RawEntry>, AuditError> {
        self.store.raw_checkpoints()
    }
    fn checkpoint_meta(&self) -> Result<Option<CheckpointMeta>, AuditError> {
        self.store.checkpoint_meta()
    }
    fn file_checkpoint(&self) -> Result<Option<Checkpoint>, AuditError> {
        self.store.file_checkpoint()
    }
    fn subject_hits(&self, hash: &Hash) -> Result<Vec<SubjectHit>, AuditError> {
        self.store.subject_hits(hash)
    }
    fn subject_hits_for(&self, value: &str) -> Result<Vec<SubjectHit>, AuditError> {
        let key = keys::subject_key(&self.state_dir)?;
        self.store.subject_hits(&subject_hash(&key, value))
    }
    fn public_key(&self) -> Result<VerifyingKey, AuditError> {
        keys::public_key(&self.state_dir)
    }
    fn checkpoint(&self) -> Result<Option<Checkpoint>, AuditError> {
        self.with_writer(|w, rt| rt.block_on(w.checkpoint()))
    }
    fn purge(&self, as_of_us: u64) -> Result<PurgeSummary, AuditError> {
        let as_of = SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(as_of_us);
        self.with_writer(|w, rt| rt.block_on(w.purge(self.retention.clone(), as_of)))
    }
    fn session_start(&self, session: &str) -> Result<Option<u64>, AuditError> {
        self.store.session_start(session)
    }
    fn seq_bounds(
        &self,
        since_us: Option<u64>,
        until_us: Option<u64>,
    ) -> Result<(u64, Option<u64>), AuditError> {
        self.store.seq_bounds(since_us, until_us)
    }
    fn time_index(&self) -> Result<TimeIndex, AuditError> {
        self.store.time_index()
    }
    fn rebuild_time_index(&self) -> Result<u64, AuditError> {
        self.store.rebuild_time_index()
    }
}

/// Now, in the store's time unit.
pub fn now_us() -> u64 {
    micros(SystemTime::now())
}
