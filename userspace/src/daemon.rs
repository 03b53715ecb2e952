//! `portcullis run`: the daemon's lifecycle.
//!
//! Start-up order matters: listeners are bound first, then the kernel
//! programs attached with the protected set already in their maps, and only
//! then is systemd told we are ready. SIGHUP reloads the protected set,
//! SIGTERM/SIGINT stop the proxy. Enforcement deliberately stays attached
//! when the daemon exits: protected destinations fail closed until it is back
//! or an operator runs `portcullis kernel detach`.

use std::{path::PathBuf, sync::Arc};

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use crate::{
    audit::{service::AuditService, AuditEvent, Recorder},
    config::Config,
    identity::UnixIdentity,
    kernel::{self, Enforcement, EventReader, KernelAction},
    proxy::{self, Gateway, ShutdownSignal},
};

pub async fn run(config_path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&config_path)?;
    let rules = kernel::compile_rules(&config)?;
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("creating state directory {}", config.state_dir.display()))?;
    let audit = AuditService::start(&config).context("opening the audit store")?;
    let recorder: Arc<dyn Recorder> = audit.recorder();

    let listeners = proxy::bind(&config.listeners).await?;
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

    let gateway = Arc::new(Gateway {
        recorder,
        connections: enforcement.connections(),
        identity: Arc::new(UnixIdentity),
        exempt_mark: config.kernel.exempt_mark,
    });
    let (signal_shutdown, shutdown) = ShutdownSignal::new();
    let server = tokio::spawn(proxy::serve(listeners, gateway, shutdown));

    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    info!(config = %config_path.display(), "portcullis ready");

    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = hangup.recv() => reload(&config_path, &config, &mut enforcement),
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    info!("shutting down; kernel enforcement stays attached");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    signal_shutdown.fire();
    let _ = server.await;
    audit.stop().await;
    Ok(())
}

/// Re-reads the config and swaps the protected set. An invalid file changes
/// nothing: the running set stays in force.
fn reload(path: &std::path::Path, running: &Config, enforcement: &mut Enforcement) {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Reloading]);
    let result = Config::load(path)
        .map_err(anyhow::Error::from)
        .and_then(|config| {
            if config.listeners != running.listeners || config.kernel != running.kernel {
                warn!("listener and [kernel] changes take effect on restart only");
            }
            let rules = kernel::compile_rules(&config)?;
            Ok(enforcement.update_rules(&rules)?)
        });
    match result {
        Ok(report) => info!(
            rules = report.written,
            active_set = report.active_set,
            "protected set reloaded"
        ),
        Err(e) => error!("config reload rejected, previous protected set stays: {e:#}"),
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
}

async fn forward_kernel_events(mut reader: EventReader, recorder: Arc<dyn Recorder>) {
    loop {
        let batch = match reader.next_batch().await {
            Ok(batch) => batch,
            Err(e) => {
                error!("kernel event stream failed: {e}");
                return;
            }
        };
        let mut acks = Vec::with_capacity(batch.len());
        for event in batch {
            let o = &event.origin;
            match event.action {
                KernelAction::Redirect => info!(
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
        for ack in acks {
            if let Err(e) = ack.durable().await {
                error!("audit record lost: {e}");
            }
        }
    }
}
