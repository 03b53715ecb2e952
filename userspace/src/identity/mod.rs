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
//!
//! A session lasts no longer than the identity it was admitted on
//! ([`IdentityProvider::identity_ended`]): the uid binding (until logout,
//! expiry, a refresh the provider refuses, or another identity's login on
//! that uid), or the token the client presented (until it expires).

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

use std::{future::Future, pin::Pin, time::SystemTime};

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

/// The principal a client's token names, and when the token expires.
#[derive(Debug, Clone)]
pub struct TokenIdentity {
    pub principal: Principal,
    pub expires_at: SystemTime,
}

/// What a session's identity rests on, which decides when it ends.
#[derive(Debug, Clone)]
pub enum Admission {
    /// The uid's binding (from `portcullis login`) to this subject.
    Binding { uid: u32, subject: String },
    /// A token the client presented.
    Token { expires_at: SystemTime },
}

/// Resolves principals for sessions.
pub trait IdentityProvider: Send + Sync {
    /// The principal bound to a local uid (from `portcullis login`), if any.
    fn principal_for_uid(&self, uid: u32) -> IdentityFuture<'_, Option<Principal>>;

    /// Verifies a token a client presented (as password, Bearer, ...).
    fn verify_token<'a>(
        &'a self,
        token: &'a str,
    ) -> IdentityFuture<'a, Result<TokenIdentity, IdentityError>>;

    /// Whether sessions end with the identity they were admitted on (see
    /// [`IdentityProvider::identity_ended`]). Not by default: a local
    /// account does not sign out.
    fn ends_sessions(&self) -> bool {
        false
    }

    /// Resolves, with the reason, once a session admitted on `admission`
    /// must end because its identity has; asked only of a provider that
    /// [ends sessions](IdentityProvider::ends_sessions).
    fn identity_ended(&self, admission: Admission) -> IdentityFuture<'_, String> {
        let _ = admission;
        Box::pin(std::future::pending())
    }
}
