//! The controller's flags, and the checked parameters derived from them.

use std::{path::PathBuf, time::Duration};

use crate::cli::{parse_duration, parse_share};
use crate::{
    Error, Result,
    leader::{self},
    liveness::{self},
    protection::{self},
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
    /// A changed service waits this many milliseconds for further changes before it is
    /// projected (changes made while its projection is in flight are coalesced anyway).
    #[arg(long, default_value_t = 0)]
    pub projection_window_ms: u64,
    /// Maximum number of services projected at the same time (each one's writes stay in order).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..))]
    pub projection_concurrency: u16,
    /// Project into headless Services (`clusterIP: None`) instead of ClusterIP Services.
    #[arg(long)]
    pub headless_services: bool,
    /// Also write a v1 Endpoints object per service, for readers that predate EndpointSlices
    /// (labelled so kube-controller-manager does not mirror it; at most 1000 addresses).
    #[arg(long)]
    pub endpoints: bool,
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

    pub fn protection(&self) -> protection::Policy {
        protection::Policy {
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
