//! `keygate keys new | list | revoke | rotate`: a partner key's whole life from the CLI.
//!
//! Every command reads the config named by `--config`; edits go to its key store (see
//! [`crate::keyfile`]) and a running gateway picks them up through its reload path. `new` and
//! `rotate` print the new key, and only the key, on stdout (so it can be piped); everything
//! meant for the operator goes to stderr. No key is ever written anywhere but stdout, and
//! `list` shows hashes only with `--json`.

use std::{
    path::Path,
    time::{Duration, SystemTime},
};

use clap::{Args, Subcommand};
use time::{format_description::well_known::Rfc3339, OffsetDateTime};
use toml_edit::{Array, Datetime, DocumentMut, Table};

use crate::{
    config::{self, Config, KeyConfig},
    keyfile::{self, EditError, KeyStore},
    keys::{self, KeyHash, KeyStatus},
    limit::RateLimit,
    quota::QuotaLimit,
    scope::Scope,
};

/// `keygate keys ...`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Mint a key, add its hash to the key store, print the key once on stdout.
    New(NewArgs),
    /// List the keys: id, tenant, status, created, expires, limits, scopes (never the key).
    List {
        /// JSON instead of a table (includes the hashes).
        #[arg(long)]
        json: bool,
    },
    /// Disable a key at once (`disabled = true`, `revoked_at`).
    Revoke {
        /// The key's id.
        id: String,
    },
    /// Mint a new key for the same entry; the old one keeps working for `--grace`.
    Rotate {
        /// The key's id.
        id: String,
        /// How long the old key stays valid (e.g. `24h`); without it, it stops at once.
        #[arg(long, value_parser = config::parse_duration)]
        grace: Option<Duration>,
    },
}

/// `keygate keys new` options.
#[derive(Debug, Args)]
pub struct NewArgs {
    /// Unique id: 1 to 64 of `A-Za-z0-9._-`; logged and sent upstream.
    #[arg(long)]
    pub id: String,
    /// The hotel the key acts for.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Short-window rate (`N/s`, `N/min`, `N/h`); default `[limits] rate`.
    #[arg(long)]
    pub rate: Option<String>,
    /// Burst; default `[limits] burst`.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub burst: Option<u32>,
    /// Long-window quota (`N/h`, `N/day`, `N/week`, `N/month`); default `[limits] quota`.
    #[arg(long)]
    pub quota: Option<String>,
    /// A scope, `"METHOD /path"` (`*` one segment, `**` any); repeat for more. None: full access.
    #[arg(long = "scope")]
    pub scopes: Vec<String>,
    /// Expiry as an RFC 3339 date-time (`2027-06-30T00:00:00Z`).
    #[arg(long, conflicts_with = "ttl")]
    pub expires: Option<String>,
    /// Expiry as a time from now (`90d`, `12h`).
    #[arg(long, value_parser = config::parse_duration)]
    pub ttl: Option<Duration>,
}

/// Runs one `keys` command against the config at `config`.
pub fn run(config: &Path, cmd: KeysCommand) -> anyhow::Result<()> {
    match cmd {
        KeysCommand::New(args) => new(config, args),
        KeysCommand::List { json } => list(config, json),
        KeysCommand::Revoke { id } => revoke(config, &id),
        KeysCommand::Rotate { id, grace } => rotate(config, &id, grace),
    }
}

/// An RFC 3339 date-time in whole seconds, as a TOML datetime value.
fn toml_time(t: SystemTime) -> Datetime {
    rfc3339(t).parse().expect("RFC 3339 is a TOML datetime")
}

/// `t` in UTC, whole seconds, when RFC 3339 (and TOML) can write it: years 0 to 9999.
fn utc(t: SystemTime) -> Option<OffsetDateTime> {
    let secs = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).ok()?,
        Err(before) => -i64::try_from(before.duration().as_secs()).ok()?,
    };
    OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .filter(|t| (0..=9999).contains(&t.year()))
}

/// `t` as RFC 3339 in UTC, whole seconds (a time past the year 9999, which a hand-written
/// offset can reach, is shown as such rather than written out).
pub fn rfc3339(t: SystemTime) -> String {
    match utc(t) {
        Some(t) => t.format(&Rfc3339).expect("a UTC time formats as RFC 3339"),
        None => "after 9999-12-31T23:59:59Z".to_string(),
    }
}

/// `now + d` for a flag, when it can be written (`None` past the year 9999).
fn later(now: SystemTime, d: Duration) -> Option<SystemTime> {
    now.checked_add(d).filter(|t| utc(*t).is_some())
}

fn new(config: &Path, a: NewArgs) -> anyhow::Result<()> {
    // Flag values are checked here, so the message names the flag; the edit is validated again
    // as a whole before it lands.
    if !config::valid_id(&a.id) {
        anyhow::bail!("--id must be 1 to 64 characters of letters, digits, '.', '_' or '-'");
    }
    if let Some(t) = &a.tenant {
        if !config::valid_id(t) {
            anyhow::bail!(
                "--tenant must be 1 to 64 characters of letters, digits, '.', '_' or '-'"
            );
        }
    }
    if let Some(r) = &a.rate {
        RateLimit::parse_rate(r, false).map_err(|m| anyhow::anyhow!("--rate: {m}"))?;
    }
    if let Some(q) = &a.quota {
        QuotaLimit::parse(q).map_err(|m| anyhow::anyhow!("--quota: {m}"))?;
    }
    for s in &a.scopes {
        Scope::parse(s).map_err(|m| anyhow::anyhow!("--scope: {m}"))?;
    }
    let now = SystemTime::now();
    let expires = match (&a.expires, a.ttl) {
        (Some(e), _) => {
            let t = OffsetDateTime::parse(e, &Rfc3339).map_err(|err| {
                anyhow::anyhow!("--expires {e:?} is not an RFC 3339 date-time: {err}")
            })?;
            let t = t
                .checked_to_offset(time::UtcOffset::UTC)
                .filter(|t| t.year() <= 9999);
            Some(t.map(SystemTime::from).ok_or_else(|| {
                anyhow::anyhow!("--expires {e:?} is after 9999-12-31T23:59:59Z; leave it out for a key that does not expire")
            })?)
        }
        (None, Some(ttl)) => Some(later(now, ttl).ok_or_else(|| {
            anyhow::anyhow!(
                "--ttl reaches past the year 9999; leave it out for a key that does not expire"
            )
        })?),
        (None, None) => None,
    };
    if expires.is_some_and(|e| e <= now) {
        anyhow::bail!("--expires is in the past");
    }

    let store = KeyStore::open(config)?;
    let (key, _) = store.edit(|doc, current| {
        if current.keys.iter().any(|k| k.id == a.id) {
            return Err(EditError::Refused(format!(
                "a key with id {:?} exists already (rotate it, or pick another id)",
                a.id
            )));
        }
        let key = keys::mint(&current.auth.key_prefix);
        let mut t = Table::new();
        t.decor_mut().set_prefix("\n");
        t.insert("id", toml_edit::value(a.id.as_str()));
        t.insert(
            "hash",
            toml_edit::value(KeyHash::of(key.as_bytes()).to_config_string()),
        );
        if let Some(v) = &a.tenant {
            t.insert("tenant", toml_edit::value(v.as_str()));
        }
        if let Some(v) = &a.rate {
            t.insert("rate", toml_edit::value(v.as_str()));
        }
        if let Some(v) = a.burst {
            t.insert("burst", toml_edit::value(i64::from(v)));
        }
        if let Some(v) = &a.quota {
            t.insert("quota", toml_edit::value(v.as_str()));
        }
        if !a.scopes.is_empty() {
            let list: Array = a.scopes.iter().map(|s| s.trim()).collect();
            t.insert("scopes", toml_edit::value(list));
        }
        if let Some(e) = expires {
            t.insert("expires", toml_edit::value(toml_time(e)));
        }
        t.insert("created_at", toml_edit::value(toml_time(now)));
        keyfile::push_key(doc, t).map_err(|m| unsupported(&store, m))?;
        Ok(key)
    })?;
    eprintln!(
        "keygate: added key {:?} to {}; it is shown once, below — hand it over now",
        a.id,
        store.path().display()
    );
    hand_over(&a.id, &key)
}

/// Writes the new `key` of `id` to stdout, flushed; a failure says the key is stored but lost.
fn hand_over(id: &str, key: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{key}")
        .and_then(|()| out.flush())
        .map_err(|e| {
            anyhow::anyhow!(
                "the new key of {id:?} is stored but could not be shown ({e}); \
                 run `keygate keys rotate {id}` for another"
            )
        })
}

fn unsupported(store: &KeyStore, message: String) -> EditError {
    EditError::Unsupported {
        path: store.path().to_path_buf(),
        message,
    }
}

fn edit_key(
    store: &KeyStore,
    id: &str,
    change: impl FnOnce(&mut Table, &KeyConfig, &Config) -> Result<Option<String>, EditError>,
) -> Result<Option<String>, EditError> {
    let (out, _) = store.edit(|doc: &mut DocumentMut, current| {
        let key = current
            .keys
            .iter()
            .find(|k| k.id == id)
            .ok_or_else(|| EditError::Refused(format!("no key with id {id:?}")))?;
        let table = keyfile::find_key(doc, id)
            .map_err(|m| unsupported(store, m))?
            .ok_or_else(|| EditError::Refused(format!("no key with id {id:?}")))?;
        change(table, key, current)
    })?;
    Ok(out)
}

fn revoke(config: &Path, id: &str) -> anyhow::Result<()> {
    let store = KeyStore::open(config)?;
    let mut already = false;
    edit_key(&store, id, |t, key, _| {
        already = key.disabled;
        keyfile::set(t, "disabled", true);
        if key.revoked_at.is_none() {
            keyfile::set(t, "revoked_at", toml_time(SystemTime::now()));
        }
        Ok(None)
    })?;
    if already {
        eprintln!("keygate: key {id:?} was already disabled");
    } else {
        eprintln!(
            "keygate: revoked key {id:?} in {}; a running gateway refuses it from its next reload",
            store.path().display()
        );
    }
    Ok(())
}

fn rotate(config: &Path, id: &str, grace: Option<Duration>) -> anyhow::Result<()> {
    let store = KeyStore::open(config)?;
    let now = SystemTime::now();
    let grace = grace.filter(|g| !g.is_zero());
    // Rounded up to the next whole second, so the old key lasts at least `grace`.
    let until = match grace {
        Some(g) => Some(
            later(now, g + Duration::from_secs(1))
                .map(|t| {
                    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
                    SystemTime::UNIX_EPOCH + Duration::from_secs(since.as_secs())
                })
                .ok_or_else(|| anyhow::anyhow!("--grace reaches past the year 9999"))?,
        ),
        None => None,
    };
    let mut cut_short = None;
    let key = edit_key(&store, id, |t, key, current| {
        cut_short = key.previous.filter(|p| p.expires > now).map(|p| p.expires);
        if key.disabled {
            return Err(EditError::Refused(format!(
                "key {id:?} is disabled (revoked); mint a new one with `keygate keys new`"
            )));
        }
        if let Some(expired) = key.expires.filter(|e| *e <= now) {
            return Err(EditError::Refused(format!(
                "key {id:?} expired on {}: its new key would be refused as expired too; \
                 give it a later `expires` (or none) first",
                rfc3339(expired)
            )));
        }
        let new_key = keys::mint(&current.auth.key_prefix);
        match until {
            Some(until) => {
                keyfile::set(t, "previous_hash", key.hash.to_config_string());
                keyfile::set(t, "previous_expires", toml_time(until));
            }
            None => {
                t.remove("previous_hash");
                t.remove("previous_expires");
            }
        }
        keyfile::set(
            t,
            "hash",
            KeyHash::of(new_key.as_bytes()).to_config_string(),
        );
        Ok(Some(new_key))
    })?
    .expect("rotate returns the new key");
    if let Some(was) = cut_short {
        eprintln!(
            "keygate: note: the key before the current one was still in its grace (until {}); it stops now",
            rfc3339(was)
        );
    }
    match until {
        Some(u) => eprintln!(
            "keygate: rotated key {id:?}; the old key works until {} — the new one is shown once, below",
            rfc3339(u)
        ),
        None => eprintln!(
            "keygate: rotated key {id:?}; the old key stops at the next reload — the new one is shown once, below"
        ),
    }
    hand_over(id, &key)
}

fn status_name(s: KeyStatus) -> &'static str {
    match s {
        KeyStatus::Active => "active",
        KeyStatus::Disabled => "disabled",
        KeyStatus::Expired => "expired",
        KeyStatus::Rotating => "rotating",
    }
}

fn limits_text(k: &KeyConfig) -> String {
    match &k.quota {
        Some(q) => format!("{}, quota {q}", k.limit),
        None => k.limit.to_string(),
    }
}

fn list(config: &Path, json: bool) -> anyhow::Result<()> {
    let config = Config::load(config)?;
    let now = SystemTime::now();
    let time = |t: Option<SystemTime>| t.map_or_else(|| "-".to_string(), rfc3339);
    if json {
        let keys: Vec<serde_json::Value> = config
            .keys
            .iter()
            .map(|k| {
                serde_json::json!({
                    "id": k.id,
                    "tenant": k.tenant,
                    "status": status_name(KeyStatus::of(k, now)),
                    "created_at": k.created_at.map(rfc3339),
                    "expires": k.expires.map(rfc3339),
                    "revoked_at": k.revoked_at.map(rfc3339),
                    "rate": format!("{}/{}", k.limit.count, unit(k.limit.per)),
                    "burst": k.limit.burst.get(),
                    "quota": k.quota.map(|q| q.to_string()),
                    "scopes": k.scopes.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "hash": k.hash.to_config_string(),
                    "previous_hash": k.previous.map(|p| p.hash.to_config_string()),
                    "previous_expires": k.previous.map(|p| rfc3339(p.expires)),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&keys)?);
        return Ok(());
    }
    let mut rows = vec![[
        "ID".to_string(),
        "TENANT".into(),
        "STATUS".into(),
        "CREATED".into(),
        "EXPIRES".into(),
        "LIMITS".into(),
        "SCOPES".into(),
    ]];
    for k in &config.keys {
        let status = KeyStatus::of(k, now);
        let status = match (status, k.previous) {
            (KeyStatus::Rotating, Some(p)) => {
                format!("rotating (old key until {})", rfc3339(p.expires))
            }
            (s, _) => status_name(s).to_string(),
        };
        rows.push([
            k.id.clone(),
            k.tenant.clone().unwrap_or_else(|| "-".into()),
            status,
            time(k.created_at),
            time(k.expires),
            limits_text(k),
            if k.scopes.is_empty() {
                "all".to_string()
            } else {
                k.scopes
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for r in &rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c == 6 {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[c]));
            }
        }
        println!("{}", line.trim_end());
    }
    Ok(())
}

fn unit(per: Duration) -> &'static str {
    match per.as_secs() {
        1 => "s",
        60 => "min",
        _ => "h",
    }
}
