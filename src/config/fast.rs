//! A line scanner for `[[keys]]` tables, the bulk of a large config, written the plain way.
//!
//! It accepts a strict subset of TOML: `[[keys]]` headers and, under each, one `name = value`
//! a line for the known key fields, with values that are basic or literal strings without
//! escapes, decimal integers, booleans, date-times, and one-line arrays of strings; comments
//! and blank lines anywhere. On anything else (an escape, a multi-line value, a dotted or
//! quoted name, an unknown or repeated field, a missing `id` or `hash`, a control character,
//! another table) it returns `None`, and the caller parses the text with the toml crate, which
//! then accepts it or reports the error. So this never decides what is valid TOML, it only
//! reads the common case faster, with the same spans the toml crate would give (a value's span
//! starts at its first character: the opening quote of a string, the `[` of an array).

use std::ops::Range;

use toml::{value::Datetime, Spanned};

use super::{RawConfig, RawKey, RawSize};

/// The whole config `text`, when everything from its first `[[keys]]` line on is plain
/// `[[keys]]` tables: the part before is parsed by the toml crate, the keys by the scanner.
/// `None` means: parse `text` with the toml crate.
pub(super) fn split(text: &str) -> Option<RawConfig> {
    let start = first_keys_header(text)?;
    let keys = keys(text, start)?;
    let prefix = &text[..start];
    // `keys` defined before the split too (`keys = []`) is the toml crate's error to report.
    if toml::from_str::<toml::Table>(prefix)
        .ok()?
        .contains_key("keys")
    {
        return None;
    }
    let mut raw: RawConfig = toml::from_str(prefix).ok()?;
    raw.keys = keys;
    Some(raw)
}

/// The byte offset of the first line that is exactly `[[keys]]`.
fn first_keys_header(text: &str) -> Option<usize> {
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if line.trim_end() == "[[keys]]" {
            return Some(offset);
        }
        offset += line.len();
    }
    None
}

/// The `[[keys]]` tables of `text[start..]` (spans relative to `text`), or `None` when that
/// part is not entirely plain `[[keys]]` tables.
pub(super) fn keys(text: &str, start: usize) -> Option<Vec<RawKey>> {
    // Sized up front: a RawKey is ~450 bytes, and growing a vector of a million of them by
    // doubling copies and faults in gigabytes.
    let mut keys = Vec::with_capacity(count_headers(&text[start..]));
    scan(text, start, |k| {
        keys.push(k);
        Ok(())
    })?
    .ok()?;
    Some(keys)
}

/// How many `[[keys]]` headers `text` holds at most (a capacity hint; one SIMD search).
pub(super) fn count_headers(text: &str) -> usize {
    memchr::memmem::find_iter(text.as_bytes(), b"[[keys]]").count()
}

/// Hands each `[[keys]]` table of `text` to `each` as it is read: `None` when the text is not
/// entirely plain `[[keys]]` tables. The first error of `each` is returned only once the whole
/// text has been scanned, so a syntax error further on (which the toml crate reports before
/// any validation) still wins: then the answer is `None`.
pub(super) fn each_key(
    text: &str,
    each: impl FnMut(RawKey) -> Result<(), super::ConfigError>,
) -> Option<Result<(), super::ConfigError>> {
    scan(text, 0, each)
}

fn scan(
    text: &str,
    start: usize,
    mut each: impl FnMut(RawKey) -> Result<(), super::ConfigError>,
) -> Option<Result<(), super::ConfigError>> {
    let mut first_error = None;
    let mut emit = |k: RawKey| {
        if first_error.is_none() {
            if let Err(e) = each(k) {
                first_error = Some(e);
            }
        }
        true
    };
    let mut scanner = Scanner::default();
    scanner.lines(&text[start..], start, &mut emit)?;
    scanner.finish(&mut emit)?;
    Some(first_error.map_or(Ok(()), Err))
}

/// A keys file read a chunk of whole lines at a time, never held in memory whole: for a
/// million keys that would be 135 MB of fresh pages per reload, faulted in and zeroed beside
/// the new table. It is read twice through one open descriptor (one inode, even if the file
/// is replaced meanwhile): when opened, to count the tables (so the table is sized exactly),
/// then by [`KeysFile::each_key`].
pub(super) struct KeysFile {
    file: std::fs::File,
    count: usize,
    chunk: usize,
}

/// How much of a keys file is read at a time (grown for a longer line).
const CHUNK: usize = 1 << 20;

impl KeysFile {
    /// The file at `path`, its `[[keys]]` headers counted; `None` if it cannot be read or is
    /// not UTF-8.
    pub(super) fn open(path: &std::path::Path) -> Option<KeysFile> {
        KeysFile::open_with_chunk(path, CHUNK)
    }

    fn open_with_chunk(path: &std::path::Path, chunk: usize) -> Option<KeysFile> {
        let mut file = std::fs::File::open(path).ok()?;
        let mut count = 0;
        chunks(&mut file, chunk, |text, _| {
            count += count_headers(text);
            Some(())
        })?;
        std::io::Seek::rewind(&mut file).ok()?;
        Some(KeysFile { file, count, chunk })
    }

    /// How many `[[keys]]` headers the file holds (a capacity hint).
    pub(super) fn count(&self) -> usize {
        self.count
    }

    /// Like [`each_key`], with spans that are offsets in the file, but stopping at the first
    /// key `each` refuses. `None` when the file is not entirely plain `[[keys]]` tables (or
    /// changed into something unreadable) or `each` refused a key: then the caller reads the
    /// file whole and parses it the usual way, which reports the error and its line.
    pub(super) fn each_key(mut self, mut each: impl FnMut(RawKey) -> bool) -> Option<()> {
        let mut scanner = Scanner::default();
        chunks(&mut self.file, self.chunk, |text, base| {
            scanner.lines(text, base, &mut each)
        })?;
        scanner.finish(&mut each)
    }
}

/// Hands `f` the file a chunk of whole lines at a time, with each chunk's offset in the file.
fn chunks(
    file: &mut std::fs::File,
    chunk: usize,
    mut f: impl FnMut(&str, usize) -> Option<()>,
) -> Option<()> {
    let mut buf = vec![0u8; chunk];
    let (mut filled, mut base) = (0, 0);
    loop {
        if filled == buf.len() {
            // One line longer than the buffer.
            buf.resize(buf.len() * 2, 0);
        }
        let n = std::io::Read::read(file, &mut buf[filled..]).ok()?;
        filled += n;
        let cut = if n == 0 {
            filled
        } else {
            match memchr::memrchr(b'\n', &buf[..filled]) {
                Some(i) => i + 1,
                None => continue,
            }
        };
        // Cut after a `\n`: a chunk never splits a UTF-8 sequence.
        f(std::str::from_utf8(&buf[..cut]).ok()?, base)?;
        base += cut;
        buf.copy_within(cut..filled, 0);
        filled -= cut;
        if n == 0 {
            return Some(());
        }
    }
}

/// The scanner's state between lines: the `[[keys]]` table being read.
#[derive(Default)]
struct Scanner {
    current: Option<Partial>,
}

impl Scanner {
    /// The lines of `text`, which starts at byte `base` of the file (spans are file offsets);
    /// each finished table goes to `emit`, which returns `false` to stop. `None`: not plain
    /// `[[keys]]` tables, or stopped.
    fn lines(
        &mut self,
        text: &str,
        base: usize,
        emit: &mut impl FnMut(RawKey) -> bool,
    ) -> Option<()> {
        // Line ends found by one SIMD pass (memchr), not a search per line.
        let ends = memchr::memchr_iter(b'\n', text.as_bytes()).chain(std::iter::once(text.len()));
        let mut next = 0;
        for end in ends {
            let line_start = next;
            next = end + 1;
            let raw = &text[line_start..end];
            // CRLF: a `\r` only ends a line before its `\n`.
            let line = match raw.strip_suffix('\r') {
                Some(l) if end < text.len() => l,
                _ => raw,
            };
            if has_control(line.as_bytes()) {
                return None;
            }
            let body = line.trim_start_matches([' ', '\t']);
            let at = base + line_start + (line.len() - body.len());
            if body.is_empty() || body.starts_with('#') {
                continue;
            }
            if let Some(rest) = body.strip_prefix("[[keys]]") {
                if !comment_or_nothing(rest) {
                    return None;
                }
                if let Some(done) = self.current.take() {
                    emit(done.finish()?).then_some(())?;
                }
                self.current = Some(Partial::default());
                continue;
            }
            let key = self.current.as_mut()?;
            let name_len = body
                .bytes()
                .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
                .count();
            let name = &body[..name_len];
            let after_name = body[name_len..].trim_start_matches([' ', '\t']);
            let value = after_name.strip_prefix('=')?;
            let value_trimmed = value.trim_start_matches([' ', '\t']);
            let value_at = at + (body.len() - value_trimmed.len());
            key.field(name, value_trimmed, value_at)?;
        }
        Some(())
    }

    /// The last table, once the text has ended.
    fn finish(mut self, emit: &mut impl FnMut(RawKey) -> bool) -> Option<()> {
        match self.current.take() {
            Some(done) => emit(done.finish()?).then_some(()),
            None => Some(()),
        }
    }
}

/// Whether `line` holds a control character other than tab (TOML allows none in a line).
/// Branch-free so that it vectorises: every byte of a large key file passes through here.
fn has_control(line: &[u8]) -> bool {
    line.iter().fold(false, |found, &b| {
        found | ((b < 0x20) & (b != b'\t')) | (b == 0x7f)
    })
}

/// Whether `rest` (what follows a value) is only blanks and perhaps a comment.
fn comment_or_nothing(rest: &str) -> bool {
    let rest = rest.trim_start_matches([' ', '\t']);
    rest.is_empty() || rest.starts_with('#')
}

/// A string value at the start of `s`: `(contents, length including quotes)`.
fn string(s: &str) -> Option<(&str, usize)> {
    let quote = s.as_bytes().first().copied()?;
    if quote != b'"' && quote != b'\'' {
        return None;
    }
    let rest = &s[1..];
    let end = memchr::memchr(quote, rest.as_bytes())?;
    let contents = &rest[..end];
    // Escapes (and `"""` / `'''` multi-line strings) are left to the toml crate.
    if (quote == b'"' && memchr::memchr(b'\\', contents.as_bytes()).is_some())
        || (end == 0 && rest[1..].starts_with(char::from(quote)))
    {
        return None;
    }
    Some((contents, end + 2))
}

/// The same span around `f` of the value.
fn respan<T, U>(v: Spanned<T>, f: impl FnOnce(T) -> U) -> Spanned<U> {
    let span = v.span();
    Spanned::new(span, f(v.into_inner()))
}

fn spanned<T>(at: usize, len: usize, value: T) -> Spanned<T> {
    let span: Range<usize> = at..at + len;
    Spanned::new(span, value)
}

/// A string value that must be all of the line but a comment.
fn whole_string(value: &str, at: usize) -> Option<Spanned<String>> {
    let (contents, len) = string(value)?;
    comment_or_nothing(&value[len..]).then(|| spanned(at, len, contents.to_string()))
}

/// The bare token (integer, boolean, date-time) that a value line holds.
fn token(value: &str) -> Option<&str> {
    let len = value
        .bytes()
        .take_while(|b| !matches!(b, b' ' | b'\t' | b'#'))
        .count();
    let (token, rest) = value.split_at(len);
    (!token.is_empty() && comment_or_nothing(rest)).then_some(token)
}

fn integer(value: &str, at: usize) -> Option<Spanned<i64>> {
    let t = token(value)?;
    let digits = t.strip_prefix(['+', '-']).unwrap_or(t);
    // Leading zeros, underscores, hex and the like are the toml crate's business.
    if digits.is_empty()
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || (digits.len() > 1 && digits.starts_with('0'))
    {
        return None;
    }
    Some(spanned(at, t.len(), t.parse().ok()?))
}

fn datetime(value: &str, at: usize) -> Option<Spanned<Datetime>> {
    let t = token(value)?;
    if !t.bytes().all(|b| {
        b.is_ascii_digit() || matches!(b, b'-' | b':' | b'.' | b'+' | b'T' | b'Z' | b't' | b'z')
    }) {
        return None;
    }
    Some(spanned(at, t.len(), t.parse().ok()?))
}

/// A one-line array of strings.
fn string_array(value: &str, at: usize) -> Option<Spanned<Vec<Spanned<String>>>> {
    let mut rest = value.strip_prefix('[')?;
    let mut items = Vec::new();
    loop {
        let trimmed = rest.trim_start_matches([' ', '\t']);
        let item_at = at + (value.len() - trimmed.len());
        if let Some(after) = trimmed.strip_prefix(']') {
            let len = value.len() - after.len();
            return comment_or_nothing(after).then(|| spanned(at, len, items));
        }
        let (contents, len) = string(trimmed)?;
        items.push(spanned(item_at, len, contents.to_string()));
        let after = trimmed[len..].trim_start_matches([' ', '\t']);
        rest = match after.strip_prefix(',') {
            Some(r) => r,
            None if after.starts_with(']') => after,
            None => return None,
        };
    }
}

/// A `[[keys]]` table being read; every field at most once.
#[derive(Default)]
struct Partial {
    id: Option<Spanned<String>>,
    hash: Option<Spanned<String>>,
    tenant: Option<Spanned<String>>,
    rate: Option<Spanned<String>>,
    burst: Option<Spanned<i64>>,
    disabled: Option<bool>,
    expires: Option<Spanned<Datetime>>,
    scopes: Option<Spanned<Vec<Spanned<String>>>>,
    quota: Option<Spanned<String>>,
    created_at: Option<Spanned<Datetime>>,
    revoked_at: Option<Spanned<Datetime>>,
    previous_hash: Option<Spanned<String>>,
    previous_expires: Option<Spanned<Datetime>>,
    max_body: Option<Spanned<RawSize>>,
}

/// Sets `slot` once; a second value for it is the toml crate's error to report.
fn set<T>(slot: &mut Option<T>, value: Option<T>) -> Option<()> {
    if slot.is_some() {
        return None;
    }
    *slot = Some(value?);
    Some(())
}

impl Partial {
    fn field(&mut self, name: &str, value: &str, at: usize) -> Option<()> {
        match name {
            "id" => set(&mut self.id, whole_string(value, at)),
            "hash" => set(&mut self.hash, whole_string(value, at)),
            "tenant" => set(&mut self.tenant, whole_string(value, at)),
            "rate" => set(&mut self.rate, whole_string(value, at)),
            "quota" => set(&mut self.quota, whole_string(value, at)),
            "previous_hash" => set(&mut self.previous_hash, whole_string(value, at)),
            "burst" => set(&mut self.burst, integer(value, at)),
            "disabled" => set(
                &mut self.disabled,
                match token(value)? {
                    "true" => Some(true),
                    "false" => Some(false),
                    _ => None,
                },
            ),
            "expires" => set(&mut self.expires, datetime(value, at)),
            "created_at" => set(&mut self.created_at, datetime(value, at)),
            "revoked_at" => set(&mut self.revoked_at, datetime(value, at)),
            "previous_expires" => set(&mut self.previous_expires, datetime(value, at)),
            "scopes" => set(&mut self.scopes, string_array(value, at)),
            "max_body" => set(
                &mut self.max_body,
                match integer(value, at) {
                    Some(n) => Some(respan(n, RawSize::Bytes)),
                    None => whole_string(value, at).map(|s| respan(s, RawSize::Text)),
                },
            ),
            _ => None,
        }
    }

    fn finish(self) -> Option<RawKey> {
        Some(RawKey {
            id: self.id?,
            hash: self.hash?,
            tenant: self.tenant,
            rate: self.rate,
            burst: self.burst,
            disabled: self.disabled.unwrap_or(false),
            expires: self.expires,
            scopes: self.scopes,
            quota: self.quota,
            created_at: self.created_at,
            revoked_at: self.revoked_at,
            previous_hash: self.previous_hash,
            previous_expires: self.previous_expires,
            max_body: self.max_body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RawKeysFile;

    /// What the toml crate makes of `text`, in a comparable form.
    fn by_toml(text: &str) -> Vec<String> {
        let raw: RawKeysFile = toml::from_str(text).unwrap();
        raw.keys.iter().map(describe).collect()
    }

    fn describe(k: &RawKey) -> String {
        fn s<T: std::fmt::Debug>(v: &Option<Spanned<T>>) -> String {
            v.as_ref()
                .map_or("-".into(), |v| format!("{:?}@{:?}", v.get_ref(), v.span()))
        }
        format!(
            "id={:?}@{:?} hash={:?}@{:?} tenant={} rate={} burst={} disabled={} expires={} scopes={} quota={} created={} revoked={} prev={} prev_exp={} max_body={}",
            k.id.get_ref(),
            k.id.span(),
            k.hash.get_ref(),
            k.hash.span(),
            s(&k.tenant),
            s(&k.rate),
            s(&k.burst),
            k.disabled,
            s(&k.expires),
            k.scopes.as_ref().map_or("-".into(), |v| format!(
                "{:?}@{:?}",
                v.get_ref()
                    .iter()
                    .map(|i| format!("{:?}@{:?}", i.get_ref(), i.span()))
                    .collect::<Vec<_>>(),
                v.span()
            )),
            s(&k.quota),
            s(&k.created_at),
            s(&k.revoked_at),
            s(&k.previous_hash),
            s(&k.previous_expires),
            s(&k.max_body),
        )
    }

    #[test]
    fn plain_tables_read_exactly_as_the_toml_crate_reads_them() {
        let text = "# key store\n\n[[keys]]\nid = \"partner-a\"   # the first\nhash = \"blake3:00\"\n\
                    tenant = 'hotel-1'\nrate = \"5/s\"\nburst = 7\ndisabled = false\n\
                    expires = 2027-06-30T00:00:00Z\ncreated_at = 2026-01-01T10:00:00+02:00\n\
                    scopes = [\"GET /v1/**\", 'POST /v1/x' ,]\nquota = \"100/day\"\nmax_body = \"2MiB\"\n\
                    \t[[keys]] # second\r\n  id = \"b\"\r\nhash=\"h\"\r\ndisabled = true\n\
                    previous_hash = \"p\"\nprevious_expires = 2030-01-01T00:00:00Z\nrevoked_at = 2026-02-02T00:00:00Z\n\
                    scopes = []\nburst = -3\nmax_body = 1024\n\n[[keys]]\nid = \"\"\nhash = \"\"\n";
        let fast: Vec<String> = keys(text, 0).unwrap().iter().map(describe).collect();
        assert_eq!(fast, by_toml(text));
        assert_eq!(fast.len(), 3);
    }

    #[test]
    fn anything_unusual_is_left_to_the_toml_crate() {
        for text in [
            "[[keys]]\nid = \"a\\u0041\"\nhash = \"h\"\n", // escape
            "[[keys]]\nid = \"\"\"a\"\"\"\nhash = \"h\"\n", // multi-line string
            "[[keys]]\nid = \"a\"\nhash = \"h\"\nid = \"b\"\n", // repeated field
            "[[keys]]\nid = \"a\"\nhash = \"h\"\ncolour = \"b\"\n", // unknown field
            "[[keys]]\nid = \"a\"\n",                      // missing hash
            "[[keys]]\nid = \"a\"\nhash = \"h\"\nburst = 007\n", // leading zeros
            "[[keys]]\nid = \"a\"\nhash = \"h\"\nburst = 1_000\n", // underscores
            "[[keys]]\nid = \"a\"\nhash = \"h\"\nscopes = [\n\"GET /\"]\n", // multi-line array
            "[[keys]]\nid = \"a\" x\nhash = \"h\"\n",      // junk after a value
            "[[keys]]\n\"id\" = \"a\"\nhash = \"h\"\n",    // quoted name
            "[[keys]]\nid = \"a\"\nhash = \"h\"\n[limits]\n", // another table
            "id = \"a\"\n",                                // outside a table
            "[[keys]]\nid = \"a\"\nhash = \"h\"\nexpires = 2027-06-30 10:00:00Z\n", // space in a date
            "[[keys]]\nid = \"a\u{1}\"\nhash = \"h\"\n", // control character
        ] {
            assert!(keys(text, 0).is_none(), "{text:?}");
        }
    }

    /// A keys file of several chunks: tables and a quoted value cut anywhere by the chunk
    /// boundaries, CRLF lines, a comment line longer than a chunk, no newline at the end.
    fn large_keys_text(n: usize) -> String {
        let mut text = format!("# {}\n", "x".repeat(1_500_000));
        for i in 0..n {
            let eol = if i % 7 == 0 { "\r\n" } else { "\n" };
            text += &format!(
                "[[keys]]{eol}id = \"partner-{i}\"{eol}hash = \"blake3:{i:064x}\"  # note{eol}\
                 tenant = 'hotel-{}'{eol}",
                i % 13
            );
            if i % 5 == 0 {
                text += &format!(
                    "scopes = [\"GET /v1/{i}/**\", 'POST /v1/x']{eol}rate = \"{i}/s\"{eol}"
                );
            }
            text += "\n";
        }
        text + "[[keys]]\nid = \"last\"\nhash = \"h\""
    }

    #[test]
    fn a_file_streamed_in_chunks_reads_exactly_as_the_toml_crate_reads_it() {
        let text = large_keys_text(12_000);
        assert!(text.len() > 3 << 20, "several chunks");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        std::fs::write(&path, &text).unwrap();
        let file = KeysFile::open(&path).unwrap();
        assert_eq!(file.count(), 12_001);
        let mut streamed = Vec::new();
        file.each_key(|k| {
            streamed.push(describe(&k));
            true
        })
        .unwrap();
        // Spans included: they are offsets in the file, as the toml crate's are.
        assert_eq!(streamed, by_toml(&text));

        // `each` refusing a key stops the scan there.
        let mut seen = 0;
        let stopped = KeysFile::open(&path).unwrap().each_key(|_| {
            seen += 1;
            seen < 100
        });
        assert!(stopped.is_none());
        assert_eq!(seen, 100);

        // Something only the toml crate reads, deep in the file: not streamed.
        let unusual = text.replacen("id = \"partner-11000\"", "id = \"partner\\u0041\"", 1);
        std::fs::write(&path, unusual).unwrap();
        assert!(KeysFile::open(&path).unwrap().each_key(|_| true).is_none());
        // Nor is a file that is not UTF-8.
        std::fs::write(&path, b"[[keys]]\nid = \"\xff\"\nhash = \"h\"\n").unwrap();
        assert!(KeysFile::open(&path).is_none());
    }

    #[test]
    fn every_chunk_boundary_reads_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let plain =
            "# k\r\n[[keys]]\r\nid = \"a\"  # x\r\nhash = 'h'\nscopes = [\"GET /\", 'PUT /x']\n\
                     \n\t[[keys]]\nid = \"é\"\nhash = \"h2\"\nburst = 3";
        let unusual =
            "[[keys]]\nid = \"a\"\nhash = \"h\"\n[[keys]]\nid = \"b\\u0041\"\nhash = \"h\"\n";
        let bare_cr = "[[keys]]\nid = \"a\"\nhash = \"h\"\r";
        for text in [plain, unusual, bare_cr, ""] {
            // What the scanner makes of the whole text; it reads `plain` and "" itself.
            let whole = keys(text, 0).map(|k| k.iter().map(describe).collect::<Vec<_>>());
            assert_eq!(whole.is_some(), text == plain || text.is_empty());
            std::fs::write(&path, text).unwrap();
            for chunk in 1..=48 {
                let file = KeysFile::open_with_chunk(&path, chunk).unwrap();
                assert_eq!(file.count(), text.matches("[[keys]]").count());
                let mut streamed = Vec::new();
                let done = file.each_key(|k| {
                    streamed.push(describe(&k));
                    true
                });
                assert_eq!(done.map(|()| streamed), whole, "chunk {chunk}: {text:?}");
            }
        }
        let plain_keys: Vec<String> = keys(plain, 0).unwrap().iter().map(describe).collect();
        assert_eq!(plain_keys, by_toml(plain));
    }

    #[test]
    fn a_whole_config_is_split_at_its_first_keys_table() {
        let text = "[server]\nlisten = \"127.0.0.1:0\"\n[upstream]\nurl = \"http://x\"\n\
                    [[keys]]\nid = \"a\"\nhash = \"h\"\n";
        let raw = split(text).unwrap();
        assert_eq!(raw.keys.len(), 1);
        assert_eq!(&text[raw.keys[0].id.span()], "\"a\"");
        // keys both before and after the split point: the toml crate decides.
        let both = "keys = []\n[server]\nlisten = \"x\"\n[upstream]\nurl = \"x\"\n[[keys]]\nid = \"a\"\nhash = \"h\"\n";
        assert!(split(both).is_none());
    }
}
