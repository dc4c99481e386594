//! Growth of each process's CLOSE_WAIT count over the window.
use std::{
    collections::{HashMap, VecDeque},
    time::Duration,
};

/// Per-process history of CLOSE_WAIT counts, for growth rates.
#[derive(Default)]
pub struct Growth {
    samples: HashMap<u32, VecDeque<(u64, u64)>>,
}

impl Growth {
    /// Processes with samples kept.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Records `counts` at `now_ns` (processes absent count 0) and forgets samples older
    /// than the window, keeping the newest of those as the window's starting point.
    pub fn record(&mut self, now_ns: u64, counts: &HashMap<u32, u64>, window: Duration) {
        let start = now_ns.saturating_sub(window.as_nanos() as u64);
        for (pid, &n) in counts {
            self.samples.entry(*pid).or_default().push_back((now_ns, n));
        }
        self.samples.retain(|pid, s| {
            if !counts.contains_key(pid) {
                s.push_back((now_ns, 0));
            }
            while s.len() > 1 && s.get(1).is_some_and(|&(t, _)| t <= start) {
                s.pop_front();
            }
            // A process with no sockets over a whole window is forgotten.
            s.iter().any(|&(_, n)| n > 0)
        });
    }

    /// Net change per minute between the window's first sample and the last.
    pub fn per_min(&self, pid: u32) -> Option<f64> {
        let s = self.samples.get(&pid)?;
        let (&(t0, n0), &(t1, n1)) = (s.front()?, s.back()?);
        let span_min = (t1.checked_sub(t0)? as f64) / 60e9;
        (span_min > 0.0).then(|| (n1 as f64 - n0 as f64) / span_min)
    }
}
