//! Liveness, judged on the controller's own clock.
//!
//! A heartbeat is the controller *observing* a change (of the `roster.dev/heartbeat` annotation,
//! or of the instance's Lease renewal), timed by the controller's monotonic clock, never by a
//! timestamp a client wrote: client clocks skew, and the wall clock steps. This is how the
//! Kubernetes node lifecycle controller and client-go leader election judge Leases.
//!
//! Everything here is a pure function of data, so the rules are tested with tables and property
//! tests; the controller only records observations and acts on the verdict.

use std::{collections::HashMap, time::Duration};

use crate::cache::digest;

/// A point on the controller's monotonic clock, as time since an arbitrary origin (the process
/// start). Wall-clock steps cannot reach it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tick(pub Duration);

impl Tick {
    pub fn saturating_since(self, earlier: Tick) -> Duration {
        self.0.saturating_sub(earlier.0)
    }
}

impl std::ops::Add<Duration> for Tick {
    type Output = Tick;
    fn add(self, d: Duration) -> Tick {
        Tick(self.0.saturating_add(d))
    }
}

/// How long an instance may stay silent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// Observed silence after which the instance is not ready.
    pub ttl: Duration,
    /// Observed silence after which it is deleted; `None`: never (a persistent instance).
    pub delete_after: Option<Duration>,
}

/// What an instance gets when its spec leaves `ttlSeconds` or `deleteAfterSeconds` out: set per
/// installation (`--default-ttl`, `--default-delete-after`), not in the CRD, so one chart value
/// changes it for every instance that did not choose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Defaults {
    pub ttl: Duration,
    /// `None`: three TTLs (Eureka's and Nacos' ratio); `Some(ZERO)`: never delete.
    pub delete_after: Option<Duration>,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            ttl: Duration::from_secs(30),
            delete_after: None,
        }
    }
}

impl Timing {
    /// The timing of an instance: its own fields where set, else the installation's defaults.
    /// Deletion never comes before the TTL (the CRD enforces that for explicit values; a
    /// default TTL longer than an explicit deleteAfterSeconds is clamped here).
    pub fn of(spec: &crate::api::ServiceInstanceSpec, defaults: &Defaults) -> Timing {
        let secs = |s: i32| Duration::from_secs(u64::try_from(s).unwrap_or(0));
        let ttl = spec
            .ttl_seconds
            .map_or(defaults.ttl, secs)
            .max(Duration::from_secs(1));
        let delete_after = match spec.delete_after_seconds.map(secs) {
            Some(explicit) => Some(explicit),
            None => defaults.delete_after,
        };
        let delete_after = match delete_after {
            Some(Duration::ZERO) => None,
            Some(d) => Some(d.max(ttl)),
            None => Some(ttl * 3),
        };
        Timing { ttl, delete_after }
    }
}

/// What this controller has observed of one instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observed {
    /// When this controller's current view of the instance began: first sight, controller
    /// start, leader change or watch relist, whichever is latest. Silence is never counted from
    /// before it, so every instance gets a full TTL after any of those.
    pub watching_since: Tick,
    /// The last heartbeat this controller observed, if any.
    pub last_heartbeat: Option<Tick>,
}

impl Observed {
    /// Where silence is counted from: the later of the last heartbeat and the view's start.
    pub fn silence_start(&self) -> Tick {
        match self.last_heartbeat {
            Some(hb) if hb > self.watching_since => hb,
            _ => self.watching_since,
        }
    }
}

/// The last verdict written to the instance's status (it survives controller restarts, the
/// in-memory observations do not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prior {
    /// No status yet, or Pending.
    Unjudged,
    Alive,
    Silent,
}

/// The verdict on an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// No heartbeat observed yet, within the TTL of registration.
    Pending,
    /// Heartbeating within its TTL.
    Alive,
    /// Silent for at least the TTL.
    Silent,
    /// Silent for at least `delete_after`: delete it.
    Expired,
}

/// A verdict, and when it can next change if nothing is observed in between.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Judgement {
    pub liveness: Liveness,
    pub next_check: Option<Tick>,
    /// When its TTL ran out, for an instance this controller saw fall silent (`None` for one
    /// that was already silent when the current view began).
    pub silent_since: Option<Tick>,
    /// When the verdict became due: the end of the TTL (Silent) or of `delete_after` (Expired).
    pub due: Option<Tick>,
}

/// Judges an instance at `now`.
///
/// Silence is counted from the later of the last observed heartbeat and the start of the
/// current view; `Expired` therefore never comes before `delete_after` of silence this
/// controller observed itself.
pub fn judge(timing: Timing, observed: Observed, prior: Prior, now: Tick) -> Judgement {
    let silence_start = observed.silence_start();
    let silent = now.saturating_since(silence_start);
    if let Some(delete_after) = timing.delete_after
        && silent >= delete_after
    {
        return Judgement {
            liveness: Liveness::Expired,
            next_check: None,
            silent_since: Some(silence_start + timing.ttl),
            due: Some(silence_start + delete_after),
        };
    }
    if silent >= timing.ttl {
        return Judgement {
            liveness: Liveness::Silent,
            next_check: timing.delete_after.map(|d| silence_start + d),
            silent_since: Some(silence_start + timing.ttl),
            due: Some(silence_start + timing.ttl),
        };
    }
    // Within the TTL: alive if a heartbeat was seen in this view; else (a heartbeat from before
    // a relist proves nothing now) what the status said.
    let heartbeat_in_view = observed
        .last_heartbeat
        .is_some_and(|hb| hb >= observed.watching_since);
    let liveness = match prior {
        _ if heartbeat_in_view => Liveness::Alive,
        Prior::Alive => Liveness::Alive,
        Prior::Silent => Liveness::Silent,
        Prior::Unjudged => Liveness::Pending,
    };
    Judgement {
        liveness,
        next_check: Some(silence_start + timing.ttl),
        silent_since: None,
        due: None,
    }
}

/// The heartbeat signals of an instance at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Signals {
    /// Value of the `roster.dev/heartbeat` annotation.
    pub annotation: Option<String>,
    /// The Lease's renewal, as an opaque token (renewTime and holder); `None` when the instance
    /// names no Lease or the Lease does not exist.
    pub lease: Option<String>,
}

/// Whether going from `before` to `after` is a heartbeat: any change of a present value.
/// (A value disappearing is not a heartbeat; a value appearing is.)
pub fn is_heartbeat(before: &Signals, after: &Signals) -> bool {
    Seen::of(before).heartbeat_to(Seen::of(after))
}

/// What the observations keep of an instance's signals: digests, which tell a change as the
/// values themselves would (two values share one once in 2^64), at 16 bytes and no
/// allocation per instance.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Seen {
    annotation: Option<u64>,
    lease: Option<u64>,
}

impl Seen {
    fn of(signals: &Signals) -> Seen {
        Seen {
            annotation: signals.annotation.as_deref().map(digest),
            lease: signals.lease.as_deref().map(digest),
        }
    }

    fn heartbeat_to(self, after: Seen) -> bool {
        let changed = |a: Option<u64>, b: Option<u64>| b.is_some() && a != b;
        changed(self.annotation, after.annotation) || changed(self.lease, after.lease)
    }
}

/// One look at an instance: who it is and the signals it carries.
#[derive(Clone, Debug)]
pub struct Sight<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
    /// It has no status yet: no controller has seen it before.
    pub fresh: bool,
    pub signals: Signals,
}

/// This controller's memory of every instance's signals and observations. It lives only as
/// long as the process (or the leadership term): after a restart, everything starts afresh,
/// which is what gives every instance a full TTL.
#[derive(Debug, Default)]
pub struct Observations {
    entries: HashMap<(String, String), Entry>,
}

#[derive(Debug)]
struct Entry {
    /// A digest of the uid, to tell a recreated object.
    uid: u64,
    signals: Seen,
    observed: Observed,
}

impl Observations {
    /// Records the signals of instance `namespace/name` seen at `now`, and returns what has been
    /// observed of it and whether this sight was a heartbeat.
    ///
    /// - First sight: not a heartbeat, unless the instance is `fresh` (it has no status, so no
    ///   controller has seen it before) and already carries a signal: a client that registers
    ///   with a heartbeat has heartbeated at registration.
    /// - `view_floor`: the last start or relist of the watches; the view starts no earlier.
    pub fn observe(&mut self, sight: Sight<'_>, now: Tick, view_floor: Tick) -> (Observed, bool) {
        let Sight {
            namespace,
            name,
            uid,
            fresh,
            signals,
        } = sight;
        let key = (namespace.to_string(), name.to_string());
        let (uid, signals) = (digest(uid), Seen::of(&signals));
        match self.entries.get_mut(&key) {
            Some(entry) if entry.uid == uid => {
                let heartbeat = entry.signals.heartbeat_to(signals);
                if heartbeat {
                    entry.observed.last_heartbeat = Some(now);
                }
                entry.signals = signals;
                entry.observed.watching_since = entry.observed.watching_since.max(view_floor);
                (entry.observed, heartbeat)
            }
            _ => {
                let heartbeat = fresh && Seen::default().heartbeat_to(signals);
                let observed = Observed {
                    watching_since: now,
                    last_heartbeat: heartbeat.then_some(now),
                };
                self.entries.insert(
                    key,
                    Entry {
                        uid,
                        signals,
                        observed,
                    },
                );
                (observed, heartbeat)
            }
        }
    }

    /// Starts the instance's view afresh at `now`: its silence so far no longer counts (used
    /// when protection against mass expiry releases it).
    pub fn rebase(&mut self, namespace: &str, name: &str, now: Tick) {
        if let Some(entry) = self
            .entries
            .get_mut(&(namespace.to_string(), name.to_string()))
        {
            entry.observed.watching_since = entry.observed.watching_since.max(now);
        }
    }

    /// Forgets a deleted instance.
    pub fn forget(&mut self, namespace: &str, name: &str) {
        self.entries
            .remove(&(namespace.to_string(), name.to_string()));
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn s(secs: u64) -> Tick {
        Tick(Duration::from_secs(secs))
    }

    const T: Timing = Timing {
        ttl: Duration::from_secs(30),
        delete_after: Some(Duration::from_secs(90)),
    };

    #[test]
    fn timing_takes_the_spec_first_then_the_installation_defaults() {
        let d = |s: u64| Duration::from_secs(s);
        let installed = |ttl: u64, after: Option<u64>| Defaults {
            ttl: d(ttl),
            delete_after: after.map(d),
        };
        // (spec ttl, spec deleteAfter, defaults) -> (ttl, deletion)
        let table = [
            (None, None, Defaults::default(), (30, Some(90))),
            (Some(10), None, Defaults::default(), (10, Some(30))),
            (None, None, installed(5, None), (5, Some(15))),
            (None, None, installed(5, Some(60)), (5, Some(60))),
            (None, None, installed(5, Some(0)), (5, None)),
            (Some(10), Some(0), installed(5, Some(60)), (10, None)),
            (Some(10), Some(40), installed(5, Some(0)), (10, Some(40))),
            // An explicit deletion shorter than the default TTL waits for the TTL.
            (None, Some(10), installed(60, None), (60, Some(60))),
            // A default deletion shorter than an explicit TTL waits for the TTL.
            (Some(120), None, installed(5, Some(60)), (120, Some(120))),
        ];
        for (ttl, after, defaults, (want_ttl, want_after)) in table {
            let mut spec = crate::api::ServiceInstanceSpec::new("web", "10.0.0.1", vec![]);
            spec.ttl_seconds = ttl;
            spec.delete_after_seconds = after;
            let timing = Timing::of(&spec, &defaults);
            assert_eq!(
                (timing.ttl, timing.delete_after),
                (d(want_ttl), want_after.map(d)),
                "ttl {ttl:?}, deleteAfter {after:?}, {defaults:?}"
            );
        }
    }

    #[test]
    fn judge_table() {
        use Liveness::*;
        let seen = |since, hb: Option<u64>| Observed {
            watching_since: s(since),
            last_heartbeat: hb.map(s),
        };
        let persistent = Timing {
            delete_after: None,
            ..T
        };
        // (timing, observed, prior, now, verdict, next check)
        let cases = [
            // New, no heartbeat yet: Pending for a TTL, then Unhealthy, then deleted.
            (T, seen(0, None), Prior::Unjudged, 0, Pending, Some(30)),
            (T, seen(0, None), Prior::Unjudged, 29, Pending, Some(30)),
            (T, seen(0, None), Prior::Unjudged, 30, Silent, Some(90)),
            (T, seen(0, None), Prior::Unjudged, 90, Expired, None),
            // Heartbeating: Alive until TTL after the last heartbeat.
            (T, seen(0, Some(10)), Prior::Unjudged, 39, Alive, Some(40)),
            (T, seen(0, Some(10)), Prior::Alive, 40, Silent, Some(100)),
            (T, seen(0, Some(10)), Prior::Silent, 99, Silent, Some(100)),
            (T, seen(0, Some(10)), Prior::Silent, 100, Expired, None),
            // After a restart (no heartbeat seen yet in this view) the status is kept for a TTL.
            (T, seen(500, None), Prior::Alive, 529, Alive, Some(530)),
            (T, seen(500, None), Prior::Silent, 510, Silent, Some(530)),
            (T, seen(500, None), Prior::Alive, 530, Silent, Some(590)),
            // A relist moves the view's start: a heartbeat from before it does not shorten grace,
            // nor revive an instance the status says is silent.
            (T, seen(500, Some(100)), Prior::Alive, 529, Alive, Some(530)),
            (
                T,
                seen(500, Some(100)),
                Prior::Silent,
                510,
                Silent,
                Some(530),
            ),
            (
                T,
                seen(500, Some(500)),
                Prior::Silent,
                510,
                Alive,
                Some(530),
            ),
            (
                T,
                seen(500, Some(100)),
                Prior::Alive,
                589,
                Silent,
                Some(590),
            ),
            (T, seen(500, Some(100)), Prior::Alive, 590, Expired, None),
            // Persistent instances are never deleted.
            (
                persistent,
                seen(0, Some(0)),
                Prior::Alive,
                1_000_000,
                Silent,
                None,
            ),
        ];
        for (i, (timing, observed, prior, now, liveness, next)) in cases.into_iter().enumerate() {
            let got = judge(timing, observed, prior, s(now));
            assert_eq!(
                (got.liveness, got.next_check),
                (liveness, next.map(s)),
                "case {i}: {observed:?} {prior:?} at {now}"
            );
        }
    }

    #[test]
    fn heartbeat_table() {
        let sig = |a: Option<&str>, l: Option<&str>| Signals {
            annotation: a.map(Into::into),
            lease: l.map(Into::into),
        };
        let cases = [
            (sig(None, None), sig(None, None), false),
            (sig(None, None), sig(Some("t1"), None), true),
            (sig(Some("t1"), None), sig(Some("t1"), None), false),
            (sig(Some("t1"), None), sig(Some("t2"), None), true),
            (sig(Some("t1"), None), sig(None, None), false),
            (sig(None, Some("r1")), sig(None, Some("r1")), false),
            (sig(None, Some("r1")), sig(None, Some("r2")), true),
            (sig(Some("t1"), Some("r1")), sig(Some("t1"), None), false),
        ];
        for (before, after, want) in cases {
            assert_eq!(
                is_heartbeat(&before, &after),
                want,
                "{before:?} -> {after:?}"
            );
        }
    }

    /// One look at instance `ns/name` carrying annotation value `value`.
    fn look(
        obs: &mut Observations,
        name: &str,
        uid: &str,
        fresh: bool,
        value: &str,
        now: Tick,
        floor: Tick,
    ) -> (Observed, bool) {
        let signals = Signals {
            annotation: Some(value.into()),
            lease: None,
        };
        let sight = Sight {
            namespace: "ns",
            name,
            uid,
            fresh,
            signals,
        };
        obs.observe(sight, now, floor)
    }

    #[test]
    fn observations_count_changes_only() {
        let mut obs = Observations::default();
        // An instance seen at controller start (it has a status): a baseline, not a heartbeat.
        let (o, hb) = look(&mut obs, "old", "u1", false, "t0", s(10), s(0));
        assert!(!hb);
        assert_eq!(
            o,
            Observed {
                watching_since: s(10),
                last_heartbeat: None
            }
        );
        // The same value again: nothing. A new value: a heartbeat at the time it is observed.
        assert!(!look(&mut obs, "old", "u1", false, "t0", s(11), s(0)).1);
        let (o, hb) = look(&mut obs, "old", "u1", false, "t1", s(12), s(0));
        assert!(hb);
        assert_eq!(o.last_heartbeat, Some(s(12)));
        // A relist moves the start of the view.
        let (o, _) = look(&mut obs, "old", "u1", false, "t1", s(20), s(15));
        assert_eq!(o.watching_since, s(15));
        // A brand-new instance registered with a heartbeat has heartbeated.
        let (o, hb) = look(&mut obs, "new", "u2", true, "t0", s(30), s(0));
        assert!(hb);
        assert_eq!(o.last_heartbeat, Some(s(30)));
        // Re-created under the same name (new uid): a new instance, not a continuation.
        let (o, hb) = look(&mut obs, "old", "u3", false, "t1", s(40), s(0));
        assert!(!hb);
        assert_eq!(
            o,
            Observed {
                watching_since: s(40),
                last_heartbeat: None
            }
        );
        obs.forget("ns", "old");
        obs.forget("ns", "new");
        assert!(obs.is_empty());
    }

    /// What can happen to one instance, as the controller sees it.
    #[derive(Clone, Debug)]
    enum Step {
        /// Time passes (in ms).
        Wait(u64),
        /// The instance heartbeats and the controller observes it.
        Heartbeat,
        /// The controller restarts (or loses leadership to a new leader): memory is lost.
        Restart,
        /// The watch breaks and relists.
        Relist,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0u64..120_000).prop_map(Step::Wait),
            3 => Just(Step::Heartbeat),
            1 => Just(Step::Restart),
            1 => Just(Step::Relist),
        ]
    }

    proptest! {
        /// No interleaving of heartbeats, restarts and relists ever deletes an instance before
        /// `delete_after` of silence observed since the last heartbeat and the last restart,
        /// and an instance that keeps heartbeating within its TTL is never judged silent.
        #[test]
        fn never_expires_early(
            ttl in 1u64..60,
            factor in 1u64..5,
            persistent in any::<bool>(),
            steps in proptest::collection::vec(step(), 1..80),
        ) {
            let timing = Timing {
                ttl: Duration::from_secs(ttl),
                delete_after: (!persistent).then(|| Duration::from_secs(ttl * factor)),
            };
            let mut now = Tick::default();
            // Ground truth, kept outside the controller's memory.
            let mut last_event = now; // last heartbeat, restart or relist
            let mut last_heartbeat: Option<Tick> = None;
            let mut observed = Observed { watching_since: now, last_heartbeat: None };
            let mut prior = Prior::Unjudged;
            for step in steps {
                match step {
                    Step::Wait(ms) => now = now + Duration::from_millis(ms),
                    Step::Heartbeat => {
                        observed.last_heartbeat = Some(now);
                        last_heartbeat = Some(now);
                        last_event = now;
                    }
                    Step::Restart => {
                        observed = Observed { watching_since: now, last_heartbeat: None };
                        last_event = now;
                    }
                    Step::Relist => {
                        observed.watching_since = now;
                        last_event = now;
                    }
                }
                let j = judge(timing, observed, prior, now);
                let quiet = now.saturating_since(last_event);
                prop_assert!(j.due.is_none_or(|due| due <= now), "due in the future");
                prop_assert!(j.silent_since.is_none_or(|s| s <= now), "silent since a future moment");
                match j.liveness {
                    Liveness::Expired => {
                        let d = timing.delete_after;
                        prop_assert!(d.is_some(), "a persistent instance expired");
                        prop_assert!(quiet >= d.unwrap_or_default(), "expired after {quiet:?} of silence");
                        return Ok(());
                    }
                    Liveness::Silent => {
                        let since_hb = last_heartbeat.map(|hb| now.saturating_since(hb));
                        prop_assert!(since_hb.is_none_or(|d| d >= timing.ttl) || prior == Prior::Silent,
                            "judged silent {since_hb:?} after a heartbeat");
                    }
                    Liveness::Alive => {
                        let in_view = observed.last_heartbeat.is_some_and(|hb| hb >= observed.watching_since);
                        prop_assert!(in_view || prior == Prior::Alive, "revived without a heartbeat in view");
                    }
                    Liveness::Pending => {
                        prop_assert!(last_heartbeat.is_none() || prior == Prior::Unjudged);
                    }
                }
                if let Some(next) = j.next_check {
                    prop_assert!(next > now, "next check {next:?} is not in the future of {now:?}");
                }
                prior = match j.liveness {
                    Liveness::Alive => Prior::Alive,
                    Liveness::Silent => Prior::Silent,
                    _ => prior,
                };
            }
        }
    }
}
