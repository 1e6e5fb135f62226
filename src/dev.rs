//! `roster dev`: the whole product on one machine. Starts the embedded control plane (unless a
//! kubeconfig is given), installs the CRD, runs the controller, registers an example instance,
//! and tells the user how to look at it with kubectl.

use std::path::PathBuf;

use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams},
};
use tokio_util::sync::CancellationToken;

use crate::{
    Error, Result,
    api::{ServiceInstance, install_crd},
    control_plane::{ControlPlane, Options},
    controller::{self, Settings},
    liveness,
    names::HEARTBEAT_ANNOTATION,
};

const EXAMPLE: &str = include_str!("../examples/instance.yaml");

/// Options of `roster dev`.
#[derive(Clone, Debug, clap::Args)]
pub struct DevArgs {
    /// Use this cluster instead of starting the embedded control plane.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Where the embedded control plane's kubeconfig is written.
    #[arg(long)]
    pub kubeconfig_out: Option<PathBuf>,
    /// Address for the controller's /healthz, /readyz and /metrics.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http_addr: String,
}

/// Default place for the embedded control plane's kubeconfig: stable across runs, so the
/// `export KUBECONFIG=...` line a user copied keeps working.
pub fn default_kubeconfig_out() -> PathBuf {
    let cache = std::env::var_os("ROSTER_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("roster")))
        .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/roster")))
        .unwrap_or_else(|| std::env::temp_dir().join("roster"));
    cache.join("dev").join("kubeconfig")
}

pub async fn run(args: DevArgs, shutdown: CancellationToken) -> Result<()> {
    let (_control_plane, kubeconfig) = match args.kubeconfig {
        Some(path) => (None, path),
        None => {
            let out = args.kubeconfig_out.unwrap_or_else(default_kubeconfig_out);
            eprintln!("Starting the embedded control plane (etcd + kube-apiserver on loopback)...");
            let start = ControlPlane::start(Options {
                kubeconfig_out: Some(out.clone()),
                ..Options::default()
            });
            // Ctrl-C while starting: dropping the half-started control plane stops it.
            let cp = tokio::select! {
                cp = start => cp?,
                () = shutdown.cancelled() => return Ok(()),
            };
            eprintln!("kube-apiserver is ready at {}", cp.server());
            (Some(cp), out)
        }
    };
    let (client, _) = crate::cli::connect(Some(&kubeconfig), None).await?;
    install_crd(&client).await?;

    // The controller's own defaults, as `roster controller` would parse them.
    #[derive(clap::Parser)]
    struct Defaults {
        #[command(flatten)]
        settings: Settings,
    }
    let mut settings = <Defaults as clap::Parser>::parse_from(["roster"]).settings;
    settings.kubeconfig = Some(kubeconfig.clone());
    settings.http_addr = args.http_addr;
    let controller_shutdown = shutdown.clone();
    let mut controller =
        tokio::spawn(async move { controller::run(&settings, controller_shutdown).await });

    let example: ServiceInstance =
        serde_saphyr::from_str(EXAMPLE).map_err(|e| Error::ControlPlane {
            context: "examples/instance.yaml is not a ServiceInstance".into(),
            source: Some(Box::new(e)),
        })?;
    let namespace = example.namespace().unwrap_or_else(|| "default".into());
    Api::<ServiceInstance>::namespaced(client.clone(), &namespace)
        .patch(
            &example.name_any(),
            &PatchParams::apply("roster-dev").force(),
            &Patch::Apply(&example),
        )
        .await
        .map_err(Error::kube("apply the example ServiceInstance"))?;

    // The example heartbeats from here, every TTL/3, so the tour shows a Ready instance.
    let beats = Api::<ServiceInstance>::namespaced(client, &namespace);
    let (name, every) = (
        example.name_any(),
        liveness::Timing::of(&example.spec, &liveness::Defaults::default()).ttl / 3,
    );
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            let value = jiff::Timestamp::now().to_string();
            let patch =
                serde_json::json!({"metadata": {"annotations": {HEARTBEAT_ANNOTATION: value}}});
            if let Err(e) = beats
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                tracing::warn!(error = %e, "heartbeat of the example instance");
            }
        }
    });

    let kc = kubeconfig.display();
    println!(
        "\nRoster is running. In another terminal:\n\n  \
         export KUBECONFIG={kc}\n  \
         kubectl get serviceinstances\n  \
         kubectl describe si {name}\n  \
         kubectl get si {name} -o yaml\n\n\
         {name} heartbeats from this process every {every} s. Register your own with\n  \
         kubectl apply -f examples/instance.yaml   (edit name and address)\n\
         and heartbeat it with\n  \
         kubectl annotate si NAME roster.dev/heartbeat=$(date -u +%FT%TZ) --overwrite\n\
         Press Ctrl-C to stop{stops}.",
        name = example.name_any(),
        every = every.as_secs(),
        stops = if _control_plane.is_some() {
            " (the control plane and its data go with it)"
        } else {
            ""
        },
    );

    tokio::select! {
        result = &mut controller => return flatten(result),
        () = shutdown.cancelled() => {}
    }
    flatten(controller.await)
}

fn flatten(joined: Result<Result<()>, tokio::task::JoinError>) -> Result<()> {
    joined.map_err(|e| Error::ControlPlane {
        context: "the controller task failed".into(),
        source: Some(Box::new(e)),
    })?
}
