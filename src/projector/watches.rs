//! The watches of what the projector writes: Services, EndpointSlices, ConfigMaps and, when
//! asked for, v1 Endpoints.

use std::sync::{
    Arc, Mutex, PoisonError,
    atomic::{AtomicBool, AtomicUsize, Ordering},
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Endpoints, Service};
use kube::{
    Api, Client, Resource, ResourceExt,
    runtime::{
        WatchStreamExt,
        reflector::{self, ObjectRef, Store},
        watcher::{self, watcher},
    },
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Caches, Trigger, Written};
use crate::cache::{Grouping, Slice};
use crate::names::{
    ADOPT_ANNOTATION, MANAGED_BY, MANAGED_BY_LABEL, OVER_CAPACITY_ANNOTATION, SERVICE_LABEL,
    SERVICE_NAME_LABEL, SKIP_MIRROR_LABEL, SLICE_MANAGED_BY_LABEL,
};

/// Starts the watches of Services, EndpointSlices, ConfigMaps and (with `endpoints`) Roster's
/// Endpoints objects (the instance watch belongs to the controller), and returns their caches
/// and a flag that is set once all of them are synced.
pub fn watch_children(
    client: &Client,
    namespace: Option<&str>,
    endpoints: bool,
    trigger: &Trigger,
    written: &Arc<Written>,
    shutdown: &CancellationToken,
) -> (Caches, Arc<Synced>) {
    let synced = Arc::new(Synced::new(3 + usize::from(endpoints)));
    let watch = |config| WatchContext {
        config,
        trigger: trigger.clone(),
        written: written.clone(),
        synced: synced.clone(),
        shutdown: shutdown.clone(),
    };
    // Every Service is watched (any may be adopted): each is kept with only what the
    // projector reads of it.
    let services = spawn_watch::<Service>(
        api(client, namespace),
        watch(watcher::Config::default()),
        |svc| Some(svc.name_any()),
        crate::cache::slim_service,
    );
    let slices = spawn_watch::<Slice>(
        api(client, namespace),
        watch(watcher::Config::default().labels(&format!("{SLICE_MANAGED_BY_LABEL}={MANAGED_BY}"))),
        |slice| slice.labels().get(SERVICE_NAME_LABEL).cloned(),
        |_| {},
    );
    let config_maps = spawn_watch::<ConfigMap>(
        api(client, namespace),
        watch(watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"))),
        |cm| cm.labels().get(SERVICE_LABEL).cloned(),
        crate::cache::digest_config_map,
    );
    let endpoints = endpoints.then(|| {
        spawn_watch::<Endpoints>(
            api(client, namespace),
            watch(watcher::Config::default().labels(&format!(
                "{MANAGED_BY_LABEL}={MANAGED_BY},{SKIP_MIRROR_LABEL}=true"
            ))),
            |ep| Some(ep.name_any()),
            |_| {},
        )
        .store
    });
    let caches = Caches {
        services: services.store,
        slices,
        config_maps: config_maps.store,
        endpoints,
    };
    (caches, synced)
}

/// A watch cache with its objects grouped by the service they belong to, so one service's
/// objects are found without scanning the whole cache.
pub struct ByService<K: Resource<DynamicType = ()> + Clone + 'static> {
    pub store: Store<K>,
    groups: Arc<Mutex<Grouping>>,
}

impl<K: Resource<DynamicType = ()> + Clone + 'static> Clone for ByService<K> {
    fn clone(&self) -> Self {
        ByService {
            store: self.store.clone(),
            groups: self.groups.clone(),
        }
    }
}

impl<K: Resource<DynamicType = ()> + Clone + 'static> ByService<K> {
    /// The cached objects of service `ns/service`, in name order.
    pub fn of(&self, ns: &str, service: &str) -> Vec<Arc<K>> {
        let groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
        groups
            .members(ns, service)
            .filter_map(|name| self.store.get(&ObjectRef::new(name).within(ns)))
            .collect()
    }
}

/// Counts synced watches; the projector starts once all of them are.
pub struct Synced {
    children: usize,
    count: AtomicUsize,
    instances: AtomicBool,
    notify: Notify,
}

impl Synced {
    /// Waits for the instance watch and this many watches of the projector's objects.
    pub fn new(children: usize) -> Synced {
        Synced {
            children,
            count: AtomicUsize::new(0),
            instances: AtomicBool::new(false),
            notify: Notify::new(),
        }
    }

    pub(super) fn child_synced(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.notify.notify_waiters();
    }

    /// The instance watch (driven by the controller) has synced.
    pub fn instances_synced(&self) {
        self.instances.store(true, Ordering::Relaxed);
        self.notify.notify_waiters();
    }

    pub(super) fn all(&self) -> bool {
        self.instances.load(Ordering::Relaxed)
            && self.count.load(Ordering::Relaxed) >= self.children
    }

    pub(super) async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            if self.all() {
                return;
            }
            notified.await;
        }
    }
}

pub(super) fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

pub(super) struct WatchContext {
    config: watcher::Config,
    trigger: Trigger,
    written: Arc<Written>,
    synced: Arc<Synced>,
    shutdown: CancellationToken,
}

pub(super) fn spawn_watch<K>(
    api: Api<K>,
    cx: WatchContext,
    service_of: fn(&K) -> Option<String>,
    slim: fn(&mut K),
) -> ByService<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let kind: &'static str = match K::kind(&()).as_ref() {
        "Service" => "Service",
        "EndpointSlice" => "EndpointSlice",
        "Endpoints" => "Endpoints",
        _ => "ConfigMap",
    };
    let stream = watcher(api, cx.config)
        .default_backoff()
        .modify(move |obj| {
            crate::cache::prune(
                obj.meta_mut(),
                &[ADOPT_ANNOTATION, OVER_CAPACITY_ANNOTATION],
            );
            slim(obj);
        })
        .reflect(writer);
    let groups = Arc::new(Mutex::new(Grouping::default()));
    let cache = ByService {
        store: reader.clone(),
        groups: groups.clone(),
    };
    tokio::spawn(async move {
        let mut first_sync = true;
        let mut stream = std::pin::pin!(stream.take_until(cx.shutdown.cancelled_owned()));
        while let Some(event) = stream.next().await {
            match event {
                Ok(
                    ref event @ (watcher::Event::Apply(ref obj) | watcher::Event::Delete(ref obj)),
                ) => {
                    let (ns, name) = (obj.namespace().unwrap_or_default(), obj.name_any());
                    cx.written
                        .observed(kind, &ns, &name, obj.resource_version().as_deref());
                    let service = service_of(obj);
                    let present = matches!(event, watcher::Event::Apply(_));
                    groups.lock().unwrap_or_else(PoisonError::into_inner).set(
                        &ns,
                        &name,
                        service.clone().filter(|_| present),
                    );
                    if let Some(svc) = service {
                        cx.trigger.project(&ns, &svc);
                    }
                }
                Ok(watcher::Event::InitDone) => {
                    // The cache was swapped in whole: group it afresh.
                    let mut fresh = Grouping::default();
                    for obj in reader.state() {
                        let ns = obj.namespace().unwrap_or_default();
                        fresh.set(&ns, &obj.name_any(), service_of(&obj));
                    }
                    *groups.lock().unwrap_or_else(PoisonError::into_inner) = fresh;
                    if first_sync {
                        first_sync = false;
                        cx.synced.child_synced();
                    } else {
                        // A relist: events may have been missed.
                        cx.trigger.project_all();
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(%kind, error = %e, "watch"),
            }
        }
    });
    cache
}
