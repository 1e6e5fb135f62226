//! Contact with the apiserver (and etcd behind it): proof that it answered after a given
//! moment, and a record of the stalls during which it did not.
//!
//! A paused apiserver, or one whose etcd is paused, breaks no watch: it delivers nothing, and
//! heartbeats cannot be written meanwhile. So an instance is judged silent only when a request
//! that started after its verdict became due was answered ([`Contact::confirmed_since`]), and a
//! stall in the instance's silence window long enough to have cost it heartbeats gives it a
//! fresh TTL ([`Contact::fresh_view`]).
//!
//! A stall runs from the last answer before a request that failed or was not answered in time
//! to the next answer. Its length tells a late answer from no answer: under load the apiserver
//! answers a request a few seconds late, a stall of seconds, which only instances with a TTL
//! under four times that notice; an outage is a stall of its whole length. (Before this, any
//! request that timed out under load gave every instance a full TTL: the benchmark's 15–28 s
//! expiry tail at 5000 and 10 000 instances.)

use std::{
    collections::VecDeque,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use tokio::time::Instant;

/// A heartbeat sent during a stall is lost only if its client gives up before the apiserver
/// answers, and Roster's agent waits TTL/3 (and retries a refused heartbeat with a backoff that
/// never waits longer than the time already spent). A stall that covered less than a quarter of
/// an instance's silence window therefore cost it no heartbeat, however many such stalls there
/// were: each delayed the heartbeats sent during it by less than its own length, and delays do
/// not add up (the gap between two heartbeats grows by the later one's delay at most). A longer
/// one gives the instance a fresh TTL from its end. (Summing them, as this rule first did, took
/// an overloaded apiserver's 5-7 s late answers, four in a 100 s window, for an outage: the
/// benchmark's 86 s expiry lag at 10 000, docs/benchmark.md.)
const STALL_SHARE_OF_TTL: u32 = 4;

/// The longest TTL an instance may have: a stall that ended longer ago than this is in no
/// instance's silence window.
const LONGEST_TTL: Duration = Duration::from_secs(3600);

/// Stalls kept at most; beyond this the two oldest merge into one that spans both (which can
/// only grant more fresh TTLs, never fewer).
const MAX_STALLS: usize = 256;

/// Periods during which the apiserver did not answer: plain data, so its rules are tested
/// without an apiserver.
#[derive(Debug, Default)]
pub struct Stalls {
    /// `(from, to)`, oldest first, not overlapping.
    spans: VecDeque<(Instant, Instant)>,
}

impl Stalls {
    /// Records the stall `[from, to]`; `to` is now.
    pub fn record(&mut self, from: Instant, to: Instant) {
        while self
            .spans
            .front()
            .is_some_and(|(_, end)| to.saturating_duration_since(*end) > LONGEST_TTL)
        {
            self.spans.pop_front();
        }
        match self.spans.back_mut() {
            // Overlapping the last one (they are recorded in order): one stall.
            Some((start, end)) if from <= *end => {
                *start = (*start).min(from);
                *end = (*end).max(to);
            }
            _ => self.spans.push_back((from, to)),
        }
        if self.spans.len() > MAX_STALLS
            && let (Some((start, _)), Some((_, end))) =
                (self.spans.pop_front(), self.spans.pop_front())
        {
            self.spans.push_front((start, end));
        }
    }

    /// If a stall covered at least `ttl / 4` of `[from, to]`: the end of the last such stall
    /// (which may be after `to`), from which the instance gets a fresh TTL. Stalls are not
    /// added up: each delays the heartbeats sent during it by at most its own length, so
    /// several short ones delay several heartbeats a little and lose none (module docs).
    pub fn fresh_view(&self, from: Instant, to: Instant, ttl: Duration) -> Option<Instant> {
        self.spans
            .iter()
            .filter(|&&(start, end)| {
                let (overlap_start, overlap_end) = (start.max(from), end.min(to));
                overlap_start < overlap_end
                    && (overlap_end - overlap_start) * STALL_SHARE_OF_TTL >= ttl
            })
            .map(|&(_, end)| end)
            .next_back()
    }
}

/// What contact with the apiserver has shown: when it last answered, and the stalls.
pub struct Contact {
    api: Api<Lease>,
    name: String,
    timeout: Duration,
    state: Mutex<State>,
    /// One probe at a time; concurrent callers share its answer.
    probe: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct State {
    /// When the latest round trip that succeeded started.
    last_ok: Option<Instant>,
    /// When the latest answer arrived.
    last_answer: Option<Instant>,
    /// The start of a stall not yet over: a request failed or was not answered in time, and
    /// no answer has come since.
    open: Option<Instant>,
    stalls: Stalls,
}

impl Contact {
    /// Contact through reads of the Lease `name` (reads go to etcd); a probe waits `timeout`.
    pub fn new(api: Api<Lease>, name: String, timeout: Duration) -> Contact {
        Contact {
            api,
            name,
            timeout,
            state: Mutex::default(),
            probe: tokio::sync::Mutex::new(()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A request that started at `started` was answered.
    pub fn answered(&self, started: Instant) {
        let now = Instant::now();
        let mut state = self.state();
        state.last_ok = Some(state.last_ok.map_or(started, |l| l.max(started)));
        state.last_answer = Some(now);
        if let Some(from) = state.open.take() {
            state.stalls.record(from, now);
            let stalled = now.saturating_duration_since(from);
            tracing::info!(
                ?stalled,
                "the apiserver answers again: instances whose silence this stall covered for a \
                 quarter of their TTL get a full TTL from now"
            );
        }
    }

    /// A request that started at `started` failed or was not answered in time: a stall from
    /// the last answer before it, until the next answer.
    pub fn unanswered(&self, started: Instant) {
        let mut state = self.state();
        if state.open.is_none() {
            let from = state.last_answer.map_or(started, |a| a.min(started));
            state.open = Some(from);
            tracing::warn!(
                "the apiserver did not answer in time: no instance is judged silent until it does"
            );
        }
    }

    /// If stalls within `[from, to]` may have cost an instance with this TTL heartbeats: the
    /// moment from which it gets a fresh TTL.
    pub fn fresh_view(&self, from: Instant, to: Instant, ttl: Duration) -> Option<Instant> {
        self.state().stalls.fresh_view(from, to, ttl)
    }

    /// Whether a request that started at or after `since` has been answered; sends one (a read
    /// of the election Lease, which goes to etcd) when none has. Concurrent callers share a
    /// probe. `false` while a stall is open.
    pub async fn confirmed_since(&self, since: Instant) -> bool {
        let covered =
            |state: &State| state.open.is_none() && state.last_ok.is_some_and(|ok| ok >= since);
        {
            let state = self.state();
            if state.open.is_some() {
                return false;
            }
            if covered(&state) {
                return true;
            }
        }
        let _probe = self.probe.lock().await;
        {
            // The probe this caller waited for may have failed: then its answer stands.
            let state = self.state();
            if state.open.is_some() {
                return false;
            }
            if covered(&state) {
                return true;
            }
        }
        let started = Instant::now();
        match tokio::time::timeout(self.timeout, self.api.get_opt(&self.name)).await {
            Ok(Ok(_)) => {
                self.answered(started);
                true
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "contact check");
                self.unanswered(started);
                false
            }
            Err(_) => {
                self.unanswered(started);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn a_stall_gives_a_fresh_ttl_only_to_instances_whose_silence_it_alone_covered_for_a_quarter_ttl()
     {
        let t = Instant::now();
        let mut stalls = Stalls::default();
        // A late answer under load: 3 s without one.
        stalls.record(t + s(10), t + s(13));
        // An outage: 60 s.
        stalls.record(t + s(100), t + s(160));
        // Late answers under load, again and again.
        for start in [205, 215, 225, 235, 245] {
            stalls.record(t + s(start), t + s(start + 3));
        }
        let cases = [
            // (silence from, to, ttl, fresh view from)
            ("3 s of a 30 s TTL", 0, 40, 30, None),
            ("3 s of a 12 s TTL", 5, 17, 12, Some(13)),
            (
                "3 s of a 12 s TTL, but before its silence began",
                14,
                26,
                12,
                None,
            ),
            ("the outage, any TTL under 240 s", 90, 190, 100, Some(160)),
            (
                "a silence that ends inside the outage: fresh from its end",
                70,
                130,
                100,
                Some(160),
            ),
            ("3 s and 10 s of a 50 s TTL: not added up", 0, 110, 50, None),
            ("13 s of the outage in a 50 s TTL", 0, 113, 50, Some(160)),
            (
                "five 3 s stalls (15 s in all) in a 40 s TTL's window",
                200,
                260,
                40,
                None,
            ),
            ("one of those five in a 12 s TTL", 200, 212, 12, Some(208)),
            ("nothing stalled", 20, 90, 1, None),
        ];
        for (case, from, to, ttl, fresh) in cases {
            assert_eq!(
                stalls.fresh_view(t + s(from), t + s(to), s(ttl)),
                fresh.map(|f| t + s(f)),
                "{case}"
            );
        }
    }

    #[test]
    fn overlapping_stalls_are_one_and_old_ones_are_forgotten() {
        let t = Instant::now();
        let mut stalls = Stalls::default();
        stalls.record(t, t + s(5));
        stalls.record(t + s(3), t + s(8));
        assert_eq!(stalls.spans, [(t, t + s(8))]);
        stalls.record(t + s(8) + LONGEST_TTL + s(1), t + s(8) + LONGEST_TTL + s(2));
        assert_eq!(stalls.spans.len(), 1, "the first ended over an hour before");
    }

    proptest! {
        /// Whatever is recorded, the stalled time any window sees never shrinks when the list
        /// is capped (merging only adds), and spans stay ordered and apart.
        #[test]
        fn capping_never_grants_fewer_fresh_views(gaps in proptest::collection::vec((1u64..50, 1u64..20), 1..600)) {
            let t = Instant::now();
            let mut capped = Stalls::default();
            let mut all: Vec<(Instant, Instant)> = Vec::new();
            let mut at = t;
            for (gap, len) in gaps {
                let from = at + Duration::from_millis(gap);
                let to = from + Duration::from_millis(len);
                capped.record(from, to);
                all.push((from, to));
                at = to;
            }
            prop_assert!(capped.spans.len() <= MAX_STALLS);
            for pair in capped.spans.iter().collect::<Vec<_>>().windows(2) {
                prop_assert!(pair[0].1 < pair[1].0);
            }
            let exact = Stalls { spans: all.into_iter().collect() };
            for ttl_ms in [4u64, 40, 400, 4000] {
                let ttl = Duration::from_millis(ttl_ms);
                if exact.fresh_view(t, at, ttl).is_some() {
                    prop_assert!(capped.fresh_view(t, at, ttl).is_some());
                }
            }
        }
    }
}
