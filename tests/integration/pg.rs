//! A throwaway PostgreSQL cluster for tests: initdb into a temp dir as the
//! `postgres` user, a free loopback port, unix sockets in the temp dir,
//! password authentication (scram-sha-256, plus an md5 and a cleartext
//! role) for TCP clients. Dropping it stops the server.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::harness::{free_port, PORTCULLIS};

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// The upstream superuser's password (scram-sha-256).
pub const PG_PASSWORD: &str = "upstream-Secret-42";
/// Roles created for the other authentication methods.
pub const MD5_ROLE: &str = "md5user";
pub const PLAIN_ROLE: &str = "plainuser";

pub struct PgCluster {
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// Present when started with TLS: the server's self-signed certificate.
    pub cert: Option<PathBuf>,
    child: Option<Child>,
}

impl PgCluster {
    /// Starts a cluster; with `tls`, ssl = on with a certificate for
    /// 127.0.0.1 made by `portcullis tls self-signed`.
    pub fn start_with(tls: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        chown_postgres(dir.path());
        let data = dir.path().join("data");
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, PG_PASSWORD).unwrap();
        chown_postgres(&pwfile);
        as_postgres(
            &format!("{PG_BIN}/initdb"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--pwfile",
                pwfile.to_str().unwrap(),
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        let port = free_port();
        let mut conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             fsync = off\nsynchronous_commit = off\nmax_connections = 200\nshared_buffers = 64MB\n",
            dir.path().display()
        );
        let mut cert = None;
        if tls {
            let tls_dir = dir.path().join("tls");
            let out = Command::new(PORTCULLIS)
                .args(["tls", "self-signed", "--out"])
                .arg(&tls_dir)
                .args(["--name", "127.0.0.1"])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            chown_postgres(&tls_dir);
            chown_postgres(&tls_dir.join("cert.pem"));
            chown_postgres(&tls_dir.join("key.pem"));
            conf.push_str(&format!(
                "ssl = on\nssl_cert_file = '{0}/cert.pem'\nssl_key_file = '{0}/key.pem'\n",
                tls_dir.display()
            ));
            cert = Some(tls_dir.join("cert.pem"));
        }
        append(&data.join("postgresql.conf"), &conf);
        // Most specific first: the md5 and cleartext roles, then SCRAM.
        let hba = format!(
            "local all all trust\nhost all {MD5_ROLE} 127.0.0.1/32 md5\n\
             host all {PLAIN_ROLE} 127.0.0.1/32 password\nhost all all 127.0.0.1/32 scram-sha-256\n"
        );
        std::fs::write(data.join("pg_hba.conf"), hba).unwrap();
        chown_postgres(&data.join("pg_hba.conf"));
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        chown_postgres(&dir.path().join("server.log"));
        let child = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(format!("{PG_BIN}/postgres"))
            .arg("-D")
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut cluster = Self {
            dir,
            port,
            cert,
            child: Some(child),
        };
        cluster.wait_ready();
        cluster.sql(&format!(
            "SET password_encryption = 'md5'; CREATE ROLE {MD5_ROLE} LOGIN SUPERUSER PASSWORD '{PG_PASSWORD}';\
             RESET password_encryption; CREATE ROLE {PLAIN_ROLE} LOGIN SUPERUSER PASSWORD '{PG_PASSWORD}';"
        ));
        cluster
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new(format!("{PG_BIN}/pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"])
                .status()
                .unwrap();
            if out.success() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("postgres exited with {status}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "postgres not ready: {}",
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Runs SQL as the superuser over the unix socket (not through the
    /// gateway); returns unaligned, tuples-only output.
    pub fn sql(&self, sql: &str) -> String {
        let out = Command::new("runuser")
            .args([
                "-u",
                "postgres",
                "--",
                "psql",
                "-X",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
            ])
            .arg(self.dir.path())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-Atc",
                sql,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Writes a 0600 secret file holding `password` and returns its path.
    pub fn secret_file(&self, name: &str, password: &str) -> PathBuf {
        let path = self.dir.path().join(format!("secret-{name}"));
        std::fs::write(&path, format!("{password}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            // runuser forwards SIGTERM (smart shutdown) is too slow with
            // clients left; SIGINT to the postmaster is the fast shutdown.
            let pid_file = self.dir.path().join("data/postmaster.pid");
            if let Some(pid) = std::fs::read_to_string(pid_file)
                .ok()
                .and_then(|t| t.lines().next().map(str::to_string))
            {
                let _ = Command::new("kill").args(["-INT", &pid]).status();
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut child = child;
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn chown_postgres(path: &Path) {
    let status = Command::new("chown")
        .arg("postgres:postgres")
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success());
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

fn as_postgres(program: &str, args: &[&str]) -> Output {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--", program])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{program}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
