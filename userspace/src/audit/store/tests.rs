//! The block-aware reads, the formats of older stores (one record per
//! value, blocks inline in sled), purges inside blocks and damaged blocks,
//! against a real store (sled and segment files) in a temp dir.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant, SystemTime},
};

use serde_json::value::RawValue;

use super::*;
use crate::audit::{
    block::Blocks,
    keys::{self, Keys},
    record::GENESIS,
    retention::Retention,
    segment::{self, Extent, SEGMENT_DIR},
    source::LocalSource,
    subject,
    verify::{verify, ProblemKind, Verification},
    writer::PurgeSummary,
    AuditEvent, CheckpointPolicy, Recorder, SessionEnd, SessionStart, SledRecorder, Statement,
};

/// `n` chained records with payloads of varied length.
fn chain(n: u64) -> Vec<Record> {
    let mut prev = GENESIS;
    (1..=n)
        .map(|seq| {
            let payload = format!(
                r#"{{"event":"test","n":{seq},"pad":"{}"}}"#,
                "x".repeat((seq % 7) as usize * 10)
            );
            let r = Record::new(
                seq,
                seq * 1000,
                prev,
                RawValue::from_string(payload).unwrap(),
            );
            prev = r.hash;
            r
        })
        .collect()
}

/// How a test store holds its records.
#[derive(Clone, Copy)]
enum Format {
    /// As the writer stores them: blocks of at most this many bytes in
    /// segment files.
    Segments(usize),
    /// As stores before segments did: blocks inline in sled.
    InlineBlocks(usize),
    /// As stores before blocks did: one record per sled value.
    OneRecordPerValue,
}

/// A store holding `records` in `format`.
fn store_with(records: &[Record], format: Format) -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("state")).unwrap();
    let cap = match format {
        Format::Segments(cap) | Format::InlineBlocks(cap) => cap,
        Format::OneRecordPerValue => 0,
    };
    let mut blocks = Blocks::with_cap(cap);
    for r in records {
        blocks.push(r.seq, &r.encode()).unwrap();
    }
    let blocks = blocks.finish();
    let mut batch = ChainEntries::default();
    match format {
        Format::Segments(_) => store.append_blocks(&blocks, &mut batch).unwrap(),
        Format::InlineBlocks(_) | Format::OneRecordPerValue => {
            for (first, bytes) in blocks {
                batch.insert(first, bytes);
            }
        }
    }
    store.apply(batch, None).unwrap();
    store.sync().unwrap();
    (dir, store)
}

/// Starts the writer on `store`, records two sessions (four records, one
/// commit) and stops it.
fn continue_with_two_sessions(dir: &Path, store: &Store) {
    let state = dir.join("state");
    let recorder = writer(&state, store);
    record_sessions(&recorder, &[("s-1", "crm"), ("s-2", "crm")]);
    recorder.close().unwrap();
}

/// (key, number of lines) of every block.
fn layout(store: &Store) -> Vec<(u64, usize)> {
    store
        .chain
        .iter()
        .map(|item| {
            let (k, _) = item.unwrap();
            let block = store.block_at(key_u64(&k)).unwrap().unwrap();
            (block.key, block::lines(&block.bytes).count())
        })
        .collect()
}

/// Block `key`'s bytes.
fn block_bytes(store: &Store, key: u64) -> Vec<u8> {
    store.block_at(key).unwrap().unwrap().bytes.to_vec()
}

fn verified(dir: &Path, store: &Store) -> Verification {
    let state = dir.join("state");
    Keys::load_or_create(&state).unwrap();
    let key = keys::public_key(&state).unwrap();
    verify(&LocalSource::new(store.clone()), &key).unwrap()
}

#[test]
fn records_are_found_across_block_boundaries() {
    let records = chain(40);
    let (_dir, store) = store_with(&records, Format::Segments(1200));
    let blocks = layout(&store);
    assert!(blocks.len() > 4, "several blocks: {blocks:?}");
    assert!(
        blocks[..blocks.len() - 1].iter().all(|&(_, n)| n > 1),
        "{blocks:?}"
    );
    for r in &records {
        let found = store.record(r.seq).unwrap().unwrap();
        assert_eq!((found.seq, found.hash), (r.seq, r.hash));
    }
    assert!(store.record(41).unwrap().is_none());
    assert!(store.record(u64::MAX).unwrap().is_none());
    assert!(store.record(0).unwrap().is_none());
    assert_eq!(store.head().unwrap().unwrap().seq, 40);
}

#[test]
fn raw_records_key_each_line_by_its_position() {
    let records = chain(40);
    let (_dir, store) = store_with(&records, Format::Segments(1200));
    let all = store.raw_records(1, usize::MAX).unwrap();
    assert_eq!(all.len(), 40);
    for (entry, r) in all.iter().zip(&records) {
        assert_eq!(entry.key, r.seq);
        assert_eq!(entry.value.as_bytes(), r.encode());
        assert!(!entry.not_utf8);
    }
    // From inside a block, pages that end inside blocks.
    let (second, _) = layout(&store)[1];
    let from = second + 1;
    let mut keys = Vec::new();
    let mut next = from;
    loop {
        let page = store.raw_records(next, 3).unwrap();
        keys.extend(page.iter().map(|e| e.key));
        match page.last() {
            Some(last) if page.len() == 3 => next = last.key + 1,
            _ => break,
        }
    }
    assert_eq!(keys, (from..=40).collect::<Vec<_>>());
    assert!(store.raw_records(41, 10).unwrap().is_empty());
}

#[test]
fn old_single_record_values_read_and_the_writer_continues_them() {
    let records = chain(12);
    let (dir, store) = store_with(&records, Format::OneRecordPerValue);
    assert_eq!(layout(&store), (1..=12).map(|k| (k, 1)).collect::<Vec<_>>());
    assert_eq!(store.record(7).unwrap().unwrap().hash, records[6].hash);
    assert_eq!(store.head().unwrap().unwrap().seq, 12);
    assert_eq!(store.raw_records(5, 2).unwrap()[1].key, 6);

    continue_with_two_sessions(dir.path(), &store);
    let blocks = layout(&store);
    assert_eq!(blocks[12].0, 13, "{blocks:?}");
    assert!(
        blocks[12].1 > 1,
        "the new records share a block: {blocks:?}"
    );
    let result = verified(dir.path(), &store);
    assert!(result.ok, "{:?}", result.problems);
    assert_eq!(result.records, 16);
}

#[test]
fn inline_blocks_of_the_previous_version_read_and_the_writer_continues_them() {
    let records = chain(30);
    let (dir, store) = store_with(&records, Format::InlineBlocks(1200));
    let old = layout(&store);
    assert!(old
        .iter()
        .all(|&(k, _)| store.block_at(k).unwrap().unwrap().extent.is_none()));
    let segments = dir.path().join("state/audit").join(SEGMENT_DIR);
    drop(store);
    let store = Store::open_existing(&dir.path().join("state")).unwrap();
    assert_eq!(verified(dir.path(), &store).records, 30);
    assert!(
        !segments.exists(),
        "reading an old store leaves it as it was"
    );

    continue_with_two_sessions(dir.path(), &store);
    let now = layout(&store);
    assert_eq!(&now[..old.len()], &old[..], "old blocks untouched");
    let new = store.block_at(31).unwrap().unwrap();
    assert!(new.extent.is_some(), "new records go to a segment");
    assert_eq!(store.record(7).unwrap().unwrap().hash, records[6].hash);
    let result = verified(dir.path(), &store);
    assert!(result.ok, "{:?}", result.problems);
    assert_eq!(result.records, 34);
}

/// A commit interval long enough that events recorded together without
/// awaiting them are one commit.
fn policy() -> CheckpointPolicy {
    CheckpointPolicy {
        commit_interval: Duration::from_secs(1),
        ..CheckpointPolicy::default()
    }
}

/// The store's writer, with the keys under `state`.
/// A fresh store in a temp dir, with a writer recording into it: the
/// temp dir (which holds the files until the test ends), the state
/// directory in it, the store and the writer.
fn recording() -> (tempfile::TempDir, PathBuf, Store, SledRecorder) {
    recording_with(|store| store)
}

/// [`recording`], with `configure` applied to the store before anything is
/// recorded.
fn recording_with(
    configure: impl FnOnce(Store) -> Store,
) -> (tempfile::TempDir, PathBuf, Store, SledRecorder) {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let store = configure(Store::open(&state).unwrap());
    let recorder = writer(&state, &store);
    (dir, state, store, recorder)
}

fn writer(state: &Path, store: &Store) -> SledRecorder {
    SledRecorder::start(
        store.clone(),
        Keys::load_or_create(state).unwrap(),
        policy(),
    )
    .unwrap()
}

fn session_start(session: &str, listener: &str) -> AuditEvent {
    AuditEvent::SessionStart(SessionStart {
        session: session.to_string(),
        listener: listener.to_string(),
        protocol: "tcp",
        peer: "127.0.0.1:40000".parse().unwrap(),
        principal: None,
        origin: None,
    })
}

/// Runs `future` to its end on a runtime of its own (timers and I/O off:
/// the writer's acknowledgements need neither).
fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(future)
}

/// Records a start and an end per session, all in one commit.
fn record_sessions(recorder: &SledRecorder, sessions: &[(&str, &str)]) {
    block_on(async {
        let mut acks = Vec::new();
        for (session, listener) in sessions {
            acks.push(recorder.record(session_start(session, listener)));
        }
        for (session, _) in sessions {
            acks.push(recorder.record(AuditEvent::SessionEnd(SessionEnd {
                session: session.to_string(),
                bytes_from_client: 1,
                bytes_from_server: 2,
                duration_ms: 3,
                error: None,
            })));
        }
        for ack in acks {
            ack.durable().await.unwrap();
        }
    });
}

/// Purges every payload of resource `old` now, then stops the writer.
fn purge_old_now_and_close(recorder: &SledRecorder) -> PurgeSummary {
    let retention = Retention {
        default_days: 10_000,
        per_resource: BTreeMap::from([("old".to_string(), 0)]),
    };
    let summary = block_on(recorder.purge(retention, SystemTime::now())).unwrap();
    recorder.close().unwrap();
    summary
}

/// Segment numbers of the files in the store's segment directory.
fn segment_files(state: &Path) -> BTreeSet<u32> {
    std::fs::read_dir(state.join("audit").join(SEGMENT_DIR))
        .unwrap()
        .map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".seg").unwrap().parse().unwrap()
        })
        .collect()
}

#[test]
fn a_purge_deletes_the_segment_files_no_block_is_stored_in_any_more() {
    // Every commit starts a segment of its own.
    let (dir, state, store, recorder) = recording_with(|store| store.with_segment_limit(1));
    for session in ["old-1", "old-2", "old-3"] {
        record_sessions(&recorder, &[(session, "old")]);
    }
    record_sessions(&recorder, &[("kept-1", "kept")]);
    let before = segment_files(&state);
    assert!(before.len() >= 4, "{before:?}");

    let summary = purge_old_now_and_close(&recorder);
    assert_eq!(summary.records, 6);

    let after = segment_files(&state);
    let referenced: BTreeSet<u32> = store
        .chain
        .iter()
        .filter_map(|item| Extent::decode(&item.unwrap().1).map(|e| e.segment))
        .collect();
    let active = *after.last().unwrap();
    assert!(after.len() < before.len(), "{before:?} -> {after:?}");
    assert!(
        after.iter().all(|s| referenced.contains(s) || *s == active),
        "left: {after:?}, named by the chain: {referenced:?}"
    );
    assert!(referenced.is_subset(&after), "{referenced:?} {after:?}");
    let result = verified(dir.path(), &store);
    assert!(result.ok, "{:?}", result.problems);
    assert_eq!(result.purged, 6);
    let kept = store
        .raw_records(1, usize::MAX)
        .unwrap()
        .into_iter()
        .filter(|e| e.value.contains("kept-1"))
        .count();
    assert_eq!(kept, 2, "the kept session's records still read");
}

#[test]
fn a_purge_compacts_a_segment_it_mostly_emptied() {
    let (dir, state, store, recorder) = recording_with(|store| store.with_segment_limit(64 * 1024));
    // One small block that stays, then a segment's worth that expires.
    record_sessions(&recorder, &[("kept-1", "kept")]);
    let old: Vec<String> = (0..150).map(|i| format!("old-{i}")).collect();
    let old: Vec<(&str, &str)> = old.iter().map(|s| (s.as_str(), "old")).collect();
    record_sessions(&recorder, &old);
    let kept_block = store.block_at(1).unwrap().unwrap();
    assert_eq!(kept_block.extent.unwrap().segment, 1);
    assert!(store.segments.file_len(1).unwrap() > 64 * 1024);

    let summary = purge_old_now_and_close(&recorder);
    assert_eq!(summary.records, 300);

    let moved = store.block_at(1).unwrap().unwrap();
    assert_eq!(moved.bytes, kept_block.bytes, "the same bytes, elsewhere");
    assert_ne!(moved.extent.unwrap().segment, 1);
    assert!(
        !segment_files(&state).contains(&1),
        "{:?}",
        segment_files(&state)
    );
    let result = verified(dir.path(), &store);
    assert!(result.ok, "{:?}", result.problems);
    assert_eq!(result.purged, 300);
}

#[test]
fn a_block_looked_up_before_a_purge_still_reads_while_its_reader_holds_the_pin() {
    // Every commit starts a segment of its own: the purge rewrites the
    // first block elsewhere, frees its old bytes and deletes its file.
    let (dir, state, store, recorder) = recording_with(|store| store.with_segment_limit(1));
    record_sessions(&recorder, &[("old-1", "old"), ("kept-1", "kept")]);
    record_sessions(&recorder, &[("kept-2", "kept")]);

    // A reader looks the first block up, as an audit query does ...
    let pinned = store.segments.pin();
    let (key, named) = store.chain.first().unwrap().unwrap();
    let extent = Extent::decode(&named).unwrap();
    let bytes = store.segments.read(extent).unwrap();
    std::thread::scope(|scope| {
        let purge = scope.spawn(|| purge_old_now_and_close(&recorder));
        // ... the purge commits the block's rewrite ...
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.chain.get(&key).unwrap().as_ref() == Some(&named) {
            assert!(Instant::now() < deadline, "the purge never committed");
            std::thread::sleep(Duration::from_millis(5));
        }
        // ... but waits for the reader before freeing the old bytes.
        std::thread::sleep(Duration::from_millis(200));
        assert!(!purge.is_finished());
        assert_eq!(store.segments.read(extent).unwrap(), bytes);
        drop(pinned);
        assert_eq!(purge.join().unwrap().records, 2);
    });
    assert!(!segment_files(&state).contains(&extent.segment));
    let result = verified(dir.path(), &store);
    assert!(result.ok, "{:?}", result.problems);
}

#[test]
fn a_purge_rewrites_lines_inside_blocks_and_keeps_the_rest() {
    let (dir, state, store, recorder) = recording();
    // Alternating resources inside the same blocks.
    let sessions: Vec<(String, &str)> = (0..20)
        .map(|i| (format!("s-{i}"), if i % 2 == 0 { "old" } else { "kept" }))
        .collect();
    let sessions: Vec<(&str, &str)> = sessions.iter().map(|(s, l)| (s.as_str(), *l)).collect();
    record_sessions(&recorder, &sessions);
    let before = layout(&store);
    assert!(before.iter().any(|&(_, n)| n > 4), "{before:?}");
    let untouched: Vec<String> = store
        .raw_records(1, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|e| e.value)
        .collect();

    let summary = purge_old_now_and_close(&recorder);
    assert_eq!(summary.records, 20);
    let purge_seq = summary.purge_seq.unwrap();
    assert_eq!(purge_seq, 41);

    let after = layout(&store);
    assert_eq!(
        &after[..before.len()],
        &before[..],
        "same blocks, same lines"
    );
    assert_eq!(after.last(), Some(&(41, 1)));
    // The replaced blocks' bytes are gone from the segment files.
    let mut segment_bytes = Vec::new();
    for entry in std::fs::read_dir(state.join("audit/segments")).unwrap() {
        segment_bytes.extend(std::fs::read(entry.unwrap().path()).unwrap());
    }
    let purged = br#""listener":"old""#;
    assert!(!segment_bytes.windows(purged.len()).any(|w| w == purged));
    assert!(segment_bytes
        .windows(17)
        .any(|w| w == br#""listener":"kept""#));
    for (entry, old) in store.raw_records(1, 40).unwrap().iter().zip(&untouched) {
        let record = Record::decode(entry.value.as_bytes()).unwrap();
        let event = Record::decode(old.as_bytes()).unwrap().event().unwrap();
        let session = event["session"].as_str().unwrap();
        let n: usize = session[2..].parse().unwrap();
        if n % 2 == 0 {
            assert!(record.payload.is_none(), "{}", entry.value);
            assert_eq!(record.purged_by, Some(purge_seq));
        } else {
            assert_eq!(&entry.value, old, "kept byte for byte");
        }
    }
    let result = verified(dir.path(), &store);
    assert!(result.ok, "{:?}", result.problems);
    assert_eq!(result.purged, 20);
}

#[test]
fn damaged_lines_are_reported_at_their_seq() {
    let records = chain(30);
    let (dir, store) = store_with(&records, Format::Segments(1500));
    let (key, lines) = layout(&store)[1];
    assert!(lines >= 3);
    let block = block_bytes(&store, key);

    // A byte that is not UTF-8 in the second line of the second block.
    let mut bad = block.clone();
    let second = bad.iter().position(|&b| b == b'\n').unwrap() + 1;
    bad[second + 20] = 0xff;
    store.chain.insert(key.to_be_bytes(), bad).unwrap();
    let result = verified(dir.path(), &store);
    let first = result.first_problem().unwrap();
    assert_eq!(first.seq, key + 1, "{:?}", result.problems);
    assert!(first.message.contains("not valid UTF-8"), "{first:?}");
    assert!(store.raw_records(key + 1, 1).unwrap()[0].not_utf8);

    // An undecodable line, then an empty value.
    let mut bad = block.clone();
    bad.insert(second, b'{');
    store.chain.insert(key.to_be_bytes(), bad).unwrap();
    let result = verified(dir.path(), &store);
    let first = result.first_problem().unwrap();
    assert_eq!(first.seq, key + 1, "{:?}", result.problems);
    assert!(first.message.contains("does not decode"), "{first:?}");
    assert!(store.record(key + 1).is_err());
    // Tampering can also store a block inline, as older stores did.
    store.chain.insert(key.to_be_bytes(), block).unwrap();
    store.chain.insert(31u64.to_be_bytes(), b"").unwrap();
    let result = verified(dir.path(), &store);
    assert_eq!(result.first_problem().unwrap().seq, 31);
    let err = store.head().unwrap_err().to_string();
    assert!(
        err.contains("the last chain record (position 31) does not decode"),
        "{err}"
    );
}

#[test]
fn lines_moved_inside_blocks_are_reported_once_at_their_position() {
    let records = chain(30);
    let (dir, store) = store_with(&records, Format::Segments(1500));
    let (key, lines) = layout(&store)[1];
    assert!(lines >= 4);
    let block = block_bytes(&store, key);
    let mut parts: Vec<&[u8]> = block::lines(&block).collect();
    // Delete the second line: every line after it shifts.
    parts.remove(1);
    store
        .chain
        .insert(key.to_be_bytes(), parts.join(&b'\n'))
        .unwrap();
    let result = verified(dir.path(), &store);
    let first = result.first_problem().unwrap();
    assert_eq!(first.seq, key + 1, "{:?}", result.problems);
    assert!(
        first
            .message
            .contains(&format!("position {} holds record {}", key + 1, key + 2)),
        "{first:?}"
    );
    let shifted = result
        .problems
        .iter()
        .filter(|p| p.kind == ProblemKind::Reordered)
        .count();
    assert_eq!(shifted, 1, "{:?}", result.problems);

    // Insert a copy of the block's last line: positions overlap the next
    // block's.
    let mut parts: Vec<&[u8]> = block::lines(&block).collect();
    parts.push(parts[parts.len() - 1]);
    store
        .chain
        .insert(key.to_be_bytes(), parts.join(&b'\n'))
        .unwrap();
    let result = verified(dir.path(), &store);
    let first = result.first_problem().unwrap();
    let last = key + lines as u64 - 1;
    assert_eq!(first.seq, last + 1, "{:?}", result.problems);
}

/// sled holds only extents, so heavy commits of statement-sized records
/// leave no blob files. (When blocks were sled values, 8 KiB blocks left
/// 20 per 100,000 records.)
#[test]
fn heavy_recording_writes_no_blob_files() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("state")).unwrap();
    let blob_dir = dir.path().join("state/audit/chain/blobs");
    let mut prev = GENESIS;
    let mut seq = 0u64;
    let mut commit = 0usize;
    while seq < 30_000 {
        commit += 1;
        let mut blocks = Blocks::default();
        for _ in 0..[1, 3, 17, 64, 200, 1024][commit % 6] {
            seq += 1;
            let payload = format!(
                r#"{{"event":"statement","session":"3f1c2a9e-{seq:08}","resource":"pgbench","protocol":"extended","text":"SELECT abalance FROM pgbench_accounts WHERE aid = $1;","parameters":["{}"],"duration_us":{},"rows_returned":1,"rows":1,"command_tag":"SELECT 1","error":null}}"#,
                seq * 7919 % 100_000,
                seq % 997,
            );
            let r = Record::new(seq, seq, prev, RawValue::from_string(payload).unwrap());
            prev = r.hash;
            blocks.push(seq, &r.encode()).unwrap();
        }
        let mut batch = ChainEntries::default();
        store.append_blocks(&blocks.finish(), &mut batch).unwrap();
        store.apply(batch, None).unwrap();
        store.sync().unwrap();
        let blobs: Vec<_> = std::fs::read_dir(&blob_dir).unwrap().collect();
        assert!(blobs.is_empty(), "after {seq} records: {blobs:?}");
    }
    for item in store.chain.iter() {
        let (_, value) = item.unwrap();
        assert!(Extent::decode(&value).is_some(), "{value:?}");
    }
}

#[test]
fn sync_lists_the_blob_directory_only_when_it_changed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("state")).unwrap();
    let settled = |store: &Store| store.blobs.lock().unwrap().settled.is_some();
    store.sync().unwrap();
    // Just created: too recent to trust an unchanged time.
    assert!(!settled(&store));
    std::thread::sleep(MTIME_SETTLED + Duration::from_millis(200));
    store.sync().unwrap();
    assert!(settled(&store));
    // A value past the blob threshold: sled writes a blob file, the
    // directory's time moves, and the next sync finds and syncs the file.
    store
        .chain
        .insert(1u64.to_be_bytes(), vec![b'x'; 300 * 1024])
        .unwrap();
    store.sync().unwrap();
    let scan = store.blobs.lock().unwrap();
    assert_eq!(scan.synced.len(), 1, "{:?}", scan.synced);
    assert!(scan.settled.is_none());
}

/// `count` records chained after `after` (or from the start), stamped from
/// `at_us` on: two calls with different stamps make different records for
/// the same seqs.
fn chain_after(after: Option<&Record>, count: u64, at_us: u64) -> Vec<Record> {
    let (mut seq, mut prev) = after.map_or((0, GENESIS), |r| (r.seq, r.hash));
    (0..count)
        .map(|i| {
            seq += 1;
            let payload = format!(r#"{{"event":"test","n":{seq},"at":{at_us}}}"#);
            let r = Record::new(
                seq,
                at_us + i,
                prev,
                RawValue::from_string(payload).unwrap(),
            );
            prev = r.hash;
            r
        })
        .collect()
}

/// Appends `records` as one commit's blocks and makes them durable, but
/// leaves them out of the index, as a crash before sled's sync does.
fn append_unindexed(store: &Store, records: &[Record]) {
    let mut blocks = Blocks::with_cap(300);
    for r in records {
        blocks.push(r.seq, &r.encode()).unwrap();
    }
    store
        .append_blocks(&blocks.finish(), &mut ChainEntries::default())
        .unwrap();
}

fn reopened(dir: &Path, store: Store) -> Store {
    drop(store);
    Store::open_existing(&dir.join("state")).unwrap()
}

#[test]
fn records_the_index_lost_are_found_again_and_appends_skip_a_torn_end() {
    let records = chain(5);
    let (dir, store) = store_with(&records, Format::Segments(300));
    let lost = chain_after(records.last(), 6, 10_000);
    append_unindexed(&store, &lost[..2]);
    append_unindexed(&store, &lost[2..4]);
    // The first bytes of a commit the crash cut short.
    let torn = lost[4].encode();
    store.segments.append([&torn[..40]]).unwrap();
    store.segments.sync().unwrap();

    let store = reopened(dir.path(), store);
    assert_eq!(store.reindex_tail().unwrap(), 4);
    assert_eq!(store.head().unwrap().unwrap().hash, lost[3].hash);
    for r in &lost[..4] {
        assert_eq!(store.record(r.seq).unwrap().unwrap().hash, r.hash);
    }
    let result = verified(dir.path(), &store);
    assert!(result.ok, "{:?}", result.problems);
    assert_eq!(result.records, 9);
    assert_eq!(store.reindex_tail().unwrap(), 0, "indexed once");

    // What comes next does not go behind the torn bytes, so a second
    // crash loses nothing either.
    append_unindexed(&store, &lost[4..]);
    assert_eq!(segment_files(&dir.path().join("state")).len(), 2);
    let store = reopened(dir.path(), store);
    assert_eq!(store.reindex_tail().unwrap(), 2);
    assert_eq!(store.head().unwrap().unwrap().hash, lost[5].hash);
    assert!(verified(dir.path(), &store).ok);
}

#[test]
fn a_retried_commit_replaces_the_failed_one_whose_seqs_it_repeats() {
    let records = chain(5);
    let (dir, store) = store_with(&records, Format::Segments(300));
    let failed = chain_after(records.last(), 2, 10_000);
    let retried = chain_after(records.last(), 3, 20_000);
    append_unindexed(&store, &failed);
    append_unindexed(&store, &retried);

    let store = reopened(dir.path(), store);
    assert_eq!(store.reindex_tail().unwrap(), 3);
    for r in &retried {
        assert_eq!(store.record(r.seq).unwrap().unwrap().hash, r.hash);
    }
    let result = verified(dir.path(), &store);
    assert!(result.ok, "{:?}", result.problems);
    assert_eq!(result.records, 8);
}

#[test]
fn copies_below_the_head_are_skipped_and_a_broken_link_ends_the_scan() {
    let records = chain(5);
    let (dir, store) = store_with(&records, Format::Segments(300));
    // A compaction's copy of indexed blocks, then two lost records, then
    // one that does not follow them (a gap) and one after it.
    append_unindexed(&store, &records);
    let lost = chain_after(records.last(), 4, 10_000);
    append_unindexed(&store, &lost[..2]);
    append_unindexed(&store, &lost[3..]);

    let store = reopened(dir.path(), store);
    assert_eq!(store.reindex_tail().unwrap(), 2);
    assert_eq!(store.head().unwrap().unwrap().hash, lost[1].hash);
    assert!(verified(dir.path(), &store).ok);

    // A record whose hash does not match its fields is not taken either.
    let mut forged = chain_after(Some(&lost[1]), 1, 30_000);
    forged[0].at_us += 1;
    append_unindexed(&store, &forged);
    let store = reopened(dir.path(), store);
    assert_eq!(store.reindex_tail().unwrap(), 0);
    assert_eq!(store.head().unwrap().unwrap().seq, 7);
}

#[test]
fn the_writer_continues_after_the_records_the_index_lost() {
    let records = chain(5);
    let (dir, store) = store_with(&records, Format::Segments(300));
    let lost = chain_after(records.last(), 3, 10_000);
    append_unindexed(&store, &lost);
    let store = reopened(dir.path(), store);

    continue_with_two_sessions(dir.path(), &store);
    assert_eq!(store.record(8).unwrap().unwrap().hash, lost[2].hash);
    let result = verified(dir.path(), &store);
    assert!(result.ok, "{:?}", result.problems);
    assert_eq!(result.records, 12);
}

/// What a crash would leave of the store under `dir` now: a copy of its
/// files, opened without looking for lost records.
fn crash_copy(dir: &Path) -> (tempfile::TempDir, Store) {
    let copy = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(dir.join("state"))
        .arg(copy.path())
        .status()
        .unwrap();
    assert!(status.success());
    let store = Store::open_existing(&copy.path().join("state")).unwrap();
    (copy, store)
}

#[test]
fn the_writer_syncs_the_index_on_its_first_commit_and_a_second_after_others() {
    let (dir, store) = store_with(&chain(5), Format::Segments(300));
    let recorder = writer(&dir.path().join("state"), &store);
    let first_sync_before = Instant::now();
    record_sessions(&recorder, &[("s-1", "crm")]);
    let (_copy, copied) = crash_copy(dir.path());
    assert_eq!(copied.head().unwrap().unwrap().seq, 7, "first commit");
    drop(copied);

    record_sessions(&recorder, &[("s-2", "crm")]);
    let (_copy, copied) = crash_copy(dir.path());
    // Only while the second is certainly not due yet (a stalled machine
    // may take longer to get here).
    if first_sync_before.elapsed() < Duration::from_millis(900) {
        assert_eq!(copied.head().unwrap().unwrap().seq, 7, "left unsynced");
    }
    drop(copied);

    std::thread::sleep(Duration::from_millis(1500));
    let (_copy, copied) = crash_copy(dir.path());
    assert_eq!(copied.head().unwrap().unwrap().seq, 9, "synced when idle");
    recorder.close().unwrap();
}

#[test]
fn records_after_the_zeros_a_restart_left_are_found_again() {
    let records = chain(5);
    let (dir, store) = store_with(&records, Format::Segments(300));
    // Restarted: appends go after the zeros the segment grew by.
    let store = reopened(dir.path(), store);
    let lost = chain_after(records.last(), 3, 10_000);
    append_unindexed(&store, &lost);
    let extent = store.block_at(5).unwrap().unwrap().extent.unwrap();
    assert!(extent.end() < segment::GROWTH_BYTES);

    let store = reopened(dir.path(), store);
    assert_eq!(store.reindex_tail().unwrap(), 3);
    let found = store.block_at(6).unwrap().unwrap();
    assert_eq!(found.extent.unwrap().offset, segment::GROWTH_BYTES);
    assert_eq!(store.head().unwrap().unwrap().hash, lost[2].hash);
    assert!(verified(dir.path(), &store).ok);
    assert_eq!(segment_files(&dir.path().join("state")).len(), 1);
}

/// Records session `s-1`'s start and a subject hit in it, in one commit;
/// the outcome of each.
fn record_start_with_hit(
    recorder: &SledRecorder,
) -> (Result<(), AuditError>, Result<(), AuditError>) {
    block_on(async {
        let hit = recorder.subject_index("s-1", 1, "alice@example.test");
        let start = recorder.record(session_start("s-1", "crm"));
        (hit.durable().await, start.durable().await)
    })
}

/// Sets or clears (`+i`, `-i`) the immutable flag of the audit directory
/// under `state`: an append that must create the segment directory fails,
/// as a disk failing between the index's sync and the segment's would.
fn chattr(flag: &str, state: &Path) {
    let out = std::process::Command::new("chattr")
        .arg(flag)
        .arg(state.join("audit"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

fn statement(session: &str, text: &str) -> AuditEvent {
    AuditEvent::Statement(Statement {
        session: session.to_string(),
        statement_seq: 1,
        resource: "crm".to_string(),
        protocol: "simple",
        text: text.to_string(),
        parameters: Vec::new(),
        duration_us: 10,
        rows_returned: 0,
        rows: None,
        command_tag: None,
        error: None,
    })
}

/// Records `event` alone and waits for its commit.
fn record_alone(recorder: &SledRecorder, event: AuditEvent) -> Result<(), AuditError> {
    block_on(recorder.record(event).durable())
}

#[test]
fn hits_whose_records_were_never_stored_are_not_reported() {
    let (_dir, state, store, recorder) = recording();
    let address = "alice@example.test";
    let lookup = "select * from users where email = 'alice@example.test'";
    chattr("+i", &state);
    let failed = record_alone(&recorder, statement("s-1", lookup));
    chattr("-i", &state);
    assert!(failed.is_err(), "{failed:?}");
    let key = Keys::load_or_create(&state).unwrap().subject;
    let hash = subject::subject_hash(&key, address);
    let indexed = || store.subjects.scan_prefix(hash).count();
    // The hit is in the index, durable before the commit failed; its seq
    // is beyond the chain, as after a crash between the two.
    assert_eq!(indexed(), 1);
    assert!(store.subject_hits(&hash).unwrap().is_empty());

    // The next commit gives that seq to another session's statement.
    record_alone(&recorder, statement("s-2", "select 1")).unwrap();
    record_alone(&recorder, statement("s-3", lookup)).unwrap();
    recorder.close().unwrap();
    assert_eq!(indexed(), 2);
    let hits = store.subject_hits(&hash).unwrap();
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert_eq!((hits[0].session.as_deref(), hits[0].seq), (Some("s-3"), 2));
}

#[test]
fn a_commit_whose_blocks_fail_leaves_its_subject_hits_not_records_without_them() {
    let (_dir, state, store, recorder) = recording();
    // The audit directory made immutable: the first append cannot create
    // the segment directory, as a disk failing between the index's sync
    // and the segment's.
    chattr("+i", &state);
    let (hit, start) = record_start_with_hit(&recorder);
    chattr("-i", &state);
    assert!(hit.is_err() && start.is_err(), "{hit:?} {start:?}");
    recorder.close().unwrap();

    // The request over-reports (a session nothing else names) rather than
    // under-reports.
    let key = Keys::load_or_create(&state).unwrap().subject;
    let hits = store
        .subject_hits(&subject::subject_hash(&key, "alice@example.test"))
        .unwrap();
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert_eq!(hits[0].session.as_deref(), Some("s-1"));
    assert!(store.head().unwrap().is_none());
}

#[test]
fn a_first_commit_with_subject_hits_still_syncs_its_chain_entries() {
    let (dir, _, _, recorder) = recording();
    let (hit, start) = record_start_with_hit(&recorder);
    hit.unwrap();
    start.unwrap();
    // An index without extents is not scanned on open, so the first
    // commit's must be durable in sled, subject hits or not.
    let (_copy, copied) = crash_copy(dir.path());
    assert_eq!(copied.head().unwrap().map(|r| r.seq), Some(1));
    recorder.close().unwrap();
}

#[test]
fn a_purge_starts_where_the_last_settled_the_chain_and_keeps_open_sessions_resources() {
    let (dir, _, store, recorder) = recording();
    // A session of a resource kept 3 days, its end a moment after its
    // start; everything else is kept 1 day.
    let record = |event| block_on(recorder.record(event).durable()).unwrap();
    record(session_start("s-long", "long"));
    std::thread::sleep(Duration::from_millis(20));
    record(AuditEvent::SessionEnd(SessionEnd {
        session: "s-long".into(),
        bytes_from_client: 1,
        bytes_from_server: 2,
        duration_ms: 20,
        error: None,
    }));
    let at = |seq| store.record(seq).unwrap().unwrap().at_us;
    let (started, ended) = (at(1), at(2));
    let retention = Retention {
        default_days: 1,
        per_resource: BTreeMap::from([("long".to_string(), 3)]),
    };
    let three_days = 3 * 86_400 * 1_000_000;
    let purge = |as_of_us: u64| {
        let as_of = SystemTime::UNIX_EPOCH + Duration::from_micros(as_of_us);
        block_on(recorder.purge(retention.clone(), as_of)).unwrap()
    };

    // The start has expired, the end not yet: the chain is settled up to
    // the start, and the session's resource is kept for its end.
    assert_eq!(purge(started + three_days).records, 1);
    let settled = store.purge_settled().unwrap();
    assert_eq!(settled.seq, 1);
    assert_eq!(settled.sessions["s-long"], "long");

    // The next purge reads from the end on, knows it is the long
    // resource's (under the default it would have expired), and keeps it.
    assert_eq!(purge(started + three_days).records, 0);
    assert!(store.record(2).unwrap().unwrap().payload.is_some());

    // Once the end expires too, the whole chain is settled (the first
    // purge's record holds nothing to purge) and the session forgotten.
    assert_eq!(purge(ended + three_days).records, 1);
    let settled = store.purge_settled().unwrap();
    assert_eq!(settled.seq, 3);
    assert!(settled.sessions.is_empty(), "{settled:?}");
    recorder.close().unwrap();
    let result = verified(dir.path(), &store);
    assert!(result.ok, "{:?}", result.problems);
    assert_eq!(result.purged, 2);
}

#[test]
fn a_large_purge_goes_in_parts_each_recorded() {
    let (dir, state, store, recorder) = recording();
    // A statement naming a person, in the first part; its index entry goes
    // with the last.
    let mut lookup = statement(
        "s-0",
        "select * from users where email = 'alice@example.test'",
    );
    if let AuditEvent::Statement(s) = &mut lookup {
        s.resource = "old".into();
    }
    record_alone(&recorder, lookup).unwrap();
    let key = Keys::load_or_create(&state).unwrap().subject;
    let hash = subject::subject_hash(&key, "alice@example.test");
    assert_eq!(store.subject_hits(&hash).unwrap().len(), 1);
    // 12,000 sessions more: 24,001 records, parts of 10,000.
    let names: Vec<String> = (1..=12_000).map(|i| format!("s-{i}")).collect();
    let sessions: Vec<(&str, &str)> = names.iter().map(|s| (s.as_str(), "old")).collect();
    record_sessions(&recorder, &sessions);
    let summary = purge_old_now_and_close(&recorder);
    assert_eq!(summary.records, 24_001);
    assert_eq!(summary.sessions, 12_001);
    assert!(store.subject_hits(&hash).unwrap().is_empty());
    let parts: Vec<u64> = store
        .raw_records(24_002, usize::MAX)
        .unwrap()
        .iter()
        .map(|entry| {
            let event = Record::decode(entry.value.as_bytes())
                .unwrap()
                .event()
                .unwrap();
            assert_eq!(event["event"], "retention_purge");
            event["records"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(parts, [10_000, 10_000, 4_001]);
    assert_eq!(summary.purge_seq, Some(24_004));
    // Settled up to the last payload: the parts' own records came after
    // the purge's time, and the next purge reads them again.
    assert_eq!(store.purge_settled().unwrap().seq, 24_001);
    let result = verified(dir.path(), &store);
    assert!(result.ok, "{:?}", result.problems);
    assert_eq!(result.purged, 24_001);
}

#[test]
fn session_starts_are_indexed_and_checked_against_the_chain() {
    let (_dir, _, store, recorder) = recording();
    record_sessions(&recorder, &[("s-1", "old"), ("s-2", "kept")]);
    assert_eq!(store.session_start("s-1").unwrap(), Some(1));
    assert_eq!(store.session_start("s-2").unwrap(), Some(2));
    assert_eq!(store.session_start("s-3").unwrap(), None);

    // A purge that empties a start takes it out of the index.
    purge_old_now_and_close(&recorder);
    assert!(store.record(1).unwrap().unwrap().payload.is_none());
    assert!(store.sessions.get("s-1").unwrap().is_none());
    assert_eq!(store.session_start("s-1").unwrap(), None);
    assert_eq!(store.session_start("s-2").unwrap(), Some(2));

    // An entry that names another record (an edited index) is not
    // trusted: the session is looked for from the chain's start.
    store.sessions.insert("s-2", &3u64.to_be_bytes()).unwrap();
    assert_eq!(store.session_start("s-2").unwrap(), None);
    store.sessions.insert("s-2", &b"short"[..]).unwrap();
    assert_eq!(store.session_start("s-2").unwrap(), None);
    store.sessions.insert("s-2", &99u64.to_be_bytes()).unwrap();
    assert_eq!(store.session_start("s-2").unwrap(), None);
}

/// Records at the given times, every fifth one a session's start.
fn chain_at(times: &[u64]) -> Vec<Record> {
    let events: Vec<(u64, String)> = (1..)
        .zip(times)
        .map(|(seq, &at_us)| {
            let payload = if seq % 5 == 0 {
                format!(r#"{{"event":"session_start","session":"s-{seq}"}}"#)
            } else {
                format!(r#"{{"event":"test","n":{seq}}}"#)
            };
            (at_us, payload)
        })
        .collect();
    chain_of(&events)
}

/// Records of these events, each at its time.
fn chain_of(events: &[(u64, String)]) -> Vec<Record> {
    let mut prev = GENESIS;
    (1..)
        .zip(events)
        .map(|(seq, (at_us, payload))| {
            let payload = RawValue::from_string(payload.clone()).unwrap();
            let r = Record::new(seq, *at_us, prev, payload);
            prev = r.hash;
            r
        })
        .collect()
}

/// Indexes every record's time, as the indexer thread does.
fn index_all_times(store: &Store) {
    while store.index_times().unwrap() > 0 {}
}

/// Checks that every record of `[since, until)` lies within the bounds the
/// index gives, for many random periods; returns how many records the
/// bounded walks read in all.
fn check_bounds(store: &Store, records: &[Record], random: &mut crate::testing::Random) -> u64 {
    let (lowest, highest) = (
        records.iter().map(|r| r.at_us).min().unwrap(),
        records.iter().map(|r| r.at_us).max().unwrap(),
    );
    let span = (highest - lowest + 2) as usize;
    let mut read = 0;
    for _ in 0..300 {
        let since = (random.below(10) > 0).then(|| lowest - 1 + random.below(span) as u64);
        let until = (random.below(10) > 0).then(|| lowest - 1 + random.below(span) as u64);
        let (first, last) = store.seq_bounds(since, until).unwrap();
        let last_seq = records.len() as u64;
        read += last
            .unwrap_or(last_seq)
            .min(last_seq)
            .saturating_sub(first - 1);
        for r in records {
            let wanted = since.is_none_or(|t| r.at_us >= t) && until.is_none_or(|t| r.at_us < t);
            if wanted {
                assert!(
                    r.seq >= first && last.is_none_or(|l| r.seq <= l),
                    "record {} at {} is outside {first}..={last:?} for {since:?}..{until:?}",
                    r.seq,
                    r.at_us
                );
            }
        }
    }
    read
}

#[test]
fn time_bounds_hold_every_record_of_the_period_whatever_the_clock_did() {
    const MINUTE: u64 = 60_000_000;
    let mut random = crate::testing::Random::new(7);
    // Three hours at about 20 records a minute, with sessions' small
    // disorder, two steps back (one of 90 minutes), and a step forward.
    let mut now = 1_795_305_600_000_000;
    let mut times = Vec::new();
    for i in 0..3_600u64 {
        now += random.below(6_000_000) as u64;
        match i {
            1_000 => now -= 90 * MINUTE,
            2_000 => now -= 5 * MINUTE,
            3_000 => now += 600 * MINUTE,
            _ => {}
        }
        times.push(now - random.below(500_000) as u64);
    }
    let records = chain_at(&times);
    let (_dir, store) = store_with(&records, Format::Segments(4_000));

    // Nothing indexed yet: the whole chain, and no wrong bound.
    check_bounds(&store, &records, &mut random);
    assert_eq!(store.seq_bounds(Some(now), None).unwrap().0, 1);

    // Indexed in part: readers read the rest themselves.
    store.index_times().unwrap();
    check_bounds(&store, &records, &mut random);

    index_all_times(&store);
    let read = check_bounds(&store, &records, &mut random);
    let whole = 300 * records.len() as u64;
    assert!(read < whole / 3, "bounded walks read {read} of {whole}");
    // The last minutes: a walk of about their records, not the chain's.
    let (first, last) = store.seq_bounds(Some(now - 2 * MINUTE), None).unwrap();
    assert!(first > 3_500, "{first}");
    assert_eq!(last, None);

    // The indexer also filled in the sessions index.
    assert_eq!(store.session_start("s-3500").unwrap(), Some(3_500));
}

#[test]
fn time_bounds_follow_the_writer() {
    let (_dir, _, store, recorder) = recording();
    record_sessions(&recorder, &[("s-1", "crm"), ("s-2", "crm")]);
    let after_first = SystemTime::now();
    std::thread::sleep(Duration::from_millis(5));
    record_sessions(&recorder, &[("s-3", "crm")]);
    recorder.close().unwrap();
    // The second commit is after `after_first` and the first before it;
    // the index may start the walk anywhere up to the second commit.
    let (first, last) = store
        .seq_bounds(Some(crate::audit::writer::micros(after_first)), None)
        .unwrap();
    assert!(first <= 5, "{first}");
    assert_eq!(last, None);
    let (first, last) = store
        .seq_bounds(None, Some(crate::audit::writer::micros(after_first)))
        .unwrap();
    assert_eq!(first, 1);
    // Within a second of the end the index does not bound a walk.
    assert_eq!(last, None);
}

#[test]
fn time_bounds_allow_for_the_sessions_small_disorder() {
    const MINUTE: u64 = 60_000_000;
    let at = 1_795_305_600_000_000 + 10 * MINUTE;
    // The second record takes the high-water time into a new minute; the
    // third was stamped a moment before the minute by another session.
    let records = chain_at(&[at - 100, at + 5, at - 300_000, at + 2 * MINUTE]);
    let (_dir, store) = store_with(&records, Format::Segments(4_000));
    index_all_times(&store);
    let (_, last) = store.seq_bounds(None, Some(at - 200_000)).unwrap();
    assert!(last.is_none_or(|l| l >= 3), "{last:?}");
    // A minute and more later, the walk can stop.
    assert_eq!(
        store.seq_bounds(None, Some(at + MINUTE)).unwrap(),
        (1, Some(3))
    );
    assert_eq!(
        store.seq_bounds(Some(at + MINUTE), None).unwrap(),
        (2, None)
    );
}

#[test]
fn a_walk_from_a_time_looks_up_the_sessions_that_started_before_it() {
    use crate::audit::query::{for_each_event, Filter};
    const MINUTE: u64 = 60_000_000;
    let t0 = 1_795_305_600_000_000;
    let start = |session: &str, who: &str| {
        format!(
            r#"{{"event":"session_start","session":"{session}","listener":"pg","protocol":"postgres","principal":{{"name":"{who}"}}}}"#
        )
    };
    let login = |session: &str, who: &str| {
        format!(
            r#"{{"event":"database_login","session":"{session}","resource":"orders","principal":{{"name":"{who}"}}}}"#
        )
    };
    let statement = |session: &str| {
        format!(r#"{{"event":"statement","session":"{session}","text":"select 1"}}"#)
    };
    let mut events = vec![
        (t0, start("s-alice", "alice")),
        (t0 + 1, login("s-alice", "alice")),
        (t0 + 2, start("s-gone", "carol")),
    ];
    events.extend((1..=10).map(|m| (t0 + m * MINUTE, r#"{"event":"test"}"#.to_string())));
    events.push((t0 + 10 * MINUTE + 1, statement("s-alice")));
    events.push((t0 + 10 * MINUTE + 2, statement("s-gone")));
    events.push((t0 + 10 * MINUTE + 3, start("s-bob", "bob")));
    events.push((t0 + 10 * MINUTE + 4, statement("s-bob")));
    let records = chain_of(&events);
    let (_dir, store) = store_with(&records, Format::Segments(4_000));
    index_all_times(&store);
    // s-gone's start left the index (a purge emptied it).
    store.sessions.remove("s-gone").unwrap();
    let source = LocalSource::new(store.clone());

    let filter = Filter {
        since_us: Some(t0 + 9 * MINUTE + 30_000_000),
        ..Filter::default()
    };
    let (from, until) = store.seq_bounds(filter.since_us, None).unwrap();
    assert!(from > 3, "the walk reads from the start: {from}");
    let mut seen = Vec::new();
    for_each_event(&source, from, until, Some(&filter), |e| {
        if filter.matches(&e) && e.name() == "statement" {
            let c = &e.context;
            seen.push(format!(
                "{} {} {}",
                e.session().unwrap(),
                c.identity,
                c.resource
            ));
        }
        true
    })
    .unwrap();
    assert_eq!(
        seen,
        [
            "s-alice alice orders",
            // No start to look up: what the event itself says.
            "s-gone  ",
            "s-bob bob pg",
        ]
    );

    // Without the look-up, the earlier session has no context.
    let mut identities = Vec::new();
    for_each_event(&source, from, until, None, |e| {
        if e.session() == Some("s-alice") {
            identities.push(e.context.identity.clone());
        }
        true
    })
    .unwrap();
    assert_eq!(identities, [""]);
}

#[test]
fn verify_finds_a_time_index_that_is_not_the_chains() {
    const MINUTE: u64 = 60_000_000;
    // Ten minutes of records, the clock set back two minutes half-way.
    let start = 1_795_305_600_000_000;
    let times: Vec<u64> = (0..200u64)
        .map(|i| start + i * 3_000_000 - if i >= 100 { 2 * MINUTE } else { 0 })
        .collect();
    let records = chain_at(&times);
    let (dir, store) = store_with(&records, Format::Segments(4_000));
    index_all_times(&store);
    assert!(verified(dir.path(), &store).ok);
    let index = store.time_index().unwrap();
    assert!(
        index.minutes.len() >= 8 && !index.steps.is_empty(),
        "{index:?}"
    );
    assert_eq!(index.progress.through, 200);

    let entry = |prefix: u8, n: u64| {
        let mut key = vec![prefix];
        key.extend_from_slice(&n.to_be_bytes());
        key
    };
    let (minute, minute_seq) = index.minutes[4];
    let (step_seq, _) = index.steps[0];
    // Each edit would make `--since` or `--until` walks skip records.
    type Edit<'a> = &'a dyn Fn(&Store);
    let edits: [(&str, Edit); 4] = [
        ("a minute said to begin later", &|s: &Store| {
            let later = (minute_seq + 10).to_be_bytes();
            s.times.insert(entry(b'm', minute), &later).unwrap();
        }),
        ("a step back removed", &|s: &Store| {
            s.times.remove(entry(b's', step_seq)).unwrap();
        }),
        ("a minute added", &|s: &Store| {
            let seq = 150u64.to_be_bytes();
            s.times.insert(entry(b'm', minute + 100), &seq).unwrap();
        }),
        ("an entry of no known form", &|s: &Store| {
            s.times.insert(b"m\x01", b"x").unwrap();
        }),
    ];
    for (what, edit) in edits {
        edit(&store);
        let v = verified(dir.path(), &store);
        assert!(!v.ok, "{what}: not found");
        assert!(
            v.problems.iter().all(|p| p.kind == ProblemKind::Index),
            "{what}: the chain is not at fault: {:?}",
            v.problems
        );
        assert!(
            v.problems[0].message.contains("portcullis audit reindex"),
            "{what}: {:?}",
            v.problems
        );
        assert_eq!(store.rebuild_time_index().unwrap(), 200, "{what}");
        assert_eq!(store.time_index().unwrap(), index, "{what}");
        assert!(verified(dir.path(), &store).ok, "{what}: rebuilt");
    }

    // Where the edit lies is named.
    store
        .times
        .insert(entry(b'm', minute), &(minute_seq + 10).to_be_bytes())
        .unwrap();
    let v = verified(dir.path(), &store);
    assert_eq!(v.problems[0].seq, minute_seq, "{:?}", v.problems);
}

#[test]
fn the_writer_indexes_the_times_of_what_it_commits() {
    let (_dir, _, store, recorder) = recording();
    record_sessions(&recorder, &[("s-1", "old")]);
    // Past the indexer's first pass; its next is a second away.
    std::thread::sleep(Duration::from_millis(200));
    record_sessions(&recorder, &[("s-2", "kept")]);
    let index = store.time_index().unwrap();
    assert_eq!(index.progress.through, 4, "at once: {index:?}");
    assert_eq!(store.session_start("s-2").unwrap(), Some(3));
    recorder.close().unwrap();
    // What the indexer would have found reading the chain.
    assert_eq!(store.rebuild_time_index().unwrap(), 4);
    assert_eq!(store.time_index().unwrap(), index);
}
