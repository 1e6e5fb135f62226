//! Pure status logic: what an instance's status should be, and condition bookkeeping as in
//! apimachinery's `meta.SetStatusCondition` (a transition time moves only when the status does).

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::api::{ServiceInstance, ServiceInstanceStatus};

/// Condition type that says whether the instance should receive traffic.
pub const READY: &str = "Ready";

/// The status the controller wants for `si` at `now`.
///
/// Until the liveness rules arrive, every instance is Pending with `Ready=Unknown`: the controller
/// has seen it but has observed no heartbeat.
pub fn desired(si: &ServiceInstance, now: Timestamp) -> ServiceInstanceStatus {
    let generation = si.metadata.generation;
    let current = si
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let ready = Condition {
        type_: READY.into(),
        status: "Unknown".into(),
        reason: "AwaitingHeartbeat".into(),
        message: "Registered; no heartbeat observed yet".into(),
        observed_generation: generation,
        last_transition_time: Time(now),
    };
    ServiceInstanceStatus {
        phase: Some("Pending".into()),
        observed_generation: generation,
        conditions: set_condition(current, ready),
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

    fn cond(status: &str, reason: &str, at: i64) -> Condition {
        Condition {
            type_: READY.into(),
            status: status.into(),
            reason: reason.into(),
            message: String::new(),
            observed_generation: Some(1),
            last_transition_time: Time(Timestamp::from_second(at).unwrap_or(Timestamp::UNIX_EPOCH)),
        }
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
    fn desired_is_stable_once_written() {
        let mut si = ServiceInstance::new(
            "a",
            crate::api::ServiceInstanceSpec {
                service: "web".into(),
                address: "10.0.0.1".into(),
                ports: vec![],
            },
        );
        si.metadata.generation = Some(3);
        let first = desired(
            &si,
            Timestamp::from_second(100).unwrap_or(Timestamp::UNIX_EPOCH),
        );
        assert_eq!(first.observed_generation, Some(3));
        si.status = Some(first.clone());
        // Later reconciles of an unchanged object compute the same status: no write.
        let later = desired(
            &si,
            Timestamp::from_second(500).unwrap_or(Timestamp::UNIX_EPOCH),
        );
        assert_eq!(first, later);
        // A new generation is a change.
        si.metadata.generation = Some(4);
        assert_ne!(desired(&si, Timestamp::UNIX_EPOCH), later);
    }
}
