//! Live reload: a file watch and SIGHUP → read → validate → swap, or keep the old.
//!
//! The watcher observes the config file's directory (editors and config management replace a
//! file by rename, which a watch on the file itself would miss), and likewise `[auth] keys_file`
//! when one is set (the one named at start; a changed `keys_file` is watched after a restart,
//! SIGHUP reloads it meanwhile). Events are debounced for a few
//! milliseconds, then the file is parsed off the request path, on a thread of its own at the
//! lowest priority (`SCHED_IDLE` on Linux, see [`lower_priority`]), so a large key table never
//! takes CPU the request path needs. A valid file
//! becomes a new [`Live`] that carries over the limiters of ids that stay, stored with one atomic
//! swap; a broken one is logged once with `file:line:col` and the running state is kept.

use std::{path::Path, sync::Arc, time::Duration};

use tokio::sync::watch;

use crate::{
    config::{Config, ConfigError},
    keys::KeyTableBuilder,
    proxy::{Live, Shared},
    watch::ChangeFeed,
};

/// How long to wait after a change before reading, so a burst of events is one reload.
const DEBOUNCE: Duration = Duration::from_millis(50);

/// Reads and validates the config at `path` and, when valid, swaps it in.
/// Returns the number of keys now loaded.
pub fn reload_now(shared: &Shared, path: &Path) -> Result<usize, ConfigError> {
    let started = std::time::Instant::now();
    let old = shared.live.load_full();
    // Keys stream from the file straight into the new table (no vector of a million parsed
    // keys beside it), carrying over the limiters of ids that stay.
    let mut table = KeyTableBuilder::new(Some(&old.table));
    let config = Config::load_into(path, &mut table)?;
    let table = table.finish();
    let parsed = started.elapsed();
    if config.server.listen != old.config.server.listen
        || config.server.tls != old.config.server.tls
    {
        tracing::warn!("[server] listen/tls changes take effect after a restart");
    }
    if config.admin != old.config.admin || config.log != old.config.log {
        tracing::warn!("[admin] and [log] changes take effect after a restart");
    }
    if config.limit_store != old.config.limit_store {
        tracing::warn!("[limits] store/on_store_error changes take effect after a restart");
    }
    let live = Live::with_table(config, table, Some(&old));
    drop(old);
    let keys = live.table.len();
    tracing::debug!(
        ms = parsed.as_millis() as u64,
        keys,
        "config read and key table built"
    );
    let replaced = shared.live.swap(Arc::new(live));
    std::thread::spawn(move || {
        lower_priority();
        drop_off_the_request_path(replaced)
    });
    Ok(keys)
}

/// Nice value of the reload thread where `SCHED_IDLE` is refused.
const RELOAD_NICE: i32 = 19;

/// Moves the calling thread (the reload, or the drop of a replaced table) out of the request
/// path's way. On Linux it becomes `SCHED_IDLE`: a request-path thread that wakes up takes the
/// CPU from it at once, where a `nice 19` thread keeps it to the end of its time slice (a few
/// milliseconds, which is what a p99 during a million-key reload showed). It still runs
/// whenever a core has nothing else to do, so an idle or lightly loaded machine reloads at
/// full speed. Falls back to `nice 19` if the policy is refused.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        use thread_priority::unix::{
            set_thread_priority_and_policy, thread_native_id, NormalThreadSchedulePolicy,
            ThreadSchedulePolicy,
        };
        let idle = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
        match set_thread_priority_and_policy(
            thread_native_id(),
            thread_priority::ThreadPriority::Min,
            idle,
        ) {
            Ok(()) => return,
            Err(e) => tracing::debug!("SCHED_IDLE refused, using nice {RELOAD_NICE}: {e:?}"),
        }
        if let Err(e) =
            rustix::process::setpriority_process(Some(rustix::thread::gettid()), RELOAD_NICE)
        {
            tracing::debug!("cannot lower the reload thread's priority: {e}");
        }
    }
}

/// Drops the replaced state on a thread of its own, once requests in flight have let go of
/// it: whoever drops the last `Arc` frees the old table, and for a million keys that is a few
/// hundred milliseconds a request should not wait for (nor the "config reloaded" line). Gives
/// up waiting after a while (a request slow to get its response head); the last holder frees
/// it then.
fn drop_off_the_request_path(replaced: Arc<Live>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while Arc::strong_count(&replaced) > 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    drop(replaced);
}

/// Starts the watcher and the SIGHUP handler; both stop when `stop` turns true.
pub fn spawn(shared: Arc<Shared>, stop: watch::Receiver<Option<Duration>>) -> anyhow::Result<()> {
    let live = shared.live.load_full();
    let path = std::path::absolute(&live.config.path)?;
    let mut targets = vec![path.clone()];
    if let Some(keys_file) = &live.config.auth.keys_file {
        targets.push(std::path::absolute(keys_file)?);
    }
    let watched = targets.clone();
    let mut feed = ChangeFeed::start(
        &watched,
        move |event| event.paths.iter().any(|p| targets.contains(p)),
        Some("SIGHUP: reloading the config"),
        DEBOUNCE,
        stop.clone(),
    )?;
    let mut stop = stop;
    tokio::spawn(async move {
        while feed.next(&mut stop).await {
            let result = {
                let shared = Arc::clone(&shared);
                let path = path.clone();
                let (done, result) = tokio::sync::oneshot::channel();
                let spawned = std::thread::Builder::new()
                    .name("keygate-reload".into())
                    .spawn(move || {
                        lower_priority();
                        let _ = done.send(reload_now(&shared, &path));
                    });
                match spawned {
                    Ok(_) => result
                        .await
                        .map_err(|_| "the reload thread panicked".to_string()),
                    Err(e) => Err(format!("cannot start the reload thread: {e}")),
                }
            };
            shared.metrics.config_reload(matches!(result, Ok(Ok(_))));
            match result {
                Ok(Ok(keys)) => tracing::info!(keys, "config reloaded"),
                Ok(Err(err)) => {
                    tracing::error!("config reload failed, keeping the running config: {err}")
                }
                Err(e) => {
                    tracing::error!("config reload failed, keeping the running config: {e}")
                }
            }
        }
    });
    Ok(())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    /// The reload thread runs as `SCHED_IDLE` (policy 5, field 41 of `/proc/thread-self/stat`),
    /// which this machine grants unprivileged threads.
    #[test]
    fn the_reload_thread_gets_the_idle_policy() {
        let policy = std::thread::spawn(|| {
            super::lower_priority();
            let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
            // Fields after the command name, which ends at the last ')'.
            let fields: Vec<&str> = stat
                .rsplit_once(')')
                .unwrap()
                .1
                .split_whitespace()
                .collect();
            fields[41 - 3].to_string()
        })
        .join()
        .unwrap();
        assert_eq!(policy, "5");
    }
}
