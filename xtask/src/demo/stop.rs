//! `cargo xtask demo --stop` and the cleanup every other way out of the
//! demo runs: stop the gateway and PostgreSQL, detach, remove the cgroup and
//! the files.
//!
//! Everything is found by its fixed location or by pid files, never by
//! process name alone, so nothing outside the demo is touched.

use std::{
    fs,
    io::ErrorKind,
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{as_postgres, Demo, DEMO_DIR, PIN_DIR, TASK};
use crate::util::{self, cmd, output, report};

/// `cargo xtask demo --stop`.
///
/// If a demo is running, stopping its gateway makes its supervisor clean up;
/// `--stop` waits for that rather than racing it, then checks that nothing
/// is left (or removes what a killed supervisor left behind).
pub fn stop() -> Result<()> {
    util::require_root(TASK)?;
    stop_running_or_left_over(&Demo::new()?)
}

pub(super) fn stop_running_or_left_over(demo: &Demo) -> Result<()> {
    let supervisor = read_pid(&demo.supervisor_pid_file).filter(|&pid| {
        pid != std::process::id() && process_alive(pid) && comm(pid).as_deref() == Some("xtask")
    });
    if let Some(pid) = supervisor {
        report(
            "demo --stop",
            "running demo",
            format!("stopping its gateway; its supervisor (pid {pid}) cleans up"),
        );
        stop_daemon(demo)?;
        if !wait_for_exit(pid, Duration::from_secs(60)) {
            report(
                "demo --stop",
                "running demo",
                "supervisor still busy: cleaning up here",
            );
        }
    }
    stop_demo(demo)
}

/// Removes every trace of the demo, whatever state it is in. Every step is
/// tried even if an earlier one fails.
///
/// # Errors
/// Lists what could not be removed.
pub(super) fn stop_demo(demo: &Demo) -> Result<()> {
    let mut problems = Vec::new();
    let mut attempt = |step: &str, result: Result<String>| match result {
        Ok(outcome) => report("demo --stop", step, outcome),
        Err(e) => {
            report("demo --stop", step, format!("FAILED: {e:#}"));
            problems.push(format!("{step}: {e:#}"));
        }
    };
    attempt("gateway", stop_daemon(demo));
    attempt("postgresql", stop_postgres(demo));
    attempt("kernel enforcement", detach());
    attempt("cgroup", remove_cgroup(demo));
    attempt("leftover processes", kill_leftovers());
    attempt(
        "files",
        match fs::remove_dir_all(&demo.root) {
            Ok(()) => Ok(format!("removed {}", demo.root.display())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok("ok: none".into()),
            Err(e) => Err(e).with_context(|| format!("removing {}", demo.root.display())),
        },
    );
    if !problems.is_empty() {
        bail!(
            "demo cleanup incomplete (run `cargo xtask demo --stop` again):\n  {}",
            problems.join("\n  ")
        );
    }
    Ok(())
}

fn stop_daemon(demo: &Demo) -> Result<String> {
    let Some(pid) = read_pid(&demo.pid_file) else {
        return Ok("ok: not running".into());
    };
    if !process_alive(pid) || comm(pid).as_deref() != Some("portcullis") {
        return Ok("ok: not running".into());
    }
    signal(pid, "TERM");
    if wait_for_exit(pid, Duration::from_secs(5)) {
        return Ok(format!("stopped (pid {pid})"));
    }
    // Still serving an open session: the cgroup step ends it.
    Ok(format!(
        "pid {pid} still finishing sessions; ended with the cgroup"
    ))
}

fn stop_postgres(demo: &Demo) -> Result<String> {
    let pgdata = demo.pgdata();
    let postmaster_pid = pgdata.join("postmaster.pid");
    if !postmaster_pid.exists() {
        return Ok("ok: not running".into());
    }
    let stopped = output(
        as_postgres(demo, "pg_ctl")
            .arg("-D")
            .arg(&pgdata)
            .args(["-m", "fast", "-w", "-t", "20", "stop"]),
    );
    if stopped.is_ok() {
        return Ok("stopped".into());
    }
    // pg_ctl failed (or the cluster is half-gone): end the postmaster directly.
    let pid = read_pid(&postmaster_pid);
    match pid {
        Some(pid) if comm(pid).as_deref() == Some("postgres") => {
            signal(pid, "KILL");
            if wait_for_exit(pid, Duration::from_secs(5)) {
                Ok(format!("killed postmaster {pid}"))
            } else {
                bail!("postmaster {pid} does not exit")
            }
        }
        _ => Ok("ok: not running (stale postmaster.pid)".into()),
    }
}

/// `portcullis kernel detach --pin-dir`, or, without the binary, unpinning
/// by hand: once no process holds them, unpinned links are released.
fn detach() -> Result<String> {
    if !Path::new(PIN_DIR).exists() {
        return Ok(format!("ok: {PIN_DIR} absent"));
    }
    let binary = Demo::binary();
    let detached = if binary.exists() {
        output(cmd(&binary).args(["kernel", "detach", "--pin-dir", PIN_DIR]))
            .map(|out| out.trim().to_owned())
    } else {
        Err(anyhow::anyhow!("{} not built", binary.display()))
    };
    match detached {
        Ok(message) if !Path::new(PIN_DIR).exists() => Ok(message),
        result => {
            fs::remove_dir_all(PIN_DIR).with_context(|| {
                format!("detach failed ({result:?}), and removing {PIN_DIR} too")
            })?;
            Ok(format!("removed the pins under {PIN_DIR}"))
        }
    }
}

/// Ends every process in the demo cgroup (the gateway, shells the user
/// opened) and removes it. Removing the cgroup also releases any program
/// still attached to it.
fn remove_cgroup(demo: &Demo) -> Result<String> {
    let cgroup = &demo.cgroup;
    if !cgroup.exists() {
        return Ok("ok: none".into());
    }
    if cgroup.parent() != Some(demo.cgroup_mount.as_path()) {
        bail!("refusing to touch {}", cgroup.display());
    }
    let procs = || -> Vec<u32> {
        fs::read_to_string(cgroup.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    };
    let me = std::process::id();
    if procs().contains(&me) {
        // `--stop` run from the demo shell: step out before ending the rest.
        fs::write(demo.cgroup_mount.join("cgroup.procs"), me.to_string())
            .context("moving xtask out of the demo cgroup")?;
    }
    let ended = procs();
    if !ended.is_empty() {
        // cgroup.kill (Linux 5.14+) also catches processes forking meanwhile.
        if fs::write(cgroup.join("cgroup.kill"), "1").is_err() {
            for pid in &ended {
                signal(*pid, "KILL");
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match fs::remove_dir(cgroup) {
            Ok(()) => break,
            Err(e) if e.kind() == ErrorKind::NotFound => break,
            Err(e) if Instant::now() > deadline => {
                return Err(e).with_context(|| {
                    format!(
                        "removing {} (processes left: {:?})",
                        cgroup.display(),
                        procs()
                    )
                })
            }
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
    Ok(if ended.is_empty() {
        format!("removed {}", cgroup.display())
    } else {
        format!(
            "ended {} process(es) in it and removed {}",
            ended.len(),
            cgroup.display()
        )
    })
}

/// Demo gateways and postmasters that escaped the steps above, found by the
/// demo directory on their command line.
fn kill_leftovers() -> Result<String> {
    let mut killed = Vec::new();
    for entry in fs::read_dir("/proc")?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        let ours = matches!(comm(pid).as_deref(), Some("portcullis" | "postgres"));
        if ours && cmdline.contains(DEMO_DIR) && process_alive(pid) {
            signal(pid, "KILL");
            killed.push(pid);
        }
    }
    if killed.is_empty() {
        return Ok("ok: none".into());
    }
    for pid in &killed {
        if !wait_for_exit(*pid, Duration::from_secs(5)) {
            bail!("pid {pid} does not exit");
        }
    }
    Ok(format!("killed {killed:?}"))
}

pub(super) fn read_pid(path: &Path) -> Option<u32> {
    fs::read_to_string(path)
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

fn comm(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|c| c.trim().to_owned())
}

/// Whether the process exists and has not exited (a zombie has exited).
pub(super) fn process_alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .next()?
                .to_owned();
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

fn wait_for_exit(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while process_alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
    true
}

/// Sends a signal with the shell's `kill` (no libc needed).
fn signal(pid: u32, name: &str) {
    let _ = Command::new("sh")
        .args(["-c", r#"kill -s "$1" "$2" 2>/dev/null"#, "sh", name])
        .arg(pid.to_string())
        .status();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_unknown_pids_are_not() {
        assert!(process_alive(std::process::id()));
        assert!(!process_alive(u32::MAX));
    }
}
