//! Enforcement events from the kernel ring buffer.

use std::path::Path;

use aya::maps::{MapData, RingBuf};
use portcullis_common::{event_kind, map_names, ConnectEvent};
use serde::Serialize;
use tokio::io::{unix::AsyncFd, Interest};

use super::{maps::open_pinned, ConnectOrigin, KernelError, KernelLogger};

/// What the kernel did to one connect() or sendto().
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelAction {
    Redirect,
    Block,
    UdpSendBlock,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Tcp,
    Udp,
    Other,
}

/// One enforcement event, as reported by the kernel programs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KernelEvent {
    pub action: KernelAction,
    pub transport: Transport,
    #[serde(flatten)]
    pub origin: ConnectOrigin,
}

impl KernelEvent {
    fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < std::mem::size_of::<ConnectEvent>() {
            return None;
        }
        // SAFETY: the length was checked; ConnectEvent is plain old data with
        // no invalid bit patterns, and read_unaligned makes no alignment claim.
        let raw: ConnectEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let action = match raw.kind {
            event_kind::REDIRECT => KernelAction::Redirect,
            event_kind::BLOCK => KernelAction::Block,
            event_kind::UDP_SEND_BLOCK => KernelAction::UdpSendBlock,
            _ => return None,
        };
        let transport = match raw.sock_type {
            1 => Transport::Tcp,
            2 => Transport::Udp,
            _ => Transport::Other,
        };
        Some(Self {
            action,
            transport,
            origin: ConnectOrigin::from_record(&raw.record),
        })
    }
}

/// Reads events from the pinned ring buffer. Events emitted while the daemon
/// was down wait in the buffer (up to its size) and are read on restart.
pub struct EventReader(AsyncFd<RingBuf<MapData>>);

impl EventReader {
    pub(super) fn open(pin_dir: &Path) -> Result<Self, KernelError> {
        let name = map_names::EVENTS;
        let map = open_pinned(pin_dir, name)?;
        let ring = RingBuf::try_from(map).map_err(|source| KernelError::Map {
            name,
            source: Box::new(source),
        })?;
        // SAFETY: the ring buffer owns its map fd and keeps it open, unchanged,
        // for as long as it lives; the AsyncFd owns the ring buffer.
        let fd = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| KernelError::Io(e.into()))?;
        Ok(Self(fd))
    }

    /// Waits for events and returns every one available.
    pub async fn next_batch(&mut self) -> Result<Vec<KernelEvent>, KernelError> {
        loop {
            let mut guard = self.0.readable_mut().await.map_err(KernelError::Io)?;
            let ring = guard.get_inner_mut();
            let mut batch = Vec::new();
            while let Some(item) = ring.next() {
                match KernelEvent::decode(&item) {
                    Some(event) => batch.push(event),
                    None => tracing::warn!(len = item.len(), "undecodable kernel event skipped"),
                }
            }
            guard.clear_ready();
            if !batch.is_empty() {
                return Ok(batch);
            }
        }
    }
}

/// Forwards aya-log records from the kernel programs into our log whenever
/// its ring buffer becomes readable. Runs until the fd fails.
pub async fn forward_log(logger: KernelLogger) {
    // SAFETY: the logger owns its ring buffer fd and keeps it open, unchanged,
    // for as long as it lives; the AsyncFd owns the logger.
    let Ok(mut fd) = (unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) })
    else {
        return;
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
