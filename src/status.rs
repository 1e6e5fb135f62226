//! Pure status logic: from a liveness verdict to the status the instance should show, and
//! condition bookkeeping as in apimachinery's `meta.SetStatusCondition` (a transition time
//! moves only when the condition's status does).
//!
//! Messages never contain values that change with every heartbeat, so a steady heartbeat
//! computes the same status and causes no write.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::{
    api::{Phase, ServiceInstanceStatus},
    cache::Instance,
    liveness::{Liveness, Prior, Timing},
    probe::Verdict,
};

/// The condition types of an instance's status, in one place.
pub mod conditions {
    /// Whether the instance should receive traffic.
    pub const READY: &str = "Ready";
    /// Whether heartbeats arrive within the TTL, and from where.
    pub const HEARTBEATING: &str = "Heartbeating";
    /// The result of the instance's health check, if it declares one.
    pub const HEALTH_CHECK: &str = "HealthCheck";
    /// Protection against mass expiry holds the instance (present only then).
    pub const PROTECTED: &str = "Protected";
    /// Set by the projector: the instance, or its service, cannot be projected as asked
    /// (present only then).
    pub const PROJECTED: &str = "Projected";
}

use conditions::{HEALTH_CHECK, HEARTBEATING, PROTECTED, READY};

/// What else the status reports besides the verdict: problems with the heartbeat signals (on
/// the `Heartbeating` condition), the health check, and protection against mass expiry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SignalProblems {
    /// `spec.leaseName` names a Lease that does not exist.
    pub lease_missing: bool,
    /// The heartbeat annotation is present but not an RFC 3339 timestamp.
    pub annotation_not_timestamp: bool,
    /// The verdict of the instance's health check, if it declares one.
    pub health_check: Option<Verdict>,
    /// Protection against mass expiry holds this instance.
    pub protected: Option<Protected>,
}

/// How protection holds an instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Protected {
    /// Why, for the `Protected` condition; stable for the whole episode.
    pub message: String,
    /// Its readiness stays at last-known-good: a silent instance that was live before it fell
    /// silent keeps the phase it had while heartbeating.
    pub hold_readiness: bool,
}

/// What the written status says about liveness, for the next judgement.
pub fn prior(status: Option<&ServiceInstanceStatus>) -> Prior {
    match status.and_then(|s| s.phase) {
        Some(Phase::Ready | Phase::Draining) => Prior::Alive,
        Some(Phase::Unhealthy) => Prior::Silent,
        Some(Phase::Pending) | None => Prior::Unjudged,
    }
}

/// The phase an instance shows for a verdict.
/// A heartbeating instance with a health check is ready only while the check passes; before
/// its first result it is still Pending.
pub fn phase(liveness: Liveness, draining: bool, check: Option<&Verdict>) -> Phase {
    match (liveness, check) {
        (Liveness::Pending, _) => Phase::Pending,
        (Liveness::Alive, Some(Verdict::Failing { .. })) => Phase::Unhealthy,
        (Liveness::Alive, Some(Verdict::Unknown)) => Phase::Pending,
        (Liveness::Alive, _) if draining => Phase::Draining,
        (Liveness::Alive, _) => Phase::Ready,
        (Liveness::Silent | Liveness::Expired, _) => Phase::Unhealthy,
    }
}

/// What the written `HealthCheck` condition says, for a controller that has no result of its
/// own yet (after a restart): the last verdict stands until the first new one.
pub fn health_check_prior(status: Option<&ServiceInstanceStatus>) -> Verdict {
    let condition = status.and_then(|s| s.conditions.iter().find(|c| c.type_ == HEALTH_CHECK));
    match condition.map(|c| (c.status.as_str(), c)) {
        Some(("True", _)) => Verdict::Passing,
        Some(("False", c)) => Verdict::Failing {
            reason: c.reason.clone(),
            message: c.message.clone(),
        },
        _ => Verdict::Unknown,
    }
}

/// The status `si` should have, given the verdict and its `current` status (the one last
/// written, which the cache may not show yet). `now` stamps conditions that change.
pub fn desired(
    si: &Instance,
    timing: Timing,
    current: Option<&ServiceInstanceStatus>,
    liveness: Liveness,
    problems: &SignalProblems,
    now: Timestamp,
) -> ServiceInstanceStatus {
    let spec = &si.spec;
    let generation = si.metadata.generation;
    let ttl = timing.ttl.as_secs();
    let deletion = match timing.delete_after {
        Some(d) => format!("deleted after {} s of silence", d.as_secs()),
        None => "never deleted (deleteAfterSeconds: 0)".to_string(),
    };
    let check = problems.health_check.as_ref();
    let silent = matches!(liveness, Liveness::Silent | Liveness::Expired);
    let held = silent
        && problems
            .protected
            .as_ref()
            .is_some_and(|p| p.hold_readiness);
    let phase = phase(
        if held { Liveness::Alive } else { liveness },
        spec.draining,
        check,
    );
    let (ready, ready_reason, ready_message) = match (phase, check) {
        (Phase::Ready, _) if held => (
            "True",
            "Protected",
            format!(
                "No heartbeat observed for {ttl} s, but protection against mass expiry holds its \
                 last-known-good readiness"
            ),
        ),
        (Phase::Pending, Some(Verdict::Unknown)) if liveness == Liveness::Alive => (
            "Unknown",
            "AwaitingHealthCheck",
            "Heartbeats arrive; waiting for the first health check".to_string(),
        ),
        (Phase::Unhealthy, Some(Verdict::Failing { reason, .. }))
            if liveness == Liveness::Alive =>
        {
            (
                "False",
                "HealthCheckFailing",
                format!("Heartbeats arrive, but the health check fails ({reason})"),
            )
        }
        (Phase::Pending, _) => (
            "Unknown",
            "AwaitingHeartbeat",
            format!("Registered; no heartbeat observed yet (Unhealthy after {ttl} s without one)"),
        ),
        (Phase::Ready, _) => (
            "True",
            "Heartbeating",
            format!("Heartbeats observed within the {ttl} s TTL"),
        ),
        (Phase::Draining, _) => (
            "False",
            "Draining",
            "spec.draining is set: no new traffic; in-flight work drains".to_string(),
        ),
        (Phase::Unhealthy, _) => (
            "False",
            "HeartbeatSilent",
            format!("No heartbeat observed for {ttl} s (the TTL); {deletion}"),
        ),
    };
    let (hb, hb_reason, hb_message) = if problems.lease_missing {
        let lease = spec.lease_name.as_deref().unwrap_or_default();
        (
            liveness_status(liveness),
            "LeaseNotFound",
            format!(
                "Lease {lease:?} (spec.leaseName) does not exist in this namespace; until it does, only \
                 the roster.dev/heartbeat annotation counts"
            ),
        )
    } else if problems.annotation_not_timestamp {
        (
            liveness_status(liveness),
            "HeartbeatNotTimestamp",
            "The roster.dev/heartbeat annotation is not an RFC 3339 timestamp; every change still counts \
             as a heartbeat, but a timestamp lets people read it"
                .to_string(),
        )
    } else {
        let source = if spec.lease_name.is_some() {
            "Lease renewals"
        } else {
            "roster.dev/heartbeat annotation"
        };
        match liveness {
            Liveness::Pending => (
                "Unknown",
                "AwaitingHeartbeat",
                format!("Waiting for the first heartbeat ({source})"),
            ),
            Liveness::Alive => (
                "True",
                "HeartbeatObserved",
                format!("Heartbeats observed ({source})"),
            ),
            Liveness::Silent | Liveness::Expired => (
                "False",
                "HeartbeatSilent",
                format!("No heartbeat observed for {ttl} s ({source})"),
            ),
        }
    };
    let current = liveness_view(current).conditions;
    let condition = |type_: &str, status: &str, reason: &str, message: String| Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: Time(now),
    };
    let conditions = set_condition(
        &current,
        condition(READY, ready, ready_reason, ready_message),
    );
    let mut conditions = set_condition(
        &conditions,
        condition(HEARTBEATING, hb, hb_reason, hb_message),
    );
    if let Some(verdict) = check {
        let kind = match spec
            .health_check
            .as_ref()
            .map(|c| (c.http.is_some(), c.tcp.is_some()))
        {
            Some((true, _)) => "HTTP",
            Some((_, true)) => "TCP",
            _ => "gRPC",
        };
        let (status, reason, message) = match verdict {
            Verdict::Passing => (
                "True",
                "Passing".to_string(),
                format!("The {kind} health check passes"),
            ),
            Verdict::Failing { reason, message } => ("False", reason.clone(), message.clone()),
            Verdict::Unknown => (
                "Unknown",
                "AwaitingFirstCheck".to_string(),
                format!("The {kind} health check has not completed yet"),
            ),
        };
        conditions = set_condition(
            &conditions,
            condition(HEALTH_CHECK, status, &reason, message),
        );
    } else {
        conditions.retain(|c| c.type_ != HEALTH_CHECK);
    }
    match &problems.protected {
        Some(p) => {
            conditions = set_condition(
                &conditions,
                condition(PROTECTED, "True", "MassSilence", p.message.clone()),
            );
        }
        None => conditions.retain(|c| c.type_ != PROTECTED),
    }
    ServiceInstanceStatus {
        phase: Some(phase),
        observed_generation: generation,
        conditions,
    }
}

/// The part of a status that the liveness reconciler owns: phase, observedGeneration, and the
/// `Ready` and `Heartbeating` conditions. Other conditions (the projector's `Projected`) belong
/// to other field managers and are neither compared nor written here.
pub fn liveness_view(status: Option<&ServiceInstanceStatus>) -> ServiceInstanceStatus {
    let Some(status) = status else {
        return ServiceInstanceStatus::default();
    };
    ServiceInstanceStatus {
        phase: status.phase,
        observed_generation: status.observed_generation,
        conditions: status
            .conditions
            .iter()
            .filter(|c| [READY, HEARTBEATING, HEALTH_CHECK, PROTECTED].contains(&c.type_.as_str()))
            .cloned()
            .collect(),
    }
}

fn liveness_status(liveness: Liveness) -> &'static str {
    match liveness {
        Liveness::Alive => "True",
        Liveness::Pending => "Unknown",
        Liveness::Silent | Liveness::Expired => "False",
    }
}

/// Returns `conditions` with `new` in place of the condition of the same type. The existing
/// `lastTransitionTime` is kept unless the status value changes, so an unchanged condition
/// compares equal and causes no write.
pub fn set_condition(conditions: &[Condition], new: Condition) -> Vec<Condition> {
    let mut out: Vec<Condition> = conditions.to_vec();
    match out.iter_mut().find(|c| c.type_ == new.type_) {
        Some(existing) => {
            let since = if existing.status == new.status {
                existing.last_transition_time.clone()
            } else {
                new.last_transition_time.clone()
            };
            *existing = Condition {
                last_transition_time: since,
                ..new
            };
        }
        None => out.push(new),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{InstancePort, ServiceInstance, ServiceInstanceSpec};
    use std::time::Duration;

    const T: Timing = Timing {
        ttl: Duration::from_secs(30),
        delete_after: Some(Duration::from_secs(90)),
    };

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    fn cond(status: &str, reason: &str, secs: i64) -> Condition {
        Condition {
            type_: READY.into(),
            status: status.into(),
            reason: reason.into(),
            message: String::new(),
            observed_generation: Some(1),
            last_transition_time: Time(at(secs)),
        }
    }

    fn instance() -> Instance {
        let mut si = ServiceInstance::new(
            "a",
            ServiceInstanceSpec::new("web", "10.0.0.1", vec![InstancePort::tcp("http", 80)]),
        );
        si.metadata.generation = Some(3);
        si.into()
    }

    fn condition<'a>(s: &'a ServiceInstanceStatus, type_: &str) -> &'a Condition {
        s.conditions
            .iter()
            .find(|c| c.type_ == type_)
            .expect("condition present")
    }

    /// The desired status of a heartbeating instance without problems.
    fn alive(si: &Instance, now: Timestamp) -> ServiceInstanceStatus {
        desired(
            si,
            T,
            si.status.as_ref(),
            Liveness::Alive,
            &SignalProblems::default(),
            now,
        )
    }

    #[test]
    fn set_condition_table() {
        // (existing, new, expected transition second, expected reason)
        let cases = [
            (vec![], cond("True", "A", 20), 20, "A"),
            (vec![cond("True", "A", 10)], cond("True", "B", 20), 10, "B"),
            (vec![cond("True", "A", 10)], cond("False", "B", 20), 20, "B"),
            (
                vec![cond("Unknown", "A", 10)],
                cond("Unknown", "A", 30),
                10,
                "A",
            ),
        ];
        for (existing, new, since, reason) in cases {
            let out = set_condition(&existing, new);
            assert_eq!(out.len(), 1);
            assert_eq!(out[0].last_transition_time.0.as_second(), since);
            assert_eq!(out[0].reason, reason);
        }
    }

    #[test]
    fn phase_and_conditions_table() {
        let none = SignalProblems::default();
        // (verdict, draining, phase, Ready, Ready reason, Heartbeating)
        let cases = [
            (
                Liveness::Pending,
                false,
                Phase::Pending,
                "Unknown",
                "AwaitingHeartbeat",
                "Unknown",
            ),
            (
                Liveness::Alive,
                false,
                Phase::Ready,
                "True",
                "Heartbeating",
                "True",
            ),
            (
                Liveness::Alive,
                true,
                Phase::Draining,
                "False",
                "Draining",
                "True",
            ),
            (
                Liveness::Silent,
                false,
                Phase::Unhealthy,
                "False",
                "HeartbeatSilent",
                "False",
            ),
            (
                Liveness::Silent,
                true,
                Phase::Unhealthy,
                "False",
                "HeartbeatSilent",
                "False",
            ),
        ];
        for (liveness, draining, phase, ready, reason, hb) in cases {
            let mut si = instance();
            si.spec.draining = draining;
            let s = desired(&si, T, si.status.as_ref(), liveness, &none, at(100));
            assert_eq!(s.phase, Some(phase), "{liveness:?} draining={draining}");
            assert_eq!(condition(&s, READY).status, ready);
            assert_eq!(condition(&s, READY).reason, reason);
            assert_eq!(condition(&s, HEARTBEATING).status, hb);
            assert_eq!(s.observed_generation, Some(3));
        }
    }

    #[test]
    fn signal_problems_are_named() {
        let mut si = instance();
        si.spec.lease_name = Some("web-1".into());
        let lease = SignalProblems {
            lease_missing: true,
            ..Default::default()
        };
        let s = desired(&si, T, si.status.as_ref(), Liveness::Pending, &lease, at(1));
        let c = condition(&s, HEARTBEATING);
        assert_eq!(c.reason, "LeaseNotFound");
        assert!(c.message.contains("\"web-1\""), "{}", c.message);
        let annotation = SignalProblems {
            annotation_not_timestamp: true,
            ..Default::default()
        };
        let s = desired(&instance(), T, None, Liveness::Alive, &annotation, at(1));
        assert_eq!(condition(&s, HEARTBEATING).reason, "HeartbeatNotTimestamp");
        assert_eq!(condition(&s, HEARTBEATING).status, "True");
    }

    #[test]
    fn protection_holds_readiness_but_not_the_truth_about_heartbeats() {
        let si = instance();
        let protected = |hold_readiness| SignalProblems {
            protected: Some(Protected {
                message: "6 of 10 fell silent".into(),
                hold_readiness,
            }),
            ..Default::default()
        };
        for liveness in [Liveness::Silent, Liveness::Expired] {
            let held = desired(&si, T, None, liveness, &protected(true), at(1));
            assert_eq!(held.phase, Some(Phase::Ready));
            assert_eq!(condition(&held, READY).reason, "Protected");
            assert_eq!(condition(&held, HEARTBEATING).status, "False");
            assert_eq!(condition(&held, PROTECTED).message, "6 of 10 fell silent");
            // Deletion frozen, readiness not held: Unhealthy, and says why it is still there.
            let frozen = desired(&si, T, None, liveness, &protected(false), at(1));
            assert_eq!(frozen.phase, Some(Phase::Unhealthy));
            assert_eq!(condition(&frozen, PROTECTED).status, "True");
            // Released: the condition goes.
            let released = desired(
                &si,
                T,
                Some(&held),
                liveness,
                &SignalProblems::default(),
                at(2),
            );
            assert_eq!(released.phase, Some(Phase::Unhealthy));
            assert!(released.conditions.iter().all(|c| c.type_ != PROTECTED));
        }
        // A live instance is not changed by holding.
        let alive = desired(&si, T, None, Liveness::Alive, &protected(true), at(1));
        assert_eq!(condition(&alive, READY).reason, "Heartbeating");
    }

    #[test]
    fn steady_state_computes_the_same_status() {
        let mut si = instance();
        let first = alive(&si, at(100));
        si.status = Some(first.clone());
        // Later reconciles of an unchanged, heartbeating instance compute the same status: no write.
        assert_eq!(alive(&si, at(500)), first);
        // A transition changes it, and moves the transition time.
        let silent = desired(
            &si,
            T,
            si.status.as_ref(),
            Liveness::Silent,
            &SignalProblems::default(),
            at(600),
        );
        assert_ne!(silent, first);
        assert_eq!(condition(&silent, READY).last_transition_time.0, at(600));
        // A new generation is a change.
        si.metadata.generation = Some(4);
        assert_ne!(alive(&si, at(700)), first);
    }

    #[test]
    fn other_managers_conditions_are_not_ours() {
        let mut si = instance();
        let mut status = alive(&si, at(1));
        let ours = status.clone();
        status.conditions.push(Condition {
            type_: "Projected".into(),
            ..cond("False", "ServiceConflict", 1)
        });
        si.status = Some(status);
        // The projector's condition neither makes the liveness status differ nor gets copied.
        assert_eq!(liveness_view(si.status.as_ref()), ours);
        assert_eq!(alive(&si, at(2)), ours);
    }

    #[test]
    fn prior_follows_the_written_phase() {
        let mut si = instance();
        assert_eq!(prior(si.status.as_ref()), Prior::Unjudged);
        for (p, want) in [
            (Phase::Pending, Prior::Unjudged),
            (Phase::Ready, Prior::Alive),
            (Phase::Draining, Prior::Alive),
            (Phase::Unhealthy, Prior::Silent),
        ] {
            si.status = Some(ServiceInstanceStatus {
                phase: Some(p),
                ..Default::default()
            });
            assert_eq!(prior(si.status.as_ref()), want);
        }
    }
}
