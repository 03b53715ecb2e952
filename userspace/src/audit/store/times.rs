//! Where in the chain a time begins and ends: what lets `audit events` and
//! `audit sessions` with `--since`/`--until` read the part of the chain
//! they ask about instead of all of it.
//!
//! Records are numbered in the order they are committed, and their times
//! almost always grow with their seqs, but not quite: two sessions take
//! their times a moment before queueing their records, and the clock can
//! be set back. So the index does not claim that times grow. It keeps the
//! chain's *high-water time* (the latest time of any record so far) and
//! notes, in the `times` tree:
//! - for each minute the high-water time reached, the seq of the record
//!   that took it there. Every record before that seq is older than the
//!   minute, whatever the clock did: a walk from there misses nothing
//!   since the minute.
//! - every record more than [`STEP_TOLERANCE_US`] older than the
//!   high-water time before it (the clock went back). Between them, every
//!   record after a minute's seq is at most that much older than the
//!   minute: a walk for times before a later minute can stop at that
//!   minute's seq, unless a noted record after it is older.
//! - how far it has indexed (the last seq, and the high-water time there).
//!
//! The writer notes the times of what it commits while the index is
//! caught up ([`Store::index_committed_times`]). A thread of its own
//! ([`TimeIndexer`]) reads the rest back, about once a second, and also
//! fills in the sessions index for the records it reads (the writer's entries are not written with the
//! commit, so a crash can lose them). It starts where it left off: a store
//! from before the index is indexed from its start, while the gateway
//! runs. Readers read the few records past its progress themselves, so
//! the answer is as exact without it, only slower.
//!
//! The index is not evidence, yet an edited one could hide records from a
//! walk: `audit verify` builds it again from the chain and compares
//! ([`TimeIndex::first_difference`]), and `audit reindex` replaces it.

use std::{
    sync::{Arc, Condvar, LazyLock, Mutex},
    thread::JoinHandle,
    time::Duration,
};

use memchr::memmem;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::Store;
use crate::{
    audit::{query::format_time, record::Record, AuditError},
    lock,
};

const MINUTE_US: u64 = 60_000_000;

/// Records this much older than the high-water time are not noted: the
/// sessions' few microseconds of disorder would fill the index. Bounds
/// with `--until` allow for it.
const STEP_TOLERANCE_US: u64 = 1_000_000;

/// Records the indexer reads before it writes what it found.
const CHUNK: usize = 20_000;

/// How often the indexer looks for new records.
const INTERVAL: Duration = Duration::from_secs(1);

/// Records past the indexer's progress that a reader reads itself before
/// it gives up bounding `--until` (the indexer is still catching up).
const TAIL_LIMIT: usize = 200_000;

const PROGRESS_KEY: &[u8] = b"p";
const MINUTE_PREFIX: u8 = b'm';
const STEP_PREFIX: u8 = b's';

fn key(prefix: u8, n: u64) -> [u8; 9] {
    let mut key = [prefix; 9];
    key[1..].copy_from_slice(&n.to_be_bytes());
    key
}

fn number(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?))
}

/// How far the index reaches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// The last seq indexed.
    pub through: u64,
    /// The latest time of the records up to it.
    pub high_water_us: u64,
}

impl Progress {
    fn encode(self) -> [u8; 16] {
        let mut bytes = [0; 16];
        bytes[..8].copy_from_slice(&self.through.to_be_bytes());
        bytes[8..].copy_from_slice(&self.high_water_us.to_be_bytes());
        bytes
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != 16 {
            return None;
        }
        Some(Self {
            through: number(bytes)?,
            high_water_us: number(&bytes[8..])?,
        })
    }
}

/// Index entries: the whole index as stored ([`Store::time_index`]), or
/// what reading records adds to it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeIndex {
    pub progress: Progress,
    /// Minutes the high-water time reached, with the seq that took it there.
    pub minutes: Vec<(u64, u64)>,
    /// Records older than the high-water time before them: seq and time.
    pub steps: Vec<(u64, u64)>,
    /// Stored entries of no known form (hex keys): only an edit makes them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub malformed: Vec<String>,
}

impl TimeIndex {
    /// Hands each entry found to `put` as a stored key and value: the
    /// minutes and steps, then the progress, which so comes after what it
    /// vouches for.
    fn each_entry<E>(&self, mut put: impl FnMut(&[u8], &[u8]) -> Result<(), E>) -> Result<(), E> {
        for (minute, seq) in &self.minutes {
            put(&key(MINUTE_PREFIX, *minute), &seq.to_be_bytes())?;
        }
        for (seq, at_us) in &self.steps {
            put(&key(STEP_PREFIX, *seq), &at_us.to_be_bytes())?;
        }
        put(PROGRESS_KEY, &self.progress.encode())
    }

    /// Adds the record `bytes` at position `seq`, which follows the
    /// progress.
    pub fn note(&mut self, seq: u64, bytes: &[u8]) {
        // A line that is not a record (tampering, for `audit verify` to
        // report) has no time, and no walk reads anything from it.
        self.note_time(seq, record_time(bytes));
    }

    /// Adds record `seq` of time `at_us` (None: a line with no time),
    /// which follows the progress.
    fn note_time(&mut self, seq: u64, at_us: Option<u64>) {
        self.progress.through = seq;
        let Some(at_us) = at_us else {
            return;
        };
        let high_water = &mut self.progress.high_water_us;
        if at_us > *high_water {
            if at_us / MINUTE_US > *high_water / MINUTE_US || seq == 1 {
                self.minutes.push((at_us / MINUTE_US, seq));
            }
            *high_water = at_us;
        } else if at_us + STEP_TOLERANCE_US < *high_water {
            self.steps.push((seq, at_us));
        }
    }

    /// Where this index, as stored, differs from `rebuilt`, the index of
    /// the same chain read from its start up to this one's progress: the
    /// first seq the difference concerns, and what it is. None when they
    /// agree.
    pub fn first_difference(&self, rebuilt: &TimeIndex) -> Option<(u64, String)> {
        if let Some(key) = self.malformed.first() {
            return Some((
                1,
                format!("the time index holds an entry of no known form (key {key})"),
            ));
        }
        let minute = |&(minute, seq): &(u64, u64)| {
            let at = format_time(minute.saturating_mul(MINUTE_US));
            (seq, format!("the minute of {at} beginning at record {seq}"))
        };
        let step = |&(seq, at_us): &(u64, u64)| {
            let at = format_time(at_us);
            (
                seq,
                format!("record {seq}, of {at}, older than the records before it"),
            )
        };
        let progress = (self.progress != rebuilt.progress).then(|| {
            let reach = |p: &Progress| {
                format!(
                    "reaches record {} with times up to {}",
                    p.through,
                    format_time(p.high_water_us)
                )
            };
            // The first record the two disagree on: past the shorter
            // reach, or the last one (its time).
            let (stored, chain) = (self.progress.through, rebuilt.progress.through);
            (
                if stored == chain {
                    chain
                } else {
                    stored.min(chain) + 1
                },
                format!(
                    "the time index {}; the chain {}",
                    reach(&self.progress),
                    reach(&rebuilt.progress)
                ),
            )
        });
        [
            first_mismatch(&self.minutes, &rebuilt.minutes, minute),
            first_mismatch(&self.steps, &rebuilt.steps, step),
            progress,
        ]
        .into_iter()
        .flatten()
        .min_by_key(|&(seq, _)| seq)
    }
}

/// The first place two entry lists in chain order differ: the lower seq
/// of the two entries there, and both, as `describe` says them.
fn first_mismatch(
    stored: &[(u64, u64)],
    rebuilt: &[(u64, u64)],
    describe: impl Fn(&(u64, u64)) -> (u64, String),
) -> Option<(u64, String)> {
    let at = (0..stored.len().max(rebuilt.len())).find(|&i| stored.get(i) != rebuilt.get(i))?;
    let (stored, rebuilt) = (
        stored.get(at).map(&describe),
        rebuilt.get(at).map(&describe),
    );
    let seq = [&stored, &rebuilt]
        .into_iter()
        .flatten()
        .map(|(seq, _)| *seq)
        .min()?;
    let say = |entry: Option<(u64, String)>| entry.map_or_else(|| "nothing".into(), |(_, s)| s);
    Some((
        seq,
        format!(
            "the time index has {} where the chain has {}",
            say(stored),
            say(rebuilt)
        ),
    ))
}

/// What reading records on from a [`Progress`] adds to the index.
#[derive(Debug)]
struct Scan {
    found: TimeIndex,
    /// Sessions started: id and seq; None when not looked for.
    starts: Option<Vec<(String, u64)>>,
}

impl Scan {
    /// A scan on from `progress`, looking for sessions' starts too or not.
    fn from(progress: Progress, with_starts: bool) -> Self {
        Self {
            found: TimeIndex {
                progress,
                ..TimeIndex::default()
            },
            starts: with_starts.then(Vec::new),
        }
    }

    /// Reads records from the progress on, up to `limit` of them. Returns
    /// how many it read.
    fn read(&mut self, store: &Store, limit: usize) -> Result<usize, AuditError> {
        let mut read = 0;
        for line in store.lines(self.found.progress.through + 1)?.take(limit) {
            let line = line?;
            let bytes = line.bytes();
            self.found.note(line.key, bytes);
            if let Some(starts) = &mut self.starts {
                starts.extend(started_session(bytes).map(|session| (session, line.key)));
            }
            read += 1;
        }
        Ok(read)
    }

    /// Writes what was found and the progress, in one batch.
    fn write(self, store: &Store) -> Result<(), AuditError> {
        let mut batch = sled::Batch::default();
        self.found.each_entry(|key, value| {
            batch.insert(key, value);
            Ok::<(), AuditError>(())
        })?;
        store.times.apply_batch(batch)?;
        store.index_session_starts(self.starts.as_deref().unwrap_or_default())
    }
}

/// A record's time, read from the start of its stored form (`{"seq":N,
/// "at_us":T,...`, as `Record::encode` writes it) without decoding the
/// rest; anything else is decoded in full.
fn record_time(bytes: &[u8]) -> Option<u64> {
    let fast = (|| {
        let rest = bytes.strip_prefix(b"{\"seq\":")?;
        let comma = rest.iter().position(|&b| b == b',')?;
        let rest = rest[comma..].strip_prefix(b",\"at_us\":")?;
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
    })();
    fast.or_else(|| Record::decode(bytes).ok().map(|r| r.at_us))
}

/// The session a `session_start` record starts. Only records whose payload
/// begins with that event's name are decoded (a string inside a payload
/// cannot hold the unescaped quotes looked for).
fn started_session(bytes: &[u8]) -> Option<String> {
    static MARK: LazyLock<memmem::Finder<'static>> =
        LazyLock::new(|| memmem::Finder::new(br#""payload":{"event":"session_start""#));
    MARK.find(bytes)?;
    let event = Record::decode(bytes).ok()?.event()?;
    (event.get("event")?.as_str()? == "session_start")
        .then(|| event.get("session")?.as_str().map(str::to_owned))
        .flatten()
}

impl Store {
    fn time_progress(&self) -> Result<Progress, AuditError> {
        Ok(self
            .times
            .get(PROGRESS_KEY)?
            .and_then(|v| Progress::decode(&v))
            .unwrap_or_default())
    }

    /// Indexes the records the writer has just committed, seq and time,
    /// in chain order, if the index reaches the record before them: the
    /// writer has their times at hand, where the indexer would read every
    /// record back (some 6% of what a statement record cost). Otherwise
    /// (the indexer is catching up) leaves them to the indexer.
    ///
    /// The writer calls this after it has indexed the commit's sessions'
    /// starts, and the progress is inserted after the entries, so in sled's
    /// log the progress comes after everything it vouches for: sled
    /// recovers a prefix of its log, and a crash that takes any of those
    /// takes the progress too, and the indexer reads those records again.
    pub(in crate::audit) fn index_committed_times(
        &self,
        times: &[(u64, u64)],
    ) -> Result<(), AuditError> {
        let Some(&(first, _)) = times.first() else {
            return Ok(());
        };
        let _indexing = lock(&self.indexing);
        let progress = self.time_progress()?;
        if progress.through.checked_add(1) != Some(first) {
            return Ok(());
        }
        let mut found = TimeIndex {
            progress,
            ..TimeIndex::default()
        };
        for &(seq, at_us) in times {
            found.note_time(seq, Some(at_us));
        }
        // One insert each, not a batch, which would seal sled's log buffer
        // at every commit (see `Store::apply`).
        found.each_entry(|key, value| {
            self.times.insert(key, value)?;
            Ok(())
        })
    }

    /// Indexes up to [`CHUNK`] records past the index's progress. Returns
    /// how many it read.
    pub(super) fn index_times(&self) -> Result<usize, AuditError> {
        let _indexing = lock(&self.indexing);
        let mut scan = Scan::from(self.time_progress()?, true);
        let read = scan.read(self, CHUNK)?;
        if read > 0 {
            scan.write(self)?;
        }
        Ok(read)
    }

    /// The time index as stored, for `audit verify` to compare with the
    /// chain.
    pub fn time_index(&self) -> Result<TimeIndex, AuditError> {
        let mut index = TimeIndex::default();
        for entry in &self.times {
            let (key, value) = entry?;
            // A minute or step: a prefix and 8 bytes, and 8 bytes.
            let exact = |bytes: &[u8]| Some(u64::from_be_bytes(bytes.try_into().ok()?));
            let pair = key.get(1..).and_then(exact).zip(exact(&value));
            match (key.first(), pair) {
                (Some(&MINUTE_PREFIX), Some(pair)) => index.minutes.push(pair),
                (Some(&STEP_PREFIX), Some(pair)) => index.steps.push(pair),
                _ => match Progress::decode(&value).filter(|_| &*key == PROGRESS_KEY) {
                    Some(progress) => index.progress = progress,
                    None => index.malformed.push(hex::encode(&key)),
                },
            }
        }
        Ok(index)
    }

    /// Empties the time index; the indexer then builds it again from the
    /// chain's start. Readers meanwhile read more of the chain, never less:
    /// the entries go in one batch.
    pub fn clear_time_index(&self) -> Result<(), AuditError> {
        let _indexing = lock(&self.indexing);
        let mut batch = sled::Batch::default();
        for key in self.times.iter().keys() {
            batch.remove(key?);
        }
        self.times.apply_batch(batch)?;
        Ok(())
    }

    /// Clears the time index and builds it again from the chain, here and
    /// now (the daemon's indexer is not running). Returns the records read.
    pub fn rebuild_time_index(&self) -> Result<u64, AuditError> {
        self.clear_time_index()?;
        let mut read = 0;
        loop {
            let chunk = self.index_times()?;
            read += chunk as u64;
            if chunk < CHUNK {
                return Ok(read);
            }
        }
    }

    /// Where a walk of the chain for records of `since_us` or later, and
    /// earlier than `until_us`, can start and end: the first seq to read,
    /// and the last (None: to the chain's end). Every such record is in
    /// between; the walk still filters by time.
    pub fn seq_bounds(
        &self,
        since_us: Option<u64>,
        until_us: Option<u64>,
    ) -> Result<(u64, Option<u64>), AuditError> {
        let first = match since_us {
            None => 1,
            Some(since) => self
                .times
                .range(key(MINUTE_PREFIX, 0)..=key(MINUTE_PREFIX, since / MINUTE_US))
                .next_back()
                .transpose()?
                .and_then(|(_, seq)| number(&seq))
                .unwrap_or(1),
        };
        let last = match until_us {
            None => None,
            Some(until) => self.last_seq_before(until)?,
        };
        Ok((first, last))
    }

    /// The last seq a walk for records earlier than `until` must read, if
    /// the index can bound it.
    fn last_seq_before(&self, until: u64) -> Result<Option<u64>, AuditError> {
        // Records past the indexer's progress count too: read them.
        let mut tail = Scan::from(self.time_progress()?, false);
        if tail.read(self, TAIL_LIMIT)? == TAIL_LIMIT {
            return Ok(None);
        }
        // The first minute whose seq starts records no older than `until`,
        // but for noted steps back.
        let minute = until.saturating_add(STEP_TOLERANCE_US).div_ceil(MINUTE_US);
        let stored = self
            .times
            .range(key(MINUTE_PREFIX, minute)..=key(MINUTE_PREFIX, u64::MAX))
            .next()
            .transpose()?
            .and_then(|(_, seq)| number(&seq));
        let Some(start) = stored.or_else(|| {
            tail.found
                .minutes
                .iter()
                .find(|&&(m, _)| m >= minute)
                .map(|&(_, seq)| seq)
        }) else {
            return Ok(None);
        };
        for step in self
            .times
            .range(key(STEP_PREFIX, start + 1)..=key(STEP_PREFIX, u64::MAX))
        {
            let (_, at_us) = step?;
            if number(&at_us).is_none_or(|at| at < until) {
                return Ok(None);
            }
        }
        if tail
            .found
            .steps
            .iter()
            .any(|&(seq, at)| seq > start && at < until)
        {
            return Ok(None);
        }
        Ok(Some(start - 1))
    }
}

/// The thread that keeps the time index up with the chain.
pub struct TimeIndexer {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl TimeIndexer {
    pub fn start(store: Store) -> Result<Self, AuditError> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("audit-times".into())
            .spawn(move || run(&store, &stopping))
            .map_err(|e| AuditError::Corrupt(format!("cannot start the time indexer: {e}")))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread once it has read what is committed (or one more
    /// chunk, while it catches up).
    pub fn stop(&mut self) {
        let (stopped, wake) = &*self.stop;
        *lock(stopped) = true;
        wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for TimeIndexer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(store: &Store, stop: &(Mutex<bool>, Condvar)) {
    let mut catching_up = false;
    loop {
        // Read before the stop is looked at: a stop after the writer's
        // last commit leaves the index up with it.
        let stopping = *lock(&stop.0);
        let read = match store.index_times() {
            Ok(read) => read,
            Err(e) => {
                // Queries are as exact without it; try again later.
                warn!("the audit store's time index stopped at an error: {e}");
                0
            }
        };
        if stopping {
            return;
        }
        if read == CHUNK && !catching_up {
            info!("indexing the times of the audit chain's earlier records");
        } else if read < CHUNK && catching_up {
            info!("the audit chain's times are indexed");
        }
        catching_up = read == CHUNK;
        if !catching_up {
            let (stopped, wake) = stop;
            let stopped = lock(stopped);
            if !*stopped {
                drop(wake.wait_timeout(stopped, INTERVAL));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_times_are_read_from_the_stored_form() {
        assert_eq!(
            record_time(br#"{"seq":12,"at_us":1795305600000000,"prev":"00"}"#),
            Some(1_795_305_600_000_000)
        );
        assert_eq!(record_time(b"not a record"), None);
    }

    #[test]
    fn progress_round_trips() {
        let p = Progress {
            through: 7,
            high_water_us: 9,
        };
        assert_eq!(Progress::decode(&p.encode()), Some(p));
        assert_eq!(Progress::decode(b"short"), None);
    }
}
