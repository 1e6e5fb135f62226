//! Choosing an endpoint per request: the discovery client's load balancing, as pure logic over
//! data. Discovery feeds [`Balancer::set_endpoints`] from its watch; callers ask
//! [`Balancer::pick`] for an endpoint and hold the returned [`Pick`] while their request is in
//! flight, which is what [`Strategy::LeastOutstanding`] counts.
//!
//! Zone preference comes first: with a `local_zone` set, and at least one endpoint in that
//! zone, only the endpoints of that zone are candidates; otherwise every endpoint is. The
//! strategy then chooses among the candidates, which are ordered by name (then address), so
//! round-robin is deterministic.
//!
//! Weights are consulted by [`Strategy::WeightedRandom`] only: an endpoint of weight 0 is never
//! chosen while a candidate of positive weight exists, and when every candidate has weight 0
//! the choice is uniform (a service whose instances all say "no traffic" still answers rather
//! than failing every request). Round-robin and least-outstanding ignore weights.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    ops::Deref,
    str::FromStr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

/// One instance of a service, as the balancer sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The `ServiceInstance` name. With `address`, it identifies the endpoint.
    pub name: String,
    pub address: String,
    /// Ports by name.
    pub ports: BTreeMap<String, u16>,
    pub zone: Option<String>,
    /// Relative weight for [`Strategy::WeightedRandom`]; 0 means "no traffic" (see the module
    /// documentation for the all-zero case). The API's `weight` is an `i32` in `0..=10000`.
    pub weight: u32,
}

/// How the balancer chooses among the candidates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Each candidate in turn, by name.
    RoundRobin,
    /// At random, with probability proportional to weight.
    WeightedRandom,
    /// The candidate with the fewest picks in flight; ties in turn, as round-robin.
    LeastOutstanding,
}

impl Strategy {
    /// Every strategy, in the order of the error message's valid values.
    pub const ALL: [Strategy; 3] = [
        Self::RoundRobin,
        Self::WeightedRandom,
        Self::LeastOutstanding,
    ];

    /// The strategy's name in configuration.
    pub fn name(self) -> &'static str {
        match self {
            Self::RoundRobin => "round-robin",
            Self::WeightedRandom => "weighted-random",
            Self::LeastOutstanding => "least-outstanding",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A strategy name that is not one of the valid values.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown load-balancing strategy {0:?}; valid values are round-robin, weighted-random, \
     least-outstanding"
)]
pub struct ParseStrategyError(pub String);

impl FromStr for Strategy {
    type Err = ParseStrategyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let found = Self::ALL.into_iter().find(|strategy| strategy.name() == s);
        found.ok_or_else(|| ParseStrategyError(s.to_owned()))
    }
}

/// An endpoint with its count of picks in flight. The count is shared with every [`Pick`] of
/// the endpoint, so a pick dropped after its endpoint left the set decrements a counter nobody
/// reads any more, and never one it did not increment.
struct Slot {
    endpoint: Endpoint,
    outstanding: Arc<AtomicUsize>,
}

struct State {
    /// Sorted by (name, address), one per (name, address).
    slots: Vec<Slot>,
    /// Round-robin position; also breaks least-outstanding ties.
    cursor: usize,
    /// splitmix64 state.
    rng: u64,
}

/// Chooses endpoints for requests. `Send + Sync`: share it (in an `Arc`) across tasks.
pub struct Balancer {
    strategy: Strategy,
    local_zone: Option<String>,
    state: Mutex<State>,
}

/// A chosen endpoint, counted as outstanding until dropped.
#[derive(Debug)]
pub struct Pick {
    endpoint: Endpoint,
    outstanding: Arc<AtomicUsize>,
}

impl Pick {
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }
}

impl Deref for Pick {
    type Target = Endpoint;
    fn deref(&self) -> &Endpoint {
        &self.endpoint
    }
}

impl Drop for Pick {
    fn drop(&mut self) {
        // Balanced by the increment in `Balancer::pick` on this very counter: cannot underflow.
        self.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Balancer {
    /// An empty balancer, its random choices seeded from the clock and a process-wide counter.
    pub fn new(strategy: Strategy, local_zone: Option<String>) -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let count = COUNTER.fetch_add(1, Ordering::Relaxed);
        let seed = nanos ^ count.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Balancer {
            strategy,
            local_zone,
            state: Mutex::new(State {
                slots: Vec::new(),
                cursor: 0,
                rng: seed,
            }),
        }
    }

    /// The same balancer with a fixed seed, so weighted choices are reproducible (for tests).
    pub fn with_seed(self, seed: u64) -> Self {
        self.lock().rng = seed;
        self
    }

    /// Replaces the endpoint set. Endpoints that remain (same name and address) keep their
    /// outstanding counts, whatever else changed; of duplicates, the first one given wins.
    pub fn set_endpoints(&self, endpoints: Vec<Endpoint>) {
        let mut state = self.lock();
        let mut counters: HashMap<(String, String), Arc<AtomicUsize>> = state
            .slots
            .drain(..)
            .map(|s| ((s.endpoint.name, s.endpoint.address), s.outstanding))
            .collect();
        let mut endpoints = endpoints;
        // Stable: the first of duplicates stays first, and `dedup_by` keeps it.
        endpoints.sort_by(|a, b| (&a.name, &a.address).cmp(&(&b.name, &b.address)));
        endpoints.dedup_by(|b, a| a.name == b.name && a.address == b.address);
        state.slots = endpoints
            .into_iter()
            .map(|endpoint| {
                let key = (endpoint.name.clone(), endpoint.address.clone());
                let outstanding = counters.remove(&key).unwrap_or_default();
                Slot {
                    endpoint,
                    outstanding,
                }
            })
            .collect();
    }

    /// Picks in flight on the endpoint `name` at `address`, or `None` if it is not in the set.
    pub fn outstanding(&self, name: &str, address: &str) -> Option<usize> {
        self.lock()
            .slots
            .iter()
            .find(|s| s.endpoint.name == name && s.endpoint.address == address)
            .map(|s| s.outstanding.load(Ordering::Relaxed))
    }

    /// Chooses an endpoint, or `None` if the set is empty.
    pub fn pick(&self) -> Option<Pick> {
        let mut state = self.lock();
        let state = &mut *state;
        let local = |s: &Slot| self.local_zone.is_some() && s.endpoint.zone == self.local_zone;
        let any_local = state.slots.iter().any(local);
        let candidates: Vec<&Slot> = state
            .slots
            .iter()
            .filter(|s| !any_local || local(s))
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let n = candidates.len();
        let chosen = match self.strategy {
            Strategy::WeightedRandom => {
                let weights: Vec<u64> = candidates
                    .iter()
                    .map(|s| s.endpoint.weight.into())
                    .collect();
                weighted_index(&weights, splitmix64(&mut state.rng))
            }
            Strategy::RoundRobin | Strategy::LeastOutstanding => {
                // In turn from the cursor; least-outstanding takes the least loaded of them, and
                // `min_by_key` the first of equals, so ties go in turn too.
                let start = state.cursor % n;
                let load = |i: usize| match self.strategy {
                    Strategy::LeastOutstanding => candidates[i].outstanding.load(Ordering::Relaxed),
                    _ => 0,
                };
                let i = (start..start + n)
                    .map(|i| i % n)
                    .min_by_key(|&i| load(i))
                    .unwrap_or(start);
                state.cursor = i + 1;
                i
            }
        };
        let slot = candidates[chosen];
        slot.outstanding.fetch_add(1, Ordering::Relaxed);
        let outstanding = Arc::clone(&slot.outstanding);
        Some(Pick {
            endpoint: slot.endpoint.clone(),
            outstanding,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Nothing leaves the state half-updated on a panic, so a poisoned lock is still sound.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One step of splitmix64 (Steele, Lea, Flood 2014): small, fast, and good enough to spread
/// requests; not for anything secret.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// An index into `weights` with probability proportional to weight, from a uniform `draw`;
/// uniform over all indexes if every weight is 0. `weights` must not be empty.
fn weighted_index(weights: &[u64], draw: u64) -> usize {
    let total: u64 = weights.iter().sum();
    if total == 0 {
        return below(draw, weights.len() as u64) as usize;
    }
    let mut target = below(draw, total);
    for (i, &w) in weights.iter().enumerate() {
        if target < w {
            return i;
        }
        target -= w;
    }
    weights.len() - 1 // unreachable: target < total
}

/// Maps a uniform `u64` onto `0..bound` by multiply-and-shift (Lemire); `bound` must be > 0.
fn below(x: u64, bound: u64) -> u64 {
    ((u128::from(x) * u128::from(bound)) >> 64) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{ProptestConfig, prop_assert, prop_assert_eq, proptest};
    use proptest::{sample::select, strategy::Strategy as _};

    const ADDRESS: &str = "10.0.0.1";

    /// Endpoints at `ADDRESS` from words `name[@zone][=weight]`; the weight defaults to 1.
    fn set(spec: &str) -> Vec<Endpoint> {
        let endpoint = |word: &str| {
            let (word, weight) = word.split_once('=').unwrap_or((word, "1"));
            let (name, zone) = word
                .split_once('@')
                .map_or((word, None), |(n, z)| (n, Some(z)));
            Endpoint {
                name: name.to_owned(),
                address: ADDRESS.to_owned(),
                ports: BTreeMap::from([("http".to_owned(), 8080)]),
                zone: zone.map(str::to_owned),
                weight: weight.parse().expect("a weight"),
            }
        };
        spec.split_whitespace().map(endpoint).collect()
    }

    fn balancer(strategy: Strategy, zone: Option<&str>, spec: &str) -> Balancer {
        let b = Balancer::new(strategy, zone.map(str::to_owned)).with_seed(7);
        b.set_endpoints(set(spec));
        b
    }

    /// `n` picks, held.
    fn hold(b: &Balancer, n: usize) -> Vec<Pick> {
        (0..n).map(|_| b.pick().expect("an endpoint")).collect()
    }

    fn names(picks: &[Pick]) -> Vec<&str> {
        picks.iter().map(|p| p.name.as_str()).collect()
    }

    /// How often each name is picked in `n` picks, each dropped at once.
    fn counts(b: &Balancer, n: usize) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for _ in 0..n {
            let pick = b.pick().expect("an endpoint");
            *counts.entry(pick.name.clone()).or_default() += 1;
        }
        counts
    }

    #[test]
    fn zone_preference() {
        let table: [(Option<&str>, &[&str]); 4] = [
            (Some("z1"), &["a"]),           // local zone present: only local
            (Some("z2"), &["b"]),           // ...whichever it is
            (Some("z9"), &["a", "b", "c"]), // local zone absent: all
            (None, &["a", "b", "c"]),       // no local zone: all
        ];
        for strategy in Strategy::ALL {
            for (zone, want) in table {
                let got = counts(&balancer(strategy, zone, "a@z1 b@z2 c"), 300);
                let got: Vec<&str> = got.keys().map(String::as_str).collect();
                assert_eq!(got, want, "{strategy} with local zone {zone:?}");
            }
        }
    }

    #[test]
    fn empty_set_picks_none() {
        for strategy in Strategy::ALL {
            let b = balancer(strategy, Some("z1"), "");
            assert!(b.pick().is_none(), "{strategy}");
            b.set_endpoints(set("a"));
            assert!(b.pick().is_some(), "{strategy}");
            b.set_endpoints(vec![]);
            assert!(b.pick().is_none(), "{strategy}");
        }
    }

    #[test]
    fn strategy_parsing() {
        for (text, want) in [
            ("round-robin", Strategy::RoundRobin),
            ("weighted-random", Strategy::WeightedRandom),
            ("least-outstanding", Strategy::LeastOutstanding),
        ] {
            assert_eq!(text.parse::<Strategy>(), Ok(want));
            assert_eq!(want.to_string(), text);
        }
        let valid = "valid values are round-robin, weighted-random, least-outstanding";
        for bad in ["", "RoundRobin", "round_robin", "random"] {
            let err = bad.parse::<Strategy>().expect_err(bad).to_string();
            assert_eq!(
                err,
                format!("unknown load-balancing strategy {bad:?}; {valid}")
            );
        }
    }

    #[test]
    fn round_robin_picks_each_endpoint_k_times() {
        let b = balancer(Strategy::RoundRobin, None, "e b=9 d=0 a c");
        assert_eq!(names(&hold(&b, 5)), ["a", "b", "c", "d", "e"], "by name");
        let got = counts(&b, 7 * 5);
        assert_eq!(got.values().copied().collect::<Vec<_>>(), [7; 5], "{got:?}");
    }

    #[test]
    fn duplicates_collapse_to_the_first() {
        let b = balancer(Strategy::RoundRobin, None, "b a@z1 a@z2");
        let picks = hold(&b, 4);
        let zones: Vec<Option<&str>> = picks.iter().map(|p| p.zone.as_deref()).collect();
        assert_eq!(zones, [Some("z1"), None, Some("z1"), None]);
    }

    /// Pearson's chi-square of observed counts against expected proportions.
    fn chi_square(observed: &[usize], weights: &[f64]) -> f64 {
        let n: usize = observed.iter().sum();
        let total: f64 = weights.iter().sum();
        let term = |(&o, &w): (&usize, &f64)| {
            let e = n as f64 * w / total;
            (o as f64 - e).powi(2) / e
        };
        observed.iter().zip(weights).map(term).sum()
    }

    #[test]
    fn weighted_random_follows_weights() {
        // Critical value of chi-square for 3 degrees of freedom at p = 0.001.
        const CRITICAL: f64 = 16.27;
        let observed = |strategy| -> Vec<usize> {
            let b = balancer(strategy, None, "w1=1 w2=2 w3=3 w4=4");
            counts(&b, 100_000).into_values().collect()
        };
        let weights = [1.0, 2.0, 3.0, 4.0];
        let weighted = chi_square(&observed(Strategy::WeightedRandom), &weights);
        assert!(weighted < CRITICAL, "chi-square {weighted} over {CRITICAL}");
        // The check has teeth: a uniform picker (round-robin) fails it by orders of magnitude.
        let uniform = chi_square(&observed(Strategy::RoundRobin), &weights);
        assert!(uniform > 100.0 * CRITICAL, "uniform: only {uniform}");
    }

    #[test]
    fn weight_zero_only_when_all_zero() {
        let b = balancer(Strategy::WeightedRandom, None, "a=0 b=5 c=0 d=1");
        assert_eq!(counts(&b, 10_000).keys().collect::<Vec<_>>(), ["b", "d"]);
        // All zero: uniform, so every endpoint gets about a third.
        let b = balancer(Strategy::WeightedRandom, None, "a=0 b=0 c=0");
        let got = counts(&b, 30_000);
        assert!(got.values().all(|c| (9_000..11_000).contains(c)), "{got:?}");
    }

    #[test]
    fn least_outstanding_steers_away_from_load() {
        let b = balancer(Strategy::LeastOutstanding, None, "a");
        let held_a = hold(&b, 3);
        // "a" stays in the set (its zone and weight change), so it keeps its three in flight.
        b.set_endpoints(set("a@z1=5 b c"));
        assert_eq!(b.outstanding("a", ADDRESS), Some(3));
        let held = hold(&b, 6);
        assert_eq!(names(&held), ["b", "c", "b", "c", "b", "c"]);
        // Releasing a's load brings the new picks back to it.
        drop(held_a);
        let next = hold(&b, 3);
        assert_eq!(names(&next), ["a", "a", "a"]);
        drop((held, next));
        for name in ["a", "b", "c"] {
            assert_eq!(b.outstanding(name, ADDRESS), Some(0), "{name}");
        }
        // With equal load, picks spread evenly.
        assert_eq!(counts(&b, 300).into_values().collect::<Vec<_>>(), [100; 3]);
    }

    #[test]
    fn pick_outlives_its_endpoint() {
        let b = balancer(Strategy::LeastOutstanding, None, "a");
        let held = hold(&b, 1);
        b.set_endpoints(set("b"));
        assert_eq!(b.outstanding("a", ADDRESS), None);
        drop(held);
        // Back in the set, it starts afresh rather than inheriting a stale count.
        b.set_endpoints(set("a"));
        assert_eq!(b.outstanding("a", ADDRESS), Some(0));
    }

    #[test]
    fn shared_across_threads() {
        let b = balancer(Strategy::LeastOutstanding, None, "a b");
        // Picks made on several threads, held, and dropped on this one.
        let held: Vec<Pick> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..4).map(|_| scope.spawn(|| hold(&b, 50))).collect();
            threads
                .into_iter()
                .flat_map(|t| t.join().expect("no panic"))
                .collect()
        });
        assert_eq!(b.outstanding("a", ADDRESS), Some(100));
        assert_eq!(b.outstanding("b", ADDRESS), Some(100));
        drop(held);
        assert_eq!(b.outstanding("a", ADDRESS), Some(0));
    }

    fn endpoints() -> impl proptest::strategy::Strategy<Value = Vec<Endpoint>> {
        let zone = select(vec![None, Some("z1"), Some("z2")]);
        let spec = (0u8..3, zone, 0u32..3);
        proptest::collection::vec(spec, 0..8).prop_map(|specs| {
            let endpoint = |(i, (host, zone, weight)): (usize, (u8, Option<&str>, u32))| Endpoint {
                name: format!("i{i}"), // unique
                address: format!("10.0.0.{host}"),
                ports: BTreeMap::from([("http".to_owned(), 80)]),
                zone: zone.map(str::to_owned),
                weight,
            };
            specs.into_iter().enumerate().map(endpoint).collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Every pick is a candidate (zone preference, and positive weight where any is), and
        /// the outstanding counts track the picks held.
        #[test]
        fn picks_are_candidates(
            endpoints in endpoints(),
            strategy in select(Strategy::ALL.to_vec()),
            zone in select(vec![None, Some("z1"), Some("z3")]),
            seed in 0u64..u64::MAX,
            n in 0usize..40,
        ) {
            let b = Balancer::new(strategy, zone.map(str::to_owned)).with_seed(seed);
            b.set_endpoints(endpoints.clone());
            let local: Vec<&Endpoint> =
                endpoints.iter().filter(|e| zone.is_some() && e.zone.as_deref() == zone).collect();
            let candidates = if local.is_empty() { endpoints.iter().collect() } else { local };
            let weighted =
                strategy == Strategy::WeightedRandom && candidates.iter().any(|e| e.weight > 0);
            let held: Vec<Pick> = (0..n).map_while(|_| b.pick()).collect();
            prop_assert_eq!(held.len(), if endpoints.is_empty() { 0 } else { n });
            for p in &held {
                prop_assert!(candidates.contains(&p.endpoint()), "{:?} not a candidate", p);
                prop_assert!(!weighted || p.weight > 0, "{:?} has weight 0", p);
            }
            let in_flight = |b: &Balancer| -> usize {
                endpoints.iter().filter_map(|e| b.outstanding(&e.name, &e.address)).sum()
            };
            prop_assert_eq!(in_flight(&b), held.len());
            drop(held);
            prop_assert_eq!(in_flight(&b), 0);
        }
    }
}
