//! Kernel enforcement: loading, attaching and pinning the eBPF programs, and
//! the maps through which the gateway steers and observes them.
//!
//! All the crate's `unsafe` code is here, but for the one `fallocate` call
//! with which the audit store punches holes in its segment files.
//!
//! * [`attach`]: attach to a cgroup v2, or adopt what an earlier run pinned.
//! * [`maps`]: the protected-destination trie, the connection table, counters.
//! * [`events`]: the ring buffer of redirect and block events.
//! * [`status`](mod@status): what is attached, for `portcullis kernel status`.

mod addr;
mod attach;
mod events;
mod maps;
mod status;

use std::net::SocketAddr;

use portcullis_common::ConnectRecord;
use serde::Serialize;

pub use addr::normalise as normalise_addr;
pub use attach::{detach, root_cgroup, Enforcement, KernelLogger};
pub use events::{forward_log, EventReader, KernelAction, KernelEvent, Transport};
pub use maps::{compile_rules, CompiledRule, ConnectionTable, FastPath, SyncReport};
pub use status::{status, KernelStatus};

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("kernel map {name}: {source}")]
    Map {
        name: &'static str,
        source: Box<aya::maps::MapError>,
    },
    #[error("loading the eBPF programs failed: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("eBPF program {name}: {message}")]
    Program { name: &'static str, message: String },
    #[error("pinning {path}: {source}")]
    Pin {
        path: std::path::PathBuf,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cgroup {path}: {source} (is cgroup v2 mounted there?)")]
    Cgroup {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "no cgroup v2 hierarchy in /proc/self/mounts; mount one or set kernel.cgroup in the config"
    )]
    NoCgroup2,
    #[error(
        "{0} is not on a bpf filesystem; mount one with `mount -t bpf bpf /sys/fs/bpf` or set kernel.pin_dir"
    )]
    NotBpffs(std::path::PathBuf),
    #[error("{0}")]
    Rules(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// What the kernel saw when a process called connect(): the evidence the
/// gateway trusts instead of anything the client says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConnectOrigin {
    /// Where the process meant to connect before the redirect.
    pub original_destination: SocketAddr,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    pub command: String,
    pub cgroup_id: u64,
    /// Index of the `[[protect]]` rule that matched (0-based).
    pub rule: u32,
}

impl ConnectOrigin {
    fn from_record(record: &ConnectRecord) -> Self {
        Self {
            original_destination: SocketAddr::new(
                addr::from_kernel(record.original_addr),
                record.original_port,
            ),
            uid: record.uid,
            gid: record.gid,
            pid: record.pid,
            command: addr::comm_to_string(&record.comm),
            cgroup_id: record.cgroup_id,
            rule: record.rule,
        }
    }
}
