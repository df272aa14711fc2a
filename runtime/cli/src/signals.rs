//! Stopping the way operators stop a process: Ctrl-C (SIGINT) at a terminal, SIGTERM from
//! systemd, Kubernetes or `docker stop`. Both start the clean stop (every history tail written,
//! streams closed, the final store flush); a second signal during it, or a clean stop that
//! outlasts its limit, ends the process at once, saying so.

use std::future::Future;
use std::time::{Duration, Instant};

/// Longest a clean stop may take before the process exits without finishing it.
pub const CLEAN_STOP_LIMIT: Duration = Duration::from_secs(45);

/// Resolves at the next SIGINT or SIGTERM, with the signal's name.
pub async fn stop_requested() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = tokio::signal::ctrl_c() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops cleanly");
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}

/// Runs the clean stop `stop` after `signal` (logged, and printed for whoever watches the
/// terminal). A second signal, or `limit` passing, exits the process at once with code 130
/// or 1.
pub async fn clean_stop(signal: &str, stop: impl Future<Output = ()>, limit: Duration) {
    let started = Instant::now();
    tracing::info!(signal, "stopping cleanly (a second signal stops at once)");
    println!("{signal}: stopping cleanly (a second signal stops at once)");
    tokio::select! {
        () = stop => {
            let ms = started.elapsed().as_millis();
            tracing::info!(ms, "stopped cleanly");
            println!("stopped cleanly in {ms} ms");
        }
        again = stop_requested() => {
            tracing::error!(signal = again, "second signal: exiting without finishing the clean stop");
            eprintln!("{again} again: exiting without finishing the clean stop");
            std::process::exit(130);
        }
        () = tokio::time::sleep(limit) => {
            tracing::error!(limit_s = limit.as_secs(), "the clean stop took too long: exiting without finishing it");
            eprintln!("the clean stop took more than {} s: exiting without finishing it", limit.as_secs());
            std::process::exit(1);
        }
    }
}
