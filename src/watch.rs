//! File-change feeds: a watch on directories plus SIGHUP, debounced, for the config reload and
//! the certificate reload alike.
//!
//! Directories are watched rather than files: editors, config management and certificate tools
//! replace a file by renaming a new one over it, which a watch on the old file would miss.
//!
//! On Linux the watch is inotify asked only for the events that finish a change: a file closed
//! after writing, renamed into or out of the directory, created, deleted, or its attributes
//! changed (`touch`). Not every `write(2)` (`IN_MODIFY`) nor every `open(2)`, which a general
//! watcher such as the notify crate asks for: those made each line appended to a log beside the
//! config a wake-up of keygate (2.7 µs of its CPU a line, and the writer three times slower,
//! measured with 100,000 flushed appends). Elsewhere the notify crate watches.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::sync::{mpsc, watch};

/// Change notifications for a set of files; dropping it stops the watch.
pub struct ChangeFeed {
    rx: mpsc::UnboundedReceiver<()>,
    debounce: Duration,
    _watch: DirWatch,
}

impl ChangeFeed {
    /// Watches the directories of `files`; a change to a path in them passes when `relevant`
    /// says so. SIGHUP also counts as a change (logged with `hup_note` when given) until `stop`
    /// is set. A change is reported once the burst it belongs to has been quiet for `debounce`.
    pub fn start(
        files: &[PathBuf],
        relevant: impl Fn(&Path) -> bool + Send + 'static,
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
        // `None`: events were lost, so any file may have changed.
        let watch = DirWatch::start(&dirs, move |path: Option<&Path>| {
            if path.map_or(true, &relevant) {
                let _ = event_tx.send(());
            }
        })?;
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
            _watch: watch,
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

/// The inotify watch on the directories: a task on the runtime reading its events, ended when
/// this is dropped.
#[cfg(target_os = "linux")]
struct DirWatch(tokio::task::JoinHandle<()>);

#[cfg(target_os = "linux")]
impl DirWatch {
    /// The events that finish a change to a directory entry (see the module doc).
    const MASK: inotify::WatchMask = inotify::WatchMask::CLOSE_WRITE
        .union(inotify::WatchMask::MOVED_TO)
        .union(inotify::WatchMask::MOVED_FROM)
        .union(inotify::WatchMask::CREATE)
        .union(inotify::WatchMask::DELETE)
        .union(inotify::WatchMask::ATTRIB);

    /// Watches `dirs`; `changed` gets the path of each entry an event names, or `None` when
    /// events were lost (the kernel's queue overflowed).
    fn start(
        dirs: &[PathBuf],
        changed: impl Fn(Option<&Path>) + Send + 'static,
    ) -> anyhow::Result<Self> {
        use futures_util::StreamExt;
        let inotify = inotify::Inotify::init()?;
        let mut watched = std::collections::HashMap::new();
        for dir in dirs {
            watched.insert(inotify.watches().add(dir, Self::MASK)?, dir.clone());
        }
        let mut events = inotify.into_event_stream(vec![0u8; 4096])?;
        Ok(DirWatch(tokio::spawn(async move {
            while let Some(event) = events.next().await {
                match event {
                    Ok(event) if event.mask.contains(inotify::EventMask::Q_OVERFLOW) => {
                        changed(None);
                    }
                    Ok(event) => {
                        if let (Some(dir), Some(name)) = (watched.get(&event.wd), &event.name) {
                            changed(Some(&dir.join(name)));
                        }
                    }
                    Err(e) => {
                        tracing::error!("file watch ended, SIGHUP still reloads: {e}");
                        break;
                    }
                }
            }
        })))
    }
}

#[cfg(target_os = "linux")]
impl Drop for DirWatch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The notify crate's watch on the directories.
#[cfg(not(target_os = "linux"))]
struct DirWatch(notify::RecommendedWatcher);

#[cfg(not(target_os = "linux"))]
impl DirWatch {
    fn start(
        dirs: &[PathBuf],
        changed: impl Fn(Option<&Path>) + Send + 'static,
    ) -> anyhow::Result<Self> {
        use notify::Watcher;
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
                Ok(event) if event.need_rescan() => changed(None),
                Ok(event) if !event.kind.is_access() => {
                    event.paths.iter().for_each(|p| changed(Some(p)))
                }
                _ => {}
            })?;
        for dir in dirs {
            watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
        }
        Ok(DirWatch(watcher))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(unix)]
    use std::io::Write;
    use std::sync::atomic::{AtomicUsize, Ordering};

    type Stop = (
        watch::Sender<Option<Duration>>,
        watch::Receiver<Option<Duration>>,
    );

    /// A feed on `target` (20 ms debounce) whose filter passes `target` and counts in `seen`
    /// every path it is asked about; with the stop channel it watches.
    #[cfg(unix)]
    fn watch_file(target: &Path, seen: std::sync::Arc<AtomicUsize>) -> (ChangeFeed, Stop) {
        let (stop_tx, stop) = watch::channel(None);
        let wanted = target.to_path_buf();
        let feed = ChangeFeed::start(
            &[target.to_path_buf()],
            move |p| {
                seen.fetch_add(1, Ordering::SeqCst);
                p == wanted
            },
            None,
            Duration::from_millis(20),
            stop.clone(),
        )
        .unwrap();
        (feed, (stop_tx, stop))
    }

    /// A fresh directory (kept while the first value lives) with `gateway.toml` in it.
    #[cfg(unix)]
    fn config_dir() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = std::path::absolute(tmp.path()).unwrap();
        let target = dir.join("gateway.toml");
        std::fs::write(&target, "a").unwrap();
        (tmp, dir, target)
    }

    /// Whether the feed reports a change within `within`.
    #[cfg(unix)]
    async fn reports(
        feed: &mut ChangeFeed,
        stop: &mut watch::Receiver<Option<Duration>>,
        within: Duration,
    ) -> bool {
        tokio::time::timeout(within, feed.next(stop))
            .await
            .unwrap_or(false)
    }

    #[cfg(unix)]
    /// Every way a file is replaced or touched is reported; lines appended to another file in
    /// the directory, flushed one by one, do not even reach the filter (no wake-up per line).
    #[tokio::test]
    async fn changes_are_reported_and_appends_beside_them_wake_nothing() {
        let (_tmp, dir, target) = config_dir();
        // A log beside the config, open before the watch starts.
        let mut log = std::fs::File::create(dir.join("keygate.log")).unwrap();
        let seen = std::sync::Arc::new(AtomicUsize::new(0));
        let (mut feed, (_stop_tx, mut stop)) = watch_file(&target, std::sync::Arc::clone(&seen));
        let quiet = Duration::from_millis(300);
        let soon = Duration::from_secs(5);

        for i in 0..2000 {
            writeln!(log, "line {i}").unwrap();
            log.flush().unwrap();
        }
        assert!(
            !reports(&mut feed, &mut stop, quiet).await,
            "appends reported"
        );
        let seen_while_appending = seen.load(Ordering::SeqCst);
        assert_eq!(seen_while_appending, 0, "events for appended lines");
        drop(log);

        // Written in place (closed after writing).
        std::fs::write(&target, "b").unwrap();
        assert!(
            reports(&mut feed, &mut stop, soon).await,
            "in-place write missed"
        );
        // Renamed over it.
        std::fs::write(dir.join("gateway.toml.new"), "c").unwrap();
        std::fs::rename(dir.join("gateway.toml.new"), &target).unwrap();
        assert!(reports(&mut feed, &mut stop, soon).await, "rename missed");
        // Touched (both times set, as `touch` does, here without opening it for writing).
        let epoch = std::time::SystemTime::UNIX_EPOCH;
        let times = std::fs::FileTimes::new()
            .set_accessed(epoch)
            .set_modified(epoch);
        std::fs::File::open(&target)
            .unwrap()
            .set_times(times)
            .unwrap();
        assert!(reports(&mut feed, &mut stop, soon).await, "touch missed");
        // A symlink swapped in by rename (certbot, Kubernetes mounts).
        std::fs::write(dir.join("v2.toml"), "d").unwrap();
        std::os::unix::fs::symlink(dir.join("v2.toml"), dir.join("link.tmp")).unwrap();
        std::fs::rename(dir.join("link.tmp"), &target).unwrap();
        assert!(
            reports(&mut feed, &mut stop, soon).await,
            "symlink swap missed"
        );
        // Removed.
        std::fs::remove_file(&target).unwrap();
        assert!(reports(&mut feed, &mut stop, soon).await, "removal missed");
        // Other files: nothing.
        std::fs::write(dir.join("other.toml"), "e").unwrap();
        assert!(
            !reports(&mut feed, &mut stop, quiet).await,
            "another file reported"
        );
    }

    /// When the kernel drops events (its queue for the watch overflowed while keygate was busy),
    /// a change is assumed: the file may have been among them.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn lost_events_count_as_a_change() {
        let (_tmp, dir, target) = config_dir();
        let (mut feed, (_stop_tx, mut stop)) = watch_file(&target, Default::default());
        // More events than the queue holds, made without yielding to the runtime (this test's
        // only thread), so none are read meanwhile; none of them names the watched file.
        let queue: usize = std::fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
            .map_or(16384, |s| s.trim().parse().unwrap());
        for i in 0..queue + 100 {
            std::fs::File::create(dir.join(format!("other-{i}"))).unwrap();
        }
        assert!(
            reports(&mut feed, &mut stop, Duration::from_secs(5)).await,
            "the overflow was not taken as a change"
        );
    }
}
