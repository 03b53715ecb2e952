//! Protected resources: the upstreams the gateway holds credentials for, and
//! which gateway roles may use them as which upstream role.
//!
//! ```toml
//! [[resource]]
//! name = "orders"
//! protocol = "postgres"
//! address = "10.0.0.5:5432"
//! database = "orders"            # optional: the only database allowed
//! tls = "verify-full"            # disable | require | verify-ca | verify-full
//! ca_file = "/etc/portcullis/orders-ca.pem"
//! server_name = "orders-db.internal"  # optional: the certificate's name
//!
//! [[resource.grant]]
//! roles = ["dba"]                # gateway roles, "*" for any principal
//! users = ["unix:alice"]         # or principals by subject or name
//! upstream_user = "postgres"
//! password_file = "/etc/portcullis/secrets/orders-dba"
//! client_cert_file = "/etc/portcullis/orders-dba.pem"    # optional, over TLS
//! client_key_file = "/etc/portcullis/secrets/orders-dba.key"
//! ```
//!
//! Secrets (passwords and client keys) live in files readable only by the
//! service: a group- or world-readable file is refused, so a misconfigured
//! permission fails closed instead of leaking them to every local user.
//! Password files are read when a session needs them, so rotating a
//! password needs no restart; client certificates are loaded with the
//! configuration (at start and on reload).

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::{
    config::Protocol,
    identity::Principal,
    secret::{read_secret, SecretError},
};

/// One protected upstream.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ResourceConfig {
    pub name: String,
    pub protocol: Protocol,
    /// Where the upstream listens; also the destination redirected clients
    /// connect to, which is how their resource is found.
    pub address: SocketAddr,
    /// The only database clients may open; any when omitted.
    #[serde(default)]
    pub database: Option<String>,
    #[serde(default)]
    pub tls: UpstreamTls,
    /// PEM CA certificates for `tls = "verify-ca"` and `"verify-full"`.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The name the upstream's certificate must carry under `tls =
    /// "verify-full"` (and the name sent in the TLS handshake), as libpq
    /// checks the host name; by default the address's IP. Certificates
    /// usually name the database's DNS name, not its IP.
    #[serde(default)]
    pub server_name: Option<String>,
    #[serde(default, rename = "grant")]
    pub grants: Vec<Grant>,
    /// PostgreSQL: upstream connections kept idle, per upstream role,
    /// database and client start-up parameters, for the next session to
    /// take instead of logging in anew (reset with `DISCARD ALL` in
    /// between); 0 turns reuse off.
    #[serde(default = "default_upstream_pool")]
    pub upstream_pool: usize,
}

fn default_upstream_pool() -> usize {
    10
}

/// TLS towards the upstream, named as libpq's sslmode.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamTls {
    /// Plain TCP (for upstreams on loopback or a trusted network).
    #[default]
    Disable,
    /// Encrypted, certificate not checked (like libpq's sslmode=require).
    Require,
    /// Encrypted, certificate chain checked against `ca_file`, whatever
    /// name it carries (like libpq's sslmode=verify-ca).
    VerifyCa,
    /// Encrypted, certificate checked against `ca_file` and `server_name`
    /// (by default the address).
    VerifyFull,
}

impl UpstreamTls {
    /// As written in the config file.
    pub fn name(self) -> &'static str {
        match self {
            UpstreamTls::Disable => "disable",
            UpstreamTls::Require => "require",
            UpstreamTls::VerifyCa => "verify-ca",
            UpstreamTls::VerifyFull => "verify-full",
        }
    }
}

/// Which principals may use a resource, and as which upstream role.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// Gateway roles; `"*"` matches every identified principal.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Principals by subject (`unix:alice`, an OIDC subject) or name.
    #[serde(default)]
    pub users: Vec<String>,
    pub upstream_user: String,
    /// The upstream password (SCRAM-SHA-256, MD5 or cleartext); optional
    /// when the grant logs in with a client certificate alone.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// A PEM client certificate presented to the upstream over TLS, for
    /// PostgreSQL's `cert` authentication (or `clientcert=verify-full`):
    /// its CN names `upstream_user`.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// The PEM private key of `client_cert_file`, mode 0600.
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
}

/// A grant's client certificate and key files.
pub struct ClientCertificate<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
}

impl Grant {
    /// Whether `principal` is covered by this grant.
    pub fn allows(&self, principal: &Principal) -> bool {
        self.roles
            .iter()
            .any(|r| r == "*" || principal.roles.contains(r))
            || self
                .users
                .iter()
                .any(|u| *u == principal.subject || *u == principal.name)
    }

    /// The upstream password, read now from its file; None when the grant
    /// has no password file.
    pub fn password(&self) -> Result<Option<String>, SecretError> {
        self.password_file.as_deref().map(read_secret).transpose()
    }

    /// The client certificate the grant logs in with, if it has one.
    pub fn client_certificate(&self) -> Option<ClientCertificate<'_>> {
        Some(ClientCertificate {
            cert: self.client_cert_file.as_deref()?,
            key: self.client_key_file.as_deref()?,
        })
    }
}

impl ResourceConfig {
    /// The grant `principal` uses: the one whose upstream role the client
    /// asked for, else the first that allows it.
    pub fn grant_for(&self, principal: &Principal, requested_user: Option<&str>) -> Option<&Grant> {
        let mut allowed = self.grants.iter().filter(|g| g.allows(principal));
        let first = allowed.clone().next();
        requested_user
            .and_then(|user| allowed.find(|g| g.upstream_user == user))
            .or(first)
    }
}

/// Checks the `[[resource]]` entries; the message says what to fix.
pub fn validate(resources: &[ResourceConfig]) -> Result<(), String> {
    let mut names = HashSet::new();
    let mut addresses = HashSet::new();
    for r in resources {
        if !names.insert(r.name.as_str()) {
            return Err(format!(
                "two resources are named '{}'; resource names must be unique",
                r.name
            ));
        }
        if !addresses.insert((r.protocol, r.address)) {
            return Err(format!(
                "resource '{}': another {} resource already has address {}; a redirected client could not tell them apart",
                r.name,
                r.protocol.name(),
                r.address
            ));
        }
        if r.protocol != Protocol::Postgres {
            return Err(format!(
                "resource '{}': protocol = \"{}\" has no resource support; use \"postgres\"",
                r.name,
                r.protocol.name()
            ));
        }
        let verifies = matches!(r.tls, UpstreamTls::VerifyCa | UpstreamTls::VerifyFull);
        if verifies && r.ca_file.is_none() {
            return Err(format!(
                "resource '{}': tls = \"{}\" needs ca_file (the CA that signed the upstream's certificate)",
                r.name,
                r.tls.name()
            ));
        }
        if let Some(name) = &r.server_name {
            if r.tls == UpstreamTls::Disable {
                return Err(format!(
                    "resource '{}': server_name is the name checked in the upstream's certificate; \
                     set tls = \"verify-full\" (or remove server_name)",
                    r.name
                ));
            }
            if rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
                return Err(format!(
                    "resource '{}': server_name = \"{name}\" is not a DNS name or IP address",
                    r.name
                ));
            }
        }
        for (i, g) in r.grants.iter().enumerate() {
            let grant = format!("resource '{}' grant #{}", r.name, i + 1);
            if g.roles.is_empty() && g.users.is_empty() {
                return Err(format!(
                    "{grant}: set roles (or \"*\") or users, else it grants nothing"
                ));
            }
            if g.client_cert_file.is_some() != g.client_key_file.is_some() {
                return Err(format!(
                    "{grant}: set both client_cert_file and client_key_file, or neither"
                ));
            }
            if g.client_cert_file.is_some() && r.tls == UpstreamTls::Disable {
                return Err(format!(
                    "{grant}: a client certificate is presented over TLS; set tls = \"verify-full\" on the resource"
                ));
            }
            if g.password_file.is_none() && g.client_cert_file.is_none() {
                return Err(format!(
                    "{grant}: set password_file (or client_cert_file and client_key_file), the credentials the gateway logs in to '{}' with",
                    g.upstream_user
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::Config, identity::PrincipalKind};

    const SAMPLE: &str = r#"
        [[resource]]
        name = "orders"
        protocol = "postgres"
        address = "127.0.0.1:5432"

        [[resource.grant]]
        roles = ["dba"]
        upstream_user = "postgres"
        password_file = "/nonexistent"

        [[resource.grant]]
        users = ["unix:root"]
        upstream_user = "reader"
        password_file = "/nonexistent"
    "#;

    fn principal(subject: &str, roles: &[&str]) -> Principal {
        Principal {
            subject: subject.into(),
            name: subject.trim_start_matches("unix:").into(),
            kind: PrincipalKind::Person,
            roles: roles.iter().map(|r| r.to_string()).collect(),
        }
    }

    #[test]
    fn grants_match_roles_and_users() {
        let config = Config::parse(SAMPLE).unwrap();
        let r = &config.resources[0];
        let dba = principal("oidc:bob", &["dba"]);
        assert_eq!(r.grant_for(&dba, None).unwrap().upstream_user, "postgres");
        let root = principal("unix:root", &[]);
        assert_eq!(r.grant_for(&root, None).unwrap().upstream_user, "reader");
        assert!(r
            .grant_for(&principal("unix:eve", &["dev"]), None)
            .is_none());
        let both = principal("unix:root", &["dba"]);
        assert_eq!(
            r.grant_for(&both, Some("reader")).unwrap().upstream_user,
            "reader"
        );
    }

    #[test]
    fn verify_full_needs_a_ca() {
        let text = SAMPLE.replace(
            "address = \"127.0.0.1:5432\"",
            "address = \"127.0.0.1:5432\"\ntls = \"verify-full\"",
        );
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("needs ca_file"), "{err}");
        let text = text.replace("verify-full", "verify-ca");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("tls = \"verify-ca\" needs ca_file"), "{err}");
    }

    #[test]
    fn a_server_name_needs_tls_and_must_be_a_name() {
        let with = |extra: &str| {
            let text = SAMPLE.replace(
                "address = \"127.0.0.1:5432\"",
                &format!("address = \"127.0.0.1:5432\"\n{extra}"),
            );
            Config::parse(&text).map_err(|e| e.to_string())
        };
        let err = with("server_name = \"db.internal\"").unwrap_err();
        assert!(err.contains("set tls = \"verify-full\""), "{err}");
        let err = with("tls = \"require\"\nserver_name = \"not a name\"").unwrap_err();
        assert!(err.contains("is not a DNS name or IP address"), "{err}");
        let config = with("tls = \"require\"\nserver_name = \"db.internal\"").unwrap();
        assert_eq!(
            config.resources[0].server_name.as_deref(),
            Some("db.internal")
        );
    }

    #[test]
    fn a_grant_needs_credentials_and_a_client_certificate_needs_tls() {
        let with = |tls: &str, credentials: &str| {
            let text = format!(
                "[[resource]]\nname = \"orders\"\nprotocol = \"postgres\"\n\
                 address = \"127.0.0.1:5432\"\ntls = \"{tls}\"\n\
                 [[resource.grant]]\nroles = [\"dba\"]\nupstream_user = \"postgres\"\n{credentials}"
            );
            Config::parse(&text).map_err(|e| e.to_string())
        };
        let err = with("require", "").unwrap_err();
        assert!(err.contains("grant #1: set password_file"), "{err}");
        let err = with("require", "client_cert_file = \"/c.pem\"").unwrap_err();
        assert!(
            err.contains("both client_cert_file and client_key_file"),
            "{err}"
        );
        let pair = "client_cert_file = \"/c.pem\"\nclient_key_file = \"/k.pem\"";
        let err = with("disable", pair).unwrap_err();
        assert!(err.contains("presented over TLS"), "{err}");
        let config = with("require", pair).unwrap();
        let grant = &config.resources[0].grants[0];
        assert_eq!(grant.password().unwrap(), None);
        let certificate = grant.client_certificate().unwrap();
        assert_eq!(
            (certificate.cert, certificate.key),
            (Path::new("/c.pem"), Path::new("/k.pem"))
        );
    }
}
