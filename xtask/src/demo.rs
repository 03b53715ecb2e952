//! `cargo xtask demo`: the gateway in front of a real PostgreSQL, in one
//! command, without touching anything else on the machine.
//!
//! Enforcement is attached only to a child cgroup made for the demo
//! (`portcullis-demo`), never to the root cgroup, and only loopback addresses
//! are used, so processes outside the demo cgroup are unaffected. Everything
//! lives at fixed places ([`DEMO_DIR`], [`PIN_DIR`], the cgroup), so that
//! `cargo xtask demo --stop` can clean up after any kind of failure, and
//! the demo itself cleans up before it starts again.
//!
//! Two phases. The first (setup, build) behaves like any command: Ctrl-C
//! stops it, and nothing needs cleaning up yet. Then xtask re-executes itself
//! with SIGINT ignored (`demo --supervise`) and starts PostgreSQL and the
//! gateway as its own children. Ctrl-C now reaches the gateway, which shuts
//! down; the supervisor notices, cleans up and reaps its children. This needs
//! neither a signal-handling crate nor `unsafe`.
//!
//! The cleanup, shared by `--stop`, the supervisor and failed start-ups,
//! lives in [`stop`](mod@stop).

use std::{
    fs,
    io::{Read, Seek, SeekFrom, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::{
        fs::{OpenOptionsExt, PermissionsExt},
        process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    setup,
    util::{self, cargo, cmd, describe, output, report, run, target_dir},
};

mod stop;
pub use stop::stop;
use stop::{stop_demo, stop_running_or_left_over};

/// Everything the demo writes, apart from the cgroup and the pins.
pub const DEMO_DIR: &str = "/tmp/portcullis-demo";
/// Where the demo daemon pins its programs (not the production pin_dir).
pub const PIN_DIR: &str = "/sys/fs/bpf/portcullis-demo";
/// The child cgroup, under the cgroup v2 mount, the demo enforces on.
const CGROUP_NAME: &str = "portcullis-demo";
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// The protected PostgreSQL, redirected to the gateway.
const PG_PORT: u16 = 5499;
/// The gateway's listener.
const LISTENER_PORT: u16 = 15499;
/// A protected port whose connects are refused. The demo listens on it itself,
/// so that a connect from outside the cgroup visibly succeeds.
const BLOCKED_PORT: u16 = 5498;
const READY_LINE: &str = "portcullis ready";
const TASK: &str = "demo";

/// The demo's fixed locations.
#[derive(Debug, Clone)]
struct Demo {
    root: PathBuf,
    /// Owned by the postgres user: data directory, socket and log.
    postgres: PathBuf,
    config: PathBuf,
    state: PathBuf,
    log: PathBuf,
    pid_file: PathBuf,
    /// The upstream password the gateway holds (root only, 0600); psql
    /// users never see it.
    secret: PathBuf,
    /// The `demo --supervise` process, which `--stop` lets clean up.
    supervisor_pid_file: PathBuf,
    cgroup_mount: PathBuf,
    cgroup: PathBuf,
}

impl Demo {
    fn new() -> Result<Self> {
        let root = PathBuf::from(DEMO_DIR);
        let cgroup_mount = cgroup2_mount()?;
        let cgroup = cgroup_mount.join(CGROUP_NAME);
        Ok(Self {
            postgres: root.join("postgres"),
            config: root.join("portcullis.toml"),
            state: root.join("state"),
            log: root.join("portcullis.log"),
            pid_file: root.join("portcullis.pid"),
            secret: root.join("postgres.secret"),
            supervisor_pid_file: root.join("supervisor.pid"),
            root,
            cgroup_mount,
            cgroup,
        })
    }

    fn pgdata(&self) -> PathBuf {
        self.postgres.join("data")
    }

    /// `portcullis --config <demo config> audit <args>`: the audit trail,
    /// read through the running daemon.
    fn audit(&self) -> Command {
        let mut command = cmd(Self::binary());
        command.arg("--config").arg(&self.config).arg("audit");
        command
    }

    fn binary() -> PathBuf {
        target_dir().join("release/portcullis")
    }

    /// Whether anything of an earlier demo is still around.
    fn leftovers(&self) -> bool {
        self.root.exists() || Path::new(PIN_DIR).exists() || self.cgroup.exists()
    }

    /// `program args...` run inside the demo cgroup. The shell moves itself
    /// into the cgroup and then execs, so the program starts there; if the
    /// move fails, nothing runs (exit 125) rather than running unenforced.
    fn in_cgroup(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = cmd("sh");
        command
            .arg("-c")
            .arg(r#"echo $$ > "$1/cgroup.procs" || exit 125; shift; exec "$@""#)
            .arg("sh")
            .arg(&self.cgroup)
            .arg(program);
        command
    }

    /// The demo's gateway config: enforcement on the demo cgroup only.
    fn config_text(&self) -> String {
        format!(
            r#"# Written by `cargo xtask demo`; removed by `cargo xtask demo --stop`.
state_dir = "{state}"

[kernel]
# Only processes in this child cgroup are governed; the rest of the machine is not.
cgroup = "{cgroup}"
pin_dir = "{PIN_DIR}"

[[listener]]
name = "pg"
address = "127.0.0.1:{LISTENER_PORT}"
protocol = "postgres"

# The demo PostgreSQL: connects are redirected through the "pg" listener.
[[protect]]
destination = "127.0.0.1"
port = {PG_PORT}
to = "pg"

# The gateway logs in to it with a password only the gateway holds; anyone
# the kernel identified may use it as the postgres role.
[[resource]]
name = "demo-db"
protocol = "postgres"
address = "127.0.0.1:{PG_PORT}"

[[resource.grant]]
roles = ["*"]
upstream_user = "postgres"
password_file = "{secret}"

# Connects to this port are refused by the kernel.
[[protect]]
destination = "127.0.0.1"
port = {BLOCKED_PORT}
to = "block"
"#,
            state = self.state.display(),
            cgroup = self.cgroup.display(),
            secret = self.secret.display(),
        )
    }
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup`, or
/// `/sys/fs/cgroup/unified` on hybrid systems).
fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(2) == Some(&"cgroup2"))
        .and_then(|f| f.get(1).map(PathBuf::from))
        .context("no cgroup v2 hierarchy is mounted; the gateway needs cgroup v2")
}

/// Phase one: setup and build, then re-execute as the supervisor.
pub fn start(once: bool) -> Result<()> {
    util::require_root(TASK)?;
    let demo = Demo::new()?;
    if demo.leftovers() {
        report(TASK, "previous demo", "still set up: stopping it first");
        stop_running_or_left_over(&demo)?;
    }
    setup::run_all()?;
    run(cargo().args(["build", "--release"]))?;
    for port in [PG_PORT, LISTENER_PORT, BLOCKED_PORT] {
        TcpListener::bind(("127.0.0.1", port)).with_context(|| {
            format!(
                "127.0.0.1:{port} is in use; the demo needs ports \
                 {PG_PORT}, {LISTENER_PORT} and {BLOCKED_PORT}"
            )
        })?;
    }
    let error = supervise_command(once)?.exec();
    Err(error).context("re-executing xtask to run the demo")
}

/// This program again, as `demo --supervise`, with SIGINT ignored. A signal
/// ignored across exec stays ignored, so Ctrl-C no longer kills xtask; the
/// gateway and PostgreSQL install their own handlers and still get it.
fn supervise_command(once: bool) -> Result<Command> {
    let exe = std::env::current_exe().context("finding the xtask binary")?;
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(r#"trap '' INT; exec "$0" "$@""#)
        .arg(exe)
        .args(["demo", "--supervise"]);
    if once {
        command.arg("--once");
    }
    Ok(command)
}

/// Phase two: start everything, walk through it, and clean up, either at
/// once (`once`) or when the gateway exits (Ctrl-C, `demo --stop`).
pub fn supervise(once: bool) -> Result<()> {
    util::require_root(TASK)?;
    // From here on, anything that fails is cleaned up by the guard.
    let mut running = Running {
        demo: Demo::new()?,
        postgres: None,
        daemon: None,
        armed: true,
    };
    running.bring_up()?;
    let _blocked_port_listener = listen_on_blocked_port()?;
    let shown = show(&running.demo);
    if shown.is_err() {
        print_log_tail(&running.demo.log, 40);
    }
    if once || shown.is_err() {
        let stopped = running.finish();
        shown?;
        return stopped;
    }
    print_instructions(&running.demo);
    running.follow_daemon();
    running.finish()
}

/// The demo while it runs: its children, and the cleanup that must happen
/// however the run ends.
struct Running {
    demo: Demo,
    postgres: Option<Child>,
    daemon: Option<Child>,
    /// Clean up on drop: start-up failed part-way (`?` or a panic).
    armed: bool,
}

impl Running {
    /// The config, PostgreSQL, the cgroup and the gateway, in that order.
    fn bring_up(&mut self) -> Result<()> {
        let demo = &self.demo;
        create_dir(&demo.root, 0o755)?;
        create_dir(&demo.state, 0o750)?;
        fs::write(&demo.supervisor_pid_file, std::process::id().to_string())?;
        let password = random_password()?;
        write_secret(&demo.secret, &password)?;
        fs::write(&demo.config, demo.config_text())
            .with_context(|| format!("writing {}", demo.config.display()))?;
        let binary = Demo::binary();
        output(
            cmd(&binary)
                .arg("--config")
                .arg(&demo.config)
                .args(["config", "check"]),
        )?;
        report(TASK, "config", demo.config.display());

        start_postgres(demo, &password, &mut self.postgres)?;

        if demo.cgroup.parent() != Some(demo.cgroup_mount.as_path()) {
            bail!(
                "refusing to use {} as the demo cgroup",
                demo.cgroup.display()
            );
        }
        fs::create_dir(&demo.cgroup)
            .with_context(|| format!("creating cgroup {}", demo.cgroup.display()))?;
        report(TASK, "cgroup", demo.cgroup.display());

        let daemon = start_daemon(demo, &binary, &mut self.daemon)?;
        report(
            TASK,
            "gateway",
            format!(
                "running (pid {daemon}, log {}, pins {PIN_DIR})",
                demo.log.display()
            ),
        );
        Ok(())
    }

    /// Prints the gateway's log as it grows, until the gateway exits.
    ///
    /// The gateway waits for open sessions when it shuts down; a psql left
    /// open in the user's shell would keep it up, so once it logs that it is
    /// shutting down it gets a few seconds before the cleanup ends it.
    fn follow_daemon(&mut self) {
        let Some(daemon) = &mut self.daemon else {
            return;
        };
        let mut log = fs::File::open(&self.demo.log).ok();
        if let Some(log) = &mut log {
            let _ = log.seek(SeekFrom::End(0));
        }
        let mut shutting_down: Option<Instant> = None;
        loop {
            if let Some(log) = &mut log {
                let mut new = String::new();
                let _ = log.read_to_string(&mut new);
                print!("{new}");
                if shutting_down.is_none() && new.contains("shutting down") {
                    shutting_down = Some(Instant::now());
                }
            }
            if !matches!(daemon.try_wait(), Ok(None)) {
                break;
            }
            if shutting_down.is_some_and(|t| t.elapsed() > Duration::from_secs(5)) {
                report(
                    TASK,
                    "gateway",
                    "still waiting for open sessions: ending them",
                );
                break;
            }
            thread::sleep(Duration::from_millis(250));
        }
        println!();
        report(TASK, "gateway", "stopped; cleaning up");
    }

    /// Cleans up and reaps the children.
    fn finish(mut self) -> Result<()> {
        self.armed = false;
        let stopped = stop_demo(&self.demo);
        self.reap();
        stopped
    }

    /// Collects the exit status of children the cleanup ended, so none is
    /// left as a zombie.
    fn reap(&mut self) {
        for child in [&mut self.daemon, &mut self.postgres].into_iter().flatten() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.armed {
            eprintln!("[demo] failed: cleaning up");
            if let Err(e) = stop_demo(&self.demo) {
                eprintln!("[demo] {e:#}");
            }
            self.reap();
        }
    }
}

/// A throwaway cluster, loopback only, socket in the demo dir: TCP logins
/// need the `password` (SCRAM), which only the gateway holds. initdb
/// refuses to run as root, so it and the server run as `postgres`. The
/// server is this process's child (not daemonized by pg_ctl), so the
/// cleanup can reap it; it goes into `slot` as soon as it is started.
fn start_postgres(demo: &Demo, password: &str, slot: &mut Option<Child>) -> Result<()> {
    create_dir(&demo.postgres, 0o700)?;
    run(cmd("chown").arg("postgres:postgres").arg(&demo.postgres))
        .context("the demo needs the `postgres` user from the postgresql package")?;
    let pgdata = demo.pgdata();
    // initdb reads the superuser's password from a file it can read.
    let pwfile = demo.postgres.join("initdb.pw");
    write_secret(&pwfile, password)?;
    run(cmd("chown").arg("postgres").arg(&pwfile))?;
    let initdb = output(
        as_postgres(demo, "initdb")
            .arg("-D")
            .arg(&pgdata)
            .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .args(["-U", "postgres", "-E", "UTF8", "--locale=C"])
            .args(["--no-sync", "--no-instructions"]),
    );
    fs::remove_file(&pwfile).with_context(|| format!("removing {}", pwfile.display()))?;
    initdb?;
    let settings = format!(
        "\n# cargo xtask demo\nlisten_addresses = '127.0.0.1'\nport = {PG_PORT}\n\
         unix_socket_directories = '{}'\nfsync = off\n",
        demo.postgres.display()
    );
    fs::OpenOptions::new()
        .append(true)
        .open(pgdata.join("postgresql.conf"))
        .and_then(|mut f| f.write_all(settings.as_bytes()))
        .context("writing postgresql.conf")?;

    let log_path = demo.postgres.join("postgres.log");
    let log =
        fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut server = as_postgres(demo, "postgres");
    server
        .arg("-D")
        .arg(&pgdata)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let postgres = slot.insert(
        server
            .spawn()
            .with_context(|| format!("starting `{}`", describe(&server)))?,
    );

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = Command::new(Path::new(PG_BIN).join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &PG_PORT.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        if ready {
            break;
        }
        let log = || tail(&fs::read_to_string(&log_path).unwrap_or_default(), 20);
        if let Some(status) = postgres.try_wait()? {
            bail!("the demo PostgreSQL exited ({status}); its log:\n{}", log());
        }
        if Instant::now() > deadline {
            bail!(
                "the demo PostgreSQL was not ready within 60 s; its log:\n{}",
                log()
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
    report(
        TASK,
        "postgresql",
        format!("running on 127.0.0.1:{PG_PORT} (data {})", pgdata.display()),
    );
    Ok(())
}

/// A PostgreSQL 15 tool run as the postgres user, from a directory it can
/// read (it is unhappy in root's home).
fn as_postgres(demo: &Demo, tool: &str) -> Command {
    let mut command = cmd("runuser");
    command
        .args(["-u", "postgres", "--"])
        .arg(Path::new(PG_BIN).join(tool))
        .current_dir(&demo.root);
    command
}

/// Starts the gateway inside the demo cgroup and waits for it to be ready.
/// The child goes into `slot` at once, so that it is reaped even when it
/// never becomes ready. Returns its pid.
fn start_daemon(demo: &Demo, binary: &Path, slot: &mut Option<Child>) -> Result<u32> {
    let log =
        fs::File::create(&demo.log).with_context(|| format!("creating {}", demo.log.display()))?;
    let mut command = demo.in_cgroup(binary);
    command
        .arg("--config")
        .arg(&demo.config)
        .arg("run")
        .env("NO_COLOR", "1")
        .env("PORTCULLIS_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let daemon = slot.insert(
        command
            .spawn()
            .with_context(|| format!("starting `{}`", describe(&command)))?,
    );
    fs::write(&demo.pid_file, daemon.id().to_string())?;

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = fs::read_to_string(&demo.log).unwrap_or_default();
        if log.contains(READY_LINE) {
            return Ok(daemon.id());
        }
        if let Some(status) = daemon.try_wait()? {
            bail!(
                "the gateway exited ({status}) before it was ready; its log:\n{}",
                tail(&log, 30)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the gateway did not log \"{READY_LINE}\" within 60 s; its log:\n{}",
                tail(&log, 30)
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// A listener on the blocked port that closes what it accepts: it lets the
/// demo show that a connect from outside the cgroup succeeds.
fn listen_on_blocked_port() -> Result<TcpListener> {
    let listener = TcpListener::bind(("127.0.0.1", BLOCKED_PORT))
        .with_context(|| format!("listening on 127.0.0.1:{BLOCKED_PORT}"))?;
    let accepting = listener.try_clone()?;
    thread::spawn(move || {
        for stream in accepting.incoming() {
            drop(stream);
        }
    });
    Ok(listener)
}

/// The walk-through: a redirected psql (identified, logged in with the held
/// password, its statement recorded), the same psql refused a login
/// outside the cgroup, a blocked connect, kernel status, the audit trail
/// and its verification.
fn show(demo: &Demo) -> Result<()> {
    heading("1. psql to the protected PostgreSQL, from inside the demo cgroup");
    let mut psql = without_password(demo, demo.in_cgroup("psql"));
    psql.args(psql_args(PG_PORT));
    println!("$ {}", describe(&psql));
    run(&mut psql).context("psql through the gateway failed")?;
    let destination = format!("127.0.0.1:{PG_PORT}");
    if !wait_for_audit(demo, "redirect", &destination) {
        bail!(
            "psql reached PostgreSQL, but the audit trail shows no redirect of {destination} \
             (`portcullis audit events --action redirect`)"
        );
    }
    if !wait_for_audit(demo, "statement", "select 1") {
        bail!(
            "psql ran `select 1` through the gateway, but the audit trail has no statement \
             record of it (`portcullis audit events --action statement`)"
        );
    }
    println!(
        "-> the kernel sent the connect to the gateway on 127.0.0.1:{LISTENER_PORT}, which\n   \
         identified uid 0, logged in to PostgreSQL with the password it holds, and\n   \
         recorded the statement"
    );

    heading("1b. The same psql outside the demo cgroup (not governed): no password");
    let mut direct = without_password(demo, cmd("psql"));
    direct.args(psql_args(PG_PORT));
    expect_refused(&mut direct, "password")
        .context("psql logged in to the demo PostgreSQL without its password")?;
    println!("-> only the gateway holds the upstream credentials");

    heading(&format!(
        "2. 127.0.0.1:{BLOCKED_PORT} is protected with to = \"block\""
    ));
    let target = SocketAddr::from(([127, 0, 0, 1], BLOCKED_PORT));
    match TcpStream::connect_timeout(&target, Duration::from_secs(3)) {
        Ok(_) => println!("outside the demo cgroup: connect to {target} succeeds (not governed)"),
        Err(e) => println!("outside the demo cgroup: connect to {target}: {e}"),
    }
    let mut blocked = without_password(demo, demo.in_cgroup("psql"));
    blocked.args(psql_args(BLOCKED_PORT));
    expect_refused(&mut blocked, "Operation not permitted")
        .context("the connect to the blocked port was not refused with EPERM")?;
    println!("-> refused in connect() with EPERM by the kernel: no packet left the socket");

    heading("3. Kernel enforcement");
    run(cmd(Demo::binary()).args(["kernel", "status", "--pin-dir", PIN_DIR]))?;

    heading("4. The audit trail");
    let blocked = format!("127.0.0.1:{BLOCKED_PORT}");
    wait_for_audit(demo, "block", &blocked);
    let mut events = demo.audit();
    events.arg("events");
    println!("$ {}", describe(&events));
    run(&mut events)?;
    let mut verify = demo.audit();
    verify.arg("verify");
    println!("$ {}", describe(&verify));
    run(&mut verify)?;
    Ok(())
}

/// Shows and runs `command`, which must fail with `reason` in its error
/// output.
fn expect_refused(command: &mut Command, reason: &str) -> Result<()> {
    println!("$ {}", describe(command));
    let out = command.stdin(Stdio::null()).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    print!("{stderr}");
    if out.status.success() || !stderr.contains(reason) {
        bail!("expected it to fail with \"{reason}\"");
    }
    Ok(())
}

/// psql as someone who knows no password: none in the environment, no
/// password file (one that does not exist), never prompted (`-w`, in
/// [`psql_args`]).
fn without_password(demo: &Demo, mut psql: Command) -> Command {
    psql.env_remove("PGPASSWORD")
        .env("PGPASSFILE", demo.root.join("no-such.pgpass"))
        .env("PGCONNECT_TIMEOUT", "5");
    psql
}

fn psql_args(port: u16) -> Vec<String> {
    ["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"]
        .into_iter()
        .map(String::from)
        .chain(["-w", "-X", "-c", "select 1"].map(String::from))
        .collect()
}

/// Waits up to 5 s for an audit event with this action that mentions
/// `needle`: the store commits in groups, a moment after the fact.
fn wait_for_audit(demo: &Demo, action: &str, needle: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let found = output(demo.audit().args(["events", "--json", "--action", action]))
            .is_ok_and(|events| events.contains(needle));
        if found {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(200));
    }
}

fn print_instructions(demo: &Demo) {
    heading("The demo is running");
    println!(
        "In another terminal, as root, open a shell inside the demo cgroup:\n\
         \n    bash -c 'echo $$ > {cgroup}/cgroup.procs && exec bash'\n\
         \nand try:\n\
         \n    psql -h 127.0.0.1 -p {PG_PORT} -U postgres      # through the gateway, no password\
         \n    psql -h 127.0.0.1 -p {BLOCKED_PORT} -U postgres      # refused by the kernel\
         \n    {binary} --config {config} audit sessions\
         \n    {binary} --config {config} audit replay SESSION\
         \n    {binary} kernel status --pin-dir {PIN_DIR}\n\
         \n`exit` leaves that shell. Stop the demo with Ctrl-C here, or with\
         \n`cargo xtask demo --stop` from anywhere; processes still in the demo\
         \ncgroup are ended then. The gateway's log follows.\n",
        cgroup = demo.cgroup.display(),
        config = demo.config.display(),
        binary = Demo::binary().display(),
    );
}

/// 24 random hex digits, from the kernel.
fn random_password() -> Result<String> {
    let mut bytes = [0u8; 12];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes `text` to a new file only its owner may read.
fn write_secret(path: &Path, text: &str) -> Result<()> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))
}

fn create_dir(path: &Path, mode: u32) -> Result<()> {
    fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

fn heading(text: &str) {
    println!("\n=== {text}");
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn print_log_tail(path: &Path, lines: usize) {
    let text = fs::read_to_string(path).unwrap_or_default();
    eprintln!(
        "--- last lines of {}:\n{}\n---",
        path.display(),
        tail(&text, lines)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo() -> Demo {
        Demo {
            root: DEMO_DIR.into(),
            postgres: "/tmp/portcullis-demo/postgres".into(),
            config: "/tmp/portcullis-demo/portcullis.toml".into(),
            state: "/tmp/portcullis-demo/state".into(),
            log: "/tmp/portcullis-demo/portcullis.log".into(),
            pid_file: "/tmp/portcullis-demo/portcullis.pid".into(),
            secret: "/tmp/portcullis-demo/postgres.secret".into(),
            supervisor_pid_file: "/tmp/portcullis-demo/supervisor.pid".into(),
            cgroup_mount: "/sys/fs/cgroup".into(),
            cgroup: "/sys/fs/cgroup/portcullis-demo".into(),
        }
    }

    #[test]
    fn config_governs_only_the_demo_cgroup() {
        let text = demo().config_text();
        assert!(text.contains("cgroup = \"/sys/fs/cgroup/portcullis-demo\""));
        assert!(text.contains("pin_dir = \"/sys/fs/bpf/portcullis-demo\""));
        assert!(text.contains("address = \"127.0.0.1:15499\""));
        assert!(text.contains("port = 5499\nto = \"pg\""));
        assert!(text.contains("port = 5498\nto = \"block\""));
    }

    #[test]
    fn config_relays_postgres_with_the_held_password() {
        let text = demo().config_text();
        assert!(text.contains("protocol = \"postgres\""));
        assert!(text.contains("address = \"127.0.0.1:5499\""));
        assert!(text.contains("password_file = \"/tmp/portcullis-demo/postgres.secret\""));
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }
}
