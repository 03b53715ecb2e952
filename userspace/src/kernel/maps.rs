//! Typed handles on the pinned maps shared with the kernel programs.

use std::{collections::HashMap as StdHashMap, net::SocketAddr, path::Path, sync::Mutex};

use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    Array, HashMap, Map, MapData, PerCpuArray,
};
use portcullis_common::{
    action, counter, map_names, ClientKey, ConnectRecord, DestAction, DestKey, Settings,
    PORT_PREFIX_BITS, V4_MAPPED_PREFIX_BITS,
};

use super::{addr, ConnectOrigin, KernelError};
use crate::config::Config;

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

impl CompiledRule {
    fn identity(&self) -> (u32, DestKey) {
        (self.key.prefix_len(), self.key.data())
    }
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

/// The protected-destination trie.
pub struct Destinations(LpmTrie<MapData, DestKey, DestAction>);

/// What a [`Destinations::replace_all`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub written: usize,
    pub removed: usize,
}

impl Destinations {
    pub(super) fn open(pin_dir: &Path) -> Result<Self, KernelError> {
        let map = open_pinned(pin_dir, map_names::DESTINATIONS)?;
        Ok(Self(
            LpmTrie::try_from(map).map_err(map_err(map_names::DESTINATIONS))?,
        ))
    }

    /// Makes the trie hold exactly `rules`.
    ///
    /// New and changed entries are written first (each update replaces one
    /// entry atomically), stale ones removed last: at no moment is a
    /// destination that is protected both before and after unprotected.
    pub fn replace_all(&mut self, rules: &[CompiledRule]) -> Result<SyncReport, KernelError> {
        let name = map_names::DESTINATIONS;
        let existing: Vec<Key<DestKey>> = self
            .0
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err(name))?;
        for rule in rules {
            self.0
                .insert(&rule.key, rule.action, 0)
                .map_err(map_err(name))?;
        }
        let wanted: std::collections::HashSet<(u32, DestKey)> =
            rules.iter().map(CompiledRule::identity).collect();
        let mut removed = 0;
        for key in existing {
            if !wanted.contains(&(key.prefix_len(), key.data())) {
                self.0.remove(&key).map_err(map_err(name))?;
                removed += 1;
            }
        }
        Ok(SyncReport {
            written: rules.len(),
            removed,
        })
    }

    /// Every entry, for status output.
    pub fn entries(&self) -> Result<Vec<(Key<DestKey>, DestAction)>, KernelError> {
        self.0
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(map_names::DESTINATIONS))
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
        let mut table = self.0.lock().unwrap_or_else(|e| e.into_inner());
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
        let table = self.0.lock().unwrap_or_else(|e| e.into_inner());
        table.keys().filter(Result::is_ok).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
