//! The projector: keeps, for every (namespace, service) with instances, a selectorless Service,
//! its EndpointSlices and a ConfigMap in line with the registry.
//!
//! Thin by design: it reads the watch caches, asks [`crate::projection`] what should exist, and
//! writes only objects whose relevant fields differ. Changes are coalesced: a burst of instance
//! changes within the window is one projection per service.
//!
//! The caches can lag behind the projector's own writes, so it also remembers what it last wrote
//! (with the resourceVersion the apiserver gave it) and what it deleted; a watch event with any
//! other resourceVersion means someone else wrote, and the cache is believed again.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::{
    api::{
        core::v1::{ConfigMap, ObjectReference, Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::OwnerReference, util::intstr::IntOrString},
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams},
    runtime::{
        WatchStreamExt,
        events::{Event, EventType, Recorder},
        reflector::{self, Store},
        watcher::{self, watcher},
    },
};
use serde_json::json;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::{
    Error, Result,
    api::ServiceInstance,
    metrics::Metrics,
    names::{
        ADOPT_ANNOTATION, CONFIG_KEY, MANAGED_BY, MANAGED_BY_LABEL, PROJECTION_MANAGER,
        SERVICE_LABEL, SERVICE_NAME_LABEL, SLICE_MANAGED_BY_LABEL, config_map_name,
    },
    projection::{
        self, AddressType, DesiredSlice, ExistingSlice, MAX_CONFIG_BYTES, Member, PortKey, SliceKey,
    },
};

/// Condition type the projector sets on instances when they, or their service, cannot be
/// projected as asked.
pub const PROJECTED: &str = "Projected";

/// A service: (namespace, name). The empty key means "every service".
pub type Key = (String, String);

/// How the projector behaves.
#[derive(Clone, Debug)]
pub struct Options {
    /// Changes within this window are projected together.
    pub window: Duration,
    /// Services projected at the same time. A service is in a batch at most once and batches
    /// run one after another, so one service's writes never race each other.
    pub concurrency: usize,
    /// Headless Services (`clusterIP: None`) instead of ClusterIP; applies to Services it
    /// creates (a Service's clusterIP cannot change).
    pub headless: bool,
}

/// Sends services to project; cheap to clone.
#[derive(Clone)]
pub struct Trigger(mpsc::UnboundedSender<Key>);

impl Trigger {
    pub fn project(&self, namespace: &str, service: &str) {
        // The receiver lives as long as the projector; after it stops there is nothing to do.
        let _ = self.0.send((namespace.to_string(), service.to_string()));
    }

    /// Every known service: after a relist, when the caches were swapped in whole.
    pub fn project_all(&self) {
        let _ = self.0.send(Key::default());
    }
}

/// Creates the trigger channel.
pub fn trigger() -> (Trigger, mpsc::UnboundedReceiver<Key>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Trigger(tx), rx)
}

/// The caches the projector reads.
pub struct Caches {
    pub instances: Store<ServiceInstance>,
    pub services: Store<Service>,
    pub slices: Store<EndpointSlice>,
    pub config_maps: Store<ConfigMap>,
}

/// What each instance last looked like to the projection (its service and a fingerprint of
/// the projected fields), so that only changes that matter trigger a projection: a heartbeat
/// does not, a phase change does, and a change of `spec.service` re-projects the old service
/// too.
#[derive(Default)]
pub struct Membership(Mutex<HashMap<Key, (String, u64)>>);

impl Membership {
    /// Records instance `namespace/name` (`None`: deleted) and returns the services to project.
    pub fn changed(
        &self,
        namespace: &str,
        name: &str,
        now: Option<&Member>,
        service: &str,
    ) -> Vec<String> {
        use std::hash::{Hash, Hasher};
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (namespace.to_string(), name.to_string());
        let before = match now {
            Some(member) => {
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                member.hash(&mut hasher);
                let fingerprint = (service.to_string(), hasher.finish());
                let before = map.insert(key, fingerprint.clone());
                if before.as_ref() == Some(&fingerprint) {
                    return Vec::new();
                }
                before
            }
            None => map.remove(&key),
        };
        let mut services = vec![service.to_string()];
        if let Some((old, _)) = before
            && old != service
        {
            services.push(old);
        }
        services
    }
}

/// What the projector last wrote, by (kind, namespace, name): the resourceVersion the apiserver
/// returned and the desired object as JSON.
#[derive(Default)]
pub struct Written(Mutex<HashMap<ObjectKey, (ResourceVersion, String)>>);

/// (kind, namespace, name).
type ObjectKey = (&'static str, String, String);
type ResourceVersion = String;

impl Written {
    fn key(kind: &'static str, ns: &str, name: &str) -> ObjectKey {
        (kind, ns.to_string(), name.to_string())
    }

    /// Whether `desired` is exactly what we last wrote, and nobody has written since.
    fn unchanged(&self, kind: &'static str, ns: &str, name: &str, desired: &str) -> bool {
        let map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(&Self::key(kind, ns, name))
            .is_some_and(|(_, d)| d == desired)
    }

    fn record(
        &self,
        kind: &'static str,
        ns: &str,
        name: &str,
        rv: Option<String>,
        desired: String,
    ) {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match rv {
            Some(rv) => map.insert(Self::key(kind, ns, name), (rv, desired)),
            None => map.remove(&Self::key(kind, ns, name)),
        };
    }

    /// A watch event: a resourceVersion other than ours means another writer; forget ours.
    fn observed(&self, kind: &'static str, ns: &str, name: &str, rv: Option<&str>) {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let key = Self::key(kind, ns, name);
        if map
            .get(&key)
            .is_some_and(|(ours, _)| Some(ours.as_str()) != rv)
        {
            map.remove(&key);
        }
    }
}

/// Starts the watches of Services, EndpointSlices and ConfigMaps (the instance watch belongs to
/// the controller) and returns their caches and a flag that is set once all three are synced.
pub fn watch_children(
    client: &Client,
    namespace: Option<&str>,
    trigger: &Trigger,
    written: &Arc<Written>,
    shutdown: &CancellationToken,
) -> (
    Store<Service>,
    Store<EndpointSlice>,
    Store<ConfigMap>,
    Arc<Synced>,
) {
    let synced = Arc::new(Synced::default());
    let watch = |config| WatchContext {
        config,
        trigger: trigger.clone(),
        written: written.clone(),
        synced: synced.clone(),
        shutdown: shutdown.clone(),
    };
    let services = spawn_watch::<Service>(
        api(client, namespace),
        watch(watcher::Config::default()),
        |svc| Some(svc.name_any()),
    );
    let slices = spawn_watch::<EndpointSlice>(
        api(client, namespace),
        watch(watcher::Config::default().labels(&format!("{SLICE_MANAGED_BY_LABEL}={MANAGED_BY}"))),
        |slice| slice.labels().get(SERVICE_NAME_LABEL).cloned(),
    );
    let config_maps = spawn_watch::<ConfigMap>(
        api(client, namespace),
        watch(watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"))),
        |cm| cm.labels().get(SERVICE_LABEL).cloned(),
    );
    (services, slices, config_maps, synced)
}

/// Counts synced watches; the projector starts once all of them are.
#[derive(Default)]
pub struct Synced {
    count: AtomicUsize,
    instances: AtomicBool,
    notify: Notify,
}

impl Synced {
    const CHILD_WATCHES: usize = 3;

    fn child_synced(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.notify.notify_waiters();
    }

    /// The instance watch (driven by the controller) has synced.
    pub fn instances_synced(&self) {
        self.instances.store(true, Ordering::Relaxed);
        self.notify.notify_waiters();
    }

    fn all(&self) -> bool {
        self.instances.load(Ordering::Relaxed)
            && self.count.load(Ordering::Relaxed) >= Self::CHILD_WATCHES
    }

    async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            if self.all() {
                return;
            }
            notified.await;
        }
    }
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

struct WatchContext {
    config: watcher::Config,
    trigger: Trigger,
    written: Arc<Written>,
    synced: Arc<Synced>,
    shutdown: CancellationToken,
}

fn spawn_watch<K>(api: Api<K>, cx: WatchContext, service_of: fn(&K) -> Option<String>) -> Store<K>
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
        _ => "ConfigMap",
    };
    let stream = watcher(api, cx.config).default_backoff().reflect(writer);
    tokio::spawn(async move {
        let mut first_sync = true;
        let mut stream = std::pin::pin!(stream.take_until(cx.shutdown.cancelled_owned()));
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Apply(obj) | watcher::Event::Delete(obj)) => {
                    let (ns, name) = (obj.namespace().unwrap_or_default(), obj.name_any());
                    cx.written
                        .observed(kind, &ns, &name, obj.resource_version().as_deref());
                    if let Some(svc) = service_of(&obj) {
                        cx.trigger.project(&ns, &svc);
                    }
                }
                Ok(watcher::Event::InitDone) if first_sync => {
                    first_sync = false;
                    cx.synced.child_synced();
                }
                // A relist: the cache was swapped in whole and events may have been missed.
                Ok(watcher::Event::InitDone) => cx.trigger.project_all(),
                Ok(_) => {}
                Err(e) => tracing::warn!(%kind, error = %e, "watch"),
            }
        }
    });
    reader
}

/// Why an instance, or its whole service, is not projected as asked.
type Problem = (&'static str, String);

/// The projector's state.
pub struct Projector {
    pub client: Client,
    pub caches: Caches,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    pub options: Options,
    pub synced: Arc<Synced>,
    written: Arc<Written>,
    /// uids of Services the projector deleted: the cache may still show them.
    deleted_services: Mutex<HashSet<String>>,
    /// Services whose ConfigMap would exceed the object size limit.
    too_large: Mutex<BTreeSet<Key>>,
    /// Consecutive failures per service, for the retry backoff.
    failures: Mutex<HashMap<Key, u32>>,
}

impl Projector {
    pub fn new(
        client: Client,
        caches: Caches,
        metrics: Arc<Metrics>,
        recorder: Recorder,
        options: Options,
        synced: Arc<Synced>,
        written: Arc<Written>,
    ) -> Self {
        Projector {
            client,
            caches,
            metrics,
            recorder,
            options,
            synced,
            written,
            deleted_services: Mutex::default(),
            too_large: Mutex::default(),
            failures: Mutex::default(),
        }
    }

    /// Projects services as they are triggered, coalescing bursts, until `shutdown`.
    pub async fn run(
        self: Arc<Self>,
        mut keys: mpsc::UnboundedReceiver<Key>,
        trigger: Trigger,
        shutdown: CancellationToken,
    ) {
        tokio::select! {
            () = self.synced.wait() => {}
            () = shutdown.cancelled() => return,
        }
        // Everything that exists now, including orphans of services without instances.
        trigger.project_all();
        loop {
            let first = tokio::select! {
                key = keys.recv() => match key { Some(k) => k, None => return },
                () = shutdown.cancelled() => return,
            };
            let mut batch = BTreeSet::from([first]);
            let window = tokio::time::sleep(self.options.window);
            tokio::pin!(window);
            loop {
                tokio::select! {
                    key = keys.recv() => match key { Some(k) => { batch.insert(k); } None => break },
                    () = &mut window => break,
                }
            }
            if batch.remove(&Key::default()) {
                batch.extend(self.known_keys());
            }
            // A burst touches many services; one at a time, the batch's length is the sum of
            // their round trips (the benchmark saw 10 000 instances over 500 services fall
            // behind that way).
            let mut results = futures::stream::iter(batch)
                .map(|key| async {
                    let result = self.project(&key).await;
                    (key, result)
                })
                .buffer_unordered(self.options.concurrency.max(1));
            loop {
                let (key, result) = tokio::select! {
                    next = results.next() => match next { Some(r) => r, None => break },
                    () = shutdown.cancelled() => return,
                };
                let mut failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
                match result {
                    Ok(()) => {
                        failures.remove(&key);
                    }
                    Err(e) => {
                        self.metrics.reconcile_failed(&e);
                        let n = failures.entry(key.clone()).or_default();
                        *n = n.saturating_add(1);
                        // 1 s, 2 s, 4 s … at most a minute.
                        let delay =
                            Duration::from_secs(1 << (*n - 1).min(6)).min(Duration::from_secs(60));
                        tracing::warn!(namespace = %key.0, service = %key.1, ?delay, error = %crate::error::report(&e), "projection failed; retrying");
                        let retry = trigger.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(delay).await;
                            retry.project(&key.0, &key.1);
                        });
                    }
                }
            }
        }
    }

    fn known_keys(&self) -> BTreeSet<Key> {
        let mut keys = BTreeSet::new();
        let mut add = |ns: Option<String>, svc: Option<&String>| {
            if let (Some(ns), Some(svc)) = (ns, svc) {
                keys.insert((ns, svc.clone()));
            }
        };
        for si in self.caches.instances.state() {
            add(si.namespace(), Some(&si.spec.service));
        }
        for slice in self.caches.slices.state() {
            add(slice.namespace(), slice.labels().get(SERVICE_NAME_LABEL));
        }
        for cm in self.caches.config_maps.state() {
            add(cm.namespace(), cm.labels().get(SERVICE_LABEL));
        }
        for svc in self.caches.services.state() {
            if has_labels(svc.labels(), &[(MANAGED_BY_LABEL, MANAGED_BY)]) {
                add(svc.namespace(), svc.metadata.name.as_ref());
            }
        }
        keys
    }

    /// Brings one service's projection in line with its instances.
    pub async fn project(&self, key: &Key) -> Result<()> {
        let (ns, service) = key;
        let mut instances: Vec<Arc<ServiceInstance>> = self
            .caches
            .instances
            .state()
            .into_iter()
            .filter(|si| si.namespace().as_deref() == Some(ns) && si.spec.service == *service)
            .collect();
        instances.sort_by_key(|si| si.name_any());
        let members: Vec<Member> = instances
            .iter()
            .filter_map(|si| Member::from_instance(si))
            .collect();

        let stored_service = self
            .caches
            .services
            .get(&reflector::ObjectRef::new(service).within(ns))
            .filter(|s| !self.was_deleted(s));
        if members.is_empty() {
            let ours = stored_service.as_deref().filter(|s| is_ours(s));
            return self.clean_up(ns, service, ours).await;
        }

        // Instances whose address no EndpointSlice can hold are left out of the slices.
        let mut per_instance: HashMap<String, Problem> = HashMap::new();
        let endpoints: Vec<Member> = members
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
            stored => Some(owner_reference(
                &self.apply_service(ns, service, &members, stored).await?,
            )),
        };
        if let Some(owner) = &owner {
            self.apply_slices(ns, service, &endpoints, owner).await?;
        }
        let json = projection::config_json(service, &members);
        let too_large = json.len() > MAX_CONFIG_BYTES;
        self.track_too_large(key, too_large);
        if too_large {
            problems.push((
                "ConfigMapTooLarge",
                format!(
                    "The JSON view of service {service:?} is over the {MAX_CONFIG_BYTES}-byte limit of a \
                     ConfigMap; the ConfigMap is not updated (the EndpointSlices are)"
                ),
            ));
        } else if let Some(problem) = self.apply_config_map(ns, service, json, owner).await? {
            problems.push(problem);
        }

        let service_problem = (!problems.is_empty()).then(|| {
            let reason = problems[0].0;
            let message = problems
                .iter()
                .map(|(_, m)| m.as_str())
                .collect::<Vec<_>>()
                .join("; ");
            (reason, message)
        });
        for (i, si) in instances.iter().enumerate() {
            let own = per_instance.remove(&si.name_any());
            // A service-wide problem is announced once per service (on its first instance),
            // an instance's own problem on that instance.
            let announce = own.is_some() || i == 0;
            self.report(si, own.as_ref().or(service_problem.as_ref()), announce)
                .await?;
        }
        Ok(())
    }

    fn was_deleted(&self, svc: &Service) -> bool {
        let deleted = self
            .deleted_services
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        svc.uid().is_some_and(|uid| deleted.contains(&uid))
    }

    async fn apply_service(
        &self,
        ns: &str,
        service: &str,
        members: &[Member],
        stored: Option<&Service>,
    ) -> Result<Service> {
        let ports: Vec<ServicePort> = projection::service_ports(members)
            .into_iter()
            .map(|p| ServicePort {
                name: Some(p.name),
                port: p.port,
                target_port: Some(IntOrString::Int(p.port)),
                protocol: Some(p.protocol),
                app_protocol: p.app_protocol,
                ..ServicePort::default()
            })
            .collect();
        let api: Api<Service> = Api::namespaced(self.client.clone(), ns);
        let applied = match stored {
            Some(stored) => {
                if has_labels(stored.labels(), &[(MANAGED_BY_LABEL, MANAGED_BY)])
                    && let Some(spec) = &stored.spec
                    && spec.selector.as_ref().is_none_or(BTreeMap::is_empty)
                    && same_ports(spec.ports.as_deref().unwrap_or_default(), &ports)
                {
                    return Ok(stored.clone());
                }
                // Ours, or adopted: a merge patch, which replaces the port list and drops a
                // selector whoever set them (an apply would leave other managers' fields).
                let patch = json!({
                    "metadata": {"labels": {MANAGED_BY_LABEL: MANAGED_BY}},
                    "spec": {"selector": null, "ports": ports},
                });
                api.patch(service, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map_err(Error::kube(format!("update Service {ns}/{service}")))?
            }
            None => {
                let desired = Service {
                    metadata: ObjectMeta {
                        name: Some(service.into()),
                        namespace: Some(ns.into()),
                        labels: Some(BTreeMap::from([(
                            MANAGED_BY_LABEL.into(),
                            MANAGED_BY.into(),
                        )])),
                        ..ObjectMeta::default()
                    },
                    spec: Some(ServiceSpec {
                        type_: Some("ClusterIP".into()),
                        cluster_ip: self.options.headless.then(|| "None".into()),
                        ports: Some(ports),
                        ..ServiceSpec::default()
                    }),
                    status: None,
                };
                api.patch(service, &apply_params(), &Patch::Apply(&desired))
                    .await
                    .map_err(Error::kube(format!("create Service {ns}/{service}")))?
            }
        };
        self.metrics.projection_written("Service");
        Ok(applied)
    }

    async fn apply_slices(
        &self,
        ns: &str,
        service: &str,
        members: &[Member],
        owner: &OwnerReference,
    ) -> Result<()> {
        let stored: Vec<Arc<EndpointSlice>> = self
            .caches
            .slices
            .state()
            .into_iter()
            .filter(|s| {
                s.namespace().as_deref() == Some(ns)
                    && s.labels().get(SERVICE_NAME_LABEL).map(String::as_str) == Some(service)
            })
            .collect();
        let existing: Vec<ExistingSlice> =
            stored.iter().filter_map(|s| existing_slice(s)).collect();
        let desired = projection::pack(service, members, &existing);
        let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), ns);
        for slice in &desired {
            let object = slice_object(ns, service, slice, owner);
            let json = serde_json::to_string(&object).map_err(|source| Error::Serialize {
                what: "an EndpointSlice",
                source,
            })?;
            let current = stored
                .iter()
                .find(|s| s.metadata.name.as_deref() == Some(slice.name.as_str()));
            if self
                .written
                .unchanged("EndpointSlice", ns, &slice.name, &json)
                || current.is_some_and(|c| same_slice(c, &object))
            {
                continue;
            }
            let applied = api
                .patch(&slice.name, &apply_params(), &Patch::Apply(&object))
                .await
                .map_err(Error::kube(format!(
                    "apply EndpointSlice {ns}/{}",
                    slice.name
                )))?;
            self.written.record(
                "EndpointSlice",
                ns,
                &slice.name,
                applied.resource_version(),
                json,
            );
            self.metrics.projection_written("EndpointSlice");
        }
        let keep: BTreeSet<&str> = desired.iter().map(|s| s.name.as_str()).collect();
        for orphan in stored
            .iter()
            .filter(|s| !keep.contains(s.name_any().as_str()))
        {
            delete(&api, &orphan.name_any()).await?;
            self.written
                .record("EndpointSlice", ns, &orphan.name_any(), None, String::new());
            self.metrics.projection_written("EndpointSlice");
        }
        Ok(())
    }

    /// Writes the ConfigMap if it differs; returns a problem instead if a ConfigMap of that
    /// name exists that is not Roster's.
    async fn apply_config_map(
        &self,
        ns: &str,
        service: &str,
        json: String,
        owner: Option<OwnerReference>,
    ) -> Result<Option<Problem>> {
        let name = config_map_name(service);
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        let stored = self
            .caches
            .config_maps
            .get(&reflector::ObjectRef::new(&name).within(ns));
        let owners: Vec<OwnerReference> = owner.clone().into_iter().collect();
        if let Some(stored) = &stored
            && stored.data.as_ref().and_then(|d| d.get(CONFIG_KEY)) == Some(&json)
            && stored.metadata.owner_references.clone().unwrap_or_default() == owners
        {
            return Ok(None);
        }
        let fingerprint = format!("{json}{owners:?}");
        if self.written.unchanged("ConfigMap", ns, &name, &fingerprint) {
            return Ok(None);
        }
        // Not in our (label-selected) cache: make sure it is not someone else's before applying.
        if stored.is_none()
            && let Some(theirs) = api
                .get_opt(&name)
                .await
                .map_err(Error::kube(format!("read ConfigMap {ns}/{name}")))?
            && !has_labels(theirs.labels(), &[(MANAGED_BY_LABEL, MANAGED_BY)])
        {
            return Ok(Some((
                "ConfigMapConflict",
                format!(
                    "ConfigMap {name:?} exists and is not managed by Roster; it is left untouched"
                ),
            )));
        }
        let desired = ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.into()),
                labels: Some(BTreeMap::from([
                    (MANAGED_BY_LABEL.into(), MANAGED_BY.into()),
                    (SERVICE_LABEL.into(), service.into()),
                ])),
                owner_references: owner.map(|o| vec![o]),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([(CONFIG_KEY.into(), json)])),
            ..ConfigMap::default()
        };
        let applied = api
            .patch(&name, &apply_params(), &Patch::Apply(&desired))
            .await
            .map_err(Error::kube(format!("apply ConfigMap {ns}/{name}")))?;
        self.written.record(
            "ConfigMap",
            ns,
            &name,
            applied.resource_version(),
            fingerprint,
        );
        self.metrics.projection_written("ConfigMap");
        Ok(None)
    }

    /// The last instance of a service went: its Service, slices and ConfigMap go too.
    async fn clean_up(&self, ns: &str, service: &str, our_service: Option<&Service>) -> Result<()> {
        self.track_too_large(&(ns.to_string(), service.to_string()), false);
        let slices: Api<EndpointSlice> = Api::namespaced(self.client.clone(), ns);
        for slice in self.caches.slices.state().iter().filter(|s| {
            s.namespace().as_deref() == Some(ns)
                && s.labels().get(SERVICE_NAME_LABEL).map(String::as_str) == Some(service)
        }) {
            delete(&slices, &slice.name_any()).await?;
            self.written
                .record("EndpointSlice", ns, &slice.name_any(), None, String::new());
        }
        let name = config_map_name(service);
        if self
            .caches
            .config_maps
            .get(&reflector::ObjectRef::new(&name).within(ns))
            .is_some()
        {
            delete(
                &Api::<ConfigMap>::namespaced(self.client.clone(), ns),
                &name,
            )
            .await?;
            self.written
                .record("ConfigMap", ns, &name, None, String::new());
        }
        if let Some(svc) = our_service {
            delete(
                &Api::<Service>::namespaced(self.client.clone(), ns),
                service,
            )
            .await?;
            if let Some(uid) = svc.uid() {
                self.deleted_services
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(uid);
            }
        }
        Ok(())
    }

    fn track_too_large(&self, key: &Key, too_large: bool) {
        let mut set = self
            .too_large
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let changed = if too_large {
            set.insert(key.clone())
        } else {
            set.remove(key)
        };
        if changed {
            self.metrics.set_config_maps_too_large(set.len());
        }
    }

    /// Sets (or clears) the `Projected` condition of an instance: written only when it
    /// changes, with an Event (if `announce`) when a problem appears.
    async fn report(
        &self,
        si: &ServiceInstance,
        problem: Option<&Problem>,
        announce: bool,
    ) -> Result<()> {
        let current = si
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == PROJECTED));
        let conditions = match (problem, current) {
            (None, None) => return Ok(()),
            (Some((reason, message)), Some(c)) if c.reason == *reason && c.message == *message => {
                return Ok(());
            }
            (None, Some(_)) => json!([]),
            (Some((reason, message)), _) => json!([{
                "type": PROJECTED,
                "status": "False",
                "reason": reason,
                "message": message,
                "observedGeneration": si.metadata.generation,
                "lastTransitionTime": jiff::Timestamp::now().to_string(),
            }]),
        };
        let (Some(ns), name) = (si.namespace(), si.name_any()) else {
            return Ok(());
        };
        let patch = json!({
            "apiVersion": ServiceInstance::api_version(&()),
            "kind": ServiceInstance::kind(&()),
            "status": {"conditions": conditions},
        });
        Api::<ServiceInstance>::namespaced(self.client.clone(), &ns)
            .patch_status(&name, &apply_params(), &Patch::Apply(&patch))
            .await
            .map_err(Error::kube(format!(
                "set the Projected condition of {ns}/{name}"
            )))?;
        if let Some((reason, message)) = problem
            && announce
        {
            let event = Event {
                type_: EventType::Warning,
                reason: (*reason).into(),
                note: Some(message.clone()),
                action: "Project".into(),
                secondary: None,
            };
            if let Err(e) = self.recorder.publish(&event, &si.object_ref(&())).await {
                tracing::warn!(%name, error = %e, "cannot publish Event");
            }
        }
        Ok(())
    }
}

fn apply_params() -> PatchParams {
    PatchParams::apply(PROJECTION_MANAGER).force()
}

async fn delete<K>(api: &Api<K>, name: &str) -> Result<()>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(Error::kube(format!("delete {name}"))(e)),
    }
}

/// A Service is Roster's when it carries Roster's label or the user opted it in.
fn is_ours(svc: &Service) -> bool {
    has_labels(svc.labels(), &[(MANAGED_BY_LABEL, MANAGED_BY)])
        || svc.annotations().get(ADOPT_ANNOTATION).map(String::as_str) == Some("true")
}

fn has_labels(labels: &BTreeMap<String, String>, want: &[(&str, &str)]) -> bool {
    want.iter()
        .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
}

fn same_ports(stored: &[ServicePort], desired: &[ServicePort]) -> bool {
    let key = |p: &ServicePort| {
        (
            p.name.clone(),
            p.port,
            p.target_port.clone().map(|t| format!("{t:?}")),
            p.protocol.clone().unwrap_or_else(|| "TCP".into()),
            p.app_protocol.clone(),
        )
    };
    let mut a: Vec<_> = stored.iter().map(key).collect();
    let mut b: Vec<_> = desired.iter().map(key).collect();
    a.sort();
    b.sort();
    a == b
}

fn owner_reference(svc: &Service) -> OwnerReference {
    OwnerReference {
        api_version: "v1".into(),
        kind: "Service".into(),
        name: svc.name_any(),
        uid: svc.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// Reads back what a stored slice holds; `None` for one that is not shaped like Roster's.
fn existing_slice(slice: &EndpointSlice) -> Option<ExistingSlice> {
    let mut ports: Vec<PortKey> = slice
        .ports
        .iter()
        .flatten()
        .map(|p| PortKey {
            name: p.name.clone().unwrap_or_default(),
            port: p.port.unwrap_or_default(),
            protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
            app_protocol: p.app_protocol.clone(),
        })
        .collect();
    ports.sort();
    Some(ExistingSlice {
        name: slice.metadata.name.clone()?,
        key: SliceKey {
            address_type: AddressType::parse(&slice.address_type)?,
            ports,
        },
        members: slice
            .endpoints
            .iter()
            .filter_map(|e| e.target_ref.as_ref()?.name.clone())
            .collect(),
    })
}

fn slice_object(
    ns: &str,
    service: &str,
    slice: &DesiredSlice,
    owner: &OwnerReference,
) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(slice.name.clone()),
            namespace: Some(ns.into()),
            labels: Some(BTreeMap::from([
                (SERVICE_NAME_LABEL.into(), service.into()),
                (SLICE_MANAGED_BY_LABEL.into(), MANAGED_BY.into()),
                // So `kubectl get svc,endpointslices,cm -l app.kubernetes.io/managed-by=roster.dev`
                // lists everything Roster writes.
                (MANAGED_BY_LABEL.into(), MANAGED_BY.into()),
            ])),
            owner_references: Some(vec![owner.clone()]),
            ..ObjectMeta::default()
        },
        address_type: slice.key.address_type.as_str().into(),
        ports: Some(
            slice
                .key
                .ports
                .iter()
                .map(|p| EndpointPort {
                    name: Some(p.name.clone()),
                    port: Some(p.port),
                    protocol: Some(p.protocol.clone()),
                    app_protocol: p.app_protocol.clone(),
                })
                .collect(),
        ),
        endpoints: slice
            .members
            .iter()
            .map(|m| {
                let c = m.conditions();
                Endpoint {
                    addresses: vec![m.address.clone()],
                    conditions: Some(EndpointConditions {
                        ready: Some(c.ready),
                        serving: Some(c.serving),
                        terminating: Some(c.terminating),
                    }),
                    zone: m.zone.clone(),
                    target_ref: Some(ObjectReference {
                        api_version: Some(ServiceInstance::api_version(&()).into()),
                        kind: Some(ServiceInstance::kind(&()).into()),
                        name: Some(m.name.clone()),
                        namespace: Some(ns.into()),
                        uid: Some(m.uid.clone()),
                        ..ObjectReference::default()
                    }),
                    ..Endpoint::default()
                }
            })
            .collect(),
    }
}

/// Whether a stored slice already says what `desired` says (our labels, owner, address type,
/// ports and endpoints); fields others may add (more labels, annotations) do not count.
fn same_slice(stored: &EndpointSlice, desired: &EndpointSlice) -> bool {
    let want: Vec<(&str, &str)> = desired
        .labels()
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    has_labels(stored.labels(), &want)
        && stored.metadata.owner_references == desired.metadata.owner_references
        && stored.address_type == desired.address_type
        && stored.ports == desired.ports
        && stored.endpoints == desired.endpoints
}
