//! `portcullis kernel status`: what is attached, from the pins alone, so it
//! works whether or not the daemon runs.

use std::path::Path;

use aya::programs::links::{FdLink, PinnedLink};
use portcullis_common::{action, program_names, PORT_PREFIX_BITS, V4_MAPPED_PREFIX_BITS};
use serde::Serialize;

use super::{
    addr,
    maps::{read_counters, ConnectionTable, Destinations},
    KernelError,
};

#[derive(Debug, Serialize)]
pub struct KernelStatus {
    pub pin_dir: String,
    pub programs: Vec<ProgramStatus>,
    pub counters: Vec<(String, u64)>,
    pub protected: Vec<ProtectedEntry>,
    /// Redirected connections the gateway has not accepted yet.
    pub pending_connections: usize,
}

#[derive(Debug, Serialize)]
pub struct ProgramStatus {
    pub name: &'static str,
    /// `None` when the link pin is missing: that hook is not enforced.
    pub link_id: Option<u32>,
    pub program_id: Option<u32>,
}

#[derive(Debug, Serialize)]
pub struct ProtectedEntry {
    pub destination: String,
    pub port: Option<u16>,
    pub action: String,
    pub rule: u32,
}

impl KernelStatus {
    /// True when every program is attached.
    pub fn fully_attached(&self) -> bool {
        self.programs.iter().all(|p| p.link_id.is_some())
    }
}

/// Reads the pinned links and maps under `pin_dir`.
pub fn status(pin_dir: &Path) -> Result<KernelStatus, KernelError> {
    let links_dir = pin_dir.join("links");
    let programs = program_names::ALL
        .into_iter()
        .map(|name| {
            let info = PinnedLink::from_pin(links_dir.join(name))
                .ok()
                .and_then(|link| FdLink::from(link).info().ok());
            ProgramStatus {
                name,
                link_id: info.as_ref().map(|i| i.id()),
                program_id: info.as_ref().map(|i| i.program_id()),
            }
        })
        .collect();
    if !pin_dir.join("maps").exists() {
        return Ok(KernelStatus {
            pin_dir: pin_dir.display().to_string(),
            programs,
            counters: Vec::new(),
            protected: Vec::new(),
            pending_connections: 0,
        });
    }
    let counters = read_counters(pin_dir)?
        .into_iter()
        .map(|(name, value)| (name.to_string(), value))
        .collect();
    let protected = Destinations::open(pin_dir)?
        .entries()?
        .into_iter()
        .map(|(key, value)| {
            let data = key.data();
            let ip = addr::from_kernel(data.addr);
            let mapped = if ip.is_ipv4() {
                V4_MAPPED_PREFIX_BITS
            } else {
                0
            };
            let prefix = key.prefix_len().saturating_sub(PORT_PREFIX_BITS + mapped);
            let full = if ip.is_ipv4() { 32 } else { 128 };
            let destination = if prefix == full {
                ip.to_string()
            } else {
                format!("{ip}/{prefix}")
            };
            let port = u16::from_be_bytes(data.port_be);
            let action = if value.action == action::REDIRECT {
                let target = addr::from_kernel(value.redirect_addr);
                format!(
                    "redirect {}",
                    std::net::SocketAddr::new(target, value.redirect_port)
                )
            } else {
                "block".to_string()
            };
            ProtectedEntry {
                destination,
                port: (port != 0).then_some(port),
                action,
                rule: value.rule,
            }
        })
        .collect();
    let pending_connections = ConnectionTable::open(pin_dir)?.len();
    Ok(KernelStatus {
        pin_dir: pin_dir.display().to_string(),
        programs,
        counters,
        protected,
        pending_connections,
    })
}
