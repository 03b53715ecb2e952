//! The client side of sign-in, run by `portcullis login` as the calling
//! user: the device authorization grant (RFC 8628) for people, the client
//! credentials grant for service accounts. Both end with tokens that the
//! CLI hands to the daemon, which verifies them itself.

use std::{
    future::Future,
    path::{Path, PathBuf},
};

use openidconnect::{
    core::{CoreClient, CoreDeviceAuthorizationResponse},
    AuthType, ClientId, ClientSecret, OAuth2TokenResponse, Scope,
};
use serde::{Deserialize, Serialize};

use super::{discovery, http, IdentityError};
use crate::error_chain;

/// What the daemon tells `portcullis login` about its provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginParams {
    pub issuer: String,
    pub client_id: String,
    pub scopes: Vec<String>,
    pub resource: Option<String>,
    /// Extra CA certificates for the provider (`[identity] ca_file`).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// Tokens a login hands to the daemon. Never written to disk.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct LoginTokens {
    pub id_token: Option<String>,
    pub access_token: Option<String>,
    pub refresh_token: Option<String>,
}

impl std::fmt::Debug for LoginTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginTokens")
            .field("id_token", &self.id_token.as_ref().map(|_| "<redacted>"))
            .field(
                "access_token",
                &self.access_token.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// What to show the person: where to go and which code to enter.
pub struct DevicePrompt {
    pub verification_uri: String,
    pub verification_uri_complete: Option<String>,
    pub user_code: String,
    pub expires_in_seconds: u64,
}

/// Runs the device grant: asks for a device code, calls `prompt` with what
/// the person must do, then polls the token endpoint (at the interval the
/// provider asks for) until they approve, deny, or the code expires.
pub async fn device_login<F, Fut>(
    params: &LoginParams,
    prompt: F,
) -> Result<LoginTokens, IdentityError>
where
    F: FnOnce(DevicePrompt) -> Fut,
    Fut: Future<Output = ()>,
{
    let http = http::client(params.ca_file.as_deref())?;
    let issuer = http::issuer_url(&params.issuer).map_err(IdentityError::Unavailable)?;
    let metadata = discovery::discover(&issuer, &http).await?;
    let device_url = metadata
        .additional_metadata()
        .device_authorization_endpoint
        .clone()
        .ok_or_else(|| {
            IdentityError::Unavailable(format!(
                "{} does not offer the device authorization grant (no device_authorization_endpoint): enable it for client '{}'",
                params.issuer, params.client_id
            ))
        })?;
    let client =
        CoreClient::from_provider_metadata(metadata, ClientId::new(params.client_id.clone()), None)
            .set_device_authorization_url(device_url)
            .set_auth_type(AuthType::RequestBody);
    let details: CoreDeviceAuthorizationResponse = client
        .exchange_device_code()
        .add_scopes(params.scopes.iter().cloned().map(Scope::new))
        .request_async(&http)
        .await
        .map_err(|e| {
            IdentityError::Rejected(format!("device authorization refused: {}", error_chain(&e)))
        })?;
    prompt(DevicePrompt {
        verification_uri: details.verification_uri().to_string(),
        verification_uri_complete: details
            .verification_uri_complete()
            .map(|u| u.secret().to_string()),
        user_code: details.user_code().secret().to_string(),
        expires_in_seconds: details.expires_in().as_secs(),
    })
    .await;
    let token = client
        .exchange_device_access_token(&details)
        .map_err(|e| IdentityError::Unavailable(format!("provider metadata: {e}")))?
        .request_async(&http, tokio::time::sleep, None)
        .await
        .map_err(|e| {
            IdentityError::Rejected(format!("sign-in not completed: {}", error_chain(&e)))
        })?;
    Ok(LoginTokens {
        id_token: token.extra_fields().id_token().map(|t| t.to_string()),
        access_token: Some(token.access_token().secret().clone()),
        refresh_token: token.refresh_token().map(|t| t.secret().clone()),
    })
}

/// Runs the client credentials grant for a service account whose secret
/// is in `secret_file`.
pub async fn client_credentials_login(
    params: &LoginParams,
    client_id: &str,
    secret_file: &Path,
    scopes: &[String],
) -> Result<LoginTokens, IdentityError> {
    let secret = read_secret(secret_file)?;
    let http = http::client(params.ca_file.as_deref())?;
    let issuer = http::issuer_url(&params.issuer).map_err(IdentityError::Unavailable)?;
    let metadata = discovery::discover(&issuer, &http).await?;
    let client = CoreClient::from_provider_metadata(
        metadata,
        ClientId::new(client_id.to_string()),
        Some(secret),
    )
    .set_auth_type(AuthType::RequestBody);
    let mut request = client
        .exchange_client_credentials()
        .map_err(|e| IdentityError::Unavailable(format!("provider metadata: {e}")))?
        .add_scopes(scopes.iter().cloned().map(Scope::new));
    if let Some(resource) = &params.resource {
        request = request.add_extra_param("resource", resource.clone());
    }
    let token = request.request_async(&http).await.map_err(|e| {
        IdentityError::Rejected(format!("client credentials refused: {}", error_chain(&e)))
    })?;
    Ok(LoginTokens {
        id_token: None,
        access_token: Some(token.access_token().secret().clone()),
        refresh_token: None,
    })
}

/// Reads a client secret file (refused when others can read it).
pub fn read_secret(path: &Path) -> Result<ClientSecret, IdentityError> {
    let secret = crate::secret::read_secret(path)
        .map_err(|e| IdentityError::Unavailable(format!("client secret: {e}")))?;
    Ok(ClientSecret::new(secret.trim().to_string()))
}
