//! `portcullis audit verify`: walks the chain and the checkpoints and
//! names the first place where the store was edited, cut, reordered or
//! truncated.
//!
//! What each check catches:
//! * a payload that no longer matches its `payload_hash`: the event was
//!   edited;
//! * a header that no longer matches its `hash`: seq, time or hashes edited;
//! * a gap in the positions: records (block ends or whole blocks) deleted;
//! * a record whose seq differs from its position (its block's key plus
//!   its line in the block): records reordered or moved, or lines deleted
//!   or inserted inside a block (the lines after them shift);
//! * bytes that are not UTF-8 or a line that does not decode: edited;
//! * a `prev` that is not the previous record's hash: a record was
//!   rewritten with recomputed hashes (or inserted);
//! * a signed checkpoint whose seq is beyond the end of the chain: the
//!   chain was truncated; one whose hash differs: the records before it
//!   were rewritten consistently;
//! * fewer checkpoints than the separately kept count and checkpoint file:
//!   checkpoints deleted (to hide a truncation);
//! * an empty payload that no `retention_purge` record accounts for;
//! * a time index that is not the chain's (rebuilt as the walk goes and
//!   compared): `audit events` and `audit sessions` with `--since` or
//!   `--until` read only the part of the chain it names, so an edited
//!   index could hide records from them.

use std::collections::{BTreeMap, HashMap};

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

use super::{
    record::{payload_hash, Checkpoint, Hash, Record, GENESIS},
    source::{for_each_record, AuditSource},
    store::{RawEntry, TimeIndex},
    AuditError,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    Edited,
    Deleted,
    Reordered,
    Truncated,
    Checkpoint,
    Purge,
    /// The time index, not the chain: `audit reindex` mends it.
    Index,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Problem {
    /// The first seq affected.
    pub seq: u64,
    pub kind: ProblemKind,
    pub message: String,
}

/// The outcome of a verification.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verification {
    pub ok: bool,
    pub records: u64,
    /// Records whose payloads retention purged (hash kept).
    pub purged: u64,
    pub head_seq: u64,
    pub checkpoints: u64,
    pub last_checkpoint: Option<Checkpoint>,
    /// Records after the last checkpoint (not yet signed).
    pub unsigned_tail: u64,
    pub public_key: String,
    /// Every problem found, first (lowest seq) first.
    pub problems: Vec<Problem>,
}

impl Verification {
    /// The first problem, as one line for the terminal.
    pub fn first_problem(&self) -> Option<&Problem> {
        self.problems.first()
    }
}

/// Verifies everything `source` holds against `key`.
pub fn verify(source: &dyn AuditSource, key: &VerifyingKey) -> Result<Verification, AuditError> {
    let checkpoints = source.raw_checkpoints()?;
    let mut walk = Walk {
        prev: Some(GENESIS),
        ..Walk::default()
    };
    let mut decoded = Vec::new();
    for entry in &checkpoints {
        match serde_json::from_str::<Checkpoint>(&entry.value) {
            Ok(cp) => {
                walk.wanted.insert(cp.seq, None);
                decoded.push((entry.key, Some(cp)));
            }
            Err(_) => decoded.push((entry.key, None)),
        }
    }
    let file = source.file_checkpoint()?;
    if let Some(cp) = &file {
        walk.wanted.insert(cp.seq, None);
    }
    // Read before the walk: the chain then reaches at least as far. A
    // daemon that does not know the question has no index to check.
    let stored_times = source.time_index().ok();
    let indexed_through = stored_times.as_ref().map_or(0, |t| t.progress.through);
    let mut rebuilt_times = TimeIndex::default();
    for_each_record(source, 1, |entry| {
        walk.feed(entry);
        if entry.key <= indexed_through {
            rebuilt_times.note(entry.key, entry.value.as_bytes());
        }
        true
    })?;
    walk.check_purges();
    let meta = source.checkpoint_meta()?;
    let mut problems = walk.problems;
    let head = walk.head;
    let hash_at = |seq: u64| walk.wanted.get(&seq).copied().flatten();

    let mut last: Option<Checkpoint> = None;
    let mut previous_good_seq = 0;
    for (n, (key_number, cp)) in decoded.into_iter().enumerate() {
        let expected = n as u64 + 1;
        let Some(cp) = cp else {
            problems.push(problem(
                0,
                ProblemKind::Checkpoint,
                format!("checkpoint #{key_number} does not decode: it was edited"),
            ));
            continue;
        };
        if key_number != expected || cp.number != key_number {
            problems.push(problem(cp.seq, ProblemKind::Checkpoint, format!(
                "checkpoint #{expected} is missing or out of place (found #{} under #{key_number}): checkpoints were deleted or reordered",
                cp.number
            )));
        }
        if !cp.signature_valid(key) {
            problems.push(problem(
                cp.seq,
                ProblemKind::Checkpoint,
                format!(
                    "checkpoint #{} (seq {}) is not signed by key {}: it was forged or edited",
                    cp.number,
                    cp.seq,
                    hex::encode(key.to_bytes())
                ),
            ));
        } else {
            check_against_chain(&cp, head, hash_at(cp.seq), previous_good_seq, &mut problems);
            if hash_at(cp.seq) == Some(cp.hash) {
                previous_good_seq = cp.seq;
            }
        }
        last = Some(cp);
    }
    let count = last.as_ref().map_or(0, |c| c.number);
    if let Some(meta) = meta {
        if meta.number > count {
            problems.push(problem(meta.seq, ProblemKind::Truncated, format!(
                "the store counted {} checkpoints (the last at seq {}), only {count} remain: checkpoints #{}..#{} were deleted",
                meta.number, meta.seq, count + 1, meta.number
            )));
            if meta.seq > head {
                problems.push(truncated(
                    head,
                    meta.seq,
                    &format!("checkpoint #{}", meta.number),
                ));
            }
        }
    }
    if let Some(cp) = file {
        if cp.number > count {
            if !cp.signature_valid(key) {
                problems.push(problem(
                    cp.seq,
                    ProblemKind::Checkpoint,
                    "the checkpoint file's signature does not verify: it was forged or edited"
                        .into(),
                ));
            } else {
                problems.push(problem(cp.seq, ProblemKind::Truncated, format!(
                    "the checkpoint file holds signed checkpoint #{} (seq {}) that the store lacks: checkpoints were deleted",
                    cp.number, cp.seq
                )));
                check_against_chain(&cp, head, hash_at(cp.seq), previous_good_seq, &mut problems);
            }
        }
    }
    // Last, so that at the same seq a problem of the chain (which the
    // index's may only follow from) comes first.
    if let Some((seq, difference)) = stored_times.and_then(|t| t.first_difference(&rebuilt_times)) {
        problems.push(problem(
            seq,
            ProblemKind::Index,
            format!(
                "{difference}: the index was edited or is stale, so `audit events` and `audit \
                 sessions` with --since or --until may miss records; `portcullis audit \
                 reindex` builds it again from the chain"
            ),
        ));
    }
    problems.sort_by_key(|p| p.seq);
    Ok(Verification {
        ok: problems.is_empty(),
        records: walk.records,
        purged: walk.purged,
        head_seq: head,
        checkpoints: count,
        unsigned_tail: head.saturating_sub(last.as_ref().map_or(0, |c| c.seq)),
        last_checkpoint: last,
        public_key: hex::encode(key.to_bytes()),
        problems,
    })
}

fn problem(seq: u64, kind: ProblemKind, message: String) -> Problem {
    Problem { seq, kind, message }
}

fn truncated(head: u64, seq: u64, by: &str) -> Problem {
    problem(
        head + 1,
        ProblemKind::Truncated,
        format!(
        "the chain ends at seq {head} but {by} covers seq {seq}: records {}..{seq} were truncated",
        head + 1
    ),
    )
}

fn check_against_chain(
    cp: &Checkpoint,
    head: u64,
    hash: Option<Hash>,
    previous_good_seq: u64,
    problems: &mut Vec<Problem>,
) {
    let by = format!("signed checkpoint #{}", cp.number);
    if cp.seq > head {
        problems.push(truncated(head, cp.seq, &by));
    } else if hash.is_some_and(|h| h != cp.hash) {
        problems.push(problem(
            previous_good_seq + 1,
            ProblemKind::Edited,
            format!(
                "record {} differs from {by}: records {}..{} were rewritten with recomputed hashes",
                cp.seq,
                previous_good_seq + 1,
                cp.seq
            ),
        ));
    }
}

/// State of the walk over the chain.
#[derive(Default)]
struct Walk {
    expected: u64,
    prev: Option<Hash>,
    head: u64,
    records: u64,
    purged: u64,
    /// Hashes at the seqs checkpoints name.
    wanted: BTreeMap<u64, Option<Hash>>,
    /// Every empty payload, in runs: a purge empties long runs of records,
    /// and a store purged for years holds hundreds of millions of them.
    empty: Vec<EmptyRun>,
    /// Ranges each retention_purge record claims.
    purges: HashMap<u64, Vec<[u64; 2]>>,
    /// How far the previous record's seq was from its position, if it was:
    /// the lines after a line deleted or inserted inside a block are all
    /// shifted alike, and one problem says it.
    shift: Option<i128>,
    problems: Vec<Problem>,
}

impl Walk {
    fn feed(&mut self, entry: &RawEntry) {
        let key = entry.key;
        let expected = self.expected.max(1);
        self.records += 1;
        self.head = self.head.max(key);
        if key > expected {
            let what = if key - 1 == expected {
                format!("record {expected} is")
            } else {
                format!("records {expected}..{} are", key - 1)
            };
            self.problems.push(problem(
                expected,
                ProblemKind::Deleted,
                format!("{what} missing: deleted from the store"),
            ));
            self.prev = None;
        }
        let shift = self.shift.take();
        if key < self.expected {
            // Only blocks do this: one holds more lines than there are
            // positions before the next block's key.
            self.problems.push(problem(
                key,
                ProblemKind::Reordered,
                format!(
                    "position {key} is stored twice (a block overlaps the next): lines were \
                     inserted or blocks moved"
                ),
            ));
            self.prev = None;
            return;
        }
        self.expected = key.saturating_add(1);
        if entry.not_utf8 {
            self.problems.push(problem(
                key,
                ProblemKind::Edited,
                format!("record {key} is not valid UTF-8: it was edited on disk"),
            ));
            self.prev = None;
            return;
        }
        let record = match Record::decode(entry.value.as_bytes()) {
            Ok(r) => r,
            Err(e) => {
                self.problems.push(problem(
                    key,
                    ProblemKind::Edited,
                    format!("record {key} does not decode ({e}): it was edited on disk"),
                ));
                self.prev = None;
                return;
            }
        };
        if let Some(slot) = self.wanted.get_mut(&key) {
            *slot = Some(record.hash);
        }
        if record.seq != key {
            let offset = i128::from(record.seq) - i128::from(key);
            if shift != Some(offset) {
                self.problems.push(problem(
                    key,
                    ProblemKind::Reordered,
                    format!(
                        "position {key} holds record {}: records were reordered or moved, or \
                         deleted or inserted inside a block",
                        record.seq
                    ),
                ));
            }
            self.shift = Some(offset);
            self.prev = None;
            return;
        }
        match &record.payload {
            Some(payload) => {
                if payload_hash(payload.get()) != record.payload_hash {
                    self.problems.push(problem(
                        key,
                        ProblemKind::Edited,
                        format!("record {key} was edited: its event no longer matches its hash"),
                    ));
                }
                if let Some(event) = record.event() {
                    if event.get("event").and_then(|v| v.as_str()) == Some("retention_purge") {
                        let mut ranges: Vec<[u64; 2]> = event
                            .get("ranges")
                            .and_then(|r| serde_json::from_value(r.clone()).ok())
                            .unwrap_or_default();
                        ranges.retain(|[first, last]| first <= last);
                        ranges.sort_unstable();
                        self.purges.insert(key, ranges);
                    }
                }
            }
            None => {
                self.purged += 1;
                match self.empty.last_mut() {
                    Some(run)
                        if run.last.checked_add(1) == Some(key)
                            && run.purged_by == record.purged_by =>
                    {
                        run.last = key;
                    }
                    _ => self.empty.push(EmptyRun {
                        first: key,
                        last: key,
                        purged_by: record.purged_by,
                    }),
                }
            }
        }
        if record.expected_hash() != record.hash {
            self.problems.push(problem(
                key,
                ProblemKind::Edited,
                format!("record {key} was edited: its seq, time or hashes changed"),
            ));
        } else if let Some(prev) = self.prev {
            if record.prev != prev {
                let before = key - 1;
                self.problems.push(problem(before, ProblemKind::Edited, format!(
                    "record {key} does not link to record {before}: record {before} was rewritten (hashes recomputed) or replaced"
                )));
            }
        }
        self.prev = Some(record.hash);
    }

    fn check_purges(&mut self) {
        for run in &self.empty {
            let ranges = run
                .purged_by
                .and_then(|p| self.purges.get(&p))
                .map_or(&[][..], Vec::as_slice);
            for (first, last) in uncovered(run.first, run.last, ranges) {
                let message = if first == last {
                    format!(
                        "record {first}'s event was removed without a retention purge recording it"
                    )
                } else {
                    format!(
                        "records {first}..{last}'s events were removed without a retention purge \
                         recording them"
                    )
                };
                self.problems
                    .push(problem(first, ProblemKind::Purge, message));
            }
        }
    }
}

/// Consecutive records whose payloads are empty, naming the same purge.
struct EmptyRun {
    first: u64,
    last: u64,
    purged_by: Option<u64>,
}

/// The parts of `first..=last` that no range of `ranges` (sorted, each
/// `[first, last]`) covers.
fn uncovered(first: u64, last: u64, ranges: &[[u64; 2]]) -> Vec<(u64, u64)> {
    let mut gaps = Vec::new();
    let mut next = first;
    for &[from, to] in ranges {
        if from > last {
            break;
        }
        if to < next {
            continue;
        }
        if from > next {
            gaps.push((next, from - 1));
        }
        match to.checked_add(1) {
            Some(after) if after <= last => next = after,
            _ => return gaps,
        }
    }
    gaps.push((next, last));
    gaps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parts_of_a_run_no_purge_covers_are_found() {
        assert_eq!(uncovered(5, 9, &[]), [(5, 9)]);
        assert_eq!(uncovered(5, 9, &[[1, 20]]), []);
        assert_eq!(
            uncovered(5, 9, &[[1, 5], [7, 7], [9, u64::MAX]]),
            [(6, 6), (8, 8)]
        );
        assert_eq!(
            uncovered(5, 9, &[[1, 2], [6, 8], [12, 14]]),
            [(5, 5), (9, 9)]
        );
        assert_eq!(uncovered(5, 9, &[[1, 6], [3, 8]]), [(9, 9)]);
        assert_eq!(uncovered(u64::MAX, u64::MAX, &[[0, u64::MAX]]), []);
    }
}
