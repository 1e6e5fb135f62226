//! Roster's client library: what a service links in to take part in the registry. It will hold
//! registration (creating a `ServiceInstance` and heartbeating it) and discovery (watching a
//! service's instances and choosing one per request); for now it holds [`pick`], the pure
//! load-balancing logic that discovery will drive.

pub mod pick;
