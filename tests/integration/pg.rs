//! The tests' PostgreSQL upstream: a throwaway cluster (`portcullis-testkit`)
//! with a role for each method the gateway logs in with upstream:
//! scram-sha-256 (the superuser), md5, cleartext and, over TLS, a client
//! certificate.

use std::{
    ops::Deref,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use portcullis_testkit::postgres::{Cluster, Setup};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

use crate::harness::self_signed;

/// The upstream superuser's password (scram-sha-256).
pub const PG_PASSWORD: &str = "upstream-Secret-42";
/// Roles created for the other authentication methods.
pub const MD5_ROLE: &str = "md5user";
pub const PLAIN_ROLE: &str = "plainuser";
/// Logs in with a client certificate alone (`cert` in pg_hba.conf), over TLS.
pub const CERT_ROLE: &str = "certuser";

/// Where `cargo xtask setup` unpacked libpq 18: psql runs on it with
/// `LD_LIBRARY_PATH` set here, for what Debian 12's libpq 15 cannot do
/// (`sslnegotiation=direct`).
pub fn newer_libpq() -> PathBuf {
    let libs = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/clients/psycopg-binary/psycopg_binary.libs");
    assert!(
        libs.join("libpq.so.5").exists(),
        "no libpq 18 in {}: run `cargo xtask setup` (x86_64)",
        libs.display()
    );
    libs
}

/// A client certificate and its key (mode 0600), signed by the CA the
/// cluster trusts for client certificates.
pub struct ClientCertificate {
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub struct PgCluster {
    cluster: Cluster,
    /// Present when started with TLS: the server's self-signed certificate.
    pub cert: Option<PathBuf>,
    /// Present when started with TLS: a client certificate for
    /// [`CERT_ROLE`], and one the same CA made for another name.
    pub client_certificates: Option<(ClientCertificate, ClientCertificate)>,
    _tls: Option<tempfile::TempDir>,
}

impl PgCluster {
    /// Starts a cluster; with `tls`, ssl = on with a certificate for
    /// 127.0.0.1 and `orders-db.test` made by `portcullis tls self-signed`.
    pub fn start_with(tls: bool) -> Self {
        let tls_dir = tls.then(|| {
            let dir = tempfile::tempdir().unwrap();
            self_signed(dir.path(), &["127.0.0.1", "orders-db.test"]);
            dir
        });
        let pair = tls_dir
            .as_ref()
            .map(|d| (d.path().join("cert.pem"), d.path().join("key.pem")));
        let client_ca = tls_dir.as_ref().map(|d| d.path().join("client-ca.pem"));
        let client_certificates = client_ca.as_deref().map(|ca| {
            let dir = ca.parent().unwrap();
            let [right, wrong] = client_certificates(ca, dir, [CERT_ROLE, "someone-else"]);
            (right, wrong)
        });
        // Most specific first: the certificate (over TLS only), md5 and
        // cleartext roles, then SCRAM.
        let certificate_line = if tls {
            format!("hostssl all {CERT_ROLE} 127.0.0.1/32 cert\n")
        } else {
            String::new()
        };
        let hba = format!(
            "{certificate_line}host all {MD5_ROLE} 127.0.0.1/32 md5\n\
             host all {PLAIN_ROLE} 127.0.0.1/32 password\nhost all all 127.0.0.1/32 scram-sha-256\n"
        );
        let cluster = Cluster::start(&Setup {
            password: PG_PASSWORD,
            hba: &hba,
            tls: pair.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
            client_ca: client_ca.as_deref(),
            ..Setup::default()
        });
        cluster.sql(&format!(
            "SET password_encryption = 'md5'; CREATE ROLE {MD5_ROLE} LOGIN SUPERUSER PASSWORD '{PG_PASSWORD}';\
             RESET password_encryption; CREATE ROLE {PLAIN_ROLE} LOGIN SUPERUSER PASSWORD '{PG_PASSWORD}';\
             CREATE ROLE {CERT_ROLE} LOGIN SUPERUSER;"
        ));
        Self {
            cluster,
            cert: pair.map(|(cert, _)| cert),
            client_certificates,
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

/// Writes a CA to `ca` and, into `dir`, a client certificate it signed for
/// each common name.
fn client_certificates<const N: usize>(
    ca: &Path,
    dir: &Path,
    names: [&str; N],
) -> [ClientCertificate; N] {
    let ca_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "portcullis test client CA");
    let ca_cert = params.self_signed(&ca_key).unwrap();
    std::fs::write(ca, ca_cert.pem()).unwrap();
    names.map(|name| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.signed_by(&key, &ca_cert, &ca_key).unwrap();
        let certificate = ClientCertificate {
            cert: dir.join(format!("client-{name}.pem")),
            key: dir.join(format!("client-{name}.key")),
        };
        std::fs::write(&certificate.cert, cert.pem()).unwrap();
        std::fs::write(&certificate.key, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&certificate.key, std::fs::Permissions::from_mode(0o600)).unwrap();
        certificate
    })
}

/// The cluster's own methods: `port`, `dir()`, `addr()`, `sql()`, `log()`.
impl Deref for PgCluster {
    type Target = Cluster;

    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}
