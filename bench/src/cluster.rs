//! The control plane the benchmark runs on (with an audit log and kube-controller-manager's
//! EndpointSlice controller as the peer), the identities each component runs under, and the
//! controller as a separate process.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::{
    authentication::v1::{TokenRequest, TokenRequestSpec},
    coordination::v1::Lease,
    core::v1::{Namespace, ServiceAccount},
    flowcontrol::v1::FlowSchema,
    rbac::v1::ClusterRoleBinding,
};
use kube::{
    Api, Client,
    api::PostParams,
    config::{AuthInfo, Kubeconfig},
};
use roster::control_plane::{ControlPlane, Options};
use serde_json::json;

use crate::audit;

/// Namespace of the benchmark's own identities and the controller's election Lease.
pub const SYSTEM_NS: &str = "roster-bench";

pub struct Cluster {
    pub cp: ControlPlane,
    pub admin: Client,
    pub audit_log: PathBuf,
}

impl Cluster {
    pub async fn start() -> Result<Cluster> {
        let dir = std::env::temp_dir().join(format!("roster-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let policy = dir.join("audit-policy.yaml");
        std::fs::write(&policy, audit::POLICY)?;
        let audit_log = dir.join("audit.log");
        let options = Options {
            apiserver_args: vec![
                format!("--audit-policy-file={}", policy.display()),
                format!("--audit-log-path={}", audit_log.display()),
                "--audit-log-maxsize=0".into(),
                // The load generator is one client: do not let the default in-flight limits
                // (400 mutating) become what is measured.
                "--max-requests-inflight=2000".into(),
                "--max-mutating-requests-inflight=1000".into(),
            ],
            controllers: vec!["endpointslice".into()],
            ..Options::default()
        };
        let cp = ControlPlane::start(options).await?;
        let admin = cp.client().await?;
        roster::api::install_crd(&admin).await?;
        create_namespace(&admin, SYSTEM_NS).await?;
        Ok(Cluster {
            cp,
            admin,
            audit_log,
        })
    }

    /// A ServiceAccount of its own with a token from the TokenRequest API (bound to
    /// cluster-admin: the benchmark measures cost, the chart's tests prove RBAC), and a
    /// kubeconfig for it. Returns the kubeconfig and the audit log's user name.
    pub async fn identity(&self, name: &str) -> Result<(PathBuf, String)> {
        let accounts = Api::<ServiceAccount>::namespaced(self.admin.clone(), SYSTEM_NS);
        let account: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": name}}))?;
        accounts.create(&PostParams::default(), &account).await?;
        let user = format!("system:serviceaccount:{SYSTEM_NS}:{name}");
        let binding: ClusterRoleBinding = serde_json::from_value(json!({
            "metadata": {"name": format!("roster-bench-{name}")},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": SYSTEM_NS}],
        }))?;
        Api::<ClusterRoleBinding>::all(self.admin.clone())
            .create(&PostParams::default(), &binding)
            .await?;
        let request = TokenRequest {
            spec: TokenRequestSpec {
                expiration_seconds: Some(24 * 3600),
                ..TokenRequestSpec::default()
            },
            ..TokenRequest::default()
        };
        let token = accounts
            .create_token_request(name, &PostParams::default(), &request)
            .await?
            .status
            .context("no token in the TokenRequest")?
            .token;
        let mut config = Kubeconfig::read_from(self.cp.kubeconfig())?;
        for user in &mut config.auth_infos {
            user.auth_info = Some(AuthInfo {
                token: Some(token.clone().into()),
                ..AuthInfo::default()
            });
        }
        let path = self.cp.dir().join(format!("kubeconfig-{name}"));
        std::fs::write(&path, serde_json::to_vec(&config)?)?;
        Ok((path, user))
    }

    /// What the chart installs (charts/roster/templates/flowschema.yaml): `account`'s requests
    /// on its election Lease go to the apiserver's `leader-election` priority level, so the
    /// load it is measured under does not starve its renewals.
    pub async fn prioritize_election(&self, account: &str) -> Result<()> {
        let schema: FlowSchema = serde_json::from_value(json!({
            "metadata": {"name": format!("roster-bench-{account}-election")},
            "spec": {
                "priorityLevelConfiguration": {"name": "leader-election"},
                "matchingPrecedence": 1000,
                "distinguisherMethod": {"type": "ByUser"},
                "rules": [{
                    "subjects": [{"kind": "ServiceAccount", "serviceAccount": {"name": account, "namespace": SYSTEM_NS}}],
                    "resourceRules": [{
                        "apiGroups": ["coordination.k8s.io"],
                        "resources": ["leases"],
                        "verbs": ["get", "create", "update"],
                        "namespaces": [SYSTEM_NS],
                    }],
                }],
            },
        }))?;
        Api::<FlowSchema>::all(self.admin.clone())
            .create(&PostParams::default(), &schema)
            .await?;
        Ok(())
    }

    /// Waits until the controllers' election Lease names `identity`; returns when it saw that.
    pub async fn await_holder(&self, identity: &str, timeout: Duration) -> Result<Instant> {
        let leases = Api::<Lease>::namespaced(self.admin.clone(), SYSTEM_NS);
        let deadline = Instant::now() + timeout;
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tick.tick().await;
            let holder = leases
                .get_opt("roster-controller")
                .await
                .ok()
                .flatten()
                .and_then(|l| l.spec?.holder_identity);
            if holder.as_deref() == Some(identity) {
                return Ok(Instant::now());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{identity} did not take the Lease within {timeout:?}"
            );
        }
    }

    /// When the current holder of the election Lease acquired it: changes with every new term.
    pub async fn acquired_at(&self) -> Option<String> {
        let lease = Api::<Lease>::namespaced(self.admin.clone(), SYSTEM_NS)
            .get_opt("roster-controller")
            .await
            .ok()
            .flatten()?;
        let spec = lease.spec?;
        Some(format!(
            "{} {:?}",
            spec.holder_identity?,
            spec.acquire_time.map(|t| t.0)
        ))
    }

    /// Waits until the audit log shows `user`'s `verb` on `resource` received after `since`;
    /// returns when the apiserver received it.
    pub async fn await_request(
        &self,
        user: &str,
        verb: &str,
        resource: &str,
        since: jiff::Timestamp,
        timeout: Duration,
    ) -> Result<jiff::Timestamp> {
        let deadline = Instant::now() + timeout;
        // The log is large at 10 000 instances: read it twice a second, not more.
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            let seen = self
                .audit()
                .into_iter()
                .filter(|r| r.user == user && r.verb == verb && r.resource == resource)
                .map(|r| r.received)
                .find(|t| *t > since);
            if let Some(t) = seen {
                return Ok(t);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "no {verb} of {resource} by {user} within {timeout:?}"
            );
        }
    }

    pub fn audit(&self) -> Vec<audit::Request> {
        audit::read(&self.audit_log)
    }
}

pub async fn create_namespace(client: &Client, name: &str) -> Result<()> {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))?;
    match Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// `roster controller` as its own process (the binary beside this one), logging to a file.
pub struct Controller {
    pub child: tokio::process::Child,
    pub pid: u32,
    pub log: PathBuf,
    pub started: Instant,
}

impl Controller {
    pub fn spawn(
        roster: &Path,
        kubeconfig: &Path,
        identity: &str,
        log: PathBuf,
        extra: &[String],
    ) -> Result<Controller> {
        let file = std::fs::File::create(&log)?;
        let mut cmd = tokio::process::Command::new(roster);
        cmd.args([
            "controller",
            "--kubeconfig",
            &kubeconfig.display().to_string(),
            "--http-addr",
            "127.0.0.1:0",
            "--leader-election-namespace",
            SYSTEM_NS,
            "--leader-election-identity",
            identity,
        ])
        .args(extra)
        .env("ROSTER_LOG_FORMAT", "text")
        // ROSTER_BENCH_LOG_LEVEL (say "roster=trace") for a diagnostic run's controller logs.
        .env(
            "ROSTER_LOG_LEVEL",
            std::env::var("ROSTER_BENCH_LOG_LEVEL").unwrap_or_else(|_| "info".into()),
        )
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file)
        .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe; the child dies with the benchmark.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let started = Instant::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("start {}", roster.display()))?;
        let pid = child.id().context("the controller has a pid")?;
        Ok(Controller {
            child,
            pid,
            log,
            started,
        })
    }

    /// How many lines of its log so far contain `needle`.
    pub fn count_logged(&self, needle: &str) -> usize {
        std::fs::read_to_string(&self.log).map_or(0, |l| l.matches(needle).count())
    }

    /// Waits until its log holds every one of `needles`; returns how long after its start.
    async fn await_logged(
        &self,
        needles: &[&str],
        what: &str,
        timeout: Duration,
    ) -> Result<Duration> {
        self.await_log(
            || needles.iter().all(|n| self.count_logged(n) > 0),
            what,
            timeout,
        )
        .await
    }

    /// Waits until its log holds more than `before` lines with `needle`.
    pub async fn await_logged_more(
        &self,
        needle: &str,
        before: usize,
        what: &str,
        timeout: Duration,
    ) -> Result<Duration> {
        self.await_log(|| self.count_logged(needle) > before, what, timeout)
            .await
    }

    /// Reads its log every 20 ms until `done`; returns how long after its start that was.
    async fn await_log(
        &self,
        done: impl Fn() -> bool,
        what: &str,
        timeout: Duration,
    ) -> Result<Duration> {
        let deadline = Instant::now() + timeout;
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tick.tick().await;
            if done() {
                return Ok(self.started.elapsed());
            }
            if Instant::now() > deadline {
                bail!(
                    "the controller did not {what} within {timeout:?}; its log: {}",
                    self.log.display()
                );
            }
        }
    }

    /// Waits until it leads with synced caches; returns how long after its start that was.
    pub async fn await_leading(&self, timeout: Duration) -> Result<Duration> {
        self.await_logged(&["cache synced; ready", "became leader"], "lead", timeout)
            .await
    }

    /// Waits until it stands by with synced caches (a warm standby).
    pub async fn await_standing_by(&self, timeout: Duration) -> Result<Duration> {
        self.await_logged(&["cache synced; ready", "standing by"], "stand by", timeout)
            .await
    }

    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}

/// Stops (SIGSTOP) or continues (SIGCONT) a process.
pub fn signal(pid: u32, stop: bool) {
    let signal = if stop { libc::SIGSTOP } else { libc::SIGCONT };
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill has no memory preconditions.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}
