//! The opaque byte copy between a client and its upstream, in both directions, holding no
//! buffer while the connection is idle.
//!
//! `tokio::io::copy_bidirectional` keeps an 8 KiB buffer per direction for the connection's
//! whole life: 16 KiB per idle connection per proxy, which for a sidecar holding thousands of
//! long-lived connections (databases, brokers) is most of its memory. Here each read goes into a
//! buffer on the thread's stack and is written on at once; only the bytes the writer could not
//! take yet are copied to the heap, and that allocation is released as soon as they are sent.
//! Half-close is kept: when one side finishes sending, the other side's write half is shut
//! down and the copy continues the other way until it finishes too.

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes read per `poll_read` (on the stack, not per connection): a full TLS record.
const CHUNK: usize = 16 * 1024;

/// Copies `a` → `b` and `b` → `a` until both directions have finished; returns the bytes
/// copied each way (`a` → `b`, `b` → `a`).
pub async fn bidirectional<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (mut a_to_b, mut b_to_a) = (Half::default(), Half::default());
    let (mut sent, mut received) = (None, None);
    poll_fn(|cx| {
        if sent.is_none()
            && let Poll::Ready(n) = a_to_b.poll_copy(cx, Pin::new(&mut *a), Pin::new(&mut *b))?
        {
            sent = Some(n);
        }
        if received.is_none()
            && let Poll::Ready(n) = b_to_a.poll_copy(cx, Pin::new(&mut *b), Pin::new(&mut *a))?
        {
            received = Some(n);
        }
        match (sent, received) {
            (Some(s), Some(r)) => Poll::Ready(Ok((s, r))),
            _ => Poll::Pending,
        }
    })
    .await
}

/// One direction's state.
#[derive(Default)]
struct Half {
    /// Bytes read but not yet accepted by the writer; empty (no allocation) otherwise.
    pending: Vec<u8>,
    /// How much of `pending` is written.
    pos: usize,
    /// Bytes were written since the last flush.
    need_flush: bool,
    /// The reader reached end of stream: what is left is to shut the writer down.
    read_done: bool,
    copied: u64,
}

impl Half {
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            while self.pos < self.pending.len() {
                let n = ready!(writer.as_mut().poll_write(cx, &self.pending[self.pos..]))?;
                self.wrote(n)?;
                self.pos += n;
            }
            if self.pending.capacity() > 0 {
                self.pending = Vec::new();
                self.pos = 0;
            }
            if self.read_done {
                ready!(writer.as_mut().poll_shutdown(cx))?;
                return Poll::Ready(Ok(self.copied));
            }

            let mut stack = [const { MaybeUninit::<u8>::uninit() }; CHUNK];
            let mut buf = ReadBuf::uninit(&mut stack);
            if reader.as_mut().poll_read(cx, &mut buf)?.is_pending() {
                // Nothing more to read for now: push out what was written (TLS buffers a
                // record until flushed).
                if self.need_flush {
                    ready!(writer.as_mut().poll_flush(cx))?;
                    self.need_flush = false;
                }
                return Poll::Pending;
            }
            let data = buf.filled();
            if data.is_empty() {
                self.read_done = true;
                continue;
            }
            let mut off = 0;
            while off < data.len() {
                match writer.as_mut().poll_write(cx, &data[off..])? {
                    Poll::Ready(n) => {
                        self.wrote(n)?;
                        off += n;
                    }
                    Poll::Pending => {
                        // The writer is full: keep the rest until it drains (woken by it).
                        self.pending.extend_from_slice(&data[off..]);
                        self.pos = 0;
                        return Poll::Pending;
                    }
                }
            }
        }
    }

    fn wrote(&mut self, n: usize) -> io::Result<()> {
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "the peer accepted no bytes",
            ));
        }
        self.copied += n as u64;
        self.need_flush = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    /// Large transfers through small pipes (the writer is often full), both ways at once,
    /// with half-close: every byte arrives in order and the counts are exact.
    #[tokio::test]
    async fn copies_both_ways_through_full_pipes() {
        let (client, mut proxy_client) = duplex(1024);
        let (mut proxy_upstream, mut upstream) = duplex(777);
        let proxy =
            tokio::spawn(
                async move { bidirectional(&mut proxy_client, &mut proxy_upstream).await },
            );
        let up: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..150_000u32).map(|i| (i % 241) as u8).collect();
        let (up2, down2) = (up.clone(), down.clone());
        let client_task = tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(client);
            let writer = async {
                w.write_all(&up2).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let mut got = Vec::new();
            let reader = r.read_to_end(&mut got);
            let (_, n) = tokio::join!(writer, reader);
            n.unwrap();
            got
        });
        let upstream_task = tokio::spawn(async move {
            let mut got = Vec::new();
            upstream.read_to_end(&mut got).await.unwrap();
            upstream.write_all(&down2).await.unwrap();
            upstream.shutdown().await.unwrap();
            got
        });
        let at_upstream = upstream_task.await.unwrap();
        let at_client = client_task.await.unwrap();
        assert_eq!(at_upstream, up);
        assert_eq!(at_client, down);
        assert_eq!(proxy.await.unwrap().unwrap(), (200_000, 150_000));
    }

    /// After a burst the writer could not take at once, the leftover buffer is released.
    #[test]
    fn releases_the_leftover_once_written() {
        let mut half = Half {
            pending: vec![1, 2, 3],
            ..Half::default()
        };
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut reader: &[u8] = &[];
        let mut writer = Vec::new();
        let done = half.poll_copy(&mut cx, Pin::new(&mut reader), Pin::new(&mut writer));
        assert!(matches!(done, Poll::Ready(Ok(3))));
        assert_eq!(writer, [1, 2, 3]);
        assert_eq!(half.pending.capacity(), 0);
    }
}
