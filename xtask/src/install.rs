//! `cargo xtask install` and `cargo xtask uninstall`: the gateway as a
//! systemd service on this machine.
//!
//! Install never changes what the machine's connections do on its own: the
//! shipped config has no protect rules, and an existing config is kept.
//! Uninstall removes the kernel enforcement with the program, because pinned
//! programs outlive the daemon by design and would otherwise keep enforcing
//! rules nobody can change any more.

use std::{
    fs,
    io::ErrorKind,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};

use crate::util::{self, cargo, cmd, output, report, run, target_dir};

const TASK: &str = "install";
const UNIT_PATH: &str = "/etc/systemd/system/portcullis.service";
const UNIT_NAME: &str = "portcullis.service";
const CONFIG_DIR: &str = "/etc/portcullis";
const CONFIG_PATH: &str = "/etc/portcullis/portcullis.toml";
const STATE_DIR: &str = "/var/lib/portcullis";
/// The shipped config's pin_dir.
const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/portcullis";
/// The prefix the unit file is written for.
const UNIT_PREFIX: &str = "/usr/local";

const UNIT: &str = include_str!("../../systemd/portcullis.service");
const DEFAULT_CONFIG: &str = include_str!("../../systemd/portcullis.toml");

/// Options shared by install and uninstall.
pub struct Install {
    /// The binary goes to `<prefix>/bin/portcullis`.
    pub prefix: PathBuf,
}

impl Install {
    fn binary(&self) -> PathBuf {
        self.prefix.join("bin/portcullis")
    }

    /// Builds and installs the binary, unit, config and state directory,
    /// then enables and starts the service when systemd is running (unless
    /// `no_start`).
    pub fn install(&self, no_start: bool) -> Result<()> {
        util::require_root(TASK)?;
        run(cargo().args(["build", "--release", "-p", "portcullis"]))?;

        let built = target_dir().join("release/portcullis");
        let binary = self.binary();
        copy_atomically(&built, &binary, 0o755)?;
        report(TASK, "binary", binary.display());

        let unit = unit_for_binary(&binary);
        write_file(Path::new(UNIT_PATH), unit.as_bytes(), 0o644)?;
        report(TASK, "systemd unit", UNIT_PATH);

        create_dir(Path::new(CONFIG_DIR), 0o750)?;
        if Path::new(CONFIG_PATH).exists() {
            report(
                TASK,
                "config",
                format!("{CONFIG_PATH} exists: kept as it is"),
            );
        } else {
            write_file(Path::new(CONFIG_PATH), DEFAULT_CONFIG.as_bytes(), 0o640)?;
            report(
                TASK,
                "config",
                format!("{CONFIG_PATH} (default: no destinations protected yet)"),
            );
        }
        run(cmd(&binary).args(["--config", CONFIG_PATH, "config", "check"]))
            .context("the installed config is not valid: fix it before starting the service")?;

        // Searchable, not listable, by others: auditors reach the daemon's
        // audit.sock in it; everything else in it is root's (0600/0700).
        create_dir(Path::new(STATE_DIR), 0o711)?;
        report(TASK, "state directory", STATE_DIR);

        // The checkpoint-signing key is made now, not at the daemon's first
        // start, so that its public half can go to the auditors before any
        // record exists. Existing keys are kept.
        let public_key = output(cmd(&binary).args(["--config", CONFIG_PATH, "audit", "init-keys"]))
            .context("creating the audit keys")?;
        report(
            TASK,
            "audit keys",
            "audit-signing.key and audit-subject.key in the state directory (0600; existing keys kept)",
        );
        println!(
            "Audit public key (give it to your auditors; they verify with \
             `portcullis audit verify --public-key KEY`):\n    {}",
            public_key.trim()
        );

        let start = format!("{} --config {CONFIG_PATH} run", binary.display());
        if !systemd_running() {
            report(TASK, "service", "systemd is not running here: not enabled");
            println!("Start the gateway with your init system, or by hand as root:\n    {start}");
            return Ok(());
        }
        run(cmd("systemctl").arg("daemon-reload"))?;
        if no_start {
            run(cmd("systemctl").args(["enable", UNIT_NAME]))?;
            report(
                TASK,
                "service",
                "enabled, not started: `systemctl start portcullis`",
            );
        } else {
            run(cmd("systemctl").args(["enable", "--now", UNIT_NAME]))?;
            report(
                TASK,
                "service",
                "enabled and started: `systemctl status portcullis`",
            );
        }
        Ok(())
    }

    /// Stops the service, detaches kernel enforcement, and removes the binary
    /// and unit; with `purge` also the config and state directories.
    ///
    /// # Errors
    /// Every step is tried even if one fails; the error lists what is left.
    pub fn uninstall(&self, purge: bool) -> Result<()> {
        const TASK: &str = "uninstall";
        util::require_root(TASK)?;
        let mut problems = Vec::new();
        let systemd = systemd_running();

        if systemd && Path::new(UNIT_PATH).exists() {
            match run(cmd("systemctl").args(["disable", "--now", UNIT_NAME])) {
                Ok(()) => report(TASK, "service", "stopped and disabled"),
                Err(e) => problems.push(format!("{e:#}")),
            }
        }

        let binary = self.binary();
        if binary.exists() {
            // Prints "already detached" and succeeds when nothing is pinned.
            match output(cmd(&binary).args(["--config", CONFIG_PATH, "kernel", "detach"])) {
                Ok(message) => report(TASK, "kernel enforcement", message.trim()),
                Err(e) => problems.push(format!(
                    "{e:#} (pins stay under the config's pin_dir until removed)"
                )),
            }
        } else if Path::new(DEFAULT_PIN_DIR).exists() {
            problems.push(format!(
                "{} not found, and {DEFAULT_PIN_DIR} still holds pinned programs: \
                 detach them with `portcullis kernel detach` from another copy",
                binary.display()
            ));
        } else {
            report(
                TASK,
                "kernel enforcement",
                format!(
                    "{} not found; nothing pinned under {DEFAULT_PIN_DIR}",
                    binary.display()
                ),
            );
        }

        let mut remove_paths = vec![("systemd unit", Path::new(UNIT_PATH))];
        if problems.is_empty() {
            remove_paths.insert(0, ("binary", binary.as_path()));
        } else {
            // Keep the one tool that can still detach the pins.
            report(
                TASK,
                "binary",
                "kept: detach failed, and it is needed to retry",
            );
        }
        for (what, path) in remove_paths {
            match remove(path) {
                Ok(true) => report(TASK, what, format!("removed {}", path.display())),
                Ok(false) => report(TASK, what, "ok: already absent"),
                Err(e) => problems.push(format!("{e:#}")),
            }
        }
        if systemd {
            if let Err(e) = run(cmd("systemctl").arg("daemon-reload")) {
                problems.push(format!("{e:#}"));
            }
        }

        if purge {
            for dir in [CONFIG_DIR, STATE_DIR] {
                match fs::remove_dir_all(dir) {
                    Ok(()) => report(TASK, "purge", format!("removed {dir}")),
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => problems.push(format!("removing {dir}: {e}")),
                }
            }
        } else {
            report(
                TASK,
                "kept",
                format!("{CONFIG_DIR} and {STATE_DIR} (audit records); --purge removes them"),
            );
        }

        if !problems.is_empty() {
            bail!("uninstall incomplete:\n  {}", problems.join("\n  "));
        }
        Ok(())
    }
}

/// The unit file with ExecStart pointing at the installed binary.
fn unit_for_binary(binary: &Path) -> String {
    UNIT.replace(
        &format!("{UNIT_PREFIX}/bin/portcullis"),
        &binary.display().to_string(),
    )
}

/// Whether systemd is the init system (its documented check: sd_booted(3)).
fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// Copies through a temporary file and a rename, so a running daemon keeps
/// its old binary and never sees a half-written one (and no ETXTBSY).
fn copy_atomically(from: &Path, to: &Path, mode: u32) -> Result<()> {
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let temp = to.with_extension("new");
    fs::copy(from, &temp)
        .with_context(|| format!("copying {} to {}", from.display(), temp.display()))?;
    fs::set_permissions(&temp, fs::Permissions::from_mode(mode))?;
    fs::rename(&temp, to).with_context(|| format!("renaming to {}", to.display()))
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(path, contents).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

fn create_dir(path: &Path, mode: u32) -> Result<()> {
    fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

/// Removes a file; `Ok(false)` if it was not there.
fn remove(path: &Path) -> Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_points_at_the_installed_binary() {
        let unit = unit_for_binary(Path::new("/opt/pc/bin/portcullis"));
        assert!(unit.contains(
            "ExecStart=/opt/pc/bin/portcullis --config /etc/portcullis/portcullis.toml run"
        ));
        assert!(!unit.contains("/usr/local/bin"));
        assert_eq!(
            unit_for_binary(Path::new("/usr/local/bin/portcullis")),
            UNIT
        );
    }

    #[test]
    fn default_config_protects_nothing() {
        let active: Vec<&str> = DEFAULT_CONFIG
            .lines()
            .map(str::trim)
            .filter(|l| !l.starts_with('#'))
            .collect();
        assert!(!active.contains(&"[[protect]]"));
        assert!(active.contains(&"[[listener]]"));
    }
}
