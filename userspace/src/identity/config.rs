//! The `[identity]` section of the configuration: which OpenID Connect
//! provider vouches for people and service accounts, and how its groups map
//! to gateway roles.
//!
//! ```toml
//! [identity]
//! issuer = "https://login.example.com/realms/ops"
//! client_id = "portcullis"
//! audience = ["portcullis", "urn:portcullis"]
//! groups_claim = "groups"
//! clock_skew_seconds = 60
//! control_socket = "/run/portcullis/control.sock"
//! end_sessions_with_identity = true   # a logout or expiry ends open sessions
//!
//! [identity.roles]
//! engineers = ["eng"]
//! dba = ["db-admins"]
//! ```
//!
//! Nothing here is provider-specific: every provider differs only in these
//! values.

use std::{collections::BTreeMap, path::PathBuf};

use serde::Deserialize;

/// Where `portcullis login`, `whoami` and `logout` reach the daemon.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/portcullis/control.sock";

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// The provider's issuer URL, exactly as in its discovery document.
    /// https, or http for a loopback address only.
    pub issuer: String,
    /// The client `portcullis login` signs in as (a public client allowed
    /// the device grant and refresh tokens).
    pub client_id: String,
    /// PEM certificates to trust for the provider besides the Mozilla
    /// roots (a provider behind a private CA). Must be readable by the
    /// users who run `portcullis login`.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// A file (root-only) holding the client secret, for providers that
    /// require client authentication when the daemon refreshes a login.
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// Accepted `aud` values besides `client_id` (e.g. the resource that
    /// access tokens for the gateway are issued for).
    #[serde(default)]
    pub audience: Vec<String>,
    /// The claim holding the caller's groups.
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// Tolerance for clocks that disagree with the provider's.
    #[serde(default = "default_clock_skew")]
    pub clock_skew_seconds: u64,
    /// The daemon's Unix control socket.
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// Scopes `portcullis login` asks for; `offline_access` makes the
    /// provider issue a refresh token, so the daemon renews logins.
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
    /// Resource indicator (RFC 8707) sent with client-credentials requests,
    /// for providers that issue JWT access tokens per resource.
    #[serde(default)]
    pub resource: Option<String>,
    /// `claim=value` marking a token as a service account's, for providers
    /// where `sub` is not the client id in client-credentials tokens (for
    /// example `idtyp=app`). See [`crate::identity`] for the full rule.
    #[serde(default)]
    pub service_claim: Option<String>,
    /// Role name -> provider groups granting it.
    #[serde(default)]
    pub roles: BTreeMap<String, Vec<String>>,
    /// Sessions end with the identity they were admitted on: the uid's
    /// binding (logout, expiry, a refused refresh, another identity's
    /// login) or the token the client presented (its expiry). Off, a
    /// session admitted once runs until the client or upstream ends it.
    #[serde(default = "default_end_sessions_with_identity")]
    pub end_sessions_with_identity: bool,
}

fn default_end_sessions_with_identity() -> bool {
    true
}

fn default_groups_claim() -> String {
    "groups".into()
}

fn default_clock_skew() -> u64 {
    60
}

fn default_control_socket() -> PathBuf {
    PathBuf::from(DEFAULT_CONTROL_SOCKET)
}

fn default_scopes() -> Vec<String> {
    ["openid", "profile", "email", "offline_access"]
        .map(String::from)
        .to_vec()
}

impl IdentityConfig {
    /// Checks what serde cannot: URL scheme, non-empty names.
    pub fn validate(&self) -> Result<(), String> {
        super::http::issuer_url(&self.issuer)?;
        if self.client_id.trim().is_empty() {
            return Err(
                "[identity] client_id is empty: set the client registered for `portcullis login`"
                    .into(),
            );
        }
        if self.groups_claim.trim().is_empty() {
            return Err("[identity] groups_claim is empty: name the claim holding groups (usually \"groups\")".into());
        }
        if !self.scopes.iter().any(|s| s == "openid") {
            return Err(
                "[identity] scopes must include \"openid\": the daemon verifies the ID token"
                    .into(),
            );
        }
        if self.clock_skew_seconds > 600 {
            return Err(format!(
                "[identity] clock_skew_seconds = {} is more than 600: fix the clocks (NTP) instead",
                self.clock_skew_seconds
            ));
        }
        if let Some(text) = &self.service_claim {
            let (claim, value) = text.split_once('=').unwrap_or((text, "x"));
            if claim.trim().is_empty() || value.trim().is_empty() {
                return Err(format!(
                    "[identity] service_claim = '{text}' is not `claim` or `claim=value` (examples: \"idtyp=app\", \"client_id\")"
                ));
            }
        }
        for (role, groups) in &self.roles {
            if role.trim().is_empty() || groups.iter().any(|g| g.trim().is_empty()) {
                return Err(format!(
                    "[identity.roles] '{role}': role and group names must not be empty"
                ));
            }
        }
        Ok(())
    }

    /// The parsed `service_claim`: a claim name and the value it must
    /// have, or `None` for "present with any value".
    pub fn service_rule(&self) -> Option<(String, Option<String>)> {
        let text = self.service_claim.as_deref()?;
        Some(match text.split_once('=') {
            Some((claim, value)) => (claim.trim().to_string(), Some(value.trim().to_string())),
            None => (text.trim().to_string(), None),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str) -> Result<IdentityConfig, String> {
        let config: IdentityConfig = toml::from_str(&format!(
            "issuer = \"https://idp.example/realms/ops\"\nclient_id = \"portcullis\"\n{extra}"
        ))
        .map_err(|e| e.to_string())?;
        config.validate().map(|()| config)
    }

    #[test]
    fn defaults_ask_for_refresh_tokens_and_use_the_groups_claim() {
        let c = parse("").unwrap();
        assert_eq!(c.groups_claim, "groups");
        assert_eq!(c.clock_skew_seconds, 60);
        assert_eq!(c.control_socket, PathBuf::from(DEFAULT_CONTROL_SOCKET));
        assert!(c.scopes.iter().any(|s| s == "offline_access"));
        assert_eq!(c.service_rule(), None);
    }

    #[test]
    fn mistakes_are_explained() {
        let http = toml::from_str::<IdentityConfig>(
            "issuer = \"http://idp.example\"\nclient_id = \"portcullis\"\n",
        )
        .unwrap()
        .validate()
        .unwrap_err();
        assert!(http.contains("loopback providers only"), "{http}");
        let no_openid = parse("scopes = [\"email\"]").unwrap_err();
        assert!(no_openid.contains("must include \"openid\""), "{no_openid}");
        let skew = parse("clock_skew_seconds = 3600").unwrap_err();
        assert!(skew.contains("fix the clocks"), "{skew}");
        let service = parse("service_claim = \"=app\"").unwrap_err();
        assert!(service.contains("claim=value"), "{service}");
        let role = parse("[roles]\ndba = [\"\"]").unwrap_err();
        assert!(role.contains("must not be empty"), "{role}");
        assert!(parse("unknown = 1").is_err());
    }

    #[test]
    fn service_claim_is_a_name_or_a_name_and_value() {
        assert_eq!(
            parse("service_claim = \"idtyp=app\"")
                .unwrap()
                .service_rule(),
            Some(("idtyp".into(), Some("app".into())))
        );
        assert_eq!(
            parse("service_claim = \"client_id\"")
                .unwrap()
                .service_rule(),
            Some(("client_id".into(), None))
        );
    }
}
