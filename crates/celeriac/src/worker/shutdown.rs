//! Shutdown: the first SIGINT/SIGTERM asks for a graceful stop (stop fetching, let running
//! tasks finish within `worker_soft_shutdown_timeout`, give back what did not start); a second
//! one stops at once.

use tokio_util::sync::CancellationToken;

/// Two-stage shutdown signal shared by the consumer and every running task.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    graceful: CancellationToken,
    immediate: CancellationToken,
}

impl Shutdown {
    /// A shutdown that nothing has triggered yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stop fetching and let running tasks finish.
    pub fn graceful(&self) {
        self.graceful.cancel();
    }

    /// Stop now: running tasks are abandoned (their `acks_late` messages go back to the queue).
    pub fn immediate(&self) {
        self.graceful.cancel();
        self.immediate.cancel();
    }

    /// Whether a graceful (or immediate) stop was asked for.
    pub fn is_graceful(&self) -> bool {
        self.graceful.is_cancelled()
    }

    /// Resolves when a graceful stop is asked for.
    pub async fn graceful_requested(&self) {
        self.graceful.cancelled().await;
    }

    /// Resolves when an immediate stop is asked for.
    pub async fn immediate_requested(&self) {
        self.immediate.cancelled().await;
    }

    /// Listens for SIGINT/SIGTERM (Ctrl-C elsewhere): first → graceful, second → immediate.
    pub fn listen_for_signals(&self) {
        let this = self.clone();
        tokio::spawn(async move {
            for stage in 0..2 {
                if wait_for_signal().await.is_err() {
                    return;
                }
                if stage == 0 {
                    tracing::warn!("shutdown requested: finishing running tasks (signal again to stop at once)");
                    this.graceful();
                } else {
                    tracing::warn!("second signal: stopping now");
                    this.immediate();
                }
            }
        });
    }
}

#[cfg(unix)]
async fn wait_for_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    Ok(())
}

#[cfg(not(unix))]
async fn wait_for_signal() -> std::io::Result<()> {
    tokio::signal::ctrl_c().await
}
