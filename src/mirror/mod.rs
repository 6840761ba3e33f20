//! The mirror agent: runs next to the vendor's production and keeps the escrow current.
//! Client side only; it talks to the cluster through [`crate::client::EscrowClient`].

pub mod artifacts;
pub mod dir;
pub mod records;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures::FutureExt;

/// An agent's stop request (SIGINT or SIGTERM in escrowctl), looked at wherever the agent
/// waits (a retry pause, a call to the cluster, a pass over a tree) and between units of work,
/// so a stop is never held up by a busy feed or a cluster that is down. Polled once when made,
/// so a signal handler behind it is installed from the start. Once seen, it stays seen.
pub struct Stop<F: Future<Output = ()>> {
    fut: Pin<Box<F>>,
    seen: bool,
}

impl<F: Future<Output = ()>> Stop<F> {
    pub fn new(fut: F) -> Self {
        let mut stop = Self {
            fut: Box::pin(fut),
            seen: false,
        };
        stop.requested();
        stop
    }

    /// Whether the stop was requested (looks, never waits).
    pub fn requested(&mut self) -> bool {
        if !self.seen && self.fut.as_mut().now_or_never().is_some() {
            self.seen = true;
        }
        self.seen
    }

    /// Runs `work` unless the stop comes first; then `None`, and `work` is dropped.
    pub async fn until<T>(&mut self, work: impl Future<Output = T>) -> Option<T> {
        if self.seen {
            return None;
        }
        tokio::select! {
            biased;
            _ = self.fut.as_mut() => {
                self.seen = true;
                None
            }
            out = work => Some(out),
        }
    }

    /// Waits `pause` unless the stop comes first; whether it did (or had).
    pub async fn within(&mut self, pause: Duration) -> bool {
        self.until(tokio::time::sleep(pause)).await.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::Stop;
    use std::time::Duration;

    #[tokio::test]
    async fn a_stop_cuts_waits_and_work_short_and_stays_seen() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut stop = Stop::new(async move {
            let _ = rx.await;
        });
        assert!(!stop.requested());
        assert_eq!(stop.until(async { 7 }).await, Some(7));
        assert!(!stop.within(Duration::from_millis(1)).await);
        tx.send(()).unwrap();
        assert_eq!(stop.until(std::future::pending::<()>()).await, None);
        assert!(stop.requested());
        assert!(stop.within(Duration::from_secs(3600)).await);
    }
}
