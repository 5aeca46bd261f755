//! HTTP/1.1 on the upstream hop, as bytes: the request head keygate writes, the response head
//! it parses, and the framing of the response body (RFC 9112 §6).
//!
//! [`crate::upstream`] drives these over its pooled connections. They are written here rather
//! than taken from hyper's client because that client runs every exchange through a task and
//! two channels of its own, which was a third of the gateway's work per request (issue 5).
//! The rules are the strict ones:
//!
//! - a response head is at most [`MAX_HEAD`] bytes and [`MAX_HEADERS`] fields, parsed by
//!   `httparse` (no obsolete line folding);
//! - a response has no body after `HEAD`, for `1xx`, `204` and `304`; a `Transfer-Encoding` whose
//!   last coding is `chunked` wins over any `Content-Length` (which is then removed, and the
//!   connection is not reused); other transfer codings and a missing length read to the close;
//!   `Content-Length` values that differ, or are not decimal, make the response malformed;
//! - chunk-size lines are hex digits, optional extensions, and CRLF; chunk data must end in CRLF;
//!   trailer fields are parsed like header fields and passed on.

use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};

/// Largest response head accepted, in bytes.
pub const MAX_HEAD: usize = 64 * 1024 - 1;
/// Most response header fields accepted.
pub const MAX_HEADERS: usize = 128;
/// Largest chunk-size line or trailer section accepted, in bytes.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;

/// A response the gateway cannot read as HTTP/1.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed upstream response: {0}")]
pub struct Malformed(pub &'static str);

/// How the request body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    /// No body, and no framing field needed.
    Empty,
    /// No body, but the method usually has one: `Content-Length: 0` is added.
    ZeroLength,
    /// The request's own `Content-Length` field frames the body; bytes go as they come.
    Length,
    /// No length known: `Transfer-Encoding: chunked` is added and the body is chunked.
    Chunked,
}

impl RequestFraming {
    /// The framing for a request with these `headers` whose body is (`empty`) already over.
    pub fn of(method: &Method, headers: &HeaderMap, empty: bool) -> RequestFraming {
        if headers.contains_key(header::CONTENT_LENGTH) {
            RequestFraming::Length
        } else if !empty {
            RequestFraming::Chunked
        } else if *method == Method::POST || *method == Method::PUT || *method == Method::PATCH {
            RequestFraming::ZeroLength
        } else {
            RequestFraming::Empty
        }
    }
}

/// The fields of a request head besides the request's own: which of those go on, and what is
/// added after them (the gateway's forwarding and identity fields, [`crate::proxy::Forwarding`]).
pub trait Fields {
    /// Whether the request's own field `name` goes upstream.
    fn passes(&self, name: &HeaderName) -> bool;
    /// Calls `field` with each field written after the request's own.
    fn added(&self, field: &mut dyn FnMut(&HeaderName, &HeaderValue));
}

/// Appends the request head to `out`: `path` is the origin-form target; the fields are the
/// `headers` that `fields` passes (several `cookie` fields as one), then those it adds.
pub fn encode_request(
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    fields: &dyn Fields,
    framing: RequestFraming,
    out: &mut Vec<u8>,
) {
    fn field(out: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut cookies = false;
    for (name, value) in headers {
        if !fields.passes(name) {
            continue;
        }
        if name == header::COOKIE {
            // An HTTP/2 client may send one `cookie` field per cookie (RFC 9113 §8.2.3); HTTP/1.1
            // has one, the values joined with "; ". Written once, at the first.
            if !cookies {
                cookies = true;
                out.extend_from_slice(b"cookie: ");
                for (i, v) in headers.get_all(header::COOKIE).iter().enumerate() {
                    if i > 0 {
                        out.extend_from_slice(b"; ");
                    }
                    out.extend_from_slice(v.as_bytes());
                }
                out.extend_from_slice(b"\r\n");
            }
            continue;
        }
        field(out, name, value);
    }
    fields.added(&mut |name, value| field(out, name, value));
    match framing {
        RequestFraming::ZeroLength => out.extend_from_slice(b"content-length: 0\r\n"),
        RequestFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        RequestFraming::Empty | RequestFraming::Length => {}
    }
    out.extend_from_slice(b"\r\n");
}

/// The chunk-size line for `len` bytes of data.
pub fn chunk_line(len: usize) -> Bytes {
    let mut line = Vec::with_capacity(20);
    line.extend_from_slice(format!("{len:x}\r\n").as_bytes());
    Bytes::from(line)
}

/// The last chunk of a request body, with an empty trailer section: request trailers are not
/// forwarded (see [`crate::upstream`]).
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead {
    /// The status code.
    pub status: StatusCode,
    /// `HTTP/1.0` or `HTTP/1.1`.
    pub version: Version,
    /// The header fields (`Content-Length` removed when `Transfer-Encoding` overrides it).
    pub headers: HeaderMap,
    /// How the body that follows is framed.
    pub body: BodyKind,
    /// Whether the connection may carry another request after this response.
    pub keep_alive: bool,
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Everything until the upstream closes the connection.
    Close,
}

/// Parses a response head from the front of `buf`, taking its bytes out of `buf` when it is
/// complete; `Ok(None)` when more bytes are needed.
pub fn parse_response(
    buf: &mut BytesMut,
    method: &Method,
) -> Result<Option<ResponseHead>, Malformed> {
    // Uninitialised: a zeroed array of 128 fields costs more than parsing a small head.
    let mut fields = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        &mut fields,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            return if buf.len() >= MAX_HEAD {
                Err(Malformed("head too large"))
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(Malformed("too many header fields")),
        Err(_) => return Err(Malformed("unparsable head")),
    };
    if len > MAX_HEAD {
        return Err(Malformed("head too large"));
    }
    let status = response
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(Malformed("bad status code"))?;
    let version = match response.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    // Field offsets into the head (below 64 KiB), so the values can be slices of one shared
    // buffer once the head is taken out of `buf`.
    let base = buf.as_ptr() as usize;
    let mut spans = [[0u16; 4]; MAX_HEADERS];
    let count = response.headers.len();
    for (span, field) in spans.iter_mut().zip(response.headers.iter()) {
        let at = |s: &[u8]| (s.as_ptr() as usize - base) as u16;
        *span = [
            at(field.name.as_bytes()),
            field.name.len() as u16,
            at(field.value),
            field.value.len() as u16,
        ];
    }
    let head = buf.split_to(len).freeze();
    // Room for the fields the gateway adds to every response (rate limit, request id).
    let mut headers = HeaderMap::with_capacity(count + 4);
    let mut framing = Framing::default();
    // Hop-by-hop fields stay on this hop (but a `101`'s, which the upgrade needs); so do the
    // fields a `Connection` names, whose values are kept aside in the rare case there are any.
    let switching = status == StatusCode::SWITCHING_PROTOCOLS;
    let mut named = Vec::new();
    for &[name_at, name_len, value_at, value_len] in &spans[..count] {
        let (name_at, name_len) = (usize::from(name_at), usize::from(name_len));
        let (value_at, value_len) = (usize::from(value_at), usize::from(value_len));
        let name = HeaderName::from_bytes(&head[name_at..name_at + name_len])
            .map_err(|_| Malformed("bad header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(value_at..value_at + value_len))
            .map_err(|_| Malformed("bad header value"))?;
        framing.note(&name, &value)?;
        if switching || !hop_by_hop_names().iter().any(|f| **f == name) {
            headers.append(name, value);
        } else if name == header::CONNECTION && names_fields(&value) {
            named.push(value);
        }
    }
    for value in &named {
        for token in value.as_bytes().split(|&b| b == b',') {
            if let Ok(name) = HeaderName::from_bytes(token.trim_ascii()) {
                headers.remove(name);
            }
        }
    }
    let body = if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        BodyKind::Empty
    } else if framing.transfer_encoding {
        if framing.chunked_last {
            if framing.length.is_some() {
                headers.remove(header::CONTENT_LENGTH);
                framing.close = true;
            }
            BodyKind::Chunked
        } else {
            // Read to the close (RFC 9112 §6.3): a length beside the coding does not frame it,
            // and passed on it would make the partner's side cut the coded body short.
            headers.remove(header::CONTENT_LENGTH);
            BodyKind::Close
        }
    } else {
        match framing.length {
            Some(n) => BodyKind::Length(n),
            None => BodyKind::Close,
        }
    };
    let keep_alive = version == Version::HTTP_11 && !framing.close && body != BodyKind::Close;
    Ok(Some(ResponseHead {
        status,
        version,
        headers,
        body,
        keep_alive,
    }))
}

/// The hop-by-hop header fields of RFC 9110 §7.6.1 (and the legacy `Keep-Alive` and
/// `Proxy-Connection`), left out of answers as they are parsed.
///
/// `Trailer` is not one (RFC 9110 §6.6.2): it names the trailer fields an answer ends with,
/// and the partner's side writes only the fields it names (hyper on HTTP/1.1), so it goes on
/// with the answer.
pub fn hop_by_hop_names() -> [&'static HeaderName; 8] {
    [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TE,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
        &header::PROXY_AUTHENTICATE,
        &header::PROXY_AUTHORIZATION,
    ]
}

/// The fields a forwarded request leaves behind as hop-by-hop, at most 16 (a bit each in
/// [`crate::proxy::strip_hop_by_hop`]'s mask): [`hop_by_hop_names`], and `Trailer`, since a
/// request's trailers are not forwarded ([`LAST_CHUNK`]).
pub fn request_hop_names() -> [&'static HeaderName; 9] {
    let [a, b, c, d, e, f, g, h] = hop_by_hop_names();
    [a, b, c, d, e, f, g, h, &header::TRAILER]
}

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Whether a `Connection` value names fields (anything but `close` and `keep-alive`).
fn names_fields(value: &HeaderValue) -> bool {
    value.as_bytes().split(|&b| b == b',').any(|t| {
        let t = t.trim_ascii();
        !(t.is_empty() || t.eq_ignore_ascii_case(b"close") || t.eq_ignore_ascii_case(b"keep-alive"))
    })
}

/// What a response's fields say about its framing and its connection.
#[derive(Default)]
struct Framing {
    length: Option<u64>,
    transfer_encoding: bool,
    chunked_last: bool,
    close: bool,
}

impl Framing {
    fn note(&mut self, name: &HeaderName, value: &HeaderValue) -> Result<(), Malformed> {
        if name == header::CONTENT_LENGTH {
            // `5, 5` is one length said twice; anything else not decimal is malformed.
            for part in value.as_bytes().split(|&b| b == b',') {
                let n = crate::framing::decimal(part.trim_ascii())
                    .ok_or(Malformed("bad content-length"))?;
                if self.length.is_some_and(|l| l != n) {
                    return Err(Malformed("conflicting content-length"));
                }
                self.length = Some(n);
            }
        } else if name == header::TRANSFER_ENCODING {
            self.transfer_encoding = true;
            for coding in value.as_bytes().split(|&b| b == b',') {
                let coding = coding.trim_ascii();
                if !coding.is_empty() {
                    self.chunked_last = coding.eq_ignore_ascii_case(b"chunked");
                }
            }
        } else if name == header::CONNECTION {
            self.close |= value
                .as_bytes()
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
        Ok(())
    }
}

/// What [`BodyReader::next`] found in the buffer.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Body bytes.
    Data(Bytes),
    /// The trailer fields of a chunked body (only when there are some).
    Trailers(HeaderMap),
    /// The body is complete.
    End,
    /// More bytes are needed.
    More,
}

/// Reads a response body out of the connection's read buffer, by its framing.
#[derive(Debug)]
pub struct BodyReader {
    state: Read,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    Length(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkEnd,
    Trailers,
    Close,
    Done,
}

impl BodyReader {
    /// A reader for a body of this kind.
    pub fn new(kind: BodyKind) -> BodyReader {
        let state = match kind {
            BodyKind::Empty | BodyKind::Length(0) => Read::Done,
            BodyKind::Length(n) => Read::Length(n),
            BodyKind::Chunked => Read::ChunkSize,
            BodyKind::Close => Read::Close,
        };
        BodyReader { state }
    }

    /// Whether the whole body has been read.
    pub fn is_done(&self) -> bool {
        self.state == Read::Done
    }

    /// Whether the body ends only when the connection closes.
    pub fn until_close(&self) -> bool {
        self.state == Read::Close
    }

    /// The exact number of bytes left, when known.
    pub fn remaining(&self) -> Option<u64> {
        match self.state {
            Read::Length(n) => Some(n),
            Read::Done => Some(0),
            _ => None,
        }
    }

    /// The connection reached its end: fine for a body that runs to the close (which is then
    /// complete), an error for any other that is not done.
    pub fn at_eof(&mut self) -> Result<(), Malformed> {
        match self.state {
            Read::Close | Read::Done => {
                self.state = Read::Done;
                Ok(())
            }
            _ => Err(Malformed("connection closed before the body was complete")),
        }
    }

    /// Takes the next piece of the body out of `buf`.
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Step, Malformed> {
        loop {
            match self.state {
                Read::Done => return Ok(Step::End),
                Read::Length(left) => {
                    let Some((data, left)) = take(buf, left) else {
                        return Ok(Step::More);
                    };
                    self.state = if left == 0 {
                        Read::Done
                    } else {
                        Read::Length(left)
                    };
                    return Ok(Step::Data(data));
                }
                Read::Close => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    return Ok(Step::Data(buf.split().freeze()));
                }
                Read::ChunkSize => {
                    let Some(line) = take_line(buf, MAX_CHUNK_LINE)? else {
                        return Ok(Step::More);
                    };
                    let size = chunk_size(&line)?;
                    self.state = if size == 0 {
                        Read::Trailers
                    } else {
                        Read::ChunkData(size)
                    };
                }
                Read::ChunkData(left) => {
                    let Some((data, left)) = take(buf, left) else {
                        return Ok(Step::More);
                    };
                    self.state = if left == 0 {
                        Read::ChunkEnd
                    } else {
                        Read::ChunkData(left)
                    };
                    return Ok(Step::Data(data));
                }
                Read::ChunkEnd => {
                    if buf.len() < 2 {
                        return Ok(Step::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(Malformed("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    self.state = Read::ChunkSize;
                }
                Read::Trailers => {
                    let end = find_section_end(buf);
                    if end.is_some_and(|end| end > MAX_TRAILERS) {
                        return Err(Malformed("trailer section too large"));
                    }
                    let Some(end) = end else {
                        return if buf.len() > MAX_TRAILERS {
                            Err(Malformed("trailer section too large"))
                        } else {
                            Ok(Step::More)
                        };
                    };
                    let section = buf.split_to(end);
                    self.state = Read::Done;
                    if section.len() == 2 {
                        return Ok(Step::End);
                    }
                    return Ok(Step::Trailers(parse_trailers(&section)?));
                }
            }
        }
    }
}

/// Up to `left` bytes from the front of `buf`, and how many are left after them; `None` when
/// `buf` is empty.
fn take(buf: &mut BytesMut, left: u64) -> Option<(Bytes, u64)> {
    if buf.is_empty() {
        return None;
    }
    let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
    Some((buf.split_to(n).freeze(), left - n as u64))
}

/// Takes one CRLF-ended line (without the CRLF) from the front of `buf`.
fn take_line(buf: &mut BytesMut, max: usize) -> Result<Option<BytesMut>, Malformed> {
    match memchr::memchr(b'\n', buf) {
        // Too long whether the line end came with it or not: the same verdict in any pieces.
        Some(i) if i > max => Err(Malformed("chunk-size line too long")),
        Some(i) => {
            if i == 0 || buf[i - 1] != b'\r' {
                return Err(Malformed("line not ended by CRLF"));
            }
            let mut line = buf.split_to(i + 1);
            line.truncate(i - 1);
            Ok(Some(line))
        }
        None if buf.len() > max => Err(Malformed("chunk-size line too long")),
        None => Ok(None),
    }
}

/// The size on a chunk-size line: hex digits (any number of leading zeros), then optional
/// spaces or tabs and `;` extensions; no other control byte (a bare CR, a form feed).
fn chunk_size(line: &[u8]) -> Result<u64, Malformed> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let zeros = line[..digits].iter().take_while(|&&b| b == b'0').count();
    if digits == 0 || digits - zeros > 15 {
        return Err(Malformed("bad chunk size"));
    }
    let rest = &line[digits..];
    let rest = &rest[rest
        .iter()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count()..];
    if !(rest.is_empty() || rest[0] == b';') || rest.iter().any(|&b| b < 0x20 && b != b'\t') {
        return Err(Malformed("bad chunk extension"));
    }
    Ok(line[..digits].iter().fold(0u64, |n, &d| {
        n * 16 + u64::from((d as char).to_digit(16).expect("hex digit"))
    }))
}

/// The length of the trailer section at the front of `buf` (through the empty line).
fn find_section_end(buf: &[u8]) -> Option<usize> {
    if buf.starts_with(b"\r\n") {
        return Some(2);
    }
    memchr::memmem::find(buf, b"\r\n\r\n").map(|i| i + 4)
}

fn parse_trailers(section: &[u8]) -> Result<HeaderMap, Malformed> {
    let mut fields = [httparse::EMPTY_HEADER; 64];
    match httparse::parse_headers(section, &mut fields) {
        Ok(httparse::Status::Complete((_, fields))) => {
            let mut trailers = HeaderMap::with_capacity(fields.len());
            for field in fields {
                let name = HeaderName::from_bytes(field.name.as_bytes())
                    .map_err(|_| Malformed("bad trailer name"))?;
                let value = HeaderValue::from_bytes(field.value)
                    .map_err(|_| Malformed("bad trailer value"))?;
                trailers.append(name, value);
            }
            Ok(trailers)
        }
        _ => Err(Malformed("bad trailer section")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn head(text: &str, method: &Method) -> Result<Option<ResponseHead>, Malformed> {
        parse_response(&mut BytesMut::from(text), method)
    }

    /// The whole body `wire` carries, fed to the reader in pieces cut at `cuts`.
    fn read_all(kind: BodyKind, wire: &[u8], cuts: &[usize]) -> Result<(Vec<u8>, bool), Malformed> {
        let mut reader = BodyReader::new(kind);
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut trailers = false;
        let mut at = 0;
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
        points.sort_unstable();
        points.push(wire.len());
        for point in points {
            buf.extend_from_slice(&wire[at..point.max(at)]);
            at = point.max(at);
            loop {
                match reader.next(&mut buf)? {
                    Step::Data(d) => body.extend_from_slice(&d),
                    Step::Trailers(_) => trailers = true,
                    Step::End => return Ok((body, trailers)),
                    Step::More => break,
                }
            }
        }
        reader.at_eof()?;
        Ok((body, trailers))
    }

    /// Passes all but `x-drop`, adds `x-added: 1`.
    struct Test;

    impl Fields for Test {
        fn passes(&self, name: &HeaderName) -> bool {
            name != "x-drop"
        }
        fn added(&self, field: &mut dyn FnMut(&HeaderName, &HeaderValue)) {
            field(
                &HeaderName::from_static("x-added"),
                &HeaderValue::from_static("1"),
            );
        }
    }

    #[test]
    fn request_heads_carry_the_fields_and_the_framing_the_body_needs() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("api"));
        headers.insert("x-drop", HeaderValue::from_static("gone"));
        let mut out = Vec::new();
        let framing = RequestFraming::of(&Method::GET, &headers, true);
        encode_request(&Method::GET, "/v1?a=1", &headers, &Test, framing, &mut out);
        assert_eq!(
            out,
            b"GET /v1?a=1 HTTP/1.1\r\nhost: api\r\nx-added: 1\r\n\r\n"
        );
        out.clear();
        let framing = RequestFraming::of(&Method::POST, &headers, false);
        encode_request(&Method::POST, "/", &headers, &Test, framing, &mut out);
        assert!(out.ends_with(b"x-added: 1\r\ntransfer-encoding: chunked\r\n\r\n"));
        assert_eq!(
            RequestFraming::of(&Method::POST, &headers, true),
            RequestFraming::ZeroLength
        );
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        assert_eq!(
            RequestFraming::of(&Method::POST, &headers, false),
            RequestFraming::Length
        );
        assert_eq!(&chunk_line(255)[..], b"ff\r\n");
    }

    #[test]
    fn split_cookie_fields_go_as_one() {
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, HeaderValue::from_static("a=1"));
        headers.append("x-mid", HeaderValue::from_static("m"));
        headers.append(header::COOKIE, HeaderValue::from_static("b=2"));
        headers.append(header::COOKIE, HeaderValue::from_static("c=3"));
        let mut out = Vec::new();
        encode_request(
            &Method::GET,
            "/",
            &headers,
            &Test,
            RequestFraming::Empty,
            &mut out,
        );
        assert_eq!(
            out,
            b"GET / HTTP/1.1\r\ncookie: a=1; b=2; c=3\r\nx-mid: m\r\nx-added: 1\r\n\r\n"
        );
    }

    #[test]
    fn heads_are_framed_as_rfc_9112_says() {
        let get = &Method::GET;
        let h = head("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello", get)
            .unwrap()
            .unwrap();
        assert_eq!(
            (h.status, h.body, h.keep_alive),
            (StatusCode::OK, BodyKind::Length(5), true)
        );
        // Leading zeros, however many, as hyper and the client-side screen read them.
        let padded = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}5\r\n\r\n",
            "0".repeat(30)
        );
        assert_eq!(
            head(&padded, get).unwrap().unwrap().body,
            BodyKind::Length(5)
        );
        let h = head(
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
            &Method::HEAD,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.body, BodyKind::Empty);
        assert_eq!(h.headers["content-length"], "5");
        for status in ["204 No Content", "304 Not Modified", "100 Continue"] {
            let text = format!("HTTP/1.1 {status}\r\ncontent-length: 5\r\n\r\n");
            assert_eq!(head(&text, get).unwrap().unwrap().body, BodyKind::Empty);
        }
        let h = head(
            "HTTP/1.1 200 OK\r\ncontent-length: 9\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
            get,
        )
        .unwrap()
        .unwrap();
        assert_eq!((h.body, h.keep_alive), (BodyKind::Chunked, false));
        assert!(!h.headers.contains_key("content-length"));
        let h = head(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n",
            get,
        )
        .unwrap()
        .unwrap();
        assert_eq!((h.body, h.keep_alive), (BodyKind::Close, false));
        // A coding other than chunked last, beside a length: read to the close, the length
        // dropped (it does not frame the coded body, RFC 9112 §6.3).
        let h = head(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\ncontent-length: 10\r\n\r\n",
            get,
        )
        .unwrap()
        .unwrap();
        assert_eq!((h.body, h.keep_alive), (BodyKind::Close, false));
        assert!(!h.headers.contains_key("content-length"));
        let h = head("HTTP/1.1 200 OK\r\n\r\n", get).unwrap().unwrap();
        assert_eq!((h.body, h.keep_alive), (BodyKind::Close, false));
        let h = head("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n", get)
            .unwrap()
            .unwrap();
        assert_eq!((h.version, h.keep_alive), (Version::HTTP_10, false));
        let h = head(
            "HTTP/1.1 200 OK\r\nConnection: Close\r\ncontent-length: 1\r\n\r\n",
            get,
        )
        .unwrap()
        .unwrap();
        assert!(!h.keep_alive);
        let h = head("HTTP/1.1 200 OK\r\ncontent-length: 3, 3\r\n\r\n", get)
            .unwrap()
            .unwrap();
        assert_eq!(h.body, BodyKind::Length(3));
    }

    #[test]
    fn hop_by_hop_fields_stay_on_this_hop_but_a_101_keeps_them() {
        let text = "HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nKeep-Alive: timeout=5\r\n\
                    X-Hop: 1\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\nX-End: 2\r\n\r\n";
        let h = head(text, &Method::GET).unwrap().unwrap();
        let mut names: Vec<&str> = h.headers.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        // `Trailer` is not hop-by-hop: the partner's side needs it to write the trailers.
        assert_eq!(names, ["trailer", "x-end"]);
        assert_eq!(h.headers["trailer"], "x-sum");
        assert_eq!((h.body, h.keep_alive), (BodyKind::Chunked, true));
        let text =
            "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n";
        let h = head(text, &Method::GET).unwrap().unwrap();
        assert_eq!(h.headers["upgrade"], "websocket");
        assert_eq!(h.headers["connection"], "upgrade");
    }

    #[test]
    fn malformed_heads_are_refused_and_partial_ones_wait() {
        let get = &Method::GET;
        assert!(head("HTTP/1.1 200 OK\r\ncontent-le", get)
            .unwrap()
            .is_none());
        for bad in [
            "HTTP/1.1 abc OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: -3\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 0x10\r\n\r\n",
            "HTTP/1.1 200 OK\r\nx: a\r\n folded\r\n\r\n",
            "HTTP/2 200 OK\r\n\r\n",
        ] {
            assert!(head(bad, get).is_err(), "{bad:?}");
        }
        let mut many = "HTTP/1.1 200 OK\r\n".to_string();
        for i in 0..=MAX_HEADERS {
            many.push_str(&format!("x-{i}: v\r\n"));
        }
        many.push_str("\r\n");
        assert_eq!(
            head(&many, get).unwrap_err(),
            Malformed("too many header fields")
        );
        let huge = format!("HTTP/1.1 200 OK\r\nx: {}", "a".repeat(MAX_HEAD));
        assert_eq!(head(&huge, get).unwrap_err(), Malformed("head too large"));
    }

    #[test]
    fn the_head_leaves_the_body_bytes_in_the_buffer() {
        let mut buf =
            BytesMut::from("HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-a: b\r\n\r\nokNEXT");
        let h = parse_response(&mut buf, &Method::GET).unwrap().unwrap();
        assert_eq!(h.headers["x-a"], "b");
        let mut reader = BodyReader::new(h.body);
        assert_eq!(
            reader.next(&mut buf).unwrap(),
            Step::Data(Bytes::from_static(b"ok"))
        );
        assert_eq!(reader.next(&mut buf).unwrap(), Step::End);
        assert_eq!(&buf[..], b"NEXT");
    }

    #[test]
    fn chunked_bodies_decode_with_extensions_and_trailers() {
        let wire = b"5;ext=1\r\nhello\r\n1 ; a=b\r\n \r\n6\r\nworld!\r\n0\r\nx-sum: 9\r\n\r\nNEXT";
        let mut reader = BodyReader::new(BodyKind::Chunked);
        let mut buf = BytesMut::from(&wire[..]);
        let mut body = Vec::new();
        loop {
            match reader.next(&mut buf).unwrap() {
                Step::Data(d) => body.extend_from_slice(&d),
                Step::Trailers(t) => assert_eq!(t["x-sum"], "9"),
                Step::End => break,
                Step::More => panic!("whole body was there"),
            }
        }
        assert_eq!(body, b"hello world!");
        assert_eq!(&buf[..], b"NEXT");
        // Leading zeros do not count against the 15 hex digits (hyper reads them too).
        let zeros = b"0000000000000005\t;x\r\nhello\r\n00000000000000000\r\n\r\n";
        assert_eq!(
            read_all(BodyKind::Chunked, zeros, &[3]).unwrap().0,
            b"hello"
        );
        for bad in [
            &b"5\r\nhelloXX0\r\n\r\n"[..],
            b"g\r\n",
            b"5\nhello\r\n",
            b"ffffffffffffffff\r\n",
            b"5 x\r\nhello\r\n",
            // A bare CR or a form feed after the size (RFC 9112 §2.2: no bare CR).
            b"5\r\r\nhello\r\n0\r\n\r\n",
            b"5\x0c\r\nhello\r\n0\r\n\r\n",
            b"0000ffffffffffffffff\r\n",
        ] {
            assert!(
                read_all(BodyKind::Chunked, bad, &[]).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn limits_hold_whether_the_bytes_come_whole_or_in_pieces() {
        let long_line = format!("5;{}\r\nhello\r\n0\r\n\r\n", "x".repeat(MAX_CHUNK_LINE));
        let long_trailers = format!("0\r\nx-t: {}\r\n\r\n", "v".repeat(MAX_TRAILERS));
        for wire in [long_line, long_trailers] {
            assert!(read_all(BodyKind::Chunked, wire.as_bytes(), &[]).is_err());
            assert!(read_all(BodyKind::Chunked, wire.as_bytes(), &[7, 3000, 9000]).is_err());
        }
    }

    #[test]
    fn a_body_cut_short_by_the_close_is_an_error_unless_it_runs_to_the_close() {
        assert!(read_all(BodyKind::Length(5), b"hel", &[]).is_err());
        assert!(read_all(BodyKind::Chunked, b"5\r\nhel", &[]).is_err());
        assert_eq!(
            read_all(BodyKind::Close, b"all of it", &[2]).unwrap().0,
            b"all of it"
        );
    }

    fn chunked(pieces: &[Vec<u8>], trailer: bool) -> Vec<u8> {
        let mut wire = Vec::new();
        for p in pieces.iter().filter(|p| !p.is_empty()) {
            wire.extend_from_slice(&chunk_line(p.len()));
            wire.extend_from_slice(p);
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(if trailer {
            b"0\r\nx-t: 1\r\n\r\n"
        } else {
            LAST_CHUNK
        });
        wire
    }

    proptest! {
        /// Any body, chunked any way, fed in any pieces, comes out whole.
        #[test]
        fn chunked_bodies_survive_any_split(
            pieces in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8),
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
            trailer in any::<bool>(),
        ) {
            let wire = chunked(&pieces, trailer);
            let (body, got_trailers) = read_all(BodyKind::Chunked, &wire, &cuts).unwrap();
            prop_assert_eq!(body, pieces.concat());
            prop_assert_eq!(got_trailers, trailer);
        }

        /// Arbitrary bytes never panic the reader.
        #[test]
        fn junk_never_panics(wire in proptest::collection::vec(any::<u8>(), 0..200), cuts in proptest::collection::vec(any::<usize>(), 0..6)) {
            let _ = read_all(BodyKind::Chunked, &wire, &cuts);
            let _ = parse_response(&mut BytesMut::from(&wire[..]), &Method::GET);
        }
    }
}
