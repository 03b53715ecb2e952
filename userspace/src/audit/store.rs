//! The audit store under `<state_dir>/audit/`: a sled database with the
//! chain's index, the signed checkpoints, the data-subject index and a
//! little metadata, each its own tree, and the segment files that hold the
//! chain's records.
//!
//! The chain tree maps each block's first seq to where the block is (see
//! [`super::block`] and [`super::segment`]); the reads here
//! ([`Store::record`], [`Store::head`], [`Store::raw_records`],
//! [`Store::lines`]) turn blocks back into records at their positions.
//! Stores written before segments hold the blocks themselves in the tree;
//! they read unchanged.
//!
//! sled 0.34.7 rather than the 1.0 alphas: 0.34 is the stable release with
//! a settled on-disk format; the alphas change both API and format, which an
//! evidence store that must stay readable for years cannot follow.
//!
//! sled makes nothing durable by itself, and its `flush` is not enough for
//! power loss: on Linux it ends with `sync_file_range`, which neither
//! flushes the drive's write cache nor the file's metadata, and it never
//! syncs blob files (log items too large for a segment). [`Store::sync`]
//! therefore follows `flush` with `fdatasync` on the log file and `fsync`
//! on new blob files and their directory. `sync` lists the blob directory
//! only when its modification time says it may have changed.
//!
//! The writer confirms a batch once its blocks are durable in the
//! segments, and syncs sled about once a second; what a crash takes from
//! the index, opening finds again in the segments ([`Store::reindex_tail`],
//! in `tail.rs`).
//!
//! sled allows one process per database, so the daemon owns it; the CLI
//! asks the daemon over `audit.sock` and opens the files itself only when
//! the daemon is not running (see [`super::source`]).

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    ffi::OsString,
    fs::{DirBuilder, File},
    ops::Range,
    os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};

use super::{
    block,
    record::{Checkpoint, Hash, Record},
    retention::Settled,
    segment::{Extent, Segments},
    AuditError,
};
use crate::lock;

/// The copy of the last checkpoint kept outside sled: deleting checkpoints
/// inside the database then still leaves a trace.
pub const CHECKPOINT_FILE: &str = "last-checkpoint.json";

const META_CHECKPOINT: &[u8] = b"checkpoint";
/// Where purges have settled the chain ([`Settled`]).
const META_PURGE_SETTLED: &[u8] = b"purge_settled";

/// What a commit names in the chain tree: each block's first seq and where
/// the block is (in stores written before segments, the block itself).
#[derive(Default)]
pub(super) struct ChainEntries(Vec<(u64, Vec<u8>)>);

impl ChainEntries {
    pub(super) fn insert(&mut self, first: u64, value: Vec<u8>) {
        self.0.push((first, value));
    }

    pub(super) fn insert_extent(&mut self, first: u64, extent: Extent) {
        self.insert(first, extent.encode().to_vec());
    }

    fn batch(&self) -> sled::Batch {
        let mut batch = sled::Batch::default();
        for (first, value) in &self.0 {
            batch.insert(&first.to_be_bytes(), value.as_slice());
        }
        batch
    }
}

/// Where the store lives under a state directory.
pub fn audit_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("audit")
}

/// One stored record (a chain block's line) or checkpoint with its
/// position, undecoded: verification must see what is on disk, including
/// values that no longer decode.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RawEntry {
    /// For a record, its block's key plus its line index.
    pub key: u64,
    pub value: String,
    /// The stored bytes were not UTF-8 (only tampering does that); `value`
    /// is then a lossy copy.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub not_utf8: bool,
}

impl RawEntry {
    fn new(key: u64, bytes: &[u8]) -> Self {
        match std::str::from_utf8(bytes) {
            Ok(text) => Self {
                key,
                value: text.to_owned(),
                not_utf8: false,
            },
            Err(_) => Self {
                key,
                value: String::from_utf8_lossy(bytes).into_owned(),
                not_utf8: true,
            },
        }
    }
}

/// One record line of the chain, at its position.
pub struct Line {
    /// The block's key plus the line's index in it.
    pub key: u64,
    block: Arc<Vec<u8>>,
    range: Range<usize>,
}

impl Line {
    pub fn bytes(&self) -> &[u8] {
        &self.block[self.range.clone()]
    }
}

/// The chain's record lines in order, from a position on.
pub struct Lines {
    blocks: sled::Iter,
    segments: Arc<Segments>,
    from: u64,
    /// The block being split: its key, bytes, next line's index and offset.
    current: Option<(u64, Arc<Vec<u8>>, u64, usize)>,
}

impl Iterator for Lines {
    type Item = Result<Line, AuditError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some((key, block, index, offset)) = &mut self.current {
                if *offset <= block.len() {
                    let rest = &block[*offset..];
                    let len = memchr::memchr(b'\n', rest).unwrap_or(rest.len());
                    let range = *offset..*offset + len;
                    let line_key = key.saturating_add(*index);
                    // Past the end: the last line has no separator after it.
                    *offset += len + 1;
                    *index += 1;
                    if line_key < self.from {
                        continue;
                    }
                    return Some(Ok(Line {
                        key: line_key,
                        block: Arc::clone(block),
                        range,
                    }));
                }
            }
            let _pinned = self.segments.pin();
            let block = self
                .blocks
                .next()?
                .map_err(AuditError::from)
                .and_then(|(key, value)| Ok((key_u64(&key), load(&self.segments, &value)?)));
            match block {
                Ok((key, bytes)) => self.current = Some((key, bytes, 0, 0)),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// A block as stored: its key, its bytes and, unless it is stored inline
/// (stores written before segments), where they are.
pub(super) struct Block {
    pub key: u64,
    pub bytes: Arc<Vec<u8>>,
    pub extent: Option<Extent>,
}

/// A chain value's block bytes: read from its segment, or the value itself.
fn load(segments: &Segments, value: &[u8]) -> Result<Arc<Vec<u8>>, AuditError> {
    // Shared as read: an `Arc<[u8]>` would copy every block once more.
    match Extent::decode(value) {
        Some(extent) => Ok(Arc::new(segments.read(extent)?)),
        None => Ok(Arc::new(value.to_vec())),
    }
}

/// What the last look at the blob directory found.
#[derive(Default)]
struct BlobScan {
    /// Blob files already synced.
    synced: HashSet<OsString>,
    /// The directory's inode and modification time when it was listed, if
    /// that time was old enough to trust (see [`Store::sync_blobs`]).
    settled: Option<(u64, SystemTime)>,
}

/// How much older than the listing a directory's modification time must
/// be for an unchanged time to prove an unchanged directory. File systems
/// stamp times from a coarse clock (a few milliseconds): a file created
/// in the same tick after the listing would leave the time unchanged.
const MTIME_SETTLED: Duration = Duration::from_secs(1);

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
    pub source: HitSource,
}

/// Where a subject hit's value was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HitSource {
    /// In a statement's text or parameters, hashed before it was recorded.
    Statement,
    /// In a recorded event, by the writer's scan.
    Detected,
    /// A result value an adapter masked.
    Masked,
    /// A value an adapter reported.
    Reported,
}

impl HitSource {
    /// As stored and shown.
    pub fn name(self) -> &'static str {
        match self {
            HitSource::Statement => "statement",
            HitSource::Detected => "detected",
            HitSource::Masked => "masked",
            HitSource::Reported => "reported",
        }
    }
}

impl SubjectHit {
    /// Whether `seq` is the record the value was found in, not just the
    /// chain's head when an adapter reported it.
    pub(super) fn found_in_record(&self) -> bool {
        matches!(self.source, HitSource::Statement | HitSource::Detected)
    }
}

/// The open database.
#[derive(Clone)]
pub struct Store {
    pub(super) db: sled::Db,
    pub(super) chain: sled::Tree,
    pub(super) checkpoints: sled::Tree,
    pub(super) subjects: sled::Tree,
    /// Session id to the seq of its start: where a replay begins to read.
    sessions: sled::Tree,
    /// Where times begin in the chain (`times.rs`).
    times: sled::Tree,
    /// Held while the time index is written or cleared, so that a clear
    /// does not interleave with an indexer's batch.
    indexing: Arc<Mutex<()>>,
    pub(super) meta: sled::Tree,
    segments: Arc<Segments>,
    dir: PathBuf,
    /// sled's log file, for `fdatasync`.
    log: Arc<File>,
    blobs: Arc<Mutex<BlobScan>>,
}

/// How long opening waits for a lock that a closed store may still hold.
const LOCK_RELEASE_WAIT: Duration = Duration::from_secs(2);

fn open_sled(dir: &Path) -> Result<sled::Db, AuditError> {
    sled::Config::new()
        .path(dir.join("chain"))
        // Durability comes from the writer's explicit syncs (see
        // `Writer::write`); no background flusher racing them.
        .flush_every_ms(None)
        .open()
        .map_err(|e| match e {
            sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock => {
                AuditError::Locked(dir.to_owned())
            }
            sled::Error::Io(io) if io.to_string().contains("lock") => {
                AuditError::Locked(dir.to_owned())
            }
            other => AuditError::Store(other),
        })
}

/// A segment before the active one is compacted once its blocks fill
/// less than a quarter of its file (see [`Store::compact`]).
const COMPACT_BELOW: u64 = 4;

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
        // sled lets go of its lock from its own threads once the last
        // handle is gone: a store closed a moment ago may still be locked.
        let deadline = Instant::now() + LOCK_RELEASE_WAIT;
        let db = loop {
            match open_sled(&dir) {
                Err(AuditError::Locked(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                opened => break opened?,
            }
        };
        let log_path = dir.join("chain").join("db");
        let log = File::open(&log_path).map_err(|source| AuditError::Io {
            path: log_path,
            source,
        })?;
        Ok(Self {
            log: Arc::new(log),
            blobs: Arc::default(),
            segments: Arc::new(Segments::open(&dir)),
            chain: db.open_tree("chain")?,
            checkpoints: db.open_tree("checkpoints")?,
            subjects: db.open_tree("subjects")?,
            sessions: db.open_tree("sessions")?,
            times: db.open_tree("times")?,
            indexing: Arc::default(),
            meta: db.open_tree("meta")?,
            db,
            dir,
        })
    }

    /// Appends blocks to the segment files and makes them durable, then
    /// adds their extents to `chain`, for [`Store::apply`].
    pub(super) fn append_blocks(
        &self,
        blocks: &[(u64, Vec<u8>)],
        chain: &mut ChainEntries,
    ) -> Result<(), AuditError> {
        let extents = self
            .segments
            .append(blocks.iter().map(|(_, bytes)| bytes.as_slice()))?;
        self.segments.sync()?;
        for ((first, _), extent) in blocks.iter().zip(extents) {
            chain.insert_extent(*first, extent);
        }
        Ok(())
    }

    /// Leaves the segment files without the zeros written ahead of their
    /// blocks, at a clean shutdown.
    pub(super) fn close_segments(&self) -> Result<(), AuditError> {
        self.segments.close()
    }

    /// Frees the bytes of blocks that a committed purge replaced, then
    /// compacts the segments purges have mostly emptied. Returns how many
    /// segment files were deleted.
    pub(super) fn release(&self, extents: &[Extent]) -> Result<usize, AuditError> {
        self.segments.release(extents)?;
        self.compact()
    }

    /// Every segment before the active one whose blocks fill less than
    /// 1/[`COMPACT_BELOW`] of its file: its blocks are appended again (the
    /// same bytes, so the chain is unchanged), made durable, named by the
    /// chain in their new place, and only then is the file deleted. A
    /// crash in between leaves a copy nothing names, or an old file the
    /// next compaction deletes. One segment at a time, so memory stays
    /// within a quarter of a segment.
    fn compact(&self) -> Result<usize, AuditError> {
        let Some(active) = self.segments.active_number() else {
            return Ok(0);
        };
        let mut blocks: BTreeMap<u32, Vec<(u64, Extent)>> = BTreeMap::new();
        // A key that is not a seq (tampering) is left for verify to report:
        // its segment is not touched.
        let mut untouchable = BTreeSet::new();
        for item in self.chain.iter() {
            let (key, value) = item?;
            if let Some(extent) = Extent::decode(&value).filter(|e| e.segment < active) {
                if key.len() != 8 {
                    untouchable.insert(extent.segment);
                }
                blocks
                    .entry(extent.segment)
                    .or_default()
                    .push((key_u64(&key), extent));
            }
        }
        let mut removed = 0;
        for segment in self.segments.numbers()?.range(..active) {
            if untouchable.contains(segment) {
                continue;
            }
            let blocks = blocks.remove(segment).unwrap_or_default();
            let used: u64 = blocks.iter().map(|(_, e)| u64::from(e.len)).sum();
            if used * COMPACT_BELOW >= self.segments.file_len(*segment)? {
                continue;
            }
            if !blocks.is_empty() {
                let mut moved = Vec::with_capacity(blocks.len());
                for (key, extent) in blocks {
                    moved.push((key, self.segments.read(extent)?));
                }
                let mut chain = ChainEntries::default();
                self.append_blocks(&moved, &mut chain)?;
                self.apply(chain, None)?;
                self.sync()?;
            }
            self.segments.remove(*segment)?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Applies chain and subject-index changes atomically (one sled
    /// transaction over both trees): a purge's rewritten blocks and the
    /// subject entries it removes survive a crash together or not at all.
    pub(super) fn apply(
        &self,
        chain: ChainEntries,
        subjects: Option<sled::Batch>,
    ) -> Result<(), AuditError> {
        use sled::{transaction::TransactionError, Transactional};
        let Some(subjects) = subjects else {
            // One insert per block, in seq order, not a batch: a batch
            // first writes a manifest to sled's log and seals its buffer,
            // a log write (and a wake-up of sled's I/O threads) per
            // commit, some 7% of the CPU a statement record cost under
            // load. Nothing here needs the batch's atomicity: sled
            // recovers a prefix of its log, so a crash leaves the index
            // ending at an earlier block of the commit, and opening finds
            // the rest in the segments ([`Store::reindex_tail`]), as it
            // does for every commit since sled's last sync.
            for (first, value) in &chain.0 {
                self.chain.insert(first.to_be_bytes(), value.as_slice())?;
            }
            return Ok(());
        };
        let chain = chain.batch();
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
        self.sync_blobs()
    }

    /// `fsync`s blob files written since the last call, and then their
    /// directory.
    ///
    /// Listing the directory on every commit is what it used to cost; now
    /// it is listed only when its inode or modification time changed since
    /// a listing that saw a settled time (older than [`MTIME_SETTLED`]
    /// before the listing). Creating or removing a file sets the time to
    /// the current clock tick, which is then later than a settled time, so
    /// no new blob goes unseen. While the time is recent, every call lists.
    fn sync_blobs(&self) -> Result<(), AuditError> {
        let io = |path: PathBuf| move |source| AuditError::Io { path, source };
        let blobs = self.dir.join("chain").join("blobs");
        let mut scan = lock(&self.blobs);
        let listed_at = SystemTime::now();
        // Taken before listing: a file created during the listing leaves
        // a time that is not settled, so the next call lists again.
        let stamp = match std::fs::metadata(&blobs) {
            Ok(meta) => meta.modified().ok().map(|t| (meta.ino(), t)),
            // sled creates the directory at open; without it, no blobs.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                scan.settled = None;
                return Ok(());
            }
            Err(source) => return Err(io(blobs)(source)),
        };
        if stamp.is_some() && scan.settled == stamp {
            return Ok(());
        }
        let entries = std::fs::read_dir(&blobs).map_err(io(blobs.clone()))?;
        let mut present = HashSet::new();
        let mut new = false;
        for entry in entries {
            let entry = entry.map_err(io(blobs.clone()))?;
            let name = entry.file_name();
            if !scan.synced.contains(&name) {
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
        scan.synced = present;
        scan.settled = stamp.filter(|&(_, modified)| {
            listed_at
                .duration_since(modified)
                .is_ok_and(|age| age > MTIME_SETTLED)
        });
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts a new segment file after `bytes`, for tests that need
    /// several; call it before anything is appended.
    #[cfg(test)]
    pub(super) fn with_segment_limit(mut self, bytes: u64) -> Self {
        self.segments = Arc::new(Segments::open(&self.dir).with_limit(bytes));
        self
    }

    /// Up to `limit` records (block lines) from position `from` on, in
    /// order, each keyed by its position.
    pub fn raw_records(&self, from: u64, limit: usize) -> Result<Vec<RawEntry>, AuditError> {
        let mut out = Vec::new();
        for line in self.lines(from)?.take(limit) {
            let line = line?;
            out.push(RawEntry::new(line.key, line.bytes()));
        }
        Ok(out)
    }

    /// The chain's record lines from position `from` on, starting inside
    /// the block that holds `from`.
    pub fn lines(&self, from: u64) -> Result<Lines, AuditError> {
        // The raw key: a malformed one (tampering) must not move the start.
        let start = match self.chain.range(..=from.to_be_bytes()).next_back() {
            Some(item) => item?.0,
            None => sled::IVec::from(&from.to_be_bytes()),
        };
        Ok(Lines {
            blocks: self.chain.range(start..),
            segments: Arc::clone(&self.segments),
            from,
            current: None,
        })
    }

    /// The block that would hold position `seq`: the last one whose key is
    /// not above it.
    pub(super) fn block_at(&self, seq: u64) -> Result<Option<Block>, AuditError> {
        let _pinned = self.segments.pin();
        match self.chain.range(..=seq.to_be_bytes()).next_back() {
            None => Ok(None),
            Some(item) => {
                let (key, value) = item?;
                Ok(Some(Block {
                    key: key_u64(&key),
                    bytes: load(&self.segments, &value)?,
                    extent: Extent::decode(&value),
                }))
            }
        }
    }

    pub fn raw_checkpoints(&self) -> Result<Vec<RawEntry>, AuditError> {
        raw(self.checkpoints.iter(), usize::MAX)
    }

    /// The last record (the last line of the last block), as the writer
    /// continues from it.
    pub fn head(&self) -> Result<Option<Record>, AuditError> {
        let _pinned = self.segments.pin();
        let Some((key, value)) = self.chain.last()? else {
            return Ok(None);
        };
        let value = load(&self.segments, &value)?;
        let (index, line) = block::last_line(&value);
        Record::decode(line).map(Some).map_err(|e| {
            AuditError::Corrupt(format!(
                "the last chain record (position {}) does not decode: {e}; run `portcullis audit verify`",
                key_u64(&key).saturating_add(index)
            ))
        })
    }

    /// The record at position `seq`, if the chain reaches it.
    pub fn record(&self, seq: u64) -> Result<Option<Record>, AuditError> {
        let Some(Block {
            key, bytes: value, ..
        }) = self.block_at(seq)?
        else {
            return Ok(None);
        };
        let Some(index) = seq.checked_sub(key) else {
            return Err(AuditError::Corrupt(format!(
                "a chain key that is not a seq stands where record {seq} should be; \
                 run `portcullis audit verify`"
            )));
        };
        match block::line(&value, index) {
            None => Ok(None),
            Some(line) => Record::decode(line).map(Some).map_err(|e| {
                AuditError::Corrupt(format!(
                    "record {seq} does not decode: {e}; run `portcullis audit verify`"
                ))
            }),
        }
    }

    /// Indexes where sessions start. Only a shortcut for the auditor tools
    /// (a session missing here is looked for from the chain's start), so it
    /// is written after the commit, not with it, and entry by entry: a
    /// batch would add a write to sled's log (its manifest) to the commits
    /// of new connections.
    pub(super) fn index_session_starts(&self, starts: &[(String, u64)]) -> Result<(), AuditError> {
        for (session, seq) in starts {
            self.sessions
                .insert(session.as_bytes(), &seq.to_be_bytes())?;
        }
        Ok(())
    }

    /// Takes sessions whose start a purge emptied out of the index, which
    /// so holds the sessions whose starts are kept, not every one ever.
    pub(super) fn unindex_session_starts(&self, sessions: &[String]) -> Result<(), AuditError> {
        let mut batch = sled::Batch::default();
        for session in sessions {
            batch.remove(session.as_bytes());
        }
        Ok(self.sessions.apply_batch(batch)?)
    }

    /// The seq of `session`'s start, where its records begin, if it is
    /// indexed and the record there is that start; else None, and its
    /// records are to be looked for from the chain's start.
    pub fn session_start(&self, session: &str) -> Result<Option<u64>, AuditError> {
        let Some(value) = self.sessions.get(session.as_bytes())? else {
            return Ok(None);
        };
        let Ok(bytes) = <[u8; 8]>::try_from(value.as_ref()) else {
            return Ok(None);
        };
        let seq = u64::from_be_bytes(bytes);
        let Ok(Some(record)) = self.record(seq) else {
            return Ok(None);
        };
        let starts_it = record.event().is_some_and(|event| {
            event.get("event").and_then(|v| v.as_str()) == Some("session_start")
                && event.get("session").and_then(|v| v.as_str()) == Some(session)
        });
        Ok(starts_it.then_some(seq))
    }

    /// Where earlier purges settled the chain; the start for a store that
    /// never had one.
    pub fn purge_settled(&self) -> Result<Settled, AuditError> {
        match self.meta.get(META_PURGE_SETTLED)? {
            None => Ok(Settled::default()),
            Some(v) => serde_json::from_slice(&v).map_err(|e| {
                AuditError::Corrupt(format!("the purges' progress in the audit store: {e}"))
            }),
        }
    }

    /// Remembers where a committed purge settled the chain. Written after
    /// the purge: a crash between the two only makes the next purge read
    /// more.
    pub fn set_purge_settled(&self, settled: &Settled) -> Result<(), AuditError> {
        self.meta
            .insert(META_PURGE_SETTLED, serde_json::to_vec(settled)?)?;
        Ok(())
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

    /// Index entries for one keyed hash, without those whose records were
    /// never stored (see [`Store::stored_with_its_record`]).
    pub fn subject_hits(&self, hash: &Hash) -> Result<Vec<SubjectHit>, AuditError> {
        let mut hits = Vec::new();
        // Hits come in the order they were indexed, so mostly a block's
        // worth at a time: each block is read once.
        let mut block = None;
        for item in self.subjects.scan_prefix(hash) {
            let (_, value) = item?;
            let Ok(hit) = serde_json::from_slice::<SubjectHit>(&value) else {
                continue;
            };
            if self.stored_with_its_record(&hit, &mut block)? {
                hits.push(hit);
            }
        }
        Ok(hits)
    }

    /// Whether the record `hit` was found in is in the chain.
    ///
    /// A commit makes its hits durable before its records (see
    /// `Writer::write`). When the records never were (the commit failed,
    /// or a crash came between), its hits name a seq the chain does not
    /// reach, or one that a later commit gave to another session's record:
    /// they are left out rather than point a data-subject request at
    /// the wrong record. Hits an adapter reported (`masked`, `reported`)
    /// name the chain's head when they came, not a record of their own,
    /// and always count. `block` keeps the last block read.
    fn stored_with_its_record(
        &self,
        hit: &SubjectHit,
        block: &mut Option<Block>,
    ) -> Result<bool, AuditError> {
        if !hit.found_in_record() {
            return Ok(true);
        }
        fn line(block: &Block, seq: u64) -> Option<&[u8]> {
            seq.checked_sub(block.key)
                .and_then(|index| block::line(&block.bytes, index))
        }
        if block.as_ref().is_none_or(|b| line(b, hit.seq).is_none()) {
            *block = self.block_at(hit.seq)?;
        }
        let Some(line) = block.as_ref().and_then(|b| line(b, hit.seq)) else {
            return Ok(false);
        };
        // A record that does not decode is `audit verify`'s to report; a
        // request over-reports rather than miss it.
        let Some(event) = Record::decode(line).ok().map(|r| r.event()) else {
            return Ok(true);
        };
        let field = |name: &str| event.as_ref().and_then(|e| e.get(name));
        let same_session = field("session").and_then(|v| v.as_str()) == hit.session.as_deref();
        let same_statement = hit
            .statement_seq
            .is_none_or(|n| field("statement_seq").and_then(|v| v.as_u64()) == Some(n));
        Ok(same_session && same_statement)
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
        out.push(RawEntry::new(key_u64(&key), &value));
    }
    Ok(out)
}

/// A big-endian u64 key; malformed keys (only by tampering) map to
/// u64::MAX so that verification reports them.
pub(super) fn key_u64(key: &[u8]) -> u64 {
    key.try_into().map_or(u64::MAX, u64::from_be_bytes)
}

mod tail;
mod times;
pub use times::{TimeIndex, TimeIndexer};
#[cfg(test)]
mod tests;
