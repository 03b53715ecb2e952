//! Graceful shutdown: one sender, a receiver per task.

use tokio::sync::watch;

/// Fires the shutdown. Dropping it fires it too.
pub struct ShutdownSignal(watch::Sender<bool>);

/// A task's view of the shutdown.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl ShutdownSignal {
    pub fn new() -> (Self, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (Self(tx), Shutdown(rx))
    }

    pub fn fire(&self) {
        let _ = self.0.send(true);
    }
}

impl Shutdown {
    /// Resolves once shutdown has been requested.
    pub async fn requested(&mut self) {
        // An error means the sender is gone, which also means shut down.
        let _ = self.0.wait_for(|fired| *fired).await;
    }
}
