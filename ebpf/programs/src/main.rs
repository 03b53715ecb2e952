//! Portcullis kernel programs.
//!
//! * `connect4` / `connect6` (cgroup/connect*): every connect() in the cgroup
//!   subtree. A protected TCP destination is rewritten to the gateway listener
//!   (redirect) or refused with EPERM (block); UDP to a protected destination
//!   is always refused, the gateway only proxies TCP.
//! * `sendmsg4` / `sendmsg6` (cgroup/sendmsg*): unconnected UDP sendto(),
//!   which never passes through connect().
//! * `sock_ops`: when a redirected socket sends its SYN its local port is
//!   known, so the connect-time record is re-keyed by (local address, local
//!   port): the peer address the gateway sees on accept(). Once it is
//!   established, the socket joins the fast-path map.
//! * `fast_path` (sk_msg, on the fast-path map): a message sent on a socket
//!   whose peer is also in the map (the gateway adds its end on accept) is
//!   put straight into the peer's receive queue, past the TCP/IP stack. Both
//!   ends are local, so loopback TCP only costs CPU; the bytes and their
//!   order are the same.
//!
//! The gateway's own upstream sockets carry an SO_MARK (setting one needs
//! CAP_NET_ADMIN) and are left alone, but only in the gateway's own network
//! namespace. Counters live in a per-CPU array so the hot path takes no lock
//! and logs nothing.
//!
//! The crate is built for `bpfel-unknown-none` (userspace/build.rs). On the
//! host it compiles to an empty program, so that `cargo clippy --workspace`
//! checks this code too.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    bindings::{
        bpf_sock_addr, sk_action::SK_PASS, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_TCP_CONNECT_CB,
    },
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid,
    },
    macros::{cgroup_sock_addr, map, sk_msg, sock_ops},
    maps::{lpm_trie::Key, Array, LpmTrie, LruHashMap, PerCpuArray, RingBuf, SockHash},
    programs::{SkMsgContext, SockAddrContext, SockOpsContext},
    EbpfContext,
};
use aya_log_ebpf::warn;
use portcullis_common::{
    action, counter, event_kind, is_v4_mapped, v4_mapped, ClientKey, ConnectEvent, ConnectRecord,
    DestAction, DestKey, Settings, SocketKey, EVENTS_BYTES, MAX_CONNECTIONS, MAX_DESTINATIONS,
    MAX_FAST_PATH_SOCKETS, PORT_PREFIX_BITS,
};

/// cgroup sock_addr verdicts.
const ALLOW: i32 = 1;
const DENY: i32 = 0;
const SOCK_STREAM: u32 = 1;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// The protected set, double-buffered: a reload fills the idle trie, then
/// flips ACTIVE_SET with one word write, so no connect ever sees a
/// half-updated set.
#[map(name = "PORTCULLIS_DESTS_0")]
static DESTINATIONS_0: LpmTrie<DestKey, DestAction> = LpmTrie::pinned(MAX_DESTINATIONS, 0);

#[map(name = "PORTCULLIS_DESTS_1")]
static DESTINATIONS_1: LpmTrie<DestKey, DestAction> = LpmTrie::pinned(MAX_DESTINATIONS, 0);

#[map(name = "PORTCULLIS_ACTIVE")]
static ACTIVE_SET: Array<u32> = Array::pinned(1, 0);

/// Redirected sockets between connect() and their SYN, by socket cookie.
#[map(name = "PORTCULLIS_PENDING")]
static PENDING: LruHashMap<u64, ConnectRecord> = LruHashMap::pinned(MAX_CONNECTIONS, 0);

/// Redirected connections by client address, for the gateway to look up.
#[map(name = "PORTCULLIS_CONNS")]
static CONNECTIONS: LruHashMap<ClientKey, ConnectRecord> = LruHashMap::pinned(MAX_CONNECTIONS, 0);

#[map(name = "PORTCULLIS_EVENTS")]
static EVENTS: RingBuf = RingBuf::pinned(EVENTS_BYTES, 0);

#[map(name = "PORTCULLIS_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counter::COUNT, 0);

#[map(name = "PORTCULLIS_SETTINGS")]
static SETTINGS: Array<Settings> = Array::pinned(1, 0);

/// Both ends of redirected connections, for the `fast_path` program.
#[map(name = "PORTCULLIS_FAST_PATH")]
static FAST_PATH: SockHash<SocketKey> = SockHash::pinned(MAX_FAST_PATH_SOCKETS, 0);

/// Reads [`SocketFields`] from a `bpf_sock_ops` or `sk_msg_md` pointer:
/// two context types with the same field names. Each field is read once,
/// volatile (see `rekey_redirected`). Use inside `unsafe`, with a pointer
/// to the live context.
macro_rules! socket_fields {
    ($ctx:expr) => {
        SocketFields {
            family: read(&(*$ctx).family),
            local4: read(&(*$ctx).local_ip4),
            remote4: read(&(*$ctx).remote_ip4),
            local6: [
                read(&(*$ctx).local_ip6[0]),
                read(&(*$ctx).local_ip6[1]),
                read(&(*$ctx).local_ip6[2]),
                read(&(*$ctx).local_ip6[3]),
            ],
            remote6: [
                read(&(*$ctx).remote_ip6[0]),
                read(&(*$ctx).remote_ip6[1]),
                read(&(*$ctx).remote_ip6[2]),
                read(&(*$ctx).remote_ip6[3]),
            ],
            local_port: read(&(*$ctx).local_port),
            remote_port: read(&(*$ctx).remote_port),
        }
    };
}

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: ctx points at the kernel's bpf_sock_addr for this call; every
    // field is read with a full-width volatile load as the verifier requires.
    let (ip, port) = unsafe { (read(&(*sa).user_ip4), read(&(*sa).user_port)) };
    let dest = v4_mapped(ip.to_ne_bytes());
    match handle_connect(&ctx, dest, port_from_ctx(port), false) {
        Verdict::Redirect(target, port) => {
            let word = [target[12], target[13], target[14], target[15]];
            // SAFETY: user_ip4/user_port are writable in connect hooks; each
            // is written with one full 32-bit store at a constant offset.
            unsafe {
                core::ptr::write_volatile(&mut (*sa).user_ip4, u32::from_ne_bytes(word));
                core::ptr::write_volatile(&mut (*sa).user_port, port_to_ctx(port));
            }
            ALLOW
        }
        Verdict::Allow => ALLOW,
        Verdict::Deny => DENY,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    let dest = read_user_ip6(ctx.sock_addr);
    // SAFETY: as in connect4.
    let port = unsafe { read(&(*ctx.sock_addr).user_port) };
    match handle_connect(&ctx, dest, port_from_ctx(port), true) {
        Verdict::Redirect(target, port) => {
            let sa = ctx.sock_addr;
            let w = |i: usize| {
                u32::from_ne_bytes([target[i], target[i + 1], target[i + 2], target[i + 3]])
            };
            // SAFETY: as in connect4; user_ip6 is written word by word.
            unsafe {
                core::ptr::write_volatile(&mut (*sa).user_ip6[0], w(0));
                core::ptr::write_volatile(&mut (*sa).user_ip6[1], w(4));
                core::ptr::write_volatile(&mut (*sa).user_ip6[2], w(8));
                core::ptr::write_volatile(&mut (*sa).user_ip6[3], w(12));
                core::ptr::write_volatile(&mut (*sa).user_port, port_to_ctx(port));
            }
            ALLOW
        }
        Verdict::Allow => ALLOW,
        Verdict::Deny => DENY,
    }
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: as in connect4.
    let (ip, port) = unsafe { (read(&(*sa).user_ip4), read(&(*sa).user_port)) };
    handle_sendmsg(&ctx, v4_mapped(ip.to_ne_bytes()), port_from_ctx(port))
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    let dest = read_user_ip6(ctx.sock_addr);
    // SAFETY: as in connect4.
    let port = unsafe { read(&(*ctx.sock_addr).user_port) };
    handle_sendmsg(&ctx, dest, port_from_ctx(port))
}

#[sock_ops]
pub fn sock_ops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        rekey_redirected(&ctx);
    } else if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        join_fast_path(&ctx);
    }
    1
}

#[sk_msg]
pub fn fast_path(ctx: SkMsgContext) -> u32 {
    let msg = ctx.msg;
    // SAFETY: msg points at the kernel's sk_msg_md for this call; every
    // field is read once, volatile, as for sock_ops.
    let fields = unsafe { socket_fields!(msg) };
    let mut peer = fields.key().peer();
    // Without a peer in the map the helper finds nothing to redirect to and
    // the message takes the normal path.
    if FAST_PATH.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS) {
        bump(counter::FAST_PATH_MESSAGES);
    }
    SK_PASS
}

/// A socket's addresses and ports as sock_ops and sk_msg contexts give
/// them: IPv4 words in network order, the local port in host order, the
/// remote port in network order in the upper 16 bits.
struct SocketFields {
    family: u32,
    local4: u32,
    remote4: u32,
    local6: [u32; 4],
    remote6: [u32; 4],
    local_port: u32,
    remote_port: u32,
}

impl SocketFields {
    #[inline(always)]
    fn key(&self) -> SocketKey {
        let (local_addr, remote_addr) = if self.family == AF_INET {
            (
                v4_mapped(self.local4.to_ne_bytes()),
                v4_mapped(self.remote4.to_ne_bytes()),
            )
        } else {
            (words_to_addr(&self.local6), words_to_addr(&self.remote6))
        };
        SocketKey {
            local_addr,
            remote_addr,
            local_port: self.local_port as u16,
            remote_port: u16::from_be((self.remote_port >> 16) as u16),
        }
    }
}

#[inline(always)]
fn words_to_addr(words: &[u32; 4]) -> [u8; 16] {
    let mut a = [0u8; 16];
    for (i, word) in words.iter().enumerate() {
        a[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    a
}

/// Puts an established client socket on the fast path, if its connect was
/// redirected (the connection table knows its local end).
#[inline(always)]
fn join_fast_path(ctx: &SockOpsContext) {
    let ops = ctx.ops;
    // SAFETY: ops points at the kernel's bpf_sock_ops for this call.
    let fields = unsafe { socket_fields!(ops) };
    let mut key = fields.key();
    let client = ClientKey {
        addr: key.local_addr,
        port: key.local_port,
        _pad: [0; 2],
    };
    // SAFETY: only tested for presence.
    if unsafe { CONNECTIONS.get(client) }.is_none() {
        return;
    }
    // SAFETY: ops is the live context; the helper only reads the socket.
    if FAST_PATH.update(&mut key, unsafe { &mut *ops }, 0).is_ok() {
        bump(counter::FAST_PATH_SOCKETS);
    }
}

/// What a connect hook does after [`handle_connect`].
enum Verdict {
    Allow,
    Deny,
    /// Rewrite the destination to this gateway listener.
    Redirect([u8; 16], u16),
}

/// Decides on one connect(). The caller performs the rewrite, so that every
/// context store has a constant offset (the verifier refuses stores through
/// a computed context pointer).
#[inline(always)]
fn handle_connect(ctx: &SockAddrContext, dest: [u8; 16], port: u16, is_v6: bool) -> Verdict {
    let Some(rule) = lookup_destination(&dest, port) else {
        return Verdict::Allow;
    };
    let settings = SETTINGS.get(0);
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if is_exempt(ctx, settings, netns) {
        bump(counter::EXEMPT);
        return Verdict::Allow;
    }
    // SAFETY: as in connect4.
    let sock_type = unsafe { read(&(*ctx.sock_addr).type_) };
    let in_gateway_netns = matches!(settings, Some(s) if s.gateway_netns_cookie == netns);
    let target = rule.redirect_addr;
    let redirectable = rule.action == action::REDIRECT
        && sock_type == SOCK_STREAM
        && in_gateway_netns
        && (is_v6 || is_v4_mapped(&target));
    let record = current_record(dest, port, rule.rule);
    if !redirectable {
        bump(counter::BLOCKED);
        emit(event_kind::BLOCK, &record, sock_type);
        return Verdict::Deny;
    }
    if target == dest && rule.redirect_port == port {
        // Already headed for the gateway listener: never redirect it to itself.
        return Verdict::Allow;
    }
    // SAFETY: the socket cookie helper is valid for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if PENDING.insert(cookie, record, 0).is_err() {
        // Without a record the gateway would refuse the connection anyway:
        // fail now, and visibly.
        bump(counter::BLOCKED);
        emit(event_kind::BLOCK, &record, sock_type);
        return Verdict::Deny;
    }
    bump(counter::REDIRECTED);
    emit(event_kind::REDIRECT, &record, sock_type);
    Verdict::Redirect(target, rule.redirect_port)
}

#[inline(always)]
fn handle_sendmsg(ctx: &SockAddrContext, dest: [u8; 16], port: u16) -> i32 {
    let Some(rule) = lookup_destination(&dest, port) else {
        return ALLOW;
    };
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if is_exempt(ctx, SETTINGS.get(0), netns) {
        bump(counter::EXEMPT);
        return ALLOW;
    }
    let record = current_record(dest, port, rule.rule);
    bump(counter::UDP_SEND_BLOCKED);
    // SAFETY: as in connect4.
    let sock_type = unsafe { read(&(*ctx.sock_addr).type_) };
    emit(event_kind::UDP_SEND_BLOCK, &record, sock_type);
    DENY
}

/// The gateway's own sockets: marked, and in the gateway's network namespace.
#[inline(always)]
fn is_exempt(ctx: &SockAddrContext, settings: Option<&Settings>, netns: u64) -> bool {
    let Some(settings) = settings else {
        return false;
    };
    if settings.configured == 0 || settings.gateway_netns_cookie != netns {
        return false;
    }
    // SAFETY: `sk` is always set for sock_addr programs; `mark` is a readable
    // field of bpf_sock.
    let mark = unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        read(&(*sk).mark)
    };
    mark == settings.exempt_mark
}

/// Exact port first, then the "every port" entry (port 0).
#[inline(always)]
fn lookup_destination(dest: &[u8; 16], port: u16) -> Option<DestAction> {
    let destinations = match ACTIVE_SET.get(0) {
        Some(1) => &DESTINATIONS_1,
        _ => &DESTINATIONS_0,
    };
    let full_len = PORT_PREFIX_BITS + 128;
    for candidate in [port, 0] {
        let key = Key::new(
            full_len,
            DestKey {
                port_be: candidate.to_be_bytes(),
                addr: *dest,
                _pad: [0; 2],
            },
        );
        if let Some(action) = destinations.get(&key) {
            return Some(*action);
        }
    }
    None
}

#[inline(always)]
fn current_record(dest: [u8; 16], port: u16, rule: u32) -> ConnectRecord {
    let uid_gid = bpf_get_current_uid_gid();
    ConnectRecord {
        original_addr: dest,
        original_port: port,
        _pad: [0; 2],
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        rule,
        // SAFETY: no arguments; valid in every program type used here.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    }
}

#[inline(always)]
fn rekey_redirected(ctx: &SockOpsContext) {
    // SAFETY: the socket cookie helper is valid for sock_ops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out before the entry is removed.
    let Some(record) = (unsafe { PENDING.get(cookie) }).copied() else {
        return;
    };
    // Every context field is read up front with a volatile load: the
    // verifier refuses loads through a context pointer the compiler computed
    // to share one load between branches.
    let ops = ctx.ops;
    // SAFETY: ops points at the kernel's bpf_sock_ops for this call.
    let (family, local4, local6, remote6) = unsafe {
        (
            read(&(*ops).family),
            read(&(*ops).local_ip4),
            [
                read(&(*ops).local_ip6[0]),
                read(&(*ops).local_ip6[1]),
                read(&(*ops).local_ip6[2]),
                read(&(*ops).local_ip6[3]),
            ],
            [
                read(&(*ops).remote_ip6[0]),
                read(&(*ops).remote_ip6[1]),
                read(&(*ops).remote_ip6[2]),
            ],
        )
    };
    // SAFETY: as above.
    let local_port = unsafe { read(&(*ops).local_port) };
    // A dual-stack socket talking to an IPv4 peer is AF_INET6 with a mapped
    // remote address; its local address is the IPv4 one.
    let uses_v4 = family == AF_INET
        || (family == AF_INET6
            && remote6[0] == 0
            && remote6[1] == 0
            && remote6[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff]));
    let addr = if uses_v4 {
        v4_mapped(local4.to_ne_bytes())
    } else {
        let mut a = [0u8; 16];
        for (i, word) in local6.iter().enumerate() {
            a[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
        a
    };
    let key = ClientKey {
        addr,
        port: local_port as u16,
        _pad: [0; 2],
    };
    if CONNECTIONS.insert(key, record, 0).is_err() {
        bump(counter::RECORDS_LOST);
        warn!(ctx, "portcullis: could not store connection record");
    }
    let _ = PENDING.remove(cookie);
}

#[inline(always)]
fn emit(kind: u32, record: &ConnectRecord, sock_type: u32) {
    let event = ConnectEvent {
        kind,
        rule: record.rule,
        record: *record,
        sock_type,
        _pad: 0,
    };
    if EVENTS.output::<ConnectEvent>(&event, 0).is_err() {
        bump(counter::EVENTS_LOST);
    }
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, not shared with another CPU; preemption is
        // disabled while the program runs.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn read_user_ip6(sa: *mut bpf_sock_addr) -> [u8; 16] {
    let mut out = [0u8; 16];
    for i in 0..4 {
        // SAFETY: user_ip6 must be read one 32-bit word at a time.
        let word = unsafe { read(&(*sa).user_ip6[i]) };
        out[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    out
}

/// Inverse of [`port_from_ctx`].
#[inline(always)]
fn port_to_ctx(port: u16) -> u32 {
    u32::from(port.to_be())
}

/// The port lives in the low 16 bits of user_port, in network byte order.
#[inline(always)]
fn port_from_ctx(raw: u32) -> u16 {
    u16::from_be(raw as u16)
}

/// # Safety
/// `p` must point at a readable context field.
#[inline(always)]
unsafe fn read<T: Copy>(p: *const T) -> T {
    core::ptr::read_volatile(p)
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
