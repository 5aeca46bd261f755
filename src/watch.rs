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

/// What a file was like when it was read, to tell later whether it changed: a rename over it
/// gives another inode, an edit in place another length or change time. Symlinks are followed,
/// so a link swapped to another file (Kubernetes' `..data`, certbot's `live/`) is a change.
///
/// A small file (up to [`HASHED_UP_TO`]: certificates, most configs) is also compared by its
/// bytes' hash: rewritten in place to the same length within one tick of a coarse file clock
/// (1–4 ms on kernels before 6.13), its times may not move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    #[cfg(unix)]
    inode: (u64, u64),
    len: u64,
    #[cfg(unix)]
    changed: (i64, i64),
    modified: Option<std::time::SystemTime>,
    content: Option<[u8; 32]>,
}

/// The largest file whose bytes a [`Stamp`] hashes; a larger one (a big keys file) is told by
/// its inode, size and times alone.
pub const HASHED_UP_TO: u64 = 256 * 1024;

impl Stamp {
    /// `path`'s stamp now; `None` when it cannot be read (missing, no permission).
    pub fn of(path: &Path) -> Option<Stamp> {
        let meta = std::fs::metadata(path).ok()?;
        #[cfg(unix)]
        use std::os::unix::fs::MetadataExt;
        let content = (meta.len() <= HASHED_UP_TO)
            .then(|| std::fs::read(path).ok())
            .flatten()
            .map(|bytes| *blake3::hash(&bytes).as_bytes());
        Some(Stamp {
            #[cfg(unix)]
            inode: (meta.dev(), meta.ino()),
            len: meta.len(),
            #[cfg(unix)]
            changed: (meta.ctime(), meta.ctime_nsec()),
            modified: meta.modified().ok(),
            content,
        })
    }
}

/// The files a state was read from, each stamped just before it was read: a change that lands
/// while reading shows as a change afterwards, never the other way round.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FilesRead(Vec<(PathBuf, Option<Stamp>)>);

impl FilesRead {
    /// Stamps `path`, about to be read.
    pub fn stamp(&mut self, path: &Path) {
        self.0.push((path.to_path_buf(), Stamp::of(path)));
    }

    /// The same files stamped now.
    pub fn now(&self) -> FilesRead {
        FilesRead(
            self.0
                .iter()
                .map(|(p, _)| (p.clone(), Stamp::of(p)))
                .collect(),
        )
    }

    /// Whether no file was stamped (a state not read from disk).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The files' paths.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.0.iter().map(|(p, _)| p.clone()).collect()
    }
}

/// What set off a [`ChangeFeed`] report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Something changed in a watched directory (or events were lost): worth a look at the
    /// files' [`FilesRead`] stamps before reading them again.
    Files,
    /// SIGHUP: the operator asks for a reload, whatever the stamps say.
    Signal,
}

/// Change notifications for a set of files; dropping it stops the watch.
///
/// A file is watched through its directory and, when it is a symlink, through the directory of
/// the file it names too; any change in those directories is reported, since a symlink swap
/// names another path than the file's (Kubernetes swaps `..data`). Callers compare stamps, so an
/// unrelated file beside the config costs a `stat`, not a reload.
pub struct ChangeFeed {
    rx: mpsc::UnboundedReceiver<Change>,
    debounce: Duration,
    files: Vec<PathBuf>,
    watch: DirWatch,
    /// Whether [`changed_since`](Self::changed_since) has looked once without an event.
    looked: bool,
}

impl ChangeFeed {
    /// Watches the directories of `files`. SIGHUP also counts as a change (logged with
    /// `hup_note` when given) until `stop` is set. A change is reported once the burst it
    /// belongs to has been quiet for `debounce`.
    pub fn start(
        files: &[PathBuf],
        hup_note: Option<&'static str>,
        debounce: Duration,
        stop: watch::Receiver<Option<Duration>>,
    ) -> anyhow::Result<ChangeFeed> {
        let (tx, rx) = mpsc::unbounded_channel::<Change>();
        let event_tx = tx.clone();
        let mut watch = DirWatch::start(move || {
            let _ = event_tx.send(Change::Files);
        })?;
        for dir in own_directories(files) {
            watch.add(&dir)?;
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
                            let _ = tx.send(Change::Signal);
                        }
                        _ = stop.wait_for(Option::is_some) => break,
                    }
                }
            });
        }
        let mut feed = ChangeFeed {
            rx,
            debounce,
            files: files.to_vec(),
            watch,
            looked: false,
        };
        feed.watch_targets();
        Ok(feed)
    }

    /// Waits until the files stamped in `seen` differ from it, or for SIGHUP, and returns them
    /// stamped again (before they are read again); `None` once `stop` is set. The first call
    /// looks at once: a change between the read and the start of the watch sent no event.
    /// Without stamps (nothing read from disk) every event counts.
    pub async fn changed_since(
        &mut self,
        seen: &FilesRead,
        stop: &mut watch::Receiver<Option<Duration>>,
    ) -> Option<FilesRead> {
        loop {
            let cause = if !self.looked && !seen.is_empty() {
                Change::Files
            } else {
                self.next(stop).await?
            };
            self.looked = true;
            let now = seen.now();
            if cause == Change::Signal || seen.is_empty() || now != *seen {
                return Some(now);
            }
        }
    }

    /// From now on watches `files` (as well): a reloaded config may name another keys file.
    pub fn follow(&mut self, files: &[PathBuf]) {
        self.files = files.to_vec();
        self.watch_targets();
    }

    /// Adds the directories the files' symlinks point into now (a link may have been swapped
    /// to a new directory); directories already watched are left as they are. One keygate
    /// may not list (searchable only) is left out: its own directory still sees a swap.
    fn watch_targets(&mut self) {
        for dir in own_directories(&self.files)
            .into_iter()
            .chain(target_directories(&self.files))
        {
            if let Err(e) = self.watch.add(&dir) {
                tracing::debug!(dir = %dir.display(), "cannot watch: {e}");
            }
        }
    }

    /// Waits for the next change and lets the burst it belongs to settle; `None` once `stop`
    /// is set. A burst with a SIGHUP in it is a [`Change::Signal`].
    pub async fn next(&mut self, stop: &mut watch::Receiver<Option<Duration>>) -> Option<Change> {
        let mut change = tokio::select! {
            Some(change) = self.rx.recv() => change,
            _ = stop.wait_for(Option::is_some) => return None,
        };
        tokio::time::sleep(self.debounce).await;
        while let Ok(more) = self.rx.try_recv() {
            if more == Change::Signal {
                change = Change::Signal;
            }
        }
        self.watch_targets();
        Some(change)
    }
}

/// The directory of each of `files`, as named.
fn own_directories(files: &[PathBuf]) -> Vec<PathBuf> {
    dedup(files.iter().map(|f| parent(f)).collect())
}

/// For each of `files` that is a symlink, the directory of the file it resolves to now.
fn target_directories(files: &[PathBuf]) -> Vec<PathBuf> {
    dedup(
        files
            .iter()
            .filter_map(|f| std::fs::canonicalize(f).ok())
            .map(|r| parent(&r))
            .collect(),
    )
}

fn parent(f: &Path) -> PathBuf {
    f.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn dedup(mut dirs: Vec<PathBuf>) -> Vec<PathBuf> {
    dirs.sort();
    dirs.dedup();
    dirs
}

/// The inotify watch on the directories: a task on the runtime reading its events, ended when
/// this is dropped.
#[cfg(target_os = "linux")]
struct DirWatch {
    watches: inotify::Watches,
    task: tokio::task::JoinHandle<()>,
}

#[cfg(target_os = "linux")]
impl DirWatch {
    /// The events that finish a change to a directory entry (see the module doc).
    const MASK: inotify::WatchMask = inotify::WatchMask::CLOSE_WRITE
        .union(inotify::WatchMask::MOVED_TO)
        .union(inotify::WatchMask::MOVED_FROM)
        .union(inotify::WatchMask::CREATE)
        .union(inotify::WatchMask::DELETE)
        .union(inotify::WatchMask::ATTRIB);

    /// Starts reading events; `changed` is called for each (and when events were lost: the
    /// kernel's queue overflowed, so anything may have changed).
    fn start(changed: impl Fn() + Send + 'static) -> anyhow::Result<Self> {
        use futures_util::StreamExt;
        let inotify = inotify::Inotify::init()?;
        let mut events = inotify.into_event_stream(vec![0u8; 4096])?;
        let watches = events.watches();
        let task = tokio::spawn(async move {
            while let Some(event) = events.next().await {
                match event {
                    // A watched directory went away (removed, unmounted): nothing in it changed.
                    Ok(event) if event.mask == inotify::EventMask::IGNORED => {}
                    Ok(_) => changed(),
                    Err(e) => {
                        tracing::error!("file watch ended, SIGHUP still reloads: {e}");
                        break;
                    }
                }
            }
        });
        Ok(DirWatch { watches, task })
    }

    /// Watches `dir` too (again is a no-op: the kernel keeps one watch per directory).
    fn add(&mut self, dir: &Path) -> std::io::Result<()> {
        self.watches.add(dir, Self::MASK).map(drop)
    }
}

#[cfg(target_os = "linux")]
impl Drop for DirWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The notify crate's watch on the directories.
#[cfg(not(target_os = "linux"))]
struct DirWatch(notify::RecommendedWatcher);

#[cfg(not(target_os = "linux"))]
impl DirWatch {
    fn start(changed: impl Fn() + Send + 'static) -> anyhow::Result<Self> {
        let watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
                Ok(event) if event.need_rescan() || !event.kind.is_access() => changed(),
                _ => {}
            })?;
        Ok(DirWatch(watcher))
    }

    fn add(&mut self, dir: &Path) -> std::io::Result<()> {
        use notify::Watcher;
        self.0
            .watch(dir, notify::RecursiveMode::NonRecursive)
            .map_err(std::io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(unix)]
    use std::io::Write;

    type Stop = (
        watch::Sender<Option<Duration>>,
        watch::Receiver<Option<Duration>>,
    );

    /// A feed on `target` (20 ms debounce), with the stop channel it watches.
    fn watch_file(target: &Path) -> (ChangeFeed, Stop) {
        let (stop_tx, stop) = watch::channel(None);
        let feed = ChangeFeed::start(
            &[target.to_path_buf()],
            None,
            Duration::from_millis(20),
            stop.clone(),
        )
        .unwrap();
        (feed, (stop_tx, stop))
    }

    /// A fresh directory (kept while the first value lives) with `gateway.toml` in it.
    fn config_dir() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = std::path::absolute(tmp.path()).unwrap();
        let target = dir.join("gateway.toml");
        std::fs::write(&target, "a").unwrap();
        (tmp, dir, target)
    }

    fn stamped(path: &Path) -> FilesRead {
        let mut read = FilesRead::default();
        read.stamp(path);
        read
    }

    /// Whether the feed reports any event within `within`.
    async fn reports(
        feed: &mut ChangeFeed,
        stop: &mut watch::Receiver<Option<Duration>>,
        within: Duration,
    ) -> bool {
        tokio::time::timeout(within, feed.next(stop))
            .await
            .ok()
            .flatten()
            .is_some()
    }

    /// Whether the file stamped in `seen` is reported changed within `within`; `seen` becomes
    /// the new stamp when it is.
    async fn changed(
        feed: &mut ChangeFeed,
        stop: &mut watch::Receiver<Option<Duration>>,
        seen: &mut FilesRead,
        within: Duration,
    ) -> bool {
        match tokio::time::timeout(within, feed.changed_since(seen, stop)).await {
            Ok(Some(now)) => {
                *seen = now;
                true
            }
            _ => false,
        }
    }

    const QUIET: Duration = Duration::from_millis(300);
    const SOON: Duration = Duration::from_secs(5);

    #[cfg(unix)]
    /// Every way a file is replaced or touched is a change; lines appended to another file in
    /// the directory, flushed one by one, wake nothing, and a new file beside it is no change.
    #[tokio::test]
    async fn changes_are_reported_and_appends_beside_them_wake_nothing() {
        let (_tmp, dir, target) = config_dir();
        // A log beside the config, open before the watch starts.
        let mut log = std::fs::File::create(dir.join("keygate.log")).unwrap();
        let (mut feed, (_stop_tx, mut stop)) = watch_file(&target);
        let mut seen = stamped(&target);
        assert!(
            !changed(&mut feed, &mut stop, &mut seen, QUIET).await,
            "nothing changed yet"
        );

        for i in 0..2000 {
            writeln!(log, "line {i}").unwrap();
            log.flush().unwrap();
        }
        assert!(
            !reports(&mut feed, &mut stop, QUIET).await,
            "appends woke the feed"
        );
        drop(log);

        // Written in place (closed after writing), to the same length at once.
        std::fs::write(&target, "b").unwrap();
        assert!(
            changed(&mut feed, &mut stop, &mut seen, SOON).await,
            "in-place write missed"
        );
        // Renamed over it.
        std::fs::write(dir.join("gateway.toml.new"), "c").unwrap();
        std::fs::rename(dir.join("gateway.toml.new"), &target).unwrap();
        assert!(
            changed(&mut feed, &mut stop, &mut seen, SOON).await,
            "rename missed"
        );
        // Touched (both times set, as `touch` does, here without opening it for writing).
        let epoch = std::time::SystemTime::UNIX_EPOCH;
        let times = std::fs::FileTimes::new()
            .set_accessed(epoch)
            .set_modified(epoch);
        std::fs::File::open(&target)
            .unwrap()
            .set_times(times)
            .unwrap();
        assert!(
            changed(&mut feed, &mut stop, &mut seen, SOON).await,
            "touch missed"
        );
        // A symlink swapped in by rename (certbot, Kubernetes mounts).
        std::fs::write(dir.join("v2.toml"), "d").unwrap();
        std::os::unix::fs::symlink(dir.join("v2.toml"), dir.join("link.tmp")).unwrap();
        std::fs::rename(dir.join("link.tmp"), &target).unwrap();
        assert!(
            changed(&mut feed, &mut stop, &mut seen, SOON).await,
            "symlink swap missed"
        );
        // Removed.
        std::fs::remove_file(&target).unwrap();
        assert!(
            changed(&mut feed, &mut stop, &mut seen, SOON).await,
            "removal missed"
        );
        // Other files: an event, but no change.
        std::fs::write(dir.join("other.toml"), "e").unwrap();
        assert!(
            !changed(&mut feed, &mut stop, &mut seen, QUIET).await,
            "another file taken for a change"
        );
    }

    #[cfg(unix)]
    /// A file that is a symlink into another directory changes where it lives, and in
    /// Kubernetes' way (files in a `..2026_…` directory, reached through a `..data` link that is
    /// swapped for a new directory's): both are changes.
    #[tokio::test]
    async fn a_symlinked_file_is_followed_where_it_lives() {
        use std::os::unix::fs::symlink;
        let tmp = tempfile::tempdir().unwrap();
        let root = std::path::absolute(tmp.path()).unwrap();
        let (conf, real) = (root.join("etc"), root.join("srv"));
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::create_dir_all(&real).unwrap();
        std::fs::write(real.join("keys.toml"), "a").unwrap();
        let target = conf.join("keys.toml");
        symlink(real.join("keys.toml"), &target).unwrap();
        let (mut feed, (_stop_tx, mut stop)) = watch_file(&target);
        let mut seen = stamped(&target);

        // Replaced where it lives, by rename (as `keygate keys` writes it).
        std::fs::write(real.join("keys.toml.new"), "bb").unwrap();
        std::fs::rename(real.join("keys.toml.new"), real.join("keys.toml")).unwrap();
        assert!(
            changed(&mut feed, &mut stop, &mut seen, SOON).await,
            "an edit of the file the link names was missed"
        );

        // Kubernetes: keys.toml -> ..data/keys.toml, ..data -> ..v1; an update writes ..v2 and
        // renames a new ..data link over the old one.
        let k8s = root.join("k8s");
        std::fs::create_dir_all(k8s.join("..v1")).unwrap();
        std::fs::write(k8s.join("..v1/keys.toml"), "v1").unwrap();
        symlink("..v1", k8s.join("..data")).unwrap();
        symlink("..data/keys.toml", k8s.join("keys.toml")).unwrap();
        let target = k8s.join("keys.toml");
        let (mut feed, (_stop_tx2, mut stop)) = watch_file(&target);
        let mut seen = stamped(&target);
        std::fs::create_dir_all(k8s.join("..v2")).unwrap();
        std::fs::write(k8s.join("..v2/keys.toml"), "v2").unwrap();
        symlink("..v2", k8s.join("..data_tmp")).unwrap();
        std::fs::rename(k8s.join("..data_tmp"), k8s.join("..data")).unwrap();
        assert!(
            changed(&mut feed, &mut stop, &mut seen, SOON).await,
            "the ..data swap was missed"
        );
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "v2");
    }

    /// A change made after the file was read but before the watch started has no event: the
    /// first look finds it by the stamps.
    #[tokio::test]
    async fn a_change_before_the_watch_started_is_found_at_once() {
        let (_tmp, dir, target) = config_dir();
        let mut seen = stamped(&target);
        std::fs::write(dir.join("gateway.toml.new"), "changed").unwrap();
        std::fs::rename(dir.join("gateway.toml.new"), &target).unwrap();
        let (mut feed, (_stop_tx, mut stop)) = watch_file(&target);
        assert!(
            changed(&mut feed, &mut stop, &mut seen, QUIET).await,
            "the change before the watch was missed"
        );
        assert!(
            !changed(&mut feed, &mut stop, &mut seen, QUIET).await,
            "reported twice"
        );
    }
}
