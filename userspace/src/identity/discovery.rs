//! Provider discovery (`/.well-known/openid-configuration`), with the
//! device authorization (RFC 8628) and revocation (RFC 7009) endpoints,
//! which core OIDC metadata does not name.

use openidconnect::{
    core::{
        CoreAuthDisplay, CoreClaimName, CoreClaimType, CoreClientAuthMethod, CoreGrantType,
        CoreJsonWebKey, CoreJweContentEncryptionAlgorithm, CoreJweKeyManagementAlgorithm,
        CoreResponseMode, CoreResponseType, CoreSubjectIdentifierType,
    },
    reqwest, AdditionalProviderMetadata, DeviceAuthorizationUrl, IssuerUrl, ProviderMetadata,
};
use serde::{Deserialize, Serialize};

use super::IdentityError;
use crate::error_chain;

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct DeviceEndpoint {
    /// Absent at providers without the device grant: `portcullis login`
    /// then says so.
    #[serde(default)]
    pub device_authorization_endpoint: Option<DeviceAuthorizationUrl>,
    /// RFC 7009 token revocation, used to revoke refresh tokens at logout.
    #[serde(default)]
    pub revocation_endpoint: Option<String>,
}

impl AdditionalProviderMetadata for DeviceEndpoint {}

pub type Metadata = ProviderMetadata<
    DeviceEndpoint,
    CoreAuthDisplay,
    CoreClientAuthMethod,
    CoreClaimName,
    CoreClaimType,
    CoreGrantType,
    CoreJweContentEncryptionAlgorithm,
    CoreJweKeyManagementAlgorithm,
    CoreJsonWebKey,
    CoreResponseMode,
    CoreResponseType,
    CoreSubjectIdentifierType,
>;

/// Fetches and checks the discovery document (its `issuer` must equal
/// `issuer` exactly).
pub async fn discover(
    issuer: &IssuerUrl,
    http: &reqwest::Client,
) -> Result<Metadata, IdentityError> {
    Metadata::discover_async(issuer.clone(), http)
        .await
        .map_err(|e| {
            IdentityError::Unavailable(format!(
                "discovery at {}: {}",
                issuer.as_str(),
                error_chain(&e)
            ))
        })
}
