//! The status writer: one task per term that writes instance status with Server-Side Apply,
//! off the reconcile's path.
//!
//! The judge has already put its verdict in the registry index (so the projection does not
//! wait for this write) and announced the transition; what is left is to tell the apiserver.
//! The queue holds at most one status per instance: a newer one supersedes the one waiting,
//! so it is bounded by the number of instances, and a burst of transitions of one instance is
//! one write. A failed write is retried with backoff unless a newer status came meanwhile.
//! Projection writes go first: while the projector has work in hand, status writes wait (for
//! a bounded time, so they are never starved).

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use kube::{
    Api, Client, Resource,
    api::{Patch, PatchParams},
};
use serde_json::json;
use tokio::{sync::Notify, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{
    Error,
    api::{ServiceInstance, ServiceInstanceStatus},
    metrics::Metrics,
    names::FIELD_MANAGER,
    projector::Busy,
};

/// Status writes in flight at once.
const CONCURRENCY: usize = 8;
/// The longest a status write waits for the projector to have nothing in hand.
const YIELD_TO_PROJECTION: Duration = Duration::from_millis(500);

/// One instance's status, to write.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Pending {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub status: ServiceInstanceStatus,
    /// Order of submission: a retry of an older status never overwrites a newer one.
    seq: u64,
    /// Failed attempts so far, for the backoff.
    attempts: u32,
}

/// The queue: plain data, so its rules are unit-tested.
#[derive(Debug, Default)]
pub(super) struct Queue {
    order: VecDeque<String>,
    waiting: HashMap<String, Pending>,
    in_flight: HashSet<String>,
    /// The newest submission per uid.
    latest: HashMap<String, u64>,
    next_seq: u64,
}

impl Queue {
    /// Queues a status; a status of the same instance that has not been written yet is
    /// superseded (dropped).
    pub fn submit(
        &mut self,
        namespace: &str,
        name: &str,
        uid: &str,
        status: ServiceInstanceStatus,
    ) {
        self.next_seq += 1;
        let seq = self.next_seq;
        self.latest.insert(uid.to_string(), seq);
        let pending = Pending {
            namespace: namespace.to_string(),
            name: name.to_string(),
            uid: uid.to_string(),
            status,
            seq,
            attempts: 0,
        };
        if self.waiting.insert(uid.to_string(), pending).is_none() {
            self.order.push_back(uid.to_string());
        }
    }

    /// The next status to write: the oldest waiting one of an instance with no write in
    /// flight (one instance's writes never race).
    pub fn next(&mut self) -> Option<Pending> {
        let position = self
            .order
            .iter()
            .position(|uid| !self.in_flight.contains(uid))?;
        let uid = self.order.remove(position)?;
        let pending = self.waiting.remove(&uid)?;
        self.in_flight.insert(uid);
        Some(pending)
    }

    /// A write finished. A failed one comes back for a retry unless it was superseded; returns
    /// it with its attempt counted, for the caller to resubmit after a backoff.
    pub fn done(&mut self, pending: Pending, ok: bool) -> Option<Pending> {
        self.in_flight.remove(&pending.uid);
        if ok || self.latest.get(&pending.uid) != Some(&pending.seq) {
            return None;
        }
        Some(Pending {
            attempts: pending.attempts.saturating_add(1),
            ..pending
        })
    }

    /// Puts a failed write back, unless a newer status came while it waited.
    pub fn retry(&mut self, pending: Pending) {
        if self.latest.get(&pending.uid) != Some(&pending.seq)
            || self.waiting.contains_key(&pending.uid)
        {
            return;
        }
        self.order.push_back(pending.uid.clone());
        self.waiting.insert(pending.uid.clone(), pending);
    }

    /// The instance is gone: nothing of it is written any more.
    pub fn forget(&mut self, uid: &str) {
        self.latest.remove(uid);
        if self.waiting.remove(uid).is_some() {
            self.order.retain(|u| u != uid);
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.waiting.len()
    }
}

/// The retry delay after `attempts` failures: 200 ms, doubling, at most 30 s.
pub(super) fn backoff(attempts: u32) -> Duration {
    let exp = attempts.saturating_sub(1).min(8);
    (Duration::from_millis(200) * (1 << exp)).min(Duration::from_secs(30))
}

/// The writer: submit from anywhere, one task writes.
#[derive(Default)]
pub(super) struct StatusWriter {
    queue: Mutex<Queue>,
    wake: Notify,
}

impl StatusWriter {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn submit(&self, namespace: &str, name: &str, uid: &str, status: ServiceInstanceStatus) {
        self.queue().submit(namespace, name, uid, status);
        self.wake.notify_one();
    }

    pub fn forget(&self, uid: &str) {
        self.queue().forget(uid);
    }

    /// Writes until `term` ends; what is still queued then is dropped with the term.
    pub async fn run(
        self: Arc<Self>,
        client: Client,
        metrics: Arc<Metrics>,
        projection: Busy,
        term: CancellationToken,
    ) {
        let mut writes = JoinSet::new();
        loop {
            let next = if writes.len() < CONCURRENCY {
                self.queue().next()
            } else {
                None
            };
            if let Some(pending) = next {
                // Projection first: it is what makes an instance routable.
                projection.idle_within(YIELD_TO_PROJECTION).await;
                let client = client.clone();
                writes.spawn(async move {
                    let result = write(&client, &pending).await;
                    (pending, result)
                });
                continue;
            }
            tokio::select! {
                () = term.cancelled() => return,
                () = self.wake.notified() => {}
                Some(joined) = writes.join_next() => {
                    let Ok((pending, result)) = joined else { continue };
                    let ok = match result {
                        Ok(()) => {
                            metrics.status_written();
                            true
                        }
                        // Deleted meanwhile: nothing to write.
                        Err(Error::Kube { source: kube::Error::Api(s), .. }) if s.code == 404 => true,
                        Err(e) => {
                            metrics.reconcile_failed(&e);
                            tracing::warn!(error = %crate::error::report(&e), "status write failed; retrying");
                            false
                        }
                    };
                    let retry = self.queue().done(pending, ok);
                    if let Some(retry) = retry {
                        let (writer, term) = (self.clone(), term.clone());
                        tokio::spawn(async move {
                            tokio::select! {
                                () = term.cancelled() => {}
                                () = tokio::time::sleep(backoff(retry.attempts)) => {
                                    writer.queue().retry(retry);
                                    writer.wake.notify_one();
                                }
                            }
                        });
                    }
                }
            }
        }
    }
}

async fn write(client: &Client, pending: &Pending) -> crate::Result<()> {
    let api: Api<ServiceInstance> = Api::namespaced(client.clone(), &pending.namespace);
    let patch = json!({
        "apiVersion": ServiceInstance::api_version(&()),
        "kind": ServiceInstance::kind(&()),
        "status": pending.status,
    });
    api.patch_status(
        &pending.name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::kube(format!(
        "apply the status of ServiceInstance {}/{}",
        pending.namespace, pending.name
    )))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Phase;

    fn status(phase: Phase) -> ServiceInstanceStatus {
        ServiceInstanceStatus {
            phase: Some(phase),
            ..ServiceInstanceStatus::default()
        }
    }

    fn phase(p: &Pending) -> Option<Phase> {
        p.status.phase
    }

    #[test]
    fn a_newer_status_supersedes_the_waiting_one_in_place() {
        let mut q = Queue::default();
        q.submit("ns", "a", "ua", status(Phase::Pending));
        q.submit("ns", "b", "ub", status(Phase::Ready));
        q.submit("ns", "a", "ua", status(Phase::Ready));
        assert_eq!(q.len(), 2);
        let first = q.next().unwrap();
        assert_eq!(
            (first.name.as_str(), phase(&first)),
            ("a", Some(Phase::Ready))
        );
        assert_eq!(q.next().unwrap().name, "b");
        assert!(q.next().is_none());
    }

    #[test]
    fn one_instance_is_never_written_twice_at_once() {
        let mut q = Queue::default();
        q.submit("ns", "a", "ua", status(Phase::Pending));
        let first = q.next().unwrap();
        q.submit("ns", "a", "ua", status(Phase::Ready));
        q.submit("ns", "b", "ub", status(Phase::Ready));
        // a is in flight: b goes first, a waits for its write to finish.
        assert_eq!(q.next().unwrap().name, "b");
        assert!(q.next().is_none());
        assert_eq!(q.done(first, true), None);
        assert_eq!(phase(&q.next().unwrap()), Some(Phase::Ready));
    }

    #[test]
    fn a_failed_write_is_retried_unless_superseded() {
        let mut q = Queue::default();
        q.submit("ns", "a", "ua", status(Phase::Ready));
        let write = q.next().unwrap();
        let retry = q.done(write, false).unwrap();
        assert_eq!(retry.attempts, 1);
        q.retry(retry);
        let again = q.next().unwrap();
        assert_eq!(again.attempts, 1);
        // A newer status while the retry waits: the old one is dropped, the new one written.
        let retry = q.done(again, false).unwrap();
        q.submit("ns", "a", "ua", status(Phase::Unhealthy));
        q.retry(retry);
        let next = q.next().unwrap();
        assert_eq!((phase(&next), next.attempts), (Some(Phase::Unhealthy), 0));
        // And a failure of a superseded write is not retried at all.
        q.submit("ns", "a", "ua", status(Phase::Ready));
        assert_eq!(q.done(next, false), None);
    }

    #[test]
    fn a_forgotten_instance_is_not_written() {
        let mut q = Queue::default();
        q.submit("ns", "a", "ua", status(Phase::Ready));
        let write = q.next().unwrap();
        q.submit("ns", "a", "ua", status(Phase::Unhealthy));
        q.forget("ua");
        assert!(q.next().is_none());
        assert_eq!(q.done(write, false), None);
    }

    #[test]
    fn backoff_doubles_up_to_a_cap() {
        let ms = |n| backoff(n).as_millis();
        assert_eq!([ms(1), ms(2), ms(3), ms(20)], [200, 400, 800, 30_000]);
    }
}
