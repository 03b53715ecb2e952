//! `portcullis run`: the daemon's lifecycle.
//!
//! Start-up order matters: listeners are bound first, then the kernel
//! programs attached with the protected set already in their maps, and only
//! then is systemd told we are ready. SIGHUP reloads the protected set,
//! the PostgreSQL resources, grants and listener certificates (for new
//! sessions) and the policy; SIGTERM/SIGINT stop the proxy. Enforcement deliberately stays attached
//! when the daemon exits: protected destinations fail closed until it is back
//! or an operator runs `portcullis kernel detach`.

use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
};

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{debug, error, info, warn};

use crate::{
    audit::{service::AuditService, Acks, AuditEvent, Recorder},
    config::{Config, ProtectRule},
    control,
    identity::{IdentityProvider, OidcIdentity, UnixIdentity},
    kernel::{self, Enforcement, EventReader, KernelAction},
    protocol::postgres::PostgresGateway,
    proxy::{self, Gateway, ShutdownSignal},
};

pub async fn run(config_path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&config_path)?;
    let rules = kernel::compile_rules(&config)?;
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("creating state directory {}", config.state_dir.display()))?;
    let audit = AuditService::start(&config).context("opening the audit store")?;
    let recorder: Arc<dyn Recorder> = audit.recorder();

    let postgres = PostgresGateway::from_config(&config)
        .context("loading the PostgreSQL listeners and resources")?;
    let listeners = proxy::bind(&config.listeners, config.proxy.workers())?;
    let mut enforcement = Enforcement::start(&config.kernel, &rules)
        .context("attaching kernel enforcement (run as root, or with CAP_BPF and CAP_NET_ADMIN)")?;
    info!(
        attached = ?enforcement.attached,
        adopted = ?enforcement.adopted,
        rules = rules.len(),
        pin_dir = %config.kernel.pin_dir.display(),
        "kernel enforcement active"
    );

    tokio::spawn(forward_kernel_events(
        enforcement.events()?,
        Arc::clone(&recorder),
    ));
    if let Some(logger) = enforcement.take_kernel_logger() {
        tokio::spawn(kernel::forward_log(logger));
    }

    // OIDC when configured, with the control socket `portcullis login`
    // talks to; else the local account names the person.
    let (identity, control_socket): (Arc<dyn IdentityProvider>, _) = match &config.identity {
        Some(identity) => {
            let oidc = OidcIdentity::start(identity, Arc::clone(&recorder))
                .await
                .with_context(|| format!("starting OIDC sign-in with {}", identity.issuer))?;
            let socket = control::bind(&identity.control_socket)?;
            (Arc::clone(&oidc) as _, Some((socket, oidc)))
        }
        None => (Arc::new(UnixIdentity), None),
    };
    if control_socket.is_some() {
        // Auditors are principals with the auditors role: OIDC only.
        audit.set_identity(Arc::clone(&identity));
    }
    let policy = load_policy(&config, &config_path, &recorder, &identity)?;
    let gateway = Arc::new(Gateway {
        recorder,
        connections: enforcement.connections(),
        fast_path: enforcement.fast_path().filter(|_| config.kernel.fast_path),
        identity,
        exempt_mark: config.kernel.exempt_mark,
        postgres: RwLock::new(Arc::new(postgres)),
        policy: policy.clone(),
    });
    let (signal_shutdown, shutdown) = ShutdownSignal::new();
    if let Some((socket, oidc)) = control_socket {
        tokio::spawn(control::serve(socket, oidc, shutdown.clone()));
    }
    let workers = proxy::Workers::start(listeners, Arc::clone(&gateway), shutdown)
        .context("starting the proxy worker threads")?;

    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    info!(config = %config_path.display(), "portcullis ready");

    // The protected set in force, to compare a reload's with.
    let mut protected = config.protect.clone();
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut store_failed = false;
    loop {
        tokio::select! {
            _ = hangup.recv() => {
                // A reload waits for the file to settle (seconds, at
                // most); a stop signal meanwhile abandons it, and nothing
                // is changed before the file is read.
                let stopping = tokio::select! {
                    () = reload(&config_path, &config, &mut protected, &mut enforcement, &gateway) => false,
                    _ = terminate.recv() => true,
                    _ = interrupt.recv() => true,
                };
                if stopping {
                    warn!("config reload abandoned: stopping");
                    break;
                }
                if let Some(policy) = &policy {
                    if let Err(e) = policy.reload() {
                        error!("policy reload rejected, the previous policy stays in force: {e}");
                    }
                }
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            () = audit.writer_stopped() => {
                // Only reopening the store mends it: exit with an error so
                // the service manager restarts the daemon. Kernel
                // enforcement stays attached, so protected destinations
                // are refused meanwhile.
                error!("the audit store cannot record: exiting for a restart");
                store_failed = true;
                break;
            }
        }
    }
    info!("shutting down; kernel enforcement stays attached");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    signal_shutdown.fire();
    workers.finished().await;
    audit.stop().await;
    if store_failed {
        anyhow::bail!(
            "the audit store failed (see the errors above); restart the daemon to reopen it"
        );
    }
    Ok(())
}

/// Loads the policy file if one is configured, watches it for changes and
/// serves `portcullis approvals`. An invalid policy stops start-up: there is
/// no previous policy to keep.
fn load_policy(
    config: &Config,
    config_path: &std::path::Path,
    recorder: &Arc<dyn Recorder>,
    identity: &Arc<dyn IdentityProvider>,
) -> anyhow::Result<Option<Arc<crate::policy::PolicyRuntime>>> {
    let Some(path) = config.policy_path(config_path) else {
        return Ok(None);
    };
    let policy =
        crate::policy::PolicyRuntime::load(Some(&path), &config.state_dir, Arc::clone(recorder))?;
    policy.serve_approvals(&config.state_dir, Arc::clone(identity))?;
    tokio::spawn(Arc::clone(&policy).watch());
    info!(policy = %path.display(), "policy loaded");
    Ok(Some(policy))
}

/// Re-reads the config and swaps the protected set and the PostgreSQL
/// resources. An invalid file (or a certificate that does not load) changes
/// nothing: everything running stays in force. So does a file that is
/// still being written, or one that would protect nothing (see
/// [`read_settled`] and [`check_protection`]).
///
/// Only the wait for a settled file awaits: dropped during it, the reload
/// has changed nothing.
async fn reload(
    path: &std::path::Path,
    running: &Config,
    protected: &mut Vec<ProtectRule>,
    enforcement: &mut Enforcement,
    gateway: &Gateway,
) {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Reloading]);
    let result = read_settled(path).await.and_then(|config| {
        let dropped = check_protection(protected, &config.protect)?;
        if config.listeners != running.listeners || config.kernel != running.kernel {
            warn!("listener and [kernel] changes take effect on restart only");
        }
        if config.identity != running.identity {
            warn!("[identity] changes take effect on restart only (a restart ends every login)");
        }
        let rules = kernel::compile_rules(&config)?;
        let postgres = gateway
            .postgres()
            .reloaded(&config)
            .context("loading the PostgreSQL listeners and resources")?;
        let report = enforcement.update_rules(&rules)?;
        gateway.set_postgres(postgres);
        for gone in dropped {
            warn!(
                destination = %gone.destination,
                port = gone.port.map_or_else(|| "any".to_string(), |p| p.to_string()),
                to = %gone.to,
                "reload stopped protecting this destination"
            );
        }
        protected.clone_from(&config.protect);
        Ok(report)
    });
    match result {
        Ok(report) => info!(
            rules = report.written,
            active_set = report.active_set,
            "protected set reloaded; PostgreSQL resources and certificates too"
        ),
        Err(e) => error!("config reload rejected, the running configuration stays: {e:#}"),
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
}

/// How long the config file must read the same before a reload uses it,
/// and how often to try. A file caught half-written (a deploy tool or an
/// editor writing in place) can still be valid TOML with fewer
/// `[[protect]]` rules, which would quietly let connects past the gateway.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(100);
const SETTLE_TRIES: u32 = 30;

/// The config once two reads [`SETTLE`] apart agree.
async fn read_settled(path: &std::path::Path) -> anyhow::Result<Config> {
    let mut text = Config::read(path)?;
    for _ in 0..SETTLE_TRIES {
        tokio::time::sleep(SETTLE).await;
        let again = Config::read(path)?;
        if again == text {
            return Ok(Config::from_file_text(path, &text)?);
        }
        text = again;
    }
    anyhow::bail!(
        "{} kept changing for {:?}; reload again once it is written (write it to a \
         temporary file and rename it over the config to make that atomic)",
        path.display(),
        SETTLE * SETTLE_TRIES
    )
}

/// The running rules a reload would drop, to be named in the log once it
/// is applied. Refuses a reload that would protect nothing while something
/// is protected: an emptied or truncated file fails closed (restart the
/// service to drop every rule on purpose).
fn check_protection(
    running: &[ProtectRule],
    new: &[ProtectRule],
) -> anyhow::Result<Vec<ProtectRule>> {
    if new.is_empty() && !running.is_empty() {
        anyhow::bail!(
            "the new config protects no destination while {} rule(s) are in force; \
             to drop every rule, restart the service",
            running.len()
        );
    }
    Ok(running
        .iter()
        .filter(|rule| !new.contains(rule))
        .cloned()
        .collect())
}

/// Records what the kernel reports (redirects and blocks) as it comes.
/// Nobody waits on these records, so they go with the writer's next commit
/// rather than each forcing one: a redirect's record would otherwise cost
/// every local connection a commit of its own before the one its session
/// start needs.
async fn forward_kernel_events(mut reader: EventReader, recorder: Arc<dyn Recorder>) {
    loop {
        let batch = match reader.next_batch().await {
            Ok(batch) => batch,
            Err(e) => {
                error!("kernel event stream failed: {e}");
                return;
            }
        };
        let mut acks = Acks::default();
        for event in batch {
            let o = &event.origin;
            match event.action {
                // The session's start, logged just after at info, names the
                // same origin; the audit store keeps every redirect.
                KernelAction::Redirect => debug!(
                    destination = %o.original_destination, uid = o.uid, pid = o.pid,
                    command = %o.command, rule = o.rule, "kernel redirected connect"
                ),
                _ => warn!(
                    action = ?event.action, transport = ?event.transport,
                    destination = %o.original_destination, uid = o.uid, pid = o.pid,
                    command = %o.command, rule = o.rule, "kernel blocked"
                ),
            }
            acks.push(recorder.record(AuditEvent::Kernel(event)));
        }
        tokio::spawn(async move {
            if let Err(e) = acks.durable_unhurried().await {
                error!("audit record of a kernel event lost: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_RULES: &str = r#"
        [[listener]]
        name = "pg"
        address = "127.0.0.1:15432"

        [[protect]]
        destination = "10.0.0.5"
        port = 5432
        to = "pg"

        [[protect]]
        destination = "10.0.0.6"
        to = "block"
    "#;

    #[test]
    fn a_reload_that_protects_nothing_is_refused_and_fewer_rules_are_not() {
        let running = Config::parse(TWO_RULES).unwrap().protect;
        let err = check_protection(&running, &[]).unwrap_err().to_string();
        assert!(
            err.contains("protects no destination while 2 rule(s)"),
            "{err}"
        );
        assert_eq!(
            check_protection(&running, &running[..1]).unwrap(),
            running[1..]
        );
        assert!(check_protection(&[], &[]).unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_reload_reads_the_file_once_it_stops_changing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("portcullis.toml");
        // Cut short before its second rule, then completed while the
        // reload waits: the reload sees the whole file.
        let cut = TWO_RULES
            .find("[[protect]]\n        destination = \"10.0.0.6\"")
            .unwrap();
        std::fs::write(&path, &TWO_RULES[..cut]).unwrap();
        let writer = {
            let path = path.clone();
            tokio::spawn(async move {
                tokio::time::sleep(SETTLE / 2).await;
                std::fs::write(&path, TWO_RULES).unwrap();
            })
        };
        let config = read_settled(&path).await.unwrap();
        writer.await.unwrap();
        assert_eq!(config.protect.len(), 2);
    }
}
