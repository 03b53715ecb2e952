//! Audit store throughput, measured in one run:
//!
//! * durable appends per second with 1 producer (each waits for its ack
//!   before the next event: one flush per event), and with N concurrent
//!   producers (group commit: one flush per batch), against a plain file
//!   with one `fdatasync` per event (the floor any durable log pays);
//! * CPU per statement record (all threads, user and system): what the
//!   gateway pays per statement it records, with pgbench-like statements
//!   arriving at about 20,000 a second and nobody waiting for their acks;
//! * retention purges over the chain built: one when nothing has expired
//!   yet, one when everything has, and the next one after that (which
//!   starts where the last left the chain settled), each with the longest
//!   a record committed meanwhile waited;
//! * reading one session's events (`portcullis audit replay`): from the
//!   chain's start, and from the session's start as the sessions' index
//!   gives it;
//! * verification throughput (records per second) over the chain built.
//!
//! Run: `cargo bench --bench audit` (any user; it writes to a temp dir).

use std::{
    collections::BTreeMap,
    fs::OpenOptions,
    io::Write,
    os::unix::fs::OpenOptionsExt,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use portcullis::audit::{
    keys::{self, Keys},
    query,
    retention::Retention,
    source::{first_seq_of, LocalSource},
    verify::verify,
    AuditEvent, CheckpointPolicy, Recorder, SessionEnd, SessionStart, SledRecorder, Statement,
    Store,
};

const EVENTS_PER_PHASE: usize = 4_000;
const PRODUCERS: [usize; 3] = [4, 16, 64];
const STATEMENTS: usize = 100_000;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("audit: bench");
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("state");
    let store = Store::open(&state).expect("store");
    let keys = Keys::load_or_create(&state).expect("keys");
    let recorder = Arc::new(
        SledRecorder::start(store.clone(), keys, CheckpointPolicy::default()).expect("writer"),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");

    let direct = fsync_per_event(dir.path(), EVENTS_PER_PHASE / 4);
    println!("durable appends/s (higher is better), {EVENTS_PER_PHASE} events per phase:");
    println!(
        "  {:<36} {:>10.0}",
        "plain file, fdatasync per event", direct
    );
    let single = runtime.block_on(appends(&recorder, 1, EVENTS_PER_PHASE / 4));
    println!(
        "  {:<36} {:>10.0}   x{:.2} of plain fdatasync",
        "sled store, 1 producer",
        single,
        single / direct
    );
    for producers in PRODUCERS {
        let rate = runtime.block_on(appends(&recorder, producers, EVENTS_PER_PHASE));
        println!(
            "  {:<36} {:>10.0}   x{:.2} of plain fdatasync, x{:.2} of 1 producer",
            format!("sled store, {producers} producers"),
            rate,
            rate / direct,
            rate / single
        );
    }
    let cpu = runtime.block_on(cpu_per_statement(&recorder, STATEMENTS));
    println!("CPU per statement record: {cpu:.1} µs ({STATEMENTS} statements at ~20,000/s)");
    // A longer chain for verification.
    runtime.block_on(appends(&recorder, 256, 50_000));
    runtime.block_on(purges(&recorder));
    // The last session, 1,000 events before the chain's end.
    runtime
        .block_on(async {
            recorder
                .record(session_start(LAST_SESSION))
                .durable()
                .await?;
            for n in 0..1_000 {
                recorder.record(event(n)).durable().await?;
            }
            Ok::<_, portcullis::audit::AuditError>(())
        })
        .expect("durable");
    recorder.close().expect("close");

    let key = keys::public_key(&state).expect("public key");
    let source = LocalSource::new(store);
    println!("one session's events (the last session):");
    for (label, from) in [
        ("from the chain's start", 1),
        (
            "from its start (sessions' index)",
            first_seq_of(&source, LAST_SESSION),
        ),
    ] {
        let started = Instant::now();
        let (mut read, mut found) = (0, 0);
        query::for_each_event(&source, from, None, None, |e| {
            read += 1;
            found += usize::from(e.session() == Some(LAST_SESSION));
            true
        })
        .expect("walk");
        assert_eq!(found, 1, "the session's start");
        println!(
            "  {label:<34} {read:>7} records read in {:.3}s",
            started.elapsed().as_secs_f64()
        );
    }
    let started = Instant::now();
    let result = verify(&source, &key).expect("verify");
    let elapsed = started.elapsed();
    assert!(result.ok, "{:?}", result.problems.first());
    println!(
        "verify: {} records and {} checkpoints in {:.2}s = {:.0} records/s",
        result.records,
        result.checkpoints,
        elapsed.as_secs_f64(),
        result.records as f64 / elapsed.as_secs_f64()
    );
}

/// Times purges under a 30-day retention: now (nothing has expired), in
/// 31 days (everything has), and again then (only what came meanwhile); and the
/// longest that a record committed meanwhile waited for its commit.
async fn purges(recorder: &Arc<SledRecorder>) {
    let retention = Retention {
        default_days: 30,
        per_resource: BTreeMap::new(),
    };
    let later = SystemTime::now() + Duration::from_secs(31 * 86_400);
    println!("retention purges (30 days) over the chain, a record committed every ms meanwhile:");
    for (label, as_of) in [
        ("now, nothing expired", SystemTime::now()),
        ("in 31 days, everything expired", later),
        ("again in 31 days", later),
    ] {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let meanwhile = tokio::spawn(longest_commit_until(Arc::clone(recorder), stopped));
        let started = Instant::now();
        let summary = recorder
            .purge(retention.clone(), as_of)
            .await
            .expect("purge");
        let elapsed = started.elapsed();
        let _ = stop.send(());
        let longest = meanwhile.await.expect("producer");
        println!(
            "  {label:<32} {:>7} records purged in {:.3}s, longest commit meanwhile {:.3}s",
            summary.records,
            elapsed.as_secs_f64(),
            longest.as_secs_f64()
        );
    }
}

/// Records an event every millisecond, each waiting for its commit, until
/// `stop`; returns the longest wait.
async fn longest_commit_until(
    recorder: Arc<SledRecorder>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Duration {
    let mut longest = Duration::ZERO;
    for n in 0.. {
        let started = Instant::now();
        recorder.record(event(n)).durable().await.expect("durable");
        longest = longest.max(started.elapsed());
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(Duration::from_millis(1)) => {}
        }
    }
    longest
}

const LAST_SESSION: &str = "bench-last";

fn session_start(session: &str) -> AuditEvent {
    AuditEvent::SessionStart(SessionStart {
        session: session.into(),
        listener: "pg".into(),
        protocol: "postgres",
        peer: "127.0.0.1:40000".parse().expect("address"),
        principal: None,
        origin: None,
    })
}

fn event(n: usize) -> AuditEvent {
    AuditEvent::SessionEnd(SessionEnd {
        session: format!("bench-{n}"),
        bytes_from_client: 512,
        bytes_from_server: 4096,
        duration_ms: 12,
        error: None,
    })
}

/// A statement as pgbench -S sends it, recorded as the gateway records it.
fn statement(n: usize) -> AuditEvent {
    AuditEvent::Statement(Statement {
        session: format!("0193a1c2-{n:08x}-7d2e-9f00-5a1b2c3d4e5f"),
        statement_seq: n as u64 + 1,
        resource: "orders".into(),
        protocol: "extended",
        text: "SELECT abalance FROM pgbench_accounts WHERE aid = $1;".into(),
        parameters: vec![Some((n % 1_000_000).to_string())],
        duration_us: 85,
        rows_returned: 1,
        rows: Some(1),
        command_tag: Some("SELECT 1".into()),
        error: None,
    })
}

/// Records `count` statements in bursts of 100 every 5 ms, waits for the
/// last to be durable, and returns the process's CPU time per statement in
/// microseconds.
async fn cpu_per_statement(recorder: &Arc<SledRecorder>, count: usize) -> f64 {
    let before = process_cpu();
    let mut last = None;
    for n in 0..count {
        last = Some(recorder.record(statement(n)));
        if n % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    if let Some(ack) = last {
        ack.durable().await.expect("durable");
    }
    (process_cpu() - before).as_secs_f64() * 1e6 / count as f64
}

/// User and system CPU time of this process, all threads.
fn process_cpu() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let time = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// `producers` tasks each append `total / producers` events, each waiting
/// for its ack; returns events per second.
async fn appends(recorder: &Arc<SledRecorder>, producers: usize, total: usize) -> f64 {
    let per = total / producers;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..producers {
        let recorder = Arc::clone(recorder);
        tasks.push(tokio::spawn(async move {
            for i in 0..per {
                recorder
                    .record(event(p * per + i))
                    .durable()
                    .await
                    .expect("durable");
            }
        }));
    }
    for task in tasks {
        task.await.expect("producer");
    }
    (per * producers) as f64
        / started
            .elapsed()
            .max(Duration::from_micros(1))
            .as_secs_f64()
}

/// The reference: a JSON line appended and fdatasync'd per event.
fn fsync_per_event(dir: &std::path::Path, count: usize) -> f64 {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(dir.join("plain.jsonl"))
        .expect("plain file");
    let started = Instant::now();
    for n in 0..count {
        let mut line = serde_json::to_vec(&event(n)).expect("json");
        line.push(b'\n');
        file.write_all(&line).expect("write");
        file.sync_data().expect("fdatasync");
    }
    count as f64 / started.elapsed().as_secs_f64()
}
