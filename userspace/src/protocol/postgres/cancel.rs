//! Cancel routing. A client gets the gateway's own BackendKeyData, never the
//! upstream's: a cancel request carries no credentials, so the key is the
//! only thing that lets someone cancel a query, and the upstream's key would
//! let a client cancel other sessions' queries directly at the upstream.
//!
//! The request goes to the upstream the way the session's connection did:
//! over TLS when the resource asks for it, since it carries the upstream
//! backend's secret.
//!
//! A statement the gateway itself holds (waiting for an approval) is not
//! upstream yet: a cancel request for that session ends the wait instead
//! ([`Held`]) and is not sent on.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::BytesMut;
use pgwire::messages::{cancel::CancelRequest, startup::SecretKey};
use ring::rand::{SecureRandom, SystemRandom};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::oneshot,
};

use super::{upstream, wire, PgError, Resource};
use crate::lock;

/// The session a gateway key stands for: its upstream backend, and its
/// statement held for an approval, if any.
#[derive(Clone)]
pub struct Target {
    secret: [u8; 4],
    resource: Arc<Resource>,
    upstream_pid: i32,
    upstream_secret: i32,
    held: Arc<Held>,
}

/// Where a cancel request finds a session's statement held by the gateway.
#[derive(Default)]
pub struct Held(Mutex<Option<oneshot::Sender<()>>>);

impl Held {
    /// Completes when a cancel request for this session arrives; only
    /// requests that arrive while the returned future is alive count.
    pub fn cancelled(&self) -> impl std::future::Future<Output = ()> {
        let (tx, rx) = oneshot::channel();
        *lock(&self.0) = Some(tx);
        async move {
            if rx.await.is_err() {
                // Replaced by a newer wait: never a cancel for this one.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Ends the wait, if a statement is held; false otherwise.
    fn cancel(&self) -> bool {
        let waiting = lock(&self.0).take();
        waiting.is_some_and(|tx| tx.send(()).is_ok())
    }
}

/// Keys handed to clients, by gateway pid.
#[derive(Default)]
pub struct CancelRegistry {
    targets: Mutex<HashMap<i32, Target>>,
}

/// A registered key; dropping it (session end) forgets it.
pub struct CancelKey {
    pub pid: i32,
    pub secret: i32,
    /// Cancel requests for statements the session holds.
    pub held: Arc<Held>,
    registry: Arc<CancelRegistry>,
}

impl Drop for CancelKey {
    fn drop(&mut self) {
        lock(&self.registry.targets).remove(&self.pid);
    }
}

impl CancelRegistry {
    /// Makes a fresh random key for the upstream backend (pid, secret).
    pub fn register(
        self: &Arc<Self>,
        resource: Arc<Resource>,
        upstream_pid: i32,
        upstream_secret: i32,
    ) -> Result<CancelKey, ring::error::Unspecified> {
        let rng = SystemRandom::new();
        let mut targets = lock(&self.targets);
        loop {
            let mut bytes = [0u8; 8];
            rng.fill(&mut bytes)?;
            let pid = i32::from_be_bytes([bytes[0] & 0x3f, bytes[1], bytes[2], bytes[3]]).max(1);
            if targets.contains_key(&pid) {
                continue;
            }
            let secret = [bytes[4], bytes[5], bytes[6], bytes[7]];
            let held = Arc::new(Held::default());
            targets.insert(
                pid,
                Target {
                    secret,
                    resource,
                    upstream_pid,
                    upstream_secret,
                    held: Arc::clone(&held),
                },
            );
            return Ok(CancelKey {
                pid,
                secret: i32::from_be_bytes(secret),
                held,
                registry: Arc::clone(self),
            });
        }
    }

    /// The session a cancel request's key stands for; `None` for a key no
    /// session has (PostgreSQL ignores those).
    pub fn find(&self, pid: i32, secret: &[u8]) -> Option<Target> {
        let target = {
            let targets = lock(&self.targets);
            targets.get(&pid).cloned()
        }?;
        // Compare without an early exit, so timing does not reveal how
        // much of a guessed secret was right.
        let matches = secret.len() == target.secret.len()
            && secret
                .iter()
                .zip(target.secret)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        matches.then_some(target)
    }
}

impl Target {
    /// Ends the session's wait for an approval if it is holding a
    /// statement, else forwards the request to the upstream backend.
    pub async fn cancel(self, mark: u32) -> Result<(), PgError> {
        if self.held.cancel() {
            return Ok(());
        }
        let (mut stream, _) = upstream::connect(&self.resource, None, mark).await?;
        let mut out = BytesMut::new();
        wire::encode(
            &CancelRequest::new(self.upstream_pid, SecretKey::I32(self.upstream_secret)),
            &mut out,
        );
        stream.write_all(&out).await?;
        stream.flush().await?;
        // The upstream closes the connection once it has read the request.
        let mut sink = [0u8; 64];
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut sink)).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;
    use crate::{
        config::Protocol,
        resource::{ResourceConfig, UpstreamTls},
    };

    fn resource(address: std::net::SocketAddr, tls: UpstreamTls) -> Arc<Resource> {
        let config = ResourceConfig {
            name: "crm".into(),
            protocol: Protocol::Postgres,
            address,
            database: None,
            tls,
            ca_file: None,
            server_name: None,
            grants: Vec::new(),
            upstream_pool: 0,
        };
        Arc::new(Resource {
            tls: super::super::tls::ClientTls::load(&config).unwrap(),
            config,
        })
    }

    /// A resource whose upstream is a listener of the test's: it accepts
    /// one connection and returns the first `len` bytes sent, after
    /// answering an SSLRequest with `N` (no TLS here).
    async fn upstream(
        tls: UpstreamTls,
        len: usize,
    ) -> (Arc<Resource>, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let resource = resource(listener.local_addr().unwrap(), tls);
        let received = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut bytes = vec![0; len];
            stream.read_exact(&mut bytes).await.unwrap();
            if bytes.ends_with(&[0x04, 0xd2, 0x16, 0x2f]) {
                stream.write_all(b"N").await.unwrap();
            }
            bytes
        });
        (resource, received)
    }

    /// A cancel request with `key`, as its client would send it.
    async fn cancel_with(registry: &CancelRegistry, key: &CancelKey) -> Result<(), PgError> {
        let target = registry.find(key.pid, &key.secret.to_be_bytes());
        target.expect("the key's session").cancel(0).await
    }

    #[tokio::test]
    async fn keys_are_unique_and_forgotten_at_drop() {
        let registry = Arc::new(CancelRegistry::default());
        let (crm, _) = upstream(UpstreamTls::Disable, 16).await;
        let a = registry.register(Arc::clone(&crm), 10, 20).unwrap();
        let b = registry.register(crm, 11, 21).unwrap();
        assert_ne!(a.pid, b.pid);
        let wrong = (a.secret ^ 1).to_be_bytes();
        assert!(registry.find(a.pid, &wrong).is_none());
        assert!(registry.find(a.pid, &a.secret.to_be_bytes()).is_some());
        drop(a);
        assert_eq!(registry.targets.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_cancel_names_the_upstream_backend_not_the_gateway_key() {
        let registry = Arc::new(CancelRegistry::default());
        let (crm, received) = upstream(UpstreamTls::Disable, 16).await;
        let key = registry.register(crm, 4242, 0x0102_0304).unwrap();
        cancel_with(&registry, &key).await.unwrap();
        let mut expected = vec![0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
        expected.extend_from_slice(&4242i32.to_be_bytes());
        expected.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(received.await.unwrap(), expected);
    }

    #[tokio::test]
    async fn a_cancel_for_a_tls_resource_goes_over_tls_or_not_at_all() {
        let registry = Arc::new(CancelRegistry::default());
        let (crm, received) = upstream(UpstreamTls::Require, 8).await;
        let key = registry.register(crm, 4242, 7).unwrap();
        let err = cancel_with(&registry, &key).await.unwrap_err();
        // The upstream saw an SSLRequest, never the backend's secret.
        assert_eq!(
            received.await.unwrap(),
            [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]
        );
        assert!(err.to_string().contains("requires TLS"), "{err}");
    }

    #[tokio::test]
    async fn a_cancel_ends_a_hold_without_touching_the_network() {
        let registry = Arc::new(CancelRegistry::default());
        // Nothing listens on port 1: forwarding would fail.
        let crm = resource("127.0.0.1:1".parse().unwrap(), UpstreamTls::Disable);
        let key = registry.register(crm, 10, 20).unwrap();
        let wait = key.held.cancelled();
        cancel_with(&registry, &key).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .unwrap();
        // No hold any more: the request goes upstream (and fails there).
        assert!(cancel_with(&registry, &key).await.is_err());
    }
}
