//! Cancel routing. A client gets the gateway's own BackendKeyData, never the
//! upstream's: a cancel request carries no credentials, so the key is the
//! only thing that lets someone cancel a query, and the upstream's key would
//! let a client cancel other sessions' queries directly at the upstream.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::BytesMut;
use pgwire::messages::{cancel::CancelRequest, startup::SecretKey};
use ring::rand::{SecureRandom, SystemRandom};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::wire;
use crate::proxy::upstream;

/// The upstream backend a gateway key stands for.
#[derive(Clone)]
struct Target {
    secret: [u8; 4],
    upstream: SocketAddr,
    upstream_pid: i32,
    upstream_secret: i32,
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
    registry: Arc<CancelRegistry>,
}

impl Drop for CancelKey {
    fn drop(&mut self) {
        self.registry
            .targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.pid);
    }
}

impl CancelRegistry {
    /// Makes a fresh random key for the upstream backend (pid, secret).
    pub fn register(
        self: &Arc<Self>,
        upstream: SocketAddr,
        upstream_pid: i32,
        upstream_secret: i32,
    ) -> Result<CancelKey, ring::error::Unspecified> {
        let rng = SystemRandom::new();
        let mut targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let mut bytes = [0u8; 8];
            rng.fill(&mut bytes)?;
            let pid = i32::from_be_bytes([bytes[0] & 0x3f, bytes[1], bytes[2], bytes[3]]).max(1);
            if targets.contains_key(&pid) {
                continue;
            }
            let secret = [bytes[4], bytes[5], bytes[6], bytes[7]];
            targets.insert(
                pid,
                Target {
                    secret,
                    upstream,
                    upstream_pid,
                    upstream_secret,
                },
            );
            return Ok(CancelKey {
                pid,
                secret: i32::from_be_bytes(secret),
                registry: Arc::clone(self),
            });
        }
    }

    /// Forwards a client's cancel request to the upstream backend its key
    /// stands for; an unknown key is ignored, as PostgreSQL does.
    pub async fn cancel(&self, pid: i32, secret: &[u8], mark: u32) -> Result<bool, std::io::Error> {
        let target = {
            let targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
            targets.get(&pid).cloned()
        };
        let Some(target) = target else {
            return Ok(false);
        };
        // Compare without an early exit, so timing does not reveal how
        // much of a guessed secret was right.
        let matches = secret.len() == target.secret.len()
            && secret
                .iter()
                .zip(target.secret)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if !matches {
            return Ok(false);
        }
        let mut stream = upstream::connect(target.upstream, mark).await?;
        let mut out = BytesMut::new();
        wire::encode(
            &CancelRequest::new(target.upstream_pid, SecretKey::I32(target.upstream_secret)),
            &mut out,
        );
        stream.write_all(&out).await?;
        // The upstream closes the connection once it has read the request.
        let mut sink = [0u8; 64];
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut sink)).await;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keys_are_unique_and_forgotten_at_drop() {
        let registry = Arc::new(CancelRegistry::default());
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let a = registry.register(addr, 10, 20).unwrap();
        let b = registry.register(addr, 11, 21).unwrap();
        assert_ne!(a.pid, b.pid);
        // A wrong secret is ignored without touching the network.
        assert!(!registry.cancel(a.pid, &[0, 0, 0, 0], 0).await.unwrap() || a.secret == 0);
        drop(a);
        assert_eq!(registry.targets.lock().unwrap().len(), 1);
    }
}
