//! Live reload: a file watch and SIGHUP → read → validate → swap, or keep the old.
//!
//! The watcher observes the config file's directory (editors and config management replace a
//! file by rename, which a watch on the file itself would miss), and likewise `[auth] keys_file`
//! when one is set (the one the running config names: a reload that names another is followed),
//! and for a symlinked file the directory of the file it names too. An event there reloads only
//! when the files read last changed since ([`crate::watch::FilesRead`]). Events are debounced
//! for a few milliseconds, then the file is parsed off the request path, on a thread of its own
//! at a lower priority (`nice` 19 on Linux), so a large key table never takes CPU the request
//! path needs. A valid file becomes a new [`Live`] that carries over the limiters of ids that
//! stay, stored with one atomic swap; a broken one is logged once with `file:line:col` and the
//! running state is kept.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::sync::watch;

use crate::{
    config::{Config, ConfigError, ServerConfig},
    keys::KeyTableBuilder,
    proxy::{Live, Shared},
    watch::{ChangeFeed, FilesRead},
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
    if restart_only_server_fields_differ(&config.server, &old.config.server) {
        tracing::warn!(
            "[server] changes take effect after a restart (trusted_proxies and max_body apply now)"
        );
    }
    if config.admin != old.config.admin || config.log != old.config.log {
        tracing::warn!("[admin] and [log] changes take effect after a restart");
    }
    if config.limit_store != old.config.limit_store {
        tracing::warn!("[limits] store/on_store_error changes take effect after a restart");
    }
    if config.upstream.ca != old.config.upstream.ca {
        // The upstream client (and its pool of verified connections) is built once, at start.
        tracing::warn!("[upstream] ca_file changes take effect after a restart");
    }
    if config.upstream.client_cert != old.config.upstream.client_cert {
        // The files named at start are watched (renewals apply on their own); other files, or
        // none, need the client built anew.
        tracing::warn!(
            "[upstream] client_cert/client_key changes take effect after a restart \
             (the files named at start are watched: renew those in place)"
        );
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

/// Nice value of the reload thread: parsing a million keys is seconds of CPU, and on a busy
/// machine serving requests comes first. An idle core still runs it at full speed.
const RELOAD_NICE: i32 = 19;

/// Lowers the calling thread's scheduling priority to [`RELOAD_NICE`] (Linux: per thread).
fn lower_priority() {
    #[cfg(target_os = "linux")]
    if let Err(e) =
        rustix::process::setpriority_process(Some(rustix::thread::gettid()), RELOAD_NICE)
    {
        tracing::debug!("cannot lower the reload thread's priority: {e}");
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
///
/// A file event reloads only when the files read last ([`FilesRead`]) have changed since, so
/// other files beside them cost a `stat`; SIGHUP always reloads. Files changed between the
/// start-up read and this watch (a `keys revoke` right after a restart) are reloaded at once.
pub fn spawn(shared: Arc<Shared>, stop: watch::Receiver<Option<Duration>>) -> anyhow::Result<()> {
    let live = shared.live.load_full();
    let path = std::path::absolute(&live.config.path)?;
    let mut seen = live.config.files_read.clone();
    drop(live);
    let mut feed = ChangeFeed::start(
        &watched(&path, &seen),
        Some("SIGHUP: reloading the config"),
        DEBOUNCE,
        stop.clone(),
    )?;
    let mut stop = stop;
    tokio::spawn(async move {
        while let Some(now) = feed.changed_since(&seen, &mut stop).await {
            seen = match reload_off_the_request_path(&shared, &path).await {
                Some(read) => {
                    feed.follow(&watched(&path, &read));
                    read
                }
                // Broken: tried again once the files change again (or on SIGHUP).
                None => now,
            };
        }
    });
    Ok(())
}

/// The files to watch: the config's and those it was read with (its keys file).
fn watched(config: &Path, read: &FilesRead) -> Vec<PathBuf> {
    let mut files = vec![config.to_path_buf()];
    files.extend(read.paths());
    files
}

/// [`reload_now`] on a thread of its own at a lower priority, logged and counted; the files
/// the new config was read from when it was swapped in.
async fn reload_off_the_request_path(shared: &Arc<Shared>, path: &Path) -> Option<FilesRead> {
    let result = {
        let shared = Arc::clone(shared);
        let path = path.to_path_buf();
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
        Ok(Ok(keys)) => {
            tracing::info!(keys, "config reloaded");
            Some(shared.live.load().config.files_read.clone())
        }
        Ok(Err(err)) => {
            tracing::error!("config reload failed, keeping the running config: {err}");
            None
        }
        Err(e) => {
            tracing::error!("config reload failed, keeping the running config: {e}");
            None
        }
    }
}

/// Whether `[server]` fields read once at start differ: all but `trusted_proxies` (read live by
/// the accept loop and the request path) and `max_body` (the keys' default, taken at each
/// load). Destructured, so that a new field has to be placed here.
fn restart_only_server_fields_differ(new: &ServerConfig, old: &ServerConfig) -> bool {
    let ServerConfig {
        listen,
        tls,
        workers,
        shutdown_timeout,
        header_timeout,
        idle_timeout,
        max_connections,
        max_header_bytes,
        max_headers,
        h2_max_streams,
        max_body: _,
        trusted_proxies: _,
        proxy_protocol,
    } = new;
    *listen != old.listen
        || *tls != old.tls
        || *workers != old.workers
        || *shutdown_timeout != old.shutdown_timeout
        || *header_timeout != old.header_timeout
        || *idle_timeout != old.idle_timeout
        || *max_connections != old.max_connections
        || *max_header_bytes != old.max_header_bytes
        || *max_headers != old.max_headers
        || *h2_max_streams != old.h2_max_streams
        || *proxy_protocol != old.proxy_protocol
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(extra: &str) -> ServerConfig {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n{extra}\n[upstream]\nurl = \"http://127.0.0.1:9\"\n"
        );
        Config::parse(Path::new("gateway.toml"), &text)
            .unwrap()
            .server
    }

    #[test]
    fn only_fields_read_at_start_ask_for_a_restart() {
        let base = server("");
        assert!(!restart_only_server_fields_differ(&base, &base));
        for live in ["trusted_proxies = [\"10.0.0.0/8\"]", "max_body = \"1MiB\""] {
            assert!(
                !restart_only_server_fields_differ(&server(live), &base),
                "{live}"
            );
        }
        for at_start in [
            "header_timeout = \"3s\"",
            "idle_timeout = \"3s\"",
            "max_connections = 7",
            "proxy_protocol = true",
            "workers = 3",
            "h2_max_streams = 5",
        ] {
            assert!(
                restart_only_server_fields_differ(&server(at_start), &base),
                "{at_start}"
            );
        }
    }
}
