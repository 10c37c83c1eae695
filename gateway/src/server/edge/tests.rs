use std::collections::VecDeque;

use futures_util::task::noop_waker;
use proptest::prelude::*;

use super::*;

fn creds() -> Arc<[HeaderName]> {
    Arc::from(vec![
        http::header::AUTHORIZATION,
        HeaderName::from_static("x-api-key"),
    ])
}

fn head(extra: &str) -> String {
    format!("POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n{extra}\r\n")
}

#[test]
fn heads_are_framed_or_refused() {
    use Framing::*;
    let ok = |extra: &str, framing: Framing| (head(extra), Ok(framing));
    let no = |extra: &str, r: Rejection| (head(extra), Err(r));
    let cases = [
        ok("", None),
        ok("content-length: 0\r\n", None),
        ok("content-length: 17\r\n", Length(17)),
        ok("Content-Length:  0017 \r\n", Length(17)),
        ok("transfer-encoding: chunked\r\n", Chunked),
        ok("Transfer-Encoding:  CHUNKED \r\n", Chunked),
        ok("authorization: Bearer sk-\u{e9}\r\n", None),
        no(
            "content-length: 5\r\ntransfer-encoding: chunked\r\n",
            Rejection::AmbiguousLength,
        ),
        no(
            "transfer-encoding: chunked\r\ncontent-length: 5\r\n",
            Rejection::AmbiguousLength,
        ),
        no(
            "transfer-encoding: gzip\r\ncontent-length: 5\r\n",
            Rejection::AmbiguousLength,
        ),
        no(
            "content-length: 5\r\ncontent-length: 5\r\n",
            Rejection::DuplicateLength,
        ),
        no(
            "content-length: 5\r\ncontent-length: 6\r\n",
            Rejection::DuplicateLength,
        ),
        no("content-length: 5, 5\r\n", Rejection::InvalidLength),
        no("content-length: +5\r\n", Rejection::InvalidLength),
        no("content-length: -1\r\n", Rejection::InvalidLength),
        no(
            "content-length: 99999999999999999999\r\n",
            Rejection::InvalidLength,
        ),
        no("content-length:\r\n", Rejection::InvalidLength),
        no(
            "transfer-encoding: gzip\r\n",
            Rejection::BadTransferEncoding,
        ),
        no(
            "transfer-encoding: chunked, gzip\r\n",
            Rejection::BadTransferEncoding,
        ),
        no(
            "authorization: Bearer sk-a\x01b\r\n",
            Rejection::Credentials,
        ),
        no("X-Api-Key: sk-a\x7fb\r\n", Rejection::Credentials),
        no("x-other: a\x01b\r\n", Rejection::Malformed),
        no("bad header\r\n", Rejection::Malformed),
        no(
            &(0..101)
                .map(|i| format!("x-h{i}: v\r\n"))
                .collect::<String>(),
            Rejection::HeadTooLarge,
        ),
    ];
    for (text, want) in cases {
        let got = match inspect(text.as_bytes(), 0, &creds()) {
            Head::Complete(len, framing) => {
                assert_eq!(len, text.len(), "{text:?}");
                Ok(framing)
            }
            Head::Refused(r) => Err(r),
            Head::Partial => panic!("partial: {text:?}"),
        };
        assert_eq!(got, want, "{text:?}");
    }
    let http10 = head("transfer-encoding: chunked\r\n").replace("HTTP/1.1", "HTTP/1.0");
    assert_eq!(
        inspect(http10.as_bytes(), 0, &creds()),
        Head::Refused(Rejection::BadTransferEncoding)
    );
    for partial in [
        "",
        "POST / HTTP/1.1\r\n",
        "POST / HTTP/1.1\r\nhost: gw\r\n",
        "\r\n\r\n",
    ] {
        assert_eq!(
            inspect(partial.as_bytes(), 0, &creds()),
            Head::Partial,
            "{partial:?}"
        );
    }
}

/// hyper takes `gzip` + `chunked` (on one line or two) as plain chunked,
/// silently ignoring the other coding; the guard accepts exactly one
/// `chunked` and nothing else.
#[test]
fn stacked_transfer_codings_are_refused() {
    for extra in [
        "transfer-encoding: gzip\r\ntransfer-encoding: chunked\r\n",
        "Transfer-Encoding: gzip, CHUNKED\r\n",
        "transfer-encoding: identity, chunked\r\n",
        "transfer-encoding: identity\r\ntransfer-encoding: chunked\r\n",
        "transfer-encoding: chunked, chunked\r\n",
        "transfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n",
        "transfer-encoding: chunked\r\ntransfer-encoding: gzip\r\n",
        "transfer-encoding: , chunked\r\n",
        "transfer-encoding: chunked,\r\n",
        "transfer-encoding:\r\ntransfer-encoding: chunked\r\n",
        "transfer-encoding: chunked;q=1\r\n",
    ] {
        let text = head(extra);
        assert_eq!(
            inspect(text.as_bytes(), 0, &creds()),
            Head::Refused(Rejection::BadTransferEncoding),
            "{text:?}"
        );
    }
    for extra in [
        "transfer-encoding: chunked\r\n",
        "Transfer-Encoding: Chunked\r\n",
        "TRANSFER-ENCODING:\tchunked \t\r\n",
    ] {
        let text = head(extra);
        assert_eq!(
            inspect(text.as_bytes(), 0, &creds()),
            Head::Complete(text.len(), Framing::Chunked),
            "{text:?}"
        );
    }
}

/// hyper (and httparse) take a bare LF as a line end; the guard wants
/// CRLF on the request line, every header line and the blank line.
#[test]
fn bare_lf_line_ends_are_refused() {
    let crlf = head("content-length: 2\r\n");
    assert_eq!(
        inspect(crlf.as_bytes(), 0, &creds()),
        Head::Complete(crlf.len(), Framing::Length(2))
    );
    let cases = [
        crlf.replace("\r\n", "\n"),
        crlf.replacen("HTTP/1.1\r\n", "HTTP/1.1\n", 1),
        crlf.replacen("host: gw\r\n", "host: gw\n", 1),
        crlf.replacen("content-length: 2\r\n", "content-length: 2\n", 1),
        format!("{}\n", crlf.strip_suffix("\r\n").unwrap()),
        format!("\n{crlf}"),
        "GET / HTTP/1.1\nhost: gw\n\n".to_string(),
        "GET /healthz HTTP/1.0\nhost: gw\n\n".to_string(),
    ];
    for text in cases {
        assert_eq!(
            inspect(text.as_bytes(), 0, &creds()),
            Head::Refused(Rejection::BareLf),
            "{text:?}"
        );
    }
    // Through the guard, after valid requests, whole or byte by byte: the
    // valid ones pass, the bare-LF head becomes the stand-in.
    let mut attack = pipeline();
    attack.extend_from_slice(b"GET /v1/models HTTP/1.1\nhost: gw\n\n");
    let mut want = pipeline();
    want.extend_from_slice(&Rejection::BareLf.stand_in());
    assert_eq!(
        read_through(vec![attack.clone()], 8192),
        (want.clone(), false)
    );
    let one_by_one = attack.iter().map(|b| vec![*b]).collect();
    assert_eq!(read_through(one_by_one, 8192), (want, false));
}

#[test]
fn rejections_round_trip_through_the_stand_in() {
    for r in Rejection::ALL {
        let stand_in = r.stand_in();
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut req = httparse::Request::new(&mut headers);
        assert!(req.parse(&stand_in).unwrap().is_complete());
        let mut map = HeaderMap::new();
        for h in req.headers.iter() {
            map.append(
                HeaderName::from_bytes(h.name.as_bytes()).unwrap(),
                http::HeaderValue::from_bytes(h.value).unwrap(),
            );
        }
        assert_eq!(Rejection::of(&map), Some(r));
        assert_eq!(map["connection"], "close");
    }
    assert_eq!(Rejection::of(&HeaderMap::new()), None);
    assert_eq!(Rejection::Credentials.error().status(), 401);
    assert_eq!(Rejection::HeadTooLarge.error().status(), 431);
    assert_eq!(Rejection::AmbiguousLength.error().status(), 400);
}

/// A chunked body with extensions and trailers, as hyper accepts it.
const CHUNKED: &[u8] =
    b"5\r\nhello\r\n6;ext=1\r\n world\r\nA \r\n0123456789\r\n0\r\nx-trailer: t\r\n\r\n";

#[test]
fn chunked_bodies_end_where_hyper_ends_them() {
    for split in 0..CHUNKED.len() {
        let mut body = ChunkedBody::new();
        let (a, b) = CHUNKED.split_at(split);
        assert_eq!(body.feed(a), Fed::More, "split {split}");
        let mut b = b.to_vec();
        b.extend_from_slice(b"GET / HTTP/1.1\r\n");
        assert_eq!(
            body.feed(&b),
            Fed::Done(CHUNKED.len() - split),
            "split {split}"
        );
    }
    assert_eq!(ChunkedBody::new().feed(b"0\r\n\r\n"), Fed::Done(5));
    for bad in [
        &b"x\r\n"[..],
        b"5\nhello",
        b"5\r\nhelloXX",
        b"5 5\r\n",
        b"1;a\n",
        b"ffffffffffffffffff\r\n",
        b"0\r\n\r\r",
    ] {
        assert_eq!(ChunkedBody::new().feed(bad), Fed::Invalid, "{bad:?}");
    }
}

/// A client that delivers `chunks` one per read, then ends.
struct Script(VecDeque<Vec<u8>>);

impl AsyncRead for Script {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(mut chunk) = self.0.pop_front() {
            let n = chunk.len().min(buf.remaining());
            buf.put_slice(&chunk[..n]);
            if n < chunk.len() {
                self.0.push_front(chunk.split_off(n));
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Everything hyper would read through the guard, in reads of at most
/// `read_size` bytes; `true` if the stream ended (rather than staying
/// open after a stand-in).
fn read_through(chunks: Vec<Vec<u8>>, read_size: usize) -> (Vec<u8>, bool) {
    let mut guard = EdgeGuard::new(Script(chunks.into()), creds());
    let waker = noop_waker();
    let mut cx = Context::from_waker(&waker);
    let mut out = Vec::new();
    for _ in 0..100_000 {
        let mut space = vec![0u8; read_size];
        let mut buf = ReadBuf::new(&mut space);
        match Pin::new(&mut guard).poll_read(&mut cx, &mut buf) {
            Poll::Ready(Ok(())) if buf.filled().is_empty() => return (out, true),
            Poll::Ready(Ok(())) => out.extend_from_slice(buf.filled()),
            Poll::Ready(Err(e)) => panic!("{e}"),
            Poll::Pending => return (out, false),
        }
    }
    panic!("no end")
}

fn split(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    cuts.sort_unstable();
    let mut chunks = Vec::new();
    let mut from = 0;
    for c in cuts.into_iter().chain([bytes.len()]) {
        chunks.push(bytes[from..c].to_vec());
        from = c;
    }
    chunks.retain(|c| !c.is_empty());
    chunks
}

/// Valid requests of every framing, back to back.
fn pipeline() -> Vec<u8> {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(head("content-length: 11\r\n").as_bytes());
    bytes.extend_from_slice(b"{\"a\":\"\r\n\r\"}");
    bytes.extend_from_slice(head("transfer-encoding: chunked\r\n").as_bytes());
    bytes.extend_from_slice(CHUNKED);
    bytes.extend_from_slice(b"GET /v1/models HTTP/1.1\r\nhost: gw\r\n\r\n");
    bytes.extend_from_slice(b"GET /healthz HTTP/1.0\r\nhost: gw\r\n\r\n");
    bytes
}

#[test]
fn valid_streams_pass_unchanged_and_refused_heads_become_stand_ins() {
    let valid = pipeline();
    assert_eq!(
        read_through(vec![valid.clone()], 8192),
        (valid.clone(), true)
    );
    assert_eq!(read_through(vec![valid.clone()], 7), (valid.clone(), true));
    let one_by_one = valid.iter().map(|b| vec![*b]).collect();
    assert_eq!(read_through(one_by_one, 8192), (valid.clone(), true));

    // A smuggling attempt after the valid requests: they pass, the refused
    // head becomes the stand-in, and what follows is never handed over.
    let mut attack = valid.clone();
    attack
        .extend_from_slice(head("content-length: 30\r\ntransfer-encoding: chunked\r\n").as_bytes());
    attack.extend_from_slice(b"0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n");
    let mut want = valid.clone();
    want.extend_from_slice(&Rejection::AmbiguousLength.stand_in());
    assert_eq!(
        read_through(vec![attack.clone()], 8192),
        (want.clone(), false)
    );
    assert_eq!(read_through(vec![attack], 5), (want, false));

    // Stacked codings after the valid requests: the same.
    let mut stacked = valid.clone();
    stacked.extend_from_slice(
        head("transfer-encoding: gzip\r\ntransfer-encoding: chunked\r\n").as_bytes(),
    );
    stacked.extend_from_slice(b"0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n");
    let mut want = valid.clone();
    want.extend_from_slice(&Rejection::BadTransferEncoding.stand_in());
    assert_eq!(
        read_through(vec![stacked.clone()], 8192),
        (want.clone(), false)
    );
    assert_eq!(read_through(vec![stacked], 3), (want, false));

    // HTTP/2 passes untouched, even where it looks like a bad HTTP/1 head.
    let mut h2 = H2_PREFACE.to_vec();
    h2.extend_from_slice(b"\0\0\0\x04\0\0\0\0\0content-length: 1\r\ntransfer-encoding: x\r\n\r\n");
    assert_eq!(read_through(split(&h2, &[3, 20]), 8192), (h2.clone(), true));

    // A head that never ends is refused at the limit, whole or dribbled.
    let mut huge = head(&format!("x-pad: {}", "p".repeat(MAX_HEADER_BYTES)));
    huge.truncate(MAX_HEADER_BYTES + 10);
    let stand_in = Rejection::HeadTooLarge.stand_in();
    assert_eq!(
        read_through(vec![huge.clone().into_bytes()], 8192),
        (stand_in.clone(), false)
    );
    let dribbled = huge.as_bytes().chunks(100).map(<[u8]>::to_vec).collect();
    assert_eq!(read_through(dribbled, 8192), (stand_in, false));

    // A client leaving mid-head: the stream just ends.
    assert_eq!(
        read_through(vec![b"GET / HT".to_vec()], 8192),
        (Vec::new(), true)
    );
    // A broken chunked body: handed over as is (hyper refuses it).
    let mut broken = head("transfer-encoding: chunked\r\n").into_bytes();
    broken.extend_from_slice(b"zz\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n");
    assert_eq!(read_through(vec![broken.clone()], 8192), (broken, true));
}

proptest! {
    #[test]
    fn any_split_of_a_valid_stream_passes_unchanged(
        cuts in proptest::collection::vec(0usize..10_000, 0..12),
        read_size in 1usize..600,
    ) {
        let valid = pipeline();
        prop_assert_eq!(read_through(split(&valid, &cuts), read_size), (valid, true));
    }

    #[test]
    fn any_split_of_an_attack_yields_the_same_stand_in(
        cuts in proptest::collection::vec(0usize..10_000, 0..12),
        read_size in 1usize..600,
    ) {
        let mut attack = pipeline();
        attack.extend_from_slice(head("transfer-encoding: chunked\r\ncontent-length: 5\r\n").as_bytes());
        attack.extend_from_slice(b"0\r\n\r\n");
        let mut want = pipeline();
        want.extend_from_slice(&Rejection::AmbiguousLength.stand_in());
        prop_assert_eq!(read_through(split(&attack, &cuts), read_size), (want, false));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048), cuts in proptest::collection::vec(0usize..2048, 0..8)) {
        let _ = read_through(split(&bytes, &cuts), 512);
    }
}
