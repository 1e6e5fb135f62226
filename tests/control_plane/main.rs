//! The local control plane's own lifecycle: a binary of its own, so that the extra control
//! planes it starts never share the 2 cores with the timing-sensitive integration tests (cargo
//! runs test binaries one after another).

#[allow(dead_code)]
#[path = "../integration/harness.rs"]
mod harness;

mod agent_restart;
mod lifecycle;
mod outage;
mod schema_change;
