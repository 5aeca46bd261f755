//! File-change feeds: a watch on directories plus SIGHUP, debounced, for the config reload and
//! the certificate reload alike.
//!
//! Directories are watched rather than files: editors, config management and certificate tools
//! replace a file by renaming a new one over it, which a watch on the old file would miss.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};

/// Change notifications for a set of files; dropping it stops the watch.
pub struct ChangeFeed {
    rx: mpsc::UnboundedReceiver<()>,
    debounce: Duration,
    _watcher: RecommendedWatcher,
}

impl ChangeFeed {
    /// Watches the directories of `files`; an event passes when `relevant` says so. SIGHUP also
    /// counts as a change (logged with `hup_note` when given) until `stop` is set. A change is
    /// reported once the burst it belongs to has been quiet for `debounce`.
    pub fn start(
        files: &[PathBuf],
        relevant: impl Fn(&notify::Event) -> bool + Send + 'static,
        hup_note: Option<&'static str>,
        debounce: Duration,
        stop: watch::Receiver<Option<Duration>>,
    ) -> anyhow::Result<ChangeFeed> {
        let mut dirs: Vec<PathBuf> = files
            .iter()
            .map(|f| {
                f.parent()
                    .map_or_else(|| PathBuf::from("/"), Path::to_path_buf)
            })
            .collect();
        dirs.sort();
        dirs.dedup();
        let (tx, rx) = mpsc::unbounded_channel::<()>();
        let event_tx = tx.clone();
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                if res.is_ok_and(|e| !e.kind.is_access() && relevant(&e)) {
                    let _ = event_tx.send(());
                }
            })?;
        for dir in &dirs {
            watcher.watch(dir, RecursiveMode::NonRecursive)?;
        }
        #[cfg(unix)]
        {
            let mut stop = stop;
            let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        Some(()) = hup.recv() => {
                            if let Some(note) = hup_note {
                                tracing::info!("{note}");
                            }
                            let _ = tx.send(());
                        }
                        _ = stop.wait_for(Option::is_some) => break,
                    }
                }
            });
        }
        Ok(ChangeFeed {
            rx,
            debounce,
            _watcher: watcher,
        })
    }

    /// Waits for the next change and lets the burst it belongs to settle; `false` once `stop`
    /// is set.
    pub async fn next(&mut self, stop: &mut watch::Receiver<Option<Duration>>) -> bool {
        tokio::select! {
            Some(()) = self.rx.recv() => {}
            _ = stop.wait_for(Option::is_some) => return false,
        }
        tokio::time::sleep(self.debounce).await;
        while self.rx.try_recv().is_ok() {}
        true
    }
}
