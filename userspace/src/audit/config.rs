//! The `[audit]` section of the configuration.
//!
//! ```toml
//! [audit]
//! retention_days = 365            # default for every resource
//! checkpoint_every = 10000        # sign a checkpoint after this many records
//! checkpoint_interval = "60s"     # ... or after this long with new records
//! commit_interval = "50ms"        # longest a statement record waits to be flushed
//! export = "unix:/run/vector/portcullis.sock"   # or a file path; optional
//! auditors_role = "auditors"      # the role allowed the auditor tools besides root
//! socket = "/run/portcullis/audit.sock"          # default: <state_dir>/audit.sock
//!
//! [audit.retention]
//! orders = 30                     # per resource name
//! ```

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Deserializer};

use super::{retention::Retention, writer::CheckpointPolicy};

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Days an event's payload is kept; its hash stays in the chain.
    #[serde(default = "default_retention_days")]
    pub retention_days: u32,
    /// Per-resource overrides of `retention_days`, by resource name.
    #[serde(default)]
    pub retention: BTreeMap<String, u32>,
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    #[serde(default = "default_checkpoint_interval", deserialize_with = "duration")]
    pub checkpoint_interval: Duration,
    /// Longest a statement record waits for its group commit (see
    /// `CheckpointPolicy::commit_interval`).
    #[serde(default = "default_commit_interval", deserialize_with = "duration")]
    pub commit_interval: Duration,
    /// Stream the chain as JSON lines to this file or `unix:PATH` socket.
    #[serde(default)]
    pub export: Option<String>,
    /// The gateway role (from `[identity.roles]`) whose members may use the
    /// auditor tools through the daemon, besides root.
    #[serde(default = "default_auditors_role")]
    pub auditors_role: String,
    /// The daemon's auditor socket; `<state_dir>/audit.sock` when unset.
    /// Auditors must be able to reach it (every directory on the way
    /// searchable by them).
    #[serde(default)]
    pub socket: Option<PathBuf>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            retention_days: default_retention_days(),
            retention: BTreeMap::new(),
            checkpoint_every: default_checkpoint_every(),
            checkpoint_interval: default_checkpoint_interval(),
            commit_interval: default_commit_interval(),
            export: None,
            auditors_role: default_auditors_role(),
            socket: None,
        }
    }
}

impl AuditConfig {
    /// Checks values serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.retention_days == 0 {
            return Err("[audit] retention_days must be at least 1".into());
        }
        if let Some((name, _)) = self.retention.iter().find(|(_, days)| **days == 0) {
            return Err(format!(
                "[audit.retention] {name} = 0: keep payloads at least 1 day"
            ));
        }
        if self.commit_interval > std::time::Duration::from_secs(1) {
            return Err(
                "[audit] commit_interval is at most 1s: it bounds what a power cut can take".into(),
            );
        }
        if self.checkpoint_every == 0 {
            return Err("[audit] checkpoint_every must be at least 1".into());
        }
        if self.checkpoint_interval < Duration::from_secs(1) {
            return Err("[audit] checkpoint_interval must be at least 1s".into());
        }
        if self.auditors_role.trim().is_empty() {
            return Err("[audit] auditors_role must name a role (default: \"auditors\")".into());
        }
        if self.socket.as_ref().is_some_and(|s| !s.is_absolute()) {
            return Err("[audit] socket must be an absolute path".into());
        }
        Ok(())
    }

    /// Where the daemon serves the auditor tools.
    pub fn socket_path(&self, state_dir: &Path) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| state_dir.join(super::source::SOCKET_FILE))
    }

    pub fn retention(&self) -> Retention {
        Retention {
            default_days: self.retention_days,
            per_resource: self.retention.clone(),
        }
    }

    pub fn checkpoints(&self) -> CheckpointPolicy {
        CheckpointPolicy {
            every: self.checkpoint_every,
            interval: self.checkpoint_interval,
            commit_interval: self.commit_interval,
        }
    }
}

fn default_retention_days() -> u32 {
    365
}

fn default_auditors_role() -> String {
    "auditors".into()
}

/// Under load that is a checkpoint every second or so: each costs a sled
/// sync and an fsync'd file copy, which at 1,000 took a sixth of the audit
/// writer's CPU under pgbench. `checkpoint_interval` bounds quiet times.
fn default_checkpoint_every() -> u64 {
    10_000
}

fn default_checkpoint_interval() -> Duration {
    Duration::from_secs(60)
}

fn default_commit_interval() -> Duration {
    CheckpointPolicy::default().commit_interval
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!(
            "'{text}' is not a duration (examples: 30s, 5m): {e}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn audit_section_with_per_resource_retention() {
        let config = Config::parse(
            "[audit]\nretention_days = 90\ncheckpoint_every = 10\ncheckpoint_interval = \"5s\"\n\
             export = \"unix:/run/vector.sock\"\n[audit.retention]\norders = 7\n",
        )
        .unwrap();
        let retention = config.audit.retention();
        assert_eq!(retention.default_days, 90);
        assert_eq!(retention.per_resource["orders"], 7);
        assert_eq!(config.audit.checkpoints().every, 10);
        assert_eq!(config.audit.checkpoints().interval.as_secs(), 5);
        assert_eq!(config.audit.auditors_role, "auditors");
        assert_eq!(
            config.audit.socket_path(std::path::Path::new("/var/lib/p")),
            std::path::Path::new("/var/lib/p/audit.sock")
        );
        assert_eq!(Config::parse("").unwrap().audit.retention_days, 365);
        let custom =
            Config::parse("[audit]\nauditors_role = \"dpo\"\nsocket = \"/run/p/audit.sock\"\n")
                .unwrap();
        assert_eq!(custom.audit.auditors_role, "dpo");
        assert_eq!(
            custom.audit.socket_path(std::path::Path::new("/x")),
            std::path::Path::new("/run/p/audit.sock")
        );
    }

    #[test]
    fn bad_audit_values_say_what_to_write() {
        let err = |text: &str| Config::parse(text).unwrap_err().to_string();
        assert!(err("[audit]\nretention_days = 0\n").contains("at least 1"));
        assert!(err("[audit.retention]\norders = 0\n").contains("orders = 0"));
        assert!(err("[audit]\ncheckpoint_interval = \"soon\"\n").contains("not a duration"));
        assert!(err("[audit]\nretention = 3\n").contains("invalid"));
        assert!(err("[audit]\nauditors_role = \" \"\n").contains("auditors_role"));
        assert!(err("[audit]\nsocket = \"audit.sock\"\n").contains("absolute"));
    }
}
