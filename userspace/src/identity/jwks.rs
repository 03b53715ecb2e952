//! The provider's signing keys, cached, and re-fetched when a token names a
//! key we have not seen (the provider rotated its keys).
//!
//! Re-fetches are rate-limited: a flood of tokens with made-up `kid`s must
//! not turn the gateway into a load generator against the provider.

use std::time::{Duration, Instant};

use openidconnect::{core::CoreJsonWebKeySet, reqwest, JsonWebKeySetUrl};
use tokio::sync::Mutex;
use tracing::{info, warn};

use super::IdentityError;

/// At most one re-fetch for unknown keys per this interval.
pub const REFETCH_INTERVAL: Duration = Duration::from_secs(2);

pub struct JwksCache {
    uri: JsonWebKeySetUrl,
    http: reqwest::Client,
    state: Mutex<State>,
}

struct State {
    keys: CoreJsonWebKeySet,
    fetched_at: Instant,
}

impl JwksCache {
    /// Fetches the key set once; the provider must be reachable.
    pub async fn fetch(
        uri: JsonWebKeySetUrl,
        http: reqwest::Client,
    ) -> Result<Self, IdentityError> {
        let keys = download(&uri, &http).await?;
        info!(jwks_uri = %uri.url(), keys = keys.keys().len(), "identity provider keys loaded");
        Ok(Self {
            uri,
            http,
            state: Mutex::new(State {
                keys,
                fetched_at: Instant::now(),
            }),
        })
    }

    pub async fn keys(&self) -> CoreJsonWebKeySet {
        self.state.lock().await.keys.clone()
    }

    /// Re-fetches the key set after a token named an unknown key, unless
    /// that happened less than [`REFETCH_INTERVAL`] ago. Returns the new
    /// set, or `None` when nothing was fetched.
    pub async fn refetch_for_unknown_key(&self) -> Option<CoreJsonWebKeySet> {
        let mut state = self.state.lock().await;
        if state.fetched_at.elapsed() < REFETCH_INTERVAL {
            return None;
        }
        state.fetched_at = Instant::now();
        match download(&self.uri, &self.http).await {
            Ok(keys) => {
                info!(
                    keys = keys.keys().len(),
                    "identity provider keys re-fetched (unknown key id)"
                );
                state.keys = keys.clone();
                Some(keys)
            }
            Err(e) => {
                warn!("re-fetching identity provider keys failed, keeping the cached set: {e}");
                None
            }
        }
    }
}

async fn download(
    uri: &JsonWebKeySetUrl,
    http: &reqwest::Client,
) -> Result<CoreJsonWebKeySet, IdentityError> {
    CoreJsonWebKeySet::fetch_async(uri, http)
        .await
        .map_err(|e| {
            IdentityError::Unavailable(format!(
                "fetching keys from {}: {}",
                uri.url(),
                error_chain(&e)
            ))
        })
}

/// `e: cause: cause` in one line, for errors whose `Display` hides the cause.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
