//! TLS on both sides of the PostgreSQL adapter (rustls, ring provider).
//!
//! Client side: the listener's certificate answers SSLRequest. Upstream side:
//! libpq's sslmode semantics: `require` (encrypted, unverified),
//! `verify-ca` (chain checked against the resource's CA file) or
//! `verify-full` (that, and the certificate checked for the resource's
//! `server_name`, by default its address); and, for a grant that has one,
//! a client certificate presented to the upstream.

use std::{
    collections::HashMap,
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        WebPkiServerVerifier,
    },
    crypto::{ring, CryptoProvider},
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};

use crate::{
    resource::{Grant, ResourceConfig, UpstreamTls},
    secret::read_private,
};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read TLS file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{0}; generate a pair with `portcullis tls self-signed --out DIR`")]
    Listener(Box<TlsError>),
    #[error("client_cert_file {cert} and client_key_file {key} cannot be used together ({reason}); is the key the certificate's?")]
    ClientPair {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("TLS configuration rejected: {0}")]
    Config(#[from] rustls::Error),
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_err = |reason: String| TlsError::File {
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(file_err("no PEM certificate in it".into()));
    }
    Ok(certs)
}

/// PostgreSQL's ALPN protocol name.
pub const ALPN: &[u8] = b"postgresql";

/// The listener's TLS configuration, from its PEM certificate and key.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    listener_config(cert, key).map_err(|e| TlsError::Listener(Box::new(e)))
}

fn listener_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = read_certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::File {
        path: key.to_owned(),
        reason: e.to_string(),
    })?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    // As PostgreSQL 17 and later: a client that offers ALPN must offer
    // PostgreSQL's, and one that starts TLS directly must offer it.
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// The TLS client configurations of one resource: one without a client
/// certificate (sessions whose grant has none, and cancel requests), and
/// one per client certificate its grants present.
pub struct ClientTls {
    anonymous: Arc<ClientConfig>,
    /// By the grant's certificate and key files.
    certified: HashMap<(PathBuf, PathBuf), Arc<ClientConfig>>,
}

impl ClientTls {
    /// Loads the CA and the grants' client certificates and keys; None for
    /// `tls = "disable"`.
    pub fn load(resource: &ResourceConfig) -> Result<Option<Self>, TlsError> {
        let Some(verifier) = server_verifier(resource)? else {
            return Ok(None);
        };
        let builder = || {
            Ok::<_, TlsError>(
                ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()?
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::clone(&verifier)),
            )
        };
        let anonymous = Arc::new(builder()?.with_no_client_auth());
        let mut certified = HashMap::new();
        for certificate in resource.grants.iter().filter_map(Grant::client_certificate) {
            let files = (certificate.cert.to_owned(), certificate.key.to_owned());
            if certified.contains_key(&files) {
                continue;
            }
            let chain = read_certs(certificate.cert)?;
            let key = read_private_key(certificate.key)?;
            let config =
                builder()?
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| TlsError::ClientPair {
                        cert: certificate.cert.to_owned(),
                        key: certificate.key.to_owned(),
                        reason: e.to_string(),
                    })?;
            certified.insert(files, Arc::new(config));
        }
        Ok(Some(Self {
            anonymous,
            certified,
        }))
    }

    /// The configuration for a connection that logs in with `grant`, or,
    /// for None (a cancel request), with no client certificate.
    pub fn config(&self, grant: Option<&Grant>) -> Arc<ClientConfig> {
        let files = grant
            .and_then(Grant::client_certificate)
            .map(|c| (c.cert.to_owned(), c.key.to_owned()));
        let certified = files.and_then(|files| self.certified.get(&files));
        Arc::clone(certified.unwrap_or(&self.anonymous))
    }
}

/// How the upstream's certificate is checked, per the resource's `tls`
/// (None for `disable`).
fn server_verifier(
    resource: &ResourceConfig,
) -> Result<Option<Arc<dyn ServerCertVerifier>>, TlsError> {
    let chain = || {
        WebPkiServerVerifier::builder_with_provider(roots(resource)?, provider())
            .build()
            .map_err(|e| TlsError::Config(rustls::Error::General(e.to_string())))
    };
    Ok(Some(match resource.tls {
        UpstreamTls::Disable => return Ok(None),
        UpstreamTls::Require => Arc::new(Lenient {
            provider: provider(),
            chain: None,
        }),
        UpstreamTls::VerifyCa => Arc::new(Lenient {
            provider: provider(),
            chain: Some(chain()?),
        }),
        UpstreamTls::VerifyFull => chain()?,
    }))
}

/// A client key, from a file only the service may read.
fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let file_err = |reason: String| TlsError::File {
        path: path.to_owned(),
        reason,
    };
    let pem = read_private(path).map_err(|e| file_err(e.to_string()))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| file_err(e.to_string()))
}

/// The resource's CA certificates, for the modes that verify.
fn roots(resource: &ResourceConfig) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    // validate() guarantees ca_file where a mode verifies.
    let ca = resource.ca_file.as_deref().unwrap_or(Path::new(""));
    for cert in read_certs(ca)? {
        roots.add(cert)?;
    }
    Ok(Arc::new(roots))
}

/// The name the upstream certificate must carry: `server_name`, else the
/// address's IP.
pub fn upstream_name(resource: &ResourceConfig) -> ServerName<'static> {
    resource
        .server_name
        .as_deref()
        // validate() refuses a server_name that is not a name; without
        // one, the IP is checked, which a wrong name would fail closed.
        .and_then(|name| ServerName::try_from(name.to_owned()).ok())
        .unwrap_or_else(|| ServerName::IpAddress(resource.address.ip().into()))
}

/// The certificate checks of `tls = "require"` and `"verify-ca"`, which
/// are looser than rustls's own (`verify-full`). Handshake signatures are
/// checked in both, so the session is at least bound to the key the server
/// presented.
#[derive(Debug)]
struct Lenient {
    provider: Arc<CryptoProvider>,
    /// `verify-ca`: the chain is checked against the CA file (and its
    /// validity dates), the name is not, as libpq's sslmode=verify-ca.
    /// `None` for `require`: encryption without authentication of the
    /// server, as libpq's sslmode=require.
    chain: Option<Arc<WebPkiServerVerifier>>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            checked => checked,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Writes a self-signed certificate (`cert.pem`) and its key (`key.pem`,
/// mode 0600) for `names` (DNS names or IP addresses) into `out`.
pub fn write_self_signed(out: &Path, names: &[String]) -> Result<(PathBuf, PathBuf), TlsError> {
    let certified = rcgen::generate_simple_self_signed(names.to_vec())?;
    std::fs::create_dir_all(out).map_err(|source| TlsError::Write {
        path: out.to_owned(),
        source,
    })?;
    let cert_path = out.join("cert.pem");
    let key_path = out.join("key.pem");
    write_file(&cert_path, certified.cert.pem().as_bytes(), 0o644)?;
    write_file(
        &key_path,
        certified.key_pair.serialize_pem().as_bytes(),
        0o600,
    )?;
    Ok((cert_path, key_path))
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    let write_err = |source| TlsError::Write {
        path: path.to_owned(),
        source,
    };
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(write_err)?;
    file.write_all(data).map_err(write_err)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn self_signed_pair_loads_as_server_config() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) =
            write_self_signed(dir.path(), &["localhost".into(), "127.0.0.1".into()]).unwrap();
        server_config(&cert, &key).unwrap();
        let mode = std::fs::metadata(&key).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
    }

    #[test]
    fn client_certificates_load_with_the_config_and_fail_closed() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_self_signed(&dir.path().join("a"), &["client".into()]).unwrap();
        let (_, other_key) = write_self_signed(&dir.path().join("b"), &["other".into()]).unwrap();
        let with_pair = |cert: &Path, key: &Path| {
            let text = format!(
                "[[resource]]\nname = \"crm\"\nprotocol = \"postgres\"\n\
                 address = \"127.0.0.1:5432\"\ntls = \"require\"\n\
                 [[resource.grant]]\nroles = [\"*\"]\nupstream_user = \"crm\"\n\
                 client_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
                cert.display(),
                key.display()
            );
            let config = crate::config::Config::parse(&text).unwrap();
            ClientTls::load(&config.resources[0]).map(|tls| (tls, config))
        };
        let (tls, config) = with_pair(&cert, &key).unwrap();
        let tls = tls.unwrap();
        let grant = &config.resources[0].grants[0];
        assert!(Arc::ptr_eq(
            &tls.config(Some(grant)),
            tls.certified.values().next().unwrap()
        ));
        assert!(Arc::ptr_eq(&tls.config(None), &tls.anonymous));

        let err = with_pair(&cert, &other_key).err().unwrap().to_string();
        assert!(err.contains("is the key the certificate's?"), "{err}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = with_pair(&cert, &key).err().unwrap().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }

    #[test]
    fn missing_files_say_how_to_make_them() {
        let err = server_config(Path::new("/nonexistent/c"), Path::new("/nonexistent/k"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("portcullis tls self-signed"), "{err}");
    }
}
