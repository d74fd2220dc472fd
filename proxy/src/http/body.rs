//! Response bodies bounded in time: by the request's remaining deadline when the response has a
//! known length (a unary exchange), and by an idle timeout always. A streaming response (gRPC
//! server streaming, chunked) is never cut for lasting long, only for going silent.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::{BoxBody, BoxError};

pub struct TimedBody {
    inner: BoxBody,
    deadline: Option<Pin<Box<Sleep>>>,
    idle: Option<(Duration, Pin<Box<Sleep>>)>,
}

#[derive(Debug, thiserror::Error)]
pub enum BodyTimeout {
    #[error("response body not complete within the request timeout")]
    Deadline,
    #[error("response body idle for {0:?}")]
    Idle(Duration),
}

impl TimedBody {
    pub fn new(inner: BoxBody, deadline: Option<Instant>, idle: Option<Duration>) -> Self {
        Self {
            inner,
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            idle: idle.map(|d| (d, Box::pin(tokio::time::sleep(d)))),
        }
    }
}

impl Body for TimedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            if let Some((d, sleep)) = this.idle.as_mut() {
                sleep.as_mut().reset(Instant::now() + *d);
            }
            return Poll::Ready(frame);
        }
        if let Some(deadline) = this.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Some(Err(BodyTimeout::Deadline.into())));
        }
        if let Some((d, sleep)) = this.idle.as_mut()
            && sleep.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Some(Err(BodyTimeout::Idle(*d).into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
