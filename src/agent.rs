//! `roster agent`: registers the instance it runs beside and keeps it alive, as a sidecar (the
//! Pod's name, uid, namespace and IP from the downward API) or on a VM with a kubeconfig.
//! Everything it does is [`client::register::Registrar::run`]; this module turns flags into a
//! registration and the app's local health into a signal.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    Error, Result,
    api::{HealthCheck, HttpCheck, InstancePort, PortRef, TcpCheck},
    cli::parse_duration,
    client::register::{PodRef, Registrar, Registration, Shutdown},
    probe::{self, Streak, Verdict},
};

#[derive(Clone, Debug, clap::Args)]
pub struct AgentArgs {
    /// Path to a kubeconfig; without it, KUBECONFIG, ~/.kube/config, then the in-cluster config.
    #[arg(long, env = "ROSTER_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Namespace of the instance.
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: String,
    /// The instance's name (and its Lease's); default: the Pod's name.
    #[arg(long, env = "ROSTER_INSTANCE")]
    pub name: Option<String>,
    /// The service it is an instance of.
    #[arg(long, env = "ROSTER_SERVICE")]
    pub service: String,
    /// Its address (the Pod's IP).
    #[arg(long, env = "POD_IP")]
    pub address: String,
    /// A port, `name=number` or `name=number/PROTOCOL` (repeat it, or separate with commas).
    #[arg(long = "port", env = "ROSTER_PORTS", value_delimiter = ',', value_parser = parse_port, required = true)]
    pub ports: Vec<InstancePort>,
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i32).range(0..=10000))]
    pub weight: i32,
    /// Topology zone.
    #[arg(long, env = "ROSTER_ZONE")]
    pub zone: Option<String>,
    /// Metadata, `key=value` (repeat it).
    #[arg(long = "metadata", value_parser = parse_pair)]
    pub metadata: Vec<(String, String)>,
    /// The instance's TTL; the Lease is renewed every third of it.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub ttl: Duration,
    /// Silence after which the controller deletes the instance (default: the controller's).
    #[arg(long, value_parser = parse_duration)]
    pub delete_after: Option<Duration>,
    /// The Pod that owns the instance (deleting the Pod deletes it); with --pod-uid.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    #[arg(long, env = "POD_UID")]
    pub pod_uid: Option<String>,

    /// Probe the app locally on this port (name or number); unhealthy means draining.
    #[arg(long)]
    pub probe_port: Option<String>,
    /// Probe over HTTP GET at this path (default: a TCP connect).
    #[arg(long, requires = "probe_port")]
    pub probe_path: Option<String>,
    /// Address the probe connects to.
    #[arg(long, default_value = "127.0.0.1")]
    pub probe_address: String,
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub probe_period: Duration,
    /// Consecutive failures before the app counts as unhealthy.
    #[arg(long, default_value_t = 3)]
    pub probe_failure_threshold: u32,

    /// On SIGTERM: how long the instance stays draining before it is deleted.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub drain: Duration,
    /// On SIGTERM: drain and deregistration finish within this (the Pod's
    /// terminationGracePeriodSeconds).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub grace_period: Duration,
}

impl AgentArgs {
    /// The registration these flags describe; a clear error for flags that cannot work.
    pub fn registration(&self) -> Result<Registration> {
        let name = self
            .name
            .clone()
            .or_else(|| self.pod_name.clone())
            .ok_or_else(|| {
                Error::Invalid("no instance name: pass --name or set POD_NAME".into())
            })?;
        let owner = match (&self.pod_name, &self.pod_uid) {
            (Some(name), Some(uid)) => Some(PodRef {
                name: name.clone(),
                uid: uid.clone(),
            }),
            (None, None) => None,
            _ => {
                return Err(Error::Invalid(
                    "the owner Pod needs both --pod-name (POD_NAME) and --pod-uid (POD_UID)".into(),
                ));
            }
        };
        if self.drain >= self.grace_period {
            return Err(Error::Invalid(format!(
                "--drain ({:?}) must be shorter than --grace-period ({:?}), to leave time to deregister",
                self.drain, self.grace_period
            )));
        }
        let identity = format!(
            "{}/{}",
            self.pod_name.clone().unwrap_or_else(|| name.clone()),
            std::process::id()
        );
        Ok(Registration {
            namespace: self.namespace.clone(),
            name,
            service: self.service.clone(),
            address: self.address.clone(),
            ports: self.ports.clone(),
            weight: self.weight,
            // An empty value (an unset variable of the Pod spec) means no zone.
            zone: self.zone.clone().filter(|z| !z.is_empty()),
            metadata: self.metadata.iter().cloned().collect::<BTreeMap<_, _>>(),
            ttl: self.ttl,
            delete_after: self.delete_after,
            owner,
            identity,
        })
    }

    /// The local health check, if asked for.
    fn probe(&self) -> Option<probe::Target> {
        let port = self.probe_port.as_ref()?;
        let port = match port.parse::<i32>() {
            Ok(n) => PortRef::Number(n),
            Err(_) => PortRef::Name(port.clone()),
        };
        let check = HealthCheck {
            http: self.probe_path.as_ref().map(|path| HttpCheck {
                path: path.clone(),
                port: port.clone(),
                scheme: None,
                headers: Vec::new(),
                min_status: None,
                max_status: None,
            }),
            tcp: self.probe_path.is_none().then_some(TcpCheck { port }),
            grpc: None,
            period_seconds: i32::try_from(self.probe_period.as_secs().max(1)).unwrap_or(i32::MAX),
            timeout_seconds: 1,
            success_threshold: 1,
            failure_threshold: i32::try_from(self.probe_failure_threshold.max(1))
                .unwrap_or(i32::MAX),
        };
        Some(probe::Target {
            address: self.probe_address.clone(),
            ports: self.ports.clone(),
            check,
        })
    }
}

/// Runs the agent until `shutdown`, then drains and deregisters.
pub async fn run(args: &AgentArgs, shutdown: CancellationToken) -> Result<()> {
    let registration = args.registration()?;
    let (client, _) = crate::cli::connect(args.kubeconfig.as_ref(), None).await?;
    let registrar = Registrar::new(client, registration)?;
    // With a probe, the instance registers draining and leaves it at the first passing check,
    // as a readiness probe gates a Pod: no traffic before the app answers.
    let healthy = args.probe().map(|target| {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(probe_loop(
            target,
            args.probe_failure_threshold,
            tx,
            shutdown.clone(),
        ));
        rx
    });
    registrar
        .run(
            healthy,
            shutdown,
            Shutdown {
                drain: args.drain,
                grace: args.grace_period,
            },
        )
        .await
}

/// Probes the app every period and publishes whether it is healthy: healthy from the first
/// pass, unhealthy again after `failure_threshold` consecutive failures.
async fn probe_loop(
    target: probe::Target,
    failure_threshold: u32,
    healthy: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let clients = probe::Clients::default();
    let mut streak = Streak::default();
    let mut tick = tokio::time::interval(target.period());
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let outcome = probe::check(&target, &clients).await;
        let verdict = streak.record(outcome, 1, failure_threshold).clone();
        let now = !matches!(verdict, Verdict::Failing { .. });
        if let Verdict::Failing { reason, message } = &verdict
            && *healthy.borrow()
        {
            // Only a healthy app turning unhealthy is news; one still starting is not.
            tracing::warn!(%reason, %message, "the app is unhealthy; draining");
        }
        healthy.send_if_modified(|h| std::mem::replace(h, now) != now);
    }
}

fn parse_port(s: &str) -> std::result::Result<InstancePort, String> {
    let (name, rest) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected name=number or name=number/PROTOCOL"))?;
    let (number, protocol) = match rest.split_once('/') {
        Some((n, p)) => (n, Some(p.to_ascii_uppercase())),
        None => (rest, None),
    };
    let port: i32 = number
        .parse()
        .ok()
        .filter(|p| (1..=65535).contains(p))
        .ok_or_else(|| format!("{s:?}: the port must be a number from 1 to 65535"))?;
    if let Some(p) = &protocol
        && !["TCP", "UDP", "SCTP"].contains(&p.as_str())
    {
        return Err(format!("{s:?}: the protocol must be TCP, UDP or SCTP"));
    }
    Ok(InstancePort {
        name: name.to_string(),
        port,
        protocol,
        app_protocol: None,
    })
}

fn parse_pair(s: &str) -> std::result::Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?}: expected key=value"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        agent: AgentArgs,
    }

    fn parse(args: &[&str]) -> std::result::Result<AgentArgs, String> {
        let base = [
            "agent",
            "--namespace",
            "shop",
            "--service",
            "pay",
            "--address",
            "10.0.0.1",
        ];
        Cli::try_parse_from(base.iter().chain(args))
            .map(|c| c.agent)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn ports_parse_or_say_what_is_wrong() {
        let a = parse(&["--port", "http=8080,grpc=9090/tcp", "--name", "p"]).expect("parses");
        assert_eq!(a.ports.len(), 2);
        assert_eq!(a.ports[1].protocol.as_deref(), Some("TCP"));
        for (bad, says) in [
            ("http", "expected name=number"),
            ("http=0", "from 1 to 65535"),
            ("http=x", "from 1 to 65535"),
            ("dns=53/icmp", "TCP, UDP or SCTP"),
        ] {
            let err = parse(&["--port", bad, "--name", "p"])
                .err()
                .unwrap_or_default();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn registration_refuses_what_cannot_work() {
        let reg = |extra: &[&str]| {
            let mut args = vec!["--port", "http=8080"];
            args.extend(extra);
            parse(&args)
                .map_err(|e| e.to_string())
                .and_then(|a| a.registration().map_err(|e| e.to_string()))
        };
        assert!(reg(&[]).is_err_and(|e| e.contains("--name or set POD_NAME")));
        assert!(reg(&["--pod-name", "p"]).is_err_and(|e| e.contains("--pod-uid")));
        assert!(reg(&["--name", "p", "--drain", "30s"]).is_err_and(|e| e.contains("shorter than")));
        let ok = reg(&["--pod-name", "p-1", "--pod-uid", "u"]).expect("a registration");
        assert_eq!(ok.name, "p-1");
        assert_eq!(ok.owner.map(|o| o.uid).as_deref(), Some("u"));
        assert_eq!(ok.ttl, Duration::from_secs(30));
    }
}
