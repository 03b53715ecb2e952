//! uid -> principal bindings made by `portcullis login`.
//!
//! Bindings live in the daemon's memory only, with their refresh tokens: a
//! restart forgets them and people log in again. That is deliberate: no
//! token is ever written to disk, so none can be read by another user or
//! lifted from a backup.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, SystemTime},
};

use openidconnect::RefreshToken;
use serde::{Deserialize, Serialize};

use super::Principal;

/// What `whoami` shows and login events record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindingInfo {
    pub uid: u32,
    pub principal: Principal,
    /// Unix seconds.
    pub expires_at: u64,
    /// Whether the daemon holds a refresh token and will renew the binding.
    pub refreshable: bool,
}

pub struct Binding {
    pub principal: Principal,
    pub expires_at: SystemTime,
    /// The token's lifetime at login or last refresh: refreshing starts a
    /// third of it before expiry.
    pub lifetime: Duration,
    pub refresh_token: Option<RefreshToken>,
    /// No refresh attempt before this time (after a failed one).
    pub retry_at: SystemTime,
    /// Changes with each login, so a refresh that finishes after a logout or
    /// a new login does not resurrect or overwrite the binding.
    pub generation: u64,
}

impl Binding {
    pub fn info(&self, uid: u32) -> BindingInfo {
        BindingInfo {
            uid,
            principal: self.principal.clone(),
            expires_at: unix_seconds(self.expires_at),
            refreshable: self.refresh_token.is_some(),
        }
    }

    fn refresh_due(&self, now: SystemTime) -> bool {
        let lead = (self.lifetime / 3).min(Duration::from_secs(60));
        self.refresh_token.is_some()
            && now >= self.retry_at
            && self
                .expires_at
                .duration_since(now)
                .map_or(true, |left| left <= lead)
    }
}

/// A refresh the maintenance task should run.
pub struct DueRefresh {
    pub uid: u32,
    pub generation: u64,
    pub token: RefreshToken,
    pub subject: String,
}

#[derive(Default)]
pub struct Bindings {
    map: Mutex<HashMap<u32, Binding>>,
    next_generation: Mutex<u64>,
}

impl Bindings {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Binding>> {
        // A panic while holding the lock cannot leave a half-written map
        // (every update is a single insert or remove): keep serving.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn next_generation(&self) -> u64 {
        let mut next = self
            .next_generation
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *next += 1;
        *next
    }

    /// The principal bound to `uid`, unless the binding has expired.
    pub fn principal(&self, uid: u32) -> Option<Principal> {
        let map = self.lock();
        let binding = map.get(&uid)?;
        (binding.expires_at > SystemTime::now()).then(|| binding.principal.clone())
    }

    pub fn info(&self, uid: u32) -> Option<BindingInfo> {
        let map = self.lock();
        let binding = map.get(&uid)?;
        (binding.expires_at > SystemTime::now()).then(|| binding.info(uid))
    }

    /// Binds `uid`, returning the binding it replaces.
    pub fn insert(&self, uid: u32, binding: Binding) -> Option<Binding> {
        self.lock().insert(uid, binding)
    }

    pub fn remove(&self, uid: u32) -> Option<Binding> {
        self.lock().remove(&uid)
    }

    /// Replaces the binding of `uid` if it is still the one `generation`
    /// names; false when a logout or a new login came first.
    pub fn renew(&self, uid: u32, generation: u64, update: impl FnOnce(&mut Binding)) -> bool {
        match self.lock().get_mut(&uid) {
            Some(binding) if binding.generation == generation => {
                update(binding);
                true
            }
            _ => false,
        }
    }

    /// Removes `uid`'s binding if it is still generation `generation`.
    pub fn remove_generation(&self, uid: u32, generation: u64) -> Option<Binding> {
        let mut map = self.lock();
        if map.get(&uid).is_some_and(|b| b.generation == generation) {
            map.remove(&uid)
        } else {
            None
        }
    }

    /// Removes and returns every expired binding.
    pub fn take_expired(&self, now: SystemTime) -> Vec<(u32, Binding)> {
        let mut map = self.lock();
        let expired: Vec<u32> = map
            .iter()
            .filter(|(_, b)| b.expires_at <= now)
            .map(|(uid, _)| *uid)
            .collect();
        expired
            .into_iter()
            .filter_map(|uid| map.remove(&uid).map(|b| (uid, b)))
            .collect()
    }

    /// Bindings whose refresh is due; each is marked so that it is not
    /// handed out again before `now + retry`.
    pub fn due_refreshes(&self, now: SystemTime, retry: Duration) -> Vec<DueRefresh> {
        let mut map = self.lock();
        map.iter_mut()
            .filter(|(_, b)| b.refresh_due(now))
            .filter_map(|(uid, b)| {
                b.retry_at = now + retry;
                Some(DueRefresh {
                    uid: *uid,
                    generation: b.generation,
                    token: b.refresh_token.clone()?,
                    subject: b.principal.subject.clone(),
                })
            })
            .collect()
    }
}

/// Now, in Unix seconds.
pub fn unix_now() -> u64 {
    unix_seconds(SystemTime::now())
}

pub fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::PrincipalKind;

    fn binding(expires_in: Duration, refresh: bool, generation: u64) -> Binding {
        Binding {
            principal: Principal {
                subject: "iss#alice".into(),
                name: "alice".into(),
                kind: PrincipalKind::Person,
                roles: vec![],
            },
            expires_at: SystemTime::now() + expires_in,
            lifetime: Duration::from_secs(300),
            refresh_token: refresh.then(|| RefreshToken::new("r".into())),
            retry_at: SystemTime::UNIX_EPOCH,
            generation,
        }
    }

    #[test]
    fn expired_binding_names_nobody() {
        let b = Bindings::default();
        b.insert(1000, binding(Duration::from_secs(300), false, 1));
        assert!(b.principal(1000).is_some());
        assert!(b.principal(1001).is_none());
        b.insert(1000, binding(Duration::ZERO, false, 2));
        assert!(b.principal(1000).is_none());
        assert_eq!(b.take_expired(SystemTime::now()).len(), 1);
        assert!(b.info(1000).is_none());
    }

    #[test]
    fn refresh_is_due_in_the_last_third_and_not_handed_out_twice() {
        let b = Bindings::default();
        b.insert(1, binding(Duration::from_secs(250), true, 1));
        b.insert(2, binding(Duration::from_secs(30), true, 2));
        b.insert(3, binding(Duration::from_secs(30), false, 3));
        let now = SystemTime::now();
        let due = b.due_refreshes(now, Duration::from_secs(5));
        assert_eq!(due.iter().map(|d| d.uid).collect::<Vec<_>>(), [2]);
        assert!(b.due_refreshes(now, Duration::from_secs(5)).is_empty());
    }

    #[test]
    fn stale_generation_cannot_renew_or_remove() {
        let b = Bindings::default();
        b.insert(1, binding(Duration::from_secs(30), true, 7));
        assert!(!b.renew(1, 6, |_| {}));
        assert!(b.remove_generation(1, 6).is_none());
        assert!(b.renew(1, 7, |x| x.lifetime = Duration::from_secs(1)));
        assert!(b.remove_generation(1, 7).is_some());
    }
}
