//! Masking throughput through the gateway: a 1,000,000-row result with
//! email, phone and card columns, read by psql through the PostgreSQL
//! gateway with the masks on and with them off, in one run (as root).
//!
//! Setup: a throwaway PostgreSQL cluster, a child cgroup whose connects to
//! the cluster are redirected to a `portcullis run` daemon with a policy
//! file. Rounds alternate between a policy without masks and one with an
//! email detector (keyed pseudonym), a phone detector and a card detector
//! (Luhn, partial), switched by rewriting the policy file (the daemon
//! reloads it). A direct psql (outside the cgroup, not redirected) is
//! measured too, for context. Medians are reported with the ratios; the
//! target is masked >= 0.7 of unmasked.
//!
//! Run: `cargo bench --bench masking` (or `cargo xtask bench`).
//!
//! `--micro [ROWS] [--distinct N] [--subjects]` runs only the row masker
//! in this process on the same rows (N distinct ones; no PostgreSQL, no
//! gateway, no root), with the subject index on or off: stable under
//! callgrind (`valgrind --tool=callgrind <bench binary> --micro 100000`)
//! and perf, where the full benchmark's wall-clock numbers are noisy.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use portcullis_testkit::{
    cgroup::Cgroup,
    free_port,
    postgres::{Cluster, Setup},
};

const ROWS: usize = 1_000_000;
const ROUNDS: usize = 5;
const PASSWORD: &str = "bench-Secret-1";
const PORTCULLIS: &str = env!("CARGO_BIN_EXE_portcullis");
const QUERY: &str = "SELECT id, email, phone, card FROM people";

const UNMASKED: &str = "[settings]\ndefault = \"allow\"\n";
const MASKED: &str = r#"[settings]
default = "allow"

[[mask]]
name = "emails"
detector = "email"
style = "pseudonym"

[[mask]]
name = "phones"
detector = "phone"
style = "partial"
keep_last = 2

[[mask]]
name = "cards"
detector = "card"
style = "partial"
keep_last = 4
"#;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("masking: bench");
        return;
    }
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--micro") {
        let rows = args
            .get(at + 1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(ROWS);
        let distinct = args
            .iter()
            .position(|a| a == "--distinct")
            .and_then(|at| args.get(at + 1)?.parse().ok())
            .unwrap_or(100_000);
        micro(rows, distinct, args.iter().any(|a| a == "--subjects"));
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = people_cluster();
    let cgroup = Cgroup::create(
        &portcullis::kernel::root_cgroup().expect("cgroup v2 mounted (run as root)"),
        &format!("portcullis-bench-masking-{}", std::process::id()),
    );
    let gateway = Daemon::start(dir.path(), &cgroup.path, cluster.port);

    let mut direct = Vec::new();
    let mut unmasked = Vec::new();
    let mut masked = Vec::new();
    // The gateway's own CPU time per query: steadier than wall-clock on a
    // shared machine.
    let (mut cpu_unmasked, mut cpu_masked) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        direct.push(timed(|| psql(None, cluster.port, false)));
        gateway.set_policy(UNMASKED);
        let cpu = gateway.cpu_secs();
        unmasked.push(timed(|| psql(Some(&cgroup), cluster.port, false)));
        cpu_unmasked.push(gateway.cpu_secs() - cpu);
        gateway.set_policy(MASKED);
        let cpu = gateway.cpu_secs();
        masked.push(timed(|| psql(Some(&cgroup), cluster.port, true)));
        cpu_masked.push(gateway.cpu_secs() - cpu);
        eprintln!(
            "round {}: direct {:.2}s, unmasked {:.2}s (gateway cpu {:.2}s), masked {:.2}s (gateway cpu {:.2}s)",
            round + 1,
            direct[round],
            unmasked[round],
            cpu_unmasked[round],
            masked[round],
            cpu_masked[round]
        );
    }
    let (cu, cm) = (median(&mut cpu_unmasked), median(&mut cpu_masked));
    let rate = |v: &mut Vec<f64>| ROWS as f64 / median(v);
    let (d, u, m) = (rate(&mut direct), rate(&mut unmasked), rate(&mut masked));
    println!("rows per second (median of {ROUNDS}, {ROWS} rows of 4 columns):");
    println!("  direct (no gateway)      {d:>12.0}");
    println!(
        "  gateway, no masks        {u:>12.0}   {:.2} of direct",
        u / d
    );
    println!(
        "  gateway, 3 detectors     {m:>12.0}   {:.2} of direct, {:.2} of unmasked (target >= 0.70)",
        m / d,
        m / u
    );
    println!(
        "gateway cpu per query (median): no masks {cu:.2}s, 3 detectors {cm:.2}s ({:.2}x; masking adds {:.0} ns/row)",
        cm / cu,
        (cm - cu) * 1e9 / ROWS as f64
    );
}

/// The row masker alone, on the benchmark's rows as DataRow bodies;
/// with `subjects`, also reporting masked values to the subject index.
fn micro(rows: usize, distinct: usize, subjects: bool) {
    use portcullis::policy::{
        classify, mask::PseudonymKey, stream::SubjectKey, Field, Fired, Policy, RowMasker,
    };
    use std::sync::Arc;

    let policy = Arc::new(Policy::parse(MASKED).expect("policy"));
    let masks: Vec<usize> = (0..policy.masks.len()).collect();
    let statement = classify(QUERY, &[]).expect("query").remove(0);
    let fields: Vec<Field<'_>> = ["id", "email", "phone", "card"]
        .into_iter()
        .map(|name| Field {
            name,
            type_oid: 25,
            format: 0,
        })
        .collect();
    let cards = [
        "4111 1111 1111 1111",
        "4012888888881881",
        "5555-5555-5555-4444",
    ];
    let bodies: Vec<Vec<u8>> = (1..=rows.min(distinct.max(1)))
        .map(|i| {
            let values = [
                i.to_string(),
                format!("user{i}@example.com"),
                format!("+1 555-{:03}-{:04}", i % 1000, i % 10000),
                cards[i % 3].to_string(),
            ];
            let mut body = 4i16.to_be_bytes().to_vec();
            for v in &values {
                body.extend_from_slice(&(v.len() as i32).to_be_bytes());
                body.extend_from_slice(v.as_bytes());
            }
            body
        })
        .collect();
    let mut masker = RowMasker::for_rows(
        Arc::clone(&policy),
        PseudonymKey::from_bytes(&[7; 32]),
        &masks,
        Some(&statement),
        &fields,
    )
    .expect("a masking plan");
    if subjects {
        masker = masker.index_subjects(SubjectKey::new(&[3; 32]));
    }
    let mut fired = Fired::default();
    let mut out = Vec::with_capacity(96 * 1024);
    let started = Instant::now();
    for i in 0..rows {
        masker
            .mask_data_row(&bodies[i % bodies.len()], &mut out, &mut fired)
            .expect("well-formed row");
        if out.len() > 64 * 1024 {
            out.clear();
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "row masker alone: {rows} rows in {secs:.3}s, {:.0} rows/s; {:?}; {} subject hashes",
        rows as f64 / secs,
        fired.counts(),
        fired.take_subjects().len()
    );
}

fn timed(f: impl FnOnce()) -> f64 {
    let started = Instant::now();
    f();
    started.elapsed().as_secs_f64()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A throwaway cluster holding the `people` table: ROWS rows with an
/// email, a phone number and a card number each.
fn people_cluster() -> Cluster {
    let cluster = Cluster::start(&Setup {
        password: PASSWORD,
        conf: "shared_buffers = 128MB\n",
        ..Setup::default()
    });
    cluster.sql(&format!(
        "CREATE TABLE people AS SELECT i AS id,
             'user' || i || '@example.com' AS email,
             '+1 555-' || lpad((i % 1000)::text, 3, '0') || '-' || lpad((i % 10000)::text, 4, '0') AS phone,
             (ARRAY['4111 1111 1111 1111', '4012888888881881', '5555-5555-5555-4444'])[i % 3 + 1] AS card
         FROM generate_series(1, {ROWS}) AS i"
    ));
    cluster.sql("VACUUM ANALYZE people");
    cluster
}

/// The bench's query by psql to `port`: from inside `cgroup`, redirected
/// through the gateway, or without one straight to the cluster (this
/// process is outside the cgroup).
fn psql(cgroup: Option<&Cgroup>, port: u16, masked: bool) {
    let port = port.to_string();
    let args = [
        "-X",
        "-At",
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-U",
        "postgres",
        "-d",
        "postgres",
        "-c",
        QUERY,
    ];
    let mut command = match cgroup {
        Some(cgroup) => cgroup.command("psql", &args),
        None => {
            let mut direct = Command::new("psql");
            direct.args(args).env("PGPASSWORD", PASSWORD);
            direct
        }
    };
    check(&run(&mut command), masked);
}

/// Checks that the result is complete and masked (or not).
fn check(out: &str, masked: bool) {
    let rows = out.lines().count();
    assert_eq!(rows, ROWS, "incomplete result");
    let first = out.lines().next().unwrap_or_default();
    assert_eq!(
        first.contains("@example.com"),
        !masked,
        "unexpected masking state: {first}"
    );
}

struct Daemon {
    child: Child,
    policy: PathBuf,
    pin_dir: PathBuf,
    log: PathBuf,
}

impl Daemon {
    fn start(base: &Path, cgroup: &Path, pg_port: u16) -> Self {
        let secret = base.join("secret");
        std::fs::write(&secret, PASSWORD).expect("secret");
        run(Command::new("chmod").arg("600").arg(&secret));
        let policy = base.join("policy.toml");
        std::fs::write(&policy, UNMASKED).expect("policy");
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/portcullis-bench-masking-{}",
            std::process::id()
        ));
        let config = base.join("portcullis.toml");
        std::fs::write(
            &config,
            format!(
                r#"state_dir = "{state}"
[kernel]
cgroup = "{cgroup}"
pin_dir = "{pins}"

[policy]
file = "{policy}"

[[listener]]
name = "pg"
address = "127.0.0.1:{listen}"
protocol = "postgres"

[[protect]]
destination = "127.0.0.1"
port = {pg_port}
to = "pg"

[[resource]]
name = "bench"
protocol = "postgres"
address = "127.0.0.1:{pg_port}"
tls = "disable"

[[resource.grant]]
users = ["unix:root"]
upstream_user = "postgres"
password_file = "{secret}"
"#,
                state = base.join("state").display(),
                cgroup = cgroup.display(),
                pins = pin_dir.display(),
                policy = policy.display(),
                listen = free_port(),
                secret = secret.display(),
            ),
        )
        .expect("config");
        let log = base.join("daemon.log");
        let child = Command::new(PORTCULLIS)
            .arg("--config")
            .arg(&config)
            .arg("run")
            .env("PORTCULLIS_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("portcullis run");
        let daemon = Self {
            child,
            policy,
            pin_dir,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !daemon.log_text().contains("portcullis ready") {
            assert!(
                Instant::now() < deadline,
                "daemon not ready: {}",
                daemon.log_text()
            );
            thread::sleep(Duration::from_millis(50));
        }
        daemon
    }

    /// CPU time the daemon's threads have used so far (schedstat).
    fn cpu_secs(&self) -> f64 {
        let tasks = format!("/proc/{}/task", self.child.id());
        let ns: u64 = std::fs::read_dir(tasks)
            .map(|dir| {
                dir.filter_map(|t| {
                    let stat = std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok()?;
                    stat.split_whitespace().next()?.parse::<u64>().ok()
                })
                .sum()
            })
            .unwrap_or(0);
        ns as f64 / 1e9
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Replaces the policy and waits until the daemon has loaded it.
    fn set_policy(&self, text: &str) {
        let before = self.log_text().matches("policy reloaded").count();
        let tmp = self.policy.with_extension("tmp");
        std::fs::write(&tmp, text).expect("policy");
        std::fs::rename(&tmp, &self.policy).expect("policy");
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.log_text().matches("policy reloaded").count() == before {
            assert!(Instant::now() < deadline, "policy not reloaded");
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new(PORTCULLIS)
            .args(["kernel", "detach", "--pin-dir"])
            .arg(&self.pin_dir)
            .output();
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}
