//! Shared helpers: a child cgroup per test, a gateway daemon per test, and
//! tiny upstream servers on loopback.
//!
//! Safety rules (DEVELOPERS.md): programs are only ever attached to a child
//! cgroup the test creates, pins live in a per-test bpffs directory, and every
//! guard cleans up in `Drop`, so a failing assertion still detaches, unpins
//! and removes the cgroup.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, ChildStderr, Command, Output, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use portcullis_testkit::cgroup::Cgroup;
pub use portcullis_testkit::free_port;
use serde_json::Value;

pub const PORTCULLIS: &str = env!("CARGO_BIN_EXE_portcullis");

/// `portcullis tls self-signed`: cert.pem and key.pem in `dir`, for the
/// extra `names` (IP addresses or DNS names) besides its defaults.
pub fn self_signed(dir: &Path, names: &[&str]) {
    let mut cmd = Command::new(PORTCULLIS);
    cmd.args(["tls", "self-signed", "--out"]).arg(dir);
    for name in names {
        cmd.args(["--name", name]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A name unique to this test process and call.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn require_root() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap();
    assert_eq!(
        euid, "0",
        "kernel integration tests attach eBPF programs: run them as root (cargo xtask test)"
    );
}

/// The kit's child cgroup, named for this test process (so that a later
/// run can sweep it up if this one is killed), with a test's helpers.
pub struct TestCgroup(Cgroup);

impl std::ops::Deref for TestCgroup {
    type Target = Cgroup;

    fn deref(&self) -> &Cgroup {
        &self.0
    }
}

/// Removes what an earlier test run left behind when it was killed before
/// its guards could run (a timeout, kill -9): cgroups and pin directories
/// named after a test process that no longer exists.
fn sweep_leftovers_of_dead_runs(cgroup_root: &Path) {
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(|| {
        let left_by_dead_run = |path: &Path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .and_then(|name| name.strip_prefix("portcullis-test-"))
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok())
                .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
        };
        let leftovers = |dir: &Path| -> Vec<PathBuf> {
            std::fs::read_dir(dir)
                .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
                .unwrap_or_default()
                .into_iter()
                .filter(|path| left_by_dead_run(path))
                .collect()
        };
        for pins in leftovers(Path::new("/sys/fs/bpf")) {
            let _ = Command::new(PORTCULLIS)
                .args(["kernel", "detach", "--pin-dir"])
                .arg(&pins)
                .output();
        }
        for cgroup in leftovers(cgroup_root) {
            drop(Cgroup::adopt(cgroup));
        }
    });
}

impl TestCgroup {
    pub fn new() -> Self {
        require_root();
        let root = portcullis::kernel::root_cgroup().expect("cgroup v2 mounted");
        sweep_leftovers_of_dead_runs(&root);
        Self(Cgroup::create(&root, &unique("portcullis-test")))
    }

    /// Runs to completion inside the cgroup, with a timeout.
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        let child = self
            .command(program, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_with_timeout(child, Duration::from_secs(30))
    }

    /// Runs a Python snippet inside the cgroup; returns its stdout, trimmed.
    pub fn python(&self, code: &str) -> String {
        let out = self.run("python3", &["-c", code]);
        assert!(
            out.status.success(),
            "python failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

/// `portcullis` as `uid` ("0": as root) with no readable config, as a
/// non-root user on an installed host runs it (the config is root's).
pub fn portcullis_as(uid: &str) -> Command {
    let mut cmd = if uid == "0" {
        Command::new(PORTCULLIS)
    } else {
        let mut c = Command::new("setpriv");
        c.args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            PORTCULLIS,
        ]);
        c
    };
    cmd.env("PORTCULLIS_CONFIG", "/nonexistent/portcullis.toml")
        .env("NO_COLOR", "1");
    cmd
}

/// Waits for `child`, killing it after `timeout`. Its piped output is read
/// while it runs, so a child writing more than a pipe holds cannot block.
pub fn wait_with_timeout(mut child: Child, timeout: Duration) -> Output {
    fn drain(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<Vec<u8>> {
        thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "command timed out; stderr: {}",
                String::from_utf8_lossy(&stderr.join().unwrap_or_default())
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// A `[[protect]]` rule for [`Gateway::start`].
pub struct Protect {
    pub destination: String,
    pub port: Option<u16>,
    pub to: String,
}

impl Protect {
    pub fn redirect(destination: &str, port: u16) -> Self {
        Self {
            destination: destination.into(),
            port: Some(port),
            to: "tcp".into(),
        }
    }

    /// To the PostgreSQL listener the tests name `pg`.
    pub fn postgres(destination: &str, port: u16) -> Self {
        Self {
            destination: destination.into(),
            port: Some(port),
            to: "pg".into(),
        }
    }

    pub fn block(destination: &str, port: Option<u16>) -> Self {
        Self {
            destination: destination.into(),
            port,
            to: "block".into(),
        }
    }
}

/// A `portcullis run` daemon inside a test cgroup, with its own pins, state
/// directory and listener. Dropping it kills the daemon and detaches.
pub struct Gateway {
    pub dir: tempfile::TempDir,
    pub pin_dir: PathBuf,
    pub listener: SocketAddr,
    pub config_path: PathBuf,
    child: Option<Child>,
    log_path: PathBuf,
    /// Copies the daemon's stderr into `log_path`, unless stalled.
    log_pump: Option<thread::JoinHandle<()>>,
    log_stalled: Arc<AtomicBool>,
    cgroup_path: PathBuf,
    /// TOML appended to the generated config (e.g. an `[identity]` section).
    extra_config: String,
}

impl Gateway {
    pub fn start(cgroup: &TestCgroup, rules: &[Protect]) -> Self {
        Self::start_with_config(cgroup, rules, "")
    }

    /// Like [`Gateway::start`], with `extra` TOML appended to the config.
    pub fn start_with_config(cgroup: &TestCgroup, rules: &[Protect], extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(unique("portcullis-test"));
        let listener: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config_path = dir.path().join("portcullis.toml");
        let mut gateway = Self {
            log_path: dir.path().join("daemon.log"),
            dir,
            pin_dir,
            listener,
            config_path,
            child: None,
            log_pump: None,
            log_stalled: Arc::new(AtomicBool::new(false)),
            cgroup_path: cgroup.path.clone(),
            extra_config: extra.to_string(),
        };
        gateway.write_config(rules);
        gateway.spawn();
        gateway
    }

    pub fn write_config(&self, rules: &[Protect]) {
        let mut text = format!(
            "state_dir = \"{}\"\n[kernel]\ncgroup = \"{}\"\npin_dir = \"{}\"\n\n[[listener]]\nname = \"tcp\"\naddress = \"{}\"\n",
            self.dir.path().join("state").display(),
            self.cgroup_path.display(),
            self.pin_dir.display(),
            self.listener,
        );
        for rule in rules {
            text.push_str(&format!(
                "\n[[protect]]\ndestination = \"{}\"\nto = \"{}\"\n",
                rule.destination, rule.to
            ));
            if let Some(port) = rule.port {
                text.push_str(&format!("port = {port}\n"));
            }
        }
        text.push('\n');
        text.push_str(&self.extra_config);
        // Atomic replace, as a config manager would: a daemon reloading
        // mid-write must never read a truncated file.
        let tmp = self.config_path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.config_path).unwrap();
    }

    /// Starts the daemon inside the test cgroup and waits until it is ready.
    /// Its stderr is a one-page pipe that a thread copies into the log, so
    /// that a test can stall it as a journal that stopped reading.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        let ready_before = self.log().matches("portcullis ready").count();
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec \"$@\"",
                self.cgroup_path.display()
            ))
            .arg("sh")
            .arg(PORTCULLIS)
            .arg("--config")
            .arg(&self.config_path)
            .arg("run")
            .env("PORTCULLIS_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        // SAFETY: a plain fcntl on a pipe this process owns.
        unsafe { libc::fcntl(stderr.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
        let stalled = self.log_stalled.clone();
        self.log_pump = Some(thread::spawn(move || pump_log(stderr, log, &stalled)));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.log().matches("portcullis ready").count() == ready_before {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("gateway exited with {status}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "gateway not ready: {}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Stops (or resumes) reading the daemon's stderr: once the pipe is
    /// full, every write the daemon makes to it blocks, as with a journal
    /// that stalled.
    pub fn stall_log(&self, stalled: bool) {
        self.log_stalled.store(stalled, Ordering::Relaxed);
    }

    /// Waits (briefly) for the log pump to copy what the daemon wrote
    /// before it exited.
    fn finish_log(&mut self) {
        self.stall_log(false);
        let deadline = Instant::now() + Duration::from_secs(5);
        if let Some(pump) = self.log_pump.take() {
            while !pump.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Waits until the log holds `text`. The daemon writes its log in
    /// batches from a thread of its own (up to 50 ms after the line), so a
    /// line can land after what a test waited on.
    pub fn wait_for_log(&self, text: &str) {
        self.wait_for_log_count(text, 1, Duration::from_secs(5));
    }

    /// Waits up to `within` until the log holds `text` at least `count`
    /// times.
    pub fn wait_for_log_count(&self, text: &str, count: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.log().matches(text).count() < count {
            assert!(
                Instant::now() < deadline,
                "the log never said {text:?} {count} times: {}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL: no chance to clean up, as in a crash.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.finish_log();
    }

    /// Waits for the daemon to exit on its own; its exit status.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let child = self.child.take().expect("running");
        let status = wait_with_timeout(child, timeout).status;
        self.finish_log();
        status
    }

    /// SIGTERM, then waits for a clean exit (final audit checkpoint).
    pub fn stop(&mut self) {
        self.signal("TERM");
        if let Some(child) = self.child.take() {
            let out = wait_with_timeout(child, Duration::from_secs(20));
            self.finish_log();
            assert!(out.status.success(), "gateway exit: {}", self.log());
        }
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Events recorded so far, from the audit store (through the daemon's
    /// audit.sock while it runs, else the store files): each event's own
    /// fields, flattened, plus `seq` and `at`.
    pub fn events(&self) -> Vec<Value> {
        if !self.dir.path().join("state/audit").exists() {
            return Vec::new();
        }
        let out = self.cli(&["audit", "events", "--json"]);
        assert!(
            out.status.success(),
            "audit events: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("audit events --json prints a JSON array")
    }

    /// All events, once every session recorded as started has ended: a
    /// session's statements are durable before its end is recorded, and
    /// both go with the writer's next commit, not at once.
    pub fn events_after_sessions_end(&self) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let events = self.events();
            let sessions = |kind: &str| -> std::collections::HashSet<String> {
                events
                    .iter()
                    .filter(|e| e["event"] == kind)
                    .map(|e| e["session"].to_string())
                    .collect()
            };
            let open = &sessions("session_start") - &sessions("session_end");
            if open.is_empty() {
                return events;
            }
            assert!(
                Instant::now() < deadline,
                "sessions {open:?} did not end; log: {}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until an event matching `pred` has been recorded.
    pub fn wait_for_event(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(e) = self.events().into_iter().find(|e| pred(e)) {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} event; events: {:#?}\nlog: {}",
                self.events(),
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(PORTCULLIS)
            .arg("--config")
            .arg(&self.config_path)
            .args(args)
            .output()
            .unwrap()
    }

    pub fn status_json(&self) -> Value {
        let out = self.cli(&["kernel", "status", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Program ids of the attached links, by program name.
    pub fn program_ids(&self) -> Vec<u64> {
        self.status_json()["programs"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["program_id"].as_u64())
            .collect()
    }

    pub fn detach(&self) -> Output {
        self.cli(&["kernel", "detach"])
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill9();
        let _ = Command::new(PORTCULLIS)
            .args(["kernel", "detach", "--pin-dir"])
            .arg(&self.pin_dir)
            .output();
        if self.pin_dir.exists() {
            let _ = std::fs::remove_dir_all(&self.pin_dir);
        }
    }
}

/// Copies the daemon's stderr into its log file, pausing while `stalled`.
fn pump_log(mut from: ChildStderr, mut to: std::fs::File, stalled: &AtomicBool) {
    let mut buf = [0; 8192];
    loop {
        while stalled.load(Ordering::Relaxed) {
            thread::sleep(Duration::from_millis(10));
        }
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// A tiny HTTP server on loopback answering every request with `body`;
/// counts the connections it accepted.
pub struct HttpUpstream {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl HttpUpstream {
    pub fn start(bind: &str, body: &'static str) -> Self {
        let listener = TcpListener::bind(bind).unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, halt) = (Arc::clone(&accepted), Arc::clone(&stop));
        thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        count.fetch_add(1, Ordering::Relaxed);
                        thread::spawn(move || serve_http(stream, body));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self {
            addr,
            accepted,
            stop,
        }
    }
}

impl Drop for HttpUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve_http(stream: TcpStream, body: &str) {
    stream.set_nonblocking(false).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    while reader.read_line(&mut line).unwrap_or(0) > 0 {
        if line == "\r\n" {
            break;
        }
        line.clear();
    }
    let mut stream = stream;
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// Reads everything a server sends after connecting directly (from the test
/// process, outside any test cgroup).
pub fn read_all_from(addr: SocketAddr) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf)?;
    Ok(buf)
}
