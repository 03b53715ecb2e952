//! Identity: who is behind a session.
//!
//! Every recorded action names a [`Principal`]: a person or a service
//! account, never a shared credential. Where the principal comes from is an
//! [`IdentityProvider`]: the kernel-observed uid bound to an OIDC login, or a
//! token the client presents.
//!
//! With an `[identity]` section the gateway uses [`OidcIdentity`]: any
//! standard OpenID Connect provider, configured by issuer URL and client id
//! only. People sign in with `portcullis login` (device grant), which binds
//! them to their local uid; clients that carry a credential present a
//! token. Service accounts use client-credentials tokens (a token whose
//! `sub` is its own client, or that carries `service_claim`). Without one, [`UnixIdentity`] names the local
//! account.

mod bindings;
mod config;
mod discovery;
pub mod flows;
mod http;
mod jwks;
mod oidc;
mod principal;
mod unix;
mod verified;
mod verify;

use std::{future::Future, pin::Pin};

use serde::{Deserialize, Serialize};

pub use bindings::{unix_now, BindingInfo};
pub use config::{IdentityConfig, DEFAULT_CONTROL_SOCKET};
pub use flows::{LoginParams, LoginTokens};
pub use oidc::OidcIdentity;
pub use unix::UnixIdentity;

/// A person or a service account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    /// Stable identifier: the OIDC `sub` (qualified by issuer), or `unix:<name>`.
    pub subject: String,
    /// What people read: e-mail, preferred user name or login name.
    pub name: String,
    pub kind: PrincipalKind,
    /// Gateway roles (engineers, dba, approvers, auditors, ...).
    pub roles: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrincipalKind {
    Person,
    /// Automation or an AI agent (client-credentials tokens).
    Service,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The token was refused; the message is safe to show to the client.
    #[error("{0}")]
    Rejected(String),
    #[error("identity provider unavailable: {0}")]
    Unavailable(String),
}

pub type IdentityFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Resolves principals for sessions.
pub trait IdentityProvider: Send + Sync {
    /// The principal bound to a local uid (from `portcullis login`), if any.
    fn principal_for_uid(&self, uid: u32) -> IdentityFuture<'_, Option<Principal>>;

    /// Verifies a token a client presented (as password, Bearer, ...).
    fn verify_token<'a>(
        &'a self,
        token: &'a str,
    ) -> IdentityFuture<'a, Result<Principal, IdentityError>>;
}
