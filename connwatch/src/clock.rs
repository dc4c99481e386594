//! Kernel timestamps are CLOCK_MONOTONIC; they are turned into wall-clock time once, at
//! the edge, for display.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Maps CLOCK_MONOTONIC nanoseconds to wall-clock time, with the offset taken once.
#[derive(Clone, Copy, Debug)]
pub struct WallClock {
    /// Wall-clock time at monotonic zero, in nanoseconds since the Unix epoch (0 before
    /// it).
    epoch_unix_ns: u64,
}

impl Default for WallClock {
    fn default() -> Self {
        Self::new()
    }
}

impl WallClock {
    pub fn new() -> Self {
        let mono = monotonic_ns();
        let now = SystemTime::now();
        Self::with_epoch(now - Duration::from_nanos(mono))
    }

    /// A clock whose monotonic zero is `epoch`.
    pub fn with_epoch(epoch: SystemTime) -> Self {
        let since = epoch.duration_since(UNIX_EPOCH).unwrap_or_default();
        Self {
            epoch_unix_ns: u64::try_from(since.as_nanos()).unwrap_or(u64::MAX),
        }
    }

    pub fn wall(&self, mono_ns: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.unix_ns(mono_ns))
    }

    /// `wall` as nanoseconds since the Unix epoch, without building a `SystemTime`
    /// (`trace` asks once per row).
    pub fn unix_ns(&self, mono_ns: u64) -> u64 {
        self.epoch_unix_ns.saturating_add(mono_ns)
    }
}

/// CLOCK_MONOTONIC now, in nanoseconds: the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
