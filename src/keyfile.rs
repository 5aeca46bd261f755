//! Editing the key store in place: the file's comments, order and formatting kept (toml_edit),
//! the result validated before it lands, written atomically under an exclusive lock.
//!
//! The key store is the file holding `[[keys]]`: `[auth] keys_file` when set, else the config
//! file itself. An edit ([`KeyStore::edit`]):
//!
//! 1. takes an exclusive `flock` on `<store>.lock` beside the store (a file that is never
//!    replaced: locking the store itself would not work, since every edit renames a new file over
//!    it), so concurrent `keygate keys` processes queue up instead of losing each other's entries;
//! 2. reads the store *after* the lock is held and validates the whole config as it stands;
//! 3. applies the change to the toml_edit document and validates the whole config again with
//!    the new text; an invalid result is refused and nothing is written;
//! 4. writes the new text to a temporary file in the same directory, `fsync`s it, renames it over
//!    the store (atomic on POSIX) and `fsync`s the directory; the old file's permissions are kept.
//!
//! A crash at any point leaves either the old file or the new one, never a mix. The running
//! gateway sees one rename of the file it watches and reloads.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
    path::{Path, PathBuf},
};

use toml_edit::{ArrayOfTables, DocumentMut, Item, Table, Value};

use crate::config::{Config, ConfigError};

/// Why an edit did not land.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    /// The config or key store is invalid as it stands (fix it first).
    #[error("{0}")]
    Invalid(ConfigError),
    /// The edit would make the config invalid; nothing was written.
    #[error("the change would make the config invalid, nothing was written: {0}")]
    Rejected(ConfigError),
    /// The store is not TOML that toml_edit can edit, or `keys` is not an array of tables.
    #[error("{path}: {message}")]
    Unsupported {
        /// The key store.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The command cannot be carried out (unknown id, existing id, ...).
    #[error("{0}")]
    Refused(String),
    /// Reading, locking or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
}

/// The file holding `[[keys]]` for a config, and how to change it safely.
#[derive(Debug, Clone)]
pub struct KeyStore {
    /// The config as named: validated there, so its relative paths (`identity_secret_file`,
    /// `ca_file`) resolve as the gateway resolves them, whatever symlink it is.
    config: PathBuf,
    store: PathBuf,
    /// Whether the keys live in the config file itself.
    inline: bool,
}

/// The first lines of a keys file that `keygate keys new` creates.
const NEW_KEYS_FILE: &str =
    "# keygate key table: edit by hand or with `keygate keys`; comments and order are kept.\n";

impl KeyStore {
    /// The key store of the config at `config`.
    pub fn open(config: &Path) -> Result<KeyStore, EditError> {
        let store = Config::key_store_path(config).map_err(EditError::Invalid)?;
        // A symlinked store is edited where it lives: the link stays, the file it names is
        // replaced, and every editor locks beside that file whichever path it was given.
        let real = |p: &Path| fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let store = real(&store);
        Ok(KeyStore {
            config: config.to_path_buf(),
            inline: store == real(config),
            store,
        })
    }

    /// The file the keys are in.
    pub fn path(&self) -> &Path {
        &self.store
    }

    /// Applies `change` to the store under the lock, validates, and writes atomically.
    /// `change` gets the document and the config as it stands; its result is returned with the
    /// config as it is after the edit.
    pub fn edit<T>(
        &self,
        change: impl FnOnce(&mut DocumentMut, &Config) -> Result<T, EditError>,
    ) -> Result<(T, Config), EditError> {
        let _lock = self.lock()?;
        let text = match fs::read_to_string(&self.store) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound && !self.inline => {
                NEW_KEYS_FILE.to_string()
            }
            Err(source) => {
                return Err(EditError::Io {
                    path: self.store.clone(),
                    source,
                })
            }
        };
        let current = self.validate(&text).map_err(EditError::Invalid)?;
        let mut doc: DocumentMut = text.parse().map_err(|e| EditError::Unsupported {
            path: self.store.clone(),
            message: format!("not editable TOML: {e}"),
        })?;
        let out = change(&mut doc, &current)?;
        let new_text = doc.to_string();
        let after = self.validate(&new_text).map_err(EditError::Rejected)?;
        write_atomically(&self.store, &new_text, &self.config).map_err(|source| EditError::Io {
            path: self.store.clone(),
            source,
        })?;
        Ok((out, after))
    }

    /// Validates the whole config with `store_text` as the key store's contents.
    fn validate(&self, store_text: &str) -> Result<Config, ConfigError> {
        if self.inline {
            Config::parse(&self.config, store_text)
        } else {
            let main = fs::read_to_string(&self.config).map_err(|e| ConfigError {
                file: self.config.display().to_string(),
                line: 1,
                col: 1,
                message: format!("cannot read the config file: {e}"),
            })?;
            Config::parse_with_keys(&self.config, &main, Some(store_text))
        }
    }

    /// Takes the exclusive lock on `<store>.lock`, waiting for other editors; released on drop.
    fn lock(&self) -> Result<File, EditError> {
        let mut name = self.store.file_name().unwrap_or_default().to_os_string();
        name.push(".lock");
        let path = self.store.with_file_name(name);
        let io_err = |source| EditError::Io {
            path: path.clone(),
            source,
        };
        // Opened for writing where it may be (NFS emulates flock with byte-range locks, which
        // want a writable file), else for reading (all flock needs elsewhere): a lock file
        // root made stays usable by the store's owner. Made anew, it takes the store's (or
        // config's) mode and owner, as the store itself does.
        let opened = OpenOptions::new()
            .write(true)
            .open(&path)
            .or_else(|e| match e.kind() {
                io::ErrorKind::PermissionDenied => File::open(&path),
                _ => Err(e),
            });
        let file = match opened {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let file = OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&path)
                    .map_err(io_err)?;
                if let Ok(meta) = fs::metadata(&self.store).or_else(|_| fs::metadata(&self.config))
                {
                    file.set_permissions(meta.permissions()).map_err(io_err)?;
                    keep_owner(&file, &meta).map_err(io_err)?;
                }
                file
            }
            opened => opened.map_err(io_err)?,
        };
        fs4::FileExt::lock(&file).map_err(io_err)?;
        Ok(file)
    }
}

/// Replaces `path` with `text` atomically: temp file in the same directory, fsync, rename,
/// fsync of the directory. The old file's permissions, owner and group carry over (those of
/// `like` for a file made anew): an operator editing as root must not leave the gateway's
/// user unable to read its keys. An owner that cannot be kept fails the write.
pub fn write_atomically(path: &Path, text: &str, like: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(format!(".{}.tmp", std::process::id()));
    let tmp = dir.join(name);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        if let Ok(meta) = fs::metadata(path).or_else(|_| fs::metadata(like)) {
            f.set_permissions(meta.permissions())?;
            keep_owner(&f, &meta)?;
        }
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        // Make the rename itself durable; not every platform can open a directory.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Gives `f` the owner and group in `old` when they differ from its own.
#[cfg(unix)]
fn keep_owner(f: &File, old: &fs::Metadata) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let new = f.metadata()?;
    if (new.uid(), new.gid()) == (old.uid(), old.gid()) {
        return Ok(());
    }
    std::os::unix::fs::fchown(f, Some(old.uid()), Some(old.gid())).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot keep the file's owner {}:{} ({e}); run this as root or as that user",
                old.uid(),
                old.gid()
            ),
        )
    })
}

#[cfg(not(unix))]
fn keep_owner(_: &File, _: &fs::Metadata) -> io::Result<()> {
    Ok(())
}

/// The `[[keys]]` array of `doc`, created (at the end) when absent.
pub fn keys_array(doc: &mut DocumentMut) -> Result<&mut ArrayOfTables, String> {
    let item = doc
        .as_table_mut()
        .entry("keys")
        .or_insert_with(|| Item::ArrayOfTables(ArrayOfTables::new()));
    item.as_array_of_tables_mut().ok_or_else(|| {
        "keys must be written as [[keys]] tables for `keygate keys` to edit them".into()
    })
}

/// Appends `table` to `[[keys]]`. In a file that holds nothing but comments, those comments
/// stay above the new entry (toml_edit keeps them as the document's trailing text otherwise).
pub fn push_key(doc: &mut DocumentMut, mut table: Table) -> Result<(), String> {
    if doc.as_table().is_empty() {
        let trailing = doc.trailing().as_str().unwrap_or("").to_string();
        if !trailing.trim().is_empty() {
            table.decor_mut().set_prefix(format!("{trailing}\n"));
            doc.set_trailing("");
        }
    }
    keys_array(doc)?.push(table);
    Ok(())
}

/// The `[[keys]]` table whose `id` is `id`.
pub fn find_key<'d>(doc: &'d mut DocumentMut, id: &str) -> Result<Option<&'d mut Table>, String> {
    Ok(keys_array(doc)?
        .iter_mut()
        .find(|t| t.get("id").and_then(Item::as_str) == Some(id)))
}

/// Sets `key = value` in `table`, keeping the place and the comments of an existing value.
pub fn set(table: &mut Table, key: &str, value: impl Into<Value>) {
    let mut value = value.into();
    if let Some(old) = table.get(key).and_then(Item::as_value) {
        *value.decor_mut() = old.decor().clone();
        table[key] = Item::Value(value);
    } else {
        table.insert(key, Item::Value(value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_keeps_position_and_comments() {
        let mut doc: DocumentMut =
            "[[keys]]\nid = \"a\"   # partner A\nhash = \"x\" # the hash\nrate = \"1/s\"\n"
                .parse()
                .unwrap();
        let t = find_key(&mut doc, "a").unwrap().unwrap();
        set(t, "hash", "y");
        set(t, "disabled", true);
        assert_eq!(
            doc.to_string(),
            "[[keys]]\nid = \"a\"   # partner A\nhash = \"y\" # the hash\nrate = \"1/s\"\ndisabled = true\n"
        );
    }

    #[test]
    fn a_comment_only_file_keeps_its_comments_on_top() {
        let mut doc: DocumentMut = "# owned by support\n".parse().unwrap();
        let mut t = Table::new();
        t.insert("id", toml_edit::value("a"));
        push_key(&mut doc, t).unwrap();
        assert_eq!(
            doc.to_string(),
            "# owned by support\n\n[[keys]]\nid = \"a\"\n"
        );
    }

    #[test]
    fn atomic_write_replaces_and_keeps_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.toml");
        fs::write(&p, "old").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        }
        write_atomically(&p, "new", &p).unwrap();
        assert_eq!(fs::read_to_string(&p).unwrap(), "new");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                0o640
            );
        }
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temp file left behind: {names:?}");
    }
}
