//! Live reload: a file watch and SIGHUP → read → validate → swap, or keep the old.
//!
//! The watcher observes the config file's directory (editors and config management replace a
//! file by rename, which a watch on the file itself would miss). Events are debounced for a few
//! milliseconds, then the file is parsed off the request path (`spawn_blocking`). A valid file
//! becomes a new [`Live`] that carries over the limiters of ids that stay, stored with one atomic
//! swap; a broken one is logged once with `file:line:col` and the running state is kept.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};

use crate::{
    config::{Config, ConfigError},
    proxy::{Live, Shared},
};

/// How long to wait after a change before reading, so a burst of events is one reload.
const DEBOUNCE: Duration = Duration::from_millis(50);

/// Reads and validates the config at `path` and, when valid, swaps it in.
/// Returns the number of keys now loaded.
pub fn reload_now(shared: &Shared, path: &Path) -> Result<usize, ConfigError> {
    let config = Config::load(path)?;
    let old = shared.live.load_full();
    if config.server.listen != old.config.server.listen
        || config.server.tls != old.config.server.tls
    {
        tracing::warn!("[server] listen/tls changes take effect after a restart");
    }
    if config.limit_store != old.config.limit_store {
        tracing::warn!("[limits] store/on_store_error changes take effect after a restart");
    }
    let live = Live::new(config, Some(&old));
    let keys = live.table.len();
    shared.live.store(Arc::new(live));
    Ok(keys)
}

/// Starts the watcher and the SIGHUP handler; both stop when `stop` turns true.
pub fn spawn(shared: Arc<Shared>, stop: watch::Receiver<Option<Duration>>) -> anyhow::Result<()> {
    let path = std::path::absolute(&shared.live.load().config.path)?;
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let target = path.clone();
    let event_tx = tx.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(event) = res {
            if !event.kind.is_access() && event.paths.iter().any(|p| p == &target) {
                let _ = event_tx.send(());
            }
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;

    #[cfg(unix)]
    {
        let tx = tx.clone();
        let mut stop = stop.clone();
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    Some(()) = hup.recv() => {
                        tracing::info!("SIGHUP: reloading the config");
                        let _ = tx.send(());
                    }
                    _ = stop.wait_for(Option::is_some) => break,
                }
            }
        });
    }

    let mut stop = stop;
    tokio::spawn(async move {
        let _watcher = watcher;
        loop {
            tokio::select! {
                Some(()) = rx.recv() => {}
                _ = stop.wait_for(Option::is_some) => break,
            }
            tokio::time::sleep(DEBOUNCE).await;
            while rx.try_recv().is_ok() {}
            let shared = Arc::clone(&shared);
            let path = path.clone();
            let result = tokio::task::spawn_blocking(move || reload_now(&shared, &path)).await;
            match result {
                Ok(Ok(keys)) => tracing::info!(keys, "config reloaded"),
                Ok(Err(err)) => {
                    tracing::error!("config reload failed, keeping the running config: {err}")
                }
                Err(e) => {
                    tracing::error!("config reload panicked, keeping the running config: {e}")
                }
            }
        }
    });
    Ok(())
}
