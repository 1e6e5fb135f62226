//! The projector: keeps, for every (namespace, service) with instances, a selectorless Service,
//! its EndpointSlices, a ConfigMap and (opt-in) a v1 Endpoints object in line with the registry.
//!
//! Thin by design: it reads a service's members from the [registry index](crate::registry),
//! which wakes it per service the moment a member or its verdict changes, asks
//! [`crate::projection`] what should exist, and writes only objects whose relevant fields differ.
//! Changes are coalesced by a [work queue](queue): a service waits at most once however often
//! it is triggered, is projected by one worker at a time, and no service waits for another's
//! batch.
//!
//! The caches can lag behind the projector's own writes, so it also remembers what it last wrote
//! (with the resourceVersion the apiserver gave it) and what it deleted; a watch event with any
//! other resourceVersion means someone else wrote, and the cache is believed again.

mod apply;
mod queue;
mod report;
mod watches;
mod written;

pub use watches::{ByService, Synced, watch_children};
pub use written::Written;

use queue::WorkQueue;

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Endpoints, Service};
use kube::{
    Client, ResourceExt,
    runtime::{
        events::Recorder,
        reflector::{self, Store},
    },
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::projection::objects::*;
use crate::{
    Result,
    cache::Slice,
    metrics::Metrics,
    names::{ADOPT_ANNOTATION, MANAGED_BY, MANAGED_BY_LABEL, SERVICE_LABEL, SERVICE_NAME_LABEL},
    projection::{self, Backend, MAX_CONFIG_BYTES},
    registry::{Entry, Registry},
};

/// A service: (namespace, name). The empty key means "every service".
pub use crate::registry::ServiceKey;

/// How the projector behaves.
#[derive(Clone, Debug)]
pub struct Options {
    /// How long a triggered service waits for further changes before it is projected (0: at
    /// once; changes that arrive while it is in flight are coalesced anyway).
    pub window: Duration,
    /// Services projected at the same time (one service is never projected twice at once).
    pub concurrency: usize,
    /// Headless Services (`clusterIP: None`) instead of ClusterIP; applies to Services it
    /// creates (a Service's clusterIP cannot change).
    pub headless: bool,
}

/// Sends services to project; cheap to clone. While no term runs (a standby) nothing is sent:
/// a term starts by projecting everything.
#[derive(Clone)]
pub struct Trigger {
    keys: mpsc::UnboundedSender<ServiceKey>,
    active: Arc<AtomicBool>,
}

impl Trigger {
    pub fn project(&self, namespace: &str, service: &str) {
        if self.active.load(Ordering::Relaxed) {
            // The receiver lives as long as the process; after it stops there is nothing to do.
            let _ = self.keys.send((namespace.to_string(), service.to_string()));
        }
    }

    /// Every known service: when a term starts, and after a relist, when the caches were
    /// swapped in whole.
    pub fn project_all(&self) {
        if self.active.load(Ordering::Relaxed) {
            let _ = self.keys.send(ServiceKey::default());
        }
    }
}

/// The services to project, in the order they were triggered. It outlives a term: each term's
/// projector takes it in turn.
pub type Keys = Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<ServiceKey>>>;

/// Creates the trigger channel.
pub fn trigger() -> (Trigger, Keys) {
    let (keys, rx) = mpsc::unbounded_channel();
    let trigger = Trigger {
        keys,
        active: Arc::default(),
    };
    (trigger, Arc::new(tokio::sync::Mutex::new(rx)))
}

/// The caches of what the projector writes; they outlive a term.
#[derive(Clone)]
pub struct Caches {
    pub services: Store<Service>,
    pub slices: ByService<Slice>,
    pub config_maps: Store<ConfigMap>,
    /// Roster's Endpoints objects; `None` when they are not asked for (and not written).
    pub endpoints: Option<Store<Endpoints>>,
}

/// Whether the projector has work in hand, for writers that yield to it (status writes wait
/// for projection writes). The default is never busy.
#[derive(Clone)]
pub struct Busy(watch::Receiver<bool>);

impl Default for Busy {
    fn default() -> Self {
        Busy(watch::channel(false).1)
    }
}

impl Busy {
    /// A projector's busy flag that a test sets by hand.
    #[cfg(test)]
    pub fn manual() -> (watch::Sender<bool>, Busy) {
        let (tx, rx) = watch::channel(false);
        (tx, Busy(rx))
    }

    /// Returns once the projector has nothing in hand, or after `limit`.
    pub async fn idle_within(&self, limit: Duration) {
        let mut busy = self.0.clone();
        let _ = tokio::time::timeout(limit, busy.wait_for(|busy| !busy)).await;
    }
}

/// Marks the projector idle when its run ends.
struct Idle<'a>(&'a watch::Sender<bool>);

impl Drop for Idle<'_> {
    fn drop(&mut self) {
        self.0.send_replace(false);
    }
}

/// A Service Roster has managed: it carries the label from its first projection on (an
/// adopted one gets it then too).
fn managed(svc: &Service) -> bool {
    has_labels(svc.labels(), &[(MANAGED_BY_LABEL, MANAGED_BY)])
}

/// Stops a trigger sending when the projector's run ends.
struct Deactivate<'a>(&'a Trigger);

impl Drop for Deactivate<'_> {
    fn drop(&mut self) {
        self.0.active.store(false, Ordering::Relaxed);
    }
}

/// Why an instance, or its whole service, is not projected as asked.
pub(super) type Problem = (&'static str, String);

/// The projector's state.
pub struct Projector {
    pub client: Client,
    pub caches: Caches,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    pub options: Options,
    pub synced: Arc<Synced>,
    pub written: Arc<Written>,
    /// What the projector keeps for itself; starts empty.
    pub state: State,
}

/// The projector's own bookkeeping.
pub struct State {
    busy: watch::Sender<bool>,
    /// uids of Services the projector deleted: the cache may still show them.
    deleted_services: Mutex<HashSet<String>>,
    /// Services whose ConfigMap would exceed the object size limit.
    too_large: Mutex<BTreeSet<ServiceKey>>,
    /// Consecutive failures per service, for the retry backoff.
    failures: Mutex<HashMap<ServiceKey, u32>>,
}

impl Default for State {
    fn default() -> Self {
        State {
            busy: watch::Sender::new(false),
            deleted_services: Mutex::default(),
            too_large: Mutex::default(),
            failures: Mutex::default(),
        }
    }
}

impl Projector {
    /// Whether this projector has work in hand.
    pub fn busy(&self) -> Busy {
        Busy(self.state.busy.subscribe())
    }

    /// Projects services as they are triggered, coalescing bursts, until `shutdown` (the end
    /// of the term). Everything is projected first: what was triggered while no term ran.
    pub async fn run(self: Arc<Self>, keys: Keys, trigger: Trigger, shutdown: CancellationToken) {
        let mut keys = tokio::select! {
            keys = keys.lock_owned() => keys,
            () = shutdown.cancelled() => return,
        };
        // What an earlier term left is covered by projecting everything below.
        while keys.try_recv().is_ok() {}
        trigger.active.store(true, Ordering::Relaxed);
        let _stop = Deactivate(&trigger);
        // Nothing is in hand once the run ends (writers that yield to it must not wait on a
        // projector that has stopped, as the status writer's drain at shutdown does).
        let _idle = Idle(&self.state.busy);
        tokio::select! {
            () = self.synced.wait() => {}
            () = shutdown.cancelled() => return,
        }
        // Everything that exists now, including orphans of services without instances.
        trigger.project_all();
        let mut queue = WorkQueue::default();
        let this = &self;
        let mut in_flight = futures::stream::FuturesUnordered::new();
        loop {
            // Free workers take what is ready; a service is never in flight twice.
            let now = tokio::time::Instant::now();
            while queue.in_flight() < self.options.concurrency.max(1)
                && let Some(key) = queue.next(now)
            {
                if key == ServiceKey::default() {
                    // "Everything": each known service waits its turn like any other.
                    queue.done(&key);
                    for known in self.known_keys() {
                        queue.add(known, now, Duration::ZERO);
                    }
                    continue;
                }
                in_flight.push(async move {
                    let started = tokio::time::Instant::now();
                    let result = this.project(&key).await;
                    tracing::debug!(namespace = %key.0, service = %key.1, took = ?started.elapsed(), "projected");
                    (key, result)
                });
            }
            // Busy while services wait or are in flight: status writes wait for this.
            self.state.busy.send_if_modified(|busy| {
                let was = std::mem::replace(busy, !queue.is_idle());
                was != *busy
            });
            // A service that waits for its delay wakes the loop; one that waits for a free
            // worker does not (a finished projection does), or the loop would spin.
            let ready = queue.wake_at(self.options.concurrency);
            let wake = async {
                match ready {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                key = keys.recv() => match key {
                    Some(key) => {
                        let now = tokio::time::Instant::now();
                        queue.add(key, now, self.options.window);
                        // Take every trigger that is already here before handing out work.
                        while let Ok(key) = keys.try_recv() {
                            queue.add(key, now, self.options.window);
                        }
                    }
                    None => return,
                },
                Some((key, result)) = in_flight.next(), if !in_flight.is_empty() => {
                    queue.done(&key);
                    self.finished(&key, result, &trigger);
                }
                () = wake => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// Records a projection's outcome; a failure is retried with backoff.
    fn finished(&self, key: &ServiceKey, result: Result<()>, trigger: &Trigger) {
        let mut failures = self
            .state
            .failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Err(e) = result else {
            failures.remove(key);
            return;
        };
        self.metrics.reconcile_failed(&e);
        let n = failures.entry(key.clone()).or_default();
        *n = n.saturating_add(1);
        // 1 s, 2 s, 4 s … at most a minute.
        let delay = Duration::from_secs(1 << (*n - 1).min(6)).min(Duration::from_secs(60));
        tracing::warn!(namespace = %key.0, service = %key.1, ?delay, error = %crate::error::report(&e), "projection failed; retrying");
        let (retry, key) = (trigger.clone(), key.clone());
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            retry.project(&key.0, &key.1);
        });
    }

    pub(super) fn known_keys(&self) -> BTreeSet<ServiceKey> {
        let mut keys: BTreeSet<ServiceKey> = self.registry.services().into_iter().collect();
        let mut add = |ns: Option<String>, svc: Option<&String>| {
            if let (Some(ns), Some(svc)) = (ns, svc) {
                keys.insert((ns, svc.clone()));
            }
        };
        for slice in self.caches.slices.store.state() {
            add(slice.namespace(), slice.labels().get(SERVICE_NAME_LABEL));
        }
        for cm in self.caches.config_maps.state() {
            add(cm.namespace(), cm.labels().get(SERVICE_LABEL));
        }
        for ep in self.caches.endpoints.iter().flat_map(Store::state) {
            add(ep.namespace(), ep.metadata.name.as_ref());
        }
        for svc in self.caches.services.state() {
            if managed(&svc) {
                add(svc.namespace(), svc.metadata.name.as_ref());
            }
        }
        keys
    }

    /// Brings one service's projection in line with its instances.
    pub async fn project(&self, key: &ServiceKey) -> Result<()> {
        let (ns, service) = key;
        let instances = self.registry.members(key);
        let members: Vec<Backend> = instances.iter().filter_map(Entry::backend).collect();
        tracing::trace!(%ns, %service, members = members.len(), ready = members.iter().filter(|m| m.conditions().ready).count(), "projecting");

        let stored_service = self
            .caches
            .services
            .get(&reflector::ObjectRef::new(service).within(ns))
            .filter(|s| !self.was_deleted(s));
        if members.is_empty() {
            // Only a Service Roster has managed (it carries the label from its first
            // projection on): one annotated for adoption before its first instance registers
            // is the user's until then, and stays.
            let ours = stored_service.as_deref().filter(|s| managed(s));
            return self.clean_up(ns, service, ours).await;
        }

        // Instances whose address no EndpointSlice can hold are left out of the slices.
        let mut per_instance: HashMap<String, Problem> = HashMap::new();
        let endpoints: Vec<Backend> = members
            .iter()
            .filter(|m| match m.endpoint_problem() {
                Some(problem) => {
                    per_instance.insert(m.name.clone(), ("InvalidEndpointAddress", problem));
                    false
                }
                None => true,
            })
            .cloned()
            .collect();

        let mut problems: Vec<Problem> = Vec::new();
        let owner = match stored_service.as_deref() {
            Some(svc) if !is_ours(svc) => {
                problems.push((
                    "ServiceConflict",
                    format!(
                        "Service {service:?} exists and is not managed by Roster; it is left untouched and no \
                         EndpointSlices are written. Delete it, or annotate it {ADOPT_ANNOTATION}=true to let \
                         Roster manage it"
                    ),
                ));
                None
            }
            // Roster's already: its uid is known, so the slices need not wait for an update of
            // its ports (under a registration burst a Service write took the apiserver up to a
            // second).
            Some(svc) if managed(svc) => Some(owner_reference(svc)),
            // New, or being adopted: it must exist, and an adopted one must have lost its
            // selector (kube-proxy would mix its pods with the instances), before any slice.
            stored => {
                let started = tokio::time::Instant::now();
                let applied = self.apply_service(ns, service, &members, stored).await?;
                tracing::trace!(%ns, %service, took = ?started.elapsed(), "service applied");
                Some(owner_reference(&applied))
            }
        };
        let service_update = async {
            match stored_service.as_deref() {
                Some(svc) if managed(svc) => self
                    .apply_service(ns, service, &members, Some(svc))
                    .await
                    .map(drop),
                _ => Ok(()),
            }
        };
        // Routing (slices, Endpoints) and the JSON view are different objects: written side by
        // side, so neither waits for the other's round trip.
        let routing = async {
            let Some(owner) = &owner else {
                return Ok(None);
            };
            let started = tokio::time::Instant::now();
            self.apply_slices(ns, service, &endpoints, owner).await?;
            tracing::trace!(%ns, %service, took = ?started.elapsed(), "slices applied");
            self.apply_endpoints(ns, service, &endpoints, owner).await
        };
        let view = async {
            let json = projection::config_json(service, &members);
            let too_large = json.len() > MAX_CONFIG_BYTES;
            self.track_too_large(key, too_large);
            if too_large {
                return Ok(Some((
                    "ConfigMapTooLarge",
                    format!(
                        "The JSON view of service {service:?} is over the {MAX_CONFIG_BYTES}-byte limit of \
                         a ConfigMap; the ConfigMap is not updated (the EndpointSlices are)"
                    ),
                )));
            }
            let started = tokio::time::Instant::now();
            let applied = self
                .apply_config_map(ns, service, json, owner.clone())
                .await;
            tracing::trace!(%ns, %service, took = ?started.elapsed(), "config map applied");
            applied
        };
        let (updated, routing, view) = tokio::join!(service_update, routing, view);
        updated?;
        problems.extend(routing?);
        problems.extend(view?);

        let service_problem = (!problems.is_empty()).then(|| {
            let reason = problems[0].0;
            let message = problems
                .iter()
                .map(|(_, m)| m.as_str())
                .collect::<Vec<_>>()
                .join("; ");
            (reason, message)
        });
        for (i, entry) in instances.iter().enumerate() {
            let own = per_instance.remove(entry.name());
            // A service-wide problem is announced once per service (on its first instance),
            // an instance's own problem on that instance.
            let announce = own.is_some() || i == 0;
            self.report(
                ns,
                entry,
                own.as_ref().or(service_problem.as_ref()),
                announce,
            )
            .await?;
        }
        Ok(())
    }

    pub(super) fn was_deleted(&self, svc: &Service) -> bool {
        let deleted = self
            .state
            .deleted_services
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        svc.uid().is_some_and(|uid| deleted.contains(&uid))
    }
}
