//! Finding the records sled's index lost, when the store opens.
//!
//! A commit is confirmed once its blocks are durable in a segment file.
//! Their extents go into sled's index at once, but sled is made durable
//! only about once a second (and with every commit that sled alone holds
//! part of: data-subject index entries, purges, checkpoints), not per
//! commit. A crash or `kill -9` can therefore take the last extents with
//! it, never the records. [`Store::reindex_tail`] finds those records
//! again: it reads the segments on from the end of the last indexed block
//! and indexes every block of records that continues the chain. (The
//! writer syncs sled on its first commit, so there always is such a block
//! when anything was lost.)
//!
//! What a scan meets, and does with it:
//! - a record that continues the chain (the next seq, `prev` the hash
//!   before it, its own hashes right): indexed;
//! - a record at or below the indexed head: a copy that a compaction or
//!   purge appended, indexed where it is already. Skipped;
//! - zeros: what a segment grows by ahead of its blocks (see
//!   `segment::GROWTH_BYTES`). Skipped;
//! - a record that repeats seqs the scan already found, at the start of a
//!   block: a commit failed after its blocks reached the file, and the
//!   next commit wrote the same seqs again. The later one counts, as it
//!   did for the writer;
//! - anything else (the torn end of a write the crash cut short, a
//!   `retention_purge` record, whose commit syncs sled before it is
//!   confirmed, or bytes that are not records at all): the rest of that
//!   segment is left unread. When that was the last segment, the next
//!   append starts a new one, so no record is ever written behind such
//!   bytes.
//!
//! What a crash can leave that the scan cannot tell apart from what was
//! confirmed: the records of a commit that failed after its blocks were
//! durable and was never retried. They are indexed: the events did
//! happen, the gateway refused what waited for them. (The data-subject
//! entries of a commit whose blocks never became durable stay in sled,
//! where `Store::subject_hits` leaves them out.)

use tracing::warn;

use super::{ChainEntries, Store};
use crate::audit::{
    block,
    record::{payload_hash, Hash, Record, GENESIS},
    segment::Extent,
    AuditError,
};

impl Store {
    /// Indexes the records in the segments after the last indexed block
    /// that continue the chain, and makes the index durable. Returns how
    /// many records it indexed.
    pub(in crate::audit) fn reindex_tail(&self) -> Result<u64, AuditError> {
        let (head_seq, head_hash) = self
            .head()?
            .map_or((0, GENESIS), |record| (record.seq, record.hash));
        // Where the indexed chain ends in the segments. The writer syncs
        // sled on its first commit, so an index that does not end in an
        // extent (empty, or an older store's inline block) has lost none:
        // anything in the segments then was never confirmed, or the index
        // was edited, which `audit verify` is there to report.
        let Some(indexed_end) = self.chain.last()?.and_then(|(_, v)| Extent::decode(&v)) else {
            return Ok(0);
        };
        let (first, offset) = (indexed_end.segment, indexed_end.end());
        let numbers = self.segments.numbers()?;
        let mut tail = Tail::after(head_seq, head_hash);
        let mut clean_end = true;
        for &segment in numbers.range(first..) {
            let start = if segment == first { offset } else { 0 };
            let bytes = self.segments.read_from(segment, start)?;
            clean_end = tail.scan(segment, start, &bytes);
            if !clean_end {
                warn!(
                    segment,
                    "an audit segment ends in bytes that are not records of the chain \
                     (a write cut short?); they stay in the file, unread"
                );
            }
        }
        if !clean_end {
            self.segments.start_next_segment();
        }
        let found = tail.hashes.len() as u64;
        if found > 0 {
            let mut chain = ChainEntries::default();
            for (first, extent) in tail.blocks {
                chain.insert_extent(first, extent);
            }
            self.apply(chain, None)?;
            self.sync()?;
            warn!(
                records = found,
                from_seq = head_seq + 1,
                "audit records the index lost (the gateway stopped without syncing it) \
                 indexed again from the segment files"
            );
        }
        Ok(found)
    }
}

/// The records found after the indexed head, as blocks.
struct Tail {
    head_seq: u64,
    head_hash: Hash,
    /// The hashes of the records found, seq `head_seq + 1` on.
    hashes: Vec<Hash>,
    /// The blocks found: first seq and where the block is.
    blocks: Vec<(u64, Extent)>,
}

/// What a record is to the chain the scan has so far.
enum Link {
    /// At or below the indexed head.
    Indexed,
    /// The next record, or a retry of found ones (which it replaces).
    Continues,
    Broken,
}

impl Tail {
    fn after(head_seq: u64, head_hash: Hash) -> Self {
        Self {
            head_seq,
            head_hash,
            hashes: Vec::new(),
            blocks: Vec::new(),
        }
    }

    /// Reads the records in `bytes`, segment `segment` from byte `start`
    /// on. Returns whether it read to the end.
    fn scan(&mut self, segment: u32, start: u64, bytes: &[u8]) -> bool {
        let mut at = 0;
        // The last record read was added to the last block and a line
        // break follows it: the next record is in the same block.
        let mut same_block = false;
        while at < bytes.len() {
            // Zeros a segment grew by ahead of its blocks; a restart left
            // them behind, or nothing was written over them yet.
            if bytes[at] == 0 {
                at += bytes[at..]
                    .iter()
                    .position(|&b| b != 0)
                    .unwrap_or(bytes.len() - at);
                same_block = false;
                continue;
            }
            // Records are compact JSON objects; whitespace here is not a
            // record (serde would skip it).
            if bytes[at] != b'{' {
                return false;
            }
            let mut records = serde_json::Deserializer::from_slice(&bytes[at..]).into_iter();
            let Some(Ok(record)) = records.next() else {
                return false;
            };
            let end = at + records.byte_offset();
            let link = self.link(&record, !same_block);
            match link {
                Link::Broken => return false,
                Link::Indexed => {}
                Link::Continues if same_block => {
                    let (_, extent) = self.blocks.last_mut().expect("same_block");
                    let Ok(len) = u32::try_from(start + end as u64 - extent.offset) else {
                        return false;
                    };
                    extent.len = len;
                }
                Link::Continues => {
                    let Ok(len) = u32::try_from(end - at) else {
                        return false;
                    };
                    let offset = start + at as u64;
                    self.blocks.push((
                        record.seq,
                        Extent {
                            segment,
                            offset,
                            len,
                        },
                    ));
                }
            }
            let separated = bytes.get(end) == Some(&block::SEPARATOR);
            same_block = separated && matches!(link, Link::Continues);
            at = end + usize::from(separated);
        }
        true
    }

    /// Adds `record` to the chain found so far, if it continues it.
    /// `starts_block`: no line break joins it to the record before.
    fn link(&mut self, record: &Record, starts_block: bool) -> Link {
        if record.seq <= self.head_seq {
            return Link::Indexed;
        }
        let Ok(index) = usize::try_from(record.seq - self.head_seq - 1) else {
            return Link::Broken;
        };
        if index > self.hashes.len() {
            return Link::Broken;
        }
        let prev = match index {
            0 => self.head_hash,
            _ => self.hashes[index - 1],
        };
        let intact = record.prev == prev
            && record.hash == record.expected_hash()
            && record
                .payload
                .as_ref()
                .is_some_and(|payload| payload_hash(payload.get()) == record.payload_hash);
        if !intact || is_purge(record) {
            return Link::Broken;
        }
        if index < self.hashes.len() {
            // A retry replaces what it repeats from where it starts; a
            // failed commit's blocks began at its first seq too.
            let replaced = self
                .blocks
                .iter()
                .position(|&(first, _)| first == record.seq);
            let Some(replaced) = replaced.filter(|_| starts_block) else {
                return Link::Broken;
            };
            self.blocks.truncate(replaced);
            self.hashes.truncate(index);
        }
        self.hashes.push(record.hash);
        Link::Continues
    }
}

/// A retention purge syncs sled before it is confirmed: one the index
/// lacks was not, and its rewritten blocks (below the head) were never
/// indexed either.
fn is_purge(record: &Record) -> bool {
    record
        .event()
        .is_some_and(|event| event.get("event").and_then(|e| e.as_str()) == Some("retention_purge"))
}
