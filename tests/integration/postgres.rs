//! The PostgreSQL adapter against a real cluster with real psql and
//! pgbench: redirected and direct clients, simple and extended protocol,
//! pipelining, COPY, cancel, large results with bounded memory, TLS on both
//! sides, refusals, upstream failures and malformed input.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    harness::*,
    pg::{newer_libpq, PgCluster, CERT_ROLE, MD5_ROLE, PG_PASSWORD, PLAIN_ROLE},
};

/// A cluster behind a gateway with a `postgres` listener (direct, TLS) and
/// one resource for it.
struct Setup {
    cgroup: TestCgroup,
    cluster: PgCluster,
    gateway: Gateway,
    listener: SocketAddr,
    /// The resource's port, which the kernel redirects: the cluster's
    /// unless `Options::address` names another.
    protected_port: u16,
    /// The gateway listener's certificate.
    cert: PathBuf,
}

/// How the resource's grants are written.
struct Options {
    grant_users: &'static str,
    password: &'static str,
    secret_mode: u32,
    upstream_tls: &'static str,
    cluster_tls: bool,
    /// Resource address override (for "upstream down").
    address: Option<String>,
    /// The resource's `server_name` (the upstream certificate's name).
    server_name: Option<&'static str>,
    /// `ca_file` names a CA that did not sign the cluster's certificate.
    wrong_ca: bool,
    /// The client certificate grant's certificate names another role.
    wrong_client_cert: bool,
    /// Idle upstreams kept for reuse (`upstream_pool`).
    upstream_pool: usize,
    /// Proxy worker threads.
    workers: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            grant_users: "users = [\"unix:root\"]",
            password: PG_PASSWORD,
            secret_mode: 0o600,
            upstream_tls: "disable",
            cluster_tls: false,
            address: None,
            server_name: None,
            wrong_ca: false,
            wrong_client_cert: false,
            upstream_pool: 10,
            // Sessions and their cancel requests may land on different
            // threads, which must not matter.
            workers: 2,
        }
    }
}

impl Setup {
    fn new() -> Self {
        Self::with(Options::default())
    }

    fn with(o: Options) -> Self {
        let cgroup = TestCgroup::new();
        let cluster = PgCluster::start_with(o.cluster_tls);
        let secret = cluster.secret_file("main", o.password);
        std::fs::set_permissions(
            &secret,
            std::os::unix::fs::PermissionsExt::from_mode(o.secret_mode),
        )
        .unwrap();
        let tls_dir = cluster.dir().join("gateway-tls");
        self_signed(&tls_dir, &[]);
        let listener: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let address = o.address.clone().unwrap_or_else(|| cluster.addr());
        let mut ca = match &cluster.cert {
            // The gateway's own self-signed certificate signed nothing else.
            Some(_) if o.wrong_ca => format!("ca_file = \"{}/cert.pem\"\n", tls_dir.display()),
            Some(cert) => format!("ca_file = \"{}\"\n", cert.display()),
            None => String::new(),
        };
        if let Some(name) = o.server_name {
            ca.push_str(&format!("server_name = \"{name}\"\n"));
        }
        // Over TLS, a grant that logs in with a client certificate alone.
        let certificate_grant = match &cluster.client_certificates {
            Some((right, wrong)) if o.upstream_tls != "disable" => {
                let c = if o.wrong_client_cert { wrong } else { right };
                format!(
                    "[[resource.grant]]\n{}\nupstream_user = \"{CERT_ROLE}\"\n\
                     client_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
                    o.grant_users,
                    c.cert.display(),
                    c.key.display()
                )
            }
            _ => String::new(),
        };
        let extra = format!(
            r#"
[proxy]
workers = {workers}

[[listener]]
name = "pg"
address = "{listener}"
protocol = "postgres"
direct = true
tls_cert = "{dir}/cert.pem"
tls_key = "{dir}/key.pem"

[[resource]]
name = "orders"
protocol = "postgres"
address = "{address}"
tls = "{tls}"
upstream_pool = {pool}
{ca}
[[resource.grant]]
{users}
upstream_user = "postgres"
password_file = "{secret}"

[[resource.grant]]
{users}
upstream_user = "{MD5_ROLE}"
password_file = "{secret}"

[[resource.grant]]
{users}
upstream_user = "{PLAIN_ROLE}"
password_file = "{secret}"

{certificate_grant}"#,
            dir = tls_dir.display(),
            tls = o.upstream_tls,
            users = o.grant_users,
            secret = secret.display(),
            pool = o.upstream_pool,
            workers = o.workers,
        );
        let protected_port: u16 = address.rsplit(':').next().unwrap().parse().unwrap();
        let gateway = Gateway::start_with_config(
            &cgroup,
            &[Protect::postgres("127.0.0.1", protected_port)],
            &extra,
        );
        Self {
            cgroup,
            gateway,
            listener,
            protected_port,
            cert: tls_dir.join("cert.pem"),
            cluster,
        }
    }

    fn port(&self) -> String {
        self.protected_port.to_string()
    }

    /// psql inside the test cgroup (so redirected), to the protected address.
    fn psql_cmd(&self, user: &str, args: &[&str]) -> Command {
        let mut full = vec![
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-U",
            user,
            "-d",
            "postgres",
        ];
        let port = self.port();
        full.extend(["-p", port.as_str()]);
        full.extend(args);
        let mut cmd = self.cgroup.command("psql", &full);
        cmd.env("PGCONNECT_TIMEOUT", "10")
            .env_remove("PGPASSWORD")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// `psql -c "select 1"` to the listener itself, as a remote client,
    /// naming `database` (a resource).
    fn remote_psql(&self, database: &str) -> Command {
        let mut cmd = Command::new("psql");
        cmd.args(["-X", "-h", "127.0.0.1", "-p"])
            .arg(self.listener.port().to_string())
            .args(["-U", "anyone", "-d", database, "-Atc", "select 1"])
            .env("PGCONNECT_TIMEOUT", "10");
        cmd
    }

    fn psql(&self, args: &[&str]) -> Output {
        self.psql_as("postgres", args)
    }

    fn psql_as(&self, user: &str, args: &[&str]) -> Output {
        let child = self.psql_cmd(user, args).spawn().unwrap();
        wait_with_timeout(child, Duration::from_secs(60))
    }

    fn query(&self, sql: &str) -> String {
        let out = self.psql(&["-Atc", sql]);
        assert!(
            out.status.success(),
            "psql {sql}: {}\ngateway log: {}",
            String::from_utf8_lossy(&out.stderr),
            self.gateway.log()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `psql -X <args_and_pipe>` through a shell in the test cgroup, for a
    /// client whose output is read slowly, partly or not at all.
    fn psql_piped(&self, args_and_pipe: &str, timeout: Duration) -> Output {
        let script = format!(
            "psql -X -h 127.0.0.1 -p {} -U postgres -d postgres {args_and_pipe}",
            self.port()
        );
        let child = self
            .cgroup
            .command("sh", &["-c", &script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_with_timeout(child, timeout)
    }

    fn pgbench(&self, args: &[&str]) -> Output {
        let port = self.port();
        let mut full = vec!["-h", "127.0.0.1", "-p", port.as_str(), "-U", "postgres"];
        full.extend(args);
        full.push("postgres");
        let child = self
            .cgroup
            .command("pgbench", &full)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_with_timeout(child, Duration::from_secs(120))
    }

    fn statements(&self) -> Vec<Value> {
        self.gateway
            .events_after_sessions_end()
            .into_iter()
            .filter(|e| e["event"] == "statement")
            .collect()
    }

    fn wait_statement(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.gateway
            .wait_for_event(what, |e| e["event"] == "statement" && pred(e))
    }

    /// The daemon's peak resident memory (VmHWM) in KiB.
    fn daemon_peak_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.gateway.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    }

    /// A kernel counter from `portcullis status`.
    fn counter(&self, name: &str) -> u64 {
        self.gateway.status_json()["counters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c[0] == name)
            .and_then(|c| c[1].as_u64())
            .unwrap_or(0)
    }

    fn fast_path_messages(&self) -> u64 {
        self.counter("fast_path_messages")
    }

    fn assert_no_panic(&self) {
        let log = self.gateway.log();
        assert!(!log.contains("panicked"), "the gateway panicked: {log}");
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn psql_simple_extended_copy_and_statement_records() {
    let s = Setup::new();
    // Simple protocol; the gateway logged in upstream with SCRAM.
    assert_eq!(s.query("select 40 + 2"), "42");
    assert_eq!(s.query("select current_user"), "postgres");
    let login = s
        .gateway
        .wait_for_event("database_login", |e| e["event"] == "database_login");
    assert_eq!(login["resource"], "orders");
    assert_eq!(login["upstream_user"], "postgres");
    assert_eq!(login["principal"]["subject"], "unix:root");

    // MD5 and cleartext upstream roles, chosen by the client's user name.
    let out = s.psql_as(MD5_ROLE, &["-Atc", "select current_user"]);
    assert_eq!(stdout(&out).trim(), MD5_ROLE, "{}", stderr(&out));
    let out = s.psql_as(PLAIN_ROLE, &["-Atc", "select current_user"]);
    assert_eq!(stdout(&out).trim(), PLAIN_ROLE, "{}", stderr(&out));

    // Several statements in one Query, an error, notices.
    s.query(
        "create table t (id int primary key, name text); insert into t values (1, 'a'), (2, 'b')",
    );
    let out = s.psql(&["-Atc", "select 1/0"]);
    assert!(
        stderr(&out).contains("division by zero"),
        "{}",
        stderr(&out)
    );
    let err = s.wait_statement("division error", |e| e["text"] == "select 1/0");
    assert_eq!(err["error"]["sqlstate"], "22012");
    let out = s.psql(&["-Atc", "do $$ begin raise notice 'hello notice'; end $$"]);
    assert!(stderr(&out).contains("hello notice"), "{}", stderr(&out));

    // Notifications reach the listening client.
    let out = s.psql(&[
        "-c",
        "listen portcullis_ch",
        "-c",
        "notify portcullis_ch, 'hello channel'",
    ]);
    assert!(
        stdout(&out)
            .contains("Asynchronous notification \"portcullis_ch\" with payload \"hello channel\""),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );

    // COPY in from stdin and out to stdout.
    let mut child = s
        .psql_cmd("postgres", &["-c", "\\copy t from stdin"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let rows: String = (3..=1002).map(|i| format!("{i}\tname{i}\n")).collect();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(rows.as_bytes())
        .unwrap();
    let out = wait_with_timeout(child, Duration::from_secs(60));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(s.query("select count(*) from t"), "1002");
    let out = s.psql(&["-c", "copy (select * from t order by id) to stdout"]);
    assert_eq!(stdout(&out).lines().count(), 1002, "{}", stderr(&out));
    let copy_in = s.wait_statement("copy in", |e| {
        e["text"].as_str().unwrap_or("").contains("FROM STDIN")
            || e["text"].as_str().unwrap_or("").contains("from stdin")
    });
    assert_eq!(copy_in["rows"], 1000);
    let copy_out = s.wait_statement("copy out", |e| {
        e["text"].as_str().unwrap_or("").starts_with("copy (select")
    });
    assert_eq!(copy_out["rows"], 1002);

    let select = s.wait_statement("select", |e| e["text"] == "select 40 + 2");
    assert_eq!(select["rows_returned"], 1);
    assert_eq!(select["protocol"], "simple");
    assert!(select["duration_us"].as_u64().is_some());
    s.assert_no_panic();
}

#[test]
fn pgbench_prepared_pipelined_and_fifty_sessions() {
    let s = Setup::new();
    // Initialisation goes through the gateway too (COPY, DDL).
    let out = s.pgbench(&["-i", "-s", "1", "-q"]);
    assert!(out.status.success(), "pgbench -i: {}", stderr(&out));

    // Prepared statements (named), extended protocol, 50 sessions at once.
    let out = s.pgbench(&["-c", "50", "-j", "2", "-t", "20", "-M", "prepared", "-S"]);
    assert!(
        out.status.success(),
        "pgbench: {}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stdout(&out).contains("number of transactions actually processed: 1000/1000"),
        "{}",
        stdout(&out)
    );

    // A pipeline: several Bind/Execute before one Sync, bound parameters.
    let script = s.cluster.dir().join("pipeline.sql");
    std::fs::write(
        &script,
        "\\set aid random(1, 100000)\n\\startpipeline\n\
         select abalance from pgbench_accounts where aid = :aid;\n\
         select :aid::int + 1 as next;\n\
         select 'pipelined ' || :aid;\n\\endpipeline\n",
    )
    .unwrap();
    let script = script.to_str().unwrap();
    let out = s.pgbench(&["-c", "4", "-t", "25", "-M", "extended", "-f", script]);
    assert!(
        out.status.success(),
        "pgbench pipeline: {}{}",
        stdout(&out),
        stderr(&out)
    );
    let piped = s.wait_statement("pipelined execute", |e| {
        e["text"]
            .as_str()
            .unwrap_or("")
            .starts_with("select 'pipelined '")
    });
    assert_eq!(piped["protocol"], "extended");
    assert_eq!(piped["rows"], 1);
    let params = piped["parameters"]
        .as_array()
        .expect("bound parameters recorded");
    assert_eq!(params.len(), 1);
    assert!(
        params[0].as_str().unwrap().parse::<u32>().is_ok(),
        "{piped}"
    );
    let stmts = s.statements();
    let pipelined = stmts
        .iter()
        .filter(|e| {
            e["text"]
                .as_str()
                .unwrap_or("")
                .starts_with("select 'pipelined '")
        })
        .count();
    assert_eq!(pipelined, 100);
    s.assert_no_panic();
}

/// psql's `select pg_sleep(30)`, cancelled by SIGINT after 2 s: its
/// CancelRequest reaches the upstream backend, and the statement's record
/// says so.
fn cancel_a_sleep(s: &Setup) {
    let started = Instant::now();
    // psql sends a protocol CancelRequest on SIGINT.
    let child = s
        .cgroup
        .command(
            "timeout",
            &[
                "-s",
                "INT",
                "2",
                "psql",
                "-X",
                "-h",
                "127.0.0.1",
                "-p",
                &s.port(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-c",
                "select pg_sleep(30)",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_with_timeout(child, Duration::from_secs(25));
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(
        stderr(&out).contains("canceling statement due to user request"),
        "{}\n{}",
        stderr(&out),
        s.gateway.log()
    );
    let e = s.wait_statement("cancelled", |e| e["text"] == "select pg_sleep(30)");
    assert_eq!(e["error"]["sqlstate"], "57014");
}

#[test]
fn cancel_request_reaches_the_upstream_backend() {
    let s = Setup::new();
    cancel_a_sleep(&s);
    // A forged key cancels nothing and is not an error.
    let mut raw = TcpStream::connect(s.listener).unwrap();
    raw.write_all(&[0, 0, 0, 16, 4, 210, 22, 46, 0, 0, 0, 1, 0, 0, 0, 2])
        .unwrap();
    let mut buf = Vec::new();
    let _ = raw.read_to_end(&mut buf);
    assert_eq!(s.query("select 1"), "1");
    s.assert_no_panic();
}

#[test]
fn million_rows_stream_with_bounded_memory_and_mid_result_disconnect() {
    let s = Setup::new();
    assert_eq!(s.query("select 1"), "1");
    let baseline = s.daemon_peak_kib();
    let sql = "copy (select g, repeat('x', 100) from generate_series(1, 1000000) g) to stdout";
    // A slow reader: psql's output pipe is not read for 3 s.
    let out = s.psql_piped(
        &format!("-c \"{sql}\" | (sleep 3; wc -l)"),
        Duration::from_secs(120),
    );
    assert_eq!(stdout(&out).trim(), "1000000", "{}", stderr(&out));
    // The same as a query result (DataRows rather than CopyData).
    let out = s.psql_piped(
        "-At -c \"select g, repeat('y', 100) from generate_series(1, 1000000) g\" | wc -l",
        Duration::from_secs(120),
    );
    assert_eq!(stdout(&out).trim(), "1000000", "{}", stderr(&out));
    let rows = s.wait_statement("big select", |e| {
        e["text"].as_str().unwrap_or("").contains("repeat('y'")
    });
    assert_eq!(rows["rows_returned"], 1_000_000);
    // About 230 MB went through; the gateway's peak grows by buffers only.
    let peak = s.daemon_peak_kib();
    eprintln!("gateway VmHWM: {baseline} KiB before, {peak} KiB after");
    assert!(
        peak < baseline + 16 * 1024,
        "gateway peak RSS grew from {baseline} to {peak} KiB"
    );

    // A client that goes away mid-result: the session ends, the daemon
    // keeps serving.
    s.psql_piped(
        &format!("-c \"{sql}\" | head -c 100000 > /dev/null"),
        Duration::from_secs(60),
    );
    assert_eq!(s.query("select 'still serving'"), "still serving");
    // The upstream backend of the abandoned session goes away too.
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.cluster.sql("select count(*) from pg_stat_activity where query like 'copy (select g%' and pid <> pg_backend_pid()") != "0" {
        assert!(Instant::now() < deadline, "abandoned upstream query still running");
        std::thread::sleep(Duration::from_millis(100));
    }
    s.assert_no_panic();
}

#[test]
fn tls_on_both_sides_and_direct_clients() {
    let s = Setup::with(Options {
        upstream_tls: "verify-full",
        cluster_tls: true,
        ..Options::default()
    });
    // Client to gateway: TLS, the gateway's certificate verified by psql.
    let out = s
        .psql_cmd(
            "postgres",
            &[
                "-Atc",
                "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
            ],
        )
        .env("PGSSLMODE", "verify-full")
        .env("PGSSLROOTCERT", &s.cert)
        .spawn()
        .unwrap();
    let out = wait_with_timeout(out, Duration::from_secs(30));
    // Gateway to upstream: TLS verified against the cluster's certificate.
    assert_eq!(
        stdout(&out).trim(),
        "t",
        "{}\n{}",
        stderr(&out),
        s.gateway.log()
    );
    let login = s.gateway.wait_for_event("tls login", |e| {
        e["event"] == "database_login" && e["client_tls"] == true
    });
    assert_eq!(login["direct"], false);

    // A grant that logs in with a client certificate alone (`cert` in
    // pg_hba.conf): the upstream sees its name.
    let as_certificate = |s: &Setup| {
        s.psql_as(
            CERT_ROLE,
            &[
                "-Atc",
                "select current_user, client_dn from pg_stat_ssl where pid = pg_backend_pid()",
            ],
        )
    };
    let out = as_certificate(&s);
    assert_eq!(
        stdout(&out).trim(),
        format!("{CERT_ROLE}|/CN={CERT_ROLE}"),
        "{}",
        stderr(&out)
    );
    // A certificate for another name: the upstream's refusal, passed on.
    let wrong = Setup::with(Options {
        upstream_tls: "verify-full",
        cluster_tls: true,
        wrong_client_cert: true,
        ..Options::default()
    });
    let out = as_certificate(&wrong);
    assert!(
        stderr(&out).contains(&format!(
            "the database refused the gateway's login for resource \"orders\": certificate authentication failed for user \"{CERT_ROLE}\""
        )),
        "{}",
        stderr(&out)
    );
    drop(wrong);

    // A direct (not redirected) client must use TLS and present a token.
    let direct = |sslmode: &str, password: &str| {
        let out = s
            .remote_psql("orders")
            .env("PGSSLMODE", sslmode)
            .env("PGPASSWORD", password)
            .output()
            .unwrap();
        assert!(!out.status.success());
        stderr(&out)
    };
    let plain = direct("disable", "whatever");
    assert!(plain.contains("must be encrypted"), "{plain}");
    let forged = direct("require", "not-a-token");
    assert!(forged.contains("token refused"), "{forged}");
    let unknown = s
        .remote_psql("nosuch")
        .env("PGSSLMODE", "require")
        .output()
        .unwrap();
    assert!(
        stderr(&unknown).contains("no resource named \"nosuch\""),
        "{}",
        stderr(&unknown)
    );

    // The certificate checked for another name than the address: the
    // cluster's names orders-db.test too, and not db.example.test.
    let checked = |tls, name, wrong_ca| {
        Setup::with(Options {
            upstream_tls: tls,
            cluster_tls: true,
            server_name: Some(name),
            wrong_ca,
            ..Options::default()
        })
    };
    let refused = |s: Setup, reason: &str| {
        let out = s.psql(&["-Atc", "select 1"]);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("cannot open resource \"orders\""),
            "{}",
            stderr(&out)
        );
        s.gateway.wait_for_log("TLS with resource 'orders' failed");
        s.gateway.wait_for_log(reason);
    };
    assert_eq!(
        checked("verify-full", "orders-db.test", false).query("select 1"),
        "1"
    );
    refused(
        checked("verify-full", "db.example.test", false),
        "certificate not valid for name \"db.example.test\"",
    );
    // tls = "verify-ca": the CA is checked, the name is not.
    assert_eq!(
        checked("verify-ca", "db.example.test", false).query("select 1"),
        "1"
    );
    // Both self-signed certificates name the same issuer: the signature
    // is what fails.
    refused(
        checked("verify-ca", "orders-db.test", true),
        "invalid peer certificate: BadSignature",
    );

    // tls = "require": encrypted without verifying the certificate.
    let r = Setup::with(Options {
        upstream_tls: "require",
        cluster_tls: true,
        ..Options::default()
    });
    assert_eq!(
        r.query("select ssl from pg_stat_ssl where pid = pg_backend_pid()"),
        "t"
    );
    drop(r);

    // GSSAPI encryption is declined cleanly; the client falls back.
    let out = s
        .psql_cmd("postgres", &["-Atc", "select 7"])
        .env("PGGSSENCMODE", "prefer")
        .spawn()
        .unwrap();
    let out = wait_with_timeout(out, Duration::from_secs(30));
    assert_eq!(stdout(&out).trim(), "7", "{}", stderr(&out));

    // A cancel request carries the upstream backend's secret: it goes
    // over TLS too (the unit tests show the SSLRequest first).
    cancel_a_sleep(&s);

    // An upstream TLS connection serves the next session too.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        s.query("select ssl from pg_stat_ssl where pid = pg_backend_pid()"),
        "t"
    );
    assert!(s
        .gateway
        .events()
        .iter()
        .any(|e| e["event"] == "database_login" && e["upstream_reused"] == true));
    s.assert_no_panic();
}

/// Every file under a directory made immutable (`chattr +i`) until dropped:
/// writes to it then fail with EPERM, as on a failing disk.
struct Immutable(PathBuf);

impl Immutable {
    fn set(dir: PathBuf) -> Self {
        let out = Command::new("chattr")
            .arg("-R")
            .arg("+i")
            .arg(&dir)
            .output()
            .unwrap();
        let guard = Self(dir);
        assert!(out.status.success(), "chattr: {}", stderr(&out));
        guard
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr")
            .arg("-R")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}

/// No session goes unrecorded: while the audit store cannot commit, new
/// sessions are refused before any statement reaches the upstream, and
/// served again once it can. sled refuses every write after an I/O error
/// in its own files until it is reopened, so then the daemon exits for its
/// service manager to restart it. The failed commits leave the chain
/// intact.
#[test]
fn clients_that_start_tls_directly() {
    let s = Setup::with(Options::default());
    let libpq = newer_libpq();
    let on_libpq_18 = |cmd: &mut Command, negotiation: &str| {
        cmd.env("LD_LIBRARY_PATH", &libpq)
            .env("PGSSLNEGOTIATION", negotiation)
            .env("PGSSLMODE", "verify-full")
            .env("PGSSLROOTCERT", &s.cert);
    };
    // A local client, redirected by the kernel: TLS from its first byte,
    // with ALPN; and the same libpq through SSLRequest, offering ALPN
    // there too.
    for negotiation in ["direct", "postgres"] {
        let mut cmd = s.psql_cmd(
            "postgres",
            &[
                "-Atc",
                "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
            ],
        );
        on_libpq_18(&mut cmd, negotiation);
        let out = wait_with_timeout(cmd.spawn().unwrap(), Duration::from_secs(30));
        // The upstream leg is plain here: only the client's is TLS.
        assert_eq!(
            stdout(&out).trim(),
            "f",
            "{negotiation}: {}
{}",
            stderr(&out),
            s.gateway.log()
        );
    }
    let logins: Vec<Value> = s
        .gateway
        .events()
        .into_iter()
        .filter(|e| e["event"] == "database_login")
        .collect();
    assert_eq!(logins.len(), 2);
    assert!(logins.iter().all(|e| e["client_tls"] == true), "{logins:?}");

    // A remote client of the listener negotiates the same way, up to the
    // gateway's own checks.
    let mut remote = s.remote_psql("nosuch");
    on_libpq_18(&mut remote, "direct");
    let out = remote.output().unwrap();
    assert!(
        stderr(&out).contains("no resource named \"nosuch\""),
        "{}",
        stderr(&out)
    );

    // TLS started directly without naming PostgreSQL by ALPN: refused,
    // with the reason sent over the TLS the client asked for.
    let listener = format!("127.0.0.1:{}", s.listener.port());
    let s_client = |alpn: Option<&str>| {
        let mut cmd = Command::new("openssl");
        cmd.args(["s_client", "-connect", &listener, "-quiet", "-ign_eof"]);
        if let Some(alpn) = alpn {
            cmd.args(["-alpn", alpn]);
        }
        cmd.stdin(Stdio::null()).output().unwrap()
    };
    let out = s_client(None);
    assert!(
        stdout(&out).contains("TLS started directly without ALPN \"postgresql\""),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    // Another protocol's name: the handshake itself fails.
    let out = s_client(Some("http/1.1"));
    assert!(
        stderr(&out).contains("no application protocol"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    // The daemon serves on.
    assert_eq!(s.query("select 1"), "1");
}

#[test]
fn sessions_are_refused_while_the_audit_store_cannot_commit() {
    let mut s = Setup::new();
    assert_eq!(s.query("select 1"), "1");
    let audit = s.gateway.dir.path().join("state/audit");

    let frozen = Immutable::set(audit.join("segments"));
    let out = s.psql(&["-Atc", "create table leaked (x int)"]);
    drop(frozen);
    assert!(!out.status.success(), "a session ran unrecorded");
    assert!(
        stderr(&out).contains("the gateway cannot record this session"),
        "{}\n{}",
        stderr(&out),
        s.gateway.log()
    );
    assert_eq!(
        s.cluster
            .sql("select count(*) from pg_tables where tablename = 'leaked'"),
        "0",
        "the statement reached the upstream"
    );
    assert_eq!(s.query("select 2"), "2");

    // The first commit sled fails may be the previous session's last
    // records or this one's start: the daemon exits at that point.
    let frozen = Immutable::set(audit.join("chain"));
    let _ = s.psql(&["-Atc", "select 1"]);
    let status = s.gateway.wait_for_exit(Duration::from_secs(30));
    drop(frozen);
    assert!(!status.success(), "{}", s.gateway.log());
    assert!(
        s.gateway.log().contains("exiting for a restart"),
        "{}",
        s.gateway.log()
    );
    s.gateway.spawn();
    assert_eq!(s.query("select 3"), "3");
    let verify = s.gateway.cli(&["audit", "verify"]);
    assert!(
        verify.status.success(),
        "{}{}",
        stdout(&verify),
        stderr(&verify)
    );
    s.assert_no_panic();
}

/// Secrets are read per session, and SCRAM's salted password is kept per
/// password and salt: rotating either side needs no reload, and what the
/// gateway keeps never lets a wrong password in.
#[test]
fn upstream_password_rotation_needs_no_restart() {
    const ROTATED: &str = "rotated-Secret-7";
    // Every session logs in upstream: none takes an idle upstream.
    let s = Setup::with(Options {
        upstream_pool: 0,
        ..Options::default()
    });
    // The second login takes the salted password the first derived.
    assert_eq!(s.query("select 1"), "1");
    assert_eq!(s.query("select 1"), "1");
    let refused = |why: &str| {
        let out = s.psql(&["-Atc", "select 1"]);
        assert!(
            stderr(&out).contains("the database refused the gateway's login"),
            "{why}: {}",
            stderr(&out)
        );
    };
    // The role's password changes upstream (and with it the salt): the
    // gateway's secret is stale and refused, until the file is updated.
    s.cluster
        .sql(&format!("ALTER ROLE postgres PASSWORD '{ROTATED}'"));
    refused("stale secret");
    s.cluster.secret_file("main", ROTATED);
    assert_eq!(s.query("select 2"), "2");
    // A wrong secret for a salt the gateway has seen: still refused.
    s.cluster.secret_file("main", PG_PASSWORD);
    refused("wrong secret, known salt");
    // Back to the first password under a new salt.
    s.cluster
        .sql(&format!("ALTER ROLE postgres PASSWORD '{PG_PASSWORD}'"));
    assert_eq!(s.query("select 3"), "3");
    s.assert_no_panic();
}

/// A session that ends cleanly leaves its upstream for the next one, reset
/// as a new backend would be; one that ends inside a transaction, or whose
/// idle upstream went away, does not.
#[test]
fn idle_upstreams_are_reset_and_reused() {
    // One worker: each keeps its own idle upstreams.
    let s = Setup::with(Options {
        workers: 1,
        ..Options::default()
    });
    let backend = |sql: &str| -> String {
        let out = s.query(&format!("{sql}select pg_backend_pid()"));
        out.lines().last().unwrap_or_default().to_string()
    };
    // The upstream goes back to the pool after the session: wait for it.
    let settle = || std::thread::sleep(Duration::from_millis(300));
    let first = backend(
        "set work_mem = '1MB'; create temp table scratch (x int); \
         prepare p as select 1; listen channel; select pg_advisory_lock(7); ",
    );
    settle();
    let state = s.query(
        "select pg_backend_pid(), current_setting('work_mem'), \
         (select count(*) from pg_prepared_statements), \
         (select count(*) from pg_class where relname = 'scratch'), \
         (select count(*) from pg_listening_channels()), \
         (select count(*) from pg_locks where locktype = 'advisory')",
    );
    assert_eq!(state, format!("{first}|4MB|0|0|0|0"), "{}", s.gateway.log());
    settle();

    // Ended inside a transaction: that backend is closed, not kept.
    let out = s.psql(&["-Atc", "begin", "-c", "select pg_backend_pid()"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().last(),
        Some(&*first)
    );
    settle();
    let gone = format!("select count(*) from pg_stat_activity where pid = {first}");
    assert_eq!(s.cluster.sql(&gone), "0");
    let fresh = backend("");
    assert_ne!(fresh, first);

    // An idle upstream the server ended is noticed, not handed out.
    settle();
    s.cluster
        .sql(&format!("select pg_terminate_backend({fresh})"));
    settle();
    assert_ne!(backend(""), fresh);

    let logins: Vec<(bool, String)> = s
        .gateway
        .events()
        .into_iter()
        .filter(|e| e["event"] == "database_login")
        .map(|e| {
            (
                e["upstream_reused"].as_bool().unwrap(),
                e["upstream_pid"].to_string(),
            )
        })
        .collect();
    assert_eq!(
        logins,
        [
            (false, first.clone()),
            (true, first.clone()),
            (true, first),
            (false, fresh.clone()),
            (false, logins[4].1.clone()),
        ],
    );
    s.assert_no_panic();
}

#[test]
fn refusals_have_sqlstates_and_clear_messages() {
    // No grant for this principal: 42501.
    let s = Setup::with(Options {
        grant_users: "users = [\"unix:somebody-else\"]\nroles = [\"dba\"]",
        ..Options::default()
    });
    let out = s.psql(&["-Atc", "select 1"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("unix:root (no roles) has no grant on resource \"orders\""),
        "{}",
        stderr(&out)
    );
    drop(s);

    // The gateway's secret is wrong: the upstream refuses the gateway.
    let s = Setup::with(Options {
        password: "wrong-password",
        ..Options::default()
    });
    let out = s.psql(&["-Atc", "select 1"]);
    assert!(
        stderr(&out).contains("the database refused the gateway's login"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("wrong-password"));
    drop(s);

    // A group-readable secret file is refused.
    let s = Setup::with(Options {
        secret_mode: 0o640,
        ..Options::default()
    });
    let out = s.psql(&["-Atc", "select 1"]);
    assert!(
        stderr(&out).contains("cannot use its credentials"),
        "{}",
        stderr(&out)
    );
    s.gateway.wait_for_log("chmod 600");
    drop(s);

    // Upstream down: nothing listens on the resource's port.
    let down = format!("127.0.0.1:{}", free_port());
    let s = Setup::with(Options {
        address: Some(down),
        ..Options::default()
    });
    let out = s.psql(&["-Atc", "select 1"]);
    assert!(
        stderr(&out).contains("cannot open resource \"orders\""),
        "{}",
        stderr(&out)
    );
    s.assert_no_panic();
}

#[test]
fn malformed_frames_get_a_clean_error_and_the_daemon_keeps_serving() {
    let s = Setup::new();
    // Garbage instead of a startup packet, straight to the direct listener.
    let mut raw = TcpStream::connect(s.listener).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut reply = Vec::new();
    let _ = raw.read_to_end(&mut reply);
    assert_eq!(reply.first(), Some(&b'E'), "{reply:?}");
    let text = String::from_utf8_lossy(&reply);
    assert!(
        text.contains("08P01") && text.contains("invalid startup packet length"),
        "{text}"
    );

    // A logged-in session that then sends a frame with a bad length.
    let script = format!(
        r#"
import socket, struct
s = socket.create_connection(("127.0.0.1", {port}), timeout=10)
params = b"user\0postgres\0database\0postgres\0\0"
s.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
buf = b""
while not buf.endswith(b"Z\0\0\0\x05I"):
    chunk = s.recv(4096)
    if not chunk: break
    buf += chunk
s.sendall(b"Q\0\0\0\x02garbage")
rest = b""
try:
    while True:
        chunk = s.recv(4096)
        if not chunk: break
        rest += chunk
except OSError:
    pass
print("closed", len(buf) > 0, b"08P01" in rest and b"invalid message length" in rest)
"#,
        port = s.cluster.port
    );
    assert_eq!(s.cgroup.python(&script), "closed True True");
    assert_eq!(s.query("select 'alive'"), "alive");
    s.assert_no_panic();
}

/// Seeded mutations of a valid conversation, 400 connections of them from
/// 16 threads: bytes flipped, length fields set to anything from negative
/// to 2 GiB, messages cut short, repeated, dropped or given another type,
/// garbage inserted, the startup packet itself mutated. Whatever arrives,
/// the daemon answers or closes without panicking, holds no upstream
/// connection for a session that ended, keeps serving, and its audit chain
/// still verifies.
#[test]
fn mutated_client_conversations_never_panic_or_leak() {
    let s = Setup::new();
    let script = format!(
        r#"
import random, socket, struct, threading
def msg(t, body): return t + struct.pack("!i", 4 + len(body)) + body
params = b"user\0postgres\0database\0postgres\0\0"
startup = struct.pack("!ii", 8 + len(params), 196608) + params
conversation = [
    msg(b"P", b"s1\0select $1::int + 1, $2::text\0\0\x02\0\0\0\x17\0\0\0\x19"),
    msg(b"B", b"p1\0s1\0\0\x01\0\0\0\x02\0\0\0\x0242\0\0\0\x03abc\0\x01\0\0"),
    msg(b"D", b"Pp1\0"),
    msg(b"E", b"p1\0\0\0\0\0"),
    msg(b"S", b""),
    msg(b"Q", b"select repeat('x', 100) from generate_series(1, 50)\0"),
    msg(b"Q", b"create temp table t (a int)\0"),
    msg(b"Q", b"copy t from stdin\0"),
    msg(b"d", b"1\n2\n"),
    msg(b"c", b""),
    msg(b"Q", b"copy (select a from t) to stdout\0"),
    msg(b"C", b"Ss1\0"),
    msg(b"H", b""),
    msg(b"S", b""),
    msg(b"X", b""),
]

{mutate}

def drain(sock, until):
    got = b""
    try:
        while until not in got:
            chunk = sock.recv(65536)
            if not chunk:
                return got, True
            got += chunk
    except OSError:
        return got, False
    return got, False

answered = [0, 0]
def client(seed):
    rng = random.Random(seed)
    try:
        sock = socket.create_connection(("127.0.0.1", {port}), timeout=5)
    except OSError:
        return
    sock.settimeout(1)
    try:
        if rng.random() < 0.2:
            sock.sendall(mutate(rng, [startup[:4], startup[4:8], startup[8:]]))
        else:
            sock.sendall(startup)
            got, _ = drain(sock, b"Z\0\0\0\x05I")
            if not got.endswith(b"Z\0\0\0\x05I"):
                return
            sock.sendall(mutate(rng, conversation))
        got, closed = drain(sock, b"never")
        answered[0] += b"E" in got[:1] or b"\0C08P01" in got or b"Z\0\0\0\x05" in got
        answered[1] += closed
    except OSError:
        pass
    finally:
        sock.close()

{each_seed}
each_seed(client, 400, 16)
print(answered[0] > 100, answered[1] > 0)
"#,
        port = s.cluster.port,
        mutate = MUTATE_PY,
        each_seed = EACH_SEED_PY,
    );
    assert_eq!(s.cgroup.python(&script), "True True");

    assert_eq!(s.query("select 'alive'"), "alive");
    // Sessions that ended gave their upstreams back (reset for reuse:
    // their last statement is the pool's `DISCARD ALL`) or closed them.
    let held = "select count(*) from pg_stat_activity where backend_type = 'client backend' \
                and pid <> pg_backend_pid() and query <> 'DISCARD ALL'";
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let backends: usize = s.query(held).parse().unwrap();
        if backends == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{backends} upstreams still held after their clients left"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    s.assert_no_panic();
    let verify = s.gateway.cli(&["audit", "verify"]);
    assert!(verify.status.success(), "{}", stderr(&verify));
}

/// The other side: an upstream that answers with seeded mutations of a
/// valid exchange (its greeting, result rows, command tags, the answer to
/// `DISCARD ALL`), under 200 client sessions from 8 threads. The daemon
/// never panics; once the upstream behaves again, a psql session gets its
/// rows through the same daemon, and the audit chain verifies.
#[test]
fn a_mutating_upstream_never_panics_the_gateway() {
    let port = free_port();
    let calm = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    std::fs::remove_file(&calm).unwrap();
    let server = format!(
        r#"
import os, random, socket, struct, threading
def msg(t, body): return t + struct.pack("!i", 4 + len(body)) + body
ready = msg(b"Z", b"I")
# (split: a NUL before a digit would read as an octal escape)
hello = [msg(b"R", struct.pack("!i", 0)), msg(b"S", b"server_version\0" + b"15.0\0"),
         msg(b"S", b"client_encoding\0UTF8\0"), msg(b"K", struct.pack("!ii", 1234, 5678)), ready]
column = b"a\0" + struct.pack("!ihihih", 0, 0, 25, -1, -1, 0)
rows = [msg(b"T", struct.pack("!h", 1) + column)] + \
       [msg(b"D", struct.pack("!hi", 1, 5) + b"hello") for _ in range(3)] + \
       [msg(b"C", b"SELECT 3\0"), ready]
discarded = [msg(b"C", b"DISCARD ALL\0"), ready]

{mutate}

def read_exact(conn, n):
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk: raise OSError("closed")
        data += chunk
    return data

def serve(conn, seed):
    rng = random.Random(seed)
    # Mostly the answers: a mutated greeting ends the session at login.
    chaos = lambda odds: not os.path.exists("{calm}") and rng.random() < odds
    try:
        (length,) = struct.unpack("!i", read_exact(conn, 4))
        read_exact(conn, length - 4)
        conn.sendall(mutate(rng, hello) if chaos(0.2) else b"".join(hello))
        while True:
            kind = read_exact(conn, 1)
            (length,) = struct.unpack("!i", read_exact(conn, 4))
            body = read_exact(conn, length - 4)
            if kind == b"X":
                break
            if kind != b"Q":
                continue
            answer = discarded if b"DISCARD" in body else rows
            conn.sendall(mutate(rng, answer) if chaos(0.7) else b"".join(answer))
    except (OSError, struct.error):
        pass
    finally:
        conn.close()

listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", {port}))
listener.listen(64)
seed = 0
while True:
    conn, _ = listener.accept()
    seed += 1
    threading.Thread(target=serve, args=(conn, seed), daemon=True).start()
"#,
        mutate = MUTATE_PY,
        calm = calm.display(),
    );
    let upstream = KillOnDrop(
        Command::new("python3")
            .args(["-c", &server])
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the mutating upstream did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let s = Setup::with(Options {
        address: Some(format!("127.0.0.1:{port}")),
        ..Options::default()
    });
    let clients = format!(
        r#"
import socket, struct, threading
def msg(t, body): return t + struct.pack("!i", 4 + len(body)) + body
params = b"user\0postgres\0database\0postgres\0\0"
startup = struct.pack("!ii", 8 + len(params), 196608) + params
def client(seed):
    try:
        sock = socket.create_connection(("127.0.0.1", {port}), timeout=1)
    except OSError:
        return
    try:
        sock.sendall(startup + msg(b"Q", b"select a from t\0") + msg(b"Q", b"select 2\0"))
        while sock.recv(65536):
            pass
    except OSError:
        pass
    finally:
        sock.close()
{each_seed}
each_seed(client, 200, 8)
print("done")
"#,
        each_seed = EACH_SEED_PY,
    );
    assert_eq!(s.cgroup.python(&clients), "done");
    s.assert_no_panic();

    std::fs::write(&calm, "").unwrap();
    assert_eq!(s.query("select a from t"), "hello\nhello\nhello");
    s.assert_no_panic();
    let verify = s.gateway.cli(&["audit", "verify"]);
    assert!(verify.status.success(), "{}", stderr(&verify));
    drop(upstream);
}

/// Kills a helper process when the test ends, passed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `client(seed)` for seeds 0 to `seeds - 1`, from `threads` threads,
/// for the tests above.
const EACH_SEED_PY: &str = r#"
def each_seed(client, seeds, threads):
    def run(first):
        for seed in range(first, seeds, threads):
            client(seed)
    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for worker in workers: worker.start()
    for worker in workers: worker.join()
"#;

/// Seeded mutations of a list of protocol messages, for the tests above:
/// bytes flipped, a length field set to anything from negative to 2 GiB,
/// cut short, another message type, garbage inserted, a message repeated
/// or dropped.
const MUTATE_PY: &str = r#"
def mutate(rng, messages):
    messages = list(messages)
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(messages))
        m = bytearray(messages[i])
        kind = rng.randrange(7)
        if kind == 0 and m:
            for _ in range(rng.randint(1, 4)):
                m[rng.randrange(len(m))] ^= 1 << rng.randrange(8)
        elif kind == 1 and len(m) >= 5:
            m[1:5] = struct.pack("!i", rng.choice([-1, 0, 3, 4, 5, 2**31 - 1, 2**30, rng.randrange(2**31)]))
        elif kind == 2 and m:
            m = m[: rng.randrange(len(m))]
        elif kind == 3 and m:
            m[0] = rng.randrange(256)
        elif kind == 4:
            at = rng.randrange(len(m) + 1)
            m[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        elif kind == 5:
            messages.insert(i, bytes(m))
        else:
            m = b""
        messages[i] = bytes(m)
    return b"".join(messages)
"#;

#[test]
fn newer_protocol_versions_and_unknown_options_are_negotiated_down() {
    let s = Setup::new();
    // Protocol 3.2 with a protocol extension the gateway does not know:
    // NegotiateProtocolVersion (newest minor 0, the option named), then a
    // normal 3.0 session.
    let script = format!(
        r#"
import socket, struct
s = socket.create_connection(("127.0.0.1", {port}), timeout=10)
params = b"user\0postgres\0database\0postgres\0_pq_.made_up\0on\0\0"
s.sendall(struct.pack("!ii", 8 + len(params), (3 << 16) | 2) + params)
buf = b""
while not buf.endswith(b"Z\0\0\0\x05I"):
    chunk = s.recv(4096)
    if not chunk: break
    buf += chunk
assert buf[0:1] == b"v", buf[:20]
(length,) = struct.unpack("!i", buf[1:5])
minor, count = struct.unpack("!ii", buf[5:13])
option = buf[13:1 + length].rstrip(b"\0").decode()
q = b"select 'negotiated'\0"
s.sendall(b"Q" + struct.pack("!i", 4 + len(q)) + q)
reply = b""
while not reply.endswith(b"Z\0\0\0\x05I"):
    chunk = s.recv(4096)
    if not chunk: break
    reply += chunk
print(minor, count, option, b"negotiated" in reply)
"#,
        port = s.cluster.port
    );
    assert_eq!(s.cgroup.python(&script), "0 1 _pq_.made_up True");
    s.assert_no_panic();
}

/// A local client's bytes go through the kernel fast path (socket map,
/// past the TCP stack) both ways, and arrive complete and in order: a large
/// COPY and pipelined pgbench come out exactly as the server sent them.
#[test]
fn local_clients_take_the_kernel_fast_path_with_identical_bytes() {
    let s = Setup::new();
    let before = s.fast_path_messages();

    let rows = 200_000u64;
    let out = s.psql(&[
        "-Atc",
        &format!("copy (select g, g * 7 from generate_series(1, {rows}) g) to stdout"),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let mut expected = 1u64;
    for line in text.lines() {
        let (g, times7) = line.split_once('\t').expect("two columns");
        let g: u64 = g.parse().unwrap();
        assert_eq!(g, expected, "rows out of order or missing");
        assert_eq!(times7.parse::<u64>().unwrap(), g * 7);
        expected += 1;
    }
    assert_eq!(expected - 1, rows);

    let init = s.pgbench(&["-i", "-s", "1", "-q"]);
    assert!(init.status.success(), "{}", stderr(&init));
    let bench = s.pgbench(&["-S", "-M", "extended", "-c", "4", "-t", "200", "-n"]);
    assert!(bench.status.success(), "{}", stderr(&bench));
    assert!(stdout(&bench).contains("number of failed transactions: 0"));

    assert!(s.counter("fast_path_sockets") >= 1);
    let messages = s.fast_path_messages() - before;
    assert!(
        messages > 800,
        "only {messages} messages took the fast path"
    );
    s.assert_no_panic();
}

/// `portcullis kernel detach` while a session is on the fast path: the
/// session keeps every byte (the daemon still holds the socket map and its
/// program), and only new connections go past the gateway.
#[test]
fn a_fast_path_session_survives_kernel_detach() {
    let s = Setup::new();
    let rows = 200_000u64;
    let copy = format!("copy (select g from generate_series(1, {rows}) g) to stdout");
    let session = s
        .psql_cmd(
            "postgres",
            &[
                "-Atc",
                "select pg_sleep(2)",
                "-c",
                &copy,
                "-c",
                "select 'after'",
            ],
        )
        .spawn()
        .unwrap();
    // Detach while the session sleeps: it is open and on the fast path
    // (its start-up went over the socket map).
    std::thread::sleep(Duration::from_millis(700));
    assert!(s.fast_path_messages() > 0);
    let detached = s.gateway.detach();
    assert!(detached.status.success(), "{}", stderr(&detached));

    let out = wait_with_timeout(session, Duration::from_secs(60));
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some(""), "pg_sleep's empty row");
    for expected in 1..=rows {
        assert_eq!(lines.next(), Some(expected.to_string().as_str()));
    }
    assert_eq!(lines.next(), Some("after"));
    assert_eq!(lines.next(), None);

    // New connections are no longer redirected: they reach the server
    // itself, which asks the client for the password it does not have.
    let direct = s.psql(&["-Atc", "select 1"]);
    assert!(!direct.status.success());
    assert!(stderr(&direct).contains("password"), "{}", stderr(&direct));
    s.assert_no_panic();
}

/// SIGHUP puts edited resources and grants in force for new sessions, and
/// a reload that does not load (a certificate that is not there) changes
/// nothing.
#[test]
fn reload_applies_resource_changes_and_keeps_them_when_invalid() {
    let s = Setup::with(Options {
        password: "wrong-password",
        ..Options::default()
    });
    let out = s.psql(&["-Atc", "select 1"]);
    assert!(
        stderr(&out).contains("the database refused the gateway's login"),
        "{}",
        stderr(&out)
    );

    // The operator points the grants at a secret file with the right
    // password and reloads.
    let config = std::fs::read_to_string(&s.gateway.config_path).unwrap();
    let old_secret = s.cluster.dir().join("secret-main");
    let new_secret = s.cluster.secret_file("fixed", PG_PASSWORD);
    let fixed = config.replace(
        &old_secret.display().to_string(),
        &new_secret.display().to_string(),
    );
    assert_ne!(fixed, config, "the config names the secret file");
    let write = |text: &str| {
        let tmp = s.gateway.config_path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &s.gateway.config_path).unwrap();
    };
    let reloads = || s.gateway.log().matches("protected set reloaded").count();
    let wait_for = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "no {what}: {}", s.gateway.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let before = reloads();
    write(&fixed);
    s.gateway.signal("HUP");
    wait_for("reload", &|| reloads() > before);
    assert_eq!(s.query("select 41 + 1"), "42");

    // A reload whose listener certificate is missing is rejected whole:
    // the working grants stay.
    let broken = fixed.replace("cert.pem", "missing-cert.pem");
    write(&broken);
    let rejected = || s.gateway.log().matches("config reload rejected").count();
    let before = rejected();
    s.gateway.signal("HUP");
    wait_for("rejection", &|| rejected() > before);
    assert!(s.gateway.log().contains("missing-cert.pem"));
    assert_eq!(s.query("select 2"), "2");
    s.assert_no_panic();
}

#[test]
fn a_stalled_log_holds_up_no_session_and_loses_no_line() {
    let s = Setup::new();
    assert_eq!(s.query("select 1"), "1");
    let ends_before = s.gateway.log().matches("session end").count();
    // A journal that stopped reading: the daemon's stderr pipe (one page)
    // fills within a few sessions.
    s.gateway.stall_log(true);
    let script = s.cluster.dir().join("select-one.sql");
    std::fs::write(&script, "select 1;\n").unwrap();
    let sessions = 200;
    let out = s.pgbench(&[
        "-n",
        "-C",
        "-c",
        "1",
        "-t",
        &sessions.to_string(),
        "-f",
        script.to_str().unwrap(),
    ]);
    assert!(
        out.status.success() && stdout(&out).contains("number of failed transactions: 0"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    // Every line the daemon queued meanwhile reaches the log once it reads
    // again.
    s.gateway.stall_log(false);
    s.gateway.wait_for_log_count(
        "session end",
        ends_before + sessions,
        Duration::from_secs(10),
    );
    s.assert_no_panic();
}
