//! A one-way stop signal that is cheap to wait on: an atomic flag and the waker of the one task
//! that waits for it.
//!
//! Owns: `Signal`. A session checks its stop signals (killed, server stopping) every time it
//! waits for anything, thousands of times a second. `tokio_util`'s `CancellationToken` takes a
//! mutex on every check, and registering a waker on every poll costs an atomic
//! compare-and-swap; both showed in profiles. A `Signal` keeps the waker of the first poll, so
//! a check is one atomic load. The price: it wakes that one task, so every future waiting on a
//! given signal must belong to the same task (a session's reader and writer do).

use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};

/// A flag that is raised once and wakes the task waiting for it.
#[derive(Debug, Default)]
pub struct Signal {
    raised: AtomicBool,
    /// Set once the waiting task's waker is stored in `waker`.
    bound: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Signal {
    /// A signal not yet raised.
    pub fn new() -> Signal {
        Signal::default()
    }

    /// Raises the signal (idempotent) and wakes the waiting task.
    pub fn raise(&self) {
        self.raised.store(true, Ordering::SeqCst);
        let waker = self.waker.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// True once raised.
    pub fn is_raised(&self) -> bool {
        self.raised.load(Ordering::SeqCst)
    }

    /// Ready once the signal is raised. The first call stores the task's waker; later calls
    /// must come from the same task.
    pub fn poll_raised(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.is_raised() {
            return Poll::Ready(());
        }
        if !self.bound.load(Ordering::Relaxed) {
            *self.waker.lock().unwrap_or_else(|p| p.into_inner()) = Some(cx.waker().clone());
            self.bound.store(true, Ordering::Relaxed);
            // Raised before the waker was stored: that raise found no waker to wake.
            if self.is_raised() {
                return Poll::Ready(());
            }
        }
        Poll::Pending
    }

    /// Completes once the signal is raised (see `poll_raised`).
    pub fn raised(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| self.poll_raised(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn a_raise_from_another_task_wakes_the_waiter() {
        let signal = Arc::new(Signal::new());
        let raiser = signal.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            raiser.raise();
        });
        tokio::time::timeout(Duration::from_secs(5), signal.raised()).await.expect("the raise woke the waiter");
        assert!(signal.is_raised());
    }

    #[tokio::test]
    async fn a_raised_signal_is_ready_at_once_and_stays_raised() {
        let signal = Signal::new();
        assert!(!signal.is_raised());
        signal.raise();
        signal.raise();
        signal.raised().await;
        signal.raised().await;
        assert!(signal.is_raised());
    }

    #[tokio::test]
    async fn a_waiter_in_a_select_is_woken_with_the_other_branch_still_pending() {
        let signal = Arc::new(Signal::new());
        let raiser = signal.clone();
        let waiting = tokio::spawn(async move {
            tokio::select! {
                _ = signal.raised() => true,
                _ = std::future::pending::<()>() => false,
            }
        });
        tokio::task::yield_now().await;
        raiser.raise();
        let woke = tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("woken").expect("no panic");
        assert!(woke, "the signal branch completed");
    }
}
