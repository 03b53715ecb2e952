//! The policy engine through the PostgreSQL gateway, with a real cluster,
//! real psql and a raw extended-protocol client: blocks (42501, the session
//! goes on), masking (simple, extended text and binary, COPY), detector
//! false positives, just-in-time approvals from a second process (approve,
//! deny, self-approval, timeout, time windows, webhook), and reloads under
//! load.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener},
    os::unix::fs::PermissionsExt,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    harness::*,
    pg::{PgCluster, PG_PASSWORD},
};

const POLICY: &str = r#"
[settings]
approvers = ["unix:nobody", "unix:root"]
approval_timeout = "30s"
large_tables = ["events"]
{webhook}

[[rule]]
name = "no-unfiltered-writes"
unfiltered_write = true
action = "block"
reason = "DELETE and UPDATE need a WHERE clause"

[[rule]]
name = "no-truncate"
commands = ["TRUNCATE"]
action = "block"
reason = "TRUNCATE is not allowed on this database"

[[rule]]
name = "no-grant"
operations = ["dcl"]
action = "block"
reason = "privileges are managed by the platform team"

[[rule]]
name = "no-salary-export"
operations = ["export"]
tables = ["salaries"]
action = "block"
reason = "salaries may not be exported"

[[rule]]
name = "root-cannot-read-secrets"
subjects = ["unix:root"]
tables = ["secrets"]
action = "block"
reason = "secrets are off limits to root"

[[rule]]
name = "drops-need-approval"
commands = ["DROP"]
action = "approve"
reason = "dropping objects needs a second pair of eyes"
window = "1h"

[[rule]]
name = "vacuum-needs-quick-approval"
commands = ["VACUUM"]
action = "approve"
reason = "vacuum needs approval"
timeout = "2s"

[[mask]]
name = "emails"
detector = "email"
style = "pseudonym"

[[mask]]
name = "cards"
detector = "card"
style = "partial"
keep_last = 4

[[mask]]
name = "ssn-columns"
column_pattern = "^ssn"
table = "people"
style = "redact"
"#;

struct Setup {
    cgroup: TestCgroup,
    cluster: PgCluster,
    gateway: Gateway,
    policy_path: PathBuf,
    socket: PathBuf,
}

impl Setup {
    fn new(webhook: Option<SocketAddr>) -> Self {
        let cgroup = TestCgroup::new();
        let cluster = PgCluster::start_with(false);
        let secret = cluster.secret_file("main", PG_PASSWORD);
        let listener: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let policy_path = cluster.dir().join("policy.toml");
        let hook = webhook.map_or(String::new(), |a| {
            format!("webhook = \"http://{a}/approvals\"")
        });
        std::fs::write(&policy_path, POLICY.replace("{webhook}", &hook)).unwrap();
        let extra = format!(
            r#"
[policy]
file = "{policy}"

[[listener]]
name = "pg"
address = "{listener}"
protocol = "postgres"

[[resource]]
name = "orders"
protocol = "postgres"
address = "{address}"
tls = "disable"

[[resource.grant]]
users = ["unix:root"]
upstream_user = "postgres"
password_file = "{secret}"
"#,
            policy = policy_path.display(),
            address = cluster.addr(),
            secret = secret.display(),
        );
        let gateway = Gateway::start_with_config(
            &cgroup,
            &[Protect::postgres("127.0.0.1", cluster.port)],
            &extra,
        );
        // Approvers are other local users: let them reach the socket.
        for dir in [
            gateway.dir.path().to_path_buf(),
            gateway.dir.path().join("state"),
        ] {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let socket = gateway.dir.path().join("state/approvals.sock");
        cluster.sql(
            "CREATE TABLE people (id int PRIMARY KEY, name text, email text, card text, ssn text, note text);
             INSERT INTO people VALUES
               (1, 'Ann', 'ann@example.com', '4111 1111 1111 1111', '123-45-6789', 'order 4111111111111112, call me'),
               (2, 'Bob', 'bob@example.org', '4012888888881881', '987-65-4320', 'no personal data here');
             CREATE TABLE salaries (who text, amount int); INSERT INTO salaries VALUES ('ann', 100);
             CREATE TABLE secrets (k text); INSERT INTO secrets VALUES ('s3cr3t');
             CREATE TABLE scratch (a int); CREATE TABLE scratch2 (a int); CREATE TABLE scratch3 (a int);
             CREATE TABLE scratch4 (a int);",
        );
        Self {
            cgroup,
            cluster,
            gateway,
            policy_path,
            socket,
        }
    }

    /// psql inside the cgroup (redirected), verbose errors, no stop on error.
    fn psql_cmd(&self, args: &[&str]) -> Command {
        let port = self.cluster.port.to_string();
        let mut full = vec![
            "-X",
            "-v",
            "VERBOSITY=verbose",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-At",
        ];
        full.extend(args);
        let mut cmd = self.cgroup.command("psql", &full);
        cmd.env("PGCONNECT_TIMEOUT", "10")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    fn psql(&self, args: &[&str]) -> (String, String) {
        let child = self.psql_cmd(args).spawn().unwrap();
        let out = wait_with_timeout(child, Duration::from_secs(60));
        (text(&out.stdout), text(&out.stderr))
    }

    /// A raw extended-protocol exchange (Parse/Bind/Describe/Execute/Sync)
    /// from inside the cgroup; returns the rows (None for NULL) and any
    /// error as "SQLSTATE: message".
    fn extended(&self, sql: &str, binary: bool) -> (Vec<Vec<Option<String>>>, Option<String>) {
        let code = EXTENDED_CLIENT
            .replace("{port}", &self.cluster.port.to_string())
            .replace("{sql}", &sql.replace('\\', "\\\\").replace('\'', "\\'"))
            .replace("{binary}", if binary { "True" } else { "False" });
        let out: Value = serde_json::from_str(&self.cgroup.python(&code)).unwrap();
        let rows = out["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .collect();
        (rows, out["error"].as_str().map(str::to_string))
    }

    /// `portcullis approvals ...` as local user `user` (a second process,
    /// authenticated by its uid).
    fn approvals_as(&self, user: &str, args: &[&str]) -> Output {
        Command::new("runuser")
            .args(["-u", user, "--", PORTCULLIS, "approvals", "--socket"])
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap()
    }

    /// Waits until `nobody` sees a pending request; returns its id.
    fn pending_id(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let out = self.approvals_as("nobody", &["list", "--json"]);
            if out.status.success() {
                let list: Value = serde_json::from_slice(&out.stdout).unwrap();
                if let Some(id) = list[0]["id"].as_str() {
                    return id.to_string();
                }
            }
            assert!(
                Instant::now() < deadline,
                "no pending request: {} {}\n{}",
                text(&out.stdout),
                text(&out.stderr),
                self.gateway.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn events(&self, kind: &str) -> Vec<Value> {
        self.gateway
            .events_after_sessions_end()
            .into_iter()
            .filter(|e| e["event"] == kind)
            .collect()
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_string()
}

const EXTENDED_CLIENT: &str = r#"
import json, socket, struct
s = socket.create_connection(('127.0.0.1', {port}))
def send(t, b): s.sendall(t + struct.pack('!I', len(b) + 4) + b)
p = b'user\0postgres\0database\0postgres\0\0'
s.sendall(struct.pack('!II', len(p) + 8, 196608) + p)
buf = b''
def msg():
    global buf
    while len(buf) < 5 or len(buf) < 1 + struct.unpack('!I', buf[1:5])[0]:
        d = s.recv(65536)
        if not d: raise SystemExit('connection closed')
        buf += d
    n = struct.unpack('!I', buf[1:5])[0]
    t, body, buf = buf[0:1], buf[5:1 + n], buf[1 + n:]
    return t, body
while True:
    t, b = msg()
    if t == b'R' and b[:4] != b'\0\0\0\0': raise SystemExit('password requested')
    if t == b'Z': break
formats = struct.pack('!hh', 1, 1) if {binary} else struct.pack('!h', 0)
send(b'P', b'\0' + '{sql}'.encode() + b'\0' + struct.pack('!h', 0))
send(b'B', b'\0\0' + struct.pack('!hh', 0, 0) + formats)
send(b'D', b'P\0')
send(b'E', b'\0' + struct.pack('!i', 0))
send(b'S', b'')
rows, error, types = [], None, []
while True:
    t, b = msg()
    if t == b'T':
        n = struct.unpack('!h', b[:2])[0]; i = 2
        for _ in range(n):
            i = b.index(b'\0', i) + 1
            types.append(struct.unpack('!i', b[i + 6:i + 10])[0]); i += 18
    if t == b'D':
        n = struct.unpack('!h', b[:2])[0]; i = 2; row = []
        for c in range(n):
            l = struct.unpack('!i', b[i:i + 4])[0]; i += 4
            if l < 0: row.append(None); continue
            v = b[i:i + l]; i += l
            row.append(str(struct.unpack('!i', v)[0]) if {binary} and types[c] == 23 else v.decode())
        rows.append(row)
    if t == b'E':
        f = dict((x[0:1], x[1:].decode()) for x in b.split(b'\0') if x)
        error = f.get(b'C', '') + ': ' + f.get(b'M', '')
    if t == b'Z': break
send(b'X', b'')
print(json.dumps({'rows': rows, 'error': error}))
"#;

#[test]
fn blocks_answer_42501_with_the_reason_and_the_session_goes_on() {
    let s = Setup::new(None);
    let cases = [
        (
            "DELETE FROM people",
            "DELETE and UPDATE need a WHERE clause",
        ),
        (
            "UPDATE people SET name = 'x'",
            "DELETE and UPDATE need a WHERE clause",
        ),
        (
            "WITH d AS (DELETE FROM people RETURNING id) SELECT count(*) FROM d",
            "DELETE and UPDATE need a WHERE clause",
        ),
        (
            "TRUNCATE scratch",
            "TRUNCATE is not allowed on this database",
        ),
        (
            "GRANT SELECT ON people TO PUBLIC",
            "privileges are managed by the platform team",
        ),
        ("COPY salaries TO STDOUT", "salaries may not be exported"),
        (
            "SELECT * FROM public.secrets",
            "secrets are off limits to root",
        ),
        (
            "SELECT * FROM secrets WHERE note = 'Blocked.Subject@example.org'",
            "secrets are off limits to root",
        ),
        ("SELEC nonsense", "cannot parse this SQL"),
    ];
    for (sql, reason) in cases {
        // One session: the refused statement, then one that must still run.
        let (out, err) = s.psql(&["-c", sql, "-c", "SELECT 'still here'"]);
        assert!(
            err.contains("ERROR:  42501") && err.contains(reason),
            "{sql}: {err}"
        );
        assert_eq!(out, "still here", "{sql}: {err}\n{}", s.gateway.log());
    }
    // Nothing refused reached the server.
    assert_eq!(s.cluster.sql("SELECT count(*) FROM people"), "2");
    assert_eq!(s.cluster.sql("SELECT count(*) FROM secrets"), "1");
    // Filtered writes pass; a refused statement inside a transaction
    // aborts it, as a permission error from PostgreSQL would.
    let (out, err) = s.psql(&["-c", "UPDATE people SET name = 'Ann' WHERE id = 1"]);
    assert_eq!(out, "UPDATE 1", "{err}");
    // The extended protocol is judged at Parse.
    let (rows, error) = s.extended("DELETE FROM people", false);
    assert!(rows.is_empty());
    let error = error.expect("an error");
    assert!(
        error.starts_with("42501: DELETE and UPDATE need"),
        "{error}"
    );
    // Every attempt is recorded with its rule.
    let blocks = s.events("policy_block");
    assert!(blocks.len() > cases.len(), "{blocks:#?}");
    let truncate = blocks.iter().find(|b| b["rule"] == "no-truncate").unwrap();
    assert_eq!(truncate["statement"], "TRUNCATE scratch");
    assert_eq!(truncate["principal"], "unix:root");
    assert_eq!(truncate["resource"], "orders");
    // Personal data in a refused statement is stored as a keyed hash, as
    // in statement records, and a data-subject look-up finds it.
    let personal = blocks
        .iter()
        .find(|b| b["statement"].as_str().unwrap().contains("WHERE note"))
        .unwrap();
    let stored = personal["statement"].as_str().unwrap();
    assert!(
        stored.starts_with("SELECT * FROM secrets WHERE note = '[email:")
            && !stored.contains("Blocked"),
        "{stored}"
    );
    let out = s
        .gateway
        .cli(&["audit", "subject", "blocked.subject@example.org", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let hits: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        hits.iter()
            .any(|h| h["session"] == personal["session"] && h["seq"] == personal["seq"]),
        "{hits:?} should name the policy_block record {personal}"
    );
    // Sessions ended cleanly through the policy hook leave their upstream
    // for the next: the stand-ins left nothing open on it.
    assert!(s
        .events("database_login")
        .iter()
        .any(|e| e["upstream_reused"] == true));
    assert!(!s.gateway.log().contains("panicked"));
}

#[test]
fn masking_through_simple_extended_and_copy() {
    let s = Setup::new(None);
    let sql = "SELECT id, email, card, ssn, note FROM people ORDER BY id";
    let (out, err) = s.psql(&["-F", "|", "-c", sql]);
    let rows: Vec<Vec<&str>> = out.lines().map(|l| l.split('|').collect()).collect();
    assert_eq!(rows.len(), 2, "{out} {err}");
    assert!(
        rows[0][1].starts_with("tok_") && rows[0][1].len() == 20,
        "{out}"
    );
    assert_eq!(rows[0][2], "**** **** **** 1111");
    assert_eq!(rows[1][2], "************1881");
    assert_eq!(rows[0][3], "***", "column rule by pattern");
    // A 16-digit number failing Luhn is not a card: it stays.
    assert_eq!(rows[0][4], "order 4111111111111112, call me");
    // Same input, same token: joins and GROUP BY still work.
    let (again, _) = s.psql(&["-c", "SELECT email FROM people WHERE id = 1"]);
    assert_eq!(again, rows[0][1]);
    // An alias does not hide a masked column.
    let (aliased, _) = s.psql(&["-c", "SELECT ssn AS x, upper(ssn) FROM people WHERE id = 2"]);
    assert_eq!(aliased, "***|***");

    // Extended protocol, text and binary result formats.
    let (ext, error) = s.extended("SELECT id, email, card, ssn FROM people ORDER BY id", false);
    assert_eq!(error, None);
    assert_eq!(ext[0][1].as_deref(), Some(rows[0][1]));
    assert_eq!(ext[0][2].as_deref(), Some("**** **** **** 1111"));
    assert_eq!(ext[0][3].as_deref(), Some("***"));
    let (bin, error) = s.extended("SELECT id, email, card, ssn FROM people ORDER BY id", true);
    assert_eq!(error, None);
    assert_eq!(
        bin[1][0].as_deref(),
        Some("2"),
        "binary int4 passes untouched"
    );
    assert_eq!(bin[1][1].as_deref(), Some(ext[1][1].as_deref().unwrap()));
    assert_eq!(bin[1][2].as_deref(), Some("************1881"));
    assert_eq!(bin[1][3].as_deref(), Some("***"));

    // COPY TO: with named columns; without, a column mask blocks it.
    let (copied, err) = s.psql(&["-c", "COPY people (id, email, ssn, note) TO STDOUT"]);
    let first: Vec<&str> = copied.lines().next().unwrap().split('\t').collect();
    assert_eq!(first[0], "1", "{copied} {err}");
    assert_eq!(first[1], rows[0][1]);
    assert_eq!(first[2], "***");
    let (copied, _) = s.psql(&["-c", "COPY (SELECT card FROM people ORDER BY id) TO STDOUT"]);
    assert_eq!(copied, "**** **** **** 1111\n************1881");
    let (_, err) = s.psql(&["-c", "COPY people TO STDOUT"]);
    assert!(
        err.contains("42501") && err.contains("must name its columns"),
        "{err}"
    );

    // The raw values never reached the client or the record.
    let masked = s
        .gateway
        .wait_for_event("masking_applied", |e| e["event"] == "masking_applied");
    assert!(masked["rules"]["emails"].as_u64().unwrap() >= 2, "{masked}");
    let recorded = serde_json::to_string(&s.gateway.events()).unwrap();
    assert!(!recorded.contains("4111 1111 1111 1111"));
    assert!(!s.gateway.log().contains("panicked"));
}

/// A loopback HTTP server that keeps the bodies POSTed to it.
struct Hook {
    addr: SocketAddr,
    bodies: Arc<Mutex<Vec<Value>>>,
    stop: Arc<AtomicBool>,
}

impl Hook {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (store, halt) = (Arc::clone(&bodies), Arc::clone(&stop));
        thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                let Ok((stream, _)) = listener.accept() else {
                    thread::sleep(Duration::from_millis(10));
                    continue;
                };
                stream.set_nonblocking(false).unwrap();
                let mut reader = BufReader::new(stream);
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if let Some(v) = line.strip_prefix("Content-Length: ") {
                        length = v.trim().parse().unwrap();
                    }
                    if line == "\r\n" || line.is_empty() {
                        break;
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                store
                    .lock()
                    .unwrap()
                    .push(serde_json::from_slice(&body).unwrap());
                let _ = reader
                    .get_mut()
                    .write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
            }
        });
        Self { addr, bodies, stop }
    }
}

impl Drop for Hook {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn spawn_psql(s: &Setup, sql: &str) -> Child {
    s.psql_cmd(&["-c", sql, "-c", "SELECT 'after'"])
        .spawn()
        .unwrap()
}

#[test]
fn approvals_from_a_second_process() {
    let hook = Hook::start();
    let s = Setup::new(Some(hook.addr));

    // Approved from a second process: the held statement runs.
    let held = spawn_psql(&s, "DROP TABLE scratch");
    let id = s.pending_id();
    // The requester cannot approve their own request, even as an approver.
    let own = s.approvals_as("root", &["approve", &id]);
    assert!(!own.status.success());
    assert!(
        text(&own.stderr).contains("you cannot approve your own request"),
        "{}",
        text(&own.stderr)
    );
    let ok = s.approvals_as("nobody", &["approve", &id, "--reason", "planned cleanup"]);
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    let out = wait_with_timeout(held, Duration::from_secs(30));
    assert_eq!(
        text(&out.stdout),
        "DROP TABLE\nafter",
        "{}",
        text(&out.stderr)
    );
    let notice = text(&out.stderr);
    assert!(
        notice.contains(&format!("approval request {id}")),
        "{notice}"
    );
    assert!(
        notice.contains("dropping objects needs a second pair of eyes"),
        "{notice}"
    );
    assert!(notice.contains("unix:nobody"), "{notice}");
    assert_eq!(
        s.cluster
            .sql("SELECT count(*) FROM pg_tables WHERE tablename = 'scratch'"),
        "0"
    );
    // The webhook announced it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while hook.bodies.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "no webhook call");
        thread::sleep(Duration::from_millis(20));
    }
    let body = hook.bodies.lock().unwrap()[0].clone();
    assert_eq!(body["event"], "approval_requested");
    assert_eq!(body["id"], id.as_str());
    assert_eq!(body["statement"], "DROP TABLE scratch");
    assert_eq!(body["requester"], "unix:root");

    // The extended protocol is held at Parse, the same way.
    let (id, ext) = thread::scope(|scope| {
        let held = scope.spawn(|| s.extended("DROP TABLE scratch4", false));
        let id = s.pending_id();
        let ok = s.approvals_as("nobody", &["approve", &id]);
        assert!(ok.status.success(), "{}", text(&ok.stderr));
        (id, held.join().unwrap())
    });
    assert_eq!(ext, (Vec::new(), None), "request {id}");
    assert_eq!(
        s.cluster
            .sql("SELECT count(*) FROM pg_tables WHERE tablename = 'scratch4'"),
        "0"
    );

    // Denied: 42501 with the approver's reason; the session goes on.
    let held = spawn_psql(&s, "DROP TABLE scratch2");
    let id = s.pending_id();
    let no = s.approvals_as(
        "nobody",
        &["deny", &id, "--reason", "not during business hours"],
    );
    assert!(no.status.success(), "{}", text(&no.stderr));
    let out = wait_with_timeout(held, Duration::from_secs(30));
    let err = text(&out.stderr);
    assert!(
        err.contains("42501") && err.contains("not during business hours"),
        "{err}"
    );
    assert_eq!(text(&out.stdout), "after");

    // Timed out: 42501.
    let started = Instant::now();
    let (out, err) = s.psql(&["-c", "VACUUM people", "-c", "SELECT 'after'"]);
    assert!(
        err.contains("42501") && err.contains("not approved in time"),
        "{err}"
    );
    assert_eq!(out, "after");
    assert!(started.elapsed() >= Duration::from_secs(2));

    // A time-window grant: the next DROP runs without asking, until the
    // window ends.
    let held = spawn_psql(&s, "DROP TABLE scratch2");
    let id = s.pending_id();
    let ok = s.approvals_as("nobody", &["approve", &id, "--for", "3s"]);
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    wait_with_timeout(held, Duration::from_secs(30));
    let (out, err) = s.psql(&["-c", "DROP TABLE scratch3"]);
    assert_eq!(out, "DROP TABLE", "{err}");
    thread::sleep(Duration::from_secs(4));
    let held = spawn_psql(&s, "CREATE TABLE t4 (a int); DROP TABLE t4");
    let id = s.pending_id();
    assert!(s
        .approvals_as("nobody", &["deny", &id, "--reason", "window over"])
        .status
        .success());
    let out = wait_with_timeout(held, Duration::from_secs(30));
    assert!(text(&out.stderr).contains("window over"));
    // A grant longer than the rule allows is refused.
    let held = spawn_psql(&s, "DROP TABLE IF EXISTS t5");
    let id = s.pending_id();
    let long = s.approvals_as("nobody", &["approve", &id, "--for", "2h"]);
    assert!(
        text(&long.stderr).contains("at most 1h"),
        "{}",
        text(&long.stderr)
    );
    assert!(s.approvals_as("nobody", &["approve", &id]).status.success());
    wait_with_timeout(held, Duration::from_secs(30));

    // Every step is recorded.
    let steps: Vec<String> = s
        .events("approval")
        .iter()
        .map(|e| e["step"].as_str().unwrap().to_string())
        .collect();
    for step in ["requested", "approved", "denied", "timed_out"] {
        assert!(steps.iter().any(|s| s == step), "{step} missing: {steps:?}");
    }
    let approved = s
        .events("approval")
        .into_iter()
        .find(|e| e["step"] == "approved")
        .unwrap();
    assert_eq!(approved["approver"], "unix:nobody");
    assert_eq!(approved["justification"], "planned cleanup");
    assert_eq!(approved["requester"], "unix:root");
}

#[test]
fn reload_under_load_keeps_the_old_policy_when_the_new_one_is_invalid() {
    let s = Setup::new(None);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let port = s.cluster.port.to_string();
    let cgroup_path = s.cgroup.path.clone();
    let load = {
        let (stop, done) = (Arc::clone(&stop), Arc::clone(&done));
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let out = Command::new("sh")
                    .arg("-c")
                    .arg(format!(
                        "echo $$ > {}/cgroup.procs && exec psql -X -h 127.0.0.1 -p {port} -U postgres -d postgres -Atc 'SELECT count(*) FROM people'",
                        cgroup_path.display()
                    ))
                    .output()
                    .unwrap();
                assert_eq!(text(&out.stdout), "2", "{}", text(&out.stderr));
                done.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let write = |text: &str| {
        let tmp = s.policy_path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &s.policy_path).unwrap();
    };
    let original = std::fs::read_to_string(&s.policy_path).unwrap();
    // Invalid: a block rule without a reason on line 3.
    write("[[rule]]\nname = \"broken\"\naction = \"block\"\n");
    let rejected = s.gateway.wait_for_event("rejected policy load", |e| {
        e["event"] == "policy_load" && e["accepted"] == false
    });
    let error = rejected["error"].as_str().unwrap();
    assert!(
        error.contains("line 1") && error.contains("needs a reason"),
        "{error}"
    );
    s.gateway.wait_for_log("the previous policy stays in force");
    // The old policy is still in force.
    let (_, err) = s.psql(&["-c", "TRUNCATE scratch"]);
    assert!(err.contains("TRUNCATE is not allowed"), "{err}");
    // A valid new policy takes over.
    write(&original.replace(
        "TRUNCATE is not allowed on this database",
        "no TRUNCATE today",
    ));
    s.gateway.wait_for_event("accepted policy load", |e| {
        e["event"] == "policy_load" && e["accepted"] == true
    });
    let (_, err) = s.psql(&["-c", "TRUNCATE scratch"]);
    assert!(err.contains("no TRUNCATE today"), "{err}");
    stop.store(true, Ordering::Relaxed);
    load.join().expect("every query under load succeeded");
    assert!(done.load(Ordering::Relaxed) > 0);
    // `policy check` reports the same line and reason.
    write("[[rule]]\nname = \"broken\"\naction = \"block\"\n");
    let out = s
        .gateway
        .cli(&["policy", "check", "--file", s.policy_path.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("line 1: rule 'broken'"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn pgbench_prepared_and_extended_through_the_policy_relay() {
    let s = Setup::new(None);
    // Initialised directly (pgbench -i drops tables, which needs approval).
    let out = Command::new("runuser")
        .args([
            "-u", "postgres", "--", "pgbench", "-i", "-q", "-s", "1", "-h",
        ])
        .arg(s.cluster.dir())
        .args([
            "-p",
            &s.cluster.port.to_string(),
            "-U",
            "postgres",
            "postgres",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let port = s.cluster.port.to_string();
    for mode in ["prepared", "extended", "simple"] {
        let child = s
            .cgroup
            .command(
                "pgbench",
                &[
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-U",
                    "postgres",
                    "-M",
                    mode,
                    "-c",
                    "4",
                    "-j",
                    "2",
                    "-t",
                    "200",
                    "postgres",
                ],
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = wait_with_timeout(child, Duration::from_secs(120));
        let report = text(&out.stdout);
        assert!(
            out.status.success(),
            "{mode}: {report}\n{}",
            text(&out.stderr)
        );
        assert!(
            report.contains("number of failed transactions: 0"),
            "{mode}: {report}"
        );
        assert!(report.contains("800/800"), "{mode}: {report}");
    }
    assert!(!s.gateway.log().contains("panicked"));
}

#[test]
fn time_window_grants_survive_a_restart_until_they_expire() {
    let mut s = Setup::new(None);
    let held = spawn_psql(&s, "DROP TABLE scratch");
    let id = s.pending_id();
    let ok = s.approvals_as("nobody", &["approve", &id, "--for", "10s"]);
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    let granted = Instant::now();
    let out = wait_with_timeout(held, Duration::from_secs(30));
    assert_eq!(
        text(&out.stdout),
        "DROP TABLE\nafter",
        "{}",
        text(&out.stderr)
    );
    let grants = s.gateway.dir.path().join("state/grants.json");
    let mode = std::fs::metadata(&grants).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    // A restart keeps the grant: the next DROP runs without asking.
    s.gateway.stop();
    s.gateway.spawn();
    let (out, err) = s.psql(&["-c", "DROP TABLE scratch2"]);
    assert_eq!(out, "DROP TABLE", "{err}\n{}", s.gateway.log());
    assert!(
        granted.elapsed() < Duration::from_secs(10),
        "the restart took longer than the window; the test proves nothing"
    );

    // Once the window is over (and after another restart), it asks again.
    thread::sleep(
        Duration::from_secs(10).saturating_sub(granted.elapsed()) + Duration::from_secs(1),
    );
    s.gateway.stop();
    s.gateway.spawn();
    let held = spawn_psql(&s, "DROP TABLE scratch3");
    let id = s.pending_id();
    assert!(s
        .approvals_as("nobody", &["deny", &id, "--reason", "window over"])
        .status
        .success());
    let out = wait_with_timeout(held, Duration::from_secs(30));
    assert!(
        text(&out.stderr).contains("window over"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        s.cluster
            .sql("SELECT count(*) FROM pg_tables WHERE tablename = 'scratch3'"),
        "1"
    );
}

#[test]
fn masked_values_are_in_the_subject_index() {
    let s = Setup::new(None);
    let (out, err) = s.psql(&["-c", "SELECT email, card FROM people WHERE id = 1"]);
    assert!(
        out.starts_with("tok_") && out.ends_with("|**** **** **** 1111"),
        "{out} {err}"
    );
    let session = s.wait_for_masking();
    let lookup = |value: &str| -> Vec<Value> {
        let out = s.gateway.cli(&["audit", "subject", value, "--json"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    // The hits for `value` once there are any (the writer commits every
    // 50 ms), or none after 20 s.
    let first_hits = |value: &str| -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let hits = lookup(value);
            if !hits.is_empty() || Instant::now() > deadline {
                return hits;
            }
            thread::sleep(Duration::from_millis(50));
        }
    };
    // Hashed in the masker (case and surrounding space do not matter).
    let hits = first_hits(" Ann@Example.com");
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert_eq!(hits[0]["session"], session.as_str());
    assert_eq!(hits[0]["source"], "masked");
    assert_eq!(hits[0]["statement_seq"], 1);
    let card = lookup("4111 1111 1111 1111");
    assert!(
        card.iter().any(|h| h["session"] == session.as_str()),
        "{card:?}"
    );
    // Bob's row was not returned.
    assert!(lookup("bob@example.org").is_empty());

    // A disclosure is indexed as the result goes by, not when the session
    // ends: a data-subject request finds it while the session is open. The
    // hit names the statement that returned the value (the second here).
    let mut open = s
        .psql_cmd(&[
            "-c",
            "SELECT 1",
            "-c",
            "SELECT email FROM people WHERE id = 2",
            "-c",
            "SELECT pg_sleep(60)",
        ])
        .spawn()
        .unwrap();
    let hits = first_hits("bob@example.org");
    let still_open = open.try_wait().unwrap().is_none();
    let _ = open.kill();
    let _ = open.wait();
    assert!(
        still_open,
        "the session ended before its disclosure was found"
    );
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert_eq!(hits[0]["source"], "masked");
    assert_ne!(hits[0]["session"], session.as_str());
    assert_eq!(hits[0]["statement_seq"], 2, "{hits:?}");
    let disclosed = s.gateway.wait_for_event("the disclosing statement", |e| {
        e["event"] == "statement" && e["session"] == hits[0]["session"] && e["statement_seq"] == 2
    });
    assert_eq!(disclosed["text"], "SELECT email FROM people WHERE id = 2");
}

impl Setup {
    /// Waits for a session's `masking_applied` event; returns the session.
    fn wait_for_masking(&self) -> String {
        let event = self
            .gateway
            .wait_for_event("masking_applied", |e| e["event"] == "masking_applied");
        event["session"].as_str().unwrap().to_string()
    }
}

/// The start of a raw client that keeps its BackendKeyData: `msg()` reads
/// one message, `send()` writes one, `cancel()` sends a CancelRequest from
/// a second connection, and `exchange()` reads up to ReadyForQuery,
/// cancelling when the approval notice for `held` arrives.
const RAW_CLIENT: &str = r#"
import json, socket, struct
port = {port}
s = socket.create_connection(('127.0.0.1', port))
def send(t, b): s.sendall(t + struct.pack('!I', len(b) + 4) + b)
p = b'user\0postgres\0database\0postgres\0\0'
s.sendall(struct.pack('!II', len(p) + 8, 196608) + p)
buf = b''
def msg():
    global buf
    while len(buf) < 5 or len(buf) < 1 + struct.unpack('!I', buf[1:5])[0]:
        d = s.recv(65536)
        if not d: raise SystemExit('connection closed')
        buf += d
    n = struct.unpack('!I', buf[1:5])[0]
    t, body, buf = buf[0:1], buf[5:1 + n], buf[1 + n:]
    return t, body
def fields(b): return dict((x[0:1].decode(), x[1:].decode()) for x in b.split(b'\0') if x)
key = None
while True:
    t, b = msg()
    if t == b'R' and b[:4] != b'\0\0\0\0': raise SystemExit('password requested')
    if t == b'K': key = struct.unpack('!ii', b)
    if t == b'Z': break
def cancel():
    c = socket.create_connection(('127.0.0.1', port))
    c.sendall(struct.pack('!IIii', 16, 80877102, key[0], key[1]))
    c.recv(1)
    c.close()
def exchange(held=False):
    out = {'types': '', 'notices': [], 'errors': [], 'rows': []}
    while True:
        t, b = msg()
        out['types'] += t.decode()
        if t == b'N':
            out['notices'].append(fields(b)['M'])
            if held and 'approval request' in out['notices'][-1]: cancel()
        if t == b'E':
            f = fields(b)
            out['errors'].append(f['C'] + ': ' + f['M'])
        if t == b'D': out['rows'].append(b[6:].decode())
        if t == b'Z':
            out['status'] = b.decode()
            return out
"#;

/// Sends `{sql}`, cancels its approval wait, runs `select 1` on the same
/// session, then breaks the framing.
const CANCELLING_CLIENT: &str = r#"
def query(sql):
    send(b'Q', sql.encode() + b'\0')
    return exchange(held=sql == '{sql}')
held = query('{sql}')
after = query('select 1')
s.sendall(b'Q\0\0\0\x02')
t, b = msg()
print(json.dumps({'held': held, 'after': after, 'broken': t.decode() + ' ' + fields(b).get('C', '')}))
"#;

/// The extended protocol: Parses of `DROP TABLE scratch` (named, unnamed,
/// and inside a transaction) cancelled while they wait for approval, and
/// what the session sees of their names afterwards.
const CANCELLING_EXTENDED_CLIENT: &str = r#"
def z(s): return s.encode() + b'\0'
def parse(name, sql): send(b'P', z(name) + z(sql) + b'\0\0')
def run(name):
    send(b'B', b'\0' + z(name) + b'\0\0\0\0\0\0')
    send(b'E', b'\0\0\0\0\0')
def sync(held=False):
    send(b'S', b'')
    return exchange(held)
out = {}
parse('', 'select 1'); out['unnamed'] = sync()
parse('s1', 'DROP TABLE scratch'); send(b'D', b'Ss1\0'); out['named'] = sync(held=True)
run('s1'); out['named_after'] = sync()
parse('s1', 'select 2'); run('s1'); out['named_again'] = sync()
run(''); out['unnamed_kept'] = sync()
parse('', 'DROP TABLE scratch'); run(''); out['unnamed_cancelled'] = sync(held=True)
run(''); out['unnamed_after'] = sync()
send(b'Q', z('BEGIN')); exchange()
parse('s2', 'DROP TABLE scratch'); out['in_transaction'] = sync(held=True)
send(b'Q', z('ROLLBACK')); out['rolled_back'] = exchange()
parse('s2', 'select 3'); run('s2'); out['last'] = sync()
print(json.dumps(out))
"#;

/// Runs a raw client script against the cluster's address, in the cgroup.
fn raw_client(s: &Setup, script: &str, sql: &str) -> Value {
    let code = format!("{RAW_CLIENT}{script}")
        .replace("{port}", &s.cluster.port.to_string())
        .replace("{sql}", sql);
    let out = s.cgroup.python(&code);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{}", s.gateway.log()))
}

/// A cancelled Parse fails as PostgreSQL fails one: 57014 in its place,
/// nothing after it until the Sync, and no statement left under its name.
#[test]
fn a_held_parse_is_cancelled_as_postgres_cancels_it() {
    let s = Setup::new(None);
    let out = raw_client(&s, CANCELLING_EXTENDED_CLIENT, "");
    let cancelled = serde_json::json!(["57014: canceling statement due to user request"]);
    let missing = |what: &str| serde_json::json!([format!("26000: {what} does not exist")]);
    // The client sees the notice, the error and ReadyForQuery: none of the
    // stand-in's own completions, nothing for the skipped Describe.
    assert_eq!(out["named"]["types"], "NEZ", "{out}");
    assert_eq!(out["named"]["errors"], cancelled, "{out}");
    assert_eq!(
        out["named_after"]["errors"],
        missing("prepared statement \"s1\""),
        "{out}"
    );
    assert_eq!(
        out["named_again"]["rows"],
        serde_json::json!(["2"]),
        "{out}"
    );
    // A failed Parse of the unnamed statement leaves others alone...
    assert_eq!(
        out["unnamed_kept"]["rows"],
        serde_json::json!(["1"]),
        "{out}"
    );
    // ...and drops the unnamed one, as PostgreSQL drops it before parsing.
    assert_eq!(out["unnamed_cancelled"]["types"], "NEZ", "{out}");
    assert_eq!(out["unnamed_cancelled"]["errors"], cancelled, "{out}");
    assert_eq!(
        out["unnamed_after"]["errors"],
        missing("unnamed prepared statement"),
        "{out}"
    );
    // Inside a transaction the cancel aborts it, as any error does.
    assert_eq!(out["in_transaction"]["errors"], cancelled, "{out}");
    assert_eq!(out["in_transaction"]["status"], "E", "{out}");
    assert_eq!(out["rolled_back"]["status"], "I", "{out}");
    assert_eq!(out["last"]["rows"], serde_json::json!(["3"]), "{out}");
    assert_eq!(
        s.cluster
            .sql("SELECT count(*) FROM pg_tables WHERE tablename = 'scratch'"),
        "1"
    );
    let cancelled = s
        .events("approval")
        .into_iter()
        .filter(|e| e["step"] == "cancelled")
        .count();
    assert_eq!(cancelled, 3);
    // The Execute that came with the unnamed Parse is recorded with the error.
    assert!(s
        .events("statement")
        .iter()
        .any(|e| e["text"] == "DROP TABLE scratch" && e["error"]["sqlstate"] == "57014"));
    assert!(!s.gateway.log().contains("panicked"));
}

#[test]
fn a_held_statement_is_cancelled_by_a_cancel_request() {
    let s = Setup::new(None);

    // A raw client cancels with the key it was given; the session goes on.
    let out = raw_client(&s, CANCELLING_CLIENT, "DROP TABLE scratch");
    let held = &out["held"];
    assert!(
        held["notices"][0]
            .as_str()
            .unwrap()
            .contains("approval request"),
        "{out}"
    );
    assert_eq!(
        held["errors"],
        serde_json::json!(["57014: canceling statement due to user request"]),
        "{out}"
    );
    assert_eq!(held["status"], "I", "{out}");
    assert_eq!(out["after"]["rows"], serde_json::json!(["1"]), "{out}");
    assert_eq!(out["after"]["errors"], serde_json::json!([]), "{out}");
    // A protocol violation gets FATAL 08P01 through the policy hook too.
    assert_eq!(out["broken"], "E 08P01", "{out}");
    assert_eq!(
        s.cluster
            .sql("SELECT count(*) FROM pg_tables WHERE tablename = 'scratch'"),
        "1"
    );

    // psql's own cancel (libpq PQcancel on SIGINT), inside a transaction:
    // the transaction is aborted as PostgreSQL aborts it for a cancel.
    let child = s
        .psql_cmd(&[
            "-c",
            "BEGIN",
            "-c",
            "DROP TABLE scratch2",
            "-c",
            "SELECT 'in aborted transaction'",
        ])
        .spawn()
        .unwrap();
    let id = s.pending_id();
    let interrupted = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    let out = wait_with_timeout(child, Duration::from_secs(30));
    let err = text(&out.stderr);
    assert!(
        err.contains("57014") && err.contains("canceling statement due to user request"),
        "{err}\n{}",
        s.gateway.log()
    );
    assert!(
        !text(&out.stdout).contains("in aborted transaction"),
        "{err}"
    );

    // Nothing is left pending, and the withdrawal is an approval step.
    let list = s.approvals_as("nobody", &["list", "--json"]);
    assert!(list.status.success(), "{}", text(&list.stderr));
    let list: Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(list, serde_json::json!([]));
    let approve = s.approvals_as("nobody", &["approve", &id]);
    assert!(!approve.status.success());
    let cancelled: Vec<Value> = s
        .events("approval")
        .into_iter()
        .filter(|e| e["step"] == "cancelled")
        .collect();
    assert_eq!(cancelled.len(), 2, "{cancelled:?}");
    assert!(cancelled.iter().any(|e| e["id"] == id.as_str()));
    assert!(cancelled
        .iter()
        .all(|e| e["requester"] == "unix:root" && e["rule"] == "drops-need-approval"));
    let statements = s.events("statement");
    assert!(
        statements
            .iter()
            .any(|e| e["text"] == "DROP TABLE scratch" && e["error"]["sqlstate"] == "57014"),
        "{statements:?}"
    );
    assert_eq!(
        s.cluster
            .sql("SELECT count(*) FROM pg_tables WHERE tablename = 'scratch2'"),
        "1"
    );
    assert!(!s.gateway.log().contains("panicked"));
}
