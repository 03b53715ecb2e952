//! Typed handles on the pinned maps shared with the kernel programs.

use std::{
    collections::HashMap as StdHashMap, net::SocketAddr, os::fd::AsRawFd, path::Path, sync::Mutex,
};

use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    Array, HashMap, Map, MapData, PerCpuArray, SockHash,
};
use portcullis_common::{
    action, counter, map_names, ClientKey, ConnectRecord, DestAction, DestKey, Settings, SocketKey,
    PORT_PREFIX_BITS, V4_MAPPED_PREFIX_BITS,
};

use super::{addr, ConnectOrigin, KernelError};
use crate::{config::Config, lock};

/// Opens a pinned map by its name under `<pin_dir>/maps/`.
pub(super) fn open_pinned(pin_dir: &Path, name: &'static str) -> Result<Map, KernelError> {
    let path = pin_dir.join("maps").join(name);
    let data = MapData::from_pin(&path).map_err(|source| KernelError::Map {
        name,
        source: Box::new(source),
    })?;
    Map::from_map_data(data).map_err(|source| KernelError::Map {
        name,
        source: Box::new(source),
    })
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> KernelError {
    move |source| KernelError::Map {
        name,
        source: Box::new(source),
    }
}

/// One entry of the protected-destination trie, compiled from a config rule.
#[derive(Clone, Copy)]
pub struct CompiledRule {
    pub key: Key<DestKey>,
    pub action: DestAction,
}

/// Turns the `[[protect]]` rules into trie entries.
///
/// # Errors
/// Two rules for the same network and port: the kernel could keep only one,
/// so the config is refused rather than silently picking.
pub fn compile_rules(config: &Config) -> Result<Vec<CompiledRule>, KernelError> {
    let mut seen: StdHashMap<(u32, DestKey), usize> = StdHashMap::new();
    let mut compiled = Vec::with_capacity(config.protect.len());
    for (index, rule) in config.protect.iter().enumerate() {
        let net = rule.destination.0;
        let mapped_bits = if net.addr().is_ipv4() {
            V4_MAPPED_PREFIX_BITS
        } else {
            0
        };
        let prefix_len = PORT_PREFIX_BITS + mapped_bits + u32::from(net.prefix_len());
        let data = DestKey {
            port_be: rule.port.unwrap_or(0).to_be_bytes(),
            addr: addr::to_kernel(net.network()),
            _pad: [0; 2],
        };
        if let Some(first) = seen.insert((prefix_len, data), index) {
            return Err(KernelError::Rules(format!(
                "protect rule #{} repeats rule #{} ({} port {}); keep one of them",
                index + 1,
                first + 1,
                rule.destination,
                rule.port.map_or("any".to_string(), |p| p.to_string())
            )));
        }
        let mut entry = DestAction {
            action: action::BLOCK,
            redirect_port: 0,
            _pad: 0,
            redirect_addr: [0; 16],
            rule: index as u32,
        };
        if let Some(listener) = config.listener(&rule.to) {
            let target = listener.redirect_target();
            entry.action = action::REDIRECT;
            entry.redirect_addr = addr::to_kernel(target.ip());
            entry.redirect_port = target.port();
        }
        compiled.push(CompiledRule {
            key: Key::new(prefix_len, data),
            action: entry,
        });
    }
    Ok(compiled)
}

/// The protected set: two tries and the index of the one in force.
pub struct Destinations {
    tries: [LpmTrie<MapData, DestKey, DestAction>; 2],
    active: Array<MapData, u32>,
}

/// What a [`Destinations::replace_all`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Entries in the new protected set.
    pub written: usize,
    /// The trie now in force (0 or 1).
    pub active_set: u32,
}

impl Destinations {
    pub(super) fn open(pin_dir: &Path) -> Result<Self, KernelError> {
        let open_trie = |name: &'static str| -> Result<_, KernelError> {
            LpmTrie::try_from(open_pinned(pin_dir, name)?).map_err(map_err(name))
        };
        let [first, second] = map_names::DESTINATIONS;
        let active_name = map_names::ACTIVE_SET;
        Ok(Self {
            tries: [open_trie(first)?, open_trie(second)?],
            active: Array::try_from(open_pinned(pin_dir, active_name)?)
                .map_err(map_err(active_name))?,
        })
    }

    fn active_index(&self) -> Result<u32, KernelError> {
        Ok(self
            .active
            .get(&0, 0)
            .map_err(map_err(map_names::ACTIVE_SET))?
            & 1)
    }

    /// Makes `rules` the protected set.
    ///
    /// The idle trie is emptied and filled, then one 32-bit write flips the
    /// programs over to it. A connect sees either the whole old set or the
    /// whole new one, never a mix and never a gap. The old trie is left as
    /// it is until the next reload, so a program that read the old index an
    /// instant before the flip still finds its entries.
    pub fn replace_all(&mut self, rules: &[CompiledRule]) -> Result<SyncReport, KernelError> {
        let idle = 1 - self.active_index()?;
        let name = map_names::DESTINATIONS[idle as usize];
        let trie = &mut self.tries[idle as usize];
        let stale: Vec<Key<DestKey>> = trie
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err(name))?;
        for key in stale {
            trie.remove(&key).map_err(map_err(name))?;
        }
        for rule in rules {
            trie.insert(&rule.key, rule.action, 0)
                .map_err(map_err(name))?;
        }
        self.active
            .set(0, idle, 0)
            .map_err(map_err(map_names::ACTIVE_SET))?;
        Ok(SyncReport {
            written: rules.len(),
            active_set: idle,
        })
    }

    /// Every entry of the set in force, for status output.
    pub fn entries(&self) -> Result<Vec<(Key<DestKey>, DestAction)>, KernelError> {
        let active = self.active_index()?;
        self.tries[active as usize]
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(map_names::DESTINATIONS[active as usize]))
    }
}

/// Redirected connections by client address, filled by the sock_ops program.
pub struct ConnectionTable(Mutex<HashMap<MapData, ClientKey, ConnectRecord>>);

impl ConnectionTable {
    pub(super) fn open(pin_dir: &Path) -> Result<Self, KernelError> {
        let map = open_pinned(pin_dir, map_names::CONNECTIONS)?;
        let table = HashMap::try_from(map).map_err(map_err(map_names::CONNECTIONS))?;
        Ok(Self(Mutex::new(table)))
    }

    /// Takes the kernel's record of the connection whose client end is
    /// `peer` (the address returned by accept()). Each record is handed out
    /// once.
    pub fn take(&self, peer: SocketAddr) -> Result<Option<ConnectOrigin>, KernelError> {
        let key = ClientKey {
            addr: addr::to_kernel(peer.ip()),
            port: peer.port(),
            _pad: [0; 2],
        };
        let mut table = lock(&self.0);
        let record = match table.get(&key, 0) {
            Ok(record) => record,
            Err(aya::maps::MapError::KeyNotFound) => return Ok(None),
            Err(e) => return Err(map_err(map_names::CONNECTIONS)(e)),
        };
        // A failed removal only leaves an entry for the LRU to evict.
        let _ = table.remove(&key);
        Ok(Some(ConnectOrigin::from_record(&record)))
    }

    pub fn len(&self) -> usize {
        let table = lock(&self.0);
        table.keys().filter(Result::is_ok).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The gateway's handle on the fast-path socket map (see the `fast_path`
/// kernel program): the kernel adds the client end of each redirected
/// connection, the gateway adds its own end on accept.
pub struct FastPath(Mutex<SockHash<MapData, SocketKey>>);

impl FastPath {
    pub(super) fn open(pin_dir: &Path) -> Result<Self, KernelError> {
        let name = map_names::FAST_PATH;
        let map = SockHash::try_from(open_pinned(pin_dir, name)?).map_err(map_err(name))?;
        Ok(Self(Mutex::new(map)))
    }

    /// Puts the gateway's end of a connection on the fast path. Call it
    /// before reading from the socket, and only for protocols where the
    /// client waits for an answer before sending more: bytes the client
    /// sent before this call take the TCP path, later ones the fast path,
    /// and a client that sent both before the gateway read could see them
    /// delivered out of order.
    pub fn join(
        &self,
        socket: &impl AsRawFd,
        local: SocketAddr,
        peer: SocketAddr,
    ) -> Result<(), KernelError> {
        let key = SocketKey {
            local_addr: addr::to_kernel(local.ip()),
            remote_addr: addr::to_kernel(peer.ip()),
            local_port: local.port(),
            remote_port: peer.port(),
        };
        let mut map = lock(&self.0);
        map.insert(key, socket.as_raw_fd(), 0)
            .map_err(map_err(map_names::FAST_PATH))
    }
}

/// Sums the per-CPU counters.
pub fn read_counters(pin_dir: &Path) -> Result<Vec<(&'static str, u64)>, KernelError> {
    let name = map_names::COUNTERS;
    let map = open_pinned(pin_dir, name)?;
    let counters: PerCpuArray<MapData, u64> = PerCpuArray::try_from(map).map_err(map_err(name))?;
    let mut out = Vec::new();
    for index in 0..counter::COUNT {
        let values = counters.get(&index, 0).map_err(map_err(name))?;
        out.push((counter::NAMES[index as usize], values.iter().sum()));
    }
    Ok(out)
}

/// Tells the kernel programs how to recognise the gateway's own sockets.
pub fn write_settings(pin_dir: &Path, settings: Settings) -> Result<(), KernelError> {
    let name = map_names::SETTINGS;
    let map = open_pinned(pin_dir, name)?;
    let mut array: Array<MapData, Settings> = Array::try_from(map).map_err(map_err(name))?;
    array.set(0, settings, 0).map_err(map_err(name))
}
