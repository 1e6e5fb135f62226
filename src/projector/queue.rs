//! The projector's work queue: which services wait to be projected, in order, and which are
//! being projected. Plain data, so its rules are tested without an apiserver.
//!
//! The rules are client-go's workqueue's (kube-controller-manager's EndpointSlice controller
//! runs on one):
//! - a service waits at most once, however often it is triggered meanwhile (triggers coalesce);
//! - a service is projected by one worker at a time: triggered while in flight, it waits again
//!   after that projection ends, so one service's writes never race each other;
//! - no batch waits for another: a free worker takes the next service at once, so one slow
//!   service holds up nobody but itself.
//!
//! An optional delay (`--projection-window-ms`, default 0 as the EndpointSlice controller's
//! batch period) holds a service back for that long after its first trigger, so changes that
//! follow within it are written together.

use std::collections::{HashMap, HashSet, VecDeque};

use tokio::time::{Duration, Instant};

use super::ServiceKey;

#[derive(Debug, Default)]
pub(super) struct WorkQueue {
    /// Services waiting, in the order they were first triggered, with when they may start.
    waiting: VecDeque<(ServiceKey, Instant)>,
    /// The keys in `waiting`.
    queued: HashSet<ServiceKey>,
    /// Services being projected.
    active: HashSet<ServiceKey>,
    /// Services triggered while being projected, with when they may start again.
    again: HashMap<ServiceKey, Instant>,
}

impl WorkQueue {
    /// Triggers `key` at `now`; it may start after `delay`.
    pub(super) fn add(&mut self, key: ServiceKey, now: Instant, delay: Duration) {
        let ready = now + delay;
        if self.active.contains(&key) {
            self.again.entry(key).or_insert(ready);
        } else if self.queued.insert(key.clone()) {
            self.waiting.push_back((key, ready));
        }
    }

    /// The next service that may start at `now`, marked active. Services start in the order
    /// they were triggered: one behind a front that is still delayed waits for it, at most one
    /// window.
    pub(super) fn next(&mut self, now: Instant) -> Option<ServiceKey> {
        match self.waiting.front() {
            Some((_, ready)) if *ready <= now => {}
            _ => return None,
        }
        let (key, _) = self.waiting.pop_front()?;
        self.queued.remove(&key);
        self.active.insert(key.clone());
        Some(key)
    }

    /// When the front service may start, if one waits.
    pub(super) fn next_ready(&self) -> Option<Instant> {
        self.waiting.front().map(|(_, ready)| *ready)
    }

    /// When the loop that hands out work must wake on its own, with `workers` workers: when
    /// the front service may start, but only while a worker is free. With every worker busy a
    /// finished projection wakes the loop; a timer for a front that is already ready would
    /// fire at once, again and again (the loop spun at 46 % of a core in a burst that way).
    pub(super) fn wake_at(&self, workers: usize) -> Option<Instant> {
        self.next_ready()
            .filter(|_| self.in_flight() < workers.max(1))
    }

    /// `key`'s projection ended; triggered meanwhile, it waits again.
    pub(super) fn done(&mut self, key: &ServiceKey) {
        self.active.remove(key);
        if let Some(ready) = self.again.remove(key)
            && self.queued.insert(key.clone())
        {
            self.waiting.push_back((key.clone(), ready));
        }
    }

    /// Nothing waits and nothing is in flight.
    pub(super) fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.active.is_empty()
    }

    /// Services in flight.
    pub(super) fn in_flight(&self) -> usize {
        self.active.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(s: &str) -> ServiceKey {
        ("ns".to_string(), s.to_string())
    }

    #[test]
    fn triggers_coalesce_and_a_service_in_flight_waits_again_after() {
        let t = Instant::now();
        let zero = Duration::ZERO;
        let mut q = WorkQueue::default();
        q.add(key("a"), t, zero);
        q.add(key("b"), t, zero);
        q.add(key("a"), t, zero);
        assert_eq!(q.next(t), Some(key("a")));
        // Triggered while in flight: not handed out again until done.
        q.add(key("a"), t, zero);
        assert_eq!(q.next(t), Some(key("b")));
        assert_eq!(q.next(t), None);
        assert_eq!(q.in_flight(), 2);
        q.done(&key("a"));
        assert_eq!(q.next(t), Some(key("a")));
        q.done(&key("a"));
        q.done(&key("b"));
        assert_eq!(q.next(t), None);
        assert!(q.is_idle());
    }

    #[test]
    fn a_delay_holds_a_service_back_from_its_first_trigger() {
        let t = Instant::now();
        let delay = Duration::from_millis(100);
        let mut q = WorkQueue::default();
        q.add(key("a"), t, delay);
        q.add(key("a"), t + Duration::from_millis(90), delay);
        assert_eq!(q.next(t + Duration::from_millis(99)), None);
        assert_eq!(q.next_ready(), Some(t + delay));
        assert_eq!(q.next(t + delay), Some(key("a")));
    }

    #[test]
    fn the_loop_wakes_for_a_waiting_service_only_while_a_worker_is_free() {
        let t = Instant::now();
        let mut q = WorkQueue::default();
        assert_eq!(q.wake_at(1), None, "nothing waits");
        q.add(key("a"), t, Duration::ZERO);
        q.add(key("b"), t, Duration::from_millis(5));
        assert_eq!(q.wake_at(1), Some(t));
        assert_eq!(q.next(t), Some(key("a")));
        // b waits and its time comes, but the only worker is busy: no timer.
        assert_eq!(q.wake_at(1), None);
        assert_eq!(q.wake_at(2), Some(t + Duration::from_millis(5)));
        q.done(&key("a"));
        assert_eq!(q.wake_at(1), Some(t + Duration::from_millis(5)));
    }

    proptest! {
        /// Whatever the triggers and completions: no service is handed out while in flight,
        /// every trigger is eventually followed by a projection that starts after it, and none
        /// waits twice.
        #[test]
        fn no_service_runs_twice_at_once_and_no_trigger_is_lost(
            ops in proptest::collection::vec((0u8..3, 0u8..4), 0..200)
        ) {
            let t = Instant::now();
            let mut q = WorkQueue::default();
            let mut running: HashSet<ServiceKey> = HashSet::new();
            // Services triggered since their last projection started.
            let mut owed: HashSet<ServiceKey> = HashSet::new();
            for (op, k) in ops {
                let k = key(&k.to_string());
                match op {
                    0 => { q.add(k.clone(), t, Duration::ZERO); owed.insert(k); }
                    1 => if let Some(next) = q.next(t) {
                        prop_assert!(running.insert(next.clone()), "{next:?} handed out twice");
                        owed.remove(&next);
                    },
                    _ => if running.remove(&k) { q.done(&k); },
                }
                let waiting: Vec<_> = q.waiting.iter().map(|(k, _)| k.clone()).collect();
                let distinct: HashSet<_> = waiting.iter().cloned().collect();
                prop_assert_eq!(waiting.len(), distinct.len());
            }
            // Drain: finish what runs, take what waits.
            loop {
                for k in running.drain().collect::<Vec<_>>() { q.done(&k); }
                match q.next(t) {
                    Some(next) => { owed.remove(&next); running.insert(next); }
                    None if running.is_empty() => break,
                    None => {}
                }
            }
            prop_assert!(owed.is_empty(), "triggers never projected: {owed:?}");
            prop_assert!(q.is_idle());
        }
    }
}
