//! PostgreSQL through the gateway against a direct connection and against
//! PgBouncer (session mode), measured interleaved in one run (as root).
//!
//! * pgbench select-only (`-S`), simple and extended protocol, 8 clients,
//!   over plain TCP and over TLS (every leg encrypted: client to proxy,
//!   proxy to server, client to server for direct): TPS, mean latency,
//!   ratio to direct, each proxy's CPU and the whole machine's CPU per
//!   transaction. The gateway records every statement into its audit
//!   store, as in production.
//! * A large result (`COPY (select ...) TO STDOUT` of ~230 MB through
//!   psql): throughput and ratio to direct.
//! * New connections (`pgbench -S -C`, simple protocol, over plain TCP and
//!   over TLS), as scripts and agents that connect once per query make
//!   them: connections per second, ratio to direct, CPU per connection.
//!
//! The gateway's local clients run in a throwaway child cgroup so the
//! kernel redirects them; direct and PgBouncer clients run outside it. TLS
//! rounds also measure remote clients: pgbench connecting to the gateway's
//! listener itself (TLS, then a service account's token from a real OIDC
//! provider as the password), without the kernel's help. Rounds rotate
//! the order of the targets so drift affects all alike; the
//! median of each is reported, and each gateway target's TPS over
//! PgBouncer's round by round (the machine's speed drifts between rounds,
//! so only ratios within one round compare like with like).
//!
//! With `PORTCULLIS_BENCH_BASELINE=/path/to/portcullis` (another build, say
//! an older commit's), that binary runs as one more gateway target,
//! `baseline`, with a child cgroup of its own, and each round also reports
//! the gateway's TPS over the baseline's: two builds compared round by
//! round in one rig, where comparing runs would compare hosts.
//!
//! With `PORTCULLIS_BENCH_PLAIN_ONLY=1`, only the plain-TCP `-S` rounds run
//! (no TLS, large result or new connections): a quick A/B of a change on
//! the statement path. `PORTCULLIS_BENCH_ROUNDS` sets the number of rounds
//! (5 by default).
//!
//! Run: `cargo bench --bench postgres` (release build). Needs PostgreSQL 15,
//! pgbench, psql and pgbouncer (Debian packages postgresql, pgbouncer), and
//! node with the OIDC provider's modules (`cargo xtask setup` installs
//! them all).

use std::{
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use portcullis_testkit::{
    cgroup::Cgroup,
    free_port,
    oidc::OidcProvider,
    postgres::{Cluster, Setup},
    run,
};

const PORTCULLIS: &str = env!("CARGO_BIN_EXE_portcullis");
const PASSWORD: &str = "bench-Secret-1";
/// Rounds unless `PORTCULLIS_BENCH_ROUNDS` says otherwise.
const DEFAULT_ROUNDS: usize = 5;
const SECONDS: &str = "8";
const CLIENTS: &str = "8";
/// Clients of the new-connection rounds: each connection costs a backend
/// start, so fewer clients already keep both cores busy.
const CONNECTING_CLIENTS: &str = "4";
/// The cluster listens on both; the gateway protects both, and relays
/// connections to the second over TLS (a resource with `tls = "require"`).
const PLAIN_HOST: &str = "127.0.0.1";
const TLS_HOST: &str = "127.0.0.2";
/// Long enough for the whole run: pgbench logs in again every round.
const TOKEN_TTL_SECONDS: u64 = 7200;
const COPY_SQL: &str =
    "copy (select g, repeat('x', 100) from generate_series(1, 2000000) g) to stdout";

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("postgres: bench");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    run(
        "chown",
        &["postgres:postgres", work.path().to_str().unwrap()],
    );
    let tls = Tls::generate(work.path());
    let pg = Cluster::start(&Setup {
        password: PASSWORD,
        listen: &format!("{PLAIN_HOST},{TLS_HOST}"),
        tls: Some((&tls.cert, &tls.key)),
        conf: "shared_buffers = 128MB\nmax_connections = 100\n",
        ..Setup::default()
    });
    let provider = OidcProvider::start(TOKEN_TTL_SECONDS);
    let token = provider.service_token("urn:portcullis");
    let gateway = Portcullis::start(PORTCULLIS, "gateway", work.path(), pg.port, &tls, &provider);
    let baseline = std::env::var("PORTCULLIS_BENCH_BASELINE")
        .ok()
        .map(|binary| {
            Portcullis::start(&binary, "baseline", work.path(), pg.port, &tls, &provider)
        });
    let bouncer = Bouncer::start(work.path(), "bouncer", pg.port, None);
    let bouncer_tls = Bouncer::start(work.path(), "bouncer-tls", pg.port, Some(&tls));

    let init = command(
        None,
        "pgbench",
        &[
            "-i",
            "-s",
            "10",
            "-q",
            "-h",
            PLAIN_HOST,
            "-p",
            &pg.port.to_string(),
            "-U",
            "postgres",
            "postgres",
        ],
    )
    .env("PGPASSWORD", PASSWORD)
    .env("PGSSLMODE", "disable")
    .output()
    .unwrap();
    assert!(
        init.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&init.stderr)
    );

    // Over TLS, every leg is encrypted: client to proxy, proxy to server,
    // and client to server for direct. The gateway knows its clients by
    // the token they give as password (the bench has no `portcullis
    // login`); a remote client must be on TLS before it may give one.
    let targets = |tls: bool| -> Vec<Target> {
        let (gateway_host, bouncer) = if tls {
            (TLS_HOST, &bouncer_tls)
        } else {
            (PLAIN_HOST, &bouncer)
        };
        let mut targets = vec![
            Target {
                name: "direct",
                host: PLAIN_HOST,
                port: pg.port,
                database: "postgres",
                password: PASSWORD,
                cgroup: None,
                proxy: None,
            },
            gateway.local_target("gateway", gateway_host, pg.port, &token),
            Target {
                name: "pgbouncer",
                host: PLAIN_HOST,
                port: bouncer.port,
                database: "postgres",
                password: PASSWORD,
                cgroup: None,
                proxy: Some(bouncer.pid()),
            },
        ];
        if let Some(baseline) = &baseline {
            targets.push(baseline.local_target("baseline", gateway_host, pg.port, &token));
        }
        if tls {
            targets.push(Target {
                name: "remote",
                host: PLAIN_HOST,
                port: gateway.port,
                database: "bench-tls",
                password: &token,
                cgroup: None,
                proxy: Some(gateway.child.id()),
            });
        }
        targets
    };
    let plain_only = std::env::var_os("PORTCULLIS_BENCH_PLAIN_ONLY").is_some();
    let rounds: usize = std::env::var("PORTCULLIS_BENCH_ROUNDS")
        .map(|n| {
            n.parse()
                .expect("PORTCULLIS_BENCH_ROUNDS: a number of rounds")
        })
        .unwrap_or(DEFAULT_ROUNDS);
    let mut modes = vec![Mode::new("simple", false), Mode::new("extended", false)];
    if !plain_only {
        modes.extend([Mode::new("simple", true), Mode::new("extended", true)]);
    }
    // results[mode][target] = (tps, latency ms, proxy CPU µs per
    // transaction, whole machine's CPU µs per transaction) per round
    let mut results: Rounds = modes
        .iter()
        .map(|mode| vec![Vec::new(); targets(mode.tls).len()])
        .collect();
    let mut copies = vec![Vec::new(); targets(false).len()];
    let connecting = [Mode::new("simple", false), Mode::new("simple", true)];
    // connections[mode][target], as results
    let mut connections: Rounds = connecting
        .iter()
        .map(|mode| vec![Vec::new(); targets(mode.tls).len()])
        .collect();
    for round in 0..rounds {
        measure_round(&modes, &targets, round, &mut results, |mode| {
            vec!["-S", "-M", mode.protocol, "-c", CLIENTS, "-j", "2"]
        });
        if plain_only {
            continue;
        }
        let plain = targets(false);
        for k in 0..plain.len() {
            let t = (k + round) % plain.len();
            copies[t].push(copy_rate(&plain[t]));
        }
        measure_round(&connecting, &targets, round, &mut connections, |_| {
            vec!["-S", "-C", "-c", CONNECTING_CLIENTS, "-j", "2"]
        });
    }

    println!(
        "\npgbench -S, {CLIENTS} clients, {SECONDS} s x {rounds} rounds (median); gateway records every statement"
    );
    print_medians(&modes, &targets, &results, "txn", "tps", 1);
    println!(
        "\nTPS over PgBouncer's, round by round (gateway: local clients the kernel redirects; \
         remote: clients of the gateway's listener)"
    );
    print_ratios(&modes, &targets, &results, "pgbouncer");
    if baseline.is_some() {
        println!("\nTPS over the baseline build's, round by round");
        print_ratios(&modes, &targets, &results, "baseline");
    }
    if !plain_only {
        println!(
            "\nnew connections: pgbench -S -C (a connection per transaction), \
         {CONNECTING_CLIENTS} clients (median); PgBouncer reuses its server \
         connections, the gateway opens and records one per client"
        );
        print_medians(
            &connecting,
            &targets,
            &connections,
            "conn",
            "connections/s",
            0,
        );
        if baseline.is_some() {
            println!("\nconnections/s over the baseline build's, round by round");
            print_ratios(&connecting, &targets, &connections, "baseline");
        }
        println!("\nlarge result: {COPY_SQL} (median MB/s)");
        let direct = median(copies[0].clone());
        for (t, target) in targets(false).iter().enumerate() {
            let rate = median(copies[t].clone());
            println!(
                "{:<10} {rate:>10.1} MB/s {:>10.2} vs direct",
                target.name,
                rate / direct
            );
        }
    }
    drop(bouncer_tls);
    drop(bouncer);
    drop(baseline);
    drop(gateway);
    drop(provider);
}

/// Each proxy target's rate over target `over`'s, round by round (the
/// machine's speed drifts between rounds, so only ratios within one round
/// compare like with like), with their median.
fn print_ratios<'a>(
    modes: &[Mode],
    targets: &dyn Fn(bool) -> Vec<Target<'a>>,
    results: &Rounds,
    over: &str,
) {
    for (m, mode) in modes.iter().enumerate() {
        let targets = targets(mode.tls);
        let Some(reference) = targets.iter().position(|t| t.name == over) else {
            continue;
        };
        for (t, target) in targets.iter().enumerate() {
            if target.proxy.is_none() || t == reference {
                continue;
            }
            let ratios: Vec<f64> = results[m][t]
                .iter()
                .zip(&results[m][reference])
                .map(|(this, reference)| this.0 / reference.0)
                .collect();
            let (rounds, ahead) = (ratios.len(), ratios.iter().filter(|r| **r > 1.0).count());
            let shown: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
            println!(
                "{:<14} {:<9} {}   median {:.2}, ahead in {ahead} of {rounds}",
                mode.label(),
                target.name,
                shown.join(" "),
                median(ratios)
            );
        }
    }
}

/// What [`measure`] returned per mode, target and round.
type Rounds = Vec<Vec<Vec<(f64, f64, f64, f64)>>>;

/// One round of pgbench with `args` for every mode and target, starting
/// with a different target each round so that drift affects all alike.
fn measure_round<'a>(
    modes: &[Mode],
    targets: &dyn Fn(bool) -> Vec<Target<'a>>,
    round: usize,
    results: &mut Rounds,
    args: impl Fn(&Mode) -> Vec<&'static str>,
) {
    for (m, mode) in modes.iter().enumerate() {
        let targets = targets(mode.tls);
        for k in 0..targets.len() {
            let t = (k + round) % targets.len();
            results[m][t].push(measure(&targets[t], mode.sslmode(), &args(mode)));
        }
    }
}

/// A table of medians, a row per mode and target: the rate, the latency,
/// the rate over direct's (the first target), the proxy's CPU and the
/// machine's CPU per `unit` (a transaction or a connection), in µs with
/// `cpu_decimals`.
fn print_medians<'a>(
    modes: &[Mode],
    targets: &dyn Fn(bool) -> Vec<Target<'a>>,
    results: &Rounds,
    unit: &str,
    rate_name: &str,
    cpu_decimals: usize,
) {
    println!(
        "{:<14} {:<10} {rate_name:>13} {:>12} {:>10} {:>16} {:>18}",
        "protocol",
        "target",
        "latency ms",
        "vs direct",
        format!("proxy CPU/{unit}"),
        format!("machine CPU/{unit}")
    );
    for (m, mode) in modes.iter().enumerate() {
        let column = |t: usize, pick: fn(&(f64, f64, f64, f64)) -> f64| {
            median(results[m][t].iter().map(pick).collect())
        };
        let direct = column(0, |r| r.0);
        for (t, target) in targets(mode.tls).iter().enumerate() {
            let rate = column(t, |r| r.0);
            let cpu = match target.proxy {
                Some(_) => format!("{:.cpu_decimals$} µs", column(t, |r| r.2)),
                None => "-".into(),
            };
            println!(
                "{:<14} {:<10} {rate:>13.0} {:>12.3} {:>10.2} {cpu:>16} {:>15.cpu_decimals$} µs",
                mode.label(),
                target.name,
                column(t, |r| r.1),
                rate / direct,
                column(t, |r| r.3),
            );
        }
    }
}

/// One way to reach the cluster.
struct Target<'a> {
    name: &'static str,
    host: &'static str,
    port: u16,
    /// A remote client names the gateway's resource as its database.
    database: &'static str,
    password: &'a str,
    /// Clients run in it, so the kernel redirects them to the gateway.
    cgroup: Option<&'a Cgroup>,
    /// The proxy whose CPU is measured.
    proxy: Option<u32>,
}

/// A pgbench protocol, over plain TCP or TLS.
struct Mode {
    protocol: &'static str,
    tls: bool,
}

impl Mode {
    fn new(protocol: &'static str, tls: bool) -> Self {
        Self { protocol, tls }
    }

    fn label(&self) -> String {
        if self.tls {
            format!("{} + TLS", self.protocol)
        } else {
            self.protocol.to_string()
        }
    }

    /// libpq's `sslmode`: the cluster offers TLS, so plain rounds refuse
    /// it explicitly (libpq's default would take it).
    fn sslmode(&self) -> &'static str {
        if self.tls {
            "require"
        } else {
            "disable"
        }
    }
}

/// CPU time every CPU of the machine has spent busy (user, system and
/// interrupts; not idle, and not time the hypervisor gave to other
/// guests), in seconds. Per transaction, it is what a path through a proxy
/// costs the machine as a whole (client, proxy and server together), which
/// drifts less between rounds than TPS.
fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: f64 = [0, 1, 2, 5, 6]
        .iter()
        .map(|&i| ticks.get(i).copied().unwrap_or(0.0))
        .sum();
    busy / ticks_per_second()
}

/// CPU time (user and system) process `pid` has used, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which may contain spaces: utime and
    // stime are the 12th and 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map_or(Vec::new(), |(_, rest)| rest.split(' ').collect());
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / ticks_per_second()
}

/// The unit of `/proc`'s CPU times.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a constant.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Starts `cmd` in a session of its own, as systemd starts a service.
///
/// With autogroup scheduling (`kernel.sched_autogroup_enabled`, on on these
/// machines), the scheduler shares the CPU between sessions before it
/// shares it between processes. PostgreSQL's backends each call
/// `setsid`; a proxy left in the bench's session would share one session's
/// share with the pgbench clients it serves, which no installed proxy does.
fn as_service(cmd: &mut Command) -> &mut Command {
    // SAFETY: `setsid` is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// `program args` inside `cgroup` (redirected) or outside it.
fn command(cgroup: Option<&Cgroup>, program: &str, args: &[&str]) -> Command {
    match cgroup {
        Some(cg) => cg.command(program, args),
        None => {
            let mut cmd = Command::new(program);
            cmd.args(args);
            cmd
        }
    }
}

/// One timed pgbench run against `target` (`args` without the duration):
/// TPS, mean latency in ms, the proxy's CPU and the whole machine's CPU per
/// transaction in µs.
fn measure(target: &Target, sslmode: &str, args: &[&str]) -> (f64, f64, f64, f64) {
    let cpu_before = target.proxy.map(cpu_seconds);
    let machine_before = machine_busy_seconds();
    let mut args = args.to_vec();
    args.extend(["-T", SECONDS, "-n"]);
    let (tps, latency, text) = pgbench(target, sslmode, &args);
    assert!(tps > 0.0, "{} {args:?}: {text}", target.name);
    let transactions = tps * SECONDS.parse::<f64>().unwrap();
    let cpu_us = match (target.proxy, cpu_before) {
        (Some(pid), Some(before)) => (cpu_seconds(pid) - before) * 1e6 / transactions,
        _ => 0.0,
    };
    let machine_us = (machine_busy_seconds() - machine_before) * 1e6 / transactions;
    (tps, latency, cpu_us, machine_us)
}

/// Runs pgbench against `target`; returns (tps, mean latency ms, output).
fn pgbench(target: &Target, sslmode: &str, args: &[&str]) -> (f64, f64, String) {
    let port = target.port.to_string();
    let mut full = vec!["-h", target.host, "-p", &port, "-U", "postgres"];
    full.extend(args);
    full.push(target.database);
    let out = command(target.cgroup, "pgbench", &full)
        .env("PGPASSWORD", target.password)
        .env("PGSSLMODE", sslmode)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let number_after = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        number_after("tps = "),
        number_after("latency average = "),
        text,
    )
}

/// MB/s of a large COPY TO STDOUT through psql.
fn copy_rate(target: &Target) -> f64 {
    let port = target.port.to_string();
    let started = Instant::now();
    let out = command(
        target.cgroup,
        "psql",
        &[
            "-X",
            "-h",
            target.host,
            "-p",
            &port,
            "-U",
            "postgres",
            "-d",
            target.database,
            "-c",
            COPY_SQL,
        ],
    )
    .env("PGPASSWORD", target.password)
    .env("PGSSLMODE", "disable")
    .stderr(Stdio::inherit())
    .output()
    .unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    assert!(out.status.success());
    out.stdout.len() as f64 / elapsed / 1e6
}

/// A self-signed certificate and key (`portcullis tls self-signed`), offered
/// by the cluster, the gateway's listener and the TLS PgBouncer alike:
/// clients require TLS without verifying (`sslmode=require`).
struct Tls {
    cert: PathBuf,
    key: PathBuf,
}

impl Tls {
    fn generate(work: &Path) -> Self {
        let dir = work.join("tls");
        run(
            PORTCULLIS,
            &["tls", "self-signed", "--out", dir.to_str().unwrap()],
        );
        Self {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        }
    }

    /// Copies the pair into `dir` under the given names, for the postgres
    /// user (which the servers run as, and which only reads keys it owns).
    fn install(&self, dir: &Path, cert: &str, key: &str) {
        std::fs::copy(&self.cert, dir.join(cert)).unwrap();
        std::fs::copy(&self.key, dir.join(key)).unwrap();
        std::fs::set_permissions(dir.join(key), std::fs::Permissions::from_mode(0o600)).unwrap();
        for name in [cert, key] {
            run(
                "chown",
                &["postgres:postgres", dir.join(name).to_str().unwrap()],
            );
        }
    }
}

/// `binary run` (release) with a postgres listener (offering TLS) and the
/// cluster as two resources, one per address, the second reached over TLS;
/// the gateway's audit store records every statement. Its files live in
/// `work/name`, and it redirects clients of a child cgroup of its own.
struct Portcullis {
    binary: String,
    child: Child,
    /// The listener's own port, for remote clients.
    port: u16,
    pins: PathBuf,
    cgroup: Cgroup,
}

impl Portcullis {
    fn start(
        binary: &str,
        name: &str,
        work: &Path,
        pg_port: u16,
        tls: &Tls,
        provider: &OidcProvider,
    ) -> Self {
        let work = work.join(name);
        std::fs::create_dir(&work).unwrap();
        let secret = work.join("secret");
        std::fs::write(&secret, PASSWORD).unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let instance = format!("portcullis-bench-pg-{}-{name}", std::process::id());
        let pins = Path::new("/sys/fs/bpf").join(&instance);
        let cgroup = Cgroup::create(&portcullis::kernel::root_cgroup().unwrap(), &instance);
        let port = free_port();
        let mut text = format!(
            r#"state_dir = "{state}"
[kernel]
cgroup = "{cg}"
pin_dir = "{pins}"

[identity]
issuer = "{issuer}"
client_id = "portcullis"
audience = ["urn:portcullis"]
control_socket = "{control}"

[[listener]]
name = "pg"
address = "127.0.0.1:{port}"
protocol = "postgres"
direct = true
tls_cert = "{cert}"
tls_key = "{key}"
"#,
            state = work.join("state").display(),
            cg = cgroup.path.display(),
            pins = pins.display(),
            issuer = provider.issuer,
            control = work.join("control.sock").display(),
            cert = tls.cert.display(),
            key = tls.key.display(),
        );
        // The cluster once per address: plain upstream, and TLS upstream.
        for (name, host, upstream_tls) in [
            ("bench", PLAIN_HOST, "disable"),
            ("bench-tls", TLS_HOST, "require"),
        ] {
            text.push_str(&format!(
                r#"
[[protect]]
destination = "{host}"
port = {pg_port}
to = "pg"

[[resource]]
name = "{name}"
protocol = "postgres"
address = "{host}:{pg_port}"
tls = "{upstream_tls}"

[[resource.grant]]
roles = ["*"]
upstream_user = "postgres"
password_file = "{secret}"
"#,
                secret = secret.display(),
            ));
        }
        let config = work.join("portcullis.toml");
        std::fs::write(&config, text).unwrap();
        let log_path = work.join("portcullis.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let child = as_service(&mut Command::new(binary))
            .arg("--config")
            .arg(&config)
            .arg("run")
            .env("PORTCULLIS_LOG", "warn,portcullis=info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .contains("portcullis ready")
        {
            assert!(
                Instant::now() < deadline,
                "{binary} did not start: {}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(50));
        }
        Self {
            binary: binary.to_string(),
            child,
            port,
            pins,
            cgroup,
        }
    }

    /// Local clients that connect to the cluster at `host` and are
    /// redirected to this instance, giving `token` as their password.
    fn local_target<'a>(
        &'a self,
        name: &'static str,
        host: &'static str,
        pg_port: u16,
        token: &'a str,
    ) -> Target<'a> {
        Target {
            name,
            host,
            port: pg_port,
            database: "postgres",
            password: token,
            cgroup: Some(&self.cgroup),
            proxy: Some(self.child.id()),
        }
    }
}

impl Drop for Portcullis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new(&self.binary)
            .args(["kernel", "detach", "--pin-dir"])
            .arg(&self.pins)
            .output();
    }
}

/// PgBouncer in session mode on loopback, trusting its clients (as the
/// gateway trusts the kernel's uid), logging in upstream with the password.
/// With `tls`, it requires TLS of its clients and speaks TLS upstream.
struct Bouncer {
    port: u16,
    child: Child,
}

impl Bouncer {
    fn start(work: &Path, name: &str, pg_port: u16, tls: Option<&Tls>) -> Self {
        let port = free_port();
        let dir = work.join(name);
        std::fs::create_dir(&dir).unwrap();
        let tls_settings = match tls {
            Some(tls) => {
                tls.install(&dir, "cert.pem", "key.pem");
                format!(
                    "client_tls_sslmode = require\nclient_tls_cert_file = {cert}\n\
                     client_tls_key_file = {key}\nserver_tls_sslmode = require\n",
                    cert = dir.join("cert.pem").display(),
                    key = dir.join("key.pem").display(),
                )
            }
            None => "server_tls_sslmode = disable\n".into(),
        };
        let users = dir.join("users.txt");
        std::fs::write(&users, format!("\"postgres\" \"{PASSWORD}\"\n")).unwrap();
        let ini = dir.join("pgbouncer.ini");
        std::fs::write(
            &ini,
            format!(
                "[databases]\npostgres = host={PLAIN_HOST} port={pg_port} dbname=postgres user=postgres password={PASSWORD}\n\n\
                 [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
                 auth_type = trust\nauth_file = {users}\npool_mode = session\n\
                 max_client_conn = 100\ndefault_pool_size = 20\nlogfile = {log}\n{tls_settings}",
                users = users.display(),
                log = dir.join("pgbouncer.log").display(),
            ),
        )
        .unwrap();
        run("chown", &["-R", "postgres:postgres", dir.to_str().unwrap()]);
        let child = as_service(&mut Command::new("runuser"))
            .args(["-u", "postgres", "--", "pgbouncer"])
            .arg(&ini)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "pgbouncer did not start");
            thread::sleep(Duration::from_millis(50));
        }
        Self { port, child }
    }
}

impl Bouncer {
    /// pgbouncer's own pid: runuser starts it as its child.
    fn pid(&self) -> u32 {
        let runuser = self.child.id();
        std::fs::read_to_string(format!("/proc/{runuser}/task/{runuser}/children"))
            .ok()
            .and_then(|c| c.split_whitespace().next()?.parse().ok())
            .unwrap_or(runuser)
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        // runuser passes SIGTERM on to pgbouncer.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}
