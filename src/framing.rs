//! HTTP/1 message framing, screened on the wire: requests whose length is stated twice.
//!
//! hyper reads an HTTP/1.1 request with two identical `Content-Length` lines as one, and one
//! with `Content-Length` and `Transfer-Encoding: chunked` as chunked (RFC 9112 §6.3), and hands
//! the request on with the duplicate gone. That is a reading a server may make, but not one
//! every proxy in front of keygate or every backend behind it makes the same way, which is what
//! request smuggling lives on. keygate refuses both with `400` and closes the connection, like
//! nginx does for the second case and Envoy for both; nothing of such a request is forwarded.
//!
//! Since the parsed request no longer shows them, [`FramingScreen`] reads the client's bytes as
//! they pass to hyper (from the connection's reads, [`crate::conn::ClientIo`]): it finds each request head, checks its `Content-Length` and
//! `Transfer-Encoding` lines, and follows the body's framing (a length, or chunks exactly as
//! hyper's decoder reads them) to the next head. The verdicts go to [`Framing`], which the
//! request path asks once per request, in order ([`Framing::admit`]): the `n`-th request hyper
//! hands over is the `n`-th head the screen saw. Heads hyper itself refuses end the connection
//! before the request path runs, so they never shift that count.
//!
//! The screen steps aside for good when the connection turns out not to be HTTP/1 (the HTTP/2
//! preface), after a `101 Switching Protocols` ([`Framing::stop`]), after the first ambiguous
//! head (the connection closes after its `400`), and on bytes hyper will refuse anyway (a head
//! over `max_header_bytes`, a malformed chunk), since hyper then ends the connection itself.
//! Its cost is one pass over each head's line starts and a few branches per body read.

use std::sync::{
    atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering},
    Arc,
};

/// Why a request head's framing is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Ambiguity {
    /// Two or more `Content-Length` lines (even with the same value).
    RepeatedLength = 1,
    /// `Content-Length` together with `Transfer-Encoding`.
    LengthAndEncoding = 2,
}

impl Ambiguity {
    /// The sentence the client gets.
    pub fn message(self) -> &'static str {
        match self {
            Ambiguity::RepeatedLength => "Send at most one Content-Length header.",
            Ambiguity::LengthAndEncoding => {
                "Send either Content-Length or Transfer-Encoding, not both."
            }
        }
    }

    fn from_u8(v: u8) -> Option<Ambiguity> {
        match v {
            1 => Some(Ambiguity::RepeatedLength),
            2 => Some(Ambiguity::LengthAndEncoding),
            _ => None,
        }
    }
}

/// One connection's framing verdicts, shared by its [`FramingScreen`] and its request path.
#[derive(Debug, Default)]
pub struct Framing {
    /// Heads the screen has finished reading.
    heads: AtomicU64,
    /// 1 + the index of the first ambiguous head; 0 while there is none.
    bad_at: AtomicU64,
    /// Its [`Ambiguity`].
    why: AtomicU8,
    /// Requests the request path has asked about.
    asked: AtomicU64,
    /// Set when the connection stops carrying HTTP/1 requests.
    stopped: AtomicBool,
}

impl Framing {
    /// Called once per request, in order: refuses the request whose head was ambiguous.
    pub fn admit(&self) -> Result<(), Ambiguity> {
        let n = self.asked.fetch_add(1, Ordering::Relaxed);
        if self.bad_at.load(Ordering::Acquire) == n + 1 {
            let why = Ambiguity::from_u8(self.why.load(Ordering::Relaxed));
            return Err(why.expect("set before bad_at"));
        }
        Ok(())
    }

    /// The connection switched protocols (`101`): what follows is not HTTP/1.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }

    fn judge(&self, verdict: Option<Ambiguity>) {
        let n = self.heads.fetch_add(1, Ordering::Relaxed);
        if let Some(why) = verdict {
            self.why.store(why as u8, Ordering::Relaxed);
            self.bad_at.store(n + 1, Ordering::Release);
        }
    }
}

/// Where the screen is in the client's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between requests, or inside a head (see `FramingScreen::partial`).
    Head,
    /// Inside a body of known length: this many bytes remain.
    Body(u64),
    /// Inside a chunked body.
    Chunked(Chunk),
    /// Not screening any more.
    Off,
}

/// The states of hyper's chunked decoder (`proto/h1/decode.rs`), so both read the same bytes
/// as the end of a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Start,
    Size { size: u64 },
    SizeLws { size: u64 },
    Extension { size: u64 },
    SizeLf { size: u64 },
    Data { left: u64 },
    DataCr,
    DataLf,
    EndCr,
    Trailer,
    TrailerLf,
    EndLf,
}

/// Follows a client byte stream's HTTP/1 request framing; the connection's reads
/// ([`crate::conn::ClientIo`]) hand it every byte on the way to hyper.
#[derive(Debug)]
pub struct FramingScreen {
    framing: Arc<Framing>,
    state: State,
    /// The start of a head that did not arrive in one read.
    partial: Vec<u8>,
    /// The longest head worth following; hyper refuses longer ones (`431`).
    max_head: usize,
    /// The connection opened with the HTTP/2 preface (however its bytes were split).
    h2: bool,
}

impl FramingScreen {
    /// Reports to `framing`; heads longer than `max_head` are left to hyper.
    pub fn new(framing: Arc<Framing>, max_head: usize) -> FramingScreen {
        FramingScreen {
            framing,
            state: State::Head,
            partial: Vec::new(),
            max_head,
            h2: false,
        }
    }

    /// Whether the connection is HTTP/2: its preface has arrived whole.
    pub fn is_h2(&self) -> bool {
        self.h2
    }

    /// Follows `data`, the next bytes the client sent.
    pub fn scan(&mut self, mut data: &[u8]) {
        if self.state == State::Off {
            return;
        }
        if self.framing.stopped.load(Ordering::Relaxed) {
            self.state = State::Off;
        }
        while !data.is_empty() {
            match self.state {
                State::Off => return,
                State::Head => data = self.scan_head(data),
                State::Body(left) => {
                    let n = left.min(data.len() as u64);
                    data = &data[n as usize..];
                    self.state = match left - n {
                        0 => State::Head,
                        left => State::Body(left),
                    };
                }
                State::Chunked(chunk) => data = self.scan_chunked(chunk, data),
            }
        }
    }

    /// Reads head bytes; returns what follows the head once it is complete.
    fn scan_head<'a>(&mut self, data: &'a [u8]) -> &'a [u8] {
        if self.partial.is_empty() {
            // Empty lines before a request line are skipped (RFC 9112 §2.2), as hyper does.
            let start = data
                .iter()
                .position(|b| !matches!(b, b'\r' | b'\n'))
                .unwrap_or(data.len());
            let data = &data[start..];
            if data.is_empty() {
                return data;
            }
            return match read_head(data) {
                Some((end, framing)) => {
                    self.finish_head(&data[..end], framing);
                    &data[end..]
                }
                None => {
                    self.keep_partial(data);
                    &[]
                }
            };
        }
        let had = self.partial.len();
        // Past `max_head` hyper refuses the head (431); a few bytes more show it is over.
        let take = data.len().min((self.max_head + 4).saturating_sub(had));
        self.partial.extend_from_slice(&data[..take]);
        // Read again from the start: a head split across reads is the rare case.
        match read_head(&self.partial) {
            Some((end, framing)) => {
                let head = std::mem::take(&mut self.partial);
                self.finish_head(&head[..end], framing);
                // The part read before held no complete head, so this one ends in `data`.
                &data[end - had..]
            }
            None => {
                if self.partial.len() > self.max_head {
                    self.give_up();
                }
                &[]
            }
        }
    }

    fn keep_partial(&mut self, data: &[u8]) {
        if data.len() > self.max_head {
            return self.give_up();
        }
        self.partial.extend_from_slice(data);
    }

    fn give_up(&mut self) {
        self.state = State::Off;
        self.partial = Vec::new();
    }

    /// Judges one complete head, which frames its body as `framing`, and follows that body.
    fn finish_head(&mut self, head: &[u8], framing: BodyFraming) {
        if head.starts_with(b"PRI * HTTP/2.0\r\n") {
            // The HTTP/2 connection preface: not HTTP/1 from here on.
            self.h2 = true;
            return self.give_up();
        }
        let verdict = match framing {
            BodyFraming::Length(_) | BodyFraming::Chunked | BodyFraming::Unreadable => None,
            BodyFraming::Ambiguous(why) => Some(why),
        };
        self.framing.judge(verdict);
        self.state = match framing {
            BodyFraming::Length(0) => State::Head,
            BodyFraming::Length(n) => State::Body(n),
            BodyFraming::Chunked => State::Chunked(Chunk::Start),
            // hyper refuses what the screen cannot read, and after an ambiguous head the
            // connection closes: nothing further to follow either way.
            BodyFraming::Unreadable | BodyFraming::Ambiguous(_) => State::Off,
        };
    }

    /// Follows a chunked body; returns what follows its end once it is complete.
    fn scan_chunked<'a>(&mut self, mut chunk: Chunk, mut data: &'a [u8]) -> &'a [u8] {
        while let Some((&b, rest)) = data.split_first() {
            if let Chunk::Data { left } = chunk {
                let n = left.min(data.len() as u64);
                data = &data[n as usize..];
                chunk = match left - n {
                    0 => Chunk::DataCr,
                    left => Chunk::Data { left },
                };
                continue;
            }
            data = rest;
            chunk = match (chunk, b) {
                (Chunk::Start, b) if b.is_ascii_hexdigit() => Chunk::Size {
                    size: hex(b) as u64,
                },
                (Chunk::Size { size }, b) if b.is_ascii_hexdigit() => match size.checked_mul(16) {
                    Some(size) => Chunk::Size {
                        size: size + hex(b) as u64,
                    },
                    None => return self.chunk_error(),
                },
                (Chunk::Size { size } | Chunk::SizeLws { size }, b' ' | b'\t') => {
                    Chunk::SizeLws { size }
                }
                (
                    Chunk::Size { size } | Chunk::SizeLws { size } | Chunk::Extension { size },
                    b'\r',
                ) => Chunk::SizeLf { size },
                (Chunk::Size { size } | Chunk::SizeLws { size }, b';') => Chunk::Extension { size },
                (Chunk::Extension { .. }, b'\n') => return self.chunk_error(),
                (Chunk::Extension { size }, _) => Chunk::Extension { size },
                (Chunk::SizeLf { size: 0 }, b'\n') => Chunk::EndCr,
                (Chunk::SizeLf { size }, b'\n') => Chunk::Data { left: size },
                (Chunk::DataCr, b'\r') => Chunk::DataLf,
                (Chunk::DataLf, b'\n') => Chunk::Start,
                (Chunk::EndCr, b'\r') => Chunk::EndLf,
                (Chunk::Trailer, b'\r') => Chunk::TrailerLf,
                (Chunk::EndCr | Chunk::Trailer, _) => Chunk::Trailer,
                (Chunk::TrailerLf, b'\n') => Chunk::EndCr,
                (Chunk::EndLf, b'\n') => {
                    self.state = State::Head;
                    return data;
                }
                _ => return self.chunk_error(),
            };
        }
        self.state = State::Chunked(chunk);
        data
    }

    /// A chunk hyper's decoder refuses too: the connection ends there.
    fn chunk_error<'a>(&mut self) -> &'a [u8] {
        self.give_up();
        &[]
    }
}

fn hex(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => b - b'A' + 10,
    }
}

/// How a request head frames its body.
#[derive(Debug, PartialEq, Eq)]
enum BodyFraming {
    Length(u64),
    Chunked,
    Ambiguous(Ambiguity),
    /// Framing hyper refuses (a malformed length, a coding other than chunked last).
    Unreadable,
}

/// Reads the head at the start of `buf`: where it ends (just after its empty line) and how it
/// frames its body; `None` until the empty line has arrived. One pass over the line ends, with
/// a closer look only at lines starting like `Content-Length` or `Transfer-Encoding`. Lines end
/// in CRLF or, as hyper also accepts, a bare LF.
fn read_head(buf: &[u8]) -> Option<(usize, BodyFraming)> {
    let mut fields = FramingFields::default();
    // The request line is not a field line.
    let mut at = memchr::memchr(b'\n', buf)? + 1;
    loop {
        let line = &buf[at..];
        match line {
            [b'\n', ..] => return Some((at + 1, fields.framing())),
            [b'\r', b'\n', ..] => return Some((at + 2, fields.framing())),
            [b'c' | b'C' | b't' | b'T', ..] => {
                let end = memchr::memchr(b'\n', line)?;
                fields.read(&line[..end]);
                at += end + 1;
            }
            _ => at += memchr::memchr(b'\n', line)? + 1,
        }
    }
}

/// What a head's `Content-Length` and `Transfer-Encoding` lines say.
#[derive(Default)]
struct FramingFields {
    lengths: u32,
    /// The last length, `Some(None)` when it is not one decimal number.
    length: Option<Option<u64>>,
    /// Whether the last `Transfer-Encoding` line ends in chunked.
    chunked: Option<bool>,
}

impl FramingFields {
    fn read(&mut self, line: &[u8]) {
        let Some(colon) = memchr::memchr(b':', line) else {
            return;
        };
        let (name, value) = (&line[..colon], trim(&line[colon + 1..]));
        if name.eq_ignore_ascii_case(b"content-length") {
            self.lengths += 1;
            self.length = Some(decimal(value));
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // As hyper: chunked when the last coding named is chunked.
            let last = value.rsplit(|&b| b == b',').next().map(trim);
            self.chunked = Some(last.is_some_and(|c| c.eq_ignore_ascii_case(b"chunked")));
        }
    }

    fn framing(&self) -> BodyFraming {
        match (self.lengths, self.length, self.chunked) {
            (2.., _, _) => BodyFraming::Ambiguous(Ambiguity::RepeatedLength),
            (1, _, Some(_)) => BodyFraming::Ambiguous(Ambiguity::LengthAndEncoding),
            (_, _, Some(true)) => BodyFraming::Chunked,
            (_, _, Some(false)) | (_, Some(None), _) => BodyFraming::Unreadable,
            (_, Some(Some(n)), None) => BodyFraming::Length(n),
            (_, None, None) => BodyFraming::Length(0),
        }
    }
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t' | b'\r'))
        .map_or(start, |i| i + 1);
    &v[start..end.max(start)]
}

/// A Content-Length value as hyper reads it: digits only, any number of leading zeros, `None`
/// past `u64`. (Refusing a long run of zeros that hyper accepts would end the screen for the
/// connection while hyper went on.) The upstream hop reads its answers' lengths with it too.
pub(crate) fn decimal(v: &[u8]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.iter().try_fold(0u64, |n, &d| {
        if !d.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Feeds `bytes` to a screen in pieces of the given sizes; returns the verdicts the request
    /// path would get for `requests` requests.
    fn verdicts(bytes: &[u8], cuts: &[usize], requests: usize) -> Vec<Option<Ambiguity>> {
        let framing = Arc::new(Framing::default());
        let mut screen = FramingScreen::new(Arc::clone(&framing), 8192);
        let mut rest = bytes;
        for &cut in cuts.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (piece, after) = rest.split_at(cut.clamp(1, rest.len()));
            screen.scan(piece);
            rest = after;
        }
        (0..requests).map(|_| framing.admit().err()).collect()
    }

    fn get(path: &str) -> String {
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")
    }

    #[test]
    fn repeated_lengths_and_length_with_chunked_are_ambiguous() {
        use Ambiguity::*;
        for (head, want) in [
            ("Content-Length: 5\r\nContent-Length: 5\r\n", RepeatedLength),
            ("content-length: 5\r\nCONTENT-LENGTH: 6\r\n", RepeatedLength),
            (
                "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
                LengthAndEncoding,
            ),
            (
                "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
                LengthAndEncoding,
            ),
        ] {
            let bytes = format!("POST /a HTTP/1.1\r\nHost: x\r\n{head}\r\nhello");
            assert_eq!(
                verdicts(bytes.as_bytes(), &[4096], 1),
                [Some(want)],
                "{head}"
            );
        }
    }

    /// A length hyper accepts (leading zeros, however many) keeps the screen on: the pipelined
    /// ambiguous head after it is still refused.
    #[test]
    fn long_runs_of_leading_zeros_keep_the_screen_on() {
        let zeros = "0".repeat(40);
        let bytes = format!(
            "GET /a HTTP/1.1\r\nHost: x\r\nContent-Length: {zeros}\r\n\r\n\
             POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 00000000000000000000005\r\n\r\nhello\
             POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"
        );
        let want = [None, None, Some(Ambiguity::RepeatedLength)];
        for cuts in [&[1][..], &[4096]] {
            assert_eq!(verdicts(bytes.as_bytes(), cuts, 3), want, "cuts {cuts:?}");
        }
        assert_eq!(decimal(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(decimal(b"18446744073709551616"), None);
        assert_eq!(decimal(b"-5"), None);
        assert_eq!(decimal(b""), None);
    }

    #[test]
    fn bodies_are_followed_to_the_next_head() {
        // A length body whose bytes look like a bad head, a chunked body with extensions and
        // trailers, bare-LF lines, then an ambiguous head: only the last is refused.
        let fake = "GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n";
        let bytes = format!(
            "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{fake}\
             \r\n\
             POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
             5 ;ext=1\r\nhello\r\nA\r\n{}\r\n0\r\nX-Trailer: Content-Length: 5\r\n\r\n\
             GET /c HTTP/1.1\nHost: x\n\n\
             POST /d HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
            fake.len(),
            "0123456789",
        );
        let want = [None, None, None, Some(Ambiguity::RepeatedLength)];
        for cuts in [&[1][..], &[2], &[3], &[7, 1], &[4096]] {
            assert_eq!(verdicts(bytes.as_bytes(), cuts, 4), want, "cuts {cuts:?}");
        }
    }

    #[test]
    fn the_http2_preface_and_a_switch_of_protocols_end_the_screen() {
        let h2 = format!("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n{}", "x".repeat(100));
        assert_eq!(verdicts(h2.as_bytes(), &[5], 1), [None]);

        let framing = Arc::new(Framing::default());
        let mut screen = FramingScreen::new(Arc::clone(&framing), 8192);
        screen.scan(get("/ws").as_bytes());
        assert_eq!(framing.admit(), Ok(()));
        framing.stop();
        screen.scan(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n");
        assert_eq!(screen.state, State::Off);
    }

    #[test]
    fn heads_hyper_refuses_leave_the_screen() {
        for head in [
            "Content-Length: five\r\n",
            "Transfer-Encoding: chunked, gzip\r\n",
        ] {
            let bytes = format!("POST /a HTTP/1.1\r\n{head}\r\n{}", get("/b"));
            assert_eq!(verdicts(bytes.as_bytes(), &[4096], 2), [None, None]);
        }
        let long = format!("GET /a HTTP/1.1\r\nX: {}\r\n\r\n", "y".repeat(9000));
        assert_eq!(verdicts(long.as_bytes(), &[100], 1), [None]);
    }

    /// One request of the random streams below, and whether its head is ambiguous.
    fn request() -> impl Strategy<Value = (String, Option<Ambiguity>)> {
        let body = "[a-z\r\n]{0,40}";
        prop_oneof![
            Just((get("/g"), None)),
            body.prop_map(|b| (
                format!("POST /l HTTP/1.1\r\ncontent-length: {}\r\n\r\n{b}", b.len()),
                None
            )),
            (prop::collection::vec(body, 0..4), any::<bool>()).prop_map(|(chunks, ext)| {
                let mut s = String::from("POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
                for c in chunks.iter().filter(|c| !c.is_empty()) {
                    let ext = if ext { ";a=b" } else { "" };
                    s += &format!("{:x}{ext}\r\n{c}\r\n", c.len());
                }
                (s + "0\r\n\r\n", None)
            }),
        ]
    }

    proptest! {
        /// Any stream of well-framed requests, cut anywhere, followed by an ambiguous one:
        /// exactly the last is refused.
        #[test]
        fn verdicts_do_not_depend_on_how_bytes_arrive(
            reqs in prop::collection::vec(request(), 0..8),
            cuts in prop::collection::vec(1usize..64, 1..8),
        ) {
            let mut bytes: String = reqs.iter().map(|(r, _)| r.as_str()).collect();
            bytes += "POST /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
            let mut want: Vec<_> = reqs.iter().map(|(_, v)| *v).collect();
            want.push(Some(Ambiguity::LengthAndEncoding));
            prop_assert_eq!(verdicts(bytes.as_bytes(), &cuts, want.len()), want);
        }

        /// Whatever arrives, cut anywhere, the screen never panics (it runs inside every
        /// HTTP/1 connection's reads).
        #[test]
        fn no_bytes_make_the_screen_panic(
            pieces in prop::collection::vec(prop_oneof![
                Just(b"\r\n".to_vec()), Just(b"\n".to_vec()), Just(b"\r".to_vec()),
                Just(b"Content-Length: 3".to_vec()), Just(b"Transfer-Encoding: chunked".to_vec()),
                Just(b"POST / HTTP/1.1".to_vec()), Just(b"PRI * HTTP/2.0".to_vec()),
                "[0-9a-fA-F; \t:]{0,6}".prop_map(String::into_bytes),
                prop::collection::vec(any::<u8>(), 0..8),
            ], 0..64),
            cuts in prop::collection::vec(1usize..32, 1..6),
            max_head in 8usize..64,
        ) {
            let bytes = pieces.concat();
            let framing = Arc::new(Framing::default());
            let mut screen = FramingScreen::new(Arc::clone(&framing), max_head);
            let mut rest = &bytes[..];
            for &cut in cuts.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (piece, after) = rest.split_at(cut.min(rest.len()));
                screen.scan(piece);
                rest = after;
            }
            let _ = framing.admit();
        }
    }
}
