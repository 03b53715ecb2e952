//! [`SledRecorder`]: the store's single writer, with group commit.
//!
//! `record` only enqueues (so events keep their call order) and returns an
//! [`Ack`]. One thread takes everything queued, chains it, appends the
//! records as [`block`]s to the segment file, indexes the blocks in one
//! sled batch, syncs both and only then resolves the acks of the whole
//! batch: the more producers, the more events share one sync. The same
//! thread signs checkpoints (every N records, every T seconds when there is
//! something new, and at close) and carries out retention purges (planned
//! on another thread, reading), so nothing else ever writes the chain.

use std::{
    sync::{mpsc, Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::oneshot;
use tracing::{error, info, warn};

use super::{
    block::{self, Blocks},
    commit::{Inbox, Progress, Settle},
    event::RetentionPurge,
    json,
    keys::Keys,
    record::{Checkpoint, Hash, Record, GENESIS},
    retention::{self, Planner, PurgePlan, Retention},
    segment::Extent,
    store::{ChainEntries, HitSource, Store, SubjectHit, TimeIndexer},
    subject::{detect, redact, subject_hash},
    Ack, AuditError, AuditEvent, Recorder,
};
use crate::lock;

/// When to commit and when to sign checkpoints.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointPolicy {
    /// Sign after this many new records.
    pub every: u64,
    /// Sign after this long with new records.
    pub interval: Duration,
    /// Longest a record waits for its group commit when nobody awaits it
    /// (statements; a login or session start is committed at once). The
    /// longer, the fewer flushes under load; it bounds what a power cut
    /// can take from records the pipeline has not yet been told are safe.
    pub commit_interval: Duration,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        Self {
            every: 10_000,
            interval: Duration::from_secs(60),
            commit_interval: Duration::from_millis(50),
        }
    }
}

/// What a purge did.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PurgeSummary {
    /// Seq of the `retention_purge` record, if anything was purged.
    pub purge_seq: Option<u64>,
    pub records: u64,
    pub sessions: u64,
}

type Reply<T> = oneshot::Sender<Result<T, AuditError>>;

/// The keyed hashes of personal values taken out of an event, and where
/// the event was: its session and, for a statement, its number there.
struct Redacted {
    session: String,
    statement_seq: Option<u64>,
    hashes: Vec<Hash>,
}

enum Msg {
    Append {
        ticket: u64,
        at_us: u64,
        /// The event's JSON text.
        payload: String,
        /// The session it starts, for the sessions' index.
        starts_session: Option<String>,
        /// Personal values taken out of the payload, indexed under this
        /// record.
        redacted: Option<Redacted>,
    },
    Subject {
        ticket: u64,
        hit: SubjectHit,
        hash: Hash,
    },
    Purge {
        as_of_us: u64,
        part: PurgePlan,
        reply: Reply<PurgeSummary>,
    },
    Checkpoint {
        reply: Reply<Option<Checkpoint>>,
    },
    /// Answered over a std channel: `close` may run inside a runtime.
    Close {
        reply: mpsc::Sender<Result<(), AuditError>>,
    },
}

/// The durable, tamper-evident [`Recorder`].
pub struct SledRecorder {
    inbox: Arc<Inbox<Msg>>,
    /// For reading while the writer writes (a purge's plan).
    store: Store,
    /// One purge at a time: a plan is made against the chain as the last
    /// purge left it.
    purging: tokio::sync::Mutex<()>,
    progress: Arc<Progress>,
    subject_key: [u8; 32],
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Keeps the time index up with what the writer commits.
    times: Mutex<TimeIndexer>,
}

impl SledRecorder {
    /// Starts the writer over `store`, continuing its chain.
    ///
    /// # Errors
    /// Refuses a store whose end no longer matches its last signed
    /// checkpoint (truncated or rewritten): appending would hide that.
    pub fn start(store: Store, keys: Keys, policy: CheckpointPolicy) -> Result<Self, AuditError> {
        store.reindex_tail()?;
        let head = store.head()?;
        let (head_seq, head_hash) = head.map_or((0, GENESIS), |r| (r.seq, r.hash));
        let last = store.last_checkpoint()?;
        if let Some(cp) = &last {
            let at_checkpoint = store.record(cp.seq)?;
            if head_seq < cp.seq || at_checkpoint.map(|r| r.hash) != Some(cp.hash) {
                return Err(AuditError::Corrupt(format!(
                    "the chain (head seq {head_seq}) does not match signed checkpoint #{} (seq {}): \
                     the store was truncated or rewritten. Run `portcullis audit verify`, keep the \
                     store as evidence, then move {} aside to start a new chain",
                    cp.number,
                    cp.seq,
                    store.dir().display()
                )));
            }
        }
        let inbox = Arc::new(Inbox::new(policy.commit_interval));
        let hurried = Arc::clone(&inbox);
        let (progress, settle) = Progress::new(move || hurried.hurry());
        let reader = store.clone();
        let times = TimeIndexer::start(store.clone())?;
        let writer = Writer {
            inbox: Arc::clone(&inbox),
            settle,
            subject_key: keys.subject,
            keys,
            policy,
            head_seq,
            head_hash,
            checkpoint_number: last.as_ref().map_or(0, |c| c.number),
            checkpoint_seq: last.as_ref().map_or(0, |c| c.seq),
            checkpoint_time: Instant::now(),
            index_synced: None,
            index_dirty: false,
            index_failed: false,
            store,
        };
        let subject_key = writer.subject_key;
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| AuditError::Corrupt(format!("cannot start the audit writer: {e}")))?;
        Ok(Self {
            inbox,
            store: reader,
            purging: tokio::sync::Mutex::new(()),
            progress,
            subject_key,
            thread: Mutex::new(Some(thread)),
            times: Mutex::new(times),
        })
    }

    /// Purges payloads expired at `as_of` (normally now), in parts of at
    /// most [`PURGE_PART`] payloads, each its own `retention_purge` record.
    /// Each part is planned on a thread of its own while records go on
    /// being committed, and the writer takes the records queued meanwhile
    /// between two parts: a purge never holds commits up for long, however
    /// much has expired.
    pub async fn purge(
        &self,
        retention: Retention,
        as_of: SystemTime,
    ) -> Result<PurgeSummary, AuditError> {
        let _one_at_a_time = self.purging.lock().await;
        let as_of_us = micros(as_of);
        let settled = self.store.purge_settled()?;
        let mut planner = Planner::new(retention, as_of_us, settled);
        let mut summary = PurgeSummary {
            purge_seq: None,
            records: 0,
            sessions: 0,
        };
        loop {
            let store = self.store.clone();
            let (part, planned) = tokio::task::spawn_blocking(move || {
                let part = planner.next_part(&store, PURGE_PART);
                (part, planner)
            })
            .await
            .map_err(|e| AuditError::Corrupt(format!("planning a purge failed: {e}")))?;
            planner = planned;
            let (reply, rx) = oneshot::channel();
            self.send(Msg::Purge {
                as_of_us,
                part: part?,
                reply,
            });
            let done = rx.await.unwrap_or(Err(AuditError::WriterGone))?;
            summary.records += done.records;
            summary.purge_seq = done.purge_seq.or(summary.purge_seq);
            if planner.is_finished() {
                summary.sessions = planner.sessions() as u64;
                return Ok(summary);
            }
        }
    }

    /// Signs a checkpoint over the current head now (if it has moved) and
    /// returns the latest checkpoint.
    pub async fn checkpoint(&self) -> Result<Option<Checkpoint>, AuditError> {
        let (reply, rx) = oneshot::channel();
        self.send(Msg::Checkpoint { reply });
        rx.await.unwrap_or(Err(AuditError::WriterGone))
    }

    /// Commits what is queued, signs a final checkpoint and stops the
    /// writer. Blocks until done; later records fail with `WriterGone`.
    pub fn close(&self) -> Result<(), AuditError> {
        let (reply, rx) = mpsc::channel();
        self.send(Msg::Close { reply });
        let result = rx.recv().unwrap_or(Err(AuditError::WriterGone));
        let thread = lock(&self.thread).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
        lock(&self.times).stop();
        result
    }

    /// Resolves when the writer has stopped on its own: its store failed in
    /// a way only reopening it mends. Every record is refused from then on.
    pub async fn stopped(&self) {
        self.progress.writer_stopped().await;
    }

    /// A refused message is dropped and with it its reply sender, so the
    /// waiting side sees `WriterGone`.
    fn send(&self, msg: Msg) {
        let _ = self.inbox.push_control(msg);
    }

    fn ack(&self, ticket: Option<u64>) -> Ack {
        match ticket {
            Some(ticket) => Ack::ticket(ticket, Arc::clone(&self.progress)),
            None => Ack::done(Err(AuditError::WriterGone)),
        }
    }
}

impl Recorder for SledRecorder {
    fn record(&self, mut event: AuditEvent) -> Ack {
        // What a client sent can hold personal data (a WHERE on an e-mail
        // address): stored as keyed hashes only, like masked results, in
        // statement records and in the policy's records of the statements
        // it refused or held alike.
        let key = &self.subject_key;
        let mut hashes = Vec::new();
        let mut statement_seq = None;
        let mut starts_session = None;
        let session = match &mut event {
            AuditEvent::SessionStart(start) => {
                starts_session = Some(start.session.clone());
                None
            }
            AuditEvent::Statement(statement) => {
                statement_seq = Some(statement.statement_seq);
                redact(key, &mut statement.text, &mut hashes);
                for parameter in statement.parameters.iter_mut().flatten() {
                    redact(key, parameter, &mut hashes);
                }
                if let Some(error) = &mut statement.error {
                    redact(key, &mut error.message, &mut hashes);
                }
                Some(&statement.session)
            }
            AuditEvent::PolicyBlock(block) => {
                redact(key, &mut block.statement, &mut hashes);
                Some(&block.session)
            }
            AuditEvent::Approval(step) => {
                redact(key, &mut step.statement, &mut hashes);
                Some(&step.session)
            }
            _ => None,
        };
        let redacted = session
            .filter(|_| !hashes.is_empty())
            .map(|session| Redacted {
                session: session.clone(),
                statement_seq,
                hashes,
            });
        let payload = match json::event(&event) {
            Ok(p) => p,
            Err(e) => return Ack::done(Err(e.into())),
        };
        let at_us = micros(SystemTime::now());
        let ticket = self.inbox.push_event(|ticket| Msg::Append {
            ticket,
            at_us,
            payload,
            starts_session,
            redacted,
        });
        self.ack(ticket)
    }

    fn subject_index(&self, session: &str, statement_seq: u64, value: &str) -> Ack {
        let hash = subject_hash(&self.subject_key, value);
        self.index_subject(session, statement_seq, hash, HitSource::Reported)
    }

    fn subject_index_hash(&self, session: &str, statement_seq: u64, hash: Hash) -> Ack {
        self.index_subject(session, statement_seq, hash, HitSource::Masked)
    }
}

impl SledRecorder {
    fn index_subject(
        &self,
        session: &str,
        statement_seq: u64,
        hash: Hash,
        source: HitSource,
    ) -> Ack {
        let hit = SubjectHit {
            session: Some(session.to_owned()),
            statement_seq: Some(statement_seq),
            seq: 0,
            at_us: micros(SystemTime::now()),
            source,
        };
        let ticket = self
            .inbox
            .push_event(|ticket| Msg::Subject { ticket, hit, hash });
        self.ack(ticket)
    }
}

/// How long sled's index may go without a sync while commits only add
/// blocks; it bounds what `Store::reindex_tail` reads after a crash.
const INDEX_SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// Payloads per part of a purge: rewriting a part takes the writer about
/// 0.1 s (10 µs a payload), the longest a purge holds commits up.
const PURGE_PART: usize = 10_000;

pub(super) fn micros(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

struct Writer {
    inbox: Arc<Inbox<Msg>>,
    settle: Settle,
    store: Store,
    keys: Keys,
    subject_key: [u8; 32],
    policy: CheckpointPolicy,
    head_seq: u64,
    head_hash: Hash,
    checkpoint_number: u64,
    checkpoint_seq: u64,
    checkpoint_time: Instant,
    /// When sled's index was last made durable (see [`Writer::write`]);
    /// `None` until the first commit, which always syncs it.
    index_synced: Option<Instant>,
    /// Commits were indexed since then.
    index_dirty: bool,
    /// A commit failed inside sled, which then refuses every later write
    /// until the store is reopened: the writer stops (see
    /// [`SledRecorder::stopped`]).
    index_failed: bool,
}

impl Writer {
    fn run(mut self) {
        loop {
            if self.index_failed {
                error!(
                    "the audit store's index failed and refuses writes until it is reopened: \
                     the writer stops, and records are refused until the daemon restarts"
                );
                // Waiters of what is queued learn that the writer is gone.
                drop(self.inbox.close());
                return;
            }
            let checkpoint_due = if self.head_seq > self.checkpoint_seq {
                self.policy
                    .interval
                    .saturating_sub(self.checkpoint_time.elapsed())
            } else {
                Duration::from_secs(3600)
            };
            let index_due = match self.index_synced {
                Some(at) if self.index_dirty => INDEX_SYNC_INTERVAL.saturating_sub(at.elapsed()),
                _ => Duration::from_secs(3600),
            };
            let taken = self.inbox.take(checkpoint_due.min(index_due));
            if taken.idle {
                if checkpoint_due <= index_due {
                    self.checkpoint_logged();
                } else {
                    self.sync_index_logged();
                }
                continue;
            }
            // Events are committed in place, in runs between control
            // messages (rare), so the queue goes back to the inbox whole.
            let mut messages = taken.messages;
            while !messages.is_empty() {
                let events = messages
                    .iter()
                    .position(|m| !matches!(m, Msg::Append { .. } | Msg::Subject { .. }))
                    .unwrap_or(messages.len());
                self.commit(messages.drain(..events));
                if messages.is_empty() {
                    break;
                }
                match messages.remove(0) {
                    Msg::Purge {
                        as_of_us,
                        part,
                        reply,
                    } => {
                        let _ = reply.send(self.purge(part, as_of_us));
                    }
                    Msg::Checkpoint { reply } => {
                        let result = self
                            .checkpoint()
                            .and_then(|()| self.store.last_checkpoint());
                        let _ = reply.send(result);
                    }
                    Msg::Close { reply } => {
                        // Whatever arrived meanwhile is committed too: the
                        // inbox refuses more from now on.
                        self.commit(messages.drain(..).chain(self.inbox.close()));
                        let result = self.checkpoint();
                        if self.index_dirty {
                            self.sync_index_logged();
                        }
                        if let Err(e) = self.store.close_segments() {
                            warn!("the audit segment keeps its zeros ahead: {e}");
                        }
                        let _ = reply.send(result);
                        return;
                    }
                    // Not reached: the run above ends at a control message.
                    event @ (Msg::Append { .. } | Msg::Subject { .. }) => self.commit([event]),
                }
            }
            self.inbox.recycle(messages);
            if self.head_seq - self.checkpoint_seq >= self.policy.every {
                self.checkpoint_logged();
            }
        }
    }

    /// Appends and indexes a batch, flushes, then settles its tickets.
    fn commit(&mut self, batch: impl IntoIterator<Item = Msg>) {
        let (mut seq, mut prev) = (self.head_seq, self.head_hash);
        let mut blocks = Blocks::default();
        let mut tickets: Option<(u64, u64)> = None;
        let mut settle = |ticket: u64| {
            let (first, _) = tickets.get_or_insert((ticket, ticket));
            tickets = Some((*first, ticket));
        };
        let mut subjects: Vec<(Hash, SubjectHit)> = Vec::new();
        let mut starts = Vec::new();
        // Each record's seq and time, for the time index.
        let mut times = Vec::new();
        let mut encode_error = None;
        for msg in batch {
            match msg {
                Msg::Append {
                    ticket,
                    at_us,
                    payload,
                    starts_session,
                    redacted,
                } => {
                    seq += 1;
                    if let Some(session) = starts_session {
                        starts.push((session, seq));
                    }
                    if let Some(redacted) = redacted {
                        for hash in redacted.hashes {
                            subjects.push((
                                hash,
                                SubjectHit {
                                    session: Some(redacted.session.clone()),
                                    statement_seq: redacted.statement_seq,
                                    seq,
                                    at_us,
                                    source: HitSource::Statement,
                                },
                            ));
                        }
                    }
                    for found in detect(&payload) {
                        subjects.push((
                            subject_hash(&self.subject_key, &found.value),
                            SubjectHit {
                                session: found.session,
                                statement_seq: found.statement_seq,
                                seq,
                                at_us,
                                source: HitSource::Detected,
                            },
                        ));
                    }
                    times.push((seq, at_us));
                    let (hash, bytes) = Record::encode_new(seq, at_us, prev, &payload);
                    prev = hash;
                    if encode_error.is_none() {
                        encode_error = blocks.push(seq, &bytes).err();
                    }
                    settle(ticket);
                }
                Msg::Subject {
                    ticket,
                    mut hit,
                    hash,
                } => {
                    hit.seq = seq;
                    subjects.push((hash, hit));
                    settle(ticket);
                }
                _ => {}
            }
        }
        let Some((first, last)) = tickets else {
            return;
        };
        let result = match encode_error {
            Some(e) => Err(e),
            None => self.write(&blocks.finish(), subjects),
        };
        match result {
            Ok(()) => {
                self.head_seq = seq;
                self.head_hash = prev;
                self.settle.committed(last);
                let starts_indexed = match self.store.index_session_starts(&starts) {
                    Ok(()) => true,
                    Err(e) => {
                        warn!("sessions' starts not indexed: replaying them reads the whole chain: {e}");
                        false
                    }
                };
                // Only after the starts: the indexer, reading these records
                // back, indexes starts the writer could not.
                if starts_indexed {
                    if let Err(e) = self.store.index_committed_times(&times) {
                        warn!("the audit time index is left to its indexer: {e}");
                    }
                }
            }
            Err(e) => {
                error!("audit batch of {} not stored: {e}", last - first + 1);
                self.index_failed |= matches!(e, AuditError::Store(_));
                self.settle.failed(first, last, e.to_string());
                // What reached the disk is the truth to continue from.
                if let Ok(head) = self.store.head() {
                    (self.head_seq, self.head_hash) =
                        head.map_or((0, GENESIS), |r| (r.seq, r.hash));
                }
            }
        }
    }

    /// Makes the subject hits durable, then appends the blocks and makes
    /// them durable, then indexes the blocks.
    ///
    /// The hits go first because only sled holds them: a crash between
    /// the two, or a failed append, leaves hits that name a record that
    /// was never stored (`Store::subject_hits` leaves them out), never
    /// records whose hits were lost (a data-subject request would miss
    /// them, and the records are found again after a crash, see below).
    ///
    /// sled is otherwise synced only every [`INDEX_SYNC_INTERVAL`], not for
    /// each commit: the blocks are durable, and what a crash takes from
    /// the index is found again in the segments when the store next opens
    /// (`Store::reindex_tail`). Under `pgbench -C`, a new connection per
    /// query, that took a quarter off the gateway's CPU per connection.
    fn write(
        &mut self,
        blocks: &[(u64, Vec<u8>)],
        subjects: Vec<(Hash, SubjectHit)>,
    ) -> Result<(), AuditError> {
        // Decided before the hits' sync, which does not cover this
        // commit's chain entries: the writer's first commit must sync
        // them whatever else it syncs (an index without extents is not
        // scanned when the store opens).
        let sync_chain = self
            .index_synced
            .is_none_or(|at| at.elapsed() >= INDEX_SYNC_INTERVAL);
        if !subjects.is_empty() {
            let mut index = sled::Batch::default();
            for (hash, hit) in subjects {
                let mut key = hash.to_vec();
                key.extend_from_slice(&self.store.db.generate_id()?.to_be_bytes());
                index.insert(key, serde_json::to_vec(&hit)?);
            }
            self.store.subjects.apply_batch(index)?;
            self.store.sync()?;
        }
        let mut chain = ChainEntries::default();
        self.store.append_blocks(blocks, &mut chain)?;
        self.store.apply(chain, None)?;
        if sync_chain {
            self.store.sync()?;
            self.index_is_synced();
        } else {
            self.index_dirty = true;
        }
        Ok(())
    }

    /// Notes that sled was just synced, by a commit or anything else.
    fn index_is_synced(&mut self) {
        self.index_synced = Some(Instant::now());
        self.index_dirty = false;
    }

    /// Syncs the index once commits left it unsynced for
    /// [`INDEX_SYNC_INTERVAL`]. A failure inside sled means it refuses
    /// every later write: the writer stops, as after a failed commit.
    /// Other failures (syncing its files) are tried again an interval
    /// later.
    fn sync_index_logged(&mut self) {
        match self.store.sync() {
            Ok(()) => self.index_is_synced(),
            Err(e) => {
                error!("the audit index could not be synced: {e}");
                self.index_failed |= matches!(e, AuditError::Store(_));
                self.index_synced = Some(Instant::now());
            }
        }
    }

    fn checkpoint_logged(&mut self) {
        if let Err(e) = self.checkpoint() {
            error!("signing audit checkpoint failed: {e}");
        }
    }

    /// Signs the head if it moved since the last checkpoint.
    fn checkpoint(&mut self) -> Result<(), AuditError> {
        self.checkpoint_time = Instant::now();
        if self.head_seq == 0 || self.head_seq == self.checkpoint_seq {
            return Ok(());
        }
        let cp = Checkpoint::sign(
            &self.keys.signing,
            self.checkpoint_number + 1,
            self.head_seq,
            self.head_hash,
            micros(SystemTime::now()),
        );
        self.store.store_checkpoint(&cp)?;
        self.index_is_synced();
        self.checkpoint_number = cp.number;
        self.checkpoint_seq = cp.seq;
        Ok(())
    }

    /// Adds to `blocks` the blocks holding `seqs` (sorted), rewritten with
    /// those records' payloads removed and `purged_by` set; every other
    /// line stays byte for byte. Returns where the replaced blocks are, to
    /// free once the purge is committed.
    fn rewrite_purged(
        &self,
        seqs: &[u64],
        purge_seq: u64,
        blocks: &mut Vec<(u64, Vec<u8>)>,
    ) -> Result<Vec<Extent>, AuditError> {
        let mut replaced = Vec::new();
        let mut rest = seqs;
        while let Some(&first) = rest.first() {
            let Some(stored) = self.store.block_at(first)? else {
                rest = &rest[1..];
                continue;
            };
            let (key, value) = (stored.key, &stored.bytes);
            let (last, _) = block::last_line(value);
            let end = key.saturating_add(last);
            // A gap, or a key that is not a seq (tampering): nothing to
            // rewrite for this seq, as before blocks.
            if key > first || end < first {
                rest = &rest[1..];
                continue;
            }
            let mine = rest.partition_point(|&s| s <= end);
            let (these, later) = rest.split_at(mine);
            rest = later;
            let rewritten = block::rewrite(key, value, |seq, line| {
                if these.binary_search(&seq).is_err() {
                    return Ok(None);
                }
                let mut old = Record::decode(line).map_err(|e| {
                    AuditError::Corrupt(format!(
                        "record {seq}, due for purging, does not decode: {e}; run `portcullis audit verify`"
                    ))
                })?;
                old.payload = None;
                old.purged_by = Some(purge_seq);
                Ok(Some(old.encode()))
            })?;
            blocks.push((key, rewritten));
            replaced.extend(stored.extent);
        }
        Ok(replaced)
    }

    /// Carries out one part of a purge: empties its payloads and records
    /// it, in one atomic batch with the data-subject index entries that go
    /// (the last part's); then remembers where the chain is settled.
    fn purge(&mut self, part: PurgePlan, as_of_us: u64) -> Result<PurgeSummary, AuditError> {
        let summary = self.empty_payloads(&part, as_of_us)?;
        if let Some(settled) = &part.settled {
            if let Err(e) = self.store.set_purge_settled(settled) {
                warn!("the next purge reads the chain from further back: {e}");
            }
        }
        Ok(summary)
    }

    fn empty_payloads(
        &mut self,
        part: &PurgePlan,
        as_of_us: u64,
    ) -> Result<PurgeSummary, AuditError> {
        let mut index = sled::Batch::default();
        for key in &part.subject_keys {
            index.remove(key);
        }
        if part.seqs.is_empty() {
            if !part.subject_keys.is_empty() {
                self.store.apply(ChainEntries::default(), Some(index))?;
            }
            return Ok(PurgeSummary {
                purge_seq: None,
                records: 0,
                sessions: 0,
            });
        }
        let purge_seq = self.head_seq + 1;
        let event = AuditEvent::RetentionPurge(RetentionPurge {
            as_of: humantime::format_rfc3339_seconds(
                SystemTime::UNIX_EPOCH + Duration::from_micros(as_of_us),
            )
            .to_string(),
            records: part.seqs.len() as u64,
            ranges: retention::ranges(&part.seqs),
            sessions: part.sessions.len() as u64,
            by_resource: part.by_resource.clone(),
        });
        let payload = json::event(&event)?;
        let (purge_hash, bytes) = Record::encode_new(
            purge_seq,
            micros(SystemTime::now()),
            self.head_hash,
            &payload,
        );
        let mut purge_block = Blocks::default();
        purge_block.push(purge_seq, &bytes)?;
        let mut blocks = purge_block.finish();
        let replaced = self.rewrite_purged(&part.seqs, purge_seq, &mut blocks)?;
        let mut chain = ChainEntries::default();
        self.store.append_blocks(&blocks, &mut chain)?;
        self.store.apply(chain, Some(index))?;
        self.store.sync()?;
        self.index_is_synced();
        self.head_seq = purge_seq;
        self.head_hash = purge_hash;
        if let Err(e) = self.store.unindex_session_starts(&part.starts) {
            warn!("purged sessions stay in the sessions' index (replays of them read the whole chain): {e}");
        }
        // Committed: the emptied payloads' old bytes can go. Failing here
        // leaves them unreferenced, not the chain wrong.
        match self.store.release(&replaced) {
            Ok(0) => {}
            Ok(segments) => info!(segments, "audit segment files emptied by purges deleted"),
            Err(e) => error!("purged audit blocks not freed, or their segments not compacted: {e}"),
        }
        info!(
            records = part.seqs.len(),
            purge_seq, "expired audit payloads purged"
        );
        Ok(PurgeSummary {
            purge_seq: Some(purge_seq),
            records: part.seqs.len() as u64,
            sessions: part.sessions.len() as u64,
        })
    }
}
