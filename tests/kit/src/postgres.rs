//! A throwaway PostgreSQL cluster: initdb into a temp dir as the `postgres`
//! user, a free port, unix sockets in the temp dir, the superuser's password
//! for TCP clients. Dropping it stops the server (fast shutdown).

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::{free_port, run};

/// Where the PostgreSQL 15 server binaries are (Debian's postgresql-15).
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// What a cluster offers its TCP clients.
pub struct Setup<'a> {
    /// The superuser's (`postgres`) password, stored as scram-sha-256.
    pub password: &'a str,
    /// `listen_addresses`: one address or several, comma-separated.
    pub listen: &'a str,
    /// `pg_hba.conf` lines for TCP clients, most specific first (local
    /// clients are trusted).
    pub hba: &'a str,
    /// A certificate and key to offer TLS with.
    pub tls: Option<(&'a Path, &'a Path)>,
    /// With `tls`: the CA whose client certificates the server accepts
    /// (`ssl_ca_file`), for `cert` lines in `hba`.
    pub client_ca: Option<&'a Path>,
    /// More `postgresql.conf` settings; later ones win.
    pub conf: &'a str,
}

impl Default for Setup<'_> {
    fn default() -> Self {
        Self {
            password: "upstream-Secret-42",
            listen: "127.0.0.1",
            hba: "host all all 127.0.0.0/8 scram-sha-256\n",
            tls: None,
            client_ca: None,
            conf: "",
        }
    }
}

pub struct Cluster {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Cluster {
    pub fn start(setup: &Setup) -> Self {
        let dir = tempfile::tempdir().expect("a temp dir");
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, setup.password).unwrap();
        let data = dir.path().join("data");
        run("chown", &["-R", "postgres:postgres", path(dir.path())]);
        as_postgres(&[
            &format!("{PG_BIN}/initdb"),
            "-D",
            path(&data),
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--pwfile",
            path(&pwfile),
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        let port = free_port();
        let mut conf = format!(
            "\nport = {port}\nlisten_addresses = '{}'\nunix_socket_directories = '{}'\n\
             fsync = off\nsynchronous_commit = off\nmax_connections = 200\nshared_buffers = 64MB\n",
            setup.listen,
            dir.path().display()
        );
        if let Some((cert, key)) = setup.tls {
            // The server reads server.crt and server.key in its data
            // directory, and only a key that it owns and no one else reads.
            std::fs::copy(cert, data.join("server.crt")).unwrap();
            std::fs::copy(key, data.join("server.key")).unwrap();
            for file in ["server.crt", "server.key"] {
                run("chown", &["postgres:postgres", path(&data.join(file))]);
            }
            run("chmod", &["600", path(&data.join("server.key"))]);
            conf.push_str("ssl = on\n");
            if let Some(ca) = setup.client_ca {
                std::fs::copy(ca, data.join("client-ca.crt")).unwrap();
                run(
                    "chown",
                    &["postgres:postgres", path(&data.join("client-ca.crt"))],
                );
                conf.push_str("ssl_ca_file = 'client-ca.crt'\n");
            }
        }
        conf.push_str(setup.conf);
        let mut postgresql_conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        postgresql_conf.push_str(&conf);
        std::fs::write(data.join("postgresql.conf"), postgresql_conf).unwrap();
        std::fs::write(
            data.join("pg_hba.conf"),
            format!("local all all trust\n{}", setup.hba),
        )
        .unwrap();
        let log = dir.path().join("server.log");
        let child = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(format!("{PG_BIN}/postgres"))
            .arg("-D")
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("runuser starts postgres");
        let mut cluster = Self {
            port,
            dir,
            child: Some(child),
        };
        cluster.wait_ready(setup.listen.split(',').next().unwrap_or("127.0.0.1"));
        cluster
    }

    fn wait_ready(&mut self, host: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new(format!("{PG_BIN}/pg_isready"))
                .args(["-q", "-h", host.trim(), "-p", &self.port.to_string()])
                .status()
                .expect("pg_isready");
            if ready.success() {
                return;
            }
            let exited = self.child.as_mut().and_then(|c| c.try_wait().unwrap());
            if let Some(status) = exited {
                panic!("postgres exited with {status}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "postgres not ready in 30 s: {}",
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The temp dir: the data directory, unix sockets, the server's log.
    /// Files the tests leave here go with the cluster.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// What the server wrote to stderr.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir().join("server.log")).unwrap_or_default()
    }

    /// Runs SQL as the superuser over the unix socket (not through any
    /// gateway); returns unaligned, tuples-only output, trimmed.
    pub fn sql(&self, sql: &str) -> String {
        let out = as_postgres(&[
            "psql",
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            path(self.dir()),
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-Atc",
            sql,
        ]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SIGINT to the postmaster is the fast shutdown; the SIGTERM that
        // runuser would forward waits for clients to leave.
        if let Some(pid) = std::fs::read_to_string(self.dir().join("data/postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next().map(str::to_string))
        {
            let _ = Command::new("kill").args(["-INT", &pid]).status();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn as_postgres(args: &[&str]) -> std::process::Output {
    let mut all = vec!["-u", "postgres", "--"];
    all.extend_from_slice(args);
    run("runuser", &all)
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}
