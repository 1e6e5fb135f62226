//! Integration tests against a real kube-apiserver + etcd (see `harness`). One binary, so one
//! control plane serves the whole run.

// Shared with tests/control_plane, which uses other parts of it.
#[allow(dead_code)]
mod harness;

mod agent;
mod controller;
mod discovery;
mod health;
mod liveness;
mod projection;
mod reliability;
mod validation;
