//! The sled database under `<state_dir>/audit/`: the chain, the signed
//! checkpoints, the data-subject index and a little metadata, each its own
//! tree.
//!
//! sled 0.34.7 rather than the 1.0 alphas: 0.34 is the stable release with
//! a settled on-disk format; the alphas change both API and format, which an
//! evidence store that must stay readable for years cannot follow.
//!
//! sled makes nothing durable by itself, and its `flush` is not enough for
//! power loss: on Linux it ends with `sync_file_range`, which neither
//! flushes the drive's write cache nor the file's metadata, and it never
//! syncs blob files (values too large for a log segment). [`Store::sync`]
//! therefore follows `flush` with `fdatasync` on the log file and `fsync`
//! on new blob files and their directory; the writer confirms a batch only
//! after it.
//!
//! sled allows one process per database, so the daemon owns it; the CLI
//! asks the daemon over `audit.sock` and opens the files itself only when
//! the daemon is not running (see [`super::source`]).

use std::{
    collections::HashSet,
    ffi::OsString,
    fs::{DirBuilder, File},
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use serde::{Deserialize, Serialize};

use super::{
    record::{Checkpoint, Hash, Record},
    AuditError,
};

/// The copy of the last checkpoint kept outside sled: deleting checkpoints
/// inside the database then still leaves a trace.
pub const CHECKPOINT_FILE: &str = "last-checkpoint.json";

const META_CHECKPOINT: &[u8] = b"checkpoint";

/// Where the store lives under a state directory.
pub fn audit_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("audit")
}

/// One stored value with its key, undecoded: verification must see what
/// is on disk, including values that no longer decode.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RawEntry {
    pub key: u64,
    pub value: String,
}

/// The checkpoint number and seq, kept apart from the checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub number: u64,
    pub seq: u64,
}

/// A statement or session that touched a data subject.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubjectHit {
    pub session: Option<String>,
    pub statement_seq: Option<u64>,
    /// The chain record the value was found in (detection), or the chain
    /// head when an adapter reported it.
    pub seq: u64,
    pub at_us: u64,
    /// `detected` (found in a recorded event) or `reported` (by an adapter).
    pub source: String,
}

/// The open database.
#[derive(Clone)]
pub struct Store {
    pub(super) db: sled::Db,
    pub(super) chain: sled::Tree,
    pub(super) checkpoints: sled::Tree,
    pub(super) subjects: sled::Tree,
    pub(super) meta: sled::Tree,
    dir: PathBuf,
    /// sled's log file, for `fdatasync`.
    log: Arc<File>,
    /// Blob files already synced.
    synced_blobs: Arc<Mutex<HashSet<OsString>>>,
}

impl Store {
    /// Opens the store, creating it (directory mode 0700) if needed.
    pub fn open(state_dir: &Path) -> Result<Self, AuditError> {
        let dir = audit_dir(state_dir);
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| AuditError::Io {
                path: dir.clone(),
                source,
            })?;
        // An existing directory keeps its mode: tighten it.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(
            |source| AuditError::Io {
                path: dir.clone(),
                source,
            },
        )?;
        Self::open_dir(dir)
    }

    /// Opens an existing store; never creates one.
    pub fn open_existing(state_dir: &Path) -> Result<Self, AuditError> {
        let dir = audit_dir(state_dir);
        if !dir.join("chain").exists() {
            return Err(AuditError::NoStore(dir));
        }
        Self::open_dir(dir)
    }

    fn open_dir(dir: PathBuf) -> Result<Self, AuditError> {
        let db = sled::Config::new()
            .path(dir.join("chain"))
            // Durability comes from the writer's explicit flush per batch;
            // no background flusher racing it.
            .flush_every_ms(None)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock => {
                    AuditError::Locked(dir.clone())
                }
                sled::Error::Io(io) if io.to_string().contains("lock") => {
                    AuditError::Locked(dir.clone())
                }
                other => AuditError::Store(other),
            })?;
        let log_path = dir.join("chain").join("db");
        let log = File::open(&log_path).map_err(|source| AuditError::Io {
            path: log_path,
            source,
        })?;
        Ok(Self {
            log: Arc::new(log),
            synced_blobs: Arc::default(),
            chain: db.open_tree("chain")?,
            checkpoints: db.open_tree("checkpoints")?,
            subjects: db.open_tree("subjects")?,
            meta: db.open_tree("meta")?,
            db,
            dir,
        })
    }

    /// Applies chain and subject-index changes atomically (one sled
    /// transaction over both trees): after a crash the index never lacks
    /// entries for records that survived, nor names records that did not.
    pub(super) fn apply(
        &self,
        chain: sled::Batch,
        subjects: Option<sled::Batch>,
    ) -> Result<(), AuditError> {
        use sled::{transaction::TransactionError, Transactional};
        let Some(subjects) = subjects else {
            // The common case: a batch is atomic by itself, and a
            // transaction would halve group-commit throughput.
            return Ok(self.chain.apply_batch(chain)?);
        };
        (&self.chain, &self.subjects)
            .transaction(|(c, s)| {
                c.apply_batch(&chain)?;
                s.apply_batch(&subjects)?;
                Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                TransactionError::Storage(e) => AuditError::Store(e),
                TransactionError::Abort(()) => AuditError::Commit("transaction aborted".into()),
            })
    }

    /// Makes everything written so far durable, power loss included.
    pub fn sync(&self) -> Result<(), AuditError> {
        self.db.flush()?;
        let io = |path: PathBuf| move |source| AuditError::Io { path, source };
        self.log
            .sync_data()
            .map_err(io(self.dir.join("chain/db")))?;
        let blobs = self.dir.join("chain").join("blobs");
        let Ok(entries) = std::fs::read_dir(&blobs) else {
            return Ok(());
        };
        let mut synced = self.synced_blobs.lock().unwrap_or_else(|e| e.into_inner());
        let mut present = HashSet::new();
        let mut new = false;
        for entry in entries.flatten() {
            let name = entry.file_name();
            if !synced.contains(&name) {
                File::open(entry.path())
                    .and_then(|f| f.sync_all())
                    .map_err(io(entry.path()))?;
                new = true;
            }
            present.insert(name);
        }
        if new {
            File::open(&blobs)
                .and_then(|d| d.sync_all())
                .map_err(io(blobs.clone()))?;
        }
        *synced = present;
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Up to `limit` chain entries from `from` on, in key order.
    pub fn raw_records(&self, from: u64, limit: usize) -> Result<Vec<RawEntry>, AuditError> {
        raw(self.chain.range(from.to_be_bytes()..), limit)
    }

    pub fn raw_checkpoints(&self) -> Result<Vec<RawEntry>, AuditError> {
        raw(self.checkpoints.iter(), usize::MAX)
    }

    /// The last record, as the writer continues from it.
    pub fn head(&self) -> Result<Option<Record>, AuditError> {
        match self.chain.last()? {
            None => Ok(None),
            Some((key, value)) => Record::decode(&value).map(Some).map_err(|e| {
                AuditError::Corrupt(format!(
                    "the last chain record (key {}) does not decode: {e}",
                    key_u64(&key)
                ))
            }),
        }
    }

    pub fn record(&self, seq: u64) -> Result<Option<Record>, AuditError> {
        match self.chain.get(seq.to_be_bytes())? {
            None => Ok(None),
            Some(v) => Record::decode(&v)
                .map(Some)
                .map_err(|e| AuditError::Corrupt(format!("record {seq} does not decode: {e}"))),
        }
    }

    pub fn checkpoint_meta(&self) -> Result<Option<CheckpointMeta>, AuditError> {
        match self.meta.get(META_CHECKPOINT)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| AuditError::Corrupt(format!("checkpoint metadata: {e}"))),
        }
    }

    /// The copy of the last checkpoint in [`CHECKPOINT_FILE`].
    pub fn file_checkpoint(&self) -> Result<Option<Checkpoint>, AuditError> {
        let path = self.dir.join(CHECKPOINT_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| AuditError::Corrupt(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(AuditError::Io { path, source }),
        }
    }

    /// Index entries for one keyed hash.
    pub fn subject_hits(&self, hash: &Hash) -> Result<Vec<SubjectHit>, AuditError> {
        let mut hits = Vec::new();
        for item in self.subjects.scan_prefix(hash) {
            let (_, value) = item?;
            if let Ok(hit) = serde_json::from_slice(&value) {
                hits.push(hit);
            }
        }
        Ok(hits)
    }

    /// Records a signed checkpoint: tree, metadata, flush, then the file.
    pub(super) fn store_checkpoint(&self, cp: &Checkpoint) -> Result<(), AuditError> {
        let json = serde_json::to_vec(cp)?;
        self.checkpoints
            .insert(cp.number.to_be_bytes(), json.clone())?;
        let meta = CheckpointMeta {
            number: cp.number,
            seq: cp.seq,
        };
        self.meta
            .insert(META_CHECKPOINT, serde_json::to_vec(&meta)?)?;
        self.sync()?;
        let path = self.dir.join(CHECKPOINT_FILE);
        let tmp = self.dir.join(format!("{CHECKPOINT_FILE}.tmp"));
        let io = |source| AuditError::Io {
            path: path.clone(),
            source,
        };
        std::fs::write(&tmp, &json).map_err(io)?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io)
    }

    /// The last checkpoint in the tree.
    pub fn last_checkpoint(&self) -> Result<Option<Checkpoint>, AuditError> {
        match self.checkpoints.last()? {
            None => Ok(None),
            Some((_, v)) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| AuditError::Corrupt(format!("last checkpoint: {e}"))),
        }
    }
}

fn raw(
    iter: impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>,
    limit: usize,
) -> Result<Vec<RawEntry>, AuditError> {
    let mut out = Vec::new();
    for item in iter.take(limit) {
        let (key, value) = item?;
        out.push(RawEntry {
            key: key_u64(&key),
            value: String::from_utf8_lossy(&value).into_owned(),
        });
    }
    Ok(out)
}

/// A big-endian u64 key; malformed keys (only by tampering) map to
/// u64::MAX so that verification reports them.
pub(super) fn key_u64(key: &[u8]) -> u64 {
    key.try_into().map_or(u64::MAX, u64::from_be_bytes)
}
