//! Token verification: ID tokens and JWT access tokens, against the
//! provider's keys.
//!
//! Both are checked the same way: signature with an asymmetric algorithm
//! and a key from the provider's JWKS (so `alg: none` and HS256 "signed"
//! with the public key are refused), `iss` equal to the configured issuer,
//! `aud` containing the client id or a configured audience, `exp`, `nbf`
//! and `iat` within the configured clock skew. The precise reason goes to
//! the log; the client gets a short one.

use std::{collections::BTreeSet, time::Duration};

use openidconnect::{
    core::{
        CoreGenderClaim, CoreJsonWebKeySet, CoreJweContentEncryptionAlgorithm,
        CoreJwsSigningAlgorithm,
    },
    AdditionalClaims, ClaimsVerificationError, ClientId, IdToken, IdTokenClaims, IdTokenVerifier,
    IssuerUrl, JsonWebTokenType, Nonce, SignatureVerificationError,
};
use serde::{Deserialize, Serialize};

use super::{jwks::JwksCache, verified::VerifiedTokens};

/// Every claim that is not one of the standard ones, by name (groups,
/// `client_id`, `nbf`, provider-specific claims named in the config).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OtherClaims {
    #[serde(flatten)]
    pub claims: serde_json::Map<String, serde_json::Value>,
}

impl AdditionalClaims for OtherClaims {}

type Token = IdToken<
    OtherClaims,
    CoreGenderClaim,
    CoreJweContentEncryptionAlgorithm,
    CoreJwsSigningAlgorithm,
>;

/// The claims of a verified token.
pub type Claims = IdTokenClaims<OtherClaims, CoreGenderClaim>;

/// Algorithms a provider signs with its private key. Symmetric (HS*) and
/// `none` are never accepted: with a public client anyone could "sign".
const ASYMMETRIC: [CoreJwsSigningAlgorithm; 10] = [
    CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256,
    CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha384,
    CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha512,
    CoreJwsSigningAlgorithm::RsaSsaPssSha256,
    CoreJwsSigningAlgorithm::RsaSsaPssSha384,
    CoreJwsSigningAlgorithm::RsaSsaPssSha512,
    CoreJwsSigningAlgorithm::EcdsaP256Sha256,
    CoreJwsSigningAlgorithm::EcdsaP384Sha384,
    CoreJwsSigningAlgorithm::EcdsaP521Sha512,
    CoreJwsSigningAlgorithm::EdDsa,
];

/// JOSE `typ` values accepted: plain JWTs and RFC 9068 access tokens.
const JOSE_TYPES: [&str; 3] = ["JWT", "application/jose", "at+jwt"];

/// Why a token was refused: `reason` for the log, `short` for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: String,
    pub short: &'static str,
}

impl Rejection {
    fn new(short: &'static str, reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            short,
        }
    }
}

pub struct TokenVerifier {
    issuer: IssuerUrl,
    client_id: ClientId,
    audiences: BTreeSet<String>,
    /// The allowed clock skew (at most 600 s, see the config).
    skew: chrono::Duration,
    jwks: JwksCache,
    verified: VerifiedTokens,
}

impl TokenVerifier {
    pub fn new(
        issuer: IssuerUrl,
        client_id: ClientId,
        extra_audiences: &[String],
        skew: Duration,
        jwks: JwksCache,
    ) -> Self {
        let mut audiences: BTreeSet<String> = extra_audiences.iter().cloned().collect();
        audiences.insert(client_id.to_string());
        Self {
            issuer,
            client_id,
            audiences,
            skew: chrono::Duration::from_std(skew).unwrap_or(chrono::Duration::zero()),
            jwks,
            verified: VerifiedTokens::default(),
        }
    }

    /// Verifies `token` and returns its claims. A token that passed
    /// against the current keys before is not checked again until it
    /// expires (see [`VerifiedTokens`]).
    pub async fn verify(&self, token: &str) -> Result<Claims, Rejection> {
        let text = token.trim();
        let mut keys = self.jwks.keys().await;
        if let Some(claims) = self.verified.get(text, &keys, self.clock()) {
            return Ok(claims);
        }
        let token: Token = text.parse().map_err(|e| {
            Rejection::new(
                "token is not a signed JWT",
                format!("token is not a JWT: {e}"),
            )
        })?;
        let mut result = self.check(&token, &keys);
        if let Err(ClaimsVerificationError::SignatureVerification(
            SignatureVerificationError::NoMatchingKey,
        )) = result
        {
            // The provider may have rotated its keys since we fetched them.
            if let Some(fetched) = self.jwks.refetch_for_unknown_key().await {
                keys = fetched;
                result = self.check(&token, &keys);
            }
        }
        let claims = result.map_err(rejection)?;
        self.check_audience(&claims)?;
        self.check_not_before(&claims)?;
        self.verified.insert(text, &claims, keys, self.clock());
        Ok(claims)
    }

    /// Now, set back by the allowed skew: what `exp` is compared with.
    fn clock(&self) -> chrono::DateTime<chrono::Utc> {
        chrono::Utc::now() - self.skew
    }

    fn check(
        &self,
        token: &Token,
        keys: &CoreJsonWebKeySet,
    ) -> Result<Claims, ClaimsVerificationError> {
        let skew = self.skew;
        let verifier = IdTokenVerifier::new_public_client(
            self.client_id.clone(),
            self.issuer.clone(),
            keys.clone(),
        )
        .set_allowed_algs(ASYMMETRIC)
        .set_allowed_jose_types(
            JOSE_TYPES
                .iter()
                .filter_map(|t| JsonWebTokenType::new(t.to_string()).normalize().ok()),
        )
        // Checked below against the client id and every configured audience.
        .require_audience_match(false)
        // `exp` is compared with a clock set back by the allowed skew.
        .set_time_fn(move || chrono::Utc::now() - skew)
        .set_issue_time_verifier_fn(move |iat| {
            let now = chrono::Utc::now();
            if iat > now + skew {
                Err(format!("token issued in the future (iat {iat}, now {now})"))
            } else {
                Ok(())
            }
        });
        // No nonce was sent: the device and client-credentials grants have none.
        token.claims(&verifier, |_: Option<&Nonce>| Ok(())).cloned()
    }

    fn check_audience(&self, claims: &Claims) -> Result<(), Rejection> {
        let found: Vec<&str> = claims.audiences().iter().map(|a| a.as_str()).collect();
        if found.iter().any(|a| self.audiences.contains(*a)) {
            return Ok(());
        }
        Err(Rejection::new(
            "token audience not accepted",
            format!(
                "wrong audience: token is for {found:?}, this gateway accepts {:?}",
                self.audiences
            ),
        ))
    }

    fn check_not_before(&self, claims: &Claims) -> Result<(), Rejection> {
        let Some(nbf) = claims.additional_claims().claims.get("nbf") else {
            return Ok(());
        };
        let Some(nbf) = nbf.as_i64() else {
            return Err(Rejection::new(
                "token is malformed",
                format!("nbf claim is not a number: {nbf}"),
            ));
        };
        let now = chrono::Utc::now().timestamp();
        let skew = self.skew.num_seconds();
        if nbf > now.saturating_add(skew) {
            return Err(Rejection::new(
                "token not yet valid",
                format!("token not valid before {nbf} (now {now}, skew {skew}s)"),
            ));
        }
        Ok(())
    }
}

/// Maps the crate's verification errors to a log reason and a short one.
fn rejection(e: ClaimsVerificationError) -> Rejection {
    use ClaimsVerificationError as C;
    use SignatureVerificationError as S;
    let reason = e.to_string();
    let (short, reason) = match e {
        C::InvalidIssuer(detail) => ("token issuer not accepted", format!("wrong issuer: {detail}")),
        C::InvalidAudience(detail) => ("token audience not accepted", format!("wrong audience: {detail}")),
        C::Expired(detail) => ("token expired or not yet valid", format!("expired: {detail}")),
        C::SignatureVerification(S::DisallowedAlg(detail) | S::UnsupportedAlg(detail)) => (
            "token signature algorithm not accepted",
            format!("signature algorithm refused: {detail}"),
        ),
        C::SignatureVerification(S::NoSignature) => (
            "token signature algorithm not accepted",
            "unsigned token (alg none)".to_string(),
        ),
        C::SignatureVerification(S::NoMatchingKey) => (
            "token signed by an unknown key",
            "no key in the provider's JWKS matches the token's kid and algorithm (checked after a re-fetch)".to_string(),
        ),
        C::SignatureVerification(detail) => (
            "token signature invalid",
            format!("signature invalid: {detail}"),
        ),
        C::Unsupported(detail) => ("token format not supported", format!("unsupported token: {detail}")),
        _ => ("token refused", reason),
    };
    Rejection::new(short, reason)
}
