//! What the watch streams tell the reconciler: observations, the Lease index, watch health.

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    ResourceExt,
    runtime::{
        reflector::{ObjectRef, Store},
        watcher::{self},
    },
};

use super::term::Term;
use crate::cache::Grouping;
use crate::{
    cache::Instance,
    leader::{self},
    liveness::{Observations, Tick},
    protection::{self, ChangeKind},
    registry::Registry,
};

/// What the watch streams tell the reconciler: when they last (re)started, whether the Lease
/// cache is complete, which instances name which Lease, and the liveness observations.
pub(super) struct Views {
    /// Origin of the controller's monotonic clock.
    pub(super) origin: tokio::time::Instant,
    /// Nanoseconds after `origin` of the last (re)list of either watch.
    pub(super) relisted_at: AtomicU64,
    pub(super) leases_synced: AtomicBool,
    /// A watch (of instances, of Leases) failed and has not delivered since: heartbeats may be
    /// going unseen, so nothing is judged silent or expired until it recovers, and its recovery
    /// starts a fresh view.
    pub(super) instance_watch_broken: AtomicBool,
    pub(super) lease_watch_broken: AtomicBool,
    /// Which instances heartbeat through which Lease, both ways, so a change of
    /// `spec.leaseName` or a deletion leaves nothing behind.
    pub(super) lease_index: Mutex<Grouping>,
    pub(super) observations: Mutex<Observations>,
    /// Who is a member of which service, with this replica's verdicts; the projector reads it.
    pub(super) registry: Arc<Registry>,
    /// The term this replica leads, if it leads: only then does it write.
    pub(super) term: tokio::sync::watch::Sender<Option<Arc<Term>>>,
    /// The election, and with it [`leader::Contact`]: whether the apiserver answers.
    pub(super) elector: Arc<leader::Elector>,
    pub(super) guard: Mutex<protection::Guard>,
    /// Where changes of protection go to be announced.
    pub(super) announce: futures::channel::mpsc::UnboundedSender<Vec<protection::Change>>,
}

impl Views {
    /// The term this replica leads, if it leads.
    pub(super) fn term(&self) -> Option<Arc<Term>> {
        self.term.borrow().clone()
    }

    pub(super) fn now(&self) -> Tick {
        Tick(self.origin.elapsed())
    }

    pub(super) fn relisted(&self) {
        let nanos = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.relisted_at.fetch_max(nanos, Ordering::Relaxed);
    }

    /// The start of the current view: the last (re)list of a watch. (A stall of the apiserver
    /// starts a fresh view only for the instances whose silence it covered: `Contact`.)
    pub(super) fn view_floor(&self) -> Tick {
        Tick(Duration::from_nanos(
            self.relisted_at.load(Ordering::Relaxed),
        ))
    }

    pub(super) fn tick(&self, at: tokio::time::Instant) -> Tick {
        Tick(at.saturating_duration_since(self.origin))
    }

    pub(super) fn instant(&self, tick: Tick) -> tokio::time::Instant {
        self.origin + tick.0
    }

    pub(super) fn protection(&self) -> std::sync::MutexGuard<'_, protection::Guard> {
        self.guard.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends changes of protection to be announced. A release gives every instance it held a
    /// fresh TTL from now: the stragglers of a recovery are not deleted on the spot for a
    /// silence that protection was covering.
    pub(super) fn announce(&self, changes: Vec<protection::Change>) {
        if changes.is_empty() {
            return;
        }
        let now = self.now();
        let mut observations = self
            .observations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for change in &changes {
            if let ChangeKind::Released(_) = change.kind {
                for (namespace, name) in &change.affected {
                    observations.rebase(namespace, name, now);
                }
            }
        }
        drop(observations);
        let _ = self.announce.unbounded_send(changes);
    }

    pub(super) fn index(&self, si: &Instance, present: bool) {
        let Some(ns) = si.namespace() else {
            return;
        };
        let lease = si.spec.lease_name.clone().filter(|_| present);
        self.lease_index
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .set(&ns, &si.name_any(), lease);
    }

    /// Records a watch event: an error marks the watch broken; the first success after one
    /// starts a fresh view (every instance gets a full TTL again).
    pub(super) fn watch_result(&self, broken: &AtomicBool, ok: bool, what: &str) {
        if !ok {
            if !broken.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    watch = what,
                    "watch broken: no instance is judged silent until it recovers"
                );
            }
        } else if broken.swap(false, Ordering::Relaxed) {
            self.relisted();
            tracing::info!(
                watch = what,
                "watch recovered: every instance gets a full TTL from now"
            );
        }
    }

    pub(super) fn any_watch_broken(&self) -> bool {
        self.instance_watch_broken.load(Ordering::Relaxed)
            || self.lease_watch_broken.load(Ordering::Relaxed)
    }

    /// The instances to reconcile when `lease` changes.
    pub(super) fn instances_for(&self, lease: &Lease) -> Vec<ObjectRef<Instance>> {
        let Some(ns) = lease.namespace() else {
            return Vec::new();
        };
        let index = self
            .lease_index
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        index
            .members(&ns, &lease.name_any())
            .map(|n| ObjectRef::new(n).within(&ns))
            .collect()
    }

    /// Feeds the Lease index, the registry, the prober and the observations from the
    /// instance watch.
    /// `store`: the instance cache, which has already taken in the event; the registry index
    /// shares its copies of the instances.
    pub(super) fn on_instance_event(
        &self,
        event: &watcher::Event<Instance>,
        store: &Store<Instance>,
    ) {
        match event {
            watcher::Event::Init => {
                self.relisted();
                self.registry.resync_started();
            }
            watcher::Event::InitApply(si) | watcher::Event::Apply(si) => {
                // A relist's objects enter the cache at its end (`InitDone`, below).
                let stored = matches!(event, watcher::Event::Apply(_))
                    .then(|| store.get(&ObjectRef::from_obj(si)))
                    .flatten()
                    .filter(|s| s.metadata.resource_version == si.metadata.resource_version);
                if let (Some(ns), Some(replaced)) =
                    (si.namespace(), self.registry.apply(si, stored))
                {
                    // Deleted and recreated while the watch was down: the old object is gone.
                    self.forget(&ns, &si.name_any(), &replaced);
                }
                self.index(si, true);
                if let Some(term) = self.term() {
                    term.prober.watch(si);
                }
            }
            watcher::Event::Delete(si) => {
                self.index(si, false);
                if let Some(ns) = si.namespace() {
                    self.registry.delete(&ns, &si.name_any());
                    self.forget(&ns, &si.name_any(), si.uid().as_deref().unwrap_or_default());
                }
            }
            watcher::Event::InitDone => {
                // Deleted while the watch was down: no Delete event ever comes for them.
                for gone in self.registry.resync_done() {
                    self.lease_index
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .set(&gone.namespace, &gone.name, None);
                    self.forget(&gone.namespace, &gone.name, &gone.uid);
                }
                self.registry
                    .share(|ns, name| store.get(&ObjectRef::new(name).within(ns)));
            }
        }
    }

    /// Forgets everything this replica remembers of a deleted instance.
    fn forget(&self, ns: &str, name: &str, uid: &str) {
        if let Some(term) = self.term() {
            term.forget(uid);
        }
        self.observations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .forget(ns, name);
        let changes = self
            .protection()
            .forget(&(ns.to_string(), name.to_string()), self.now());
        self.announce(changes);
    }
}

/// A Lease's renewal as an opaque token: any change of it is a heartbeat.
pub(super) fn renewal(lease: &Lease) -> Option<String> {
    let spec = lease.spec.as_ref()?;
    let renewed = spec.renew_time.as_ref().map(|t| t.0.to_string());
    let acquired = spec.acquire_time.as_ref().map(|t| t.0.to_string());
    (renewed.is_some() || acquired.is_some()).then(|| {
        format!(
            "{}|{}|{}",
            renewed.unwrap_or_default(),
            acquired.unwrap_or_default(),
            spec.holder_identity.as_deref().unwrap_or_default()
        )
    })
}
