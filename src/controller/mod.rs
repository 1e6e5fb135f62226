//! The ServiceInstance controller: thin glue between the watch, the pure status logic in
//! [`crate::status`], and Server-Side Apply writes.

mod decode;
mod events;
mod expire;
mod reconcile;
mod settings;
mod status_writer;
mod term;
mod views;

pub use settings::Settings;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    Api, Client,
    api::ListParams,
    runtime::{
        WatchStreamExt,
        controller::{self, Controller},
        events::{Recorder, Reporter},
        reflector::{self},
        watcher::{self, watcher},
    },
};
use tokio_util::sync::CancellationToken;

use crate::cli::connect;
use crate::{
    Error, Result,
    api::ServiceInstance,
    cache::Instance,
    leader::{self, TermEnd},
    metrics::Metrics,
    names::REPORTER,
    prober, projector,
    protection::{self},
    registry::Registry,
    server::{self, Health},
};
use decode::{Decoder, report_undecodable};
use events::announce;
use reconcile::{Context, error_policy, reconcile};
use term::Term;
use views::Views;

/// The longest a graceful shutdown waits for in-flight work.
pub(super) const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Fails with a clear error when the apiserver cannot be reached or the CRD is missing, so the
/// controller exits with a message instead of retrying a watch that can never succeed.
pub async fn preflight(client: &Client, url: &str, namespace: Option<&str>) -> Result<()> {
    let started = tokio::time::Instant::now();
    client
        .apiserver_version()
        .await
        .map_err(|source| Error::Unreachable {
            url: url.to_string(),
            source,
        })?;
    let version = started.elapsed();
    // Any resourceVersion: served from the apiserver's watch cache. A consistent read (the
    // default) waits for that cache to catch up with etcd, which took 2–3 s of a restart under
    // heartbeat load in the benchmark; this only asks whether the CRD is there and readable.
    let listed = instances(client.clone(), namespace)
        .list_metadata(&ListParams::default().match_any().limit(1))
        .await;
    // Where a start spends its time.
    tracing::debug!(?version, list = ?started.elapsed() - version, "preflight");
    match listed {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Err(Error::CrdNotInstalled {
            url: url.to_string(),
        }),
        Err(e) => Err(Error::kube("list ServiceInstances")(e)),
    }
}

pub(super) fn instances(client: Client, namespace: Option<&str>) -> Api<ServiceInstance> {
    match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    }
}

/// Runs the controller and its HTTP endpoints until `shutdown` is cancelled. Every replica
/// watches, keeps the registry index and judges heartbeats on its own clock from the moment it
/// starts (a warm standby); it writes (status, deletions, projection, probes, Events) only
/// while it holds the Lease. A new leader therefore serves at once, without a relist.
pub async fn run(settings: &Settings, shutdown: CancellationToken) -> Result<()> {
    let election = settings.election()?;
    settings.defaults()?;
    // Timestamps where a start spends its time (the benchmark's restart resync reads them).
    tracing::info!("starting: connecting to the cluster");
    let (client, url) = connect(settings.kubeconfig.as_ref(), settings.context.as_ref()).await?;
    tracing::info!(cluster = %url, "connected; checking that the CRD is installed");
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
    let watching = watch(settings, &process)?;
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
        lead(settings, &process, &watching, &term).await;
        term.cancel();
        let end = hold.await.unwrap_or(TermEnd::Lost);
        metrics.set_leader(false);
        if shutdown.is_cancelled() {
            elector.release().await;
            break Ok(());
        }
        if end == TermEnd::Lost {
            tracing::warn!("lost leadership: stopped writing; standing by, still watching");
        }
    };
    shutdown.cancel();
    watching.reconciles_stopped.cancelled().await;
    match serve.await {
        Ok(served) => served?,
        Err(e) => tracing::warn!(error = %e, "HTTP server task"),
    }
    tracing::info!("controller stopped");
    result
}

/// What outlives a term.
pub(super) struct Process {
    pub(super) client: Client,
    pub(super) url: String,
    pub(super) metrics: Arc<Metrics>,
    pub(super) health: Health,
    pub(super) elector: Arc<leader::Elector>,
    pub(super) shutdown: CancellationToken,
}

/// What every replica keeps, leader or not: the watches, their caches, the registry index and
/// the reconcile loop that judges.
pub(super) struct Watching {
    views: Arc<Views>,
    instances: reflector::Store<Instance>,
    caches: projector::Caches,
    synced: Arc<projector::Synced>,
    written: Arc<projector::Written>,
    projection: projector::Trigger,
    projection_keys: projector::Keys,
    recorder: Recorder,
    /// Who reports Events: transition Events are created without the `Recorder` (events.rs).
    reporter: Reporter,
    /// Reconciles every instance: after a relist, and when a term starts.
    reconcile_all: futures::channel::mpsc::UnboundedSender<()>,
    /// Where health checks report verdict changes.
    requeue: futures::channel::mpsc::UnboundedSender<reflector::ObjectRef<Instance>>,
    /// Cancelled once the reconcile loop has stopped (on shutdown, after in-flight reconciles).
    reconciles_stopped: CancellationToken,
}

/// Starts the watches and the reconcile loop; they run until shutdown.
pub(super) fn watch(settings: &Settings, process: &Process) -> Result<Watching> {
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
    let registry = Arc::new(Registry::new(projection.clone()));
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
        registry: registry.clone(),
        term: tokio::sync::watch::Sender::new(None),
        elector: elector.clone(),
        guard: Mutex::new(protection::Guard::new(settings.protection())),
        announce: announce_tx,
    });
    let written = Arc::new(projector::Written::default());
    let (caches, synced) = projector::watch_children(
        &client,
        settings.namespace.as_deref(),
        settings.endpoints,
        &projection,
        &written,
        shutdown,
    );

    // Leases: renewals are heartbeats of the instances that name them.
    let lease_api: Api<Lease> = match settings.namespace.as_deref() {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let (lease_reader, lease_writer) = reflector::store();
    let lease_views = views.clone();
    // Node heartbeats (every node's Lease in kube-node-lease) are never instance heartbeats:
    // the apiserver filters them out, so they neither enter the cache nor wake anything.
    let lease_config = watcher::Config::default().fields("metadata.namespace!=kube-node-lease");
    let lease_events = watcher(lease_api, lease_config)
        .default_backoff()
        .modify(|lease| crate::cache::prune(&mut lease.metadata, &[]))
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
    let instance_store = reader.clone();
    let (relist_tx, relist_rx) = futures::channel::mpsc::unbounded::<()>();
    let relisted = relist_tx.clone();
    // No generation predicate: annotation heartbeats do not bump the generation. Objects are
    // decoded one by one (`decode::Incoming`), so one that cannot be decoded is skipped instead
    // of failing every list (and stalling the watch).
    let (undecodable_tx, undecodable_rx) = futures::channel::mpsc::unbounded();
    let decoder = Decoder {
        bad: Mutex::default(),
        metrics: metrics.clone(),
        report: undecodable_tx,
    };
    let incoming: Api<decode::Incoming> = match settings.namespace.as_deref() {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let events = watcher(incoming, watcher::Config::default())
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
                    views.on_instance_event(event, &instance_store);
                    if let watcher::Event::InitDone = event {
                        if !first_sync.swap(true, Ordering::Relaxed) {
                            ready.store(true, Ordering::Relaxed);
                            instances_synced.instances_synced();
                            tracing::info!("ServiceInstance cache synced; ready");
                        } else {
                            // After a relist the cache was swapped in whole: reconcile everything,
                            // so instances that appeared during the relist are judged too.
                            // (The registry index has already projected what the relist changed.)
                            let _ = relisted.unbounded_send(());
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "ServiceInstance watch"),
            }
        })
        .touched_objects();

    let mapper_views = views.clone();
    let controller = Controller::for_stream(events, reader.clone())
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
    let recorder = Recorder::new(client.clone(), reporter.clone());
    tokio::spawn(report_undecodable(
        undecodable_rx,
        recorder.clone(),
        views.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(announce(
        announce_rx,
        views.clone(),
        recorder.clone(),
        metrics.clone(),
        requeue_tx.clone(),
        shutdown.clone(),
    ));
    let ctx = Arc::new(Context {
        client,
        metrics: metrics.clone(),
        leases: lease_reader,
        views: views.clone(),
        defaults: settings.defaults()?,
    });
    let run = controller
        .graceful_shutdown_on(shutdown.clone().cancelled_owned())
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile loop");
            }
        });
    // A shutdown finishes in-flight reconciles, but never waits longer than this: one that
    // arrives before the first sync would otherwise wait for a sync that the stopped watch can
    // no longer deliver.
    let deadline = {
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        }
    };
    let reconciles_stopped = CancellationToken::new();
    {
        let stopped = reconciles_stopped.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = run => {}
                () = deadline => tracing::warn!("stopping in-flight reconciles now"),
            }
            stopped.cancel();
        });
    }
    Ok(Watching {
        views,
        instances: reader,
        caches,
        synced,
        written,
        projection,
        projection_keys,
        recorder,
        reporter,
        reconcile_all: relist_tx,
        requeue: requeue_tx,
        reconciles_stopped,
    })
}

/// One term as leader: starts the writers (status, projection, probes), has every instance
/// decided again against what is stored, and writes until `term` is cancelled (by shutdown or
/// by the loss of the Lease).
pub(super) async fn lead(
    settings: &Settings,
    process: &Process,
    watching: &Watching,
    term: &CancellationToken,
) {
    let Process {
        client,
        metrics,
        shutdown,
        ..
    } = process;
    let views = &watching.views;
    let projector = Arc::new(projector::Projector {
        client: client.clone(),
        caches: watching.caches.clone(),
        registry: views.registry.clone(),
        metrics: metrics.clone(),
        recorder: watching.recorder.clone(),
        options: projector::Options {
            window: Duration::from_millis(settings.projection_window_ms),
            concurrency: usize::from(settings.projection_concurrency),
            headless: settings.headless_services,
        },
        synced: watching.synced.clone(),
        written: watching.written.clone(),
        state: projector::State::default(),
    });
    let current = Arc::new(Term::new(
        term.clone(),
        prober::spawn(
            settings.probe_concurrency,
            watching.requeue.clone(),
            metrics.clone(),
            term.clone(),
        ),
        projector.busy(),
        client.clone(),
        watching.reporter.clone(),
    ));
    views.term.send_replace(Some(current.clone()));
    for si in watching.instances.state() {
        current.prober.watch(&si);
    }
    // The status writer outlives the term by a drain on a graceful shutdown, but stops the
    // moment a term is lost: another leader may be writing.
    let writer_stop = CancellationToken::new();
    let writer = tokio::spawn(current.writer.clone().run(
        client.clone(),
        metrics.clone(),
        projector.busy(),
        views.registry.clone(),
        writer_stop.clone(),
    ));
    tokio::spawn(projector.run(
        watching.projection_keys.clone(),
        watching.projection.clone(),
        term.clone(),
    ));
    // Every instance is decided again: what the index holds is this replica's own judgement,
    // and what is stored is what the last leader wrote.
    let _ = watching.reconcile_all.unbounded_send(());
    term.cancelled().await;
    if shutdown.is_cancelled() {
        // Still holding the Lease: in-flight reconciles finish, and what the judge decided is
        // written before the Lease is handed over, so the next leader starts from it.
        watching.reconciles_stopped.cancelled().await;
        if tokio::time::timeout(SHUTDOWN_GRACE, current.writer.drained())
            .await
            .is_err()
        {
            tracing::warn!("stopping with status writes still queued");
        }
    }
    // A lost term stops at once: another leader may be about to start.
    views.term.send_replace(None);
    writer_stop.cancel();
    let _ = writer.await;
}
