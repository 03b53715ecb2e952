//! The audit store against the real daemon and its files: tampering is
//! pinpointed, nothing acknowledged is lost to kill -9, data-subject
//! look-up, retention purge and the GDPR report.

use std::{
    io::Write,
    net::SocketAddr,
    os::unix::fs::{FileExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, SystemTime},
};

use portcullis::{
    audit::{
        keys::Keys,
        record::Record,
        segment::{self, Extent},
        AuditEvent, CheckpointPolicy, Recorder, SessionEnd, SessionStart, SledRecorder, Store,
    },
    identity::{Principal, PrincipalKind},
    kernel::ConnectOrigin,
};
use serde_json::Value;

use crate::{harness::*, pg::PgCluster};

// The identity tests' OIDC provider (oidc-provider) and scripted browser.
use crate::identity::provider;

/// Runs `portcullis --config CONFIG args...`.
fn portcullis(config: &Path, args: &[&str]) -> Output {
    Command::new(PORTCULLIS)
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A config naming `state` as the state directory, plus `extra` TOML.
fn config_for(dir: &Path, state: &Path, extra: &str) -> PathBuf {
    let path = dir.join(format!("{}.toml", unique("config")));
    std::fs::write(
        &path,
        format!("state_dir = \"{}\"\n{extra}", state.display()),
    )
    .unwrap();
    path
}

/// A store recorded by the real daemon: redirected curls (kernel
/// redirect, session start and end each) and a blocked connect, then a
/// clean stop (final signed checkpoint). Returns the state directory.
fn recorded_by_daemon(connections: usize) -> (tempfile::TempDir, PathBuf) {
    let cgroup = TestCgroup::new();
    let upstream = HttpUpstream::start("127.0.0.1:0", "evidence");
    let blocked = free_port();
    let mut gateway = Gateway::start(
        &cgroup,
        &[
            Protect::redirect("127.0.0.1", upstream.addr.port()),
            Protect::block("127.0.0.1", Some(blocked)),
        ],
    );
    let url = format!("http://{}/", upstream.addr);
    for _ in 0..connections {
        let out = cgroup.run("curl", &["-sS", "-m", "10", &url]);
        assert_eq!(String::from_utf8_lossy(&out.stdout), "evidence");
    }
    let _ = cgroup.run(
        "curl",
        &["-sS", "-m", "2", &format!("http://127.0.0.1:{blocked}/")],
    );
    gateway.wait_for_event("session ends", |_| {
        gateway
            .events()
            .iter()
            .filter(|e| e["event"] == "session_end")
            .count()
            == connections
    });
    gateway.wait_for_event("kernel block", |e| e["action"] == "block");
    gateway.stop();
    let copy = tempfile::tempdir().unwrap();
    let state = copy.path().join("state");
    copy_state(&gateway.dir.path().join("state"), &state);
    (copy, state)
}

/// Copies a stopped daemon's state (regular files only: not the socket).
fn copy_state(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let kind = entry.file_type().unwrap();
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            copy_state(&entry.path(), &target);
        } else if kind.is_file() {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A stopped store's chain as an intruder sees it: sled's index of blocks
/// and the segment files that hold them.
struct Chain {
    db: sled::Db,
    tree: sled::Tree,
    segments: PathBuf,
}

/// Opens a stopped store's chain, lets `f` tamper with it, and flushes.
fn with_chain(state: &Path, f: impl FnOnce(&Chain)) {
    let db = sled::open(state.join("audit/chain")).unwrap();
    let chain = Chain {
        tree: db.open_tree("chain").unwrap(),
        db,
        segments: state.join("audit").join(segment::SEGMENT_DIR),
    };
    f(&chain);
    chain.db.flush().unwrap();
}

fn key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

impl Chain {
    fn segment_file(&self, extent: Extent) -> PathBuf {
        self.segments.join(format!("{:08}.seg", extent.segment))
    }

    /// A block's bytes, from its segment or from the tree.
    fn bytes(&self, value: &[u8]) -> Vec<u8> {
        let Some(extent) = Extent::decode(value) else {
            return value.to_vec();
        };
        let file = std::fs::File::open(self.segment_file(extent)).unwrap();
        let mut bytes = vec![0; extent.len as usize];
        file.read_exact_at(&mut bytes, extent.offset).unwrap();
        bytes
    }

    /// The block holding `seq` (the last one keyed at or before it): its
    /// key and its lines, one record each.
    fn block_of(&self, seq: u64) -> (u64, Vec<Vec<u8>>) {
        let (k, v) = self.tree.range(..=key(seq)).next_back().unwrap().unwrap();
        let first = u64::from_be_bytes(k.as_ref().try_into().unwrap());
        let bytes = self.bytes(&v);
        (
            first,
            bytes.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect(),
        )
    }

    /// Replaces block `first`: in place in its segment file when the bytes
    /// keep their length, otherwise as a block stored in the tree (the
    /// format of older stores, which the gateway still reads).
    fn put_block(&self, first: u64, lines: &[Vec<u8>]) {
        let bytes = lines.join(&b'\n');
        let value = self.tree.get(key(first)).unwrap().unwrap();
        match Extent::decode(&value) {
            Some(extent) if extent.len as usize == bytes.len() => {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(self.segment_file(extent))
                    .unwrap();
                file.write_all_at(&bytes, extent.offset).unwrap();
            }
            _ => {
                self.tree.insert(key(first), bytes).unwrap();
            }
        }
    }

    /// Every block's key and number of records.
    fn blocks(&self) -> Vec<(u64, usize)> {
        self.tree
            .iter()
            .map(|item| {
                let (k, v) = item.unwrap();
                let first = u64::from_be_bytes(k.as_ref().try_into().unwrap());
                (first, self.bytes(&v).split(|&b| b == b'\n').count())
            })
            .collect()
    }

    fn get(&self, seq: u64) -> Record {
        let (first, lines) = self.block_of(seq);
        Record::decode(&lines[(seq - first) as usize]).unwrap()
    }

    /// Replaces record `seq`'s line in its block.
    fn put(&self, seq: u64, record: &Record) {
        let (first, mut lines) = self.block_of(seq);
        lines[(seq - first) as usize] = record.encode();
        self.put_block(first, &lines);
    }

    /// Deletes record `seq`'s line (and its block once empty).
    fn remove_line(&self, seq: u64) {
        let (first, mut lines) = self.block_of(seq);
        lines.remove((seq - first) as usize);
        if lines.is_empty() {
            self.tree.remove(key(first)).unwrap();
        } else {
            self.put_block(first, &lines);
        }
    }
}

/// Appends `sessions` sessions (start and end each) to a stopped store in
/// one commit, so that they share blocks.
fn append_in_one_commit(state: &Path, sessions: usize) {
    let events = (0..sessions).flat_map(|i| {
        let session = format!("direct-{i}");
        [
            AuditEvent::SessionStart(SessionStart {
                session: session.clone(),
                listener: "tcp".into(),
                protocol: "tcp",
                peer: "127.0.0.1:40000".parse().unwrap(),
                principal: None,
                origin: None,
            }),
            session_end(session),
        ]
    });
    let one_commit = CheckpointPolicy {
        commit_interval: Duration::from_secs(1),
        ..CheckpointPolicy::default()
    };
    record_offline(state, one_commit, events);
}

/// Records `events` into the store under `state` with a writer of its own
/// (no daemon running), without awaiting each, then waits until all are
/// durable and closes the writer.
fn record_offline(
    state: &Path,
    policy: CheckpointPolicy,
    events: impl IntoIterator<Item = AuditEvent>,
) {
    let recorder = SledRecorder::start(
        Store::open(state).unwrap(),
        Keys::load_or_create(state).unwrap(),
        policy,
    )
    .unwrap();
    let acks: Vec<_> = events.into_iter().map(|e| recorder.record(e)).collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        for ack in acks {
            ack.durable().await.unwrap();
        }
    });
    recorder.close().unwrap();
}

/// The end of `session`, with placeholder counts.
fn session_end(session: String) -> AuditEvent {
    AuditEvent::SessionEnd(SessionEnd {
        session,
        bytes_from_client: 1,
        bytes_from_server: 2,
        duration_ms: 3,
        error: None,
    })
}

/// Verifies and expects failure at `seq` with `words` in the message.
fn expect_tampered(config: &Path, seq: u64, words: &str) {
    let out = portcullis(config, &["audit", "verify"]);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "verify must fail: {all}");
    assert!(
        all.contains(&format!("first problem at seq {seq}:")),
        "expected the first problem at seq {seq}: {all}"
    );
    assert!(all.contains(words), "expected '{words}': {all}");
}

#[test]
fn tampering_with_the_store_files_is_pinpointed() {
    // The daemon's records (commits of one or two: small blocks), then 300
    // records in one commit (several full blocks).
    let (dir, pristine) = recorded_by_daemon(4);
    let daemon_head = Store::open(&pristine).unwrap().head().unwrap().unwrap().seq;
    append_in_one_commit(&pristine, 150);
    let fresh = |name: &str| {
        let state = dir.path().join(name);
        copy_state(&pristine, &state);
        (config_for(dir.path(), &state, ""), state)
    };
    let (config, state) = fresh("untouched");
    let out = portcullis(&config, &["audit", "verify"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("OK: the chain and every signed checkpoint verify"));
    let head = {
        let out = portcullis(&config, &["audit", "verify", "--json"]);
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["head_seq"]
            .as_u64()
            .unwrap()
    };
    assert!(
        head >= daemon_head + 300 && daemon_head >= 12,
        "4 sessions make at least 12 records, then 300: {daemon_head}, {head}"
    );
    // The first block of the commit of 300 and the one after it.
    let mut layout = Vec::new();
    with_chain(&state, |chain| layout = chain.blocks());
    let at = layout
        .iter()
        .position(|&(k, _)| k == daemon_head + 1)
        .unwrap();
    let ((k, n), (next, _)) = (layout[at], layout[at + 1]);
    let n = n as u64;
    assert!(n >= 6, "records of one commit share blocks: {layout:?}");

    // Edit one event in place inside a block (its stored hash no longer
    // matches).
    let (config, state) = fresh("edited");
    with_chain(&state, |chain| {
        let mut r = chain.get(k + 2);
        let edited = r
            .payload
            .unwrap()
            .get()
            .replacen("\"event\":", "\"forged\":1,\"event\":", 1);
        r.payload = Some(serde_json::value::RawValue::from_string(edited).unwrap());
        chain.put(k + 2, &r);
    });
    expect_tampered(&config, k + 2, &format!("record {} was edited", k + 2));

    // Edit one event and recompute its hashes: the next link breaks.
    let (config, state) = fresh("rehashed");
    with_chain(&state, |chain| {
        let r = chain.get(k + 3);
        let edited = r
            .payload
            .unwrap()
            .get()
            .replacen("\"event\":", "\"forged\":1,\"event\":", 1);
        let forged = Record::new(
            k + 3,
            r.at_us,
            r.prev,
            serde_json::value::RawValue::from_string(edited).unwrap(),
        );
        chain.put(k + 3, &forged);
    });
    expect_tampered(&config, k + 3, &format!("record {} was rewritten", k + 3));

    // Bytes that are not UTF-8 in one line.
    let (config, state) = fresh("not-utf8");
    with_chain(&state, |chain| {
        let (first, mut lines) = chain.block_of(k + 4);
        lines[(k + 4 - first) as usize][30] = 0xff;
        chain.put_block(first, &lines);
    });
    expect_tampered(
        &config,
        k + 4,
        &format!("record {} is not valid UTF-8", k + 4),
    );

    // Delete a record in the middle of a block: the lines after it move up.
    let (config, state) = fresh("deleted-inside");
    with_chain(&state, |chain| chain.remove_line(k + 1));
    expect_tampered(
        &config,
        k + 1,
        &format!("position {} holds record {}", k + 1, k + 2),
    );

    // Delete the last record of a block: a gap before the next block.
    let (config, state) = fresh("deleted-last");
    with_chain(&state, |chain| chain.remove_line(k + n - 1));
    expect_tampered(
        &config,
        k + n - 1,
        &format!("record {} is missing: deleted", k + n - 1),
    );

    // Delete a whole block of the daemon's (a record of 7 and its block).
    let (config, state) = fresh("deleted");
    let mut gone = (0, 0);
    with_chain(&state, |chain| {
        let (first, lines) = chain.block_of(7);
        chain.tree.remove(key(first)).unwrap();
        gone = (first, first + lines.len() as u64 - 1);
    });
    let missing = if gone.0 == gone.1 {
        format!("record {} is missing: deleted", gone.0)
    } else {
        format!("records {}..{} are missing: deleted", gone.0, gone.1)
    };
    expect_tampered(&config, gone.0, &missing);

    // Swap two records inside a block.
    let (config, state) = fresh("reordered");
    with_chain(&state, |chain| {
        let (first, mut lines) = chain.block_of(k + 1);
        lines.swap((k + 1 - first) as usize, (k + 2 - first) as usize);
        chain.put_block(first, &lines);
    });
    expect_tampered(
        &config,
        k + 1,
        &format!(
            "position {} holds record {}: records were reordered",
            k + 1,
            k + 2
        ),
    );

    // Swap two blocks.
    let (config, state) = fresh("blocks-swapped");
    with_chain(&state, |chain| {
        let (a, b) = (
            chain.tree.get(key(k)).unwrap().unwrap(),
            chain.tree.get(key(next)).unwrap().unwrap(),
        );
        chain.tree.insert(key(k), b).unwrap();
        chain.tree.insert(key(next), a).unwrap();
    });
    expect_tampered(
        &config,
        k,
        &format!("position {k} holds record {next}: records were reordered"),
    );

    // Delete the segment files: the index still names them.
    let (config, state) = fresh("segments-deleted");
    std::fs::remove_dir_all(state.join("audit").join(segment::SEGMENT_DIR)).unwrap();
    let out = portcullis(&config, &["audit", "verify"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("00000001.seg is missing, but the chain names it"),
        "{}",
        text(&out)
    );

    // Cut off the end: the last signed checkpoint covers it.
    let (config, state) = fresh("truncated");
    with_chain(&state, |chain| {
        for seq in (head - 2..=head).rev() {
            chain.remove_line(seq);
        }
    });
    expect_tampered(&config, head - 2, "were truncated");
    // The writer refuses to append to a truncated chain (the daemon fails
    // closed instead of hiding the cut).
    let refused = SledRecorder::start(
        Store::open(&state).unwrap(),
        Keys::load_or_create(&state).unwrap(),
        CheckpointPolicy::default(),
    )
    .err()
    .expect("a truncated store must be refused")
    .to_string();
    assert!(refused.contains("truncated or rewritten"), "{refused}");

    // Cut off the end and delete the checkpoints and their count too: the
    // checkpoint file outside sled still has the signed head.
    let (config, state) = fresh("truncated-and-hidden");
    with_chain(&state, |chain| {
        for seq in (head - 2..=head).rev() {
            chain.remove_line(seq);
        }
        chain.db.open_tree("checkpoints").unwrap().clear().unwrap();
        chain.db.open_tree("meta").unwrap().clear().unwrap();
    });
    expect_tampered(&config, head - 2, "were truncated");

    // An auditor's own copy of the public key catches a replaced key.
    let (config, _) = fresh("other-key");
    let out = portcullis(
        &config,
        &["audit", "verify", "--public-key", &"11".repeat(32)],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("is not signed by key"),
        "{}",
        text(&out)
    );
}

#[test]
fn kill_9_during_heavy_recording_loses_nothing_acknowledged() {
    let cgroup = TestCgroup::new();
    let upstream = HttpUpstream::start("127.0.0.1:0", "ok");
    let mut gateway = Gateway::start(
        &cgroup,
        &[Protect::redirect("127.0.0.1", upstream.addr.port())],
    );
    // Four threads connect in a loop; a response means the gateway had
    // durably recorded the session start (it relays only after the ack).
    // Each prints its local address for every response it got.
    let client = format!(
        "import socket, sys, threading\n\
         lock = threading.Lock()\n\
         def run():\n\
         \x20   for _ in range(100000):\n\
         \x20       try:\n\
         \x20           s = socket.create_connection(('127.0.0.1', {port}), timeout=5)\n\
         \x20           local = s.getsockname()\n\
         \x20           s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n\
         \x20           data = b''\n\
         \x20           while True:\n\
         \x20               chunk = s.recv(4096)\n\
         \x20               if not chunk: break\n\
         \x20               data += chunk\n\
         \x20           s.close()\n\
         \x20       except OSError:\n\
         \x20           return\n\
         \x20       if data.endswith(b'ok'):\n\
         \x20           with lock:\n\
         \x20               print('%s:%d' % local, flush=True)\n\
         threads = [threading.Thread(target=run) for _ in range(4)]\n\
         [t.start() for t in threads]\n\
         [t.join() for t in threads]\n",
        port = upstream.addr.port()
    );
    let child = cgroup
        .command("python3", &["-c", &client])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(2500));
    gateway.kill9();
    let out = wait_with_timeout(child, Duration::from_secs(30));
    let acknowledged: Vec<SocketAddr> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert!(
        acknowledged.len() >= 50,
        "expected heavy recording, got {} sessions: {}",
        acknowledged.len(),
        String::from_utf8_lossy(&out.stderr)
    );

    eprintln!(
        "{} sessions acknowledged before kill -9",
        acknowledged.len()
    );
    // Read the store as the crash left it (daemon down: the files).
    let events = gateway.events();
    let started: std::collections::HashSet<String> = events
        .iter()
        .filter(|e| e["event"] == "session_start")
        .map(|e| e["peer"].as_str().unwrap().to_string())
        .collect();
    let lost: Vec<_> = acknowledged
        .iter()
        .filter(|a| !started.contains(&a.to_string()))
        .collect();
    assert!(
        lost.is_empty(),
        "acknowledged but lost: {lost:?} of {}",
        acknowledged.len()
    );
    let out = gateway.cli(&["audit", "verify"]);
    assert!(out.status.success(), "after the crash: {}", text(&out));

    // The daemon continues the chain after the crash, and it verifies.
    gateway.spawn();
    let url = format!("http://{}/", upstream.addr);
    let again = cgroup.run("curl", &["-sS", "-m", "10", &url]);
    assert_eq!(String::from_utf8_lossy(&again.stdout), "ok");
    gateway.wait_for_event("a session after the restart", |e| {
        e["event"] == "session_end"
            && e["seq"].as_u64() > events.last().and_then(|l| l["seq"].as_u64())
    });
    let out = gateway.cli(&["audit", "verify"]);
    assert!(out.status.success(), "after the restart: {}", text(&out));
}

/// A store written through the library (a direct load), as the
/// PostgreSQL adapter and policy engine will: sessions on two resources,
/// one principal named by e-mail, an adapter-reported personal value.
fn recorded_directly(dir: &Path, sessions: &[(&str, &str, &str)]) -> PathBuf {
    let state = dir.join("state");
    let store = Store::open(&state).unwrap();
    let keys = Keys::load_or_create(&state).unwrap();
    let recorder = SledRecorder::start(store, keys, CheckpointPolicy::default()).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        for (session, listener, person) in sessions {
            let start = AuditEvent::SessionStart(SessionStart {
                session: session.to_string(),
                listener: listener.to_string(),
                protocol: "tcp",
                peer: "127.0.0.1:40000".parse().unwrap(),
                principal: Some(Principal {
                    subject: format!("https://idp.example/{person}"),
                    name: person.to_string(),
                    kind: PrincipalKind::Person,
                    roles: vec!["engineers".into()],
                }),
                origin: Some(ConnectOrigin {
                    original_destination: "10.0.0.5:5432".parse().unwrap(),
                    uid: 1000,
                    gid: 1000,
                    pid: 4242,
                    command: "psql".into(),
                    cgroup_id: 1,
                    rule: 0,
                }),
            });
            recorder.record(start).durable().await.unwrap();
            recorder
                .subject_index(session, 1, "Bob.Customer@Example.org")
                .durable()
                .await
                .unwrap();
            let end = AuditEvent::SessionEnd(SessionEnd {
                session: session.to_string(),
                bytes_from_client: 10,
                bytes_from_server: 20,
                duration_ms: 5,
                error: None,
            });
            recorder.record(end).durable().await.unwrap();
        }
    });
    recorder.close().unwrap();
    state
}

/// Every file under `dir`, concatenated.
fn all_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(all_bytes(&path));
        } else {
            out.extend(std::fs::read(&path).unwrap_or_default());
        }
    }
    out
}

#[test]
fn subject_lookup_finds_sessions_by_keyed_hash_only() {
    let dir = tempfile::tempdir().unwrap();
    let state = recorded_directly(
        dir.path(),
        &[
            ("s-alice", "orders", "alice@example.com"),
            ("s-carol", "crm", "carol@example.com"),
        ],
    );
    let config = config_for(dir.path(), &state, "");
    let lookup = |value: &str| {
        let out = portcullis(&config, &["audit", "subject", value, "--json"]);
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap()
    };
    // Detected in the recorded event (the principal's e-mail).
    let alice = lookup("Alice@Example.com");
    assert_eq!(alice.len(), 1, "{alice:?}");
    assert_eq!(alice[0]["session"], "s-alice");
    assert_eq!(alice[0]["source"], "detected");
    // Reported by an adapter: both sessions, statement 1.
    let bob = lookup("bob.customer@example.org");
    let sessions: Vec<_> = bob.iter().map(|h| h["session"].as_str().unwrap()).collect();
    assert_eq!(sessions, ["s-alice", "s-carol"], "{bob:?}");
    assert!(bob
        .iter()
        .all(|h| h["statement_seq"] == 1 && h["source"] == "reported"));
    assert!(lookup("nobody@example.com").is_empty());
    // The reported value itself is nowhere in the store.
    let bytes = String::from_utf8_lossy(&all_bytes(&state)).to_lowercase();
    assert!(!bytes.contains("bob.customer@example.org"));
    let table = text(&portcullis(
        &config,
        &["audit", "subject", "bob.customer@example.org"],
    ));
    assert!(
        table.contains("s-carol") && table.contains("reported"),
        "{table}"
    );
}

#[test]
fn retention_purge_keeps_the_chain_verifiable() {
    let dir = tempfile::tempdir().unwrap();
    let state = recorded_directly(
        dir.path(),
        &[
            ("s-orders", "orders", "alice@example.com"),
            ("s-crm", "crm", "carol@example.com"),
        ],
    );
    let config = config_for(
        dir.path(),
        &state,
        "[audit]\nretention_days = 30\n[audit.retention]\norders = 1\n",
    );
    // Nothing has expired yet.
    let out = portcullis(&config, &["audit", "purge"]);
    assert!(text(&out).contains("nothing has expired"), "{}", text(&out));
    // Two days on, the orders session's payloads are past their retention.
    let later =
        humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(2 * 86_400))
            .to_string();
    let out = portcullis(&config, &["audit", "purge", "--as-of", &later]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("purged 2 records of 1 sessions"),
        "{}",
        text(&out)
    );

    let out = portcullis(&config, &["audit", "events", "--json"]);
    let events: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<_> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "purged",
            "purged",
            "session_start",
            "session_end",
            "retention_purge"
        ]
    );
    let purge = &events[4];
    assert_eq!(purge["records"], 2);
    assert_eq!(purge["ranges"], serde_json::json!([[1, 2]]));
    assert_eq!(purge["by_resource"]["orders"], 2);
    // Gone from the store's records (and so from every export); sled's log
    // may hold superseded bytes until it reclaims the segment (docs/audit.md).
    let export = portcullis(&config, &["audit", "export"]);
    let lines = String::from_utf8_lossy(&export.stdout).to_string();
    assert_eq!(lines.lines().count(), 5, "{lines}");
    assert!(
        !lines.contains("s-orders"),
        "purged payloads must be gone: {lines}"
    );
    assert!(lines.contains("s-crm"), "{lines}");
    let out = portcullis(&config, &["audit", "verify"]);
    assert!(
        out.status.success(),
        "the chain verifies after a purge: {}",
        text(&out)
    );
    assert!(
        text(&out).contains("(2 purged by retention)"),
        "{}",
        text(&out)
    );
    // The purged session's subject entries went with it.
    let out = portcullis(
        &config,
        &["audit", "subject", "bob.customer@example.org", "--json"],
    );
    let hits: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert_eq!(hits[0]["session"], "s-crm");

    // Emptying a payload without a purge is tampering.
    with_chain(&state, |chain| {
        let mut r = chain.get(3);
        r.payload = None;
        r.purged_by = Some(5);
        chain.put(3, &r);
    });
    expect_tampered(&config, 3, "removed without a retention purge");
}

#[test]
fn gdpr_report_renders_in_a_browser() {
    let (dir, state) = recorded_by_daemon(2);
    let config = config_for(dir.path(), &state, "");
    let html = dir.path().join("report.html");
    let json = dir.path().join("report.json");
    let out = portcullis(
        &config,
        &[
            "report",
            "gdpr",
            "--from",
            "1d",
            "--out",
            html.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let page = std::fs::read_to_string(&html).unwrap();
    for section in [
        "Record of processing (Article 30)",
        "Masking evidence",
        "Blocked and bypass attempts",
        "Approvals",
        "Integrity of the evidence",
        "Signed checkpoint",
        "Verified: the hash chain",
    ] {
        assert!(page.contains(section), "missing {section}");
    }
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["processing"].as_array().unwrap().len(), 2);
    assert!(report["blocked"]
        .as_array()
        .unwrap()
        .iter()
        .any(|b| b["event"] == "kernel"));
    assert_eq!(report["verification"]["ok"], true);

    let png = dir.path().join("report.png");
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--screenshot={}", png.display()))
        .arg("--window-size=1280,2000")
        .arg(format!("file://{}", html.display()))
        .output()
        .expect("chromium (apt-get install chromium)");
    assert!(png.exists(), "no screenshot: {}", text(&out));
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[1..4], b"PNG");
    assert!(
        bytes.len() > 20_000,
        "a rendered page, not a blank one ({} bytes)",
        bytes.len()
    );
    let keep = std::env::var_os("PORTCULLIS_REPORT_PNG");
    if let Some(path) = keep {
        std::fs::copy(&png, path).unwrap();
        std::fs::copy(&html, dir.path().join("report.html")).unwrap();
    }
}

/// psql through the redirect to a real cluster: statements land in the
/// store, personal values in their text are indexed, and the auditor tools
/// find, filter and replay the session.
#[test]
fn psql_session_is_found_by_subject_replayed_and_filtered() {
    let cgroup = TestCgroup::new();
    let cluster = PgCluster::start_with(false);
    let secret = cluster.secret_file("audit", crate::pg::PG_PASSWORD);
    let listener = free_port();
    let extra = format!(
        "[[listener]]\nname = \"pg\"\naddress = \"127.0.0.1:{listener}\"\nprotocol = \"postgres\"\n\n\
         [[resource]]\nname = \"orders\"\nprotocol = \"postgres\"\naddress = \"{addr}\"\ntls = \"disable\"\n\n\
         [[resource.grant]]\nusers = [\"unix:root\"]\nupstream_user = \"postgres\"\npassword_file = \"{secret}\"\n",
        addr = cluster.addr(),
        secret = secret.display()
    );
    let gateway = Gateway::start_with_config(
        &cgroup,
        &[Protect::postgres("127.0.0.1", cluster.port)],
        &extra,
    );
    let port = cluster.port.to_string();
    let sql = "select 'Dana.Subject@example.net' as email, 7 as n";
    let out = cgroup.run(
        "psql",
        &[
            "-X",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-Atc",
            sql,
        ],
    );
    assert!(
        out.status.success(),
        "psql: {}\n{}",
        text(&out),
        gateway.log()
    );
    // The address is taken out of the recorded text; its keyed hash stays.
    let statement = gateway.wait_for_event("statement", |e| {
        e["event"] == "statement"
            && e["text"].as_str().is_some_and(|t| {
                t.starts_with("select '[email:") && t.ends_with("' as email, 7 as n")
            })
    });
    assert!(!statement.to_string().contains("Dana"), "{statement}");
    let session = statement["session"].as_str().unwrap().to_string();
    gateway.wait_for_event("session end", |e| {
        e["event"] == "session_end" && e["session"] == session.as_str()
    });

    // Data-subject look-up through the running daemon (audit.sock).
    let out = gateway.cli(&["audit", "subject", "dana.subject@EXAMPLE.net", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let hits: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        hits.iter().any(|h| h["session"] == session.as_str()
            && h["seq"] == statement["seq"]
            && h["statement_seq"] == 1
            && h["source"] == "statement"),
        "{hits:?} should name session {session}, statement 1, at seq {}",
        statement["seq"]
    );

    // Sessions filtered by resource and identity, as CSV.
    let out = gateway.cli(&[
        "audit",
        "sessions",
        "--resource",
        "orders",
        "--identity",
        "root",
        "--csv",
    ]);
    let csv = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        csv.starts_with("session,start,end,identity,resource,protocol,destination,events\n"),
        "{csv}"
    );
    assert!(
        csv.lines()
            .any(|l| l.starts_with(&session) && l.contains(",orders,postgres,")),
        "{csv}"
    );
    let out = gateway.cli(&["audit", "sessions", "--resource", "no-such-resource"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("(nothing matches)"));

    // By time, through the daemon's index of times: the last hour has the
    // session, with its identity; what came before it does not.
    let out = gateway.cli(&[
        "audit",
        "sessions",
        "--since",
        "1h",
        "--identity",
        "root",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let sessions: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        sessions
            .iter()
            .any(|s| s["session"] == session.as_str() && s["resource"] == "orders"),
        "{sessions:?}"
    );
    let out = gateway.cli(&["audit", "events", "--until", "1h", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
    // The daemon answers where a period is (the tools fall back to the
    // whole chain when it cannot, so ask it directly).
    let mut socket =
        std::os::unix::net::UnixStream::connect(gateway.dir.path().join("state/audit.sock"))
            .unwrap();
    socket
        .write_all(b"{\"op\":\"seq_bounds\",\"since_us\":0,\"until_us\":1}\n")
        .unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut socket, &mut answer).unwrap();
    assert_eq!(answer.trim(), r#"{"ok":[1,0]}"#);
    // `audit reindex` builds the time index again under the running
    // daemon, and `audit verify` compares what it holds with the chain.
    let out = gateway.cli(&["audit", "reindex"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("built again"), "{}", text(&out));
    let mut socket =
        std::os::unix::net::UnixStream::connect(gateway.dir.path().join("state/audit.sock"))
            .unwrap();
    socket.write_all(b"{\"op\":\"time_index\"}\n").unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut socket, &mut answer).unwrap();
    let index: Value = serde_json::from_str(&answer).unwrap();
    assert!(
        index["ok"]["progress"]["through"].as_u64() > Some(0),
        "{answer}"
    );
    let out = gateway.cli(&["audit", "verify"]);
    assert!(out.status.success(), "{}", text(&out));

    // Events filtered by action, as JSON.
    let out = gateway.cli(&[
        "audit",
        "events",
        "--action",
        "statement",
        "--session",
        &session,
        "--json",
    ]);
    let events: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        !events.is_empty() && events.iter().all(|e| e["event"] == "statement"),
        "{events:?}"
    );

    // Replay: the statement with its recorded result.
    let out = gateway.cli(&["audit", "replay", &session]);
    let replay = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        replay.contains(&format!("session {session}: root on orders (postgres)")),
        "{replay}"
    );
    let recorded = statement["text"].as_str().unwrap();
    assert!(
        replay.contains(&format!("{recorded} -> 1 rows")),
        "{replay}"
    );
    assert!(!replay.contains("Dana"), "{replay}");
    assert!(replay.contains("command_tag: \"SELECT 1\""), "{replay}");

    let out = gateway.cli(&["audit", "verify"]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn export_streams_the_chain_with_hashes_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let state = recorded_directly(dir.path(), &[("s-1", "orders", "erin@example.com")]);
    let config = config_for(dir.path(), &state, "");
    let file = dir.path().join("export.jsonl");
    let to = file.to_str().unwrap();
    let out = portcullis(&config, &["audit", "export", "--to", to]);
    assert!(out.status.success(), "{}", text(&out));
    let lines = |path: &Path| -> Vec<Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let first = lines(&file);
    assert_eq!(first.len(), 2);
    assert_eq!(first[0]["seq"], 1);
    assert_eq!(first[0]["prev"], "0".repeat(64));
    assert_eq!(first[1]["prev"], first[0]["hash"], "lines carry the chain");
    assert_eq!(first[0]["event"]["event"], "session_start");
    assert!(first[0]["at"].as_str().unwrap().ends_with('Z'));

    // More records; a second export resumes after the last line.
    record_offline(
        &state,
        CheckpointPolicy::default(),
        [session_end("s-2".into())],
    );
    let out = portcullis(&config, &["audit", "export", "--to", to]);
    assert!(out.status.success(), "{}", text(&out));
    let all = lines(&file);
    let seqs: Vec<_> = all.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [1, 2, 3], "resumed without repeating");
    assert_eq!(all[2]["prev"], all[1]["hash"]);

    // To a Unix socket, as a log shipper listens, from a given seq.
    let socket = dir.path().join("shipper.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let reader = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stream, &mut text).unwrap();
        text
    });
    let target = format!("unix:{}", socket.display());
    let out = portcullis(
        &config,
        &["audit", "export", "--to", &target, "--from", "2"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let received = reader.join().unwrap();
    let seqs: Vec<u64> = received
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs, [2, 3]);
}

#[test]
fn daemon_exports_to_the_configured_file_and_refuses_non_root() {
    let cgroup = TestCgroup::new();
    let upstream = HttpUpstream::start("127.0.0.1:0", "exported");
    let export = tempfile::tempdir().unwrap();
    let file = export.path().join("fleet.jsonl");
    let mut gateway = Gateway::start_with_config(
        &cgroup,
        &[Protect::redirect("127.0.0.1", upstream.addr.port())],
        &format!(
            "[audit]\nexport = \"{}\"\ncheckpoint_every = 2\n",
            file.display()
        ),
    );
    let url = format!("http://{}/", upstream.addr);
    let out = cgroup.run("curl", &["-sS", "-m", "10", &url]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "exported");
    let end = gateway.wait_for_event("session end", |e| e["event"] == "session_end");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        if text.lines().any(|l| l.contains("\"session_end\"")) {
            let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
            assert!(last["seq"].as_u64() >= end["seq"].as_u64());
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nothing exported: {}",
            gateway.log()
        );
        thread::sleep(Duration::from_millis(100));
    }
    // Store files are root only; the socket is world-connectable, and the
    // daemon refuses non-root callers when no OIDC identity is configured.
    let mode = |p: &Path| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions())
            & 0o777
    };
    let state = gateway.dir.path().join("state");
    assert_eq!(mode(&state.join("audit")), 0o700);
    assert_eq!(mode(&state.join("audit.sock")), 0o666);
    assert_eq!(mode(&state.join("audit-signing.key")), 0o600);
    assert_eq!(mode(&state.join("audit-subject.key")), 0o600);
    for dir in [gateway.dir.path(), state.as_path()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            PORTCULLIS,
            "--config",
        ])
        .arg(&gateway.config_path)
        .args(["audit", "events", "--socket"])
        .arg(state.join("audit.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no [identity] section, so the auditor tools are root only"),
        "{}",
        text(&out)
    );
    // Without a daemon to ask, a non-root caller is told to reach it.
    gateway.stop();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            PORTCULLIS,
        ])
        .args([
            "--config",
            "/nonexistent/portcullis.toml",
            "audit",
            "sessions",
            "--socket",
        ])
        .arg(state.join("audit.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out).contains("cannot reach the gateway's auditor socket"),
        "{}",
        text(&out)
    );
}

/// Throwaway uids (no passwd entry needed): an auditor, an engineer, and
/// one who never signs in.
const AUDITOR: &str = "61001";
const ENGINEER: &str = "61002";
const STRANGER: &str = "61003";

/// `portcullis args...` as `uid`, without a readable config (as on an
/// installed host, where the config is root's), reaching the daemon through
/// the control and auditor sockets named by environment.
fn as_uid(uid: &str, control: &Path, audit: &Path, args: &[&str]) -> Command {
    let mut cmd = portcullis_as(uid);
    cmd.args(args)
        .env("PORTCULLIS_CONTROL_SOCKET", control)
        .env("PORTCULLIS_AUDIT_SOCKET", audit);
    cmd
}

/// `portcullis login` as `uid`, approved in the provider's pages.
fn login_as(uid: &str, control: &Path, audit: &Path, login: &str, password: &str) {
    let (out, stderr) = provider::device_login_with(
        as_uid(uid, control, audit, &["login"]),
        login,
        password,
        None,
    );
    assert!(out.status.success(), "login as uid {uid}: {stderr}");
}

/// A daemon with OIDC sign-in (`audit` group = `auditors` role) whose
/// control and auditor sockets are in a directory every user can reach
/// (the gateway's temp dir is root's); returns that directory too.
fn auditor_gateway(
    provider: &provider::OidcProvider,
    cgroup: &TestCgroup,
    port: u16,
) -> (tempfile::TempDir, Gateway) {
    let sockets = tempfile::tempdir().unwrap();
    std::fs::set_permissions(sockets.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let control = sockets.path().join("control.sock");
    let audit = sockets.path().join("audit.sock");
    let gateway = Gateway::start_with_config(
        cgroup,
        &[Protect::redirect("127.0.0.1", port)],
        &format!(
            r#"
[audit]
socket = "{}"

[identity]
issuer = "{}"
client_id = "portcullis"
audience = ["urn:portcullis"]
clock_skew_seconds = 0
control_socket = "{}"
scopes = ["openid", "profile", "email", "groups"]
resource = "urn:portcullis"

[identity.roles]
engineers = ["eng"]
auditors = ["audit"]
"#,
            audit.display(),
            provider.issuer,
            control.display()
        ),
    );
    (sockets, gateway)
}

#[test]
fn auditors_role_reads_the_store_through_the_daemon_and_is_recorded() {
    let provider = provider::OidcProvider::start(300);
    let cgroup = TestCgroup::new();
    let upstream = HttpUpstream::start("127.0.0.1:0", "audited");
    // A directory every user can reach, for both sockets (the gateway's
    // temp dir is root's).
    let (sockets, gateway) = auditor_gateway(&provider, &cgroup, upstream.addr.port());
    let control = sockets.path().join("control.sock");
    let audit = sockets.path().join("audit.sock");
    let mode = std::fs::metadata(&audit).unwrap().permissions().mode();
    assert_eq!(
        mode & 0o777,
        0o666,
        "the auditor socket is world-connectable"
    );

    // bob is in the provider's `audit` group, alice is not.
    login_as(AUDITOR, &control, &audit, "bob", "bob-pw");
    login_as(ENGINEER, &control, &audit, "alice", "alice-pw");
    login_as("0", &control, &audit, "alice", "alice-pw");
    let out = cgroup.run(
        "curl",
        &["-sS", "-m", "10", &format!("http://{}/", upstream.addr)],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "audited");
    let end = gateway.wait_for_event("session end", |e| e["event"] == "session_end");
    let session = end["session"].as_str().unwrap().to_owned();

    let run = |uid: &str, args: &[&str]| {
        let out = as_uid(uid, &control, &audit, args).output().unwrap();
        (out.status.success(), text(&out))
    };

    // The auditor: every tool, through the daemon.
    let (ok, out) = run(AUDITOR, &["audit", "sessions", "--json"]);
    assert!(ok, "{out}");
    let sessions: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    let found = sessions
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["session"] == session.as_str())
        .unwrap_or_else(|| panic!("{session} not in {sessions}"));
    assert_eq!(found["identity"], "alice@example.test");
    let (ok, out) = run(AUDITOR, &["audit", "verify"]);
    assert!(ok && out.contains("OK: the chain"), "{out}");
    let (ok, root_key) = run(
        "0",
        &[
            "--config",
            gateway.config_path.to_str().unwrap(),
            "audit",
            "public-key",
        ],
    );
    assert!(ok, "{root_key}");
    let (ok, auditor_key) = run(AUDITOR, &["audit", "public-key"]);
    assert!(ok, "{auditor_key}");
    assert_eq!(auditor_key.trim(), root_key.trim());
    let (ok, out) = run(
        AUDITOR,
        &["audit", "verify", "--public-key", root_key.trim(), "--json"],
    );
    assert!(ok, "{out}");
    let (ok, out) = run(AUDITOR, &["audit", "replay", &session]);
    assert!(ok && out.contains("session_end"), "{out}");
    let (ok, out) = run(
        AUDITOR,
        &["audit", "subject", "alice@example.test", "--json"],
    );
    assert!(ok, "{out}");
    let hits: Value = serde_json::from_str(&out).unwrap();
    assert!(!hits.as_array().unwrap().is_empty(), "{hits}");
    let reports = tempfile::tempdir().unwrap();
    std::fs::set_permissions(reports.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let html = reports.path().join("report.html");
    let (ok, out) = run(
        AUDITOR,
        &[
            "report",
            "gdpr",
            "--from",
            "1h",
            "--out",
            html.to_str().unwrap(),
        ],
    );
    assert!(ok, "{out}");
    assert!(std::fs::read_to_string(&html).unwrap().contains(&session));

    // A signed-in engineer and a uid nobody signed in are refused, saying
    // what to do.
    let (ok, out) = run(ENGINEER, &["audit", "sessions"]);
    assert!(!ok);
    assert!(
        out.contains("alice@example.test (uid 61002) lacks the `auditors` role")
            && out.contains("portcullis login"),
        "{out}"
    );
    let (ok, out) = run(ENGINEER, &["audit", "verify"]);
    assert!(!ok && out.contains("lacks the `auditors` role"), "{out}");
    let (ok, out) = run(STRANGER, &["audit", "events"]);
    assert!(!ok);
    assert!(
        out.contains("uid 61003 is not signed in") && out.contains("portcullis login"),
        "{out}"
    );
    let (ok, out) = run(
        STRANGER,
        &["report", "gdpr", "--from", "1h", "--json", "/dev/null"],
    );
    assert!(!ok && out.contains("not signed in"), "{out}");
    // Root always may, with or without a sign-in.
    let out = gateway.cli(&["audit", "sessions"]);
    assert!(out.status.success(), "{}", text(&out));

    // Every auditor command is in the chain: who, what, granted or not;
    // the looked-up value only as a keyed hash.
    let accesses: Vec<Value> = gateway
        .events()
        .into_iter()
        .filter(|e| e["event"] == "auditor_access")
        .collect();
    let by = |uid: u64, query: &str| {
        accesses
            .iter()
            .find(|a| a["uid"] == uid && a["query"].as_str().unwrap().starts_with(query))
            .unwrap_or_else(|| panic!("no access by {uid} for {query}: {accesses:#?}"))
    };
    let sessions_read = by(61001, "audit sessions --json");
    assert_eq!(sessions_read["granted"], true);
    assert_eq!(sessions_read["principal"]["name"], "bob@example.test");
    assert_eq!(by(61001, "audit verify")["granted"], true);
    let lookup = by(61001, "audit subject");
    assert!(
        lookup["query"].as_str().unwrap().contains("value hmac"),
        "{lookup}"
    );
    assert!(
        !lookup.to_string().contains("alice@example.test"),
        "{lookup}"
    );
    assert_eq!(by(61001, "report gdpr --from 1h")["granted"], true);
    let refused = by(61002, "audit sessions");
    assert_eq!(refused["granted"], false);
    assert_eq!(refused["principal"]["name"], "alice@example.test");
    assert!(refused["reason"].as_str().unwrap().contains("lacks"));
    assert_eq!(by(61003, "audit events")["granted"], false);
    // Refusals: once per uid, whatever the command (no flooding).
    let refusals = accesses
        .iter()
        .filter(|a| a["uid"] == 61002 || a["uid"] == 61003)
        .count();
    assert_eq!(refusals, 2, "{accesses:#?}");
    assert!(
        !accesses.iter().any(|a| a["uid"] == 0),
        "root's reads are not recorded: {accesses:#?}"
    );
    // One record per command, not per page or request.
    let verify_runs = accesses
        .iter()
        .filter(|a| a["uid"] == 61001 && a["query"] == "audit verify")
        .count();
    assert_eq!(verify_runs, 1, "{accesses:#?}");

    // After logout the auditor is refused again.
    let (ok, out) = run(AUDITOR, &["logout"]);
    assert!(ok, "{out}");
    let (ok, out) = run(AUDITOR, &["audit", "sessions"]);
    assert!(!ok && out.contains("not signed in"), "{out}");
}

#[test]
fn an_expired_auditor_sign_in_is_refused() {
    let provider = provider::OidcProvider::start(4);
    let cgroup = TestCgroup::new();
    let (sockets, _gateway) = auditor_gateway(&provider, &cgroup, free_port());
    let control = sockets.path().join("control.sock");
    let audit = sockets.path().join("audit.sock");
    login_as("61011", &control, &audit, "bob", "bob-pw");
    let run = |args: &[&str]| {
        let out = as_uid("61011", &control, &audit, args).output().unwrap();
        (out.status.success(), text(&out))
    };
    let (ok, out) = run(&["audit", "verify"]);
    assert!(ok, "{out}");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (ok, out) = run(&["audit", "sessions"]);
        if !ok {
            assert!(
                out.contains("not signed in (or the sign-in expired)"),
                "{out}"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still allowed: {out}");
        thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn queries_walk_many_pages_and_keep_session_context_across_them() {
    // 10,500 session starts, then their ends: 21,000 records over three
    // pages of 10,000, each session's end on a later page than its start.
    const SESSIONS: usize = 10_500;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let starts = (0..SESSIONS).map(|i| {
        AuditEvent::SessionStart(SessionStart {
            session: format!("s-{i}"),
            listener: "tcp".into(),
            protocol: "tcp",
            peer: "127.0.0.1:40000".parse().unwrap(),
            principal: Some(Principal {
                subject: format!("https://idp.example/p{i}"),
                name: format!("person-{i}"),
                kind: PrincipalKind::Person,
                roles: vec![],
            }),
            origin: None,
        })
    });
    let ends = (0..SESSIONS).map(|i| session_end(format!("s-{i}")));
    record_offline(&state, CheckpointPolicy::default(), starts.chain(ends));
    let config = config_for(dir.path(), &state, "");
    let run = |args: &[&str]| {
        let out = portcullis(&config, args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        String::from_utf8(out.stdout).unwrap()
    };

    let events: Vec<Value> = serde_json::from_str(&run(&["audit", "events", "--json"])).unwrap();
    assert_eq!(events.len(), 2 * SESSIONS);
    assert!(events
        .iter()
        .enumerate()
        .all(|(i, e)| e["seq"] == i as u64 + 1));
    let sessions: Vec<Value> =
        serde_json::from_str(&run(&["audit", "sessions", "--json"])).unwrap();
    assert_eq!(sessions.len(), SESSIONS);
    assert!(sessions
        .iter()
        .enumerate()
        .all(|(i, s)| s["session"] == format!("s-{i}")
            && s["identity"] == format!("person-{i}")
            && s["events"] == 2
            && !s["end"].is_null()));
    assert_eq!(
        run(&["audit", "events", "--csv"]).lines().count(),
        2 * SESSIONS + 1
    );

    // The table: every row lines up under the header.
    let table = run(&["audit", "events"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2 * SESSIONS + 1);
    let column = lines[0].find("identity").unwrap();
    let last = lines.last().unwrap();
    assert!(
        last[column..].starts_with(&format!("person-{}", SESSIONS - 1)),
        "{}\n{last}",
        lines[0]
    );
    // A session ended two pages after it started keeps its context.
    let first = run(&["audit", "events", "--session", "s-0"]);
    let end = first.lines().find(|l| l.contains("session_end")).unwrap();
    assert!(end.contains("person-0"), "{first}");
    let replay = run(&["audit", "replay", "s-0"]);
    assert!(
        replay.starts_with("session s-0: person-0 on tcp (tcp)"),
        "{replay}"
    );
    let replayed: Vec<Value> =
        serde_json::from_str(&run(&["audit", "replay", "s-0", "--json"])).unwrap();
    assert_eq!(replayed.len(), 2);

    let json = dir.path().join("report.json");
    run(&[
        "report",
        "gdpr",
        "--from",
        "1h",
        "--json",
        json.to_str().unwrap(),
    ]);
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["processing"].as_array().unwrap().len(), SESSIONS);
    assert_eq!(report["processing"][7]["identity"], "person-7");
    assert_eq!(report["events_in_period"], 2 * SESSIONS as u64);
}
