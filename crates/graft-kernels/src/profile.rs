//! A process-wide op profiler: when enabled, every backend op adds its wall time to a per-op
//! total, so `graft bench` can show where a training step's time goes. Disabled it costs one
//! relaxed atomic load per op.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

static ENABLED: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<Vec<(&'static str, Duration, u64)>> = Mutex::new(Vec::new());

/// Turns recording on or off.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Clears the totals.
pub fn reset() {
    TOTALS.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// `(op, total time, calls)` sorted by time, largest first.
pub fn totals() -> Vec<(&'static str, Duration, u64)> {
    let mut v = TOTALS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    v.sort_by_key(|e| std::cmp::Reverse(e.1));
    v
}

/// Times the rest of the enclosing scope under `op` (when enabled).
pub fn scope(op: &'static str) -> Scope {
    Scope {
        op,
        start: ENABLED.load(Ordering::Relaxed).then(Instant::now),
    }
}

/// Guard returned by [`scope`].
pub struct Scope {
    op: &'static str,
    start: Option<Instant>,
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some(start) = self.start {
            let d = start.elapsed();
            let mut t = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
            match t.iter_mut().find(|e| e.0 == self.op) {
                Some(e) => {
                    e.1 += d;
                    e.2 += 1;
                }
                None => t.push((self.op, d, 1)),
            }
        }
    }
}
