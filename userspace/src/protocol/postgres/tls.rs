//! TLS on both sides of the PostgreSQL adapter (rustls, ring provider).
//!
//! Client side: the listener's certificate answers SSLRequest. Upstream side:
//! libpq's sslmode semantics: `require` (encrypted, unverified),
//! `verify-ca` (chain checked against the resource's CA file) or
//! `verify-full` (that, and the certificate checked for the resource's
//! `server_name`, by default its address).

use std::{
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

use crate::resource::{ResourceConfig, UpstreamTls};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read TLS file {path}: {reason}; generate a pair with `portcullis tls self-signed --out DIR`")]
    File { path: PathBuf, reason: String },
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

/// The listener's TLS configuration, from its PEM certificate and key.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = read_certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::File {
        path: key.to_owned(),
        reason: e.to_string(),
    })?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}

/// The TLS client configuration for `resource`, or None for `tls = "disable"`.
pub fn client_config(resource: &ResourceConfig) -> Result<Option<Arc<ClientConfig>>, TlsError> {
    let builder =
        ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let config = match resource.tls {
        UpstreamTls::Disable => return Ok(None),
        UpstreamTls::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Lenient {
                provider: provider(),
                chain: None,
            }))
            .with_no_client_auth(),
        UpstreamTls::VerifyCa => {
            let chain = WebPkiServerVerifier::builder_with_provider(roots(resource)?, provider())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Lenient {
                    provider: provider(),
                    chain: Some(chain),
                }))
                .with_no_client_auth()
        }
        UpstreamTls::VerifyFull => builder
            .with_root_certificates(roots(resource)?)
            .with_no_client_auth(),
    };
    Ok(Some(Arc::new(config)))
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
    fn missing_files_say_how_to_make_them() {
        let err = server_config(Path::new("/nonexistent/c"), Path::new("/nonexistent/k"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("portcullis tls self-signed"), "{err}");
    }
}
