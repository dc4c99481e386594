//! CPU budgets for the recurring jobs that cost in proportion to what the host holds
//! (timewait polls, full sock_diag dumps, /proc fd scans): a job that took `cost` may run
//! again once `cost × share` has passed since it ended, so it uses at most 1/`share` of a
//! CPU however large the host, and runs as often as asked where it is cheap.
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct Budget {
    /// The job may use 1/share of a CPU (0: no limit).
    share: u32,
    /// End and cost of the last run.
    last: Option<(Instant, Duration)>,
}

impl Budget {
    pub const fn new(share: u32) -> Self {
        Self { share, last: None }
    }

    /// The pause after the last run that keeps within the budget.
    pub fn spacing(&self) -> Duration {
        self.last
            .map_or(Duration::ZERO, |(_, cost)| cost.saturating_mul(self.share))
    }

    /// Time since the last run ended (`None` before the first).
    pub fn since_last(&self) -> Option<Duration> {
        self.last.map(|(end, _)| end.elapsed())
    }

    /// Whether a run now keeps within the budget.
    pub fn allows(&self) -> bool {
        self.allows_scaled(1.0)
    }

    /// Whether a run now keeps within the budget, for a job expected to cost `scale`
    /// times the last run: one whose cost follows what it walks, which has grown (or
    /// shrunk) by that much since.
    pub fn allows_scaled(&self, scale: f64) -> bool {
        self.since_last()
            .is_none_or(|t| t >= self.spacing().mul_f64(scale.max(0.0)))
    }

    /// Records a run that just ended and cost `cost` (CPU time where the job runs on
    /// this thread; wall time where it waits on other threads or the kernel). What an
    /// earlier run still owes is carried over: a cheap job charged to the same budget
    /// (a listener dump after a poll) must not wipe out an expensive one's spacing.
    pub fn spent(&mut self, cost: Duration) {
        let now = Instant::now();
        let owed = match (self.last, self.share) {
            (Some((end, last)), share) if share > 0 => {
                let free_at = end + last.saturating_mul(share);
                free_at.saturating_duration_since(now) / share
            }
            _ => Duration::ZERO,
        };
        self.last = Some((now, owed + cost));
    }
}

/// CPU time used so far by the calling thread: on a loaded host a job's wall time
/// includes time spent waiting for a core, which would space it out exactly when it
/// matters.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `ts` is.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_expected_to_cost_more_waits_longer() {
        let mut b = Budget::new(1000);
        b.spent(Duration::from_micros(10));
        // 10 ms of spacing: already past twice nothing, not past a hundred times it.
        std::thread::sleep(Duration::from_millis(15));
        assert!(b.allows());
        assert!(b.allows_scaled(1.0));
        assert!(
            !b.allows_scaled(100.0),
            "a run costing 1 ms needs 1 s of spacing"
        );
        assert!(b.allows_scaled(0.5), "a cheaper run waits less");
    }

    #[test]
    fn spacing_follows_the_last_cost() {
        let mut b = Budget::new(20);
        assert!(b.allows(), "the first run is always allowed");
        b.spent(Duration::from_secs(1));
        assert_eq!(b.spacing(), Duration::from_secs(20));
        assert!(!b.allows());
        // A cheap job charged to the same budget keeps what the expensive one owes.
        b.spent(Duration::ZERO);
        assert!(!b.allows(), "a cheap run wiped out the spacing");
        assert!(
            b.spacing() > Duration::from_millis(19_900),
            "{:?}",
            b.spacing()
        );
        b.spent(Duration::from_millis(100));
        assert!(
            b.spacing() > Duration::from_millis(21_900),
            "{:?}",
            b.spacing()
        );
    }

    #[test]
    fn a_free_run_after_the_spacing_may_repeat_at_once() {
        let mut b = Budget::new(20);
        b.spent(Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(25));
        b.spent(Duration::ZERO);
        assert!(b.allows());
    }

    #[test]
    fn no_limit_with_share_zero() {
        let mut b = Budget::new(0);
        b.spent(Duration::from_secs(5));
        assert!(b.allows());
    }

    #[test]
    fn thread_cpu_time_advances_with_work() {
        let t0 = thread_cpu_time();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = std::hint::black_box(x.wrapping_add(i));
        }
        assert!(thread_cpu_time() > t0, "{x}");
    }
}
