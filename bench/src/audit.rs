//! API requests counted from the apiserver's audit log, per identity: the benchmark never
//! trusts a component's own counters.

use std::path::Path;

use jiff::Timestamp;
use serde::Deserialize;

/// The audit policy: every request at Metadata level, once, when its response is complete.
pub const POLICY: &str = r#"apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived", "ResponseStarted"]
rules:
  - level: Metadata
"#;

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    verb: String,
    user: User,
    #[serde(default)]
    object_ref: Option<ObjectRef>,
    request_received_timestamp: Timestamp,
    stage_timestamp: Timestamp,
}

#[derive(Clone, Debug, Deserialize)]
struct User {
    username: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct ObjectRef {
    #[serde(default)]
    resource: String,
    #[serde(default)]
    subresource: String,
}

/// One request as the audit log saw it.
#[derive(Clone, Debug)]
pub struct Request {
    pub user: String,
    pub verb: String,
    /// `endpointslices`, `serviceinstances/status`, …
    pub resource: String,
    pub received: Timestamp,
    pub latency_ms: f64,
}

impl Request {
    pub fn mutating(&self) -> bool {
        matches!(
            self.verb.as_str(),
            "create" | "update" | "patch" | "delete" | "deletecollection"
        )
    }
}

/// Every request in the log so far (lines that do not parse, such as a half-written last
/// one, are skipped).
pub fn read(path: &Path) -> Vec<Request> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| serde_json::from_str::<Raw>(line).ok())
        .map(|raw| {
            let object = raw.object_ref.unwrap_or_default();
            let resource = if object.subresource.is_empty() {
                object.resource
            } else {
                format!("{}/{}", object.resource, object.subresource)
            };
            Request {
                latency_ms: raw
                    .stage_timestamp
                    .duration_since(raw.request_received_timestamp)
                    .as_secs_f64()
                    * 1000.0,
                user: raw.user.username,
                verb: raw.verb,
                resource,
                received: raw.request_received_timestamp,
            }
        })
        .collect()
}

/// A window of wall-clock time (the audit log's clock) that a phase ran in.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub from: Timestamp,
    pub to: Timestamp,
}

impl Window {
    pub fn contains(&self, t: Timestamp) -> bool {
        self.from <= t && t <= self.to
    }
}

/// Mutating requests by `user` within `window` on one of `resources` (all when empty).
pub fn writes(log: &[Request], user: &str, window: Window, resources: &[&str]) -> usize {
    log.iter()
        .filter(|r| r.user == user && r.mutating() && window.contains(r.received))
        .filter(|r| resources.is_empty() || resources.contains(&r.resource.as_str()))
        .count()
}

/// Requests in `window` grouped by identity, verb and resource, most numerous first: count and
/// latency p50 / p99 / sum (for the registration-only diagnostic).
pub fn breakdown(log: &[Request], window: Window) -> Vec<String> {
    let mut groups: std::collections::BTreeMap<(String, String, String), Vec<f64>> =
        std::collections::BTreeMap::new();
    for r in log.iter().filter(|r| window.contains(r.received)) {
        groups
            .entry((r.user.clone(), r.verb.clone(), r.resource.clone()))
            .or_default()
            .push(r.latency_ms);
    }
    let mut rows: Vec<_> = groups.into_iter().collect();
    rows.sort_by_key(|(_, l)| std::cmp::Reverse(l.len()));
    rows.into_iter()
        .map(|((user, verb, resource), latencies)| {
            let q = |p| crate::results::quantile(&latencies, p).unwrap_or(f64::NAN);
            format!(
                "{user} {verb} {resource}: {} requests, p50 {:.0} ms, p99 {:.0} ms, sum {:.1} s",
                latencies.len(),
                q(0.5),
                q(0.99),
                latencies.iter().sum::<f64>() / 1000.0
            )
        })
        .collect()
}
