//! A term as leader: the writers that run only while this replica holds the Lease, and what it
//! remembers of its own writes. All of it goes with the term: a status queued in one term is
//! never sent in the next, and a new term decides every status afresh against what is stored
//! (which another leader may have written in between).

use tokio_util::sync::CancellationToken;

use super::{events::Events, status_writer::StatusWriter};
use crate::{api::ServiceInstanceStatus, cache::Instance, prober::Prober, projector::Busy};

pub(super) struct Term {
    /// Cancelled when the term ends.
    pub(super) token: CancellationToken,
    /// Writes the status the judge decided, off the reconcile's path, and remembers it until
    /// the cache shows it.
    pub(super) writer: std::sync::Arc<StatusWriter>,
    /// Health checks run only on the leader.
    pub(super) prober: Prober,
    /// Transition Events, behind the projection.
    pub(super) events: Events,
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
        }
    }

    /// What the status says now: what this term last wrote when the cache has not shown it
    /// yet, else what is stored.
    pub(super) fn baseline(&self, si: &Instance, uid: &str) -> ServiceInstanceStatus {
        self.writer.baseline(si, uid)
    }

    /// Queues `status` for writing and remembers it as this term's.
    pub(super) fn write(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
        status: ServiceInstanceStatus,
    ) {
        self.writer.submit(namespace, name, uid, status);
    }

    /// Forgets a deleted instance.
    pub(super) fn forget(&self, uid: &str) {
        self.prober.forget(uid);
        self.writer.forget(uid);
    }
}
