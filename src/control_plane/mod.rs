//! A real etcd + kube-apiserver on loopback, for `roster dev` and the integration tests.
//!
//! Processes are started the way controller-runtime's envtest starts them (random loopback
//! ports, `--unsafe-no-fsync`, RBAC on) with an admin identity from a token file. They are tied to
//! the process that started them twice over: [`ControlPlane`] stops them and removes its
//! directory when dropped, and each child gets `PR_SET_PDEATHSIG`, so even a `kill -9` of the
//! parent takes them down; directories left by such a kill are swept at the next start.

pub mod assets;

use std::{
    io::Read,
    net::TcpListener,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use base64::Engine;
use k8s_openapi::api::core::v1::Namespace;
use kube::{Api, Client, Config, config::KubeConfigOptions, config::Kubeconfig};

use crate::{Error, Result};

/// Prefix of every control plane's temporary directory; the rest is `<pid>-<nanos>`.
const DIR_PREFIX: &str = "roster-control-plane-";
/// Cold start of kube-apiserver on 2 cores takes 10-20 s; leave room for a loaded machine.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Options for [`ControlPlane::start`].
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Also write the kubeconfig here (it is self-contained: the CA is embedded).
    pub kubeconfig_out: Option<PathBuf>,
    /// Extra `--flag=value` arguments for kube-apiserver (e.g. an audit log for the benchmark).
    pub apiserver_args: Vec<String>,
    /// kube-controller-manager controllers to run beside the apiserver (e.g. `garbagecollector`,
    /// so owner references work); none: no kube-controller-manager at all.
    pub controllers: Vec<String>,
}

/// A running etcd + kube-apiserver. Dropping it stops both and removes its directory.
pub struct ControlPlane {
    dir: PathBuf,
    kubeconfig: PathBuf,
    server: String,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    /// How the apiserver was started, to start it again the same way.
    apiserver_command: (PathBuf, Vec<String>),
    controller_manager: Option<Child>,
}

impl ControlPlane {
    /// Obtains the binaries, starts etcd and kube-apiserver, and waits until the apiserver is
    /// ready and has created the `default` namespace.
    ///
    /// Call it from a thread that outlives the control plane (the main thread of a program):
    /// `PR_SET_PDEATHSIG` fires when the *thread* that spawned a child exits.
    pub async fn start(options: Options) -> Result<ControlPlane> {
        let mut names = vec!["etcd", "kube-apiserver"];
        if !options.controllers.is_empty() {
            names.push("kube-controller-manager");
        }
        let bins = assets::ensure(&names).await?;
        sweep_stale_dirs();
        let dir = std::env::temp_dir().join(format!(
            "{DIR_PREFIX}{}-{}",
            std::process::id(),
            jiff::Timestamp::now().as_nanosecond()
        ));
        std::fs::create_dir_all(dir.join("certs"))
            .map_err(io_err("create the control plane directory"))?;
        let mut cp = ControlPlane {
            kubeconfig: dir.join("kubeconfig"),
            server: String::new(),
            dir,
            etcd: None,
            apiserver: None,
            apiserver_command: (bins["kube-apiserver"].clone(), Vec::new()),
            controller_manager: None,
        };
        // On any error below, dropping `cp` stops what was started and removes the directory.
        let etcd_client = free_port()?;
        let etcd_peer = free_port()?;
        let etcd_url = format!("http://127.0.0.1:{etcd_client}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer}");
        cp.etcd = Some(cp.spawn(
            "etcd",
            &bins["etcd"],
            &[
                "--name=roster".into(),
                format!("--data-dir={}", cp.dir.join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=roster={peer_url}"),
                "--unsafe-no-fsync=true".into(),
                "--log-level=warn".into(),
            ],
        )?);

        let token = random_hex(16)?;
        let tokens = cp.dir.join("tokens.csv");
        std::fs::write(&tokens, format!("{token},admin,admin,\"system:masters\"\n"))
            .map_err(io_err("write the token file"))?;
        // The service-account signing key: ECDSA P-256 (ES256), which the apiserver accepts.
        let sa_key = cp.dir.join("service-account.key");
        let key = rcgen::KeyPair::generate()
            .map_err(|e| Error::control_plane("generate the service-account key")(e.into()))?;
        std::fs::write(&sa_key, key.serialize_pem())
            .map_err(io_err("write the service-account key"))?;
        let sa_pub = cp.dir.join("service-account.pub");
        std::fs::write(&sa_pub, key.public_key_pem())
            .map_err(io_err("write the service-account key"))?;

        let port = free_port()?;
        cp.server = format!("https://127.0.0.1:{port}");
        let mut args = vec![
            format!("--etcd-servers={etcd_url}"),
            format!("--cert-dir={}", cp.dir.join("certs").display()),
            format!("--secure-port={port}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            // A /16: the default-sized /24 runs out of ClusterIPs after ~250 Services.
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            "--allow-privileged=true".into(),
            "--disable-admission-plugins=ServiceAccount".into(),
            // As OpenShift does: setting blockOwnerDeletion needs the owner's finalizers
            // permission, so the chart's RBAC is proven against the stricter cluster.
            "--enable-admission-plugins=OwnerReferencesPermissionEnforcement".into(),
            "--authorization-mode=RBAC".into(),
            format!("--token-auth-file={}", tokens.display()),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", sa_pub.display()),
            format!("--service-account-signing-key-file={}", sa_key.display()),
        ];
        args.extend(options.apiserver_args.iter().cloned());
        cp.apiserver = Some(cp.spawn("kube-apiserver", &bins["kube-apiserver"], &args)?);
        cp.apiserver_command.1 = args;

        // The apiserver writes its self-signed serving certificate (and its CA) at startup.
        let ca = cp.dir.join("certs").join("apiserver.crt");
        cp.wait("the serving certificate", || Ok(ca.exists()))?;
        let ca_pem = std::fs::read(&ca).map_err(io_err("read the serving certificate"))?;
        let kubeconfig = kubeconfig_yaml(&cp.server, &ca_pem, &token);
        std::fs::write(&cp.kubeconfig, &kubeconfig).map_err(io_err("write the kubeconfig"))?;
        if let Some(out) = &options.kubeconfig_out {
            if let Some(parent) = out.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(io_err("create the kubeconfig's directory"))?;
            }
            std::fs::write(out, &kubeconfig).map_err(io_err("write the kubeconfig"))?;
        }
        cp.wait_ready().await?;
        if !options.controllers.is_empty() {
            let port = free_port()?;
            cp.controller_manager = Some(cp.spawn(
                "kube-controller-manager",
                &bins["kube-controller-manager"],
                &[
                    format!("--kubeconfig={}", cp.kubeconfig.display()),
                    format!("--controllers={}", options.controllers.join(",")),
                    "--leader-elect=false".into(),
                    "--bind-address=127.0.0.1".into(),
                    format!("--secure-port={port}"),
                    "--use-service-account-credentials=false".into(),
                    "--kube-api-qps=1000".into(),
                    "--kube-api-burst=2000".into(),
                ],
            )?);
        }
        Ok(cp)
    }

    /// Path of the admin kubeconfig.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The apiserver's URL.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The directory holding its data, certificates and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Process ids of kube-apiserver and etcd (the benchmark pauses them to stage outages).
    pub fn pids(&self) -> (Option<u32>, Option<u32>) {
        (
            self.apiserver.as_ref().map(Child::id),
            self.etcd.as_ref().map(Child::id),
        )
    }

    /// Stops kube-apiserver and starts it again with the same flags, data and certificates
    /// (clients keep their kubeconfig), and waits until it is ready. Watches end; a client that
    /// resumes from a resourceVersion older than the new watch cache holds gets 410 Gone and
    /// relists. Call it from a thread that outlives the control plane, as [`ControlPlane::start`].
    pub async fn restart_apiserver(&mut self) -> Result<()> {
        if let Some(child) = self.apiserver.take() {
            terminate(child);
        }
        let (bin, args) = self.apiserver_command.clone();
        // Whether a watch resumes or relists would otherwise depend on which write came last:
        // one resuming from the very last revision is served. A write while no apiserver runs
        // moves etcd past every revision a client saw, so the new watch cache starts after all
        // of them and every watch gets 410 Gone.
        let bumped = match args.iter().find_map(|a| a.strip_prefix("--etcd-servers=")) {
            // One server: the embedded control plane runs a single etcd.
            Some(etcd) => {
                let etcd = etcd.split(',').next().unwrap_or(etcd);
                match tokio::time::timeout(Duration::from_secs(10), bump_etcd_revision(etcd)).await
                {
                    Ok(result) => result,
                    Err(_) => Err(Error::control_plane("write to etcd")(
                        "no answer within 10 s".into(),
                    )),
                }
            }
            None => Ok(()),
        };
        // Started whatever the write did: the control plane is never left without one.
        self.apiserver = Some(self.spawn("kube-apiserver", &bin, &args)?);
        self.wait_ready().await?;
        bumped
    }

    /// A client with the admin identity.
    pub async fn client(&self) -> Result<Client> {
        client_for(&self.kubeconfig).await
    }

    /// Stops kube-controller-manager, kube-apiserver, then etcd, and removes the directory.
    /// Idempotent.
    pub fn stop(&mut self) {
        // In dependency order: the controller manager needs the apiserver, which needs etcd.
        let children = [
            self.controller_manager.take(),
            self.apiserver.take(),
            self.etcd.take(),
        ];
        for child in children.into_iter().flatten() {
            terminate(child);
        }
        if self.dir.exists() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn spawn(&self, name: &str, bin: &Path, args: &[String]) -> Result<Child> {
        // Appended to: a restarted process keeps the earlier run's log.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))
            .map_err(io_err("create a log file"))?;
        let log_err = log.try_clone().map_err(io_err("open a log file"))?;
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Its own process group: a Ctrl-C in the terminal reaches Roster, which then stops
            // the control plane in order, instead of killing the apiserver under the controller.
            .process_group(0);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn().map_err(|e| {
            Error::control_plane(format!("start {name} ({})", bin.display()))(e.into())
        })
    }

    /// Polls `done` until it holds, failing early with the log tail if a process died.
    fn wait(&mut self, what: &str, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if done()? {
                return Ok(());
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                return Err(self.failure(&format!(
                    "timed out after {READY_TIMEOUT:?} waiting for {what}"
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let client = self.client().await?;
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let ready = client
                .request_text(http_get("/readyz"))
                .await
                .is_ok_and(|body| body.trim() == "ok");
            if ready && namespaces.get_opt("default").await.ok().flatten().is_some() {
                return Ok(());
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                return Err(self.failure("timed out waiting for kube-apiserver to become ready"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn check_alive(&mut self) -> Result<()> {
        let mut exited = None;
        for (name, child) in [
            ("etcd", &mut self.etcd),
            ("kube-apiserver", &mut self.apiserver),
            ("kube-controller-manager", &mut self.controller_manager),
        ] {
            if let Some(c) = child
                && let Ok(Some(status)) = c.try_wait()
            {
                *child = None;
                exited = Some(format!("{name} exited ({status})"));
            }
        }
        match exited {
            Some(what) => Err(self.failure(&what)),
            None => Ok(()),
        }
    }

    fn failure(&self, what: &str) -> Error {
        let mut context = what.to_string();
        for name in ["etcd", "kube-apiserver", "kube-controller-manager"] {
            if let Some(tail) = log_tail(&self.dir.join(format!("{name}.log")), 12) {
                context.push_str(&format!("\n--- last lines of {name}'s log ---\n{tail}"));
            }
        }
        Error::ControlPlane {
            context,
            source: None,
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A client for a kubeconfig file, with its current context.
pub async fn client_for(kubeconfig: &Path) -> Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig).map_err(|e| Error::Config(Box::new(e)))?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| Error::Config(Box::new(e)))?;
    Client::try_from(config).map_err(|e| Error::Config(Box::new(e)))
}

fn http_get(path: &'static str) -> http::Request<Vec<u8>> {
    let mut req = http::Request::new(Vec::new());
    *req.uri_mut() = http::Uri::from_static(path);
    req
}

fn kubeconfig_yaml(server: &str, ca_pem: &[u8], token: &str) -> String {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\nkind: Config\n\
         clusters:\n- name: roster-local\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\n\
         users:\n- name: admin\n  user:\n    token: {token}\n\
         contexts:\n- name: roster-local\n  context:\n    cluster: roster-local\n    user: admin\n    namespace: default\n\
         current-context: roster-local\n"
    )
}

/// SIGTERM, a grace period, then SIGKILL; always reaped.
fn terminate(mut child: Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: plain syscall on a pid we own and have not reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Removes directories of control planes whose process no longer exists (killed with -9).
fn sweep_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        // SAFETY: signal 0 only checks that the pid exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
        if !alive {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn free_port() -> Result<u16> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(io_err("find a free loopback port"))
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(io_err("read /dev/urandom"))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn log_tail(path: &Path, lines: usize) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let all: Vec<&str> = text.lines().collect();
    (!all.is_empty()).then(|| all[all.len().saturating_sub(lines)..].join("\n"))
}

/// Writes a key outside the apiserver's prefix through etcd's JSON gateway (`/v3/kv/put`),
/// which moves etcd's revision on.
async fn bump_etcd_revision(etcd: &str) -> Result<()> {
    use http_body_util::{BodyExt, Full};
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let body =
        serde_json::json!({"key": b64("/roster-control-plane/revision"), "value": b64("bump")});
    let request = http::Request::post(format!("{etcd}/v3/kv/put"))
        .header("content-type", "application/json")
        .body(Full::new(hyper::body::Bytes::from(body.to_string())))
        .map_err(|e| Error::control_plane("build an etcd request")(e.into()))?;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<hyper::body::Bytes>>();
    let response = client
        .request(request)
        .await
        .map_err(|e| Error::control_plane("write to etcd")(e.into()))?;
    let status = response.status();
    let text = response
        .into_body()
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default();
    if !status.is_success() {
        return Err(Error::control_plane("write to etcd")(
            format!("{status}: {text}").into(),
        ));
    }
    Ok(())
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::control_plane(format!("cannot {what}"))(e.into())
}
