//! Clean stop on Ctrl-C (SIGINT) or SIGTERM.
//!
//! [`StopFlag::install`] registers handlers that only set an atomic flag; the training loop polls
//! [`StopFlag::is_set`] between optimizer steps, saves a checkpoint and exits. A second signal while
//! the flag is already set ends the process at once (exit status 130), for a user who does not want
//! to wait for the save.

use signal_hook::consts::{SIGINT, SIGTERM};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// A flag set by SIGINT / SIGTERM (or by [`StopFlag::request`]), shared by clones.
#[derive(Clone, Debug, Default)]
pub struct StopFlag {
    flag: Arc<AtomicBool>,
    signal: Arc<AtomicUsize>,
}

impl StopFlag {
    /// A flag with no handler attached (set only through [`StopFlag::request`]); for tests and for
    /// callers that stop a run themselves.
    pub fn new() -> Self {
        StopFlag::default()
    }

    /// Installs the SIGINT and SIGTERM handlers and returns the flag they set. The first signal sets
    /// the flag; a second one exits the process with status 130.
    pub fn install() -> std::io::Result<Self> {
        let stop = StopFlag::new();
        for sig in [SIGINT, SIGTERM] {
            // Registered first, so it sees the flag as it was before this signal set it.
            signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&stop.flag))?;
            signal_hook::flag::register_usize(sig, Arc::clone(&stop.signal), sig as usize)?;
            signal_hook::flag::register(sig, Arc::clone(&stop.flag))?;
        }
        Ok(stop)
    }

    /// Whether a stop was requested.
    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Requests a stop, as a signal would.
    pub fn request(&self) {
        self.flag.store(true, Ordering::SeqCst);
    }

    /// The name of the signal that requested the stop (`"SIGINT"`, `"SIGTERM"`), if one did.
    pub fn signal_name(&self) -> Option<&'static str> {
        match self.signal.load(Ordering::SeqCst) {
            0 => None,
            s if s == SIGINT as usize => Some("SIGINT"),
            s if s == SIGTERM as usize => Some("SIGTERM"),
            _ => Some("a signal"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_sets_flag() {
        let stop = StopFlag::new();
        assert!(!stop.is_set());
        let clone = stop.clone();
        clone.request();
        assert!(stop.is_set());
        assert_eq!(stop.signal_name(), None);
    }

    #[test]
    fn sigterm_sets_flag() {
        let stop = StopFlag::install().unwrap();
        assert!(!stop.is_set());
        signal_hook::low_level::raise(SIGTERM).unwrap();
        assert!(stop.is_set());
        assert_eq!(stop.signal_name(), Some("SIGTERM"));
    }
}
