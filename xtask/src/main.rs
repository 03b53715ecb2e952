//! `cargo xtask`: the project's own tasks, in Rust so they run wherever cargo
//! does and fail with messages that say what to do.
//!
//! # Layout
//!
//! * [`setup`]: packages and toolchain for a fresh Debian 12 machine.
//! * [`test`](mod@test): `lint` (rustfmt, clippy, rustdoc) and `test` (setup, lint, cargo test).
//! * [`install`]: the gateway as a systemd service, and its removal.
//! * [`demo`]: the gateway in front of a throwaway PostgreSQL, confined to a
//!   child cgroup.
//! * [`bench`](mod@bench): every benchmark, with ratios against direct connections.
//! * [`util`]: running commands with errors that name them.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

mod bench;
mod demo;
mod install;
mod setup;
mod test;
mod util;

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    about = "Portcullis development and operator tasks"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what building and testing need (root; safe to run again).
    Setup,
    /// cargo fmt --check, cargo clippy -D warnings, cargo doc (no broken links).
    Lint,
    /// Setup, lint, then the whole test suite (root: kernel tests attach eBPF).
    Test,
    /// Run the benchmarks (root): kernel_connect, postgres, masking, audit.
    Bench {
        /// Run only this benchmark.
        name: Option<String>,
    },
    /// Build and install the gateway as a systemd service (root).
    Install {
        /// The binary goes to PREFIX/bin/portcullis.
        #[arg(long, default_value = "/usr/local")]
        prefix: PathBuf,
        /// Enable the service but do not start it (edit the config first).
        #[arg(long)]
        no_start: bool,
    },
    /// Stop the service, detach kernel enforcement, remove binary and unit.
    Uninstall {
        /// The prefix given to install.
        #[arg(long, default_value = "/usr/local")]
        prefix: PathBuf,
        /// Also remove /etc/portcullis and /var/lib/portcullis (audit records).
        #[arg(long)]
        purge: bool,
    },
    /// Run the gateway in front of a throwaway PostgreSQL, in a demo cgroup.
    Demo {
        /// Show the walk-through, then clean up and exit.
        #[arg(long, conflicts_with = "stop")]
        once: bool,
        /// Stop a running demo and remove everything it created.
        #[arg(long)]
        stop: bool,
        /// Internal: the second phase, run with SIGINT ignored (see demo.rs).
        #[arg(long, hide = true, conflicts_with = "stop")]
        supervise: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::run_all(),
        Task::Lint => test::lint(),
        Task::Test => test::test(),
        Task::Bench { name } => bench::bench(name.as_deref()),
        Task::Install { prefix, no_start } => install::Install { prefix }.install(no_start),
        Task::Uninstall { prefix, purge } => install::Install { prefix }.uninstall(purge),
        Task::Demo { stop: true, .. } => demo::stop(),
        Task::Demo {
            once,
            supervise: true,
            ..
        } => demo::supervise(once),
        Task::Demo { once, .. } => demo::start(once),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}
