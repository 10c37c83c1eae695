//! The HTTP/1 request-head guard. Every byte a client sends passes through
//! [`EdgeGuard`] before hyper sees it, and every request head is held back
//! until it is complete and has been checked. hyper accepts or quietly
//! repairs a few heads that a gateway must refuse outright (RFC 9112 §6.3,
//! request smuggling): `Content-Length` together with `Transfer-Encoding`
//! (hyper drops the length and frames by the encoding), repeated
//! `Content-Length` lines, stacked transfer codings (`gzip, chunked`, or
//! `gzip` and `chunked` on two lines: hyper frames by the last and ignores
//! the rest) and lines ending in a bare LF instead of CRLF. It also answers
//! malformed or oversized heads with an empty body. The guard refuses all of these with an OpenAI-shaped
//! error instead, and a credential header carrying control bytes with 401.
//!
//! To refuse a head the guard never hands it to hyper. It hands hyper a
//! stand-in request instead — `GET /` with [`REJECT_HEADER`] naming the
//! [`Rejection`] and `connection: close` — which the listener's service
//! answers before any routing (`server::serve_listener`), and stops
//! passing on anything the client sends after it. Going through hyper keeps
//! responses in order when requests are pipelined: the refusal is written
//! after every earlier response, and hyper closes the connection after it.
//!
//! To find each head, the guard follows the message framing of the request
//! stream: a `Content-Length` body is counted off, a chunked body is
//! tracked with the same state machine hyper decodes it with (mirroring
//! hyper's leniencies), and whatever follows is the next head. Where the
//! client's framing is something hyper will itself refuse (a broken chunk),
//! the guard stops looking and passes bytes through: hyper errors and
//! closes the connection, so nothing after that point is ever parsed. HTTP/2
//! connections (the client preface) are passed through untouched: HTTP/2
//! frames carry their own lengths.
//!
//! Cost on the hot path: a request head that arrives in one read is checked
//! in hyper's own buffer (no copy): a scan for the blank line and one
//! `httparse` pass, about as much as hyper's own parse.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderMap, HeaderName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::MAX_HEADER_BYTES;
use crate::errors::ApiError;

/// The header of the stand-in request that carries a [`Rejection`] to the
/// listener's service. A client that sends it itself only gets its own
/// request refused.
pub const REJECT_HEADER: HeaderName = HeaderName::from_static("x-plangate-edge-reject");

/// The HTTP/2 client connection preface.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Header lines hyper accepts in one head; more is 431, as with hyper.
pub(crate) const MAX_HEADERS: usize = 100;

/// Why a request head was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// `Content-Length` and `Transfer-Encoding` together.
    AmbiguousLength,
    /// More than one `Content-Length` line.
    DuplicateLength,
    /// A `Content-Length` that is not a plain decimal number.
    InvalidLength,
    /// `Transfer-Encoding` on HTTP/1.0, or anything but exactly one
    /// `chunked` coding across all its lines.
    BadTransferEncoding,
    /// A line of the head ends in a bare LF instead of CRLF.
    BareLf,
    /// A head the HTTP/1 parser refuses.
    Malformed,
    /// The API-key (or admin token) header carries control bytes.
    Credentials,
    /// A head over [`MAX_HEADER_BYTES`] or with too many header lines.
    HeadTooLarge,
}

impl Rejection {
    const ALL: [Rejection; 8] = [
        Rejection::AmbiguousLength,
        Rejection::DuplicateLength,
        Rejection::InvalidLength,
        Rejection::BadTransferEncoding,
        Rejection::BareLf,
        Rejection::Malformed,
        Rejection::Credentials,
        Rejection::HeadTooLarge,
    ];

    fn token(self) -> &'static str {
        match self {
            Rejection::AmbiguousLength => "ambiguous-length",
            Rejection::DuplicateLength => "duplicate-length",
            Rejection::InvalidLength => "invalid-length",
            Rejection::BadTransferEncoding => "bad-transfer-encoding",
            Rejection::BareLf => "bare-lf",
            Rejection::Malformed => "malformed",
            Rejection::Credentials => "credentials",
            Rejection::HeadTooLarge => "head-too-large",
        }
    }

    /// The rejection a stand-in request carries, if `headers` are one's.
    pub fn of(headers: &HeaderMap) -> Option<Rejection> {
        let value = headers.get(REJECT_HEADER)?.as_bytes();
        Some(
            Rejection::ALL
                .into_iter()
                .find(|r| r.token().as_bytes() == value)
                .unwrap_or(Rejection::Malformed),
        )
    }

    /// The error the client gets.
    pub fn error(self) -> ApiError {
        let invalid = ApiError::invalid_request;
        match self {
            Rejection::AmbiguousLength => invalid(
                "The request has both Content-Length and Transfer-Encoding; send only one of them.",
            ),
            Rejection::DuplicateLength => {
                invalid("The request has more than one Content-Length header.")
            }
            Rejection::InvalidLength => invalid("The request's Content-Length is not a number."),
            Rejection::BadTransferEncoding => invalid(
                "The request's Transfer-Encoding is not supported: only a single chunked coding, on HTTP/1.1.",
            ),
            Rejection::BareLf => invalid(
                "The request head has a line ending in a bare LF; every line must end in CRLF.",
            ),
            Rejection::Malformed => invalid("The request head is not valid HTTP/1.1."),
            Rejection::Credentials => ApiError::invalid_api_key(""),
            Rejection::HeadTooLarge => ApiError::HeadersTooLarge,
        }
    }

    /// The stand-in request hyper parses instead of the refused head.
    fn stand_in(self) -> Vec<u8> {
        format!(
            "GET / HTTP/1.1\r\nhost: plangate\r\n{}: {}\r\nconnection: close\r\n\r\n",
            REJECT_HEADER.as_str(),
            self.token()
        )
        .into_bytes()
    }
}

/// How the bytes after a head are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// What a look at the start of a head found.
#[derive(Debug, PartialEq, Eq)]
enum Head {
    /// The head is not complete yet.
    Partial,
    /// A head of this many bytes, followed by a body framed so.
    Complete(usize, Framing),
    Refused(Rejection),
}

/// Check the head at the start of `bytes`; `scanned` bytes of it were
/// already searched for its end (so a head dribbled in byte by byte is
/// not searched over and over).
fn inspect(bytes: &[u8], scanned: usize, credentials: &[HeaderName]) -> Head {
    if !has_head_end(bytes, scanned) {
        return Head::Partial;
    }
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut req,
        bytes,
        &mut headers,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Head::Partial,
        Err(httparse::Error::TooManyHeaders) => return Head::Refused(Rejection::HeadTooLarge),
        Err(_) if credential_has_control_bytes(bytes, credentials) => {
            return Head::Refused(Rejection::Credentials)
        }
        Err(_) => return Head::Refused(Rejection::Malformed),
    };
    if has_bare_lf(&bytes[..len]) {
        return Head::Refused(Rejection::BareLf);
    }
    match framing(req.version == Some(0), req.headers) {
        Ok(framing) => Head::Complete(len, framing),
        Err(rejection) => Head::Refused(rejection),
    }
}

/// Whether `bytes` holds a blank line ending a head, looking from
/// `scanned - 3` on. The same test as hyper's (`\n\n` or `\n\r\n`).
fn has_head_end(bytes: &[u8], scanned: usize) -> bool {
    let from = scanned.saturating_sub(3);
    let mut at = from;
    while let Some(i) = bytes[at..].iter().position(|&b| b == b'\n') {
        let next = &bytes[at + i + 1..];
        if next.first() == Some(&b'\n') || next.starts_with(b"\r\n") {
            return true;
        }
        at += i + 1;
    }
    false
}

/// Whether a line of `head` (which httparse accepted) ends in a bare LF:
/// httparse and hyper take one as a line end, the guard wants CRLF. A CR
/// is only ever accepted right before an LF, so every LF must follow one.
fn has_bare_lf(head: &[u8]) -> bool {
    memchr::memchr_iter(b'\n', head).any(|i| i == 0 || head[i - 1] != b'\r')
}

/// The framing of the body after a head with these headers, or why the
/// head is refused.
fn framing(http10: bool, headers: &[httparse::Header<'_>]) -> Result<Framing, Rejection> {
    let mut length = None;
    let mut lengths = 0;
    // Whether any `Transfer-Encoding` was sent, and whether its codings,
    // over all its lines, are exactly one `chunked`. hyper looks only at
    // the last coding and ignores the others (`gzip, chunked` is plain
    // chunked to it); the guard refuses any other coding.
    let mut chunked = None;
    let mut codings = 0usize;
    for h in headers {
        if h.name.eq_ignore_ascii_case("content-length") {
            lengths += 1;
            length = parse_length(h.value);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            for coding in h.value.split(|&b| b == b',') {
                codings += 1;
                // True only while the one coding seen so far is chunked.
                let only = codings == 1 && coding.trim_ascii().eq_ignore_ascii_case(b"chunked");
                chunked = Some(only);
            }
        }
    }
    match (chunked, lengths) {
        (Some(_), 1..) => Err(Rejection::AmbiguousLength),
        (Some(_), _) if http10 => Err(Rejection::BadTransferEncoding),
        (Some(false), _) => Err(Rejection::BadTransferEncoding),
        (Some(true), _) => Ok(Framing::Chunked),
        (None, 2..) => Err(Rejection::DuplicateLength),
        (None, 1) => match length {
            Some(0) => Ok(Framing::None),
            Some(n) => Ok(Framing::Length(n)),
            None => Err(Rejection::InvalidLength),
        },
        (None, _) => Ok(Framing::None),
    }
}

/// A `Content-Length` value: decimal digits only (no sign, no list).
fn parse_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 {
        return None;
    }
    value.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
    })
}

/// Whether a line of the head names one of `credentials` and carries a
/// control byte (which the parser refuses) in its value.
fn credential_has_control_bytes(head: &[u8], credentials: &[HeaderName]) -> bool {
    head.split(|&b| b == b'\n').any(|line| {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return false;
        };
        let name = line[..colon].trim_ascii();
        let value = line[colon + 1..]
            .strip_suffix(b"\r")
            .unwrap_or(&line[colon + 1..]);
        credentials
            .iter()
            .any(|c| c.as_str().as_bytes().eq_ignore_ascii_case(name))
            && value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f)
    })
}

/// Where a chunked body stands; the states and leniencies of hyper's
/// decoder (`proto/h1/decode.rs`), so both agree where the body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Start,
    Size,
    SizeLws,
    Extension,
    SizeLf,
    Data(u64),
    DataCr,
    DataLf,
    Trailer,
    TrailerLf,
    EndCr,
    EndLf,
}

/// What feeding bytes to a chunked body found.
#[derive(Debug, PartialEq, Eq)]
enum Fed {
    /// All bytes belong to the body, which goes on.
    More,
    /// The body ends after this many bytes.
    Done(usize),
    /// Framing hyper refuses.
    Invalid,
}

struct ChunkedBody {
    state: Chunk,
    size: u64,
}

impl ChunkedBody {
    fn new() -> Self {
        Self {
            state: Chunk::Start,
            size: 0,
        }
    }

    fn feed(&mut self, bytes: &[u8]) -> Fed {
        let mut at = 0;
        while at < bytes.len() {
            if let Chunk::Data(left) = self.state {
                let take = left.min((bytes.len() - at) as u64);
                at += take as usize;
                self.state = match left - take {
                    0 => Chunk::DataCr,
                    left => Chunk::Data(left),
                };
                continue;
            }
            let b = bytes[at];
            at += 1;
            self.state = match (self.state, b) {
                (Chunk::Start | Chunk::Size, _) if b.is_ascii_hexdigit() => {
                    let digit = (b as char).to_digit(16).map(u64::from).unwrap_or(0);
                    match self.size.checked_mul(16).and_then(|s| s.checked_add(digit)) {
                        Some(size) => self.size = size,
                        None => return Fed::Invalid,
                    }
                    Chunk::Size
                }
                (Chunk::Size | Chunk::SizeLws, b'\t' | b' ') => Chunk::SizeLws,
                (Chunk::Size | Chunk::SizeLws | Chunk::Extension, b';') => Chunk::Extension,
                (Chunk::Size | Chunk::SizeLws | Chunk::Extension, b'\r') => Chunk::SizeLf,
                (Chunk::Extension, b'\n') => return Fed::Invalid,
                (Chunk::Extension, _) => Chunk::Extension,
                (Chunk::SizeLf, b'\n') if self.size == 0 => Chunk::EndCr,
                (Chunk::SizeLf, b'\n') => Chunk::Data(std::mem::take(&mut self.size)),
                (Chunk::DataCr, b'\r') => Chunk::DataLf,
                (Chunk::DataLf, b'\n') => Chunk::Start,
                (Chunk::Trailer, b'\r') => Chunk::TrailerLf,
                (Chunk::Trailer, _) => Chunk::Trailer,
                (Chunk::TrailerLf, b'\n') => Chunk::EndCr,
                (Chunk::EndCr, b'\r') => Chunk::EndLf,
                (Chunk::EndCr, _) => Chunk::Trailer,
                (Chunk::EndLf, b'\n') => return Fed::Done(at),
                _ => return Fed::Invalid,
            };
        }
        Fed::More
    }
}

/// Where the request stream of a connection stands.
enum State {
    /// At the start: could still be the HTTP/2 preface.
    Preface,
    /// At a request head, held back until it is complete and checked.
    Head,
    /// Inside a body with this many bytes left.
    Body(u64),
    Chunked(ChunkedBody),
    /// Everything passes through untouched (HTTP/2, or framing hyper
    /// refuses and closes the connection on).
    Pass,
    /// A stand-in was handed over; nothing more of the client's is.
    Closed,
}

/// What classifying newly read bytes found.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Every byte may go to hyper.
    All,
    /// The first `n` may; the rest starts a head (or preface) not yet
    /// complete.
    Hold(usize),
    /// The first `n` may; the head after them is refused.
    Refuse(usize, Rejection),
}

/// An I/O stream whose reads pass through the request-head guard (see the
/// module docs); writes go straight through.
pub struct EdgeGuard<T> {
    io: T,
    state: State,
    /// Bytes read but not yet handed to hyper: `held[..released]` may be
    /// handed over; after them starts an incomplete head.
    held: Vec<u8>,
    released: usize,
    /// Bytes of the held head already searched for its end.
    scanned: usize,
    /// Names whose values are credentials (a control byte in one → 401).
    credentials: Arc<[HeaderName]>,
    /// The client closed its side while a stand-in was being answered.
    client_gone: bool,
}

impl<T> EdgeGuard<T> {
    /// Guard `io`, a fresh connection; `credentials` name the headers that
    /// carry API keys or tokens.
    pub fn new(io: T, credentials: Arc<[HeaderName]>) -> Self {
        Self {
            io,
            state: State::Preface,
            held: Vec::new(),
            released: 0,
            scanned: 0,
            credentials,
            client_gone: false,
        }
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &T {
        &self.io
    }

    /// Walk `bytes` (which begin where the stream stands) through the
    /// framing state machine.
    fn classify(&mut self, bytes: &[u8]) -> Step {
        let mut at = 0;
        while at < bytes.len() {
            let rest = &bytes[at..];
            match &mut self.state {
                State::Pass => return Step::All,
                State::Closed => return Step::Refuse(at, Rejection::Malformed),
                State::Preface => {
                    let n = rest.len().min(H2_PREFACE.len());
                    if rest[..n] != H2_PREFACE[..n] {
                        self.state = State::Head;
                    } else if n == H2_PREFACE.len() {
                        self.state = State::Pass;
                    } else {
                        return Step::Hold(at);
                    }
                }
                State::Body(left) => {
                    let take = (*left).min(rest.len() as u64);
                    at += take as usize;
                    *left -= take;
                    if *left == 0 {
                        self.state = State::Head;
                    }
                }
                State::Chunked(body) => match body.feed(rest) {
                    Fed::More => return Step::All,
                    Fed::Done(n) => {
                        at += n;
                        self.state = State::Head;
                    }
                    Fed::Invalid => {
                        self.state = State::Pass;
                        return Step::All;
                    }
                },
                State::Head => {
                    let scanned = if at == 0 { self.scanned } else { 0 };
                    match inspect(rest, scanned, &self.credentials) {
                        Head::Partial if rest.len() >= MAX_HEADER_BYTES => {
                            return Step::Refuse(at, Rejection::HeadTooLarge)
                        }
                        Head::Partial => {
                            self.scanned = rest.len();
                            return Step::Hold(at);
                        }
                        Head::Complete(len, framing) => {
                            at += len;
                            self.scanned = 0;
                            self.state = match framing {
                                Framing::None => State::Head,
                                Framing::Length(n) => State::Body(n),
                                Framing::Chunked => State::Chunked(ChunkedBody::new()),
                            };
                        }
                        Head::Refused(rejection) => return Step::Refuse(at, rejection),
                    }
                }
            }
        }
        Step::All
    }

    /// Replace everything from the refused head on with its stand-in.
    fn refuse(&mut self, rejection: Rejection) {
        tracing::debug!(
            reason = rejection.token(),
            "request head refused at the edge"
        );
        self.held = rejection.stand_in();
        self.released = self.held.len();
        self.scanned = 0;
        self.state = State::Closed;
    }

    /// Hand over released held bytes, as many as fit.
    fn hand_over(&mut self, buf: &mut ReadBuf<'_>) {
        let n = self.released.min(buf.remaining());
        buf.put_slice(&self.held[..n]);
        self.held.drain(..n);
        self.released -= n;
        // A head dribbled in can grow the buffer to 64 KiB; an idle
        // keep-alive connection should not keep that.
        if self.held.is_empty() && self.held.capacity() > 8 * 1024 {
            self.held = Vec::new();
        }
    }
}

impl<T: AsyncRead + Unpin> EdgeGuard<T> {
    /// After a stand-in: read and drop whatever the client still sends (so
    /// closing the socket does not reset the connection before the client
    /// has read its answer), and never report the end of the stream —
    /// hyper would abandon the stand-in's response on it.
    fn poll_discard(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let start = buf.filled().len();
        for _ in 0..16 {
            if self.client_gone || buf.remaining() == 0 {
                return Poll::Pending;
            }
            match Pin::new(&mut self.io).poll_read(cx, buf) {
                Poll::Ready(Ok(())) if buf.filled().len() == start => self.client_gone = true,
                Poll::Ready(Ok(())) => buf.set_filled(start),
                Poll::Ready(Err(_)) => self.client_gone = true,
                Poll::Pending => return Poll::Pending,
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Read more of an incomplete head into `held`; false at end of stream.
    fn poll_fill_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        let len = self.held.len();
        self.held.resize(len + 4096, 0);
        let mut rb = ReadBuf::new(&mut self.held[len..]);
        let polled = Pin::new(&mut self.io).poll_read(cx, &mut rb);
        let n = rb.filled().len();
        self.held.truncate(len + n);
        match polled {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(n > 0)),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for EdgeGuard<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.released > 0 {
                this.hand_over(buf);
                return Poll::Ready(Ok(()));
            }
            if let State::Closed = this.state {
                return this.poll_discard(cx, buf);
            }
            if !this.held.is_empty() {
                // An incomplete head is held: read more of it.
                if !std::task::ready!(this.poll_fill_held(cx))? {
                    // The client left mid-head: as if it had sent nothing.
                    this.held.clear();
                    return Poll::Ready(Ok(()));
                }
                let held = std::mem::take(&mut this.held);
                let step = this.classify(&held);
                this.held = held;
                match step {
                    Step::All => this.released = this.held.len(),
                    Step::Hold(n) => this.released = n,
                    Step::Refuse(n, rejection) => {
                        this.held.truncate(n);
                        let approved = std::mem::take(&mut this.held);
                        this.refuse(rejection);
                        this.held.splice(..0, approved);
                        this.released = this.held.len();
                    }
                }
                continue;
            }
            // The common path: read straight into hyper's buffer and check
            // the new bytes there.
            let start = buf.filled().len();
            std::task::ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
            let end = buf.filled().len();
            if end == start {
                return Poll::Ready(Ok(()));
            }
            match this.classify(&buf.filled()[start..]) {
                Step::All => return Poll::Ready(Ok(())),
                Step::Hold(n) => {
                    this.held.extend_from_slice(&buf.filled()[start + n..]);
                    buf.set_filled(start + n);
                    if n > 0 {
                        return Poll::Ready(Ok(()));
                    }
                }
                Step::Refuse(n, rejection) => {
                    buf.set_filled(start + n);
                    this.refuse(rejection);
                    if n > 0 {
                        return Poll::Ready(Ok(()));
                    }
                }
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for EdgeGuard<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
