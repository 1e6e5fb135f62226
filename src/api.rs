//! The `ServiceInstance` custom resource: one instance (a pod, or a VM outside the cluster)
//! of a logical service.
//!
//! The CRD YAML in `crds/` is generated from these types (`roster crd`); a test fails when the
//! two drift apart.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One running instance of a service, and where to reach it.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "roster.dev",
    doc = "One running instance of a service (a pod, or a VM outside the cluster), and its observed liveness.",
    version = "v1alpha1",
    kind = "ServiceInstance",
    plural = "serviceinstances",
    shortname = "si",
    category = "roster",
    namespaced,
    status = "ServiceInstanceStatus",
    printcolumn = r#"{"name":"Service","type":"string","jsonPath":".spec.service"}"#,
    printcolumn = r#"{"name":"Address","type":"string","jsonPath":".spec.address"}"#,
    printcolumn = r#"{"name":"Ports","type":"string","jsonPath":".spec.ports[*].port"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Heartbeat","type":"string","priority":1,"jsonPath":".metadata.annotations.roster\\.dev/heartbeat"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.deleteAfterSeconds) || !has(self.ttlSeconds) || self.deleteAfterSeconds == 0 || self.deleteAfterSeconds >= self.ttlSeconds",
        "message": "deleteAfterSeconds must be 0 (never delete) or at least ttlSeconds",
        "fieldPath": ".deleteAfterSeconds"
    }
]))]
pub struct ServiceInstanceSpec {
    /// Logical service name; becomes the Service name, so it must be a DNS-1035 label.
    #[schemars(length(min = 1, max = 63))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
        "message": "service must be a DNS-1035 label: lowercase letters, digits and '-', starting with a letter and ending with a letter or digit"
    }]))]
    pub service: String,

    /// Where the instance is reached: an IPv4 or IPv6 address, or a fully qualified domain name.
    #[schemars(length(min = 1, max = 253))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "isIP(self) ? (ip(self).isGlobalUnicast() || ip(self).isLoopback()) : self.matches('^([a-z0-9]([-a-z0-9]*[a-z0-9])?\\\\.)+[a-z]([-a-z0-9]*[a-z0-9])?\\\\.?$')",
        "message": "address must be an IPv4 or IPv6 address that is not link-local, multicast or unspecified, or a lowercase fully qualified domain name with at least two labels"
    }]))]
    pub address: String,

    /// The ports the instance serves on; at least one, names unique.
    #[schemars(length(min = 1, max = 64))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.all(p, self.exists_one(q, q.name == p.name))",
        "message": "port names must be unique"
    }]))]
    pub ports: Vec<InstancePort>,

    /// Relative traffic weight; 0 keeps the instance registered but sends it no traffic.
    #[serde(default = "default_weight")]
    #[schemars(range(min = 0, max = 10000))]
    pub weight: i32,

    /// Topology zone, carried into the EndpointSlices' `zone` and the ConfigMap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub zone: Option<String>,

    /// Free-form labels (version, tags …) carried into the ConfigMap: at most 32 entries, keys
    /// up to 63 characters, values up to 256.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    #[schemars(extend("x-kubernetes-validations" = [
        {
            "rule": "self.all(k, size(k) >= 1 && size(k) <= 63 && k.matches('^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$'))",
            "message": "metadata keys must be 1-63 characters of letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        },
        {
            "rule": "self.all(k, size(self[k]) <= 256)",
            "message": "metadata values must be at most 256 characters"
        }
    ]))]
    pub metadata: BTreeMap<String, String>,

    /// Seconds of observed silence after which the instance is no longer ready; unset: the
    /// installation's default (30 unless the controller's --default-ttl says otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub ttl_seconds: Option<i32>,

    /// Seconds of observed silence after which the instance is deleted; unset: the
    /// installation's default (3 × the TTL unless --default-delete-after says otherwise);
    /// 0 never deletes (a persistent instance that is only marked unhealthy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 604800))]
    pub delete_after_seconds: Option<i32>,

    /// A `coordination.k8s.io/v1` Lease in the same namespace whose renewals count as heartbeats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')",
        "message": "leaseName must be a valid object name (DNS-1123 subdomain)"
    }]))]
    pub lease_name: Option<String>,

    /// Take the instance out of rotation without deregistering it: in-flight work drains.
    #[serde(default)]
    pub draining: bool,

    /// An active check the controller runs against the instance, like a readiness probe: the
    /// instance is ready only while its heartbeat is fresh and the check passes.
    // Boxed: most instances have none, and inline it took 192 of the spec's 360 bytes, 1.8 MB
    // of the instance cache at 10 000 instances. (A comment, not documentation: the
    // documentation is the CRD's description.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<Box<HealthCheck>>,
}

/// An active health check: exactly one of `http`, `tcp` or `grpc`, with Kubernetes' probe
/// timing fields and defaults.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "[has(self.http), has(self.tcp), has(self.grpc)].filter(x, x).size() == 1",
    "message": "healthCheck needs exactly one of http, tcp or grpc"
}]))]
pub struct HealthCheck {
    /// An HTTP GET; any status in the accepted range passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpCheck>,
    /// A TCP connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpCheck>,
    /// The standard gRPC health protocol (grpc.health.v1.Health/Check).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcCheck>,
    /// How often to check, in seconds (default 10).
    #[serde(default = "default_period")]
    #[schemars(range(min = 1, max = 3600))]
    pub period_seconds: i32,
    /// How long one check may take, in seconds (default 1).
    #[serde(default = "default_one")]
    #[schemars(range(min = 1, max = 600))]
    pub timeout_seconds: i32,
    /// Consecutive successes to pass after failing (default 1).
    #[serde(default = "default_one")]
    #[schemars(range(min = 1, max = 100))]
    pub success_threshold: i32,
    /// Consecutive failures to fail after passing (default 3).
    #[serde(default = "default_failure_threshold")]
    #[schemars(range(min = 1, max = 100))]
    pub failure_threshold: i32,
}

/// A port by name (from `spec.ports`) or by number.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(untagged)]
pub enum PortRef {
    Number(i32),
    Name(String),
}

impl JsonSchema for PortRef {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "PortRef".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "x-kubernetes-int-or-string": true,
            "description": "A port name from spec.ports, or a port number."
        })
    }
}

/// An HTTP GET check.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpCheck {
    /// Path to request (default `/`).
    #[serde(default = "default_path")]
    #[schemars(length(min = 1, max = 2048))]
    pub path: String,
    pub port: PortRef,
    /// HTTP (default) or HTTPS; as with Kubernetes probes, certificates are not verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["HTTP", "HTTPS"]))]
    pub scheme: Option<String>,
    /// Extra request headers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub headers: Vec<HttpHeader>,
    /// Lowest passing status (default 200).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 100, max = 599))]
    pub min_status: Option<u16>,
    /// Highest passing status (default 399).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 100, max = 599))]
    pub max_status: Option<u16>,
}

/// A request header.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub struct HttpHeader {
    #[schemars(length(min = 1, max = 256))]
    pub name: String,
    #[schemars(length(max = 4096))]
    pub value: String,
}

/// A TCP connect check.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub struct TcpCheck {
    pub port: PortRef,
}

/// A gRPC health check.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub struct GrpcCheck {
    pub port: PortRef,
    /// The service name to ask about; empty asks about the server as a whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub service: Option<String>,
}

fn default_period() -> i32 {
    10
}

fn default_one() -> i32 {
    1
}

fn default_failure_threshold() -> i32 {
    3
}

fn default_path() -> String {
    "/".into()
}

fn default_weight() -> i32 {
    100
}

impl ServiceInstanceSpec {
    /// A spec with the defaults the apiserver would fill in: for tests and examples.
    pub fn new(service: &str, address: &str, ports: Vec<InstancePort>) -> Self {
        ServiceInstanceSpec {
            service: service.into(),
            address: address.into(),
            ports,
            weight: default_weight(),
            zone: None,
            metadata: BTreeMap::new(),
            ttl_seconds: None,
            delete_after_seconds: None,
            lease_name: None,
            draining: false,
            health_check: None,
        }
    }
}

/// A port the instance serves on.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstancePort {
    /// Port name (an IANA service name); Service ports are matched by it.
    #[schemars(length(min = 1, max = 15))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')",
        "message": "port name must be lowercase letters, digits and '-', starting and ending with a letter or digit"
    }]))]
    pub name: String,
    /// Port number.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// TCP (default), UDP or SCTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["TCP", "UDP", "SCTP"]))]
    pub protocol: Option<String>,
    /// Application protocol (e.g. `http`, `kubernetes.io/h2c`), as on a Service port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub app_protocol: Option<String>,
}

impl InstancePort {
    pub fn tcp(name: &str, port: i32) -> Self {
        InstancePort {
            name: name.into(),
            port,
            protocol: None,
            app_protocol: None,
        }
    }
}

/// What the controller last observed about the instance.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceInstanceStatus {
    /// A one-word summary for `kubectl get`: Pending, Ready, Unhealthy or Draining.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard Kubernetes conditions, keyed by type: `Ready` and `Heartbeating`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// The instance's phase, as `kubectl get` shows it.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum Phase {
    /// Registered; no heartbeat observed yet.
    Pending,
    /// Heartbeating within its TTL: receives traffic.
    Ready,
    /// Silent for longer than its TTL: receives no traffic; deleted after deleteAfterSeconds.
    Unhealthy,
    /// Heartbeating but `spec.draining`: finishes in-flight work, receives no new traffic.
    Draining,
}

/// Name of the ServiceInstance CRD.
pub const CRD_NAME: &str = "serviceinstances.roster.dev";

/// The CRD as YAML, exactly as committed in `crds/`.
pub fn crd_yaml() -> Result<String, serde_saphyr::ser::Error> {
    use kube::CustomResourceExt;
    serde_saphyr::to_string(&ServiceInstance::crd())
}

/// Installs (or updates) the CRD with Server-Side Apply and waits until it is Established.
/// For `roster dev` and the tests; clusters get the CRD from `crds/` or the Helm chart.
pub async fn install_crd(client: &kube::Client) -> crate::Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::{
        CustomResourceExt,
        api::{Api, Patch, PatchParams},
        runtime::{conditions, wait::await_condition},
    };
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        CRD_NAME,
        &PatchParams::apply(crate::names::FIELD_MANAGER).force(),
        &Patch::Apply(ServiceInstance::crd()),
    )
    .await
    .map_err(crate::Error::kube("apply the ServiceInstance CRD"))?;
    let established = await_condition(crds, CRD_NAME, conditions::is_crd_established());
    match tokio::time::timeout(std::time::Duration::from_secs(30), established).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(crate::Error::ControlPlane {
            context: "waiting for the CRD to be established".into(),
            source: Some(Box::new(e)),
        }),
        Err(_) => Err(crate::Error::ControlPlane {
            context: "the ServiceInstance CRD was not established within 30 s".into(),
            source: None,
        }),
    }
}

#[cfg(test)]
mod tests {
    /// The committed CRD is what the types generate. On failure, regenerate with
    /// `cargo run -- crd > crds/serviceinstances.roster.dev.yaml`.
    #[test]
    fn committed_crd_matches_the_types() {
        let committed = include_str!("../crds/serviceinstances.roster.dev.yaml");
        let generated = super::crd_yaml().expect("render the CRD");
        assert!(
            committed == generated,
            "crds/serviceinstances.roster.dev.yaml is out of date; run \
             `cargo run -- crd > crds/serviceinstances.roster.dev.yaml`"
        );
    }

    #[test]
    fn the_chart_ships_the_committed_crd() {
        let committed = include_str!("../crds/serviceinstances.roster.dev.yaml");
        let chart = include_str!("../charts/roster/crds/serviceinstances.roster.dev.yaml");
        assert!(
            committed == chart,
            "charts/roster/crds/ differs from crds/; run `cp crds/serviceinstances.roster.dev.yaml \
             charts/roster/crds/`"
        );
    }

    /// Whatever JSON the apiserver hands over (a hostile or pre-schema-change object), decoding
    /// either fails cleanly or yields an instance that every pure stage handles without a
    /// panic: the projection, the ConfigMap view, the status and the heartbeat bookkeeping.
    mod hostile {
        use proptest::prelude::*;
        use serde_json::{Value, json};

        use crate::{
            liveness::{Observations, Sight, Signals, Tick},
            projection::{self, Backend},
            status::{self, SignalProblems},
        };

        fn text() -> impl Strategy<Value = String> {
            prop_oneof![
                ".{0,40}",
                "[a-z0-9.-]{1,70}",
                Just("10.0.0.1".to_string()),
                Just("::1".to_string()),
                Just("\u{0}\u{ffff}\u{1F600}".to_string()),
                Just("x".repeat(70_000)),
            ]
        }

        fn json_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_map(Value::from),
                text().prop_map(Value::from),
            ];
            leaf.prop_recursive(3, 24, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                    prop::collection::btree_map(text(), inner, 0..4)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// A spec that is often almost right, with hostile values where it matters.
        fn spec() -> impl Strategy<Value = Value> {
            (
                text(),
                text(),
                prop::collection::vec(
                    (
                        text(),
                        any::<i32>(),
                        prop_oneof![4 => Just(json!("TCP")), 2 => Just(json!("UDP")), 1 => json_value()],
                    ),
                    0..4,
                ),
                any::<i32>(),
                prop::collection::btree_map(text(), text(), 0..4),
                any::<i32>(),
                prop_oneof![4 => text().prop_map(Value::from), 1 => json_value()],
            )
                .prop_map(|(service, address, ports, weight, metadata, ttl, extra)| {
                    json!({
                        "service": service,
                        "address": address,
                        "ports": ports.into_iter().map(|(name, port, protocol)| json!({"name": name, "port": port, "protocol": protocol})).collect::<Vec<_>>(),
                        "weight": weight,
                        "metadata": metadata,
                        "ttlSeconds": ttl,
                        "deleteAfterSeconds": ttl.wrapping_mul(3),
                        "zone": extra,
                    })
                })
        }

        proptest! {
            #[test]
            fn decoding_and_every_pure_stage_never_panic(
                spec in prop_oneof![4 => spec(), 1 => json_value()],
                annotation in text(),
                status in prop_oneof![
                    Just(Value::Null),
                    Just(json!({"phase": "Ready", "conditions": []})),
                    json_value(),
                ],
            ) {
                let object = json!({
                    "apiVersion": "roster.dev/v1alpha1",
                    "kind": "ServiceInstance",
                    "metadata": {
                        "name": "x", "namespace": "ns", "uid": "u",
                        "annotations": {"roster.dev/heartbeat": annotation},
                    },
                    "spec": spec,
                    "status": status,
                });
                let Ok(si) = serde_json::from_value::<crate::cache::Instance>(object) else {
                    return Ok(());
                };
                let members: Vec<Backend> = Backend::from_instance(&si).into_iter().collect();
                for m in &members {
                    let _ = m.endpoint_problem();
                    let _ = m.conditions();
                }
                let _ = projection::pack(&si.spec.service, &members, &[]);
                let _ = projection::service_ports(&members);
                let json = projection::config_json(&si.spec.service, &members);
                prop_assert!(serde_json::from_str::<Value>(&json).is_ok());
                let timing = crate::liveness::Timing::of(&si.spec, &crate::liveness::Defaults::default());
                for liveness in [crate::liveness::Liveness::Pending, crate::liveness::Liveness::Alive, crate::liveness::Liveness::Silent] {
                    let _ = status::desired(&si, timing, si.status.as_ref(), liveness, &SignalProblems::default(), jiff::Timestamp::UNIX_EPOCH);
                }
                let mut observations = Observations::default();
                let signals = Signals { annotation: si.heartbeat.clone(), lease: None };
                let sight = Sight { namespace: "ns", name: "x", uid: "u", fresh: true, signals };
                let (_, heartbeat) = observations.observe(sight.clone(), Tick::default(), Tick::default());
                prop_assert!(heartbeat, "a fresh instance with a heartbeat value heartbeated");
                let (_, again) = observations.observe(sight, Tick::default(), Tick::default());
                prop_assert!(!again, "the same value twice is one heartbeat");
            }
        }
    }
}
