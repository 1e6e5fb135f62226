//! Integration tests against a real kube-apiserver + etcd (see `harness`). One binary, so one
//! control plane serves the whole run.

mod harness;

mod control_plane;
mod controller;
mod liveness;
mod validation;
