//! uid -> principal bindings made by `portcullis login`.
//!
//! Bindings live in the daemon's memory only, with their refresh tokens: a
//! restart forgets them and people log in again. That is deliberate: no
//! token is ever written to disk, so none can be read by another user or
//! lifted from a backup.
//!
//! A binding's end (logout, expiry, a refresh the provider refused,
//! another identity's login on the same uid) is kept with its reason, and
//! wakes that uid's [`Bindings::ended`] waiters: the sessions admitted on it
//! end too.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use openidconnect::RefreshToken;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::Principal;
use crate::lock;

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
    state: Mutex<State>,
    next_generation: Mutex<u64>,
}

#[derive(Default)]
struct State {
    bound: HashMap<u32, Binding>,
    /// The last binding of each uid that ended: its subject and why.
    ended: HashMap<u32, (String, String)>,
    /// Woken when a binding of that uid ends; one per uid ever waited on.
    waiting: HashMap<u32, Arc<Notify>>,
}

impl State {
    fn end(&mut self, uid: u32, binding: &Binding, reason: String) {
        self.ended
            .insert(uid, (binding.principal.subject.clone(), reason));
        if let Some(waiting) = self.waiting.get(&uid) {
            waiting.notify_waiters();
        }
    }
}

impl Bindings {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-written map
        // (every update is a single insert or remove): keep serving.
        lock(&self.state)
    }

    pub fn next_generation(&self) -> u64 {
        let mut next = lock(&self.next_generation);
        *next += 1;
        *next
    }

    /// The principal bound to `uid`, unless the binding has expired.
    pub fn principal(&self, uid: u32) -> Option<Principal> {
        let state = self.lock();
        let binding = state.bound.get(&uid)?;
        (binding.expires_at > SystemTime::now()).then(|| binding.principal.clone())
    }

    pub fn info(&self, uid: u32) -> Option<BindingInfo> {
        let state = self.lock();
        let binding = state.bound.get(&uid)?;
        (binding.expires_at > SystemTime::now()).then(|| binding.info(uid))
    }

    /// Binds `uid`, returning the binding it replaces. A binding of
    /// another subject ends with it.
    pub fn insert(&self, uid: u32, binding: Binding) -> Option<Binding> {
        let mut state = self.lock();
        let name = binding.principal.name.clone();
        let replaced = state.bound.insert(uid, binding)?;
        if replaced.principal.subject != state.bound[&uid].principal.subject {
            state.end(uid, &replaced, format!("{name} signed in on uid {uid}"));
        }
        Some(replaced)
    }

    /// Ends `uid`'s binding, for `reason`.
    pub fn remove(&self, uid: u32, reason: &str) -> Option<Binding> {
        self.remove_if(uid, reason, |_| true)
    }

    /// Replaces the binding of `uid` if it is still the one `generation`
    /// names; false when a logout or a new login came first.
    pub fn renew(&self, uid: u32, generation: u64, update: impl FnOnce(&mut Binding)) -> bool {
        match self.lock().bound.get_mut(&uid) {
            Some(binding) if binding.generation == generation => {
                update(binding);
                true
            }
            _ => false,
        }
    }

    /// Ends `uid`'s binding if it is still generation `generation`.
    pub fn remove_generation(&self, uid: u32, generation: u64, reason: &str) -> Option<Binding> {
        self.remove_if(uid, reason, |b| b.generation == generation)
    }

    fn remove_if(
        &self,
        uid: u32,
        reason: &str,
        matches: impl FnOnce(&Binding) -> bool,
    ) -> Option<Binding> {
        let mut state = self.lock();
        if !state.bound.get(&uid).is_some_and(matches) {
            return None;
        }
        let binding = state.bound.remove(&uid)?;
        state.end(uid, &binding, reason.to_string());
        Some(binding)
    }

    /// Ends and returns every expired binding.
    pub fn take_expired(&self, now: SystemTime) -> Vec<(u32, Binding)> {
        let mut state = self.lock();
        let expired: Vec<u32> = state
            .bound
            .iter()
            .filter(|(_, b)| b.expires_at <= now)
            .map(|(uid, _)| *uid)
            .collect();
        let taken: Vec<(u32, Binding)> = expired
            .into_iter()
            .filter_map(|uid| state.bound.remove(&uid).map(|b| (uid, b)))
            .collect();
        for (uid, binding) in &taken {
            state.end(*uid, binding, "expired".into());
        }
        taken
    }

    /// Resolves, with the reason, once `uid` is no longer bound to
    /// `subject`.
    pub async fn ended(&self, uid: u32, subject: &str) -> String {
        let waiting = Arc::clone(self.lock().waiting.entry(uid).or_default());
        loop {
            // Registered before the check, so that an end between the two
            // still wakes it.
            let notified = waiting.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(reason) = self.why_ended(uid, subject) {
                return reason;
            }
            notified.await;
        }
    }

    fn why_ended(&self, uid: u32, subject: &str) -> Option<String> {
        let state = self.lock();
        match state.bound.get(&uid) {
            Some(binding) if binding.principal.subject == subject => {
                // Expired, not yet swept (the sweep wakes the waiters).
                (binding.expires_at <= SystemTime::now()).then(|| "expired".to_string())
            }
            _ => Some(match state.ended.get(&uid) {
                Some((ended, reason)) if ended == subject => reason.clone(),
                _ => "the binding is gone".to_string(),
            }),
        }
    }

    /// Bindings whose refresh is due; each is marked so that it is not
    /// handed out again before `now + retry`.
    pub fn due_refreshes(&self, now: SystemTime, retry: Duration) -> Vec<DueRefresh> {
        let mut state = self.lock();
        state
            .bound
            .iter_mut()
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
        assert!(b.remove_generation(1, 6, "refused").is_none());
        assert!(b.renew(1, 7, |x| x.lifetime = Duration::from_secs(1)));
        assert!(b.remove_generation(1, 7, "refused").is_some());
    }

    #[tokio::test]
    async fn an_end_wakes_its_waiters_with_the_reason() {
        let b = Arc::new(Bindings::default());
        b.insert(1, binding(Duration::from_secs(300), false, 1));
        b.insert(2, binding(Duration::from_secs(300), false, 2));
        let waiter = |uid| {
            let b = Arc::clone(&b);
            tokio::spawn(async move { b.ended(uid, "iss#alice").await })
        };
        let (logout, replaced) = (waiter(1), waiter(2));
        // A new login of the same subject ends nothing.
        b.insert(1, binding(Duration::from_secs(300), false, 3));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!logout.is_finished());
        b.remove(1, "logout");
        assert_eq!(logout.await.unwrap(), "logout");
        let mut bob = binding(Duration::from_secs(300), false, 4);
        bob.principal.subject = "iss#bob".into();
        bob.principal.name = "bob".into();
        b.insert(2, bob);
        assert_eq!(replaced.await.unwrap(), "bob signed in on uid 2");
        // Ended before anyone waited: the reason is kept.
        b.insert(3, binding(Duration::ZERO, false, 5));
        assert_eq!(b.take_expired(SystemTime::now()).len(), 1);
        assert_eq!(b.ended(3, "iss#alice").await, "expired");
        assert_eq!(b.ended(4, "iss#alice").await, "the binding is gone");
    }
}
