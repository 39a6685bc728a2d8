//! Graceful shutdown: once [`Drain::begin`] is called new requests get 503 while the
//! generations in flight (each holding an [`InFlight`]) may finish within the grace period;
//! those still open then are cut ([`Drain::cut_all`]): a stream ends with an SSE error event
//! and `[DONE]`, a non-streamed request with a 503, and [`Drain::cut_count`] says how many.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Shutdown state shared by the server and every generation in flight.
pub struct Drain {
    draining: AtomicBool,
    in_flight: AtomicUsize,
    cut: AtomicUsize,
    cut_now: watch::Sender<bool>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain::new()
    }
}

impl Drain {
    /// Serving normally, nothing in flight.
    pub fn new() -> Drain {
        Drain {
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            cut: AtomicUsize::new(0),
            cut_now: watch::channel(false).0,
        }
    }

    /// Whether shutdown has begun (new requests are refused).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Starts draining: new requests are refused from now on.
    pub fn begin(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Registers a generation in flight until the returned guard is dropped.
    pub fn track(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight {
            drain: self.clone(),
            cut_now: self.cut_now.subscribe(),
            was_cut: false,
        }
    }

    /// Generations in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Waits until nothing is in flight or `timeout` has passed; whether nothing is.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.in_flight() > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Ends every generation still in flight (the grace period is over).
    pub fn cut_all(&self) {
        self.begin();
        self.cut_now.send_replace(true);
    }

    /// Generations ended by [`Drain::cut_all`] before they finished.
    pub fn cut_count(&self) -> usize {
        self.cut.load(Ordering::SeqCst)
    }
}

/// A generation in flight; dropping it ends the registration.
pub struct InFlight {
    drain: Arc<Drain>,
    cut_now: watch::Receiver<bool>,
    was_cut: bool,
}

impl InFlight {
    /// Resolves when the generation must be cut; records it as cut.
    pub async fn cut(&mut self) {
        if self.cut_now.wait_for(|&c| c).await.is_err() {
            std::future::pending::<()>().await;
        }
        if !self.was_cut {
            self.was_cut = true;
            self.drain.cut.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.drain.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_ends_what_is_in_flight_and_counts_it() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let drain = Arc::new(Drain::new());
        let mut a = drain.track();
        let b = drain.track();
        assert_eq!(drain.in_flight(), 2);
        drop(b);
        assert!(!rt.block_on(drain.wait_idle(Duration::from_millis(30))));
        drain.cut_all();
        assert!(drain.is_draining());
        rt.block_on(a.cut());
        rt.block_on(a.cut());
        assert_eq!(drain.cut_count(), 1);
        drop(a);
        assert!(rt.block_on(drain.wait_idle(Duration::ZERO)));
    }
}
