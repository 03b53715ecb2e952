//! The PostgreSQL adapter: transparent to clients (psql, pgbench, libpq
//! drivers), identity-bound, recorded per statement.
//!
//! A session goes through:
//!
//! 1. [`startup`]: SSLRequest (TLS with the listener's certificate),
//!    GSSENCRequest (declined), CancelRequest ([`cancel`]), protocol version
//!    negotiation, the startup packet.
//! 2. [`auth`]: the resource (by original destination, or by database name
//!    for direct clients), the principal (uid binding, or a token sent as
//!    password), the grant that maps it to an upstream role.
//! 3. [`upstream`]: the gateway logs in with the secret it holds
//!    (SCRAM-SHA-256 via [`scram`], MD5 or cleartext), optionally over
//!    verified TLS ([`tls`]); or takes an upstream an earlier session left
//!    in the [`pool`].
//! 4. [`relay`]: bytes both ways with back-pressure; [`frame`] finds message
//!    boundaries and [`statements`] records each statement; with a policy,
//!    [`inspect`] judges statements and masks results on the way.
//!
//! Messages sent are encoded with pgwire; messages received are read with
//! the checked [`wire::Reader`].

mod auth;
mod cancel;
mod frame;
mod inspect;
mod pool;
mod relay;
mod scram;
mod startup;
mod statements;
mod stream;
pub mod tls;
mod upstream;
mod wire;

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use bytes::BytesMut;
use pgwire::messages::{
    response::{ReadyForQuery, TransactionStatus},
    startup::{Authentication, BackendKeyData, SecretKey},
};
use tokio::{io::AsyncWriteExt, net::TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn, Instrument};

pub use self::stream::PgStream;
use self::{
    cancel::{CancelKey, CancelRegistry},
    pool::{PoolKey, UpstreamPool},
    startup::Opening,
    upstream::Upstream,
};
use super::{IdentityEnded, SessionContext};
use crate::{
    audit::{AuditEvent, DatabaseLogin},
    config::{Config, Protocol},
    identity::Principal,
    resource::ResourceConfig,
};

/// Time a client has to negotiate, identify itself and be logged in
/// upstream (PostgreSQL's authentication_timeout is a minute too).
const LOGIN_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("protocol violation by the client: {0}")]
    ClientProtocol(String),
    #[error(transparent)]
    Malformed(#[from] wire::Malformed),
    #[error("client: {0}")]
    Client(String),
    #[error("upstream: {0}")]
    Upstream(String),
    #[error("upstream refused the gateway's login ({sqlstate}): {message}")]
    UpstreamRefused { sqlstate: String, message: String },
    #[error("upstream authentication: {0}")]
    Scram(#[from] scram::ScramError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Refused(String),
    #[error("the identity ended: {0}")]
    IdentityEnded(String),
}

/// A resource with its upstream TLS settings loaded.
pub struct Resource {
    pub config: ResourceConfig,
    tls: Option<tls::ClientTls>,
}

/// What the PostgreSQL adapter shares between sessions.
pub struct PostgresGateway {
    resources: Vec<Arc<Resource>>,
    /// TLS acceptor per PostgreSQL listener with a certificate.
    tls: HashMap<String, TlsAcceptor>,
    cancels: Arc<CancelRegistry>,
    pool: Arc<UpstreamPool>,
}

impl PostgresGateway {
    /// Loads certificates and CA files now, so a bad path fails start-up.
    pub fn from_config(config: &Config) -> Result<Self, PgError> {
        Self::sharing(config, Arc::default(), Arc::default())
    }

    /// The gateway for a reloaded configuration: new resources, grants and
    /// certificates for new sessions; the cancel keys of running sessions
    /// are kept, so their cancel requests still find them, and so are idle
    /// upstreams (a changed resource no longer matches theirs).
    pub fn reloaded(&self, config: &Config) -> Result<Self, PgError> {
        Self::sharing(config, Arc::clone(&self.cancels), Arc::clone(&self.pool))
    }

    fn sharing(
        config: &Config,
        cancels: Arc<CancelRegistry>,
        pool: Arc<UpstreamPool>,
    ) -> Result<Self, PgError> {
        let mut tls = HashMap::new();
        for l in &config.listeners {
            if let (Protocol::Postgres, Some(cert), Some(key)) =
                (l.protocol, &l.tls_cert, &l.tls_key)
            {
                let server = tls::server_config(cert, key)?;
                tls.insert(l.name.clone(), TlsAcceptor::from(server));
            }
        }
        let resources = config
            .resources
            .iter()
            .filter(|r| r.protocol == Protocol::Postgres)
            .map(|r| {
                Ok(Arc::new(Resource {
                    tls: tls::ClientTls::load(r)?,
                    config: r.clone(),
                }))
            })
            .collect::<Result<_, PgError>>()?;
        Ok(Self {
            resources,
            tls,
            cancels,
            pool,
        })
    }

    fn resource_at(&self, address: SocketAddr) -> Option<&Arc<Resource>> {
        self.resources.iter().find(|r| r.config.address == address)
    }

    fn resource_named(&self, name: &str) -> Option<&Arc<Resource>> {
        self.resources.iter().find(|r| r.config.name == name)
    }
}

/// Serves one PostgreSQL client.
pub async fn serve(ctx: &SessionContext, client: TcpStream) -> Result<(), String> {
    session(ctx, client).await.map_err(|e| e.to_string())
}

async fn session(ctx: &SessionContext, client: TcpStream) -> Result<(), PgError> {
    // This session keeps the configuration it started with.
    let pg = &*ctx.gateway.postgres();
    // Set-up logs under the session's span; the relay runs outside it (see
    // `SessionContext::span`).
    let Some(open) = open(ctx, pg, client).instrument(ctx.span.clone()).await? else {
        return Ok(());
    };
    // Statement records are confirmed off the hot path: the session end
    // waits for all of them.
    let (requests, responses, acks) = statements::tracker(
        ctx.id.clone(),
        open.resource.clone(),
        Arc::clone(&ctx.gateway.recorder),
    );
    // With a policy: judge statements and mask results on the way.
    let policy = ctx.gateway.policy.as_ref().map(|runtime| inspect::Guard {
        runtime: Arc::clone(runtime),
        session: ctx.id.clone(),
        resource: open.resource,
        principal: open.principal,
        held: Arc::clone(&open.key.held),
    });
    let Upstream {
        stream,
        greeting,
        pid,
        secret,
    } = open.upstream;
    let relayed = relay::run(
        open.client,
        stream,
        requests,
        responses,
        Arc::clone(&ctx.relayed),
        policy,
        open.identity_ended,
    )
    .await;
    if let Err(PgError::IdentityEnded(_)) = &relayed {
        // A statement still running upstream would run on, holding its
        // locks, until it next writes to the closed connection.
        if let Some(target) = pg
            .cancels
            .find(open.key.pid, &open.key.secret.to_be_bytes())
        {
            if let Err(e) = target.cancel(ctx.gateway.exempt_mark).await {
                warn!("cancelling the statement of a session whose identity ended: {e}");
            }
        }
    }
    drop(open.key);
    let (reusable, relayed) = match relayed {
        Ok(reusable) => (reusable, Ok(())),
        Err(e) => (None, Err(e)),
    };
    if let (Some(stream), Some((key, limit))) = (reusable, open.reuse) {
        let upstream = Upstream {
            stream,
            greeting,
            pid,
            secret,
        };
        tokio::spawn(Arc::clone(&pg.pool).give_back(key, upstream, limit));
    }
    // The client has gone: the statements go with the writer's next commit.
    let recorded = match acks.await {
        Ok(acks) => acks.durable_unhurried().await,
        Err(_) => Ok(()),
    };
    relayed?;
    recorded.map_err(|e| PgError::Config(format!("statement records were not stored: {e}")))?;
    Ok(())
}

/// A session logged in on both sides, ready to relay.
struct Open {
    client: PgStream,
    upstream: Upstream,
    /// Where the upstream goes if the session leaves it reusable, and how
    /// many may wait there.
    reuse: Option<(PoolKey, usize)>,
    /// The resource's name.
    resource: String,
    principal: Principal,
    /// Resolves when the identity the session was opened with ends.
    identity_ended: IdentityEnded,
    /// The client's cancel key, valid while the session lasts.
    key: CancelKey,
}

/// Start-up, login on both sides and the login record; `None` for a
/// cancel request, which ends the connection.
async fn open(
    ctx: &SessionContext,
    pg: &PostgresGateway,
    client: TcpStream,
) -> Result<Option<Open>, PgError> {
    let mark = ctx.gateway.exempt_mark;
    // Responses go out as soon as they are read: never wait for Nagle.
    client.set_nodelay(true)?;
    let opening = tokio::time::timeout(
        LOGIN_TIMEOUT,
        startup::negotiate(client, pg.tls.get(&*ctx.listener)),
    )
    .await
    .map_err(|_| PgError::Client("start-up timed out".into()))??;
    let mut startup = match opening {
        Opening::Cancel { pid, secret } => {
            // A key no session has changes nothing: its record goes with
            // the next commit (a flood of guesses costs no commit each).
            let Some(target) = pg.cancels.find(pid, &secret) else {
                info!(routed = false, "cancel request");
                return Ok(None);
            };
            // One that acts on a session is recorded first.
            ctx.start.durable().await.map_err(|e| {
                PgError::Config(format!("the session's start could not be recorded: {e}"))
            })?;
            target.cancel(mark).await?;
            info!(routed = true, "cancel request");
            return Ok(None);
        }
        Opening::Session(startup) => startup,
    };

    let login = tokio::time::timeout(LOGIN_TIMEOUT, auth::login(ctx, pg, &mut startup))
        .await
        .map_err(|_| PgError::Client("login timed out".into()))??;
    let login = match login {
        Ok(login) => login,
        Err(refusal) => {
            warn!(sqlstate = refusal.sqlstate, "refused: {}", refusal.message);
            let _ = startup::fatal(&mut startup.stream, refusal.sqlstate, &refusal.message).await;
            return Err(PgError::Refused(refusal.message));
        }
    };

    let resource = login.resource;
    let limit = resource.config.upstream_pool;
    let pool_key = (limit > 0).then(|| {
        PoolKey::new(
            resource,
            &login.grant.upstream_user,
            &login.database,
            &startup.params,
        )
    });
    let pooled = pool_key.as_ref().and_then(|key| pg.pool.take(key));
    let reused = pooled.is_some();
    let opened = match pooled {
        Some(upstream) => Ok(upstream),
        None => tokio::time::timeout(
            LOGIN_TIMEOUT,
            upstream::open(
                resource,
                login.grant,
                &login.database,
                &startup.params,
                mark,
            ),
        )
        .await
        .unwrap_or_else(|_| Err(PgError::Upstream("upstream login timed out".into()))),
    };
    let upstream = match opened {
        Ok(upstream) => upstream,
        Err(e) => {
            warn!("upstream login failed: {e}");
            let (sqlstate, message) = match &e {
                PgError::UpstreamRefused { sqlstate, message } => (
                    sqlstate.as_str(),
                    format!(
                        "the database refused the gateway's login for resource \"{}\": {message}; ask an administrator to check the grant's credentials",
                        resource.config.name
                    ),
                ),
                PgError::Config(_) => (
                    "08004",
                    format!(
                        "the gateway cannot use its credentials for resource \"{}\"; an administrator can see why in the gateway log",
                        resource.config.name
                    ),
                ),
                other => (
                    "08001",
                    format!(
                        "the gateway cannot open resource \"{}\": {other}",
                        resource.config.name
                    ),
                ),
            };
            let _ = startup::fatal(&mut startup.stream, sqlstate, &message).await;
            return Err(e);
        }
    };

    // The session's start and its login, committed together (see
    // StartRecord) before the client's first message goes upstream.
    let login_record = ctx
        .gateway
        .recorder
        .record(AuditEvent::DatabaseLogin(DatabaseLogin {
            session: ctx.id.clone(),
            resource: resource.config.name.clone(),
            principal: login.principal.clone(),
            upstream_user: login.grant.upstream_user.clone(),
            database: login.database.clone(),
            client_user: startup.param("user").map(str::to_string),
            application_name: startup.param("application_name").map(str::to_string),
            client_tls: startup.tls,
            direct: ctx.origin.is_none(),
            upstream_pid: upstream.pid,
            upstream_reused: reused,
        }))
        .durable();
    let (started, logged_in) = tokio::join!(ctx.start.durable(), login_record);
    let recorded = started.and(logged_in);
    if let Err(e) = recorded {
        // No session goes unrecorded: fail closed.
        let _ = startup::fatal(
            &mut startup.stream,
            "58000",
            "the gateway cannot record this session; try again later",
        )
        .await;
        return Err(PgError::Config(format!("recording the login: {e}")));
    }

    let key = pg
        .cancels
        .register(Arc::clone(resource), upstream.pid, upstream.secret)
        .map_err(|_| PgError::Config("no randomness for the cancel key".into()))?;
    let mut hello = BytesMut::new();
    wire::encode(&Authentication::Ok, &mut hello);
    hello.extend_from_slice(&upstream.greeting);
    wire::encode(
        &BackendKeyData::new(key.pid, SecretKey::I32(key.secret)),
        &mut hello,
    );
    wire::encode(&ReadyForQuery::new(TransactionStatus::Idle), &mut hello);
    startup.stream.write_all(&hello).await?;
    startup.stream.flush().await?;
    info!(
        resource = %resource.config.name,
        principal = %login.principal.subject,
        upstream_user = %login.grant.upstream_user,
        database = %login.database,
        upstream_pid = upstream.pid,
        reused,
        "database session open"
    );
    Ok(Some(Open {
        client: startup.stream,
        reuse: pool_key.map(|key| (key, limit)),
        upstream,
        resource: resource.config.name.clone(),
        identity_ended: ctx.identity_ended(login.token_expires),
        principal: login.principal,
        key,
    }))
}
