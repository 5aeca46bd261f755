//! The command line: `run` (the default), `demo`, `hash`, `check`, `certs dev`, and
//! `keys new|list|revoke|rotate` ([`crate::keys_cli`]).
//!
//! Exit codes: 0 on success, 1 on a config or start-up error (printed as one line on stderr).

use std::{io::Read, path::PathBuf, process::ExitCode, sync::Arc, time::SystemTime};

use clap::{Parser, Subcommand};

use crate::{
    certs::{CertStore, ConfiguredCerts, Validity},
    config::Config,
    keys::{KeyHash, KeyTableBuilder, StatusCounts},
    proxy::Live,
    server::Gateway,
    telemetry,
};

/// keygate: the API-key gateway in front of the Bookboost API.
#[derive(Debug, Parser)]
#[command(name = "keygate", version, about)]
pub struct Cli {
    /// The config file.
    #[arg(long, short, global = true, default_value = "gateway.toml")]
    pub config: PathBuf,
    /// What to do (default: run).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve partners: check keys, rate-limit, forward to the upstream.
    Run,
    /// A self-contained tour: sample upstream, keygate in front, a fresh key, curl commands.
    Demo {
        /// Port for the demo gateway on 127.0.0.1 (a free one is used when it is busy).
        #[arg(long, default_value_t = 8080)]
        port: u16,
    },
    /// Read one key from stdin and print the `blake3:<hex>` form the config stores.
    Hash,
    /// Validate the config and print a summary; on an error print `file:line:col: message`.
    Check,
    /// Certificates for local use.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Partner keys: mint, list, revoke, rotate (edits the key store in place).
    #[command(subcommand)]
    Keys(crate::keys_cli::KeysCommand),
}

/// `keygate certs ...`.
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Write a self-signed certificate for localhost and 127.0.0.1 (key file mode 0600).
    Dev {
        /// The directory to write gateway.crt and gateway.key into.
        #[arg(long, default_value = "certs")]
        out: PathBuf,
    },
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("keygate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => serve(cli.config),
        Command::Demo { port } => {
            let _log = telemetry::init();
            runtime(None)?.block_on(crate::demo::run(port))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Hash => {
            let mut input = String::new();
            std::io::stdin().read_to_string(&mut input)?;
            let key = input.trim();
            if key.is_empty() {
                anyhow::bail!("no key on stdin");
            }
            println!("{}", KeyHash::of(key.as_bytes()).to_config_string());
            Ok(ExitCode::SUCCESS)
        }
        Command::Certs(CertsCommand::Dev { out }) => {
            let (cert, key) = crate::tls::write_dev_cert(&out)?;
            println!(
                "wrote {} and {} (self-signed, for local use only)",
                cert.display(),
                key.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys(cmd) => {
            crate::keys_cli::run(&cli.config, cmd)?;
            Ok(ExitCode::SUCCESS)
        }
        // What a start would read: the config, then the certificate pairs it names.
        Command::Check => match Config::load(&cli.config) {
            Ok(config) => match ConfiguredCerts::load(&config) {
                Ok(certs) => {
                    print!("{}", summary(&config, &certs));
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("{}: {e:#}", config.path.display());
                    Ok(ExitCode::FAILURE)
                }
            },
            Err(e) => {
                eprintln!("{e}");
                Ok(ExitCode::FAILURE)
            }
        },
    }
}

/// The summary `keygate check` prints, certificates with their validity.
pub fn summary(config: &Config, certs: &ConfiguredCerts) -> String {
    let now = SystemTime::now();
    let StatusCounts {
        active,
        disabled,
        expired,
    } = StatusCounts::of(&config.keys, now);
    let validity = |store: &CertStore| match store.expires() {
        Some(at) => Validity::at(at, now).to_string(),
        None => "validity unreadable".to_string(),
    };
    let tls = match &certs.listener {
        Some(store) => format!("on, certificate {}", validity(store)),
        None => "off".to_string(),
    };
    let client_cert = match &certs.upstream_client {
        Some(store) => format!(" (client certificate {})", validity(store)),
        None => String::new(),
    };
    format!(
        "{}: ok\n  listen:   {}\n  tls:      {tls}\n  upstream: {}{client_cert}\n  keys:     {active} active, {disabled} disabled, {expired} expired\n",
        config.path.display(),
        config.server.listen,
        config.upstream.url,
    )
}

fn runtime(workers: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if workers == Some(1) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if let Some(n) = workers.filter(|n| *n > 1) {
        builder.worker_threads(n);
    }
    builder.enable_all().build()
}

fn serve(path: PathBuf) -> anyhow::Result<ExitCode> {
    survive_hup_while_starting();
    // The keys go straight into the table as they are read, as on a reload: no vector of a
    // million parsed keys (256 bytes each) beside it while starting.
    let mut table = KeyTableBuilder::new(None);
    let config = match Config::load_into(&path, &mut table) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let live = Live::with_table(config, table.finish(), None);
    let config = Arc::clone(&live.config);
    let _log = telemetry::init_with(&config.log);
    let grace = config.server.shutdown_timeout;
    let runtime = runtime(config.server.workers)?;
    let code = runtime.block_on(async move {
        // Handlers first: a signal that arrives while starting must not kill the process.
        let mut signals = Signals::new()?;
        let gateway = Gateway::start_live(live).await?;
        signals.recv().await;
        tracing::info!("shutting down: finishing requests in flight (up to {grace:?})");
        tokio::select! {
            () = gateway.shutdown(grace) => tracing::info!("shutdown complete"),
            () = signals.recv() => tracing::warn!("second signal: exiting without waiting"),
        }
        Ok(ExitCode::SUCCESS)
    });
    // Before the log writer goes: the requests still in flight after the grace (or a second
    // signal) end as the runtime drops them, and their access lines are written then.
    drop(runtime);
    code
}

/// SIGHUP's default action ends the process, and the reload watch that listens for it starts
/// only once the key file is loaded (seconds for a million keys): a `systemctl reload` right
/// after a start would stop the gateway, which systemd takes for a clean exit and does not
/// restart. Listening once replaces that action for the rest of the process (tokio's handler
/// stays installed); the watch, once started, finds any file changed meanwhile by its stamps.
fn survive_hup_while_starting() {
    #[cfg(unix)]
    {
        let listened = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .and_then(|rt| {
                rt.block_on(async {
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                })
            });
        if let Err(e) = listened {
            eprintln!("cannot listen for SIGHUP, which ends keygate until it has started: {e}");
        }
    }
}

/// SIGTERM and SIGINT, listened for from creation on.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}
