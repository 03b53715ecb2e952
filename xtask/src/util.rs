//! Running external programs with errors that name the command that failed.
//!
//! Every task here is a sequence of other programs (apt-get, cargo, rustup,
//! pg_ctl, systemctl). When one fails, the message must say which command it
//! was and how it ended, so the user can rerun it by hand.

use std::{
    env,
    ffi::OsString,
    io::ErrorKind,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use anyhow::{bail, Context, Result};

/// The workspace root: the directory above this crate.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_owned()
}

/// Cargo's target directory (`CARGO_TARGET_DIR`, else `<repo>/target`).
pub fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                repo_root().join(dir)
            }
        }
        _ => repo_root().join("target"),
    }
}

/// `$CARGO_HOME/bin`, else `~/.cargo/bin`: where rustup and `cargo install`
/// put binaries. A fresh root shell (sudo, vagrant provisioning) often does
/// not have it on PATH, which would hide bpf-linker from the eBPF build.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    if let Some(home) = env::var_os("CARGO_HOME").filter(|h| !h.is_empty()) {
        return Some(PathBuf::from(home).join("bin"));
    }
    env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|home| PathBuf::from(home).join(".cargo/bin"))
}

/// PATH for child processes: the cargo bin directory first, then ours.
pub fn child_path() -> OsString {
    let mut dirs: Vec<PathBuf> = cargo_bin_dir().into_iter().collect();
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
    }
    env::join_paths(dirs).unwrap_or_else(|_| env::var_os("PATH").unwrap_or_default())
}

/// A command whose PATH includes the cargo bin directory. Rust resolves the
/// program through the child's PATH when it is set, so `cmd("bpf-linker")`
/// finds `~/.cargo/bin/bpf-linker` too.
pub fn cmd(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new(program);
    command.env("PATH", child_path());
    command
}

/// `cargo` run from the workspace root.
pub fn cargo() -> Command {
    let mut command = cmd("cargo");
    command.current_dir(repo_root());
    command
}

/// The command line as a user would type it, for messages.
pub fn describe(command: &Command) -> String {
    let mut words = vec![command.get_program().to_string_lossy().into_owned()];
    words.extend(command.get_args().map(|a| {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains(|c: char| c.is_whitespace() || "'\"$;&|".contains(c)) {
            format!("'{}'", a.replace('\'', r"'\''"))
        } else {
            a.into_owned()
        }
    }));
    words.join(" ")
}

/// Runs a command with inherited stdio; an error unless it exits 0.
pub fn run(command: &mut Command) -> Result<()> {
    let line = describe(command);
    let status = command
        .status()
        .with_context(|| format!("cannot start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs a command and returns its stdout; on failure the error carries stderr.
pub fn output(command: &mut Command) -> Result<String> {
    let line = describe(command);
    let out = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command to see whether it works: `None` if the program does not
/// exist, else its output whatever the exit status.
pub fn probe(command: &mut Command) -> Result<Option<Output>> {
    match command.stdin(Stdio::null()).output() {
        Ok(out) => Ok(Some(out)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot start `{}`", describe(command))),
    }
}

/// Whether this process runs with effective uid 0 (read from /proc, so no
/// libc or `unsafe` is needed).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Fails with advice unless running as root.
pub fn require_root(task: &str) -> Result<()> {
    if !is_root() {
        bail!(
            "`cargo xtask {task}` changes the machine (packages, bpffs, cgroups, /etc): \
             run it as root, e.g. `sudo -E env PATH=\"$PATH\" cargo xtask {task}`"
        );
    }
    Ok(())
}

/// Prints one summary line for a step: `[setup] bpf-linker: ok: already installed`.
pub fn report(task: &str, step: &str, outcome: impl std::fmt::Display) {
    println!("[{task}] {step}: {outcome}");
}
