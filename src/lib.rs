//! Roster: a service registry for Kubernetes.
//!
//! Every instance of a service is a [`ServiceInstance`](api::ServiceInstance) custom resource.
//! The [`controller`] keeps their status current; the [`control_plane`] module runs a real
//! etcd + kube-apiserver on loopback for the `roster dev` demo and the integration tests.

pub mod agent;
pub mod api;
pub mod cache;
pub mod cli;
pub mod client;
pub mod contact;
pub mod control_plane;
pub mod controller;
pub mod dev;
pub mod error;
pub mod leader;
pub mod liveness;
pub mod metrics;
pub mod names;
pub mod probe;
pub mod prober;
pub mod projection;
pub mod projector;
pub mod protection;
pub mod registry;
pub mod server;
pub mod status;
pub mod telemetry;

pub use error::{Error, Result};

/// The version and the commit the binary was built from. The commit is stamped at build time
/// through `ROSTER_COMMIT` (the Dockerfile passes its `COMMIT` build argument), which keeps the
/// build free of a build script and of a dependency on `.git`.
pub fn version() -> &'static str {
    static VERSION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "{} (commit {})",
            env!("CARGO_PKG_VERSION"),
            option_env!("ROSTER_COMMIT").unwrap_or("unknown")
        )
    });
    &VERSION
}
