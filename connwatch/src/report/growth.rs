//! Growth of each row's CLOSE_WAIT count over the window.
use std::{
    collections::{HashMap, VecDeque},
    time::Duration,
};

use super::GroupKey;

/// Per-row (process, command or unit) history of CLOSE_WAIT counts, for growth rates.
#[derive(Default)]
pub struct Growth {
    samples: HashMap<GroupKey, VecDeque<(u64, u64)>>,
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
    pub fn record(&mut self, now_ns: u64, counts: &HashMap<GroupKey, u64>, window: Duration) {
        let start = now_ns.saturating_sub(window.as_nanos() as u64);
        for (key, &n) in counts {
            match self.samples.get_mut(key) {
                Some(s) => s.push_back((now_ns, n)),
                None => {
                    self.samples
                        .insert(key.clone(), VecDeque::from([(now_ns, n)]));
                }
            }
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
    pub fn per_min(&self, key: &GroupKey) -> Option<f64> {
        let s = self.samples.get(key)?;
        let (&(t0, n0), &(t1, n1)) = (s.front()?, s.back()?);
        let span_min = (t1.checked_sub(t0)? as f64) / 60e9;
        (span_min > 0.0).then(|| (n1 as f64 - n0 as f64) / span_min)
    }
}
