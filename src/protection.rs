//! Protection against mass expiry.
//!
//! When a large share of instances falls silent within one TTL window, the likely cause is a
//! partition or a problem of the apiserver or the controller, not mass death (Eureka's
//! self-preservation, Nacos' protect threshold, Envoy's panic threshold and the node lifecycle
//! controller's zone rules all say so). Then, for the scope that tripped (one service, or all
//! instances together):
//! - no instance of the scope is deleted, and
//! - instances that fell silent within the window keep their last-known-good readiness (they
//!   stay in the projection) instead of dropping out.
//!
//! Protection does not engage below a minimum number of instances (a service of three losing
//! two is not a partition), releases when the silent share drops below the threshold again
//! (recovery), and releases after a maximum duration even without recovery; after that time
//! cap it re-arms only once the share has dropped, so it can never hold a registry forever.
//!
//! Everything here is plain data and functions of `now`, tested with tables and properties;
//! the controller reports each judgement and acts on [`Guard::protects`].

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use crate::liveness::Tick;

/// When a scope's protection engages.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Threshold {
    /// Share (0..=1) of the scope's instances that must fall silent within one TTL window.
    pub share: f64,
    /// Scopes with fewer instances are never protected.
    pub min_instances: usize,
}

/// When protection engages, and how long it may hold.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Policy {
    pub service: Threshold,
    pub global: Threshold,
    /// Protection releases after this long, recovered or not.
    pub max_duration: Duration,
}

/// What is protected together.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    Service { namespace: String, service: String },
    All,
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Service { namespace, service } => write!(f, "service {namespace}/{service}"),
            Scope::All => f.write_str("all instances"),
        }
    }
}

/// A scope's protection state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Normal: expiry and readiness as judged.
    Armed,
    /// Since `since`, because `silent` of `total` instances fell silent within a TTL window.
    Engaged {
        since: Tick,
        silent: usize,
        total: usize,
    },
    /// Released by the time cap; re-arms once the silent share is below the threshold.
    Spent,
}

/// Why protection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    Recovered,
    TimeCap,
}

/// A scope's numbers at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Census {
    pub total: usize,
    /// Instances silent now.
    pub silent: usize,
    /// Silent instances that fell silent within their TTL window before now.
    pub recent: usize,
    /// While engaged: instances whose readiness protection holds (they fell silent within the
    /// window before it engaged, or since).
    pub held: usize,
}

fn at_least(count: usize, share: f64, total: usize) -> bool {
    total > 0 && count as f64 >= share * total as f64
}

/// The next state of a scope.
pub fn step(
    state: State,
    census: Census,
    threshold: Threshold,
    max_duration: Duration,
    now: Tick,
) -> (State, Option<Release>) {
    match state {
        State::Armed
            if census.total >= threshold.min_instances
                && at_least(census.recent, threshold.share, census.total) =>
        {
            let engaged = State::Engaged {
                since: now,
                silent: census.recent,
                total: census.total,
            };
            (engaged, None)
        }
        State::Engaged { .. } if !at_least(census.held, threshold.share, census.total) => {
            (State::Armed, Some(Release::Recovered))
        }
        State::Engaged { since, .. } if now >= since + max_duration => {
            (State::Spent, Some(Release::TimeCap))
        }
        State::Spent if !at_least(census.silent, threshold.share, census.total) => {
            (State::Armed, None)
        }
        state => (state, None),
    }
}

/// Whether an instance is silent, and since when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Silence {
    /// Heartbeating, or not judged silent yet.
    None,
    /// Its TTL ran out at this moment.
    Since(Tick),
    /// It was already silent when this controller's view began: silent, but not "at once".
    Older,
}

/// One instance, as protection sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Tracked {
    service: Scope,
    silence: Silence,
    /// Its TTL: the window within which falling silent counts as "at once".
    window: Duration,
}

impl Tracked {
    fn silent(&self) -> bool {
        self.silence != Silence::None
    }

    fn recent(&self, now: Tick) -> bool {
        matches!(self.silence, Silence::Since(s) if s + self.window > now)
    }

    /// Whether protection engaged at `since` holds this member's readiness.
    fn held(&self, since: Tick) -> bool {
        matches!(self.silence, Silence::Since(s) if s + self.window > since)
    }
}

/// An instance's key: namespace and name.
pub type InstanceKey = (String, String);

/// A change of a scope's protection, to announce, and the instances to judge again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub scope: Scope,
    pub kind: ChangeKind,
    pub affected: Vec<InstanceKey>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    Engaged { silent: usize, total: usize },
    Released(Release),
}

/// What protection does for one instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Protection {
    pub scope: Scope,
    pub silent: usize,
    pub total: usize,
    /// Its readiness is held at last-known-good (it fell silent within the window).
    pub readiness_held: bool,
    /// When the time cap releases it.
    pub until: Tick,
}

/// Protection state of every scope, fed with every judgement.
#[derive(Debug)]
pub struct Guard {
    policy: Policy,
    members: HashMap<InstanceKey, Tracked>,
    scopes: HashMap<Scope, Counts>,
}

#[derive(Debug)]
struct Counts {
    total: usize,
    silent: usize,
    state: State,
}

impl Guard {
    pub fn new(policy: Policy) -> Guard {
        Guard {
            policy,
            members: HashMap::new(),
            scopes: HashMap::new(),
        }
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Records an instance's judgement.
    pub fn report(
        &mut self,
        key: InstanceKey,
        service: Scope,
        silence: Silence,
        window: Duration,
        now: Tick,
    ) -> Vec<Change> {
        let member = Tracked {
            service,
            silence,
            window,
        };
        if self.members.get(&key) == Some(&member) {
            return self.tick(now);
        }
        let old = self.members.insert(key, member.clone());
        let mut scopes = vec![member.service.clone(), Scope::All];
        if let Some(old) = &old {
            self.count(old, -1);
            if old.service != member.service {
                scopes.push(old.service.clone());
            }
        }
        self.count(&member, 1);
        self.step(&scopes, now)
    }

    /// Forgets a deleted instance.
    pub fn forget(&mut self, key: &InstanceKey, now: Tick) -> Vec<Change> {
        let Some(old) = self.members.remove(key) else {
            return Vec::new();
        };
        self.count(&old, -1);
        self.step(&[old.service, Scope::All], now)
    }

    /// Applies the time cap to every engaged scope.
    pub fn tick(&mut self, now: Tick) -> Vec<Change> {
        let engaged: Vec<Scope> = self
            .scopes
            .iter()
            .filter(|(_, c)| matches!(c.state, State::Engaged { .. }))
            .map(|(s, _)| s.clone())
            .collect();
        self.step(&engaged, now)
    }

    /// What protection does for instance `key` now, if anything: deletion is frozen for every
    /// instance of an engaged scope; readiness is held for those that fell silent within the
    /// window.
    pub fn protects(&self, key: &InstanceKey) -> Option<Protection> {
        let member = self.members.get(key)?;
        [member.service.clone(), Scope::All]
            .into_iter()
            .filter_map(|scope| match self.scopes.get(&scope)?.state {
                State::Engaged {
                    since,
                    silent,
                    total,
                } => Some(Protection {
                    readiness_held: member.held(since),
                    until: since + self.policy.max_duration,
                    scope,
                    silent,
                    total,
                }),
                _ => None,
            })
            .max_by_key(|p| p.readiness_held)
    }

    /// Engaged scopes, for the metrics.
    pub fn engaged(&self) -> impl Iterator<Item = &Scope> {
        self.scopes
            .iter()
            .filter(|(_, c)| matches!(c.state, State::Engaged { .. }))
            .map(|(s, _)| s)
    }

    fn count(&mut self, member: &Tracked, delta: isize) {
        for scope in [member.service.clone(), Scope::All] {
            let counts = self.scopes.entry(scope).or_insert(Counts {
                total: 0,
                silent: 0,
                state: State::Armed,
            });
            counts.total = counts.total.saturating_add_signed(delta);
            if member.silent() {
                counts.silent = counts.silent.saturating_add_signed(delta);
            }
        }
    }

    fn in_scope<'a>(
        &'a self,
        scope: &'a Scope,
    ) -> impl Iterator<Item = (&'a InstanceKey, &'a Tracked)> {
        self.members
            .iter()
            .filter(move |(_, m)| *scope == Scope::All || m.service == *scope)
    }

    fn step(&mut self, scopes: &[Scope], now: Tick) -> Vec<Change> {
        let mut changes = Vec::new();
        let mut seen = HashSet::new();
        for scope in scopes {
            if !seen.insert(scope) {
                continue;
            }
            let Some(counts) = self.scopes.get(scope) else {
                continue;
            };
            let threshold = match scope {
                Scope::All => self.policy.global,
                Scope::Service { .. } => self.policy.service,
            };
            let state = counts.state;
            let mut census = Census {
                total: counts.total,
                silent: counts.silent,
                recent: 0,
                held: 0,
            };
            // The scans are only paid where they can change the outcome.
            match state {
                State::Armed
                    if census.total >= threshold.min_instances
                        && at_least(census.silent, threshold.share, census.total) =>
                {
                    census.recent = self.in_scope(scope).filter(|(_, m)| m.recent(now)).count();
                }
                State::Engaged { since, .. } => {
                    census.held = self.in_scope(scope).filter(|(_, m)| m.held(since)).count();
                }
                _ => {}
            }
            let (next, release) = step(state, census, threshold, self.policy.max_duration, now);
            let kind = match (state, next, release) {
                (State::Armed, State::Engaged { silent, total, .. }, _) => {
                    Some((ChangeKind::Engaged { silent, total }, next))
                }
                (State::Engaged { .. }, _, Some(r)) => Some((ChangeKind::Released(r), state)),
                _ => None,
            };
            if let Some((kind, engaged)) = kind {
                let State::Engaged { since, .. } = engaged else {
                    unreachable!("both arms carry an engaged state")
                };
                let _ = since;
                let mut affected: Vec<InstanceKey> = self
                    .in_scope(scope)
                    .filter(|(_, m)| m.silent())
                    .map(|(k, _)| k.clone())
                    .collect();
                affected.sort();
                changes.push(Change {
                    scope: scope.clone(),
                    kind,
                    affected,
                });
            }
            if let Some(counts) = self.scopes.get_mut(scope) {
                counts.state = next;
                if counts.total == 0 && next == State::Armed {
                    self.scopes.remove(scope);
                }
            }
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn s(secs: u64) -> Tick {
        Tick(Duration::from_secs(secs))
    }

    const T: Threshold = Threshold {
        share: 0.5,
        min_instances: 4,
    };
    const CAP: Duration = Duration::from_secs(600);

    #[test]
    fn step_table() {
        use State::*;
        let census = |total, silent, recent, held| Census {
            total,
            silent,
            recent,
            held,
        };
        let engaged = |since| Engaged {
            since: s(since),
            silent: 6,
            total: 10,
        };
        // (state, census, now, next state, release)
        let cases = [
            // Half of ten fell silent within the window: engage.
            (Armed, census(10, 6, 6, 0), 100, engaged(100), None),
            (
                Armed,
                census(10, 5, 5, 0),
                100,
                Engaged {
                    since: s(100),
                    silent: 5,
                    total: 10,
                },
                None,
            ),
            // Below the share, or the silence is old (not within one window): stay armed.
            (Armed, census(10, 4, 4, 0), 100, Armed, None),
            (Armed, census(10, 9, 2, 0), 100, Armed, None),
            // Below the minimum size: never.
            (Armed, census(3, 3, 3, 0), 100, Armed, None),
            // Engaged: holds while the held share stays, releases on recovery.
            (engaged(100), census(10, 6, 0, 6), 200, engaged(100), None),
            (
                engaged(100),
                census(10, 6, 0, 4),
                200,
                Armed,
                Some(Release::Recovered),
            ),
            // The time cap releases without recovery, and then it stays spent...
            (
                engaged(100),
                census(10, 6, 0, 6),
                700,
                Spent,
                Some(Release::TimeCap),
            ),
            (Spent, census(10, 6, 6, 0), 800, Spent, None),
            // ...until the silent share drops (deleted or recovered): then it re-arms.
            (Spent, census(4, 0, 0, 0), 900, Armed, None),
        ];
        for (i, (state, census, now, next, release)) in cases.into_iter().enumerate() {
            assert_eq!(
                step(state, census, T, CAP, s(now)),
                (next, release),
                "case {i}: {state:?} {census:?} at {now}"
            );
        }
    }

    fn key(name: &str) -> InstanceKey {
        ("ns".to_string(), name.to_string())
    }

    fn svc(name: &str) -> Scope {
        Scope::Service {
            namespace: "ns".into(),
            service: name.into(),
        }
    }

    fn guard() -> Guard {
        Guard::new(Policy {
            service: T,
            global: Threshold {
                share: 0.5,
                min_instances: 8,
            },
            max_duration: CAP,
        })
    }

    const TTL: Duration = Duration::from_secs(30);

    /// Reports `n` alive instances of service `service` named `<service>-<i>`.
    fn register(g: &mut Guard, service: &str, n: usize) {
        for i in 0..n {
            g.report(
                key(&format!("{service}-{i}")),
                svc(service),
                Silence::None,
                TTL,
                s(0),
            );
        }
    }

    #[test]
    fn a_service_losing_half_within_a_ttl_is_protected_until_it_recovers() {
        let mut g = guard();
        register(&mut g, "a", 6);
        register(&mut g, "b", 6);
        // Two of a's six fall silent: a third, not protected; nothing held.
        g.report(key("a-0"), svc("a"), Silence::Since(s(100)), TTL, s(100));
        g.report(key("a-1"), svc("a"), Silence::Since(s(101)), TTL, s(101));
        assert_eq!(g.protects(&key("a-0")), None);
        // The third makes half: a engages, and the two before it are held too.
        let changes = g.report(key("a-2"), svc("a"), Silence::Since(s(102)), TTL, s(102));
        assert_eq!(
            changes,
            vec![Change {
                scope: svc("a"),
                kind: ChangeKind::Engaged {
                    silent: 3,
                    total: 6
                },
                affected: vec![key("a-0"), key("a-1"), key("a-2")],
            }]
        );
        let p = g.protects(&key("a-0")).expect("protected");
        assert!(p.readiness_held);
        assert_eq!(p.until, s(102) + CAP);
        // Its alive instances: deletion frozen, readiness not held (it is live anyway).
        assert!(!g.protects(&key("a-5")).expect("in scope").readiness_held);
        // Service b is untouched; 3 of 12 overall is below the global share.
        assert_eq!(g.protects(&key("b-0")), None);
        // Recovery: one heartbeats again, two of six held is below half: released.
        let changes = g.report(key("a-0"), svc("a"), Silence::None, TTL, s(150));
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].kind, ChangeKind::Released(Release::Recovered));
        assert_eq!(changes[0].affected, vec![key("a-1"), key("a-2")]);
        assert_eq!(g.protects(&key("a-1")), None);
    }

    #[test]
    fn slow_attrition_does_not_engage() {
        let mut g = guard();
        register(&mut g, "a", 6);
        // One instance a TTL apart: never more than one within a window.
        for (i, at) in [(0, 100), (1, 140), (2, 180), (3, 220)] {
            let changes = g.report(
                key(&format!("a-{i}")),
                svc("a"),
                Silence::Since(s(at)),
                TTL,
                s(at),
            );
            assert_eq!(changes, vec![], "at {at}");
        }
        assert_eq!(g.protects(&key("a-0")), None);
    }

    #[test]
    fn the_time_cap_releases_and_the_scope_rearms_only_after_the_share_drops() {
        let mut g = guard();
        register(&mut g, "a", 4);
        for i in 0..3 {
            g.report(
                key(&format!("a-{i}")),
                svc("a"),
                Silence::Since(s(10)),
                TTL,
                s(10),
            );
        }
        assert!(g.protects(&key("a-0")).is_some());
        assert_eq!(g.tick(s(10) + (CAP - Duration::from_secs(1))), vec![]);
        let changes = g.tick(s(10) + CAP);
        assert_eq!(changes[0].kind, ChangeKind::Released(Release::TimeCap));
        assert_eq!(g.protects(&key("a-0")), None);
        // Still silent: it does not engage again...
        g.report(key("a-3"), svc("a"), Silence::Since(s(700)), TTL, s(700));
        assert_eq!(g.protects(&key("a-3")), None);
        // ...until the silent ones are gone and it happens anew.
        for i in 0..4 {
            g.forget(&key(&format!("a-{i}")), s(800));
        }
        register(&mut g, "a", 4);
        for i in 0..2 {
            g.report(
                key(&format!("a-{i}")),
                svc("a"),
                Silence::Since(s(900)),
                TTL,
                s(900),
            );
        }
        assert!(g.protects(&key("a-0")).is_some());
    }

    #[test]
    fn the_global_scope_catches_what_no_single_service_shows() {
        let mut g = guard();
        // Eight services of one instance each (below the per-service minimum).
        for i in 0..8 {
            g.report(
                key(&format!("s{i}")),
                svc(&format!("s{i}")),
                Silence::None,
                TTL,
                s(0),
            );
        }
        for i in 0..3 {
            g.report(
                key(&format!("s{i}")),
                svc(&format!("s{i}")),
                Silence::Since(s(50)),
                TTL,
                s(50),
            );
        }
        assert_eq!(g.protects(&key("s0")), None);
        let changes = g.report(key("s3"), svc("s3"), Silence::Since(s(51)), TTL, s(51));
        assert_eq!(changes[0].scope, Scope::All);
        let p = g.protects(&key("s0")).expect("protected");
        assert_eq!((p.scope, p.silent, p.total), (Scope::All, 4, 8));
    }

    proptest! {
        /// Whatever happens, protection never engages below the minimum size, and never
        /// outlives its time cap.
        #[test]
        fn bounded(events in prop::collection::vec((0usize..12, prop::option::of(0u64..50), 0u64..5), 1..200)) {
            let mut g = guard();
            let mut now = 0;
            for (i, silent, dt) in events {
                now += dt;
                let k = key(&format!("a-{}", i % 6));
                if i >= 6 && i % 3 == 0 {
                    g.forget(&k, s(now));
                } else {
                    g.report(k, svc("a"), silent.map_or(Silence::None, |x| Silence::Since(s(now.saturating_sub(x)))), TTL, s(now));
                }
                for scope in g.engaged().cloned().collect::<Vec<_>>() {
                    let counts = &g.scopes[&scope];
                    let State::Engaged { since, total, .. } = counts.state else { unreachable!() };
                    prop_assert!(total >= T.min_instances);
                    prop_assert!(s(now) < since + CAP, "engaged past the cap: since {since:?}, now {now}");
                }
                g.tick(s(now));
            }
        }
    }
}
