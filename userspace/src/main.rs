use std::{io::IsTerminal, process::ExitCode};

use clap::Parser;
use portcullis::cli::{self, Cli, Command};
use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
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
/// them from a thread of their own: a session's worker thread formats a
/// line and queues it, and never waits on a slow journal. Up to
/// `LOG_QUEUE_LINES` can wait; past that a logging thread waits too,
/// rather than lose lines. The other commands write theirs at once, in
/// order with what they print.
fn init_logging(daemon: bool) -> Option<WorkerGuard> {
    /// About 25 MB of typical lines: a journal stalled for 20 s while
    /// 2,000 clients a second connect (three lines each), far longer at
    /// usual rates.
    const LOG_QUEUE_LINES: usize = 128_000;
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("PORTCULLIS_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_ansi(std::io::stderr().is_terminal());
    if !daemon {
        logs.with_writer(std::io::stderr).init();
        return None;
    }
    let (writer, guard) = NonBlockingBuilder::default()
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .lossy(false)
        .thread_name("portcullis-log")
        .finish(std::io::stderr());
    logs.with_writer(writer).init();
    Some(guard)
}
