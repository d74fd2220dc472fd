//! A request body that can be sent again: frames are kept, up to a limit, as the first attempt
//! streams them, so that a retry replays what was sent and then continues with what the client
//! has not sent yet. Nothing is read ahead: a streaming request is never delayed.
//!
//! A body declared larger than the limit (Content-Length) is never kept; one that turns out
//! larger is dropped from the buffer as soon as it passes the limit. Either way
//! [`ReplayBody::try_clone`] then returns `None` and the request is not retried once it may have
//! started.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use crate::http::{BoxBody, BoxError};

pub struct ReplayBody {
    shared: Arc<Mutex<Shared>>,
    /// Index of the next buffered frame this copy replays.
    pos: usize,
    trailers_sent: bool,
}

struct Shared {
    limit: usize,
    buffered: Vec<Bytes>,
    buffered_len: usize,
    /// Too large to keep: no more replays.
    overflow: bool,
    /// What the client has not sent yet; `None` once it has all been read.
    rest: Option<BoxBody>,
    trailers: Option<HeaderMap>,
    exact_len: Option<u64>,
}

impl ReplayBody {
    pub fn new(body: BoxBody, limit: u64, declared_len: Option<u64>) -> Self {
        let overflow = declared_len.is_some_and(|n| n > limit);
        let exact_len = body.size_hint().exact();
        let rest = if body.is_end_stream() {
            None
        } else {
            Some(body)
        };
        Self {
            shared: Arc::new(Mutex::new(Shared {
                limit: limit as usize,
                buffered: Vec::new(),
                buffered_len: 0,
                overflow,
                rest,
                trailers: None,
                exact_len,
            })),
            pos: 0,
            trailers_sent: false,
        }
    }

    /// A copy that replays from the start, unless the body was too large to keep.
    pub fn try_clone(&self) -> Option<Self> {
        let shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        if shared.overflow {
            return None;
        }
        Some(Self {
            shared: self.shared.clone(),
            pos: 0,
            trailers_sent: false,
        })
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let mut s = this.shared.lock().unwrap_or_else(|p| p.into_inner());
        if !s.overflow && this.pos < s.buffered.len() {
            let chunk = s.buffered[this.pos].clone();
            this.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        let Some(rest) = s.rest.as_mut() else {
            if !this.trailers_sent {
                this.trailers_sent = true;
                if let Some(t) = s.trailers.clone() {
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
            }
            return Poll::Ready(None);
        };
        let frame = ready!(Pin::new(rest).poll_frame(cx));
        match frame {
            None => {
                s.rest = None;
                this.trailers_sent = true;
                Poll::Ready(None)
            }
            Some(Err(e)) => {
                // The client's side failed: nothing consistent is left to replay.
                s.overflow = true;
                s.buffered.clear();
                Poll::Ready(Some(Err(e)))
            }
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    if !s.overflow && s.buffered_len + data.len() <= s.limit {
                        s.buffered_len += data.len();
                        s.buffered.push(data.clone());
                        this.pos = s.buffered.len();
                    } else if !s.overflow {
                        s.overflow = true;
                        s.buffered = Vec::new();
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    s.trailers = Some(t.clone());
                    s.rest = None;
                    this.trailers_sent = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let s = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        s.rest.is_none()
            && (s.overflow || self.pos >= s.buffered.len())
            && (self.trailers_sent || s.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        let s = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        match s.exact_len {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn chunks(parts: &[&'static str]) -> BoxBody {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
    }

    async fn read_all(body: ReplayBody) -> String {
        String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_retry_replays_what_was_sent_then_continues() {
        let mut first = ReplayBody::new(chunks(&["ab", "cd", "ef"]), 1024, None);
        let retry = first.try_clone().unwrap();
        // The first attempt sends one frame and fails.
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "ab");
        drop(first);
        assert_eq!(read_all(retry).await, "abcdef");
    }

    #[tokio::test]
    async fn bodies_over_the_limit_are_not_replayable() {
        let first = ReplayBody::new(chunks(&["0123456789", "0123456789"]), 15, None);
        let whole = read_all(first.try_clone().unwrap()).await;
        assert_eq!(
            whole, "01234567890123456789",
            "the request itself is unaffected"
        );
        assert!(first.try_clone().is_none());
        let declared = ReplayBody::new(chunks(&["x"]), 15, Some(1 << 20));
        assert!(
            declared.try_clone().is_none(),
            "a declared length over the limit is never kept"
        );
    }
}
