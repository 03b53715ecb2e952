use std::{io::IsTerminal, process::ExitCode};

use clap::Parser;
use portcullis::cli::{self, Cli, Command};
use portcullis::log_batch::{self, LogGuard};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_guard = init_logging(matches!(cli.command, Command::Run));
    let result = match cli.command {
        Command::Run => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(portcullis::daemon::run(cli.config.clone()))),
        _ => cli::run_command(&cli),
    };
    // Writes out what is still queued, so that the final error below comes
    // after it.
    drop(log_guard);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portcullis: {}", portcullis::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// Log lines go to stderr (the journal, under systemd). The daemon writes
/// them in batches from a thread of their own (`log_batch`): a session's
/// worker thread formats a line and appends it, and never waits on a slow
/// journal until a great deal has gathered. The other commands write
/// theirs at once, in order with what they print.
fn init_logging(daemon: bool) -> Option<LogGuard> {
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("PORTCULLIS_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_ansi(std::io::stderr().is_terminal());
    if !daemon {
        logs.with_writer(std::io::stderr).init();
        return None;
    }
    match log_batch::start(std::io::stderr()) {
        Ok((writer, guard)) => {
            logs.with_writer(writer).init();
            Some(guard)
        }
        Err(e) => {
            eprintln!("portcullis: no thread for log lines ({e}): writing them at once");
            logs.with_writer(std::io::stderr).init();
            None
        }
    }
}
