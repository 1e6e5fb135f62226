//! The one place for Roster's names: API group, keys, and the field manager.

/// API group of Roster's custom resources.
pub const GROUP: &str = "roster.dev";
/// API version of Roster's custom resources.
pub const VERSION: &str = "v1alpha1";
/// Field manager for every Server-Side Apply write the controller makes.
pub const FIELD_MANAGER: &str = "roster.dev/controller";
/// Annotation whose every change of value is a heartbeat.
pub const HEARTBEAT_ANNOTATION: &str = "roster.dev/heartbeat";
/// Value of `endpointslice.kubernetes.io/managed-by` on the slices Roster owns.
pub const MANAGED_BY: &str = "roster.dev";
/// Reporting controller name on Events.
pub const REPORTER: &str = "roster-controller";
/// Field manager of the projector's writes (Service, EndpointSlices, ConfigMap, `Projected`).
pub const PROJECTION_MANAGER: &str = "roster.dev/projection";
/// Label the built-in controllers use to tie an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label that says which controller manages an EndpointSlice.
pub const SLICE_MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// Label on the Services and ConfigMaps Roster manages.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Label on Roster's ConfigMaps naming their service.
pub const SERVICE_LABEL: &str = "roster.dev/service";
/// Annotation on a Service a user created that lets Roster take it over.
pub const ADOPT_ANNOTATION: &str = "roster.dev/adopt";
/// Label that keeps kube-controller-manager's mirroring controller from copying an Endpoints
/// object into EndpointSlices (Roster writes its own).
pub const SKIP_MIRROR_LABEL: &str = "endpointslice.kubernetes.io/skip-mirror";
/// Annotation on an Endpoints object that lists fewer addresses than there are, as Kubernetes'
/// endpoints controller sets it (value `truncated`).
pub const OVER_CAPACITY_ANNOTATION: &str = "endpoints.kubernetes.io/over-capacity";
/// Key of the JSON view in a service's ConfigMap.
pub const CONFIG_KEY: &str = "instances.json";

/// Name of a service's ConfigMap.
pub fn config_map_name(service: &str) -> String {
    format!("{service}-roster")
}
