//! Prometheus metrics of the controller, served on `/metrics`.

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use std::time::Instant;

use crate::{Error, api::Phase};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

/// The controller's metrics, and the registry that renders them.
pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    failures: Family<ErrorLabels, Counter>,
    reconcile_duration: Histogram,
    heartbeats: Counter,
    undelivered: Counter,
    status_writes: Counter,
    transitions: Family<PhaseLabels, Counter>,
    expirations: Counter,
    projection_writes: Family<KindLabels, Counter>,
    config_maps_too_large: prometheus_client::metrics::gauge::Gauge,
    probes: Family<ResultLabels, Counter>,
    leader: Gauge,
    undecodable: Gauge,
    protected_scopes: Family<ScopeLabels, Gauge>,
    protection_engagements: Family<ScopeLabels, Counter>,
    protection_releases: Family<ReasonLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScopeLabels {
    scope: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("roster");
        let reconciles = Counter::default();
        let failures = Family::<ErrorLabels, Counter>::default();
        // 1 ms .. ~4 s: a reconcile is one or two API calls on the slow path.
        let reconcile_duration = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 13),
        );
        registry.register(
            "reconciles",
            "ServiceInstance reconciliations",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_failures",
            "ServiceInstance reconciliations that failed, by error kind",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of ServiceInstance reconciliations",
            reconcile_duration.clone(),
        );
        let heartbeats = Counter::default();
        let undelivered = Counter::default();
        registry.register(
            "heartbeats_not_yet_delivered",
            "Silences not believed because a fresh read showed a heartbeat the watch had not \
             delivered yet (a lagging watch)",
            undelivered.clone(),
        );
        let status_writes = Counter::default();
        let transitions = Family::<PhaseLabels, Counter>::default();
        let expirations = Counter::default();
        registry.register(
            "heartbeats_observed",
            "Heartbeats the controller observed",
            heartbeats.clone(),
        );
        registry.register(
            "status_writes",
            "ServiceInstance status writes (one per transition; zero per steady heartbeat)",
            status_writes.clone(),
        );
        registry.register(
            "transitions",
            "ServiceInstance phase transitions, by the phase entered",
            transitions.clone(),
        );
        registry.register(
            "expirations",
            "ServiceInstances deleted after deleteAfterSeconds of observed silence",
            expirations.clone(),
        );
        let projection_writes = Family::<KindLabels, Counter>::default();
        let config_maps_too_large = prometheus_client::metrics::gauge::Gauge::default();
        registry.register(
            "projection_writes",
            "Writes (apply or delete) of Services, EndpointSlices and ConfigMaps, by kind",
            projection_writes.clone(),
        );
        registry.register(
            "config_maps_too_large",
            "Services whose JSON view exceeds the ConfigMap size limit (their ConfigMap is not updated)",
            config_maps_too_large.clone(),
        );
        let probes = Family::<ResultLabels, Counter>::default();
        registry.register(
            "health_checks",
            "Health checks run, by result",
            probes.clone(),
        );
        let undecodable = Gauge::default();
        registry.register(
            "undecodable_instances",
            "ServiceInstances that cannot be decoded (stored before a schema change?) and are skipped",
            undecodable.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease (only the leader writes and probes)",
            leader.clone(),
        );
        let protected_scopes = Family::<ScopeLabels, Gauge>::default();
        let protection_engagements = Family::<ScopeLabels, Counter>::default();
        let protection_releases = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "protected_scopes",
            "Scopes (services, or all instances) under protection against mass expiry now",
            protected_scopes.clone(),
        );
        registry.register(
            "protection_engagements",
            "Times protection against mass expiry engaged, by scope",
            protection_engagements.clone(),
        );
        registry.register(
            "protection_releases",
            "Times protection against mass expiry released, by reason (recovered, time_cap)",
            protection_releases.clone(),
        );
        Metrics {
            undecodable,
            leader,
            protected_scopes,
            protection_engagements,
            protection_releases,
            registry,
            probes,
            projection_writes,
            config_maps_too_large,
            reconciles,
            failures,
            reconcile_duration,
            heartbeats,
            undelivered,
            status_writes,
            transitions,
            expirations,
        }
    }
}

impl Metrics {
    /// Counts a reconcile and measures it until the returned guard drops.
    pub fn reconcile_started(&self) -> ReconcileTimer<'_> {
        self.reconciles.inc();
        ReconcileTimer {
            histogram: &self.reconcile_duration,
            start: Instant::now(),
        }
    }

    pub fn reconcile_failed(&self, error: &Error) {
        self.failures
            .get_or_create(&ErrorLabels {
                error: error.metric_label(),
            })
            .inc();
    }

    pub fn heartbeat_observed(&self) {
        self.heartbeats.inc();
    }

    pub fn heartbeat_not_yet_delivered(&self) {
        self.undelivered.inc();
    }

    pub fn status_written(&self) {
        self.status_writes.inc();
    }

    pub fn transitioned(&self, phase: Phase) {
        let phase = match phase {
            Phase::Pending => "Pending",
            Phase::Ready => "Ready",
            Phase::Unhealthy => "Unhealthy",
            Phase::Draining => "Draining",
        };
        self.transitions.get_or_create(&PhaseLabels { phase }).inc();
    }

    pub fn expired(&self) {
        self.expirations.inc();
    }

    pub fn projection_written(&self, kind: &'static str) {
        self.projection_writes
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    pub fn set_config_maps_too_large(&self, services: usize) {
        self.config_maps_too_large
            .set(i64::try_from(services).unwrap_or(i64::MAX));
    }

    pub fn probed(&self, passed: bool) {
        let result = if passed { "pass" } else { "fail" };
        self.probes.get_or_create(&ResultLabels { result }).inc();
    }

    pub fn set_undecodable(&self, count: usize) {
        self.undecodable
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// Records a change of protection; `engaged` counts the scopes engaged after it.
    pub fn protection_changed(
        &self,
        change: &crate::protection::ChangeKind,
        engaged: impl Iterator<Item = crate::protection::Scope>,
    ) {
        use crate::protection::{ChangeKind, Release, Scope};
        match change {
            ChangeKind::Engaged { .. } => {}
            ChangeKind::Released(release) => {
                let reason = match release {
                    Release::Recovered => "recovered",
                    Release::TimeCap => "time_cap",
                };
                self.protection_releases
                    .get_or_create(&ReasonLabels { reason })
                    .inc();
            }
        }
        let (mut services, mut all) = (0, 0);
        for scope in engaged {
            match scope {
                Scope::All => all += 1,
                Scope::Service { .. } => services += 1,
            }
        }
        for (scope, n) in [("service", services), ("global", all)] {
            self.protected_scopes
                .get_or_create(&ScopeLabels { scope })
                .set(n);
        }
    }

    pub fn protection_engaged(&self, scope: &crate::protection::Scope) {
        let scope = match scope {
            crate::protection::Scope::All => "global",
            crate::protection::Scope::Service { .. } => "service",
        };
        self.protection_engagements
            .get_or_create(&ScopeLabels { scope })
            .inc();
    }

    /// The metrics in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Observes the reconcile duration when dropped, so early returns are measured too.
pub struct ReconcileTimer<'a> {
    histogram: &'a Histogram,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}
