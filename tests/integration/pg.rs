//! The tests' PostgreSQL upstream: a throwaway cluster (`portcullis-testkit`)
//! with a role for each password method the gateway speaks upstream:
//! scram-sha-256 (the superuser), md5 and cleartext.

use std::{ops::Deref, os::unix::fs::PermissionsExt, path::PathBuf, process::Command};

use portcullis_testkit::postgres::{Cluster, Setup};

use crate::harness::PORTCULLIS;

/// The upstream superuser's password (scram-sha-256).
pub const PG_PASSWORD: &str = "upstream-Secret-42";
/// Roles created for the other authentication methods.
pub const MD5_ROLE: &str = "md5user";
pub const PLAIN_ROLE: &str = "plainuser";

pub struct PgCluster {
    cluster: Cluster,
    /// Present when started with TLS: the server's self-signed certificate.
    pub cert: Option<PathBuf>,
    _tls: Option<tempfile::TempDir>,
}

impl PgCluster {
    /// Starts a cluster; with `tls`, ssl = on with a certificate for
    /// 127.0.0.1 and `orders-db.test` made by `portcullis tls self-signed`.
    pub fn start_with(tls: bool) -> Self {
        let tls_dir = tls.then(|| {
            let dir = tempfile::tempdir().unwrap();
            let out = Command::new(PORTCULLIS)
                .args(["tls", "self-signed", "--out"])
                .arg(dir.path())
                .args(["--name", "127.0.0.1", "--name", "orders-db.test"])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            dir
        });
        let pair = tls_dir
            .as_ref()
            .map(|d| (d.path().join("cert.pem"), d.path().join("key.pem")));
        // Most specific first: the md5 and cleartext roles, then SCRAM.
        let hba = format!(
            "host all {MD5_ROLE} 127.0.0.1/32 md5\nhost all {PLAIN_ROLE} 127.0.0.1/32 password\n\
             host all all 127.0.0.1/32 scram-sha-256\n"
        );
        let cluster = Cluster::start(&Setup {
            password: PG_PASSWORD,
            hba: &hba,
            tls: pair.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
            ..Setup::default()
        });
        cluster.sql(&format!(
            "SET password_encryption = 'md5'; CREATE ROLE {MD5_ROLE} LOGIN SUPERUSER PASSWORD '{PG_PASSWORD}';\
             RESET password_encryption; CREATE ROLE {PLAIN_ROLE} LOGIN SUPERUSER PASSWORD '{PG_PASSWORD}';"
        ));
        Self {
            cluster,
            cert: pair.map(|(cert, _)| cert),
            _tls: tls_dir,
        }
    }

    /// Writes a 0600 secret file holding `password` and returns its path.
    pub fn secret_file(&self, name: &str, password: &str) -> PathBuf {
        let path = self.dir().join(format!("secret-{name}"));
        std::fs::write(&path, format!("{password}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }
}

/// The cluster's own methods: `port`, `dir()`, `addr()`, `sql()`, `log()`.
impl Deref for PgCluster {
    type Target = Cluster;

    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}
