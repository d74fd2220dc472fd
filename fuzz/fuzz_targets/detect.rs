//! Fuzz target `detect`: what the proxy decides from a connection's first bytes.
//!
//! Arbitrary bytes go through the outbound/inbound protocol detection (`detect::classify`, and
//! the async `detect::detect` reading them in chunks) and the inbound's mesh ClientHello check
//! (`inbound::mesh_hello_verdict`, and the async `inbound::is_mesh_hello`). Nothing may panic,
//! and a decision may not depend on how the bytes were split across reads: once a prefix is
//! decided, the whole input must be decided the same way.

#![no_main]

use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::runtime::Runtime;
use trellis_proxy::detect::{self, Detected, Protocol};
use trellis_proxy::inbound;

fuzz_target!(|data: &[u8]| {
    let whole = detect::classify(data);
    let verdict = inbound::mesh_hello_verdict(data);
    if data.first() != Some(&0x16) {
        assert_eq!(
            verdict,
            Some(false),
            "only a TLS handshake record can be a mesh hello"
        );
    }
    if whole == Some(Protocol::Http1) {
        assert!(
            data.contains(&b'\n'),
            "HTTP/1 decided before the request line ended"
        );
    }
    for end in prefix_ends(data.len()) {
        let prefix = &data[..end];
        if let Some(p) = detect::classify(prefix) {
            assert_eq!(
                whole,
                Some(p),
                "classify: the first {end} of {} bytes say {p:?}, all of them say {whole:?}",
                data.len()
            );
        }
        if let Some(v) = inbound::mesh_hello_verdict(prefix) {
            assert_eq!(
                verdict,
                Some(v),
                "mesh hello: the first {end} of {} bytes say {v}, all of them say {verdict:?}",
                data.len()
            );
        }
    }

    // The real async readers, fed in chunks and then EOF (never a timeout: the reader is always
    // ready), must agree with the pure functions.
    let chunk = chunk_size(data);
    let detected = runtime().block_on(async {
        let mut io = Chunked { data, chunk };
        let mut buf = BytesMut::new();
        detect::detect(&mut io, &mut buf, Duration::from_secs(5)).await
    });
    let expected = if data.is_empty() {
        Detected::Closed
    } else {
        Detected::Protocol(whole.unwrap_or(Protocol::Opaque))
    };
    assert_eq!(
        detected.expect("reading a slice cannot fail"),
        expected,
        "detect() in chunks of {chunk}"
    );

    let first = data.len().min(chunk);
    let mesh = runtime().block_on(async {
        let mut io = Chunked {
            data: &data[first..],
            chunk,
        };
        let mut buf = BytesMut::from(&data[..first]);
        inbound::is_mesh_hello(&mut io, &mut buf, Duration::from_secs(5)).await
    });
    assert_eq!(
        mesh.expect("reading a slice cannot fail"),
        verdict.unwrap_or(false),
        "is_mesh_hello() in chunks of {chunk}"
    );
});

/// Prefix lengths to check: every one for short inputs, about 64 spread over long ones (plus
/// the lengths around the 16 KiB limits both functions apply).
fn prefix_ends(len: usize) -> Vec<usize> {
    if len <= 64 {
        return (1..len).collect();
    }
    let step = len / 64;
    let mut ends: Vec<usize> = (1..len).step_by(step.max(1)).collect();
    for limit in [16 * 1024 - 1, 16 * 1024, 16 * 1024 + 1] {
        if limit < len {
            ends.push(limit);
        }
    }
    ends
}

/// A read size that varies with the input, so that splits land everywhere.
fn chunk_size(data: &[u8]) -> usize {
    let seed = data.iter().take(8).fold(data.len(), |acc, b| {
        acc.wrapping_mul(31).wrapping_add(usize::from(*b))
    });
    1 + seed % 700
}

fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime")
    })
}

/// Delivers `data` at most `chunk` bytes per read, then EOF.
struct Chunked<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = self.data.len().min(self.chunk).min(buf.remaining());
        let (head, tail) = self.data.split_at(n);
        buf.put_slice(head);
        self.data = tail;
        Poll::Ready(Ok(()))
    }
}
