//! The OpenID Connect provider of identities: token verification for
//! clients that present one, and uid bindings made by `portcullis login`,
//! renewed with refresh tokens and dropped at expiry or logout.
//!
//! Logins, refreshes, logouts and refused logins are audit events; a login
//! whose event cannot be made durable is refused (fail closed).

use std::{
    sync::{Arc, Weak},
    time::{Duration, SystemTime},
};

use openidconnect::{
    core::CoreClient, reqwest, AuthType, ClientId, ClientSecret, OAuth2TokenResponse, RefreshToken,
};
use tracing::{info, warn};

use super::{
    bindings::{Binding, BindingInfo, Bindings, DueRefresh},
    discovery::{self, Metadata},
    flows::{read_secret, LoginParams, LoginTokens},
    http,
    jwks::JwksCache,
    principal::PrincipalRules,
    verify::{Claims, TokenVerifier},
    Admission, IdentityConfig, IdentityError, IdentityFuture, IdentityProvider, Principal,
    TokenIdentity,
};
use crate::{
    audit::{AuditError, AuditEvent, IdentityBinding, IdentityLogout, Recorder},
    error_chain,
};

/// How often expiries and due refreshes are looked at.
const MAINTENANCE_TICK: Duration = Duration::from_secs(1);
/// Wait after a refresh that failed for a reason that may pass.
const REFRESH_RETRY: Duration = Duration::from_secs(5);

pub struct OidcIdentity {
    config: IdentityConfig,
    metadata: Metadata,
    http: reqwest::Client,
    client_secret: Option<ClientSecret>,
    verifier: TokenVerifier,
    rules: PrincipalRules,
    bindings: Bindings,
    recorder: Arc<dyn Recorder>,
}

impl OidcIdentity {
    /// Discovers the provider and loads its keys; the provider must be
    /// reachable (the gateway does not start without its identity source).
    /// Starts the task that expires and refreshes bindings.
    pub async fn start(
        config: &IdentityConfig,
        recorder: Arc<dyn Recorder>,
    ) -> Result<Arc<Self>, IdentityError> {
        let http = http::client(config.ca_file.as_deref())?;
        let issuer = http::issuer_url(&config.issuer).map_err(IdentityError::Unavailable)?;
        let metadata = discovery::discover(&issuer, &http).await?;
        let jwks = JwksCache::fetch(metadata.jwks_uri().clone(), http.clone()).await?;
        let client_secret = config
            .client_secret_file
            .as_deref()
            .map(read_secret)
            .transpose()?;
        let verifier = TokenVerifier::new(
            issuer,
            ClientId::new(config.client_id.clone()),
            &config.audience,
            Duration::from_secs(config.clock_skew_seconds),
            jwks,
        );
        let identity = Arc::new(Self {
            config: config.clone(),
            metadata,
            http,
            client_secret,
            verifier,
            rules: PrincipalRules::new(config),
            bindings: Bindings::default(),
            recorder,
        });
        tokio::spawn(maintain(Arc::downgrade(&identity)));
        info!(issuer = %config.issuer, client_id = %config.client_id, "OIDC identity provider ready");
        Ok(identity)
    }

    pub fn login_params(&self) -> LoginParams {
        LoginParams {
            issuer: self.config.issuer.clone(),
            client_id: self.config.client_id.clone(),
            scopes: self.config.scopes.clone(),
            resource: self.config.resource.clone(),
            ca_file: self.config.ca_file.clone(),
        }
    }

    /// Verifies the tokens `portcullis login` obtained and binds their
    /// principal to `uid` (the kernel's word, from SO_PEERCRED) until the
    /// token expires. The ID token decides when present; a service account
    /// (client credentials) has only a JWT access token.
    pub async fn login(&self, uid: u32, tokens: LoginTokens) -> Result<BindingInfo, IdentityError> {
        let token = tokens
            .id_token
            .as_deref()
            .or(tokens.access_token.as_deref())
            .ok_or_else(|| IdentityError::Rejected("no token in the login request".into()))?;
        let claims = match self.verifier.verify(token).await {
            Ok(claims) => claims,
            Err(rejection) => {
                warn!(uid, "login refused: {}", rejection.reason);
                self.record_refusal(AuditEvent::IdentityRejected {
                    uid,
                    reason: rejection.reason,
                })
                .await?;
                return Err(IdentityError::Rejected(rejection.short.into()));
            }
        };
        let principal = self.rules.principal(&claims);
        let binding = Binding {
            principal,
            expires_at: expiry(&claims),
            lifetime: lifetime(&claims),
            refresh_token: tokens.refresh_token.map(RefreshToken::new),
            retry_at: SystemTime::UNIX_EPOCH,
            generation: self.bindings.next_generation(),
        };
        let info = binding.info(uid);
        self.record(AuditEvent::IdentityLogin(event(&info))).await?;
        info!(uid, principal = %info.principal.name, kind = ?info.principal.kind, roles = ?info.principal.roles, expires_at = info.expires_at, refreshable = info.refreshable, "identity bound to uid");
        if let Some(replaced) = self.bindings.insert(uid, binding) {
            self.revoke(uid, replaced.refresh_token).await;
        }
        Ok(info)
    }

    pub fn whoami(&self, uid: u32) -> Option<BindingInfo> {
        self.bindings.info(uid)
    }

    /// Ends `uid`'s binding; `None` if it had none.
    pub async fn logout(&self, uid: u32) -> Result<Option<BindingInfo>, IdentityError> {
        let Some(binding) = self.bindings.remove(uid, "logout") else {
            return Ok(None);
        };
        let info = binding.info(uid);
        info!(uid, principal = %info.principal.name, "identity unbound (logout)");
        self.revoke(uid, binding.refresh_token).await;
        self.record(AuditEvent::IdentityLogout(IdentityLogout {
            uid,
            principal: info.principal.clone(),
            reason: "logout".into(),
        }))
        .await?;
        Ok(Some(info))
    }

    /// Renews one binding with its refresh token. The new ID token must
    /// name the same subject; a provider that refuses the refresh ends the
    /// binding, one that cannot be reached is tried again until expiry.
    async fn refresh(&self, due: DueRefresh) {
        let outcome = self.refreshed_claims(&due.token).await;
        match outcome {
            Ok((claims, new_refresh)) => {
                let principal = self.rules.principal(&claims);
                if principal.subject != due.subject {
                    warn!(uid = due.uid, old = %due.subject, new = %principal.subject, "refresh returned another subject: binding ended");
                    self.end(
                        due.uid,
                        due.generation,
                        "refresh failed: the provider returned another subject".into(),
                    )
                    .await;
                    return;
                }
                let (expires_at, lifetime) = (expiry(&claims), lifetime(&claims));
                let mut info = None;
                let renewed = self.bindings.renew(due.uid, due.generation, |b| {
                    b.principal = principal;
                    b.expires_at = expires_at;
                    b.lifetime = lifetime;
                    if let Some(token) = new_refresh {
                        b.refresh_token = Some(token);
                    }
                    b.retry_at = SystemTime::UNIX_EPOCH;
                    info = Some(b.info(due.uid));
                });
                if let (true, Some(info)) = (renewed, info) {
                    info!(uid = due.uid, principal = %info.principal.name, expires_at = info.expires_at, "identity binding refreshed");
                    let _ = self.record(AuditEvent::IdentityRefresh(event(&info))).await;
                }
            }
            Err(RefreshError::Refused(reason)) => {
                warn!(uid = due.uid, "refresh refused, binding ended: {reason}");
                self.end(due.uid, due.generation, format!("refresh failed: {reason}"))
                    .await;
            }
            Err(RefreshError::Unavailable(reason)) => {
                warn!(
                    uid = due.uid,
                    "refresh failed, will retry until the binding expires: {reason}"
                );
            }
        }
    }

    async fn refreshed_claims(
        &self,
        token: &RefreshToken,
    ) -> Result<(Claims, Option<RefreshToken>), RefreshError> {
        let client = CoreClient::from_provider_metadata(
            self.metadata.clone(),
            ClientId::new(self.config.client_id.clone()),
            self.client_secret.clone(),
        )
        .set_auth_type(AuthType::RequestBody);
        let response = client
            .exchange_refresh_token(token)
            .map_err(|e| RefreshError::Unavailable(format!("provider metadata: {e}")))?
            .request_async(&self.http)
            .await
            .map_err(|e| match e {
                openidconnect::RequestTokenError::ServerResponse(r) => {
                    RefreshError::Refused(format!("provider said {r}"))
                }
                other => RefreshError::Unavailable(error_chain(&other)),
            })?;
        let new_token = response
            .extra_fields()
            .id_token()
            .map(|t| t.to_string())
            .unwrap_or_else(|| response.access_token().secret().clone());
        let claims = self.verifier.verify(&new_token).await.map_err(|r| {
            RefreshError::Refused(format!(
                "the refreshed token was refused: {} (an opaque access token without an ID token cannot renew a binding)",
                r.reason
            ))
        })?;
        Ok((claims, response.refresh_token().cloned()))
    }

    /// Revokes a refresh token the daemon no longer needs (RFC 7009), so a
    /// copy of it (in a crash dump, say) is worthless. Best effort: a
    /// provider without a revocation endpoint, or one that fails, is
    /// logged and the logout stands.
    async fn revoke(&self, uid: u32, token: Option<RefreshToken>) {
        let Some(token) = token else {
            return;
        };
        let Some(endpoint) = &self.metadata.additional_metadata().revocation_endpoint else {
            info!(
                uid,
                "provider has no revocation endpoint: refresh token dropped, not revoked"
            );
            return;
        };
        let mut form = vec![
            ("token", token.secret().as_str()),
            ("token_type_hint", "refresh_token"),
            ("client_id", self.config.client_id.as_str()),
        ];
        if let Some(secret) = &self.client_secret {
            form.push(("client_secret", secret.secret().as_str()));
        }
        match self.http.post(endpoint).form(&form).send().await {
            Ok(response) if response.status().is_success() => {
                info!(uid, "refresh token revoked at the provider")
            }
            Ok(response) => {
                warn!(uid, status = %response.status(), "provider refused to revoke the refresh token")
            }
            Err(e) => warn!(
                uid,
                "revoking the refresh token failed: {}",
                error_chain(&e)
            ),
        }
    }

    async fn end(&self, uid: u32, generation: u64, reason: String) {
        if let Some(binding) = self.bindings.remove_generation(uid, generation, &reason) {
            let _ = self
                .record(AuditEvent::IdentityLogout(IdentityLogout {
                    uid,
                    principal: binding.principal,
                    reason,
                }))
                .await;
        }
    }

    /// Records `event` and waits until it is durable, hurrying the audit
    /// writer: a login takes effect only once its record does.
    async fn record(&self, event: AuditEvent) -> Result<(), IdentityError> {
        recorded(self.recorder.record(event).durable().await)
    }

    /// Records a refused login and waits for the writer's next commit
    /// without hurrying it: a flood of bad tokens then costs one commit
    /// per commit interval, not one each (as refused sessions do).
    async fn record_refusal(&self, event: AuditEvent) -> Result<(), IdentityError> {
        recorded(self.recorder.record(event).durable_unhurried().await)
    }
}

/// What an identity record's failure tells the user.
fn recorded(result: Result<(), AuditError>) -> Result<(), IdentityError> {
    result.map_err(|e| {
        tracing::error!("audit record lost: {e}");
        IdentityError::Unavailable("the gateway cannot record the login; try again later".into())
    })
}

enum RefreshError {
    /// The provider answered no (revoked, expired refresh token, ...).
    Refused(String),
    /// The provider could not be reached or answered garbage.
    Unavailable(String),
}

/// Drops expired bindings (recording why) and runs due refreshes, until the
/// provider is dropped.
async fn maintain(identity: Weak<OidcIdentity>) {
    let mut tick = tokio::time::interval(MAINTENANCE_TICK);
    loop {
        tick.tick().await;
        let Some(identity) = identity.upgrade() else {
            return;
        };
        let now = SystemTime::now();
        for due in identity.bindings.due_refreshes(now, REFRESH_RETRY) {
            let identity = Arc::clone(&identity);
            tokio::spawn(async move { identity.refresh(due).await });
        }
        for (uid, binding) in identity.bindings.take_expired(now) {
            info!(uid, principal = %binding.principal.name, "identity binding expired");
            let _ = identity
                .record(AuditEvent::IdentityLogout(IdentityLogout {
                    uid,
                    principal: binding.principal,
                    reason: "expired".into(),
                }))
                .await;
        }
    }
}

fn expiry(claims: &Claims) -> SystemTime {
    SystemTime::from(claims.expiration())
}

fn lifetime(claims: &Claims) -> Duration {
    (claims.expiration() - claims.issue_time())
        .to_std()
        .unwrap_or(Duration::ZERO)
}

fn event(info: &BindingInfo) -> IdentityBinding {
    IdentityBinding {
        uid: info.uid,
        principal: info.principal.clone(),
        expires_at: info.expires_at,
        refreshable: info.refreshable,
    }
}

impl IdentityProvider for OidcIdentity {
    fn principal_for_uid(&self, uid: u32) -> IdentityFuture<'_, Option<Principal>> {
        let principal = self.bindings.principal(uid);
        Box::pin(async move { principal })
    }

    fn verify_token<'a>(
        &'a self,
        token: &'a str,
    ) -> IdentityFuture<'a, Result<TokenIdentity, IdentityError>> {
        Box::pin(async move {
            match self.verifier.verify(token).await {
                Ok(claims) => Ok(TokenIdentity {
                    principal: self.rules.principal(&claims),
                    // Accepted up to the clock skew after `exp`: good as
                    // long as that.
                    expires_at: expiry(&claims)
                        + Duration::from_secs(self.config.clock_skew_seconds),
                }),
                Err(rejection) => {
                    warn!("token refused: {}", rejection.reason);
                    Err(IdentityError::Rejected(rejection.short.into()))
                }
            }
        })
    }

    fn ends_sessions(&self) -> bool {
        self.config.end_sessions_with_identity
    }

    fn identity_ended(&self, admission: Admission) -> IdentityFuture<'_, String> {
        Box::pin(async move {
            match admission {
                Admission::Binding { uid, subject } => self.bindings.ended(uid, &subject).await,
                Admission::Token { expires_at } => {
                    let left = expires_at
                        .duration_since(SystemTime::now())
                        .unwrap_or(Duration::ZERO);
                    tokio::time::sleep(left).await;
                    "the token expired".into()
                }
            }
        })
    }
}
