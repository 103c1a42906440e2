//! Termination signals: SIGTERM (Kubernetes, systemd) and SIGINT (Ctrl-C) both mean "stop
//! gracefully".

use std::future::Future;

/// Resolves on the first SIGTERM or SIGINT received after this call.
///
/// The listeners are registered when this is called, not when the future is first polled:
/// tokio's handler, once installed, swallows a signal no listener is registered for, so a
/// listener created lazily could miss a signal sent just before (the worker stalled on SIGTERM
/// that way, rarely, in CI). Must be called inside a tokio runtime.
pub fn terminated() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let listeners = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
        async move {
            match listeners {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => tracing::info!("SIGTERM received"),
                        _ = int.recv() => tracing::info!("SIGINT received"),
                    }
                }
                _ => {
                    tracing::warn!("cannot install signal handlers; stop with SIGKILL");
                    std::future::pending::<()>().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
