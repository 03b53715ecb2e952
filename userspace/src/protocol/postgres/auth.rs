//! Who the client is and what it may open: the resource it is reaching,
//! the principal behind it, and the grant that maps the principal to an
//! upstream role. Every refusal carries the SQLSTATE and a message that
//! tells the person what to do.

use std::{sync::Arc, time::SystemTime};

use bytes::BytesMut;
use pgwire::messages::startup::Authentication;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{startup::Startup, wire, PgError, PostgresGateway, Resource};
use crate::{
    identity::{IdentityError, Principal},
    protocol::SessionContext,
    resource::Grant,
};

/// A refusal to show the client as a FATAL ErrorResponse.
#[derive(Debug)]
pub struct Refusal {
    pub sqlstate: &'static str,
    pub message: String,
}

impl Refusal {
    fn new(sqlstate: &'static str, message: impl Into<String>) -> Self {
        Self {
            sqlstate,
            message: message.into(),
        }
    }
}

/// An authorized client.
pub struct Login<'a> {
    pub resource: &'a Arc<Resource>,
    pub principal: Principal,
    /// When the token the client presented expires; None for a principal
    /// from the uid's binding.
    pub token_expires: Option<SystemTime>,
    pub grant: &'a Grant,
    pub database: String,
}

/// Finds the resource, identifies the principal (asking for a token when the
/// kernel gave no uid binding) and picks its grant.
pub async fn login<'a>(
    ctx: &SessionContext,
    pg: &'a PostgresGateway,
    startup: &mut Startup,
) -> Result<Result<Login<'a>, Refusal>, PgError> {
    let requested_db = startup
        .param("database")
        .or(startup.param("user"))
        .unwrap_or("")
        .to_string();
    let resource = match &ctx.origin {
        Some(origin) => match pg.resource_at(origin.original_destination) {
            Some(r) => r,
            None => {
                return Ok(Err(Refusal::new(
                    "08004",
                    format!(
                        "{} is redirected to this gateway, but no PostgreSQL [[resource]] has that address: ask an administrator to add it",
                        origin.original_destination
                    ),
                )))
            }
        },
        None => match pg.resource_named(&requested_db) {
            Some(r) => r,
            None => {
                return Ok(Err(Refusal::new(
                    "3D000",
                    format!(
                        "no resource named \"{requested_db}\" on this gateway: connect with dbname set to a resource name"
                    ),
                )))
            }
        },
    };

    let (principal, token_expires) = match &ctx.principal {
        Some(p) => (p.clone(), None),
        None => {
            if ctx.origin.is_none() && !startup.tls {
                return Ok(Err(Refusal::new(
                    "28000",
                    "direct connections must be encrypted before a token is sent: connect with sslmode=require",
                )));
            }
            match ask_token(startup).await? {
                None => {
                    return Ok(Err(Refusal::new(
                        "28000",
                        "no identity: sign in with `portcullis login` and pass the token as the password",
                    )))
                }
                Some(token) => match ctx.gateway.identity.verify_token(&token).await {
                    Ok(verified) => (verified.principal, Some(verified.expires_at)),
                    Err(IdentityError::Rejected(reason)) => {
                        return Ok(Err(Refusal::new(
                            "28000",
                            format!("token refused: {reason}; sign in again with `portcullis login`"),
                        )))
                    }
                    Err(e @ IdentityError::Unavailable(_)) => {
                        return Ok(Err(Refusal::new(
                            "28000",
                            format!("cannot verify the token now ({e}); try again shortly"),
                        )))
                    }
                },
            }
        }
    };

    let Some(grant) = resource.config.grant_for(&principal, startup.param("user")) else {
        let roles = if principal.roles.is_empty() {
            "no roles".to_string()
        } else {
            format!("roles {}", principal.roles.join(", "))
        };
        return Ok(Err(Refusal::new(
            "42501",
            format!(
                "permission denied: {} ({roles}) has no grant on resource \"{}\"; ask an administrator to grant one of your roles access",
                principal.subject, resource.config.name
            ),
        )));
    };

    let database = match (&resource.config.database, &ctx.origin) {
        (Some(db), None) => db.clone(),
        (Some(db), Some(_)) if *db != requested_db => {
            return Ok(Err(Refusal::new(
                "42501",
                format!(
                    "resource \"{}\" only allows database \"{db}\", not \"{requested_db}\"",
                    resource.config.name
                ),
            )))
        }
        (Some(db), Some(_)) => db.clone(),
        (None, None) => grant.upstream_user.clone(),
        (None, Some(_)) => requested_db,
    };
    Ok(Ok(Login {
        resource,
        principal,
        token_expires,
        grant,
        database,
    }))
}

/// AuthenticationCleartextPassword, then the client's password message;
/// None if the client sent an empty one.
async fn ask_token(startup: &mut Startup) -> Result<Option<String>, PgError> {
    let mut out = BytesMut::new();
    wire::encode(&Authentication::CleartextPassword, &mut out);
    startup.stream.write_all(&out).await?;
    startup.stream.flush().await?;
    let mut header = [0u8; 5];
    startup.stream.read_exact(&mut header).await?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if header[0] != b'p' || !(5..=wire::MAX_STARTUP).contains(&len) {
        return Err(PgError::Protocol(
            "expected a password message in answer to the password request".into(),
        ));
    }
    let mut body = vec![0u8; len - 4];
    startup.stream.read_exact(&mut body).await?;
    let token = wire::Reader::new(&body, "PasswordMessage").cstr()?;
    Ok((!token.is_empty()).then_some(token))
}
