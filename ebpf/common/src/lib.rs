//! Types shared by the Portcullis kernel programs and the userspace loader.
//!
//! Every type here is `#[repr(C)]` with explicit padding fields: the kernel
//! verifier rejects reads of uninitialised stack, and both sides must agree on
//! the byte layout of map keys and values.
//!
//! Addresses are always 16 bytes: IPv4 is stored in its IPv4-mapped IPv6 form
//! (`::ffff:a.b.c.d`), so one map serves `connect4`, `connect6` and dual-stack
//! sockets alike. Ports are stored in host byte order.
#![no_std]

/// Names of the maps in the eBPF object, pinned by name under the pin directory.
pub mod map_names {
    /// Two protected-destination tries: one in force, one being filled by a
    /// reload. [`ACTIVE_SET`] says which is in force.
    pub const DESTINATIONS: [&str; 2] = ["PORTCULLIS_DESTS_0", "PORTCULLIS_DESTS_1"];
    pub const ACTIVE_SET: &str = "PORTCULLIS_ACTIVE";
    pub const PENDING: &str = "PORTCULLIS_PENDING";
    pub const CONNECTIONS: &str = "PORTCULLIS_CONNS";
    pub const EVENTS: &str = "PORTCULLIS_EVENTS";
    pub const COUNTERS: &str = "PORTCULLIS_COUNTERS";
    pub const SETTINGS: &str = "PORTCULLIS_SETTINGS";
    /// Sockets of redirected connections whose bytes skip the TCP stack.
    pub const FAST_PATH: &str = "PORTCULLIS_FAST_PATH";
}

/// Names of the programs in the eBPF object (also their link pin names).
pub mod program_names {
    pub const CONNECT4: &str = "connect4";
    pub const CONNECT6: &str = "connect6";
    pub const SENDMSG4: &str = "sendmsg4";
    pub const SENDMSG6: &str = "sendmsg6";
    pub const SOCK_OPS: &str = "sock_ops";
    pub const ALL: [&str; 5] = [CONNECT4, CONNECT6, SENDMSG4, SENDMSG6, SOCK_OPS];
    /// Attached to the fast-path socket map, not to the cgroup: it has no
    /// link to pin and lives as long as the map.
    pub const FAST_PATH: &str = "fast_path";
}

/// Number of bits of [`DestKey`] before the address: the port.
pub const PORT_PREFIX_BITS: u32 = 16;
/// Bits of the IPv4-mapped prefix `::ffff:0:0/96`.
pub const V4_MAPPED_PREFIX_BITS: u32 = 96;

/// Key of the protected-destination LPM trie: port first, then the address.
///
/// Putting the port first lets one longest-prefix match answer "this port on
/// this network". Port 0 stands for "every port" and is looked up second.
/// The trie's prefix length is `16 + address prefix` (IPv6) or
/// `16 + 96 + address prefix` (IPv4 in mapped form).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DestKey {
    /// Port in network byte order, so prefix bits run in wire order.
    pub port_be: [u8; 2],
    pub addr: [u8; 16],
    pub _pad: [u8; 2],
}

/// What the kernel does with a connect() to a protected destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DestAction {
    /// One of [`action`].
    pub action: u32,
    /// Gateway listener port (host byte order) for [`action::REDIRECT`].
    pub redirect_port: u16,
    pub _pad: u16,
    /// Gateway listener address (v4-mapped or IPv6) for [`action::REDIRECT`].
    pub redirect_addr: [u8; 16],
    /// Index of the rule in the config, reported in events.
    pub rule: u32,
}

pub mod action {
    pub const BLOCK: u32 = 1;
    pub const REDIRECT: u32 = 2;
}

/// Key of the connection table: the client end of a redirected TCP connection,
/// which is exactly the peer address the gateway sees on `accept()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: [u8; 2],
}

/// Key of the fast-path socket map: one TCP socket as seen from its own
/// end. The peer of a socket has the same key with local and remote
/// swapped, which is how a message finds the socket to land in.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketKey {
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
}

impl SocketKey {
    /// The key of the socket at the other end.
    pub const fn peer(&self) -> Self {
        Self {
            local_addr: self.remote_addr,
            remote_addr: self.local_addr,
            local_port: self.remote_port,
            remote_port: self.local_port,
        }
    }
}

/// What the kernel saw when a process called connect(): the evidence the
/// gateway trusts instead of anything the client says.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectRecord {
    pub original_addr: [u8; 16],
    pub original_port: u16,
    pub _pad: [u8; 2],
    pub uid: u32,
    pub gid: u32,
    /// Thread-group id: the process id as userspace knows it.
    pub pid: u32,
    pub rule: u32,
    pub cgroup_id: u64,
    pub comm: [u8; 16],
}

/// Event kinds sent through the ring buffer.
pub mod event_kind {
    /// A TCP connect() was redirected to a gateway listener.
    pub const REDIRECT: u32 = 1;
    /// A connect() (TCP or UDP) was refused with EPERM.
    pub const BLOCK: u32 = 2;
    /// An unconnected UDP sendto() was refused with EPERM.
    pub const UDP_SEND_BLOCK: u32 = 3;
}

/// One enforcement event, reported to userspace for logging and audit.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectEvent {
    pub kind: u32,
    pub rule: u32,
    pub record: ConnectRecord,
    /// Socket type: 1 = stream (TCP), 2 = datagram (UDP).
    pub sock_type: u32,
    pub _pad: u32,
}

/// Indexes of the per-CPU counter array.
pub mod counter {
    pub const REDIRECTED: u32 = 0;
    pub const BLOCKED: u32 = 1;
    pub const UDP_SEND_BLOCKED: u32 = 2;
    /// Connects that carried the gateway's exemption mark.
    pub const EXEMPT: u32 = 3;
    /// Events lost because the ring buffer was full.
    pub const EVENTS_LOST: u32 = 4;
    /// Redirected sockets whose pending record had vanished at TCP connect.
    pub const RECORDS_LOST: u32 = 5;
    /// Redirected client sockets put on the fast path.
    pub const FAST_PATH_SOCKETS: u32 = 6;
    /// Messages handed straight to the peer socket, past the TCP stack.
    pub const FAST_PATH_MESSAGES: u32 = 7;
    pub const COUNT: u32 = 8;
    pub const NAMES: [&str; COUNT as usize] = [
        "redirected",
        "blocked",
        "udp_send_blocked",
        "exempt",
        "events_lost",
        "records_lost",
        "fast_path_sockets",
        "fast_path_messages",
    ];
}

/// Index 0 of the settings array: how the gateway identifies itself.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// SO_MARK the gateway puts on its upstream sockets (needs CAP_NET_ADMIN).
    pub exempt_mark: u32,
    /// Non-zero once userspace has filled this in; until then nothing is exempt.
    pub configured: u32,
    /// Cookie of the gateway's network namespace. Redirects only make sense
    /// there (another namespace has its own loopback), and the exemption mark
    /// only counts there (a user namespace grants CAP_NET_ADMIN over its own
    /// network namespace, so a mark set elsewhere proves nothing).
    pub gateway_netns_cookie: u64,
}

/// Maximum protected destination rules.
pub const MAX_DESTINATIONS: u32 = 4096;
/// Maximum redirected connections awaiting accept() by the gateway.
pub const MAX_CONNECTIONS: u32 = 65536;
/// Maximum sockets on the fast path (both ends of each connection).
pub const MAX_FAST_PATH_SOCKETS: u32 = 131072;
/// Ring buffer size in bytes (a power of two, multiple of the page size).
pub const EVENTS_BYTES: u32 = 1 << 20;

/// Stores an IPv4 address (network-order octets) in mapped form.
pub const fn v4_mapped(octets: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

/// True when a 16-byte address is an IPv4-mapped IPv6 address.
pub fn is_v4_mapped(addr: &[u8; 16]) -> bool {
    addr[..10].iter().all(|b| *b == 0) && addr[10] == 0xff && addr[11] == 0xff
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)] structs of integers and byte arrays
    // with explicit padding, so every bit pattern is valid.
    unsafe impl aya::Pod for DestKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for DestAction {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ClientKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ConnectRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ConnectEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Settings {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SocketKey {}
}
