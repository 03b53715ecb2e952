//! Provider discovery (`/.well-known/openid-configuration`), with the
//! device authorization endpoint (RFC 8628), which core OIDC metadata
//! does not name.

use openidconnect::{
    core::{
        CoreAuthDisplay, CoreClaimName, CoreClaimType, CoreClientAuthMethod, CoreGrantType,
        CoreJsonWebKey, CoreJweContentEncryptionAlgorithm, CoreJweKeyManagementAlgorithm,
        CoreResponseMode, CoreResponseType, CoreSubjectIdentifierType,
    },
    reqwest, AdditionalProviderMetadata, DeviceAuthorizationUrl, IssuerUrl, ProviderMetadata,
};
use serde::{Deserialize, Serialize};

use super::{jwks::error_chain, IdentityError};

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct DeviceEndpoint {
    /// Absent at providers without the device grant: `portcullis login`
    /// then says so.
    #[serde(default)]
    pub device_authorization_endpoint: Option<DeviceAuthorizationUrl>,
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
