//! The gateway configuration file (`/etc/portcullis/portcullis.toml`).
//!
//! Parsing happens in two steps, as in ripgrep: serde reads the raw TOML, then
//! [`Config::validate`] checks cross-references (a rule naming a listener that
//! does not exist, duplicate names) so that everything after it can rely on a
//! consistent configuration.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde::Deserialize;

/// Where the daemon looks for its configuration unless told otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/portcullis/portcullis.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Directory for state (audit events, keys). Created by the installer.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default)]
    pub kernel: KernelConfig,
    /// `[proxy]`: the threads that carry sessions.
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default, rename = "protect")]
    pub protect: Vec<ProtectRule>,
    /// The OIDC provider; without it sessions are named by local account.
    #[serde(default)]
    pub identity: Option<crate::identity::IdentityConfig>,
    /// Protected upstreams the protocol adapters serve (see [`crate::resource`]).
    #[serde(default, rename = "resource")]
    pub resources: Vec<crate::resource::ResourceConfig>,
    /// The audit store: retention, checkpoints, export.
    #[serde(default)]
    pub audit: crate::audit::AuditConfig,
    /// `[policy]`: the policy file (see [`crate::policy`]). Without it,
    /// every statement is allowed and nothing is masked.
    #[serde(default)]
    pub policy: Option<PolicyConfig>,
}

/// `[policy]`: a table rather than a top-level key so it can sit anywhere
/// in the file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// The policy file; a relative path is taken from the config file's
    /// directory.
    pub file: PathBuf,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KernelConfig {
    /// cgroup v2 directory to attach to. Empty means the root of the cgroup v2
    /// hierarchy, found in /proc/self/mounts: every process on the host.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// bpffs directory holding the pinned links and maps.
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    /// SO_MARK value on the gateway's own upstream sockets.
    #[serde(default = "default_exempt_mark")]
    pub exempt_mark: u32,
    /// Bytes between a local client and a PostgreSQL listener skip the
    /// TCP/IP stack (a socket map in the kernel hands each message to the
    /// other end). Same bytes, same order, less CPU.
    #[serde(default = "default_true")]
    pub fast_path: bool,
}

impl Default for KernelConfig {
    fn default() -> Self {
        Self {
            cgroup: None,
            pin_dir: default_pin_dir(),
            exempt_mark: default_exempt_mark(),
            fast_path: true,
        }
    }
}

fn default_true() -> bool {
    true
}

/// Most proxy worker threads a config may ask for.
const MAX_WORKERS: usize = 256;

/// `[proxy]`: the data plane's threads.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Threads that carry sessions, each with its own event loop; whichever
    /// is free accepts the next connection, and a session stays on the
    /// thread that accepted it.
    /// Unset: half the CPUs, at least one, which leaves the rest to the
    /// clients and databases that usually share a bastion.
    #[serde(default)]
    pub workers: Option<usize>,
}

impl ProxyConfig {
    /// The number of worker threads to start.
    pub fn workers(&self) -> usize {
        self.workers.unwrap_or_else(|| {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cpus / 2).max(1)
        })
    }
}

/// A gateway listener: where redirected (and later, direct) clients arrive.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    pub address: SocketAddr,
    #[serde(default)]
    pub protocol: Protocol,
    /// Also accept clients that were not redirected by the kernel (remote
    /// clients); they must present a token. PostgreSQL listeners only.
    #[serde(default)]
    pub direct: bool,
    /// PEM certificate chain offered to clients that ask for TLS.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
}

impl ListenerConfig {
    /// The address the kernel rewrites connects to: a wildcard listen
    /// address is reached through loopback.
    pub fn redirect_target(&self) -> SocketAddr {
        let ip = match self.address.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        SocketAddr::new(ip, self.address.port())
    }
}

/// What a listener speaks. More protocols arrive with their adapters.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Opaque TCP: relay bytes to the original destination, record the session.
    #[default]
    Tcp,
    /// PostgreSQL wire protocol: identity-bound, per-statement recording.
    Postgres,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Postgres => "postgres",
        }
    }
}

/// A protected destination and what happens to connects to it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProtectRule {
    /// An address (`10.0.0.5`, `::1`) or a network (`10.0.0.0/24`).
    pub destination: Destination,
    /// Port; every port when omitted.
    #[serde(default)]
    pub port: Option<u16>,
    /// A listener name to redirect to, or `block`.
    pub to: String,
}

impl ProtectRule {
    pub fn is_block(&self) -> bool {
        self.to == "block"
    }
}

/// Address or CIDR network, as written in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Destination(pub IpNet);

impl<'de> Deserialize<'de> for Destination {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse()
            .map_err(|e: String| serde::de::Error::custom(e))
    }
}

impl std::str::FromStr for Destination {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if let Ok(net) = text.parse::<IpNet>() {
            return Ok(Self(net.trunc()));
        }
        text.parse::<IpAddr>()
            .map(|ip| Self(IpNet::from(ip)))
            .map_err(|_| {
                format!(
                    "'{text}' is not an address or network (examples: 10.0.0.5, 10.0.0.0/24, ::1)"
                )
            })
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.prefix_len() == self.0.max_prefix_len() {
            write!(f, "{}", self.0.addr())
        } else {
            write!(f, "{}", self.0)
        }
    }
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/portcullis")
}

fn default_pin_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/portcullis")
}

fn default_exempt_mark() -> u32 {
    // "PCLS"
    0x5043_4c53
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::from_file_text(path, &Self::read(path)?)
    }

    /// A config file's text, unparsed.
    pub fn read(path: &Path) -> Result<String, ConfigError> {
        std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })
    }

    /// Parses and validates `text`, read from `path` (named in errors).
    pub fn from_file_text(path: &Path, text: &str) -> Result<Self, ConfigError> {
        Self::parse(text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.to_owned(),
                source,
            },
            other => other,
        })
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::new(),
            source: Box::new(source),
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.audit.validate().map_err(ConfigError::Invalid)?;
        if let Some(workers) = self.proxy.workers {
            if !(1..=MAX_WORKERS).contains(&workers) {
                return Err(ConfigError::Invalid(format!(
                    "[proxy] workers = {workers}: give a number from 1 to {MAX_WORKERS}, \
                     or leave it out for half the CPUs"
                )));
            }
        }
        if let Some(identity) = &self.identity {
            identity.validate().map_err(ConfigError::Invalid)?;
        }
        let mut names = HashSet::new();
        for listener in &self.listeners {
            if listener.name == "block" {
                return Err(ConfigError::Invalid(
                    "a listener cannot be named 'block': that word means block in [[protect]] rules"
                        .into(),
                ));
            }
            if !names.insert(listener.name.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "two listeners are named '{}'; listener names must be unique",
                    listener.name
                )));
            }
            if listener.address.port() == 0 {
                return Err(ConfigError::Invalid(format!(
                    "listener '{}' needs a fixed port: the kernel redirects to it",
                    listener.name
                )));
            }
            if listener.direct && listener.protocol != Protocol::Postgres {
                return Err(ConfigError::Invalid(format!(
                    "listener '{}': direct = true needs protocol = \"postgres\" (only it can ask a remote client for a token)",
                    listener.name
                )));
            }
            if listener.tls_cert.is_some() != listener.tls_key.is_some() {
                return Err(ConfigError::Invalid(format!(
                    "listener '{}': set both tls_cert and tls_key (generate a pair with `portcullis tls self-signed --out DIR`)",
                    listener.name
                )));
            }
        }
        crate::resource::validate(&self.resources).map_err(ConfigError::Invalid)?;
        for (index, rule) in self.protect.iter().enumerate() {
            if rule.port == Some(0) {
                return Err(ConfigError::Invalid(format!(
                    "protect rule #{} ({}): port 0 is not a port; omit `port` to protect every port",
                    index + 1,
                    rule.destination
                )));
            }
            if !rule.is_block() && !names.contains(rule.to.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "protect rule #{} ({}): to = '{}' is neither 'block' nor a listener name (listeners: {})",
                    index + 1,
                    rule.destination,
                    rule.to,
                    self.listeners
                        .iter()
                        .map(|l| l.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        Ok(())
    }

    /// The policy file's path, resolved against the config file's directory.
    pub fn policy_path(&self, config_path: &Path) -> Option<PathBuf> {
        let policy = &self.policy.as_ref()?.file;
        Some(match config_path.parent() {
            Some(dir) if policy.is_relative() => dir.join(policy),
            _ => policy.clone(),
        })
    }

    pub fn listener(&self, name: &str) -> Option<&ListenerConfig> {
        self.listeners.iter().find(|l| l.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Random;

    #[test]
    fn damaged_configs_are_errors_not_panics() {
        let shipped = include_str!("../../systemd/portcullis.toml");
        let mut random = Random::new(0x1234_5678_9abc_def1);
        for _ in 0..20_000 {
            let _ = Config::parse(&random.mutate(shipped));
            let _ = Config::parse(&random.mutate(SAMPLE));
        }
    }

    const SAMPLE: &str = r#"
        [[listener]]
        name = "pg"
        address = "127.0.0.1:15432"

        [[protect]]
        destination = "10.0.0.0/24"
        port = 5432
        to = "pg"

        [[protect]]
        destination = "::1"
        to = "block"
    "#;

    #[test]
    fn parses_rules_and_listeners() {
        let config = Config::parse(SAMPLE).unwrap();
        assert_eq!(config.listeners[0].protocol, Protocol::Tcp);
        assert_eq!(config.protect[0].destination.to_string(), "10.0.0.0/24");
        assert_eq!(config.protect[1].destination.to_string(), "::1");
        assert!(config.protect[1].is_block());
        assert_eq!(
            config.kernel.pin_dir,
            PathBuf::from("/sys/fs/bpf/portcullis")
        );
    }

    #[test]
    fn networks_are_truncated_to_their_prefix() {
        let d: Destination = "10.1.2.3/8".parse().unwrap();
        assert_eq!(d.to_string(), "10.0.0.0/8");
    }

    #[test]
    fn unknown_listener_is_rejected_with_the_choices() {
        let text = SAMPLE.replace("to = \"pg\"", "to = \"pgx\"");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("'pgx' is neither 'block' nor a listener name (listeners: pg)"),
            "{err}"
        );
    }

    #[test]
    fn bad_destination_reports_line() {
        let err = Config::parse("[[protect]]\ndestination = \"nope\"\nto = \"block\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("not an address or network"), "{err}");
    }

    #[test]
    fn proxy_workers_default_to_half_the_cpus_and_are_bounded() {
        let config = Config::parse(SAMPLE).unwrap();
        assert!(config.proxy.workers() >= 1);
        let three = Config::parse(&format!("[proxy]\nworkers = 3\n{SAMPLE}")).unwrap();
        assert_eq!(three.proxy.workers(), 3);
        let err = Config::parse(&format!("[proxy]\nworkers = 0\n{SAMPLE}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("[proxy] workers = 0"), "{err}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        assert!(Config::parse("[kernel]\npin = 1\n").is_err());
    }

    #[test]
    fn wildcard_listener_redirects_to_loopback() {
        let l = ListenerConfig {
            name: "x".into(),
            address: "0.0.0.0:7000".parse().unwrap(),
            protocol: Protocol::Tcp,
            direct: false,
            tls_cert: None,
            tls_key: None,
        };
        assert_eq!(l.redirect_target(), "127.0.0.1:7000".parse().unwrap());
    }
}
