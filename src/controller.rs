//! The ServiceInstance controller: thin glue between the watch, the pure status logic in
//! [`crate::status`], and Server-Side Apply writes.

use std::{
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use futures::StreamExt;
use kube::{
    Api, Client, Config, Resource, ResourceExt,
    api::{ListParams, Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt,
        controller::{self, Action, Controller},
        reflector,
        watcher::{self, watcher},
    },
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::{
    Error, Result,
    api::ServiceInstance,
    metrics::Metrics,
    names::FIELD_MANAGER,
    server::{self, Health},
    status,
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
}

/// State shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub metrics: Arc<Metrics>,
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

    let api = instances(client.clone(), settings.namespace.as_deref());
    // Readiness is taken from the watch stream itself (the first InitDone), not from
    // `Store::wait_until_ready`: a second waiter beside the controller's own is never woken.
    let (reader, writer) = reflector::store();
    let ready = health.ready.clone();
    // No generation predicate: annotation heartbeats do not bump the generation.
    let events = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .inspect(move |event| {
            if let Ok(watcher::Event::InitDone) = event
                && !ready.swap(true, Ordering::Relaxed)
            {
                tracing::info!("ServiceInstance cache synced; ready");
            }
        })
        .touched_objects();
    let controller = Controller::for_stream(events, reader)
        .with_config(controller::Config::default().concurrency(settings.concurrency));

    tracing::info!(cluster = %url, namespace = settings.namespace.as_deref().unwrap_or("<all>"), "controller started");
    let ctx = Arc::new(Context { client, metrics });
    controller
        .graceful_shutdown_on(shutdown.clone().cancelled_owned())
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::warn!(error = %crate::error::report(&e), "reconcile loop");
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
    let name = si.name_any();
    let Some(namespace) = si.namespace() else {
        // A namespaced kind always has a namespace; nothing sensible to do without one.
        return Ok(Action::await_change());
    };
    let desired = status::desired(&si, jiff::Timestamp::now());
    if si.status.as_ref() == Some(&desired) {
        return Ok(Action::await_change());
    }
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
    tracing::debug!(%namespace, %name, "status written");
    Ok(Action::await_change())
}

fn error_policy(si: Arc<ServiceInstance>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed(error);
    tracing::warn!(name = %si.name_any(), namespace = si.namespace().unwrap_or_default(), error = %crate::error::report(error), "reconcile failed");
    Action::requeue(Duration::from_secs(5))
}
