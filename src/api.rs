//! The `ServiceInstance` custom resource: one instance (a pod, or a VM outside the cluster)
//! of a logical service.
//!
//! The CRD YAML in `crds/` is generated from these types (`roster crd`); a test fails when the
//! two drift apart.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

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
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ServiceInstanceSpec {
    /// Logical service name; becomes the Service name, so it must be a DNS-1035 label.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub service: String,
    /// Where the instance is reached: an IPv4 or IPv6 address, or a fully qualified domain name.
    #[schemars(length(min = 1, max = 253))]
    pub address: String,
    /// The ports the instance serves on; at least one.
    #[schemars(length(min = 1, max = 64))]
    pub ports: Vec<InstancePort>,
}

/// A port the instance serves on.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstancePort {
    /// Port name (an IANA service name); required so that Service ports can be matched by name.
    #[schemars(
        length(min = 1, max = 15),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Port number.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
}

/// What the controller last observed about the instance.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceInstanceStatus {
    /// A one-word summary for `kubectl get` (Pending, Ready, Unhealthy, Draining).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard Kubernetes conditions, keyed by type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
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
}
