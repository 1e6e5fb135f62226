//! Roster's client library: what a Rust service links in to take part in the registry.
//!
//! - [`register`]: register an instance, renew its Lease, drain and deregister. `roster agent`
//!   is this module behind flags, for services in any language.
//! - [`discovery`]: watch a service's ready instances (its EndpointSlices or its ConfigMap),
//!   keep them in a local cache, and report changes as a stream.
//! - [`pick`]: choose one per request (round-robin, weighted random, least outstanding),
//!   preferring the caller's zone.

pub mod discovery;
pub mod pick;
pub mod register;
