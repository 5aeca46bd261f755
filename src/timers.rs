//! Recycled timers for the deadlines every request sets: hyper's request-head timeout and the
//! wait for the upstream's response head.
//!
//! A fresh tokio `Sleep` per request costs its construction (a runtime handle lookup), an
//! insertion into the timer wheel on its first poll and a removal when dropped: together about
//! 500 instructions, twice a request. A [`TimerPool`] keeps finished sleeps instead, still
//! registered; the next deadline is set with `reset`, which for a later deadline (the usual
//! case: the same timeout, started later) only moves the entry's expiry, without touching the
//! wheel.
//!
//! A sleep waiting in the pool keeps its old deadline and the waker of the task that last
//! polled it: if it is not reused before then, it fires once and wakes that task for nothing
//! (a task that has ended ignores it). The pool keeps at most `MAX_IDLE` sleeps.
//!
//! Sleeps belong to the runtime that made them, so each gateway has its own pool.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::time::{Instant, Sleep};

/// Finished sleeps kept for reuse, at most.
const MAX_IDLE: usize = 1024;

/// Idle sleeps, ready to be reset to a new deadline.
#[derive(Debug, Default, Clone)]
pub struct TimerPool {
    idle: Arc<Mutex<Vec<Pin<Box<Sleep>>>>>,
}

impl TimerPool {
    /// A sleep until `deadline`, recycled when there is one.
    pub fn sleep_until(&self, deadline: Instant) -> PooledSleep {
        let recycled = self.idle.lock().expect("timer pool lock").pop();
        let sleep = match recycled {
            Some(mut sleep) => {
                sleep.as_mut().reset(deadline);
                sleep
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        PooledSleep {
            sleep: Some(sleep),
            pool: self.clone(),
        }
    }

    /// Runs `fut` until `timeout` has passed since `progress` last moved (since it was made, if
    /// it never did); `Err(Elapsed)` then.
    pub fn timeout<'p, F: Future>(
        &self,
        timeout: Duration,
        fut: F,
        progress: &'p Progress,
    ) -> Deadline<'p, F> {
        Deadline {
            fut,
            sleep: self.sleep_until(progress.last() + timeout),
            timeout,
            progress,
        }
    }

    fn put_back(&self, sleep: Pin<Box<Sleep>>) {
        let mut idle = self.idle.lock().expect("timer pool lock");
        if idle.len() < MAX_IDLE {
            idle.push(sleep);
        }
    }
}

/// A sleep from a [`TimerPool`], given back to it when dropped.
#[derive(Debug)]
pub struct PooledSleep {
    /// Always `Some` until dropped.
    sleep: Option<Pin<Box<Sleep>>>,
    pool: TimerPool,
}

impl PooledSleep {
    fn sleep(&mut self) -> Pin<&mut Sleep> {
        self.sleep.as_mut().expect("a pooled sleep").as_mut()
    }
}

impl Future for PooledSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.sleep().poll(cx)
    }
}

impl Drop for PooledSleep {
    fn drop(&mut self) {
        if let Some(sleep) = self.sleep.take() {
            self.pool.put_back(sleep);
        }
    }
}

/// A pool is hyper's timer too (the HTTP/1.1 head timeout and HTTP/2 keep-alive pings).
impl hyper::rt::Timer for TimerPool {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(self.sleep_until(Instant::now() + duration))
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(TimerPool::sleep_until(self, deadline.into()))
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: std::time::Instant) {
        match sleep.as_mut().downcast_mut_pin::<PooledSleep>() {
            Some(pooled) => pooled.get_mut().sleep().reset(new_deadline.into()),
            None => *sleep = hyper::rt::Timer::sleep_until(self, new_deadline),
        }
    }

    fn now(&self) -> std::time::Instant {
        Instant::now().into()
    }
}

impl hyper::rt::Sleep for PooledSleep {}

/// When a request last made progress on its way up (its body's writes): the upstream wait's
/// deadline counts from there, so a long upload is not cut off as a silent upstream, while
/// an upstream that stops reading it still is. Moved with a clock read per write; read only
/// when the deadline's timer fires.
#[derive(Debug)]
pub struct Progress {
    start: Instant,
    /// Nanoseconds from `start` to the last progress.
    last: AtomicU64,
    /// Whether the upload is waiting for the client's next bytes (nothing left to write): that
    /// wait is the client's, bounded by the body's own idle timeout, not the upstream's.
    client_turn: AtomicBool,
}

impl Progress {
    /// Progress as of `start`.
    pub fn since(start: std::time::Instant) -> Progress {
        Progress {
            start: Instant::from_std(start),
            last: AtomicU64::new(0),
            client_turn: AtomicBool::new(false),
        }
    }

    /// Records whether the upload now waits for the client.
    pub fn client_turn(&self, waiting: bool) {
        self.client_turn.store(waiting, Ordering::Relaxed);
    }

    /// Records progress now.
    pub fn moved(&self) {
        let nanos = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.store(nanos, Ordering::Relaxed);
    }

    /// The last progress (the start when there was none).
    pub fn last(&self) -> Instant {
        self.start + Duration::from_nanos(self.last.load(Ordering::Relaxed))
    }
}

/// The upstream wait's deadline: `fut`, or [`Elapsed`] once `timeout` has passed since the
/// last [`Progress`].
#[derive(Debug)]
pub struct Deadline<'p, F> {
    fut: F,
    sleep: PooledSleep,
    timeout: Duration,
    progress: &'p Progress,
}

/// The deadline passed before the future finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

impl<F: Future + Unpin> Future for Deadline<'_, F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Poll::Ready(out) = Pin::new(&mut self.fut).poll(cx) {
            return Poll::Ready(Ok(out));
        }
        loop {
            if Pin::new(&mut self.sleep).poll(cx).is_pending() {
                return Poll::Pending;
            }
            // Fired: moved on since it was set, or waiting for the client's body (its own
            // timeout's business)? Then the deadline moves.
            let now = Instant::now();
            let due = if self.progress.client_turn.load(Ordering::Relaxed) {
                now + self.timeout
            } else {
                self.progress.last() + self.timeout
            };
            if due <= now {
                return Poll::Ready(Err(Elapsed));
            }
            self.sleep.sleep().reset(due);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_recycled_sleep_keeps_its_new_deadline() {
        let pool = TimerPool::default();
        let start = Instant::now();
        pool.sleep_until(start + Duration::from_millis(30)).await;
        assert!(start.elapsed() >= Duration::from_millis(30));
        assert_eq!(pool.idle.lock().unwrap().len(), 1);
        // Reused, with a later deadline, and with an earlier one than a pending sleep's.
        let pending = pool.sleep_until(Instant::now() + Duration::from_secs(60));
        drop(pending);
        let again = Instant::now();
        pool.sleep_until(again + Duration::from_millis(20)).await;
        let waited = again.elapsed();
        assert!(waited >= Duration::from_millis(20), "{waited:?}");
        assert!(waited < Duration::from_secs(30), "{waited:?}");
    }

    #[tokio::test]
    async fn a_deadline_passes_the_result_or_elapses() {
        let pool = TimerPool::default();
        let progress = Progress::since(std::time::Instant::now());
        let quick = pool.timeout(Duration::from_secs(5), Box::pin(async { 7 }), &progress);
        assert_eq!(quick.await, Ok(7));
        let slow = pool.timeout(
            Duration::from_millis(20),
            Box::pin(tokio::time::sleep(Duration::from_secs(5))),
            &progress,
        );
        assert_eq!(slow.await, Err(Elapsed));
    }

    /// Progress every 10 ms for 100 ms keeps a 40 ms deadline from firing; after it stops,
    /// the deadline comes 40 ms after the last progress.
    #[tokio::test(start_paused = true)]
    async fn a_deadline_counts_from_the_last_progress() {
        let pool = TimerPool::default();
        let start = Instant::now();
        let progress = Progress::since(start.into_std());
        let work = async {
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(10)).await;
                progress.moved();
            }
            std::future::pending::<()>().await
        };
        let out = pool
            .timeout(Duration::from_millis(40), Box::pin(work), &progress)
            .await;
        assert_eq!(out, Err(Elapsed));
        assert_eq!(start.elapsed(), Duration::from_millis(140));
    }
}
