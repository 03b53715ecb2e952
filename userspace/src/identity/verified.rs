//! Tokens already verified, so that a client logging in again and again
//! with the same token (a script or an agent that connects per query, a
//! service account) pays for the signature check once, not per connection:
//! an RSA check took about a third of the gateway's CPU per new connection.
//!
//! An entry holds only while it would verify the same way: until the
//! token's `exp` (with the allowed clock skew, as the full check) and only
//! against the very key set it was checked with, so a re-fetched set (a
//! rotation, a withdrawn key, or the periodic refresh) sends every token
//! through the full check again. Tokens are kept by their SHA-256, never
//! as text, and only tokens that passed every check are kept.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use chrono::{DateTime, Utc};
use openidconnect::core::CoreJsonWebKeySet;
use sha2::{Digest, Sha256};

use super::verify::Claims;
use crate::lock;

/// At most this many tokens are kept; a full cache first drops what no
/// longer holds, then everything.
const CAPACITY: usize = 1024;

#[derive(Default)]
pub struct VerifiedTokens {
    entries: Mutex<HashMap<[u8; 32], Entry>>,
}

struct Entry {
    claims: Claims,
    /// The key set the token's signature was checked against.
    keys: Arc<CoreJsonWebKeySet>,
}

impl Entry {
    fn holds(&self, keys: &Arc<CoreJsonWebKeySet>, clock: DateTime<Utc>) -> bool {
        Arc::ptr_eq(&self.keys, keys) && self.claims.expiration() > clock
    }
}

impl VerifiedTokens {
    /// The claims of `token` if it was verified against `keys` and has not
    /// expired by `clock` (now, set back by the allowed skew).
    pub fn get(
        &self,
        token: &str,
        keys: &Arc<CoreJsonWebKeySet>,
        clock: DateTime<Utc>,
    ) -> Option<Claims> {
        let id = digest(token);
        let mut entries = self.lock();
        match entries.get(&id) {
            Some(entry) if entry.holds(keys, clock) => Some(entry.claims.clone()),
            Some(_) => {
                entries.remove(&id);
                None
            }
            None => None,
        }
    }

    /// Keeps `claims` of a token that passed every check against `keys`.
    pub fn insert(
        &self,
        token: &str,
        claims: &Claims,
        keys: Arc<CoreJsonWebKeySet>,
        clock: DateTime<Utc>,
    ) {
        let mut entries = self.lock();
        if entries.len() >= CAPACITY {
            entries.retain(|_, entry| entry.holds(&keys, clock));
            if entries.len() >= CAPACITY {
                entries.clear();
            }
        }
        entries.insert(
            digest(token),
            Entry {
                claims: claims.clone(),
                keys,
            },
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Entry>> {
        lock(&self.entries)
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use chrono::Duration;
    use openidconnect::{Audience, EndUserEmail, IssuerUrl, StandardClaims, SubjectIdentifier};

    use super::*;
    use crate::identity::verify::OtherClaims;

    fn claims(expires: DateTime<Utc>) -> Claims {
        Claims::new(
            IssuerUrl::new("https://issuer.example.test".into()).unwrap(),
            vec![Audience::new("portcullis".into())],
            expires,
            expires - Duration::hours(1),
            StandardClaims::new(SubjectIdentifier::new("alice".into()))
                .set_email(Some(EndUserEmail::new("alice@example.test".into()))),
            OtherClaims::default(),
        )
    }

    fn keys() -> Arc<CoreJsonWebKeySet> {
        Arc::new(CoreJsonWebKeySet::new(Vec::new()))
    }

    #[test]
    fn a_token_holds_until_it_expires_and_only_for_its_key_set() {
        let cache = VerifiedTokens::default();
        let now = Utc::now();
        let (set, rotated) = (keys(), keys());
        cache.insert(
            "token-a",
            &claims(now + Duration::minutes(5)),
            Arc::clone(&set),
            now,
        );

        let hit = cache.get("token-a", &set, now).expect("verified before");
        assert_eq!(hit.subject().as_str(), "alice");
        assert!(cache.get("token-b", &set, now).is_none());
        assert!(
            cache.get(" token-a", &set, now).is_none(),
            "the exact text only"
        );
        // Past its exp the token goes through the full check (and fails it).
        assert!(cache
            .get("token-a", &set, now + Duration::minutes(6))
            .is_none());
        assert!(
            cache.get("token-a", &set, now).is_none(),
            "dropped once expired"
        );

        cache.insert("token-a", &claims(now + Duration::minutes(5)), set, now);
        assert!(
            cache.get("token-a", &rotated, now).is_none(),
            "a re-fetched key set checks every token again"
        );
    }

    #[test]
    fn a_full_cache_drops_what_no_longer_holds_first() {
        let cache = VerifiedTokens::default();
        let now = Utc::now();
        let set = keys();
        let stale = claims(now + Duration::seconds(1));
        for i in 0..CAPACITY - 1 {
            cache.insert(&format!("stale-{i}"), &stale, Arc::clone(&set), now);
        }
        let fresh = claims(now + Duration::hours(1));
        cache.insert("kept", &fresh, Arc::clone(&set), now);
        let later = now + Duration::seconds(2);
        cache.insert("new", &fresh, Arc::clone(&set), later);
        assert!(cache.get("kept", &set, later).is_some());
        assert!(cache.get("new", &set, later).is_some());
        assert_eq!(cache.lock().len(), 2);
    }
}
