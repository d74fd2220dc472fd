//! Graceful shutdown: a trigger, watchers, and a deadline after which shutdown is forced.
//!
//! Every listener and every connection holds a [`Watch`]. When [`Signal::drain`] is called, all
//! watchers see [`Watch::signaled`] complete: listeners stop accepting (and drop their sockets, so
//! new connections are refused), HTTP connections finish their in-flight requests and close
//! (HTTP/1 `Connection: close`, HTTP/2 GOAWAY). `drain` returns once every watcher is dropped, or
//! when the grace period ends, whichever comes first.

use std::time::Duration;

use tokio::sync::{mpsc, watch};

/// Creates the drain trigger and the first watcher.
pub fn channel() -> (Signal, Watch) {
    let (signal_tx, signal_rx) = watch::channel(false);
    let (done_tx, done_rx) = mpsc::channel(1);
    (
        Signal { signal_tx, done_rx },
        Watch {
            signal_rx,
            _done_tx: done_tx,
        },
    )
}

/// Starts a drain and waits for it.
pub struct Signal {
    signal_tx: watch::Sender<bool>,
    done_rx: mpsc::Receiver<std::convert::Infallible>,
}

/// How a drain ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Drained {
    /// Every connection finished within the grace period.
    Complete,
    /// The grace period ended with work still in flight.
    GracePeriodExpired,
}

impl Signal {
    /// Tells every watcher to drain, then waits until all are gone or `grace` has passed.
    pub async fn drain(mut self, grace: Duration) -> Drained {
        let _ = self.signal_tx.send(true);
        // `recv` returns `None` once every `Watch` (which each hold a sender) has been dropped.
        match tokio::time::timeout(grace, self.done_rx.recv()).await {
            Ok(_) => Drained::Complete,
            Err(_) => Drained::GracePeriodExpired,
        }
    }
}

/// Held by everything that must finish before the process exits.
#[derive(Clone)]
pub struct Watch {
    signal_rx: watch::Receiver<bool>,
    _done_tx: mpsc::Sender<std::convert::Infallible>,
}

impl Watch {
    /// Completes when a drain has started (immediately, if one already has).
    pub async fn signaled(&self) {
        let mut rx = self.signal_rx.clone();
        // An error means the `Signal` was dropped without draining: treat it as a drain.
        let _ = rx.wait_for(|draining| *draining).await;
    }

    pub fn is_draining(&self) -> bool {
        *self.signal_rx.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_every_watch() {
        let (signal, watch) = channel();
        let conn = watch.clone();
        drop(watch);
        let task = tokio::spawn(async move {
            conn.signaled().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(conn);
        });
        assert_eq!(
            signal.drain(Duration::from_secs(5)).await,
            Drained::Complete
        );
        task.await.unwrap();
    }

    #[tokio::test]
    async fn drain_gives_up_after_the_grace_period() {
        let (signal, watch) = channel();
        let held = watch.clone();
        drop(watch);
        let outcome = signal.drain(Duration::from_millis(50)).await;
        assert_eq!(outcome, Drained::GracePeriodExpired);
        assert!(held.is_draining());
    }
}
