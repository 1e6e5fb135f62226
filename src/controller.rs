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
use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    Api, Client, Config, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, Preconditions},
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
    api::{Phase, ServiceInstance},
    liveness::{self, Liveness, Observations, Sight, Signals, Tick, Timing},
    metrics::Metrics,
    names::{FIELD_MANAGER, HEARTBEAT_ANNOTATION, REPORTER},
    projection::Member,
    projector,
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
    /// Project into headless Services (`clusterIP: None`) instead of ClusterIP Services.
    #[arg(long)]
    pub headless_services: bool,
}

/// State shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub metrics: Arc<Metrics>,
    recorder: Recorder,
    leases: Store<Lease>,
    views: Arc<Views>,
}

/// What the watch streams tell the reconciler: when they last (re)started, whether the Lease
/// cache is complete, which instances name which Lease, and the liveness observations.
struct Views {
    /// Origin of the controller's monotonic clock.
    origin: tokio::time::Instant,
    /// Nanoseconds after `origin` of the last (re)list of either watch.
    relisted_at: AtomicU64,
    leases_synced: AtomicBool,
    /// (namespace, lease name) → names of the instances that heartbeat through it.
    lease_index: Mutex<HashMap<(String, String), BTreeSet<String>>>,
    observations: Mutex<Observations>,
    /// Where instance changes that matter to the projection are sent.
    projection: projector::Trigger,
    membership: projector::Membership,
}

impl Views {
    fn now(&self) -> Tick {
        Tick(self.origin.elapsed())
    }

    fn relisted(&self) {
        let nanos = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.relisted_at.fetch_max(nanos, Ordering::Relaxed);
    }

    fn view_floor(&self) -> Tick {
        Tick(Duration::from_nanos(
            self.relisted_at.load(Ordering::Relaxed),
        ))
    }

    fn index(&self, si: &ServiceInstance, present: bool) {
        let (Some(ns), Some(lease)) = (si.namespace(), si.spec.lease_name.clone()) else {
            return;
        };
        let mut index = self
            .lease_index
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let names = index.entry((ns, lease)).or_default();
        if present {
            names.insert(si.name_any());
        } else {
            names.remove(&si.name_any());
        }
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
            .get(&(ns.clone(), lease.name_any()))
            .map(|names| {
                names
                    .iter()
                    .map(|n| ObjectRef::new(n).within(&ns))
                    .collect()
            })
            .unwrap_or_default()
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
            }
            watcher::Event::Delete(si) => {
                self.index(si, false);
                self.project(si, false);
                if let Some(ns) = si.namespace() {
                    self.observations
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .forget(&ns, &si.name_any());
                }
            }
            watcher::Event::InitDone => {}
        }
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

/// Runs the controller and its HTTP endpoints until `shutdown` is cancelled.
pub async fn run(settings: &Settings, shutdown: CancellationToken) -> Result<()> {
    let (client, url) = connect(settings.kubeconfig.as_ref(), settings.context.as_ref()).await?;
    preflight(&client, &url, settings.namespace.as_deref()).await?;

    let metrics = Arc::new(Metrics::default());
    let health = Health {
        metrics: metrics.clone(),
        ready: Arc::default(),
    };
    let (addr, serve) = server::bind(&settings.http_addr, health.clone(), shutdown.clone()).await?;
    tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
    let serve = tokio::spawn(serve);

    let (projection, projection_keys) = projector::trigger();
    let views = Arc::new(Views {
        origin: tokio::time::Instant::now(),
        relisted_at: AtomicU64::new(0),
        leases_synced: AtomicBool::new(false),
        lease_index: Mutex::default(),
        observations: Mutex::default(),
        projection: projection.clone(),
        membership: projector::Membership::default(),
    });
    let (services, slices, config_maps, synced) = projector::watch_children(
        &client,
        settings.namespace.as_deref(),
        &projection,
        &shutdown,
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
        .inspect(move |event| match event {
            Ok(watcher::Event::Init) => lease_views.relisted(),
            Ok(watcher::Event::InitDone) => {
                lease_views.leases_synced.store(true, Ordering::Relaxed)
            }
            Err(e) => tracing::warn!(error = %e, "Lease watch"),
            _ => {}
        })
        .touched_objects();

    // ServiceInstances. Readiness is taken from this stream's first InitDone, not from
    // `Store::wait_until_ready`: a second waiter beside the controller's own is never woken.
    let (reader, writer) = reflector::store();
    let ready = health.ready.clone();
    let instance_views = views.clone();
    let instances_synced = synced.clone();
    let instance_reader = reader.clone();
    // No generation predicate: annotation heartbeats do not bump the generation.
    let events = watcher(
        instances(client.clone(), settings.namespace.as_deref()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(writer)
    .inspect(move |event| match event {
        Ok(event) => {
            instance_views.on_instance_event(event);
            if let watcher::Event::InitDone = event
                && !ready.swap(true, Ordering::Relaxed)
            {
                instances_synced.instances_synced();
                tracing::info!("ServiceInstance cache synced; ready");
            }
        }
        Err(e) => tracing::warn!(error = %e, "ServiceInstance watch"),
    })
    .touched_objects();

    let mapper_views = views.clone();
    let controller = Controller::for_stream(events, reader)
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
            headless: settings.headless_services,
        },
        synced,
    ));
    tokio::spawn(projector.run(projection_keys, projection, shutdown.clone()));
    let ctx = Arc::new(Context {
        recorder,
        client,
        metrics,
        leases: lease_reader,
        views,
    });
    controller
        .graceful_shutdown_on(shutdown.clone().cancelled_owned())
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile loop");
            }
        })
        .await;
    shutdown.cancel();
    match serve.await {
        Ok(result) => result?,
        Err(e) => tracing::warn!(error = %e, "HTTP server task"),
    }
    tracing::info!("controller stopped");
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
    let problems = SignalProblems {
        lease_missing: matches!(lease, Some(None)),
        annotation_not_timestamp: annotation
            .as_deref()
            .is_some_and(|v| v.parse::<jiff::Timestamp>().is_err()),
    };
    let signals = Signals {
        annotation,
        lease: lease.flatten().and_then(|l| renewal(&l)),
    };

    let now = views.now();
    let sight = Sight {
        namespace: &namespace,
        name: &name,
        uid: &uid,
        fresh: si.status.is_none(),
        signals,
    };
    let (observed, heartbeat) = views
        .observations
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .observe(sight, now, views.view_floor());
    if heartbeat {
        ctx.metrics.heartbeat_observed();
    }
    let timing = Timing {
        ttl: si.spec.ttl(),
        delete_after: si.spec.delete_after(),
    };
    let judgement = liveness::judge(timing, observed, status::prior(&si), now);
    if judgement.liveness == Liveness::Expired {
        return expire(&si, &namespace, &uid, &ctx).await;
    }

    let desired = status::desired(&si, judgement.liveness, &problems, jiff::Timestamp::now());
    if status::liveness_view(si.status.as_ref()) != desired {
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
        let before = si.status.as_ref().and_then(|s| s.phase);
        if let Some(phase) = desired.phase
            && before != Some(phase)
        {
            ctx.metrics.transitioned(phase);
            tracing::info!(%namespace, %name, from = ?before, to = ?phase, "transition");
            publish(&ctx, &si, transition_event(&si, phase)).await;
        }
    }
    Ok(match judgement.next_check {
        Some(at) => Action::requeue(at.saturating_since(now)),
        None => Action::await_change(),
    })
}

/// Deletes an instance after `deleteAfterSeconds` of observed silence. The uid and
/// resourceVersion preconditions make it lose any race: a heartbeat that lands first changes
/// the resourceVersion, the delete is refused, and the watch brings the heartbeat.
async fn expire(si: &ServiceInstance, namespace: &str, uid: &str, ctx: &Context) -> Result<Action> {
    let name = si.name_any();
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
            let after = si
                .spec
                .delete_after()
                .map(|d| d.as_secs())
                .unwrap_or_default();
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
            publish(ctx, si, event).await;
            Ok(Action::await_change())
        }
        // Changed (a heartbeat?) or already gone: the watch brings the new state.
        Err(kube::Error::Api(status)) if status.code == 409 || status.code == 404 => {
            Ok(Action::await_change())
        }
        Err(e) => Err(Error::kube(format!(
            "delete expired ServiceInstance {namespace}/{name}"
        ))(e)),
    }
}

fn transition_event(si: &ServiceInstance, phase: Phase) -> Event {
    let ttl = si.spec.ttl_seconds;
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
async fn publish(ctx: &Context, si: &ServiceInstance, event: Event) {
    if let Err(e) = ctx.recorder.publish(&event, &si.object_ref(&())).await {
        tracing::warn!(name = %si.name_any(), reason = %event.reason, error = %e, "cannot publish Event");
    }
}

fn error_policy(si: Arc<ServiceInstance>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed(error);
    tracing::warn!(name = %si.name_any(), namespace = si.namespace().unwrap_or_default(), error = %crate::error::report(error), "reconcile failed");
    Action::requeue(Duration::from_secs(1))
}
