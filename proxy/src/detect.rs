//! Protocol detection: HTTP/1.x, HTTP/2 (prior knowledge) or opaque TCP.
//!
//! The first bytes a client sends decide: an HTTP/2 connection preface, an HTTP/1 request line,
//! or anything else (TLS from the app, a database protocol) which is forwarded byte for byte.
//! Binary protocols are recognised from their first byte, so they never wait. A client that sends
//! nothing (server-speaks-first protocols such as SMTP or MySQL) is forwarded as opaque TCP once
//! the detect timeout passes; ports known to be server-first skip detection entirely.
//! The bytes read here are replayed to the forwarder, never lost.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A request line longer than this is not worth waiting for: forward as opaque.
const MAX_REQUEST_LINE: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Opaque,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http1 => "http1",
            Self::Http2 => "http2",
            Self::Opaque => "opaque",
        }
    }
}

/// The outcome of reading a connection's first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Protocol(Protocol),
    /// The client sent nothing, or an incomplete request line, within the timeout.
    Timeout {
        bytes_read: usize,
    },
    /// The client closed the connection before sending anything.
    Closed,
}

/// Reads from `io` into `buf` until the protocol is known or `timeout` has passed.
pub async fn detect<I: AsyncRead + Unpin>(
    io: &mut I,
    buf: &mut BytesMut,
    timeout: Duration,
) -> std::io::Result<Detected> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096);
        }
        let read = tokio::time::timeout_at(deadline, io.read_buf(buf)).await;
        match read {
            Err(_elapsed) => {
                return Ok(Detected::Timeout {
                    bytes_read: buf.len(),
                });
            }
            Ok(Err(e)) => return Err(e),
            Ok(Ok(0)) if buf.is_empty() => return Ok(Detected::Closed),
            // EOF after some bytes: whatever they are, they are not a full HTTP request line.
            Ok(Ok(0)) => {
                return Ok(Detected::Protocol(
                    classify(buf).unwrap_or(Protocol::Opaque),
                ));
            }
            Ok(Ok(_)) => {
                if let Some(protocol) = classify(buf) {
                    return Ok(Detected::Protocol(protocol));
                }
            }
        }
    }
}

/// Decides the protocol from the bytes so far, or `None` if more are needed.
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    if buf.is_empty() {
        return None;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if buf.len() >= H2_PREFACE.len() {
            Some(Protocol::Http2)
        } else {
            None
        };
    }
    classify_http1(buf)
}

/// `METHOD SP request-target SP HTTP/1.x CRLF`, judged as early as the bytes allow.
fn classify_http1(buf: &[u8]) -> Option<Protocol> {
    let line_end = buf.iter().position(|&b| b == b'\n');
    let line = match line_end {
        Some(end) => &buf[..end],
        None => buf,
    };
    let method_len = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
    // Methods are tokens; every real one is upper case ASCII. Anything else cannot be HTTP/1.
    if method_len > 20
        || !line[..method_len]
            .iter()
            .all(|b| b.is_ascii_uppercase() || *b == b'-' || *b == b'_')
    {
        return Some(Protocol::Opaque);
    }
    match line_end {
        None if buf.len() > MAX_REQUEST_LINE => Some(Protocol::Opaque),
        None => None,
        // The same limit when the line's end arrived in the same read: the verdict must not
        // depend on how the bytes were split across reads.
        Some(end) if end > MAX_REQUEST_LINE => Some(Protocol::Opaque),
        Some(_) => {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let is_http1 = method_len > 0
                && line.len() > method_len + 1
                && (line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0"));
            Some(if is_http1 {
                Protocol::Http1
            } else {
                Protocol::Opaque
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn recognises_http1_request_lines() {
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nHost: a\r\n"),
            Some(Protocol::Http1)
        );
        assert_eq!(classify(b"POST /x?y=1 HTTP/1.0\r\n"), Some(Protocol::Http1));
        assert_eq!(
            classify(b"GET / HTT"),
            None,
            "an incomplete line waits for more"
        );
        assert_eq!(classify(b"GET / SMTP/1.0\r\n"), Some(Protocol::Opaque));
    }

    #[test]
    fn an_overlong_request_line_is_opaque_however_it_arrives() {
        // Found by fuzzing (fuzz/corpus/detect/long-request-line): the first 16 KiB alone were
        // judged opaque, the same line read at once HTTP/1.
        let line = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(17_000));
        let bytes = line.as_bytes();
        assert_eq!(
            classify(&bytes[..MAX_REQUEST_LINE + 1]),
            Some(Protocol::Opaque)
        );
        assert_eq!(classify(bytes), Some(Protocol::Opaque));
        let fits = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_REQUEST_LINE - 20));
        assert_eq!(classify(fits.as_bytes()), Some(Protocol::Http1));
    }

    #[test]
    fn recognises_the_http2_preface() {
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(&H2_PREFACE[..10]), None);
        assert_eq!(
            classify(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"),
            Some(Protocol::Opaque)
        );
    }

    #[test]
    fn binary_protocols_are_decided_from_the_first_byte() {
        assert_eq!(
            classify(&[0x16, 0x03, 0x01]),
            Some(Protocol::Opaque),
            "TLS ClientHello"
        );
        assert_eq!(classify(b"\x00\x00\x00\x08"), Some(Protocol::Opaque));
        assert_eq!(
            classify(b"hello"),
            Some(Protocol::Opaque),
            "lower case is not a method"
        );
    }

    #[tokio::test]
    async fn a_silent_client_times_out_to_opaque() {
        let (_client, mut server) = tokio::io::duplex(64);
        let mut buf = BytesMut::new();
        let got = detect(&mut server, &mut buf, Duration::from_millis(30))
            .await
            .unwrap();
        assert_eq!(got, Detected::Timeout { bytes_read: 0 });
    }

    #[tokio::test]
    async fn a_request_line_split_across_reads_is_detected() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            client.write_all(b"GET /a HT").await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            client.write_all(b"TP/1.1\r\n\r\n").await.unwrap();
            client
        });
        let mut buf = BytesMut::new();
        let got = detect(&mut server, &mut buf, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(got, Detected::Protocol(Protocol::Http1));
        assert_eq!(&buf[..], b"GET /a HTTP/1.1\r\n\r\n");
        drop(writer.await.unwrap());
    }
}
