//! The integration-test harness: one real control plane per test run, a namespace per test,
//! the controller as a real subprocess, and "await this condition with a timeout" helpers.
//!
//! The control plane is `roster control-plane up --exit-on-stdin-eof`, a child whose stdin is a
//! pipe this process never closes: when the test process ends, however it ends (pass, panic,
//! Ctrl-C, kill -9), the pipe closes and the control plane stops and removes its directory.
//! Set `ROSTER_TEST_KUBECONFIG` to run against a cluster you already have instead.

use std::{
    fmt::Debug,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client, Resource,
    api::{DeleteParams, PostParams},
    runtime::wait::{Condition, await_condition},
};
use roster::api::ServiceInstance;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// The `roster` binary built for this test run.
pub const ROSTER: &str = env!("CARGO_BIN_EXE_roster");

/// The phase in an instance's status, if it has one.
pub fn phase(si: Option<&ServiceInstance>) -> Option<roster::api::Phase> {
    si.and_then(|si| si.status.as_ref()).and_then(|s| s.phase)
}

/// (status, reason) of an instance's condition; empty when it has none of that type.
pub fn condition(si: &ServiceInstance, type_: &str) -> (String, String) {
    si.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
        .map(|c| (c.status.clone(), c.reason.clone()))
        .unwrap_or_default()
}

/// Waits until the instance reaches `want`, and returns it.
pub async fn await_phase(
    api: &Api<ServiceInstance>,
    name: &str,
    want: roster::api::Phase,
    timeout: Duration,
) -> ServiceInstance {
    wait_for(
        api,
        name,
        &format!("phase {want:?}"),
        timeout,
        move |si: Option<&ServiceInstance>| phase(si) == Some(want),
    )
    .await
}

/// A control plane started by the harness, stopped when its stdin closes.
pub struct LocalControlPlane {
    pub kubeconfig: PathBuf,
    pub child: Child,
    pub stdin: Option<ChildStdin>,
}

impl LocalControlPlane {
    /// Starts `roster control-plane up` (etcd + kube-apiserver) and waits until it prints its
    /// kubeconfig.
    pub fn start() -> LocalControlPlane {
        Self::try_start(&[]).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Also runs kube-controller-manager with these controllers.
    fn try_start(controllers: &[&str]) -> Result<LocalControlPlane, String> {
        let mut args = vec!["control-plane", "up", "--exit-on-stdin-eof"];
        let list = controllers.join(",");
        if !controllers.is_empty() {
            args.extend(["--controllers", &list]);
        }
        let mut child = Command::new(ROSTER)
            .args(&args)
            .env("ROSTER_LOG_LEVEL", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start `roster control-plane up`");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the control plane's first line");
        let Some(kubeconfig) = line.trim().strip_prefix("KUBECONFIG=") else {
            let _ = child.wait();
            return Err(format!(
                "the local control plane failed to start (printed {line:?}); its messages are above"
            ));
        };
        let stdin = child.stdin.take();
        Ok(LocalControlPlane {
            kubeconfig: kubeconfig.into(),
            child,
            stdin,
        })
    }

    /// The directory the control plane keeps its data, certificates and logs in.
    pub fn dir(&self) -> PathBuf {
        self.kubeconfig
            .parent()
            .expect("kubeconfig has a parent")
            .to_path_buf()
    }
}

struct Shared {
    kubeconfig: PathBuf,
    // Held for the life of the test process: dropping it would stop the control plane.
    _control_plane: Option<Mutex<LocalControlPlane>>,
}

// A failed start is kept too, so every test reports it instead of each starting its own.
static SHARED: OnceLock<Result<Shared, String>> = OnceLock::new();
static CRD: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();

fn shared() -> &'static Shared {
    let shared = SHARED.get_or_init(|| match std::env::var_os("ROSTER_TEST_KUBECONFIG") {
        Some(path) => Ok(Shared {
            kubeconfig: path.into(),
            _control_plane: None,
        }),
        // The garbage collector, so owner references work; the namespace controller, so deleted
        // test namespaces really go; the EndpointSlice and mirroring controllers, to show that
        // they leave Roster's slices alone.
        None => LocalControlPlane::try_start(&[
            "garbagecollector",
            "namespace",
            "endpointslice",
            "endpointslicemirroring",
        ])
        .map(|cp| Shared {
            kubeconfig: cp.kubeconfig.clone(),
            _control_plane: Some(Mutex::new(cp)),
        }),
    });
    shared.as_ref().unwrap_or_else(|e| panic!("{e}"))
}

/// The shared cluster's admin kubeconfig, with the CRD installed.
pub async fn kubeconfig() -> PathBuf {
    // Started on a blocking thread: reading the child's first line blocks.
    let path = tokio::task::spawn_blocking(|| shared().kubeconfig.clone())
        .await
        .expect("start the control plane");
    CRD.get_or_init(|| async {
        let client = roster::control_plane::client_for(&path)
            .await
            .expect("admin client");
        roster::api::install_crd(&client)
            .await
            .expect("install the CRD");
    })
    .await;
    path
}

/// A fresh admin client for the shared cluster (each test has its own runtime, so clients are
/// not shared between tests).
pub async fn client() -> Client {
    let path = kubeconfig().await;
    roster::control_plane::client_for(&path)
        .await
        .expect("admin client")
}

/// A namespace of the test's own, deleted when dropped.
pub struct TestNamespace {
    pub name: String,
    kubeconfig: PathBuf,
}

static NAMESPACES: AtomicU32 = AtomicU32::new(0);

impl TestNamespace {
    pub async fn new(client: &Client, test: &str) -> TestNamespace {
        let name = format!(
            "{}-{}-{}",
            test.replace('_', "-"),
            std::process::id(),
            NAMESPACES.fetch_add(1, Ordering::Relaxed)
        );
        let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))
            .expect("namespace literal");
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("create the test namespace");
        TestNamespace {
            name,
            kubeconfig: shared().kubeconfig.clone(),
        }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        delete_namespace_from_drop(self.kubeconfig.clone(), self.name.clone());
    }
}

/// Deletes a namespace from a `Drop` (which cannot await): a short-lived runtime on its own
/// thread does the delete.
pub fn delete_namespace_from_drop(kubeconfig: PathBuf, name: String) {
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        rt.block_on(async {
            let client = roster::control_plane::client_for(&kubeconfig).await.ok()?;
            Api::<Namespace>::all(client)
                .delete(&name, &DeleteParams::background())
                .await
                .ok()
        })
    })
    .join();
}

/// Waits until `condition` holds for the object `name`, or fails the test with the last state
/// seen. Watches, never polls with sleeps.
pub async fn wait_for<K, C>(
    api: &Api<K>,
    name: &str,
    what: &str,
    timeout: Duration,
    condition: C,
) -> K
where
    K: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    C: Condition<K>,
{
    match wait(api, name, what, timeout, condition).await {
        Some(obj) => obj,
        None => panic!("waiting for {what}: {name} does not exist"),
    }
}

/// Waits until the object `name` with this uid is gone.
pub async fn wait_deleted<K>(api: &Api<K>, name: &str, uid: &str, timeout: Duration)
where
    K: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    let gone = kube::runtime::wait::conditions::is_deleted(uid);
    if let Some(obj) = wait(api, name, "deletion", timeout, gone).await {
        panic!("waiting for the deletion of {name}: still there: {obj:?}");
    }
}

async fn wait<K, C>(
    api: &Api<K>,
    name: &str,
    what: &str,
    timeout: Duration,
    condition: C,
) -> Option<K>
where
    K: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    C: Condition<K>,
{
    match tokio::time::timeout(timeout, await_condition(api.clone(), name, condition)).await {
        Ok(Ok(obj)) => obj,
        Ok(Err(e)) => panic!("waiting for {what}: watch failed: {e}"),
        Err(_) => {
            let last = api.get_opt(name).await;
            panic!("timed out after {timeout:?} waiting for {what}; last seen: {last:#?}")
        }
    }
}

/// `roster controller` (or any `roster` command) as a subprocess, killed when dropped. Its
/// stderr is collected so tests can await and assert on what it logged.
pub struct ControllerProcess {
    child: tokio::process::Child,
    output: Arc<Mutex<String>>,
    printed: Arc<tokio::sync::Notify>,
    /// The stderr reader; done when the process closed stderr.
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl ControllerProcess {
    pub fn start(kubeconfig: &Path, namespace: &str) -> ControllerProcess {
        Self::start_with(kubeconfig, namespace, &[])
    }

    /// `roster controller` for one namespace, with `extra` flags.
    pub fn start_with(kubeconfig: &Path, namespace: &str, extra: &[&str]) -> ControllerProcess {
        let mut args = vec![
            "controller",
            "--kubeconfig",
            kubeconfig.to_str().expect("utf-8 path"),
            "--namespace",
            namespace,
            "--http-addr",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        Self::spawn(&args)
    }

    /// Kills it with SIGKILL (no chance to release anything) and reaps it.
    pub async fn kill(&mut self) {
        self.child.kill().await.expect("kill -9 roster");
    }

    /// Runs `roster <args>` with its stderr collected.
    pub fn spawn(args: &[&str]) -> ControllerProcess {
        let mut child = tokio::process::Command::new(ROSTER);
        child
            .args(args)
            .env("ROSTER_LOG_LEVEL", "info,roster=debug")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // Dies with the test thread too, even when the test process is killed with -9.
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            child.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = child.spawn().expect("start the roster binary");
        let stderr = child.stderr.take().expect("piped stderr");
        let output = Arc::new(Mutex::new(String::new()));
        let printed = Arc::new(tokio::sync::Notify::new());
        let (sink, notify) = (output.clone(), printed.clone());
        let reader = tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[roster] {line}");
                if let Ok(mut out) = sink.lock() {
                    out.push_str(&line);
                    out.push('\n');
                }
                notify.notify_waiters();
            }
            notify.notify_waiters();
        });
        ControllerProcess {
            child,
            output,
            printed,
            reader: Some(reader),
        }
    }

    /// Everything the process printed on stderr so far.
    pub fn output(&self) -> String {
        self.output.lock().map(|o| o.clone()).unwrap_or_default()
    }

    /// Waits until `find` finds something in the output, and returns it.
    pub async fn await_output<T>(
        &self,
        what: &str,
        timeout: Duration,
        find: impl Fn(&str) -> Option<T>,
    ) -> T {
        let search = async {
            loop {
                let notified = self.printed.notified();
                if let Some(found) = find(&self.output()) {
                    return found;
                }
                notified.await;
            }
        };
        match tokio::time::timeout(timeout, search).await {
            Ok(found) => found,
            Err(_) => panic!(
                "roster did not print {what} within {timeout:?}; it printed:\n{}",
                self.output()
            ),
        }
    }

    /// Waits for the process to exit and returns its exit status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let reader = self.reader.take();
        let exit = async {
            let status = self.child.wait().await;
            // Everything it printed has been collected once its stderr is closed.
            if let Some(reader) = reader {
                let _ = reader.await;
            }
            status
        };
        match tokio::time::timeout(timeout, exit).await {
            Ok(status) => status.expect("wait for roster"),
            Err(_) => panic!(
                "roster did not exit within {timeout:?}; it printed:\n{}",
                self.output()
            ),
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends a signal (e.g. `libc::SIGTERM`).
    pub fn signal(&self, signal: i32) {
        let pid = self
            .child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .expect("running child");
        // SAFETY: a plain kill(2) on our own child.
        unsafe { libc::kill(pid, signal) };
    }

    /// Waits until the controller logs the address of its HTTP endpoints, and returns it.
    pub async fn http_addr(&self, timeout: Duration) -> String {
        self.await_output("the address of its HTTP endpoints", timeout, |out| {
            out.lines()
                .find(|l| l.contains("serving /healthz"))
                .and_then(|l| l.split("addr=").nth(1))
                .and_then(|rest| rest.split_whitespace().next())
                .map(str::to_string)
        })
        .await
    }
}

/// A plain HTTP/1.0 GET on loopback: returns (status code, body).
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .expect("send request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("read response");
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// Pids of processes whose command line mentions `needle` (e.g. a control plane's directory).
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
        })
        .collect()
}

/// Waits until an Event with `reason` is recorded for the object `name` (what `kubectl describe`
/// lists), and returns the reasons of all its Events.
pub async fn await_event(
    client: &Client,
    ns: &str,
    name: &str,
    reason: &str,
    timeout: Duration,
) -> Vec<String> {
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), ns);
    let params = kube::api::ListParams::default().fields(&format!("involvedObject.name={name}"));
    let wait = async {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            let reasons: Vec<String> = events
                .list(&params)
                .await
                .map(|l| l.items.into_iter().filter_map(|e| e.reason).collect())
                .unwrap_or_default();
            if reasons.iter().any(|r| r == reason) {
                return reasons;
            }
        }
    };
    match tokio::time::timeout(timeout, wait).await {
        Ok(reasons) => reasons,
        Err(_) => panic!("no {reason} Event for {ns}/{name} within {timeout:?}"),
    }
}

/// Tests that assert timings (TTL + 1 s) share the machine with each other, but not with tests
/// that load the apiserver with hundreds of objects: on 2 cores those would turn a watch lag
/// into a failed timing. Timing tests hold `timing()`, heavy tests `heavy()`.
static LOAD: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

pub async fn timing() -> tokio::sync::RwLockReadGuard<'static, ()> {
    LOAD.read().await
}

pub async fn heavy() -> tokio::sync::RwLockWriteGuard<'static, ()> {
    LOAD.write().await
}

/// What happened to the ServiceInstances of a namespace, as a watch saw it: every phase change
/// and every deletion, with the moment it was seen. Tests assert on it that nothing changed
/// state wrongly while they broke things.
pub struct History {
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Bumped after every change is recorded, so a test can await what the watch has seen.
    changes: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

/// One change: the instance's phase, or `None` when it was deleted.
#[derive(Clone, Debug)]
pub struct Seen {
    pub at: std::time::Instant,
    pub name: String,
    pub phase: Option<roster::api::Phase>,
}

impl History {
    /// Starts watching; returns once the watch has listed what is there.
    pub async fn start(api: Api<roster::api::ServiceInstance>) -> History {
        use futures::StreamExt;
        use kube::runtime::{WatchStreamExt, watcher};
        let seen = Arc::new(Mutex::new(Vec::<Seen>::new()));
        let (sink, (listed_tx, listed_rx)) = (seen.clone(), tokio::sync::oneshot::channel());
        let changes = tokio::sync::watch::Sender::new(0u64);
        let notify = changes.clone();
        let task = tokio::spawn(async move {
            let mut listed = Some(listed_tx);
            let mut last: std::collections::HashMap<String, Option<roster::api::Phase>> =
                Default::default();
            let mut events = watcher(api, watcher::Config::default())
                .backoff(short_retry())
                .boxed();
            while let Some(event) = events.next().await {
                let (si, deleted) = match event {
                    Ok(watcher::Event::Apply(si) | watcher::Event::InitApply(si)) => (si, false),
                    Ok(watcher::Event::Delete(si)) => (si, true),
                    Ok(watcher::Event::InitDone) => {
                        if let Some(tx) = listed.take() {
                            let _ = tx.send(());
                        }
                        continue;
                    }
                    _ => continue,
                };
                let name = si.metadata.name.clone().unwrap_or_default();
                let phase = si.status.as_ref().and_then(|s| s.phase);
                let entry = if deleted { None } else { phase };
                if deleted || last.get(&name) != Some(&entry) {
                    last.insert(name.clone(), entry);
                    if let Ok(mut seen) = sink.lock() {
                        seen.push(Seen {
                            at: std::time::Instant::now(),
                            name,
                            phase: entry,
                        });
                    }
                    notify.send_modify(|n| *n += 1);
                }
            }
        });
        let _ = listed_rx.await;
        History {
            seen,
            changes,
            task,
        }
    }

    /// Waits until the watch has seen `name` deleted. A GET that returns 404 can come before
    /// the watch event does, so a test that asserts on the history after a deletion awaits
    /// this first.
    pub async fn await_deleted(&self, name: &str, timeout: Duration) {
        let mut changes = self.changes.subscribe();
        let seen = changes.wait_for(|_| self.deleted().iter().any(|n| n == name));
        match tokio::time::timeout(timeout, seen).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => panic!("the History's watch ended before {name} was seen deleted"),
            Err(_) => panic!(
                "the History did not see {name} deleted within {timeout:?}; it saw {:?}",
                self.all()
            ),
        }
    }

    pub fn all(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Names of the instances seen deleted.
    pub fn deleted(&self) -> Vec<String> {
        self.all()
            .into_iter()
            .filter(|s| s.phase.is_none())
            .map(|s| s.name)
            .collect()
    }

    /// The changes of one instance.
    pub fn of(&self, name: &str) -> Vec<Seen> {
        self.all().into_iter().filter(|s| s.name == name).collect()
    }
}

impl Drop for History {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A test watch's backoff: retries within half a second, so there is no busy loop while the
/// apiserver is down (a test may restart it), and the watch is back soon enough to see what
/// follows.
fn short_retry() -> kube::runtime::watcher::ExponentialBackoff {
    let retry = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_millis(500))
        .without_max_times();
    kube::runtime::watcher::ExponentialBackoff::from(retry)
}

/// Every renewal of one Lease (its distinct `renewTime`s, the renewer's own timestamps), as a
/// watch saw them, so tests await heartbeats instead of polling for them.
pub struct Renewals {
    seen: Arc<Mutex<Vec<jiff::Timestamp>>>,
    changes: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Renewals {
    pub fn start(api: Api<k8s_openapi::api::coordination::v1::Lease>, name: &str) -> Renewals {
        use futures::StreamExt;
        use kube::runtime::{WatchStreamExt, watcher};
        let seen = Arc::new(Mutex::new(Vec::new()));
        let changes = tokio::sync::watch::Sender::new(0u64);
        let (sink, notify) = (seen.clone(), changes.clone());
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let task = tokio::spawn(async move {
            let mut leases = watcher(api, config)
                .backoff(short_retry())
                .applied_objects()
                .boxed();
            while let Some(lease) = leases.next().await {
                let renewed = lease.ok().and_then(|l| l.spec?.renew_time).map(|t| t.0);
                if let (Some(t), Ok(mut seen)) = (renewed, sink.lock())
                    && seen.last() != Some(&t)
                {
                    seen.push(t);
                    drop(seen);
                    notify.send_modify(|n| *n += 1);
                }
            }
        });
        Renewals {
            seen,
            changes,
            task,
        }
    }

    /// Renewals stamped after `after`.
    pub fn after(&self, after: jiff::Timestamp) -> Vec<jiff::Timestamp> {
        self.seen
            .lock()
            .map(|s| s.iter().copied().filter(|t| *t > after).collect())
            .unwrap_or_default()
    }

    /// Waits until `n` renewals stamped after `after` have been seen; returns them.
    pub async fn await_after(
        &self,
        after: jiff::Timestamp,
        n: usize,
        timeout: Duration,
    ) -> Vec<jiff::Timestamp> {
        let mut changes = self.changes.subscribe();
        let enough = changes.wait_for(|_| self.after(after).len() >= n);
        match tokio::time::timeout(timeout, enough).await {
            Ok(Ok(_)) => self.after(after),
            _ => panic!(
                "{n} renewals after {after} not seen within {timeout:?}; saw {:?}",
                self.after(after)
            ),
        }
    }
}

impl Drop for Renewals {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Short election timings, so failover fits in a test: lease 4 s, renew deadline 3 s, retry 1 s.
pub const FAST_ELECTION: [&str; 6] = [
    "--leader-election-lease-duration",
    "4s",
    "--leader-election-renew-deadline",
    "3s",
    "--leader-election-retry-period",
    "1s",
];

/// Heartbeats instances every `every` until each one's token is cancelled; errors (an
/// apiserver that is away) are ignored, as a real client would retry.
pub struct Beats {
    api: Api<ServiceInstance>,
    every: Duration,
    stops: std::collections::HashMap<String, CancellationToken>,
}

impl Beats {
    pub fn new(api: &Api<ServiceInstance>, every: Duration) -> Beats {
        Beats {
            api: api.clone(),
            every,
            stops: Default::default(),
        }
    }

    pub fn start(&mut self, name: &str) {
        let stop = CancellationToken::new();
        let (api, name_owned, every, token) =
            (self.api.clone(), name.to_string(), self.every, stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    () = token.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let value = jiff::Timestamp::now().to_string();
                let patch = serde_json::json!({"metadata": {"annotations": {"roster.dev/heartbeat": value}}});
                let _ = tokio::time::timeout(
                    every,
                    api.patch(
                        &name_owned,
                        &kube::api::PatchParams::default(),
                        &kube::api::Patch::Merge(&patch),
                    ),
                )
                .await;
            }
        });
        self.stops.insert(name.to_string(), stop);
    }

    pub fn stop(&mut self, name: &str) {
        if let Some(stop) = self.stops.remove(name) {
            stop.cancel();
        }
    }
}

impl Drop for Beats {
    fn drop(&mut self) {
        for stop in self.stops.values() {
            stop.cancel();
        }
    }
}
