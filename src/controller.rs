//! The ServiceInstance controller: thin glue between the watch, the pure status logic in
//! [`crate::status`], and Server-Side Apply writes.

use std::{
    collections::{BTreeSet, HashMap},
    path::PathBuf,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::{coordination::v1::Lease, core::v1::ObjectReference};
use kube::{
    Api, Client, Config, Resource, ResourceExt,
    api::{
        ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, Preconditions,
    },
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt,
        controller::{self, Action, Controller},
        events::{Event, EventType, Recorder, Reporter},
        reflector::{self, ObjectRef, Store},
        watcher::{self, watcher},
    },
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::{
    Error, Result,
    api::{Phase, ServiceInstance, ServiceInstanceSpec, ServiceInstanceStatus},
    leader::{self, TermEnd},
    liveness::{self, Liveness, Observations, Sight, Signals, Tick, Timing},
    metrics::Metrics,
    names::{FIELD_MANAGER, HEARTBEAT_ANNOTATION, REPORTER},
    probe, prober,
    projection::Member,
    projector,
    protection::{self, ChangeKind, Protection, Release, Scope, Silence},
    server::{self, Health},
    status::{self, SignalProblems},
};

/// How the controller connects and what it watches.
#[derive(Clone, Debug, clap::Args)]
pub struct Settings {
    /// Path to a kubeconfig; without it, KUBECONFIG, ~/.kube/config, then the in-cluster config.
    #[arg(long, env = "ROSTER_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context to use instead of the current one.
    #[arg(long)]
    pub context: Option<String>,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, short = 'n', env = "ROSTER_NAMESPACE")]
    pub namespace: Option<String>,
    /// Address for /healthz, /readyz and /metrics (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080", env = "ROSTER_HTTP_ADDR")]
    pub http_addr: String,
    /// Maximum number of ServiceInstances reconciled at the same time.
    #[arg(long, default_value_t = 16)]
    pub concurrency: u16,
    /// Instance changes within this many milliseconds are projected together.
    #[arg(long, default_value_t = 100)]
    pub projection_window_ms: u64,
    /// Maximum number of services projected at the same time (each one's writes stay in order).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..))]
    pub projection_concurrency: u16,
    /// Project into headless Services (`clusterIP: None`) instead of ClusterIP Services.
    #[arg(long)]
    pub headless_services: bool,
    /// Maximum number of health checks running at the same time.
    #[arg(long, default_value_t = 64)]
    pub probe_concurrency: usize,

    /// Name of the Lease the replicas elect their leader with.
    #[arg(
        long,
        default_value = "roster-controller",
        env = "ROSTER_LEADER_ELECTION_LEASE"
    )]
    pub leader_election_lease: String,
    /// Namespace of that Lease (default: POD_NAMESPACE, else --namespace, else "default").
    #[arg(long, env = "ROSTER_LEADER_ELECTION_NAMESPACE")]
    pub leader_election_namespace: Option<String>,
    /// This replica's identity in the election (default: POD_NAME, else host name and pid).
    #[arg(long, env = "ROSTER_LEADER_ELECTION_IDENTITY")]
    pub leader_election_identity: Option<String>,
    /// How long a leader's Lease holds without renewal (whole seconds, as the Lease API).
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub leader_election_lease_duration: Duration,
    /// A leader that has not renewed for this long steps down.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub leader_election_renew_deadline: Duration,
    /// How often the leader renews, and candidates retry.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub leader_election_retry_period: Duration,

    /// TTL of instances that leave ttlSeconds unset (1 s to 1 h).
    #[arg(long, default_value = "30s", value_parser = parse_duration, env = "ROSTER_DEFAULT_TTL")]
    pub default_ttl: Duration,
    /// Silence after which instances that leave deleteAfterSeconds unset are deleted; unset:
    /// three times their TTL; 0s: never.
    #[arg(long, value_parser = parse_duration, env = "ROSTER_DEFAULT_DELETE_AFTER")]
    pub default_delete_after: Option<Duration>,

    /// Protection engages for a service when this share (0–1) of its instances falls silent
    /// within one TTL.
    #[arg(long, default_value_t = 0.5, value_parser = parse_share)]
    pub protection_threshold: f64,
    /// ... and for all instances together when this share of them does.
    #[arg(long, default_value_t = 0.5, value_parser = parse_share)]
    pub protection_global_threshold: f64,
    /// Services with fewer instances are never protected.
    #[arg(long, default_value_t = 5)]
    pub protection_min_instances: usize,
    /// Protection of all instances needs at least this many.
    #[arg(long, default_value_t = 20)]
    pub protection_global_min_instances: usize,
    /// Protection releases after this long even without recovery.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub protection_max_duration: Duration,
}

impl Settings {
    /// The election's parameters; fails on timings that would let two leaders overlap.
    pub fn election(&self) -> Result<leader::Params> {
        let (lease, renew, retry) = (
            self.leader_election_lease_duration,
            self.leader_election_renew_deadline,
            self.leader_election_retry_period,
        );
        if !(retry < renew && renew < lease) || lease < Duration::from_secs(1) {
            return Err(Error::Invalid(format!(
                "leader election needs retry period < renew deadline < lease duration (and a lease \
                 of at least 1 s); got {retry:?}, {renew:?}, {lease:?}"
            )));
        }
        let namespace = self
            .leader_election_namespace
            .clone()
            .or_else(|| {
                std::env::var("POD_NAMESPACE")
                    .ok()
                    .filter(|n| !n.is_empty())
            })
            .or_else(|| self.namespace.clone())
            .unwrap_or_else(|| "default".into());
        Ok(leader::Params {
            name: self.leader_election_lease.clone(),
            namespace,
            identity: self
                .leader_election_identity
                .clone()
                .unwrap_or_else(leader::default_identity),
            lease_duration: lease,
            renew_deadline: renew,
            retry_period: retry,
        })
    }

    /// TTL and deletion for instances that leave them unset; refuses what the CRD would refuse.
    pub fn defaults(&self) -> Result<liveness::Defaults> {
        let ttl = self.default_ttl;
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&ttl) {
            return Err(Error::Invalid(format!(
                "--default-ttl must be between 1s and 1h (as ttlSeconds); got {ttl:?}"
            )));
        }
        if let Some(after) = self.default_delete_after
            && !after.is_zero()
            && (after < ttl || after > Duration::from_secs(604_800))
        {
            return Err(Error::Invalid(format!(
                "--default-delete-after must be 0s (never delete) or between --default-ttl \
                 ({ttl:?}) and 7 days (as deleteAfterSeconds); got {after:?}"
            )));
        }
        Ok(liveness::Defaults {
            ttl,
            delete_after: self.default_delete_after,
        })
    }

    pub fn protection(&self) -> protection::Settings {
        protection::Settings {
            service: protection::Threshold {
                share: self.protection_threshold,
                min_instances: self.protection_min_instances,
            },
            global: protection::Threshold {
                share: self.protection_global_threshold,
                min_instances: self.protection_global_min_instances,
            },
            max_duration: self.protection_max_duration,
        }
    }
}

/// Parses "15s", "1m 30s", "500ms" (jiff's friendly format) or ISO 8601 ("PT15S").
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let d: jiff::SignedDuration = s
        .parse()
        .map_err(|e| format!("{s:?} is not a duration like 15s, 1m30s or 500ms: {e}"))?;
    Duration::try_from(d).map_err(|_| format!("{s:?} is negative"))
}

fn parse_share(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if (0.0..=1.0).contains(&x) && x > 0.0 => Ok(x),
        _ => Err(format!(
            "{s:?} is not a share between 0 (exclusive) and 1, like 0.5"
        )),
    }
}

/// The longest a graceful shutdown waits for in-flight work.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// State shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub metrics: Arc<Metrics>,
    recorder: Recorder,
    leases: Store<Lease>,
    views: Arc<Views>,
    /// TTL and deletion for instances that leave them unset.
    defaults: liveness::Defaults,
}

/// What the watch streams tell the reconciler: when they last (re)started, whether the Lease
/// cache is complete, which instances name which Lease, and the liveness observations.
struct Views {
    /// Origin of the controller's monotonic clock.
    origin: tokio::time::Instant,
    /// Nanoseconds after `origin` of the last (re)list of either watch.
    relisted_at: AtomicU64,
    leases_synced: AtomicBool,
    /// A watch (of instances, of Leases) failed and has not delivered since: heartbeats may be
    /// going unseen, so nothing is judged silent or expired until it recovers, and its recovery
    /// starts a fresh view.
    instance_watch_broken: AtomicBool,
    lease_watch_broken: AtomicBool,
    lease_index: Mutex<LeaseIndex>,
    observations: Mutex<Observations>,
    /// The last status this controller wrote, by uid: the cache can lag behind our own writes,
    /// and comparing with a stale copy would write (and announce) a transition twice.
    written: Mutex<HashMap<String, ServiceInstanceStatus>>,
    /// Where instance changes that matter to the projection are sent.
    projection: projector::Trigger,
    prober: prober::Prober,
    membership: projector::Membership,
    /// The election, and with it [`leader::Contact`]: whether the apiserver answers.
    elector: Arc<leader::Elector>,
    guard: Mutex<protection::Guard>,
    /// Where changes of protection go to be announced.
    announce: futures::channel::mpsc::UnboundedSender<Vec<protection::Change>>,
}

impl Views {
    fn now(&self) -> Tick {
        Tick(self.origin.elapsed())
    }

    fn relisted(&self) {
        let nanos = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.relisted_at.fetch_max(nanos, Ordering::Relaxed);
    }

    /// The start of the current view: the last (re)list of a watch, or the moment the
    /// apiserver answered again after it did not.
    fn view_floor(&self) -> Tick {
        let relisted = Tick(Duration::from_nanos(
            self.relisted_at.load(Ordering::Relaxed),
        ));
        let restored = self
            .elector
            .contact()
            .restored_at()
            .map(|at| Tick(at.saturating_duration_since(self.origin)))
            .unwrap_or_default();
        relisted.max(restored)
    }

    fn instant(&self, tick: Tick) -> tokio::time::Instant {
        self.origin + tick.0
    }

    fn protection(&self) -> std::sync::MutexGuard<'_, protection::Guard> {
        self.guard.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends changes of protection to be announced. A release gives every instance it held a
    /// fresh TTL from now: the stragglers of a recovery are not deleted on the spot for a
    /// silence that protection was covering.
    fn announce(&self, changes: Vec<protection::Change>) {
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

    fn index(&self, si: &ServiceInstance, present: bool) {
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
    fn watch_result(&self, broken: &AtomicBool, ok: bool, what: &str) {
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

    fn any_watch_broken(&self) -> bool {
        self.instance_watch_broken.load(Ordering::Relaxed)
            || self.lease_watch_broken.load(Ordering::Relaxed)
    }

    /// The instances to reconcile when `lease` changes.
    fn instances_for(&self, lease: &Lease) -> Vec<ObjectRef<ServiceInstance>> {
        let Some(ns) = lease.namespace() else {
            return Vec::new();
        };
        let index = self
            .lease_index
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        index
            .instances(&ns, &lease.name_any())
            .map(|n| ObjectRef::new(n).within(&ns))
            .collect()
    }

    /// Sends the instance's service(s) to the projector if what it projects changed.
    fn project(&self, si: &ServiceInstance, present: bool) {
        let Some(ns) = si.namespace() else {
            return;
        };
        let member = if present {
            Member::from_instance(si)
        } else {
            None
        };
        for service in
            self.membership
                .changed(&ns, &si.name_any(), member.as_ref(), &si.spec.service)
        {
            self.projection.project(&ns, &service);
        }
    }

    /// Feeds the index, the observations and the projector from the instance watch.
    fn on_instance_event(&self, event: &watcher::Event<ServiceInstance>) {
        match event {
            watcher::Event::Init => self.relisted(),
            watcher::Event::InitApply(si) | watcher::Event::Apply(si) => {
                self.index(si, true);
                self.project(si, true);
                self.prober.watch(si);
            }
            watcher::Event::Delete(si) => {
                self.index(si, false);
                self.project(si, false);
                self.prober.forget(si);
                if let Some(ns) = si.namespace() {
                    self.observations
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .forget(&ns, &si.name_any());
                    let changes = self.protection().forget(&(ns, si.name_any()), self.now());
                    self.announce(changes);
                }
                if let Some(uid) = si.uid() {
                    self.written
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&uid);
                }
            }
            watcher::Event::InitDone => {}
        }
    }
}

/// Which instances heartbeat through which Lease, both ways, so a change of `spec.leaseName`
/// or a deletion leaves nothing behind.
#[derive(Default)]
struct LeaseIndex {
    by_lease: HashMap<(String, String), BTreeSet<String>>,
    by_instance: HashMap<(String, String), String>,
}

impl LeaseIndex {
    fn set(&mut self, ns: &str, instance: &str, lease: Option<String>) {
        let key = (ns.to_string(), instance.to_string());
        if let Some(old) = self.by_instance.remove(&key) {
            let lease_key = (ns.to_string(), old);
            if let Some(names) = self.by_lease.get_mut(&lease_key) {
                names.remove(instance);
                if names.is_empty() {
                    self.by_lease.remove(&lease_key);
                }
            }
        }
        if let Some(lease) = lease {
            self.by_lease
                .entry((ns.to_string(), lease.clone()))
                .or_default()
                .insert(instance.to_string());
            self.by_instance.insert(key, lease);
        }
    }

    fn instances(&self, ns: &str, lease: &str) -> impl Iterator<Item = &String> {
        self.by_lease
            .get(&(ns.to_string(), lease.to_string()))
            .into_iter()
            .flatten()
    }
}

/// A Lease's renewal as an opaque token: any change of it is a heartbeat.
fn renewal(lease: &Lease) -> Option<String> {
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

/// Builds a client the usual way: `--kubeconfig` (and `--context`) when given, else inference
/// (KUBECONFIG, ~/.kube/config, in-cluster). Returns the cluster URL for error messages.
pub async fn connect(
    kubeconfig: Option<&PathBuf>,
    context: Option<&String>,
) -> Result<(Client, String)> {
    let options = KubeConfigOptions {
        context: context.cloned(),
        ..Default::default()
    };
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|e| Error::Config(Box::new(e)))?;
            Config::from_custom_kubeconfig(kc, &options)
                .await
                .map_err(|e| Error::Config(Box::new(e)))?
        }
        None if context.is_some() => Config::from_kubeconfig(&options)
            .await
            .map_err(|e| Error::Config(Box::new(e)))?,
        None => Config::infer()
            .await
            .map_err(|e| Error::Config(Box::new(e)))?,
    };
    let url = config.cluster_url.to_string();
    let client = Client::try_from(config).map_err(|e| Error::Config(Box::new(e)))?;
    Ok((client, url))
}

/// Fails with a clear error when the apiserver cannot be reached or the CRD is missing, so the
/// controller exits with a message instead of retrying a watch that can never succeed.
pub async fn preflight(client: &Client, url: &str, namespace: Option<&str>) -> Result<()> {
    client
        .apiserver_version()
        .await
        .map_err(|source| Error::Unreachable {
            url: url.to_string(),
            source,
        })?;
    match instances(client.clone(), namespace)
        .list_metadata(&ListParams::default().limit(1))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Err(Error::CrdNotInstalled {
            url: url.to_string(),
        }),
        Err(e) => Err(Error::kube("list ServiceInstances")(e)),
    }
}

fn instances(client: Client, namespace: Option<&str>) -> Api<ServiceInstance> {
    match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    }
}

/// Runs the controller and its HTTP endpoints until `shutdown` is cancelled: stands for
/// election, and leads while it holds the Lease. Every term starts from nothing (fresh caches,
/// fresh observations), which is what gives every instance a full TTL after a leader change.
pub async fn run(settings: &Settings, shutdown: CancellationToken) -> Result<()> {
    let election = settings.election()?;
    settings.defaults()?;
    let (client, url) = connect(settings.kubeconfig.as_ref(), settings.context.as_ref()).await?;
    preflight(&client, &url, settings.namespace.as_deref()).await?;

    let metrics = Arc::new(Metrics::default());
    let health = Health {
        metrics: metrics.clone(),
        ready: Arc::default(),
    };
    let (addr, serve) = server::bind(&settings.http_addr, health.clone(), shutdown.clone()).await?;
    tracing::info!(%addr, version = crate::version(), "serving /healthz, /readyz and /metrics");
    let serve = tokio::spawn(serve);

    let identity = election.identity.clone();
    let lease = format!("{}/{}", election.namespace, election.name);
    let elector = Arc::new(leader::Elector::new(client.clone(), election));
    let process = Process {
        client,
        url,
        metrics: metrics.clone(),
        health: health.clone(),
        elector: elector.clone(),
        shutdown: shutdown.clone(),
    };
    let result = loop {
        // A standby that reaches the apiserver is ready: it is healthy and waiting its turn.
        let ready = health.ready.clone();
        if !elector
            .acquire(&shutdown, || ready.store(true, Ordering::Relaxed))
            .await
        {
            break Ok(());
        }
        tracing::info!(%identity, %lease, "became leader");
        metrics.set_leader(true);
        let term = shutdown.child_token();
        let hold = {
            let (elector, term) = (elector.clone(), term.clone());
            tokio::spawn(async move {
                let end = elector.hold(&term).await;
                term.cancel();
                end
            })
        };
        let led = lead(settings, &process, &term).await;
        term.cancel();
        let end = hold.await.unwrap_or(TermEnd::Lost);
        metrics.set_leader(false);
        if let Err(e) = led {
            break Err(e);
        }
        if shutdown.is_cancelled() {
            elector.release().await;
            break Ok(());
        }
        if end == TermEnd::Lost {
            tracing::warn!("lost leadership: stopped writing; standing for election again");
        }
    };
    shutdown.cancel();
    match serve.await {
        Ok(served) => served?,
        Err(e) => tracing::warn!(error = %e, "HTTP server task"),
    }
    tracing::info!("controller stopped");
    result
}

/// Decodes the raw objects of the instance watch. One that cannot be decoded (stored before a
/// schema change, say) is reported once per version (a log line, a Warning Event, the
/// `roster_undecodable_instances` gauge) and skipped; the rest of the watch goes on.
struct Decoder {
    /// uid → resourceVersion of the objects that failed, as reported.
    bad: Mutex<HashMap<String, String>>,
    metrics: Arc<Metrics>,
    report: futures::channel::mpsc::UnboundedSender<(ObjectReference, String)>,
}

impl Decoder {
    fn decode(
        &self,
        event: std::result::Result<watcher::Event<DynamicObject>, watcher::Error>,
    ) -> Option<std::result::Result<watcher::Event<ServiceInstance>, watcher::Error>> {
        let event = match event {
            Ok(event) => event,
            Err(e) => return Some(Err(e)),
        };
        Some(Ok(match event {
            watcher::Event::Init => watcher::Event::Init,
            watcher::Event::InitDone => watcher::Event::InitDone,
            watcher::Event::InitApply(obj) => watcher::Event::InitApply(self.one(obj)?),
            watcher::Event::Apply(obj) => watcher::Event::Apply(self.one(obj)?),
            watcher::Event::Delete(obj) => {
                let metadata = obj.metadata.clone();
                let forgotten = metadata
                    .uid
                    .as_ref()
                    .is_some_and(|uid| self.bad_set().remove(uid).is_some());
                if forgotten {
                    self.metrics.set_undecodable(self.bad_set().len());
                }
                // Its spec does not matter for a deletion: only who it was.
                let si = obj.try_parse::<ServiceInstance>().unwrap_or_else(|_| {
                    let mut si = ServiceInstance::new("", ServiceInstanceSpec::new("", "", vec![]));
                    si.metadata = metadata;
                    si
                });
                watcher::Event::Delete(si)
            }
        }))
    }

    fn bad_set(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.bad.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn one(&self, obj: DynamicObject) -> Option<ServiceInstance> {
        let reference = obj.object_ref(&ApiResource::erase::<ServiceInstance>(&()));
        let uid = obj.metadata.uid.clone().unwrap_or_default();
        let version = obj.metadata.resource_version.clone().unwrap_or_default();
        match obj.try_parse::<ServiceInstance>() {
            Ok(si) => {
                if self.bad_set().remove(&uid).is_some() {
                    self.metrics.set_undecodable(self.bad_set().len());
                }
                Some(si)
            }
            Err(e) => {
                let previous = self.bad_set().insert(uid, version.clone());
                self.metrics.set_undecodable(self.bad_set().len());
                if previous.as_deref() != Some(version.as_str()) {
                    let message = e.to_string();
                    tracing::warn!(
                        namespace = reference.namespace.as_deref().unwrap_or_default(),
                        name = reference.name.as_deref().unwrap_or_default(),
                        error = %message,
                        "cannot decode a ServiceInstance; skipping it until it is fixed or deleted"
                    );
                    let _ = self.report.unbounded_send((reference, message));
                }
                None
            }
        }
    }
}

/// Publishes a Warning Event on each instance that cannot be decoded.
async fn report_undecodable(
    mut reports: futures::channel::mpsc::UnboundedReceiver<(ObjectReference, String)>,
    recorder: Recorder,
    term: CancellationToken,
) {
    loop {
        let (reference, message) = tokio::select! {
            () = term.cancelled() => return,
            report = reports.next() => match report {
                Some(report) => report,
                None => return,
            },
        };
        let mut note = format!(
            "Roster cannot read this ServiceInstance (stored before a schema change?) and skips \
             it until it is fixed or deleted: {message}"
        );
        if note.len() > 1000 {
            let mut end = 1000;
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            note.truncate(end);
        }
        let event = Event {
            type_: EventType::Warning,
            reason: "Undecodable".into(),
            note: Some(note),
            action: "Decode".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, &reference).await {
            tracing::warn!(error = %e, "cannot publish Event");
        }
    }
}

/// What outlives a term.
struct Process {
    client: Client,
    url: String,
    metrics: Arc<Metrics>,
    health: Health,
    elector: Arc<leader::Elector>,
    shutdown: CancellationToken,
}

/// One term as leader: watches, reconciles, projects and probes until `term` is cancelled (by
/// shutdown or by the loss of the Lease).
async fn lead(settings: &Settings, process: &Process, term: &CancellationToken) -> Result<()> {
    let Process {
        client,
        url,
        metrics,
        health,
        elector,
        shutdown,
    } = process;
    let client = client.clone();
    let (projection, projection_keys) = projector::trigger();
    // Verdict changes of health checks, and changes of protection, reconcile their instances.
    let (requeue_tx, requeue_rx) = futures::channel::mpsc::unbounded();
    let (announce_tx, announce_rx) = futures::channel::mpsc::unbounded();
    let views = Arc::new(Views {
        origin: tokio::time::Instant::now(),
        relisted_at: AtomicU64::new(0),
        leases_synced: AtomicBool::new(false),
        instance_watch_broken: AtomicBool::new(false),
        lease_watch_broken: AtomicBool::new(false),
        lease_index: Mutex::default(),
        observations: Mutex::default(),
        written: Mutex::default(),
        projection: projection.clone(),
        membership: projector::Membership::default(),
        prober: prober::spawn(
            settings.probe_concurrency,
            requeue_tx.clone(),
            metrics.clone(),
            term.clone(),
        ),
        elector: elector.clone(),
        guard: Mutex::new(protection::Guard::new(settings.protection())),
        announce: announce_tx,
    });
    let written = Arc::new(projector::Written::default());
    let (services, slices, config_maps, synced) = projector::watch_children(
        &client,
        settings.namespace.as_deref(),
        &projection,
        &written,
        term,
    );

    // Leases: renewals are heartbeats of the instances that name them.
    let lease_api: Api<Lease> = match settings.namespace.as_deref() {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let (lease_reader, lease_writer) = reflector::store();
    let lease_views = views.clone();
    let lease_events = watcher(lease_api, watcher::Config::default())
        .default_backoff()
        .reflect(lease_writer)
        .inspect(move |event| {
            let views = &lease_views;
            views.watch_result(&views.lease_watch_broken, event.is_ok(), "Lease");
            match event {
                Ok(watcher::Event::Init) => views.relisted(),
                Ok(watcher::Event::InitDone) => views.leases_synced.store(true, Ordering::Relaxed),
                Err(e) => tracing::warn!(error = %e, "Lease watch"),
                _ => {}
            }
        })
        .touched_objects();

    // ServiceInstances. Readiness is taken from this stream's first InitDone, not from
    // `Store::wait_until_ready`: a second waiter beside the controller's own is never woken.
    let (reader, writer) = reflector::store();
    let ready = health.ready.clone();
    let first_sync = Arc::new(AtomicBool::new(false));
    let instance_views = views.clone();
    let instances_synced = synced.clone();
    let instance_reader = reader.clone();
    let (relist_tx, relist_rx) = futures::channel::mpsc::unbounded::<()>();
    // No generation predicate: annotation heartbeats do not bump the generation. Objects are
    // watched raw and decoded one by one, so one that cannot be decoded is skipped instead of
    // failing every list (and stalling the watch).
    let (undecodable_tx, undecodable_rx) = futures::channel::mpsc::unbounded();
    let decoder = Decoder {
        bad: Mutex::default(),
        metrics: metrics.clone(),
        report: undecodable_tx,
    };
    let raw = ApiResource::erase::<ServiceInstance>(&());
    let raw: Api<DynamicObject> = match settings.namespace.as_deref() {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &raw),
        None => Api::all_with(client.clone(), &raw),
    };
    let events = watcher(raw, watcher::Config::default())
        .default_backoff()
        .filter_map(move |event| futures::future::ready(decoder.decode(event)))
        .reflect(writer)
        .inspect(move |event| {
            let views = &instance_views;
            views.watch_result(
                &views.instance_watch_broken,
                event.is_ok(),
                "ServiceInstance",
            );
            match event {
                Ok(event) => {
                    views.on_instance_event(event);
                    if let watcher::Event::InitDone = event {
                        if !first_sync.swap(true, Ordering::Relaxed) {
                            ready.store(true, Ordering::Relaxed);
                            instances_synced.instances_synced();
                            tracing::info!("ServiceInstance cache synced; ready");
                        } else {
                            // After a relist the cache was swapped in whole: reconcile everything,
                            // so instances that appeared during the relist are judged too.
                            let _ = relist_tx.unbounded_send(());
                            views.projection.project_all();
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "ServiceInstance watch"),
            }
        })
        .touched_objects();

    let mapper_views = views.clone();
    let controller = Controller::for_stream(events, reader)
        .reconcile_all_on(relist_rx)
        .reconcile_on(requeue_rx)
        .watches_stream(lease_events, move |lease: Lease| {
            mapper_views.instances_for(&lease)
        })
        .with_config(controller::Config::default().concurrency(settings.concurrency));

    tracing::info!(cluster = %url, namespace = settings.namespace.as_deref().unwrap_or("<all>"), "controller started");
    let reporter = Reporter {
        controller: REPORTER.into(),
        instance: std::env::var("POD_NAME")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok()),
    };
    let recorder = Recorder::new(client.clone(), reporter);
    let projector = Arc::new(projector::Projector::new(
        client.clone(),
        projector::Caches {
            instances: instance_reader,
            services,
            slices,
            config_maps,
        },
        metrics.clone(),
        recorder.clone(),
        projector::Options {
            window: Duration::from_millis(settings.projection_window_ms),
            concurrency: usize::from(settings.projection_concurrency),
            headless: settings.headless_services,
        },
        synced,
        written,
    ));
    tokio::spawn(projector.run(projection_keys, projection, term.clone()));
    tokio::spawn(report_undecodable(
        undecodable_rx,
        recorder.clone(),
        term.clone(),
    ));
    tokio::spawn(announce(
        announce_rx,
        views.clone(),
        recorder.clone(),
        metrics.clone(),
        requeue_tx,
        term.clone(),
    ));
    let ctx = Arc::new(Context {
        recorder,
        client,
        metrics: metrics.clone(),
        leases: lease_reader,
        views,
        defaults: settings.defaults()?,
    });
    let run = controller
        .graceful_shutdown_on(term.clone().cancelled_owned())
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile loop");
            }
        });
    // A shutdown finishes in-flight reconciles, but never waits longer than this: one that
    // arrives before the first sync would otherwise wait for a sync that the stopped watch can
    // no longer deliver. A lost term stops at once: another leader may be about to start.
    let deadline = async {
        term.cancelled().await;
        if shutdown.is_cancelled() {
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        }
    };
    tokio::select! {
        () = run => {}
        () = deadline => tracing::warn!("stopping in-flight reconciles now"),
    }
    term.cancel();
    Ok(())
}

async fn reconcile(si: Arc<ServiceInstance>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started();
    let (Some(namespace), Some(uid)) = (si.namespace(), si.uid()) else {
        // A namespaced object from the apiserver always has both.
        return Ok(Action::await_change());
    };
    let name = si.name_any();
    let views = &ctx.views;
    if si.metadata.deletion_timestamp.is_some() {
        // Being deleted (by us, its owner's garbage collection, or a user): nothing to judge.
        return Ok(Action::await_change());
    }

    // Heartbeat signals. Until the Lease cache is complete, a Lease that is not in it yet would
    // look like one that appears later (a heartbeat): judge once it is complete.
    let lease = match &si.spec.lease_name {
        Some(_) if !views.leases_synced.load(Ordering::Relaxed) => {
            return Ok(Action::requeue(Duration::from_millis(100)));
        }
        Some(lease) => Some(ctx.leases.get(&ObjectRef::new(lease).within(&namespace))),
        None => None,
    };
    let annotation = si.annotations().get(HEARTBEAT_ANNOTATION).cloned();
    let mut problems = SignalProblems {
        lease_missing: matches!(lease, Some(None)),
        annotation_not_timestamp: annotation
            .as_deref()
            .is_some_and(|v| v.parse::<jiff::Timestamp>().is_err()),
        health_check: None,
        protected: None,
    };
    let signals = Signals {
        annotation,
        lease: lease.flatten().and_then(|l| renewal(&l)),
    };
    let cached_renewal = signals.lease.clone();

    let now = views.now();
    let sight = Sight {
        namespace: &namespace,
        name: &name,
        uid: &uid,
        fresh: si.status.is_none(),
        signals,
    };
    let floor = views.view_floor();
    let (observed, heartbeat) = views
        .observations
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .observe(sight, now, floor);
    if heartbeat {
        ctx.metrics.heartbeat_observed();
    }
    let timing = Timing::of(&si.spec, &ctx.defaults);
    // What the status says now: what we last wrote when we have it (the cache may not have
    // caught up with our own writes yet), else the cache's.
    let baseline = views
        .written
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&uid)
        .cloned()
        .unwrap_or_else(|| status::liveness_view(si.status.as_ref()));
    let judgement = liveness::judge(timing, observed, status::prior(Some(&baseline)), now);
    // The health check's verdict; before this controller has one, the written one stands.
    problems.health_check =
        si.spec
            .health_check
            .as_ref()
            .map(|_| match views.prober.verdicts.get(&uid) {
                probe::Verdict::Unknown => status::health_check_prior(Some(&baseline)),
                verdict => verdict,
            });
    let silent = matches!(judgement.liveness, Liveness::Silent | Liveness::Expired);
    if silent {
        if views.any_watch_broken() {
            // Heartbeats may be arriving unseen: judge nothing silent until the watch is back.
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
        // Believe only a silence the apiserver could have broken: a request that started after
        // the verdict became due must have been answered (a paused apiserver or etcd breaks no
        // watch, it just delivers nothing).
        if let Some(due) = judgement.due
            && !views
                .elector
                .contact()
                .confirmed_since(views.instant(due))
                .await
        {
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
        if views.view_floor() != floor {
            // Contact came back while this waited: judge again in the fresh view.
            return Ok(Action::requeue(Duration::from_millis(10)));
        }
    }

    // Protection against mass expiry: every verdict counts; the scope decides.
    let key = (namespace.clone(), name.clone());
    let silence = match (silent, judgement.silent_since) {
        (false, _) => Silence::None,
        (true, Some(at)) => Silence::Since(at),
        (true, None) => Silence::Older,
    };
    let service = Scope::Service {
        namespace: namespace.clone(),
        service: si.spec.service.clone(),
    };
    let (changes, protection, max_duration) = {
        let mut guard = views.protection();
        let changes = guard.report(key.clone(), service, silence, timing.ttl, now);
        (
            changes,
            guard.protects(&key).filter(|_| silent),
            guard.settings().max_duration,
        )
    };
    views.announce(changes);
    let was_alive = observed.last_heartbeat.is_some()
        || status::prior(Some(&baseline)) == liveness::Prior::Alive;
    problems.protected = protection.as_ref().map(|p| {
        let hold_readiness = p.readiness_held && was_alive;
        status::Protected {
            message: protected_message(p, hold_readiness, max_duration),
            hold_readiness,
        }
    });
    if judgement.liveness == Liveness::Expired && protection.is_none() {
        return expire(&si, timing, &namespace, &uid, cached_renewal, &ctx).await;
    }

    let desired = status::desired(
        &si,
        timing,
        Some(&baseline),
        judgement.liveness,
        &problems,
        jiff::Timestamp::now(),
    );
    if baseline != desired {
        let api: Api<ServiceInstance> = Api::namespaced(ctx.client.clone(), &namespace);
        let patch = json!({
            "apiVersion": ServiceInstance::api_version(&()),
            "kind": ServiceInstance::kind(&()),
            "status": desired,
        });
        api.patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(Error::kube(format!(
            "apply the status of ServiceInstance {namespace}/{name}"
        )))?;
        ctx.metrics.status_written();
        views
            .written
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(uid.clone(), desired.clone());
        let before = baseline.phase;
        if let Some(phase) = desired.phase
            && before != Some(phase)
        {
            ctx.metrics.transitioned(phase);
            tracing::info!(%namespace, %name, from = ?before, to = ?phase, "transition");
            let held = problems
                .protected
                .as_ref()
                .is_some_and(|p| p.hold_readiness);
            let event = if held && silent {
                Event {
                    type_: EventType::Warning,
                    reason: "Protected".into(),
                    note: Some(
                        "No heartbeat, but held at its last-known-good readiness by protection \
                         against mass expiry"
                            .into(),
                    ),
                    action: "Reconcile".into(),
                    secondary: None,
                }
            } else {
                transition_event(timing, phase)
            };
            publish(&ctx, &si, event);
        }
    }
    // A protected instance is judged again when the time cap releases it at the latest.
    let next = [judgement.next_check, protection.map(|p| p.until)]
        .into_iter()
        .flatten()
        .min();
    Ok(match next {
        Some(at) => Action::requeue(at.saturating_since(now)),
        None => Action::await_change(),
    })
}

/// The `Protected` condition's message: the same for the whole episode, so it causes no write.
fn protected_message(p: &Protection, hold_readiness: bool, max: Duration) -> String {
    let held = if hold_readiness {
        " and its last-known-good readiness is held"
    } else {
        ""
    };
    format!(
        "{} of {} instances ({}) fell silent within one TTL, more likely a partition or an \
         apiserver problem than mass death: its deletion is suspended{held} until they recover, \
         for at most {} s",
        p.silent,
        p.total,
        p.scope,
        max.as_secs()
    )
}

/// Announces changes of protection: a log line, the metrics, an Event on the Service (on the
/// election Lease for all instances), and a reconcile of every silent instance of the scope,
/// so that their status and the projection follow at once.
async fn announce(
    mut changes: futures::channel::mpsc::UnboundedReceiver<Vec<protection::Change>>,
    views: Arc<Views>,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    requeue: futures::channel::mpsc::UnboundedSender<ObjectRef<ServiceInstance>>,
    term: CancellationToken,
) {
    loop {
        let batch = tokio::select! {
            () = term.cancelled() => return,
            batch = changes.next() => match batch {
                Some(batch) => batch,
                None => return,
            },
        };
        for change in batch {
            let (engaged, max) = {
                let guard = views.protection();
                let engaged: Vec<Scope> = guard.engaged().cloned().collect();
                (engaged, guard.settings().max_duration.as_secs())
            };
            metrics.protection_changed(&change.kind, engaged.into_iter());
            let scope = &change.scope;
            let (type_, reason, note) = match change.kind {
                ChangeKind::Engaged { silent, total } => {
                    metrics.protection_engaged(scope);
                    tracing::warn!(%scope, silent, total, "protection against mass expiry engaged");
                    (
                        EventType::Warning,
                        "ProtectionEngaged",
                        format!(
                            "{silent} of {total} instances ({scope}) fell silent within one TTL: \
                             deletion suspended and last-known-good readiness held until they \
                             recover, for at most {max} s"
                        ),
                    )
                }
                ChangeKind::Released(Release::Recovered) => {
                    tracing::info!(%scope, "protection against mass expiry released: recovered");
                    (
                        EventType::Normal,
                        "ProtectionReleased",
                        format!("Heartbeats are back ({scope}): protection released"),
                    )
                }
                ChangeKind::Released(Release::TimeCap) => {
                    tracing::warn!(%scope, "protection against mass expiry released: time cap");
                    (
                        EventType::Warning,
                        "ProtectionTimedOut",
                        format!(
                            "Protection ({scope}) released after {max} s without recovery; silent \
                             instances are judged as usual again"
                        ),
                    )
                }
            };
            let reference = match scope {
                Scope::Service { namespace, service } => ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Service".into()),
                    name: Some(service.clone()),
                    namespace: Some(namespace.clone()),
                    ..ObjectReference::default()
                },
                Scope::All => {
                    let p = views.elector.params();
                    ObjectReference {
                        api_version: Some("coordination.k8s.io/v1".into()),
                        kind: Some("Lease".into()),
                        name: Some(p.name.clone()),
                        namespace: Some(p.namespace.clone()),
                        ..ObjectReference::default()
                    }
                }
            };
            let event = Event {
                type_,
                reason: reason.into(),
                note: Some(note),
                action: "Protect".into(),
                secondary: None,
            };
            if let Err(e) = recorder.publish(&event, &reference).await {
                tracing::warn!(%scope, reason, error = %e, "cannot publish Event");
            }
            for (namespace, name) in change.affected {
                let _ = requeue.unbounded_send(ObjectRef::new(&name).within(&namespace));
            }
        }
    }
}

/// Deletes an instance after `deleteAfterSeconds` of observed silence. It loses every race
/// with a heartbeat: an annotation heartbeat changes the instance's resourceVersion, so the
/// delete's preconditions refuse it; a Lease renewal does not, so the Lease is read afresh
/// first and a renewal the cache has not delivered yet cancels the deletion.
async fn expire(
    si: &ServiceInstance,
    timing: Timing,
    namespace: &str,
    uid: &str,
    cached_renewal: Option<String>,
    ctx: &Context,
) -> Result<Action> {
    let name = si.name_any();
    if let Some(lease) = &si.spec.lease_name {
        let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), namespace);
        let fresh = leases.get_opt(lease).await.map_err(Error::kube(format!(
            "read Lease {namespace}/{lease} before expiring {name}"
        )))?;
        if fresh.as_ref().and_then(renewal) != cached_renewal {
            // Renewed after what we saw: the Lease watch will bring it as a heartbeat.
            return Ok(Action::requeue(Duration::from_millis(200)));
        }
    }
    let api: Api<ServiceInstance> = Api::namespaced(ctx.client.clone(), namespace);
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some(uid.to_string()),
            resource_version: si.resource_version(),
        }),
        ..DeleteParams::default()
    };
    match api.delete(&name, &params).await {
        Ok(_) => {
            ctx.metrics.expired();
            let after = timing.delete_after.unwrap_or_default().as_secs();
            tracing::info!(%namespace, %name, after_seconds = after, "expired: deleted");
            let event = Event {
                type_: EventType::Warning,
                reason: "Expired".into(),
                note: Some(format!(
                    "Deleted after {after} s without an observed heartbeat (deleteAfterSeconds)"
                )),
                action: "Delete".into(),
                secondary: None,
            };
            publish(ctx, si, event);
            Ok(Action::await_change())
        }
        // Changed (a heartbeat?): judge again once the watch brings the new state.
        Err(kube::Error::Api(status)) if status.code == 409 => {
            Ok(Action::requeue(Duration::from_millis(200)))
        }
        // Already gone.
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(Action::await_change()),
        Err(e) => Err(Error::kube(format!(
            "delete expired ServiceInstance {namespace}/{name}"
        ))(e)),
    }
}

fn transition_event(timing: Timing, phase: Phase) -> Event {
    let ttl = timing.ttl.as_secs();
    let (type_, reason, note) = match phase {
        Phase::Pending => (
            EventType::Normal,
            "Registered",
            "Registered; waiting for the first heartbeat".to_string(),
        ),
        Phase::Ready => (
            EventType::Normal,
            "Ready",
            "Heartbeat observed; receiving traffic".to_string(),
        ),
        Phase::Draining => (
            EventType::Normal,
            "Draining",
            "spec.draining is set; no new traffic, in-flight work drains".to_string(),
        ),
        Phase::Unhealthy => (
            EventType::Warning,
            "HeartbeatSilent",
            format!("No heartbeat observed for {ttl} s; out of rotation"),
        ),
    };
    Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    }
}

/// Events are best effort: a failure is logged, never fails the reconcile.
///
/// They are written off the reconcile's path: awaiting each one doubled the time a transition
/// took (the benchmark, docs/benchmark.md), and an Event never decides anything.
fn publish(ctx: &Context, si: &ServiceInstance, event: Event) {
    let (recorder, reference, name) = (ctx.recorder.clone(), si.object_ref(&()), si.name_any());
    tokio::spawn(async move {
        if let Err(e) = recorder.publish(&event, &reference).await {
            tracing::warn!(%name, reason = %event.reason, error = %e, "cannot publish Event");
        }
    });
}

fn error_policy(si: Arc<ServiceInstance>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed(error);
    tracing::warn!(name = %si.name_any(), namespace = si.namespace().unwrap_or_default(), error = %crate::error::report(error), "reconcile failed");
    Action::requeue(Duration::from_secs(1))
}
