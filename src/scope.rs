//! Key scopes: which methods and paths a key may call, and the path normalisation they rely on.
//!
//! A scope is `METHOD /path/pattern`: the method (upper case) or `*` for any, then a path whose
//! segments are literals, `*` (exactly one non-empty segment) or `**` (any number of segments,
//! none included, so `GET /v1/guests/**` also covers `GET /v1/guests`). A key without scopes may
//! call anything; a key with scopes may call what at least one of them covers.
//!
//! Requests are matched on their *normalised* path ([`NormalPath`]): each segment is
//! percent-decoded, then `.` and `..` segments are resolved (RFC 3986 §5.2.4), so
//! `/v1/guests/../messages` and `/v1/guests/%2e%2e/messages` are both `/v1/messages` and cannot
//! slip past `GET /v1/guests/**`; a `..` that climbs above the root is refused. The dot
//! segments of every key's path are resolved the same way ([`resolve_dots`]), so that none
//! leaves the `[upstream] url` path. The same normalised path (still in its original encoding) is
//! what gets forwarded, so the upstream serves exactly what was checked. A segment that decodes
//! to something holding `/`, `\` or NUL, or to `..` or `.` with `;` parameters (`..;x`, which
//! Tomcat and Jetty resolve as `..`), has no single meaning across servers and is refused.
//! Matching costs time in proportion to the scope's segments times the path's, whatever `**`
//! segments the scope holds.
//! `GET` does not imply `HEAD`: list both when a partner needs both.

use std::fmt;

use http::Method;

/// One `METHOD /path` scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// `None` for `*` (any method).
    method: Option<Method>,
    segments: Vec<Segment>,
    text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(Vec<u8>),
    One,
    Any,
}

impl Scope {
    /// Parses `"GET /v1/guests/**"`; the error says what is wrong in one sentence.
    pub fn parse(s: &str) -> Result<Scope, String> {
        let (method, path) = s.trim().split_once(' ').ok_or_else(|| {
            format!("scope {s:?} must be a method (or *) and a path, like \"GET /v1/guests/**\"")
        })?;
        let path = path.trim();
        let method = match method {
            "*" => None,
            m if !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase()) => Some(
                Method::from_bytes(m.as_bytes())
                    .map_err(|_| format!("scope {s:?}: {m:?} is not a method"))?,
            ),
            m => {
                return Err(format!(
                    "scope {s:?}: the method {m:?} must be upper case letters or *"
                ))
            }
        };
        let Some(rest) = path.strip_prefix('/') else {
            return Err(format!("scope {s:?}: the path must start with /"));
        };
        let mut segments = Vec::new();
        if !rest.is_empty() {
            for seg in rest.split('/') {
                segments.push(match seg {
                    "*" => Segment::One,
                    "**" => Segment::Any,
                    "." | ".." => {
                        return Err(format!("scope {s:?}: . and .. segments are not allowed"))
                    }
                    lit if lit.contains('*') => {
                        return Err(format!(
                            "scope {s:?}: * and ** must be a whole path segment"
                        ))
                    }
                    lit if lit
                        .bytes()
                        .any(|b| matches!(b, b'%' | b'?' | b'#') || !b.is_ascii_graphic()) =>
                    {
                        return Err(format!(
                            "scope {s:?}: path segments cannot hold %, ?, # or spaces"
                        ))
                    }
                    lit => Segment::Literal(lit.as_bytes().to_vec()),
                });
            }
        }
        Ok(Scope {
            method,
            segments,
            text: s.trim().to_string(),
        })
    }

    /// Whether this scope covers `method` on the normalised `path`.
    pub fn covers(&self, method: &Method, path: &NormalPath) -> bool {
        if self.method.as_ref().is_some_and(|m| m != method) {
            return false;
        }
        matches(&self.segments, &path.segments)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Glob match of pattern segments against decoded path segments, in O(pattern × path) time:
/// `reach[j]` says whether the pattern so far can consume exactly the first `j` segments. (A
/// backtracking match costs path^k for k `**` segments: a partner with a scope like
/// `GET /v1/**/rooms/**/photos` could send one long path and hold a core for minutes.)
fn matches(pattern: &[Segment], path: &[Vec<u8>]) -> bool {
    let mut stack = [false; 33];
    let mut heap = Vec::new();
    let reach: &mut [bool] = if path.len() < stack.len() {
        &mut stack[..=path.len()]
    } else {
        heap.resize(path.len() + 1, false);
        &mut heap
    };
    reach[0] = true;
    for seg in pattern {
        match seg {
            // Zero or more segments: reachable from the first reachable position on.
            Segment::Any => {
                let mut on = false;
                for r in reach.iter_mut() {
                    on |= *r;
                    *r = on;
                }
            }
            // Exactly one segment: shift by one where it matches.
            Segment::One | Segment::Literal(_) => {
                for j in (1..reach.len()).rev() {
                    let fits = match seg {
                        Segment::Literal(lit) => path[j - 1] == *lit,
                        _ => !path[j - 1].is_empty(),
                    };
                    reach[j] = reach[j - 1] && fits;
                }
                reach[0] = false;
            }
        }
    }
    reach[path.len()]
}

/// Whether any of `scopes` covers the request; an empty list covers everything.
pub fn allowed(scopes: &[Scope], method: &Method, path: &NormalPath) -> bool {
    scopes.is_empty() || scopes.iter().any(|s| s.covers(method, path))
}

/// A request path with dot segments resolved: decoded segments to match, encoded text to forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalPath {
    /// Percent-decoded segments (without the leading empty one): `/a/b` is `["a", "b"]`.
    pub segments: Vec<Vec<u8>>,
    /// The normalised path in the request's own encoding, starting with `/`.
    pub encoded: String,
}

/// Why a path cannot be normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// A segment decodes to `/`, `\` or NUL, or to a dot segment with `;` parameters, or
    /// holds a broken `%` escape.
    #[error("the path holds an encoded slash, backslash, NUL, a dot segment with parameters or a broken escape")]
    Ambiguous,
    /// A `..` segment climbs above the root (`/../admin`): behind the `[upstream] url` path
    /// it would leave that path.
    #[error("the path climbs above the root")]
    AboveRoot,
}

/// What one raw segment of a path is, for dot-segment resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dots {
    /// Neither `.` nor `..`.
    Name,
    /// `.`, `%2e` or `%2E`.
    One,
    /// `..`, with any of its dots written `%2e` or `%2E`.
    Two,
}

/// Whether the raw segment `seg` is a dot segment, reading `%2e`/`%2E` as `.`.
///
/// A segment that some server would read as a dot segment but that is not one here is
/// refused: `..;x` and `.;x` (Tomcat and Jetty drop `;` parameters, then resolve), and a
/// segment holding an encoded `/` or `\` with a dot segment beside it (`..%2f..%2fadmin`,
/// which servers that decode before resolving read as two `..`).
fn dots(seg: &str) -> Result<Dots, PathError> {
    let b = seg.as_bytes();
    // Most segments have neither a dot nor an escape: one pass, nothing decoded.
    if !b.iter().any(|&c| c == b'.' || c == b'%') {
        return Ok(Dots::Name);
    }
    // Walk the decoded bytes as pieces between decoded `/` or `\`, each piece's name up to
    // its first `;`.
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let (mut pieces, mut dot_piece, mut with_params) = (1, false, false);
    // The current piece: its leading dots, whether anything else came before a `;`, whether
    // a `;` came.
    let (mut n, mut other, mut params) = (0usize, false, false);
    let mut end_piece = |n: usize, other: bool, params: bool| {
        if (n == 1 || n == 2) && !other {
            dot_piece = true;
            with_params |= params;
        }
    };
    let mut i = 0;
    while i < b.len() {
        let mut c = b[i];
        i += 1;
        if c == b'%' {
            if let (Some(h), Some(l)) = (
                b.get(i).and_then(|&c| hex(c)),
                b.get(i + 1).and_then(|&c| hex(c)),
            ) {
                c = h << 4 | l;
                i += 2;
            }
        }
        match c {
            b'/' | b'\\' => {
                end_piece(n, other, params);
                pieces += 1;
                (n, other, params) = (0, false, false);
            }
            _ if params => {}
            b';' => params = true,
            b'.' if !other => n += 1,
            _ => other = true,
        }
    }
    end_piece(n, other, params);
    if !dot_piece {
        return Ok(Dots::Name);
    }
    if with_params || pieces > 1 {
        return Err(PathError::Ambiguous);
    }
    Ok(if n == 1 { Dots::One } else { Dots::Two })
}

/// `path` (which starts with `/`) with its `.` and `..` segments resolved (RFC 3986 §5.2.4,
/// `%2e` read as `.`), in its own encoding; `None` when it has none, the common case, which
/// costs one pass over the path and no allocation. A `..` that climbs above the root is
/// refused, as nginx and Envoy refuse it, and so is a segment servers read as a dot segment
/// in ways this one does not (see [`dots`]).
///
/// Every forwarded path goes through here, so that a key's path cannot leave the
/// `[upstream] url` path put in front of it; [`normalise`] starts with it.
pub fn resolve_dots(path: &str) -> Result<Option<String>, PathError> {
    let body = path.strip_prefix('/').unwrap_or(path);
    let mut first = None;
    for (i, seg) in body.split('/').enumerate() {
        if dots(seg)? != Dots::Name {
            first = Some(i);
            break;
        }
    }
    let Some(first) = first else {
        return Ok(None);
    };
    let mut kept: Vec<&str> = Vec::new();
    let mut segs = body.split('/').enumerate().peekable();
    while let Some((i, seg)) = segs.next() {
        let kind = if i < first { Dots::Name } else { dots(seg)? };
        match kind {
            Dots::Name => kept.push(seg),
            Dots::One | Dots::Two => {
                if kind == Dots::Two && kept.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
                // `/a/b/..` is the directory `/a/`: keep the trailing slash.
                if segs.peek().is_none() {
                    kept.push("");
                }
            }
        }
    }
    let mut resolved = String::with_capacity(path.len());
    for seg in &kept {
        resolved.push('/');
        resolved.push_str(seg);
    }
    if resolved.is_empty() {
        resolved.push('/');
    }
    Ok(Some(resolved))
}

/// Resolves the dot segments of `path` (which starts with `/`, see [`resolve_dots`]) and
/// percent-decodes each segment left.
pub fn normalise(path: &str) -> Result<NormalPath, PathError> {
    let encoded = match resolve_dots(path)? {
        Some(resolved) => resolved,
        None if path.starts_with('/') => path.to_string(),
        None => format!("/{path}"),
    };
    let body = encoded.strip_prefix('/').unwrap_or(&encoded);
    let segments = if body.is_empty() {
        // `/` alone has no segments, so that `GET /**` covers it and `GET /*` does not.
        Vec::new()
    } else {
        let mut segments = Vec::new();
        for seg in body.split('/') {
            let decoded = percent_decode(seg)?;
            if decoded.iter().any(|b| matches!(b, b'/' | b'\\' | 0)) {
                return Err(PathError::Ambiguous);
            }
            segments.push(decoded);
        }
        segments
    };
    Ok(NormalPath { segments, encoded })
}

fn percent_decode(s: &str) -> Result<Vec<u8>, PathError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
            match (
                b.get(i + 1).and_then(|&c| hex(c)),
                b.get(i + 2).and_then(|&c| hex(c)),
            ) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                }
                _ => return Err(PathError::Ambiguous),
            }
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covers(scope: &str, method: &str, path: &str) -> bool {
        let s = Scope::parse(scope).unwrap();
        let p = normalise(path).unwrap();
        s.covers(&Method::from_bytes(method.as_bytes()).unwrap(), &p)
    }

    #[test]
    fn scope_table() {
        let cases = [
            ("GET /v1/guests/**", "GET", "/v1/guests", true),
            ("GET /v1/guests/**", "GET", "/v1/guests/", true),
            ("GET /v1/guests/**", "GET", "/v1/guests/42/stays", true),
            ("GET /v1/guests/**", "POST", "/v1/guests/42", false),
            ("GET /v1/guests/**", "HEAD", "/v1/guests/42", false),
            ("GET /v1/guests/**", "GET", "/v1/guestsX", false),
            ("GET /v1/guests/**", "GET", "/v1/guests/../messages", false),
            (
                "GET /v1/guests/**",
                "GET",
                "/v1/guests/%2e%2E/messages",
                false,
            ),
            ("GET /v1/guests/**", "GET", "/v1/x/../guests/1", true),
            ("GET /v1/guests/**", "GET", "/v1/%67uests/1", true),
            ("POST /v1/messages", "POST", "/v1/messages", true),
            ("POST /v1/messages", "POST", "/v1/messages/", false),
            ("POST /v1/messages", "POST", "/v1/messages/1", false),
            ("POST /v1/messages", "POST", "/v1/./messages", true),
            ("* /v1/hotels/*", "DELETE", "/v1/hotels/7", true),
            ("* /v1/hotels/*", "GET", "/v1/hotels/7/rooms", false),
            ("* /v1/hotels/*", "GET", "/v1/hotels/", false),
            ("* /v1/hotels/*", "GET", "/v1/hotels", false),
            ("GET /v1/**/rooms", "GET", "/v1/hotels/7/rooms", true),
            ("GET /v1/**/rooms", "GET", "/v1/rooms", true),
            ("GET /v1/**/rooms", "GET", "/v1/hotels/7/rooms/1", false),
            ("GET /**", "GET", "/", true),
            ("GET /", "GET", "/", true),
            ("GET /*", "GET", "/", false),
        ];
        for (scope, method, path, want) in cases {
            assert_eq!(
                covers(scope, method, path),
                want,
                "{scope} vs {method} {path}"
            );
        }
    }

    #[test]
    fn normalisation_keeps_the_encoding_of_what_stays() {
        let p = normalise("/v1/guests/%2e%2e/a%20b/./c").unwrap();
        assert_eq!(p.encoded, "/v1/a%20b/c");
        assert_eq!(
            p.segments,
            vec![b"v1".to_vec(), b"a b".to_vec(), b"c".to_vec()]
        );
        assert_eq!(normalise("/a/b/..").unwrap().encoded, "/a/");
        assert_eq!(normalise("/a/..").unwrap().encoded, "/");
        assert_eq!(normalise("/").unwrap().encoded, "/");
    }

    #[test]
    fn dot_segments_are_resolved_and_may_not_climb_above_the_root() {
        for (path, want) in [
            ("/v1/guests/42", None),
            ("/", None),
            ("/v1/file.json", None),
            ("/v1/.../a.b./.c", None),
            ("/v1/a%20b/%2e%2e%2e", None),
            ("/v1/a%2Fb", None),
            ("/v1/./guests/../guests", Some("/v1/guests")),
            ("/v1/%2e/x/%2E%2e/y", Some("/v1/y")),
            ("/v1/x/.%2e", Some("/v1/")),
            ("/v1/x/.", Some("/v1/x/")),
            ("/a//../b", Some("/a/b")),
            ("/a/..", Some("/")),
            ("/.", Some("/")),
        ] {
            assert_eq!(resolve_dots(path).unwrap().as_deref(), want, "{path}");
        }
        for path in [
            "/..",
            "/../admin",
            "/a/../../admin",
            "/%2e%2e/admin",
            "/.%2E/x",
        ] {
            assert_eq!(resolve_dots(path), Err(PathError::AboveRoot), "{path}");
            assert_eq!(normalise(path), Err(PathError::AboveRoot), "{path}");
        }
        for path in [
            "/v1/..;/admin",
            "/v1/.;x/a",
            "/v1/..%2f..%2fadmin",
            "/a/x%5c..%5cy",
        ] {
            assert_eq!(resolve_dots(path), Err(PathError::Ambiguous), "{path}");
        }
    }

    #[test]
    fn encoded_slashes_and_broken_escapes_are_refused() {
        for p in [
            "/v1/guests%2f..%2fmessages",
            "/a/%5c",
            "/a/%00",
            "/a/%zz",
            "/a/%4",
            "/v1/guests/..;/admin",
            "/v1/guests/..;jsessionid=1/admin",
            "/v1/guests/%2e%2e;/admin",
            "/v1/guests/.;x/1",
        ] {
            assert_eq!(normalise(p), Err(PathError::Ambiguous), "{p}");
        }
    }

    #[test]
    fn semicolons_elsewhere_are_plain_characters() {
        assert!(covers(
            "GET /v1/guests/**",
            "GET",
            "/v1/guests/a;b/x..;y.json"
        ));
        assert!(covers("GET /v1/guests/**", "GET", "/v1/guests/...;x"));
    }

    /// Several `**` against a long path: answered at once (backtracking took path^3 steps
    /// here, minutes for a path of 3,000 segments).
    #[test]
    fn many_wildcards_against_a_long_path_cost_linear_time() {
        let scope = Scope::parse("GET /v1/**/rooms/**/rooms/**/photos").unwrap();
        let mut path = "/v1".to_string();
        for _ in 0..3000 {
            path.push_str("/rooms");
        }
        let miss = normalise(&format!("{path}/x")).unwrap();
        assert!(!scope.covers(&Method::GET, &miss));
        let hit = normalise(&format!("{path}/photos")).unwrap();
        assert!(scope.covers(&Method::GET, &hit));
    }

    /// The reference: the backtracking match this module used before.
    fn backtracking(pattern: &[Segment], path: &[Vec<u8>]) -> bool {
        match pattern.split_first() {
            None => path.is_empty(),
            Some((Segment::Any, rest)) => {
                (0..=path.len()).any(|skip| backtracking(rest, &path[skip..]))
            }
            Some((Segment::One, rest)) => {
                !path.is_empty() && !path[0].is_empty() && backtracking(rest, &path[1..])
            }
            Some((Segment::Literal(lit), rest)) => {
                !path.is_empty() && path[0] == *lit && backtracking(rest, &path[1..])
            }
        }
    }

    proptest::proptest! {
        /// Over small alphabets (so that matches happen), paths long enough for the heap
        /// branch: the same answer as the backtracking match.
        #[test]
        fn the_linear_match_agrees_with_backtracking(
            pattern in proptest::collection::vec(0u8..5, 0..7),
            path in proptest::collection::vec(0u8..4, 0..40),
        ) {
            let pattern: Vec<Segment> = pattern
                .into_iter()
                .map(|p| match p {
                    0 => Segment::Any,
                    1 => Segment::One,
                    n => Segment::Literal(vec![b'a' + n - 2]),
                })
                .collect();
            let path: Vec<Vec<u8>> = path
                .into_iter()
                .map(|p| if p == 3 { Vec::new() } else { vec![b'a' + p] })
                .collect();
            proptest::prop_assert_eq!(matches(&pattern, &path), backtracking(&pattern, &path));
        }
    }

    #[test]
    fn bad_scopes_are_refused_with_a_reason() {
        for (s, needle) in [
            ("/v1/guests", "method"),
            ("get /v1", "upper case"),
            ("GET v1", "start with /"),
            ("GET /v1/gu*", "whole path segment"),
            ("GET /v1/../admin", ". and .."),
            ("GET /v1/%2e", "cannot hold"),
        ] {
            let err = Scope::parse(s).unwrap_err();
            assert!(err.contains(needle), "{s}: {err}");
        }
        assert!(allowed(&[], &Method::GET, &normalise("/x").unwrap()));
    }
}
