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
