//! Decoding of compressed upstream responses, so that the meter reads the
//! real body.
//!
//! On a metered route the gateway asks the upstream for
//! `accept-encoding: identity`. An upstream (or an nginx or CDN in front of
//! it) may compress anyway; `gzip` and `deflate` are then decoded as they
//! stream by and forwarded decoded (without `content-encoding`). Any other
//! coding (`br`, `zstd`, a chain) cannot be metered, and such a response
//! is refused as an upstream failure rather than forwarded uncounted.

use std::io::Write;

use bytes::Bytes;
use flate2::write::{DeflateDecoder, MultiGzDecoder, ZlibDecoder};
use http::header::{HeaderMap, CONTENT_ENCODING};

/// A streaming decoder for one response body.
pub enum ContentDecoder {
    Gzip(MultiGzDecoder<Vec<u8>>),
    /// HTTP's `deflate` is zlib (RFC 1950); some servers send raw deflate
    /// (RFC 1951). Which one is known from the first bytes.
    Deflate(Option<DeflateKind>),
}

pub enum DeflateKind {
    Zlib(ZlibDecoder<Vec<u8>>),
    Raw(DeflateDecoder<Vec<u8>>),
}

impl std::fmt::Debug for ContentDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ContentDecoder::Gzip(_) => "ContentDecoder::Gzip",
            ContentDecoder::Deflate(_) => "ContentDecoder::Deflate",
        })
    }
}

/// A `content-encoding` the gateway cannot decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported(pub String);

impl ContentDecoder {
    /// The decoder a response needs: `Ok(None)` when it is not encoded.
    pub fn for_headers(headers: &HeaderMap) -> Result<Option<Self>, Unsupported> {
        let mut codings = Vec::new();
        for v in headers.get_all(CONTENT_ENCODING) {
            let s = v.to_str().map_err(|_| Unsupported("<not text>".into()))?;
            codings.extend(
                s.split(',')
                    .map(|c| c.trim().to_ascii_lowercase())
                    .filter(|c| !c.is_empty() && c != "identity"),
            );
        }
        match codings.as_slice() {
            [] => Ok(None),
            [one] if one == "gzip" || one == "x-gzip" => {
                Ok(Some(Self::Gzip(MultiGzDecoder::new(Vec::new()))))
            }
            [one] if one == "deflate" => Ok(Some(Self::Deflate(None))),
            _ => Err(Unsupported(codings.join(", "))),
        }
    }

    /// Decode a chunk; returns what it decoded to (possibly nothing yet).
    pub fn feed(&mut self, chunk: &[u8]) -> std::io::Result<Bytes> {
        match self {
            Self::Gzip(d) => {
                d.write_all(chunk)?;
                Ok(Bytes::from(std::mem::take(d.get_mut())))
            }
            Self::Deflate(kind) => {
                let k = match kind {
                    Some(k) => k,
                    None => {
                        if chunk.is_empty() {
                            return Ok(Bytes::new());
                        }
                        kind.insert(if looks_like_zlib(chunk) {
                            DeflateKind::Zlib(ZlibDecoder::new(Vec::new()))
                        } else {
                            DeflateKind::Raw(DeflateDecoder::new(Vec::new()))
                        })
                    }
                };
                match k {
                    DeflateKind::Zlib(d) => {
                        d.write_all(chunk)?;
                        Ok(Bytes::from(std::mem::take(d.get_mut())))
                    }
                    DeflateKind::Raw(d) => {
                        d.write_all(chunk)?;
                        Ok(Bytes::from(std::mem::take(d.get_mut())))
                    }
                }
            }
        }
    }

    /// The body ended: whatever the decoder still holds.
    pub fn finish(&mut self) -> std::io::Result<Bytes> {
        let out = match self {
            Self::Gzip(d) => {
                d.try_finish()?;
                std::mem::take(d.get_mut())
            }
            Self::Deflate(None) => Vec::new(),
            Self::Deflate(Some(DeflateKind::Zlib(d))) => {
                d.try_finish()?;
                std::mem::take(d.get_mut())
            }
            Self::Deflate(Some(DeflateKind::Raw(d))) => {
                d.try_finish()?;
                std::mem::take(d.get_mut())
            }
        };
        Ok(Bytes::from(out))
    }
}

/// A zlib stream starts with CMF (method 8) and FLG such that
/// `(CMF * 256 + FLG) % 31 == 0`. A lone first byte is taken as zlib if its
/// method nibble says deflate.
fn looks_like_zlib(b: &[u8]) -> bool {
    match b {
        [cmf, flg, ..] => cmf & 0x0f == 8 && (u16::from(*cmf) * 256 + u16::from(*flg)) % 31 == 0,
        [cmf] => cmf & 0x0f == 8,
        [] => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::{DeflateEncoder, GzEncoder, ZlibEncoder};
    use flate2::Compression;

    fn headers(enc: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_ENCODING, enc.parse().unwrap());
        h
    }

    fn decode_in_pieces(enc: &str, data: &[u8], piece: usize) -> Vec<u8> {
        let mut d = ContentDecoder::for_headers(&headers(enc)).unwrap().unwrap();
        let mut out = Vec::new();
        for c in data.chunks(piece) {
            out.extend_from_slice(&d.feed(c).unwrap());
        }
        out.extend_from_slice(&d.finish().unwrap());
        out
    }

    #[test]
    fn gzip_zlib_and_raw_deflate_decode_split_anywhere() {
        let text = br#"{"usage":{"total_tokens":42}}"#.repeat(50);
        let mut gz = GzEncoder::new(Vec::new(), Compression::default());
        gz.write_all(&text).unwrap();
        let gz = gz.finish().unwrap();
        let mut zl = ZlibEncoder::new(Vec::new(), Compression::default());
        zl.write_all(&text).unwrap();
        let zl = zl.finish().unwrap();
        let mut raw = DeflateEncoder::new(Vec::new(), Compression::default());
        raw.write_all(&text).unwrap();
        let raw = raw.finish().unwrap();
        for piece in [1, 2, 7, 1000] {
            assert_eq!(decode_in_pieces("gzip", &gz, piece), text);
            assert_eq!(decode_in_pieces("x-gzip", &gz, piece), text);
            assert_eq!(decode_in_pieces("deflate", &zl, piece), text);
            assert_eq!(decode_in_pieces("deflate", &raw, piece), text);
        }
    }

    #[test]
    fn identity_is_no_decoder_and_other_codings_are_refused() {
        assert!(ContentDecoder::for_headers(&HeaderMap::new())
            .unwrap()
            .is_none());
        assert!(ContentDecoder::for_headers(&headers("identity"))
            .unwrap()
            .is_none());
        assert_eq!(
            ContentDecoder::for_headers(&headers("br")).unwrap_err(),
            Unsupported("br".into())
        );
        assert!(ContentDecoder::for_headers(&headers("gzip, gzip")).is_err());
        assert!(ContentDecoder::for_headers(&headers("zstd")).is_err());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut d = ContentDecoder::for_headers(&headers("gzip"))
            .unwrap()
            .unwrap();
        let r = d.feed(b"this is not gzip at all").and_then(|_| d.finish());
        assert!(r.is_err());
    }
}
