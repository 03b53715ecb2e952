//! The `portcullis` command line: daemon, operator and auditor commands.

use std::path::{Path, PathBuf};

mod audit;
mod policy;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::{
    config::{Config, KernelConfig, DEFAULT_CONFIG_PATH},
    control::commands,
    kernel,
};

#[derive(Debug, Parser)]
#[command(
    name = "portcullis",
    version,
    about = "Data-access gateway with kernel-enforced redirection"
)]
pub struct Cli {
    /// Configuration file.
    #[arg(long, global = true, env = "PORTCULLIS_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Auditor tools: sessions, events, replay, data subjects, verify, export.
    Audit {
        #[command(flatten)]
        socket: audit::AuditSocketArg,
        #[command(subcommand)]
        command: audit::AuditCommand,
    },
    /// Compliance reports from the audit store.
    Report {
        #[command(flatten)]
        socket: audit::AuditSocketArg,
        #[command(subcommand)]
        command: audit::ReportCommand,
    },
    /// Run the gateway daemon (attach kernel enforcement, serve listeners).
    Run,
    /// Validate the policy file, or explain a decision without running anything.
    Policy {
        #[command(subcommand)]
        command: policy::PolicyCommand,
    },
    /// Just-in-time approvals: list requests waiting for you, approve, deny.
    Approvals(policy::ApprovalsArgs),
    /// Inspect or remove kernel enforcement.
    Kernel {
        #[command(subcommand)]
        command: KernelCommand,
    },
    /// Validate the configuration file.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Sign in (OIDC device flow) and bind your identity to your local uid.
    Login {
        #[command(flatten)]
        socket: SocketArg,
        /// Sign in as a service account (client credentials grant).
        #[arg(long, requires = "client_secret_file")]
        client_id: Option<String>,
        /// File holding the service account's client secret (mode 0600).
        #[arg(long, requires = "client_id")]
        client_secret_file: Option<PathBuf>,
        /// Scopes for the service account's token.
        #[arg(long = "scope")]
        scopes: Vec<String>,
    },
    /// Show the identity bound to your uid.
    Whoami {
        #[command(flatten)]
        socket: SocketArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// End the binding of your uid.
    Logout {
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Certificates for the gateway's TLS listeners.
    Tls {
        #[command(subcommand)]
        command: TlsCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum TlsCommand {
    /// Write a self-signed certificate (cert.pem) and key (key.pem, 0600).
    SelfSigned {
        /// Directory to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Names (DNS or IP) the certificate is valid for.
        #[arg(long = "name", default_values = ["localhost", "127.0.0.1", "::1"])]
        names: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum KernelCommand {
    /// Show attached programs, counters and the protected set.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// bpffs directory; defaults to kernel.pin_dir from the config.
        #[arg(long)]
        pin_dir: Option<PathBuf>,
    },
    /// Detach every program and remove the pins (operator only).
    Detach {
        #[arg(long)]
        pin_dir: Option<PathBuf>,
    },
}

/// Where the daemon's control socket is.
#[derive(Debug, clap::Args)]
pub struct SocketArg {
    /// Control socket; defaults to `[identity] control_socket` of the config.
    #[arg(long = "socket", env = "PORTCULLIS_CONTROL_SOCKET")]
    socket: Option<PathBuf>,
}

impl SocketArg {
    fn path(&self, config: &Path) -> PathBuf {
        commands::socket_path(self.socket.as_deref(), config)
    }
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Parse and validate the configuration; exit 1 with the reason if invalid.
    Check,
}

/// Runs a non-daemon command.
pub fn run_command(cli: &Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Run => unreachable!("the daemon is started by main"),
        Command::Audit { socket, command } => audit::run(&cli.config, socket, command),
        Command::Report { socket, command } => audit::report(&cli.config, socket, command),
        Command::Policy { command } => policy::run_policy(&cli.config, command),
        Command::Approvals(args) => policy::run_approvals(&cli.config, args),
        Command::Login {
            socket,
            client_id,
            client_secret_file,
            scopes,
        } => {
            let method = match (client_id, client_secret_file) {
                (Some(client_id), Some(secret_file)) => commands::LoginMethod::ClientCredentials {
                    client_id: client_id.clone(),
                    secret_file: secret_file.clone(),
                    scopes: scopes.clone(),
                },
                _ => commands::LoginMethod::Device,
            };
            commands::login(&socket.path(&cli.config), method)
        }
        Command::Whoami { socket, json } => commands::whoami(&socket.path(&cli.config), *json),
        Command::Logout { socket } => commands::logout(&socket.path(&cli.config)),
        Command::Kernel { command } => match command {
            KernelCommand::Status { json, pin_dir } => {
                let pin_dir = pin_dir_for(&cli.config, pin_dir.as_deref());
                print_status(&kernel::status(&pin_dir)?, *json)
            }
            KernelCommand::Detach { pin_dir } => {
                require_root("kernel detach")?;
                let pin_dir = pin_dir_for(&cli.config, pin_dir.as_deref());
                let removed = kernel::detach(&pin_dir)
                    .with_context(|| format!("detaching {}", pin_dir.display()))?;
                if removed.is_empty() {
                    println!(
                        "nothing pinned under {}: already detached",
                        pin_dir.display()
                    );
                } else {
                    println!(
                        "detached: removed {} pins under {}",
                        removed.len(),
                        pin_dir.display()
                    );
                }
                Ok(())
            }
        },
        Command::Tls {
            command: TlsCommand::SelfSigned { out, names },
        } => {
            let (cert, key) = crate::protocol::postgres::tls::write_self_signed(out, names)?;
            println!(
                "wrote {} and {}; set them as tls_cert and tls_key of the listener",
                cert.display(),
                key.display()
            );
            Ok(())
        }
        Command::Config {
            command: ConfigCommand::Check,
        } => {
            let config = Config::load(&cli.config)?;
            kernel::compile_rules(&config)?;
            println!(
                "{}: ok ({} listeners, {} protected destinations)",
                cli.config.display(),
                config.listeners.len(),
                config.protect.len()
            );
            Ok(())
        }
    }
}

/// The pin directory: the flag, else the config's, else the default.
fn pin_dir_for(config_path: &Path, flag: Option<&Path>) -> PathBuf {
    if let Some(dir) = flag {
        return dir.to_owned();
    }
    Config::load(config_path)
        .map(|c| c.kernel.pin_dir)
        .unwrap_or_else(|_| KernelConfig::default().pin_dir)
}

/// True when this process runs with effective uid 0. Read from
/// /proc/self/status, which needs no `unsafe` (libc's geteuid is unsafe by
/// convention only, and `unsafe` stays in `kernel/`).
pub(crate) fn euid_is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        == Some("0")
}

fn require_root(what: &str) -> anyhow::Result<()> {
    if !euid_is_root() {
        anyhow::bail!(
            "`portcullis {what}` changes kernel enforcement: run it as root (operators only)"
        );
    }
    Ok(())
}

fn print_status(status: &kernel::KernelStatus, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(status)?);
        return Ok(());
    }
    println!("pin directory: {}", status.pin_dir);
    println!(
        "enforcement:   {}",
        if status.fully_attached() {
            "attached"
        } else if status.programs.iter().any(|p| p.link_id.is_some()) {
            "PARTIAL (some hooks missing: restart the daemon)"
        } else {
            "not attached"
        }
    );
    println!("\n{:<10} {:>8} {:>8}", "program", "link", "prog");
    for p in &status.programs {
        let show = |v: Option<u32>| v.map_or("-".to_string(), |v| v.to_string());
        println!(
            "{:<10} {:>8} {:>8}",
            p.name,
            show(p.link_id),
            show(p.program_id)
        );
    }
    if !status.counters.is_empty() {
        println!("\ncounters:");
        for (name, value) in &status.counters {
            println!("  {name:<18} {value}");
        }
        println!("  {:<18} {}", "pending_records", status.pending_connections);
    }
    if !status.protected.is_empty() {
        println!("\nprotected destinations:");
        for entry in &status.protected {
            let port = entry.port.map_or("any".to_string(), |p| p.to_string());
            println!(
                "  #{:<3} {:<24} port {:<6} -> {}",
                entry.rule + 1,
                entry.destination,
                port,
                entry.action
            );
        }
    }
    Ok(())
}
