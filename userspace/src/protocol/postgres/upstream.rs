//! The gateway's own login to the upstream: TLS per the resource, then
//! SCRAM-SHA-256, MD5 or cleartext with the secret the gateway holds. The
//! client never sees that secret, nor the upstream's cancel key.

use std::sync::Arc;

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use bytes::BytesMut;
use md5::{Digest, Md5};
use pgwire::messages::startup::{Password, SASLInitialResponse, SASLResponse};
use ring::rand::{SecureRandom, SystemRandom};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;

use super::{
    scram::{self, Binding, Scram},
    tls,
    wire::{self, Reader},
    PgError, PgStream, Resource,
};
use crate::{proxy::upstream, resource::Grant};

/// Largest message accepted during the upstream's start-up.
const MAX_STARTUP_MESSAGE: usize = 1 << 20;

/// A logged-in upstream session, ready for queries.
pub struct Upstream {
    pub stream: PgStream,
    /// ParameterStatus (and start-up NoticeResponse) messages, as received,
    /// to replay to the client.
    pub greeting: BytesMut,
    pub pid: i32,
    pub secret: i32,
}

/// Connects and logs in as `grant.upstream_user` on `database`, passing the
/// client's other start-up parameters (application_name, options, ...).
pub async fn open(
    resource: &Resource,
    grant: &Grant,
    database: &str,
    client_params: &[(String, String)],
    mark: u32,
) -> Result<Upstream, PgError> {
    let password = grant
        .password()
        .map_err(|e| PgError::Config(format!("resource '{}': {e}", resource.config.name)))?;
    // Asked for only when the upstream asks for one: a grant may log in
    // with its client certificate alone.
    let password = |method: &str| {
        password.as_deref().ok_or_else(|| {
            PgError::Config(format!(
                "resource '{}': the upstream asks for a password ({method}) for '{}', and the grant has no password_file",
                resource.config.name, grant.upstream_user
            ))
        })
    };
    let (mut stream, server_certificate) = connect(resource, Some(grant), mark).await?;

    let mut startup = BytesMut::new();
    startup.extend_from_slice(&[0, 0, 0, 0, 0, 3, 0, 0]);
    let mut put = |k: &str, v: &str| {
        for s in [k, v] {
            startup.extend_from_slice(s.as_bytes());
            startup.extend_from_slice(&[0]);
        }
    };
    put("user", &grant.upstream_user);
    put("database", database);
    for (k, v) in client_params {
        if k != "user" && k != "database" && !k.contains('\0') && !v.contains('\0') {
            put(k, v);
        }
    }
    startup.extend_from_slice(&[0]);
    let len = (startup.len() as u32).to_be_bytes();
    startup[..4].copy_from_slice(&len);
    stream.write_all(&startup).await?;
    stream.flush().await?;

    let mut greeting = BytesMut::new();
    let mut key = None;
    let mut scram: Option<Scram> = None;
    loop {
        let (kind, body) = read_message(&mut stream).await?;
        match kind {
            b'R' => {
                let mut r = Reader::new(&body, "Authentication");
                let mut out = BytesMut::new();
                match r.i32()? {
                    0 => {}
                    3 => wire::encode(
                        &Password::new(password("cleartext")?.to_owned()),
                        &mut out,
                    ),
                    5 => {
                        let salt = r.bytes(4)?;
                        let md5 = md5_password(&grant.upstream_user, password("md5")?, salt);
                        wire::encode(&Password::new(md5), &mut out);
                    }
                    10 => {
                        let mut mechanisms = Vec::new();
                        while !r.is_empty() {
                            let m = r.cstr()?;
                            if m.is_empty() {
                                break;
                            }
                            mechanisms.push(m);
                        }
                        if !mechanisms.iter().any(|m| m == scram::MECHANISM) {
                            return Err(PgError::Upstream(format!(
                                "upstream offers SASL mechanisms {mechanisms:?}, none of which the gateway speaks (SCRAM-SHA-256)"
                            )));
                        }
                        let plus = mechanisms.iter().any(|m| m == scram::MECHANISM_PLUS);
                        let binding = match server_certificate.clone() {
                            Some(Some(hash)) if plus => Binding::ServerEndPoint(hash),
                            // Bindable, yet not offered: say so, so that a
                            // server that does offer it (a stripped list)
                            // refuses.
                            Some(Some(_)) => Binding::Unused,
                            // Plain TCP, or a certificate whose signature
                            // has no single hash: nothing to bind to.
                            None | Some(None) => Binding::None,
                        };
                        let s = Scram::new(password("scram-sha-256")?, nonce()?, binding);
                        wire::encode(
                            &SASLInitialResponse::new(
                                s.mechanism().into(),
                                Some(s.client_first().into_bytes().into()),
                            ),
                            &mut out,
                        );
                        scram = Some(s);
                    }
                    11 => {
                        let s = scram.as_mut().ok_or_else(|| {
                            PgError::Upstream("SASL continue without SASL start".into())
                        })?;
                        let reply = s.client_final(r.rest()).await?;
                        wire::encode(&SASLResponse::new(reply.into_bytes().into()), &mut out);
                    }
                    12 => {
                        let s = scram.as_ref().ok_or_else(|| {
                            PgError::Upstream("SASL final without SASL start".into())
                        })?;
                        s.verify_final(r.rest())?;
                    }
                    other => {
                        return Err(PgError::Upstream(format!(
                            "upstream asks for authentication method {other}, which the gateway does not speak (use scram-sha-256, md5 or password in pg_hba.conf)"
                        )))
                    }
                }
                if !out.is_empty() {
                    stream.write_all(&out).await?;
                    stream.flush().await?;
                }
            }
            b'E' => {
                let fields = wire::error_fields(&body)?;
                return Err(PgError::UpstreamRefused {
                    sqlstate: wire::field(&fields, b'C').unwrap_or("08004").to_string(),
                    message: wire::field(&fields, b'M').unwrap_or("").to_string(),
                });
            }
            b'S' | b'N' => {
                greeting.extend_from_slice(&[kind]);
                greeting.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
                greeting.extend_from_slice(&body);
            }
            b'K' => {
                let mut r = Reader::new(&body, "BackendKeyData");
                key = Some((r.i32()?, r.i32()?));
            }
            b'v' => {} // the upstream negotiated down; we asked for 3.0 anyway.
            b'Z' => {
                let (pid, secret) = key.unwrap_or((0, 0));
                return Ok(Upstream {
                    stream,
                    greeting,
                    pid,
                    secret,
                });
            }
            other => {
                return Err(PgError::Upstream(format!(
                    "unexpected message {:?} from the upstream during start-up",
                    char::from(other)
                )))
            }
        }
    }
}

/// A connection to the resource's upstream, over TLS when the resource asks
/// for it (`tls` other than `disable`): for a session logging in with
/// `grant` (presenting its client certificate, if it has one), and for a
/// cancel request (None), which carries the upstream backend's secret. Over
/// TLS, also the certificate hash SCRAM binds to, if it can.
pub(super) async fn connect(
    resource: &Resource,
    grant: Option<&Grant>,
    mark: u32,
) -> Result<(PgStream, Option<Option<Vec<u8>>>), PgError> {
    let address = resource.config.address;
    let tcp = upstream::connect(address, mark).await.map_err(|e| {
        PgError::Upstream(format!(
            "cannot reach resource '{}' at {address}: {e}",
            resource.config.name
        ))
    })?;
    match &resource.tls {
        None => Ok((PgStream::Plain(tcp), None)),
        Some(configs) => {
            let config = configs.config(grant);
            let (tls, hash) = start_tls(PgStream::Plain(tcp), config, resource).await?;
            Ok((tls, Some(hash)))
        }
    }
}

/// TLS with the upstream; also returns the `tls-server-end-point` hash of
/// its certificate (None when its signature has no single hash).
async fn start_tls(
    mut stream: PgStream,
    config: Arc<rustls::ClientConfig>,
    resource: &Resource,
) -> Result<(PgStream, Option<Vec<u8>>), PgError> {
    stream
        .write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await?;
    stream.flush().await?;
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).await?;
    if answer[0] != b'S' {
        return Err(PgError::Upstream(format!(
            "resource '{}' requires TLS (tls = \"{}\") but the upstream does not offer it; enable ssl in postgresql.conf or set tls = \"disable\"",
            resource.config.name, resource.config.tls.name()
        )));
    }
    let tls = TlsConnector::from(config)
        .connect(tls::upstream_name(&resource.config), stream)
        .await
        .map_err(|e| {
            PgError::Upstream(format!(
                "TLS with resource '{}' failed: {e}",
                resource.config.name
            ))
        })?;
    let hash = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| scram::certificate_hash(leaf));
    Ok((PgStream::tls(tls), hash))
}

/// One typed message from the upstream during start-up.
pub(super) async fn read_message(stream: &mut PgStream) -> Result<(u8, Vec<u8>), PgError> {
    let mut header = [0u8; 5];
    stream.read_exact(&mut header).await?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if !(4..=MAX_STARTUP_MESSAGE).contains(&len) {
        return Err(PgError::Upstream(format!(
            "upstream sent an invalid message length {len}: is it PostgreSQL?"
        )));
    }
    let mut body = vec![0u8; len - 4];
    stream.read_exact(&mut body).await?;
    Ok((header[0], body))
}

/// PostgreSQL's MD5 response: "md5" + md5(md5(password + user) + salt).
fn md5_password(user: &str, password: &str, salt: &[u8]) -> String {
    let inner = hex_digest(&[password.as_bytes(), user.as_bytes()]);
    format!("md5{}", hex_digest(&[inner.as_bytes(), salt]))
}

fn hex_digest(parts: &[&[u8]]) -> String {
    let mut h = Md5::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// 18 random bytes, base64: a SCRAM client nonce.
fn nonce() -> Result<String, PgError> {
    let mut bytes = [0u8; 18];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| PgError::Upstream("no randomness for the SCRAM nonce".into()))?;
    Ok(B64.encode(bytes))
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;
    use crate::{
        config::Protocol,
        resource::{ResourceConfig, UpstreamTls},
    };

    /// A grant with a client certificate and no password, against an
    /// upstream that asks for a password anyway: the login stops with an
    /// error that names what is missing, and sends nothing.
    #[tokio::test]
    async fn a_password_asked_of_a_grant_without_one_is_a_config_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let upstream = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let len = stream.read_u32().await.unwrap() as usize;
            stream.read_exact(&mut vec![0; len - 4]).await.unwrap();
            // AuthenticationCleartextPassword.
            stream
                .write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 3])
                .await
                .unwrap();
            let mut rest = Vec::new();
            stream.read_to_end(&mut rest).await.unwrap();
            rest
        });
        let grant = Grant {
            roles: vec!["*".into()],
            users: Vec::new(),
            upstream_user: "certuser".into(),
            password_file: None,
            client_cert_file: Some("/c.pem".into()),
            client_key_file: Some("/k.pem".into()),
        };
        let resource = Resource {
            config: ResourceConfig {
                name: "crm".into(),
                protocol: Protocol::Postgres,
                address,
                database: None,
                tls: UpstreamTls::Disable,
                ca_file: None,
                server_name: None,
                grants: vec![grant.clone()],
                upstream_pool: 0,
            },
            tls: None,
        };
        let err = open(&resource, &grant, "crm", &[], 0)
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("asks for a password (cleartext) for 'certuser', and the grant has no password_file"),
            "{err}"
        );
        assert_eq!(upstream.await.unwrap(), b"");
    }

    #[test]
    fn md5_matches_postgres() {
        // python3: 'md5' + md5(md5(b'secretalice').hexdigest() + 'salt')
        assert_eq!(
            md5_password("alice", "secret", b"salt"),
            "md5986e2194384c07f4fd1df4b1351b3e68"
        );
    }
}
