//! A term as leader: the writers that run only while this replica holds the Lease, and what it
//! remembers of its own writes. All of it goes with the term: a status queued in one term is
//! never sent in the next, and a new term decides every status afresh against what is stored
//! (which another leader may have written in between).

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
};

use tokio_util::sync::CancellationToken;

use super::{events::Events, status_writer::StatusWriter};
use crate::{
    api::{ServiceInstance, ServiceInstanceStatus},
    prober::Prober,
    projector::Busy,
    status,
};

pub(super) struct Term {
    /// Cancelled when the term ends.
    pub(super) token: CancellationToken,
    /// Writes the status the judge decided, off the reconcile's path.
    pub(super) writer: std::sync::Arc<StatusWriter>,
    /// Health checks run only on the leader.
    pub(super) prober: Prober,
    /// Transition Events, behind the projection.
    pub(super) events: Events,
    /// The last status this term wrote, by uid: the cache can lag behind our own writes, and
    /// comparing with a stale copy would write (and announce) a transition twice.
    written: Mutex<HashMap<String, ServiceInstanceStatus>>,
}

impl Term {
    pub(super) fn new(
        token: CancellationToken,
        prober: Prober,
        projection: Busy,
        client: kube::Client,
        reporter: kube::runtime::events::Reporter,
    ) -> Term {
        Term {
            events: Events::new(client, reporter, projection, token.clone()),
            token,
            writer: std::sync::Arc::default(),
            prober,
            written: Mutex::default(),
        }
    }

    fn written(&self) -> std::sync::MutexGuard<'_, HashMap<String, ServiceInstanceStatus>> {
        self.written.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What the status says now: what this term last wrote when it has, else what is stored.
    pub(super) fn baseline(&self, si: &ServiceInstance, uid: &str) -> ServiceInstanceStatus {
        let mut written = self.written();
        if self.writer.take_abandoned(uid) {
            // Its last write was refused for good: decide it again against what is stored.
            written.remove(uid);
        }
        written
            .get(uid)
            .cloned()
            .unwrap_or_else(|| status::liveness_view(si.status.as_ref()))
    }

    /// Queues `status` for writing and remembers it as this term's.
    pub(super) fn write(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
        status: ServiceInstanceStatus,
    ) {
        self.writer.submit(namespace, name, uid, status.clone());
        self.written().insert(uid.to_string(), status);
    }

    /// Forgets a deleted instance.
    pub(super) fn forget(&self, uid: &str) {
        self.prober.forget(uid);
        self.written().remove(uid);
        self.writer.forget(uid);
    }
}
