//! Small I/O adapters used on accepted connections.
//!
//! - [`PrefixedIo`] replays the bytes protocol detection already read, then reads the socket.
//! - [`CountingIo`] adds every byte read and written to the connection's metrics.
//! - [`BoxIo`] is the type-erased stream the transport hands out, so that TLS can wrap it later
//!   without changing the HTTP and TCP forwarding code.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A bidirectional byte stream.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

pub type BoxIo = Box<dyn Io>;

pin_project_lite::pin_project! {
    /// Reads `prefix` first, then `io`. Writes go straight to `io`.
    pub struct PrefixedIo<T> {
        prefix: Bytes,
        #[pin]
        io: T,
    }
}

impl<T> PrefixedIo<T> {
    pub fn new(prefix: Bytes, io: T) -> Self {
        Self { prefix, io }
    }
}

impl<T: AsyncRead> AsyncRead for PrefixedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if this.prefix.has_remaining() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            if !this.prefix.has_remaining() {
                // `advance` keeps the detection buffer alive; a connection that then idles
                // for hours should not hold its first read's allocation.
                *this.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        this.io.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite> AsyncWrite for PrefixedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

/// When a connection last carried a byte, for idle timeouts.
#[derive(Clone, Default)]
pub struct Activity(Arc<AtomicU64>);

fn clock() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

impl Activity {
    pub fn new() -> Self {
        let a = Self::default();
        a.touch();
        a
    }

    pub fn touch(&self) {
        self.0.store(clock(), Ordering::Relaxed);
    }

    pub fn idle_for(&self) -> Duration {
        Duration::from_millis(clock().saturating_sub(self.0.load(Ordering::Relaxed)))
    }

    /// Completes once the connection has been idle for `limit` (never, for `None`).
    pub async fn expired(&self, limit: Option<Duration>) {
        let Some(limit) = limit else {
            return std::future::pending().await;
        };
        loop {
            let idle = self.idle_for();
            if idle >= limit {
                return;
            }
            tokio::time::sleep(limit - idle).await;
        }
    }
}

pin_project_lite::pin_project! {
    /// Counts the bytes that pass through `io`, and notes when they last did.
    pub struct CountingIo<T> {
        #[pin]
        io: T,
        read: Counter,
        written: Counter,
        activity: Activity,
    }
}

impl<T> CountingIo<T> {
    pub fn new(io: T, read: Counter, written: Counter, activity: Activity) -> Self {
        Self {
            io,
            read,
            written,
            activity,
        }
    }
}

impl<T: AsyncRead> AsyncRead for CountingIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let res = this.io.poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.read.inc_by(n as u64);
            this.activity.touch();
        }
        res
    }
}

impl<T: AsyncWrite> AsyncWrite for CountingIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let res = this.io.poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            this.written.inc_by(n as u64);
            this.activity.touch();
        }
        res
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let res = this.io.poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = res {
            this.written.inc_by(n as u64);
            this.activity.touch();
        }
        res
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn prefixed_io_replays_the_prefix_then_reads_the_stream() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b" world").await.unwrap();
        drop(a);
        let mut io = PrefixedIo::new(Bytes::from_static(b"hello"), b);
        let mut out = String::new();
        io.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }

    #[tokio::test]
    async fn counting_io_counts_both_directions() {
        let (mut a, b) = tokio::io::duplex(64);
        let (read, written) = (Counter::default(), Counter::default());
        let mut io = CountingIo::new(b, read.clone(), written.clone(), Activity::new());
        a.write_all(b"12345").await.unwrap();
        let mut buf = [0u8; 5];
        io.read_exact(&mut buf).await.unwrap();
        io.write_all(b"abc").await.unwrap();
        assert_eq!((read.get(), written.get()), (5, 3));
    }
}
