//! `cargo xtask lint` and `cargo xtask test`: what CI runs.
//!
//! `test` is setup, then lint, then the test suite, then the demo's
//! walk-through, so that one command on a fresh machine (or VM, or CI
//! runner) gives the same answer as on a developer's. The kernel
//! integration tests need root; they are not hidden behind `#[ignore]`, so
//! `test` must run as root.

use anyhow::{bail, Result};

use crate::{
    setup,
    util::{cargo, describe, report, run, target_dir},
};

/// rustfmt, clippy and rustdoc (broken doc links, private items included:
/// the docs are for the engineers) over the default members. All run even
/// if one fails, so one round trip shows every problem.
pub fn lint() -> Result<()> {
    let mut failed = Vec::new();
    for (args, rustdoc_flags) in [
        (&["fmt", "--all", "--", "--check"][..], None),
        (
            // The workspace: the kernel programs too, built for the host.
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ][..],
            None,
        ),
        (
            &["doc", "--no-deps", "--document-private-items"][..],
            Some("-D warnings"),
        ),
    ] {
        let mut command = cargo();
        command.args(args);
        if let Some(flags) = rustdoc_flags {
            command.env("RUSTDOCFLAGS", flags);
        }
        if let Err(e) = run(&mut command) {
            eprintln!("[lint] {e:#}");
            let env = rustdoc_flags.map_or(String::new(), |f| format!("RUSTDOCFLAGS='{f}' "));
            failed.push(format!("{env}{}", describe(&command)));
        }
    }
    if !failed.is_empty() {
        bail!("lint failed: {}", failed.join("; "));
    }
    report("lint", "fmt, clippy and rustdoc", "ok");
    Ok(())
}

/// Setup, lint, `cargo test`, a check that the shipped default config
/// still parses with the schema the tests just built, and the demo's
/// walk-through (the README's first command), which checks what it shows.
///
/// Plain `cargo test` uses the workspace's default members, which leave out
/// the eBPF crate: it only builds for the BPF target, through userspace's
/// build script.
pub fn test() -> Result<()> {
    setup::run_all()?;
    lint()?;
    run(cargo().arg("test"))?;
    check_default_config()?;
    run_demo_once()?;
    report("test", "all", "ok");
    Ok(())
}

/// `cargo xtask demo --once`, as its own process: the demo re-executes
/// itself to supervise the gateway. A demo someone left running is not
/// stopped for it (the demo would do that): the test asks instead.
fn run_demo_once() -> Result<()> {
    for place in [crate::demo::DEMO_DIR, crate::demo::PIN_DIR] {
        if std::path::Path::new(place).exists() {
            bail!(
                "a demo is set up ({place}); stop it with `cargo xtask demo --stop`, \
                 then run the tests again"
            );
        }
    }
    let xtask = std::env::current_exe()?;
    run(crate::util::cmd(xtask).args(["demo", "--once"]))
}

/// `portcullis config check` on systemd/portcullis.toml, with the debug
/// binary `cargo test` built for the integration tests.
fn check_default_config() -> Result<()> {
    let binary = target_dir().join("debug/portcullis");
    let config = crate::util::repo_root().join("systemd/portcullis.toml");
    run(crate::util::cmd(&binary)
        .arg("--config")
        .arg(&config)
        .args(["config", "check"]))
}
