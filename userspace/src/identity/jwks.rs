//! The provider's signing keys, cached, and re-fetched when a token names a
//! key we have not seen (the provider rotated its keys).
//!
//! Re-fetches are rate-limited: a flood of tokens with made-up `kid`s must
//! not turn the gateway into a load generator against the provider. The
//! set is also re-fetched when older than [`MAX_AGE`], so a key the
//! provider withdrew (compromised, retired) stops being trusted.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use openidconnect::{core::CoreJsonWebKeySet, reqwest, JsonWebKeySetUrl};
use tokio::sync::Mutex;
use tracing::{info, warn};

use super::IdentityError;
use crate::error_chain;

/// At most one re-fetch for unknown keys per this interval.
pub const REFETCH_INTERVAL: Duration = Duration::from_secs(2);
/// Keys older than this are re-fetched before use.
pub const MAX_AGE: Duration = Duration::from_secs(15 * 60);

pub struct JwksCache {
    uri: JsonWebKeySetUrl,
    http: reqwest::Client,
    state: Mutex<State>,
}

struct State {
    /// Shared, so that a token verified against this very set can be told
    /// from one verified against an earlier set (see `VerifiedTokens`).
    keys: Arc<CoreJsonWebKeySet>,
    /// When `keys` were downloaded.
    fetched_at: Instant,
    /// When a download was last tried (successful or not).
    attempted_at: Instant,
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
                keys: Arc::new(keys),
                fetched_at: Instant::now(),
                attempted_at: Instant::now(),
            }),
        })
    }

    /// The cached keys, re-fetched first if older than [`MAX_AGE`] (if the
    /// provider cannot be reached then, the cached set stays in use and the
    /// next call tries again after [`REFETCH_INTERVAL`]).
    pub async fn keys(&self) -> Arc<CoreJsonWebKeySet> {
        let mut state = self.state.lock().await;
        if state.fetched_at.elapsed() >= MAX_AGE && state.attempted_at.elapsed() >= REFETCH_INTERVAL
        {
            self.download_into(&mut state, "periodic").await;
        }
        Arc::clone(&state.keys)
    }

    /// Re-fetches the key set after a token named an unknown key, unless
    /// that happened less than [`REFETCH_INTERVAL`] ago. Returns the new
    /// set, or `None` when nothing was fetched.
    pub async fn refetch_for_unknown_key(&self) -> Option<Arc<CoreJsonWebKeySet>> {
        let mut state = self.state.lock().await;
        if state.attempted_at.elapsed() < REFETCH_INTERVAL {
            return None;
        }
        self.download_into(&mut state, "unknown key id")
            .await
            .then(|| Arc::clone(&state.keys))
    }

    /// Downloads the set into `state`; false (and the cached set kept) if
    /// the provider could not be reached.
    async fn download_into(&self, state: &mut State, why: &str) -> bool {
        state.attempted_at = Instant::now();
        match download(&self.uri, &self.http).await {
            Ok(keys) => {
                info!(
                    keys = keys.keys().len(),
                    "identity provider keys re-fetched ({why})"
                );
                state.keys = Arc::new(keys);
                state.fetched_at = Instant::now();
                true
            }
            Err(e) => {
                warn!("re-fetching identity provider keys failed, keeping the cached set: {e}");
                false
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
