use std::{io::Read, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use roster::{
    agent,
    control_plane::{ControlPlane, Options},
    controller, dev,
    error::report,
    telemetry::{self, LogFormat},
};
use tokio_util::sync::CancellationToken;

/// jemalloc rather than the C library's allocator (glibc's, or musl's in the image): at 10 000
/// instances it holds the controller's RSS closest to its heap (docs/benchmark.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main` (`_RJEM_MALLOC_CONF` in the environment adds to
/// them): one arena instead of four per core (the controller's few threads share it, and its
/// memory is not split four ways), and freed pages handed back to the system after a second
/// instead of ten. No background thread: tikv-jemalloc-sys does not support one on musl, which
/// the image is built for.
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: &[u8; 47] = b"narenas:1,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

/// Roster: a service registry for Kubernetes.
#[derive(Parser)]
#[command(version = roster::version(), about)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "ROSTER_LOG_FORMAT")]
    log_format: LogFormat,
    /// Log level or filter (RUST_LOG overrides it).
    #[arg(long, global = true, default_value = "info", env = "ROSTER_LOG_LEVEL")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the ServiceInstance CRD as YAML.
    Crd,
    /// Run the controller.
    Controller(Box<controller::Settings>),
    /// Register an instance and keep it alive (a sidecar, or on a VM): Lease heartbeats,
    /// draining while the app is unhealthy, drain and deregister on SIGTERM.
    Agent(Box<agent::AgentArgs>),
    /// Run everything locally: control plane, CRD, controller and an example instance.
    Dev(dev::DevArgs),
    /// Manage the embedded local control plane (etcd + kube-apiserver).
    #[command(subcommand)]
    ControlPlane(ControlPlaneCommand),
}

#[derive(Subcommand)]
enum ControlPlaneCommand {
    /// Start it, print `KUBECONFIG=<path>` on stdout, and keep it running until SIGINT/SIGTERM
    /// (or, with --exit-on-stdin-eof, until stdin closes: how the test harness ties it to itself).
    Up {
        /// Also write the kubeconfig here.
        #[arg(long)]
        kubeconfig_out: Option<PathBuf>,
        #[arg(long)]
        exit_on_stdin_eof: bool,
        /// Also run kube-controller-manager with these controllers (e.g. garbagecollector).
        #[arg(long, value_delimiter = ',')]
        controllers: Vec<String>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format, &cli.log_level);
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    let result = match cli.command {
        Command::Crd => match roster::api::crd_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                Ok(())
            }
            Err(e) => {
                eprintln!("error: cannot render the CRD: {}", report(&e));
                return ExitCode::FAILURE;
            }
        },
        Command::Controller(settings) => controller::run(&settings, shutdown).await,
        Command::Dev(args) => dev::run(args, shutdown).await,
        Command::Agent(args) => agent::run(&args, shutdown).await,
        Command::ControlPlane(ControlPlaneCommand::Up {
            kubeconfig_out,
            exit_on_stdin_eof,
            controllers,
        }) => {
            let options = Options {
                kubeconfig_out,
                controllers,
                ..Options::default()
            };
            control_plane_up(options, exit_on_stdin_eof, shutdown).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", report(&e));
            ExitCode::FAILURE
        }
    }
}

async fn control_plane_up(
    options: Options,
    exit_on_stdin_eof: bool,
    shutdown: CancellationToken,
) -> roster::Result<()> {
    let mut cp = ControlPlane::start(options).await?;
    println!("KUBECONFIG={}", cp.kubeconfig().display());
    if exit_on_stdin_eof {
        let eof = shutdown.clone();
        // A plain thread: reading stdin blocks, and EOF means the parent has gone.
        std::thread::spawn(move || {
            let mut sink = [0u8; 256];
            while matches!(std::io::stdin().read(&mut sink), Ok(n) if n > 0) {}
            eof.cancel();
        });
    }
    shutdown.cancelled().await;
    cp.stop();
    Ok(())
}

async fn cancel_on_signal(token: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received; shutting down"),
        _ = int.recv() => tracing::info!("SIGINT received; shutting down"),
    }
    token.cancel();
    // A second signal means "now": exit without waiting for a graceful shutdown. Children
    // (the embedded control plane) die with us through PR_SET_PDEATHSIG.
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    eprintln!("second signal: exiting immediately");
    std::process::exit(130);
}
