//! Packaging: the Helm chart against a real control plane (install, RBAC sufficiency and least
//! privilege under the chart's own ServiceAccount, upgrade, uninstall), the Dockerfile's build
//! commands, and the examples. A binary of its own: its tests start their own control planes.

#[allow(dead_code)]
#[path = "../integration/harness.rs"]
mod harness;

mod chart;
mod dockerfile;
mod examples;
