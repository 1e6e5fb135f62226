//! Outages of the control plane itself: kube-apiserver or etcd stopped (SIGSTOP) for longer than
//! 2 × TTL, so that no heartbeat can arrive. Nothing is marked down or deleted because of the
//! outage, and normal expiry resumes, with a fresh TTL, once it is over.

use std::time::{Duration, Instant};

use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use roster::api::{InstancePort, Phase, ServiceInstance, ServiceInstanceSpec};

use crate::harness::{
    Beats, ControllerProcess, FAST_ELECTION, History, LocalControlPlane, processes_mentioning,
    wait_deleted, wait_for,
};

const TIMEOUT: Duration = Duration::from_secs(30);
const NAMESPACE: &str = "default";
const TTL: i32 = 2;
const DELETE_AFTER: i32 = 4;
/// Longer than 2 × TTL: every deadline of the instances falls inside it.
const OUTAGE: Duration = Duration::from_secs(6);

/// The tests of this file run one after another: each starts a control plane, and a second one
/// starting on the 2 cores while the first is timed would turn load into a late heartbeat.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Which process of the control plane the outage stops.
#[derive(Clone, Copy, Debug)]
enum Target {
    ApiServer,
    Etcd,
}

impl Target {
    /// Its name in `/proc/<pid>/comm`.
    fn comm(self) -> &'static str {
        match self {
            Target::ApiServer => "kube-apiserver",
            Target::Etcd => "etcd",
        }
    }
}

/// A control-plane process stopped with SIGSTOP, continued (SIGCONT) when dropped, so that a
/// failing test never leaves it stopped.
struct Stopped {
    pid: i32,
}

impl Stopped {
    fn stop(cp: &LocalControlPlane, target: Target) -> Stopped {
        let pids: Vec<i32> = processes_mentioning(&cp.dir().to_string_lossy())
            .into_iter()
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|comm| comm.trim() == target.comm())
            })
            .filter_map(|pid| i32::try_from(pid).ok())
            .collect();
        let [pid] = pids[..] else {
            panic!("expected one {} process, found {pids:?}", target.comm());
        };
        // SAFETY: a plain kill(2) on a process of this test's own control plane.
        let sent = unsafe { libc::kill(pid, libc::SIGSTOP) };
        assert_eq!(sent, 0, "SIGSTOP {}", target.comm());
        Stopped { pid }
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.pid, libc::SIGCONT) };
    }
}

fn instance(name: &str) -> ServiceInstance {
    let mut spec = ServiceInstanceSpec::new(
        "outage",
        "10.20.0.11",
        vec![InstancePort::tcp("http", 8080)],
    );
    spec.ttl_seconds = Some(TTL);
    spec.delete_after_seconds = Some(DELETE_AFTER);
    ServiceInstance::new(name, spec)
}

async fn heartbeat(api: &Api<ServiceInstance>, name: &str) -> kube::Result<ServiceInstance> {
    let value = jiff::Timestamp::now().to_string();
    let patch = serde_json::json!({"metadata": {"annotations": {"roster.dev/heartbeat": value}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
}

async fn await_ready(api: &Api<ServiceInstance>, name: &str) -> ServiceInstance {
    wait_for(
        api,
        name,
        "phase Ready",
        TIMEOUT,
        |si: Option<&ServiceInstance>| {
            si.and_then(|si| si.status.as_ref()).and_then(|s| s.phase) == Some(Phase::Ready)
        },
    )
    .await
}

/// What the History saw, timed relative to the end of the outage, for failure messages.
fn timeline(history: &History, resumed: Instant) -> String {
    history
        .all()
        .iter()
        .map(|s| {
            let at = if s.at >= resumed {
                format!("+{:.2?}", s.at - resumed)
            } else {
                format!("-{:.2?}", resumed - s.at)
            };
            match s.phase {
                Some(phase) => format!("{at} {} {phase:?}", s.name),
                None => format!("{at} {} deleted", s.name),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A control plane of the test's own, the CRD, and a controller that leads.
async fn start(extra: &[&str]) -> (LocalControlPlane, kube::Client, ControllerProcess) {
    let cp = LocalControlPlane::start();
    let client = roster::control_plane::client_for(&cp.kubeconfig)
        .await
        .expect("admin client");
    roster::api::install_crd(&client)
        .await
        .expect("install the CRD");
    let controller = ControllerProcess::start_with(&cp.kubeconfig, NAMESPACE, extra);
    controller
        .await_output("that it leads", TIMEOUT, |o| {
            o.contains("became leader").then_some(())
        })
        .await;
    (cp, client, controller)
}

async fn outage_deletes_nothing_and_expiry_resumes_after_a_fresh_ttl(
    target: Target,
    extra: &[&str],
) {
    let _serial = SERIAL.lock().await;
    let (cp, client, controller) = start(extra).await;
    let api: Api<ServiceInstance> = Api::namespaced(client.clone(), NAMESPACE);

    // Three that heartbeat throughout (four instances in all: below the default minimum size of
    // a protected service, so protection against mass expiry plays no part).
    let alive: Vec<String> = (0..3).map(|i| format!("alive-{i}")).collect();
    for name in &alive {
        api.create(&PostParams::default(), &instance(name))
            .await
            .expect("create");
        heartbeat(&api, name).await.expect("first heartbeat");
    }
    let mut beats = Beats::new(&api, Duration::from_millis(400));
    for name in &alive {
        beats.start(name);
    }
    for name in &alive {
        await_ready(&api, name).await;
    }
    // One that heartbeats once and never again, just before the outage: its TTL and its
    // deleteAfterSeconds both run out while the control plane is stopped.
    api.create(&PostParams::default(), &instance("dead"))
        .await
        .expect("create");
    heartbeat(&api, "dead")
        .await
        .expect("dead's only heartbeat");
    let dead_beat = Instant::now();
    let dead = await_ready(&api, "dead").await;
    let dead_uid = dead.metadata.uid.expect("a created instance has a uid");
    let history = History::start(api.clone()).await;

    let stopped = Stopped::stop(&cp, target);
    let stopped_at = Instant::now();
    assert!(
        stopped_at - dead_beat < Duration::from_millis(1500),
        "the outage began {:?} after dead's heartbeat: its TTL must run out inside the outage",
        stopped_at - dead_beat
    );
    // Pacing of the scenario (how long the outage lasts), not synchronisation.
    tokio::time::sleep_until((stopped_at + OUTAGE).into()).await;
    drop(stopped);
    let resumed = Instant::now();

    // Normal expiry resumes: dead goes, and meanwhile the others are watched.
    wait_deleted(&api, "dead", &dead_uid, TIMEOUT).await;
    history.await_deleted("dead", TIMEOUT).await;
    let seen = timeline(&history, resumed);
    eprintln!("{target:?} outage, as the History saw it (relative to its end):\n{seen}");
    for name in &alive {
        let phases: Vec<Option<Phase>> = history.of(name).iter().map(|s| s.phase).collect();
        assert_eq!(
            phases,
            vec![Some(Phase::Ready)],
            "{name} left Ready because of the {target:?} outage; history:\n{seen}"
        );
        let si = api.get(name).await.expect("get a heartbeating instance");
        assert_eq!(
            si.status.and_then(|s| s.phase),
            Some(Phase::Ready),
            "{name}; history:\n{seen}"
        );
    }
    assert_eq!(
        history.deleted(),
        vec!["dead".to_string()],
        "only dead is deleted; history:\n{seen}"
    );
    // The path the scenario meant to exercise was taken.
    let out = controller.output();
    match target {
        Target::ApiServer => assert!(
            out.contains("the apiserver answers again"),
            "the controller never lost contact with the apiserver"
        ),
        Target::Etcd => assert!(
            out.contains("lost leadership") && out.matches("became leader").count() >= 2,
            "the controller did not lose its Lease and take it again"
        ),
    }
    // A fresh TTL (and deleteAfterSeconds) from the end of the outage, not from the heartbeat.
    let dead_seen = history.of("dead");
    let unhealthy = dead_seen
        .iter()
        .find(|s| s.phase == Some(Phase::Unhealthy))
        .unwrap_or_else(|| panic!("dead was never seen Unhealthy; history:\n{seen}"));
    assert!(
        unhealthy.at >= resumed + Duration::from_millis(1500),
        "dead Unhealthy {:?} after the outage, before a fresh TTL; history:\n{seen}",
        unhealthy.at.saturating_duration_since(resumed)
    );
    let deleted = dead_seen
        .iter()
        .find(|s| s.phase.is_none())
        .unwrap_or_else(|| panic!("dead's deletion was not seen; history:\n{seen}"));
    assert!(
        deleted.at >= resumed + Duration::from_millis(3500),
        "dead deleted {:?} after the outage, before a fresh deleteAfterSeconds; history:\n{seen}",
        deleted.at.saturating_duration_since(resumed)
    );
}

/// The apiserver stopped for 6 s, within the default renew deadline (10 s): the leader normally
/// keeps its term, so what protects is the contact rule: no silence is judged unless a request
/// started after its deadline was answered, and the apiserver's return starts a fresh view.
#[tokio::test]
async fn an_apiserver_outage_deletes_nothing_and_expiry_resumes_after_a_fresh_ttl() {
    outage_deletes_nothing_and_expiry_resumes_after_a_fresh_ttl(Target::ApiServer, &[]).await;
}

/// etcd stopped for 6 s, with short election timings (lease 4 s, renew deadline 3 s, retry
/// 1 s): the leader loses its Lease during the outage and takes it again after it, and the new
/// term starts from nothing.
#[tokio::test]
async fn an_etcd_outage_deletes_nothing_and_expiry_resumes_after_a_fresh_ttl() {
    outage_deletes_nothing_and_expiry_resumes_after_a_fresh_ttl(Target::Etcd, &FAST_ELECTION).await;
}

/// A stall of the apiserver shorter than a quarter of the TTL is a late answer, not an outage:
/// it costs no heartbeat of a client that waits TTL/3, so it gives nobody a fresh TTL, and an
/// instance that fell silent before it is judged on time, however many such stalls its silence
/// saw. (Before, any request that timed out gave every instance a full TTL from the apiserver's
/// return: the benchmark's expiry tail; then stalls were added up, and these three, 15 s or
/// more, gave one.)
#[tokio::test]
async fn a_stall_under_a_quarter_of_the_ttl_delays_no_expiry() {
    const LONG_TTL: i32 = 60;
    let _serial = SERIAL.lock().await;
    let (cp, client, controller) = start(&[]).await;
    let api: Api<ServiceInstance> = Api::namespaced(client.clone(), NAMESPACE);
    let long = |name: &str| {
        let mut si = instance(name);
        si.spec.ttl_seconds = Some(LONG_TTL);
        // Never deleted: only the Unhealthy verdict is timed.
        si.spec.delete_after_seconds = Some(0);
        si
    };
    api.create(&PostParams::default(), &long("alive"))
        .await
        .expect("create");
    heartbeat(&api, "alive").await.expect("first heartbeat");
    let mut beats = Beats::new(&api, Duration::from_secs(1));
    beats.start("alive");
    api.create(&PostParams::default(), &long("dead"))
        .await
        .expect("create");
    heartbeat(&api, "dead")
        .await
        .expect("dead's only heartbeat");
    await_ready(&api, "dead").await;
    await_ready(&api, "alive").await;
    let history = History::start(api.clone()).await;

    // Three stalls of 5 s: each longer than a request's timeout (the retry period, 2 s), so
    // the controller sees a request go unanswered; each, with the time since the last answer
    // before it, under 15 s, a quarter of the TTL; together 15 s or more. Between them the
    // apiserver answers for 3 s (a renewal or more), so they are three stalls, not one. All
    // within dead's silence window (its verdict is due 60 s after its only heartbeat).
    for stall in 1..=3 {
        if stall > 1 {
            tokio::time::sleep(Duration::from_secs(3)).await; // pacing: the time between stalls
        }
        let stopped = Stopped::stop(&cp, Target::ApiServer);
        tokio::time::sleep(Duration::from_secs(5)).await; // pacing: the stall's length
        drop(stopped);
        controller
            .await_output(
                "the apiserver answering again",
                Duration::from_secs(20),
                |out| (out.matches("the apiserver answers again").count() >= stall).then_some(()),
            )
            .await;
    }
    let resumed = Instant::now();
    let unhealthy = wait_for(
        &api,
        "dead",
        "phase Unhealthy",
        Duration::from_secs(u64::try_from(LONG_TTL).unwrap_or(60) + 30),
        |si: Option<&ServiceInstance>| {
            si.and_then(|si| si.status.as_ref()).and_then(|s| s.phase) == Some(Phase::Unhealthy)
        },
    )
    .await;
    let at = Instant::now();
    let seen = timeline(&history, resumed);
    assert!(
        controller.output().contains("did not answer in time"),
        "the controller never saw a request go unanswered: the stall was not exercised"
    );
    // A fresh TTL from the apiserver's return would put it at resumed + 60 s or later.
    let fresh = resumed + Duration::from_secs(u64::try_from(LONG_TTL).unwrap_or(60));
    assert!(
        at + Duration::from_secs(1) < fresh,
        "dead went Unhealthy {:?} after the stall: it was given a fresh TTL; history:\n{seen}",
        at.saturating_duration_since(resumed)
    );
    assert_eq!(
        unhealthy.status.and_then(|s| s.phase),
        Some(Phase::Unhealthy)
    );
    let alive: Vec<Option<Phase>> = history.of("alive").iter().map(|s| s.phase).collect();
    assert_eq!(alive, vec![Some(Phase::Ready)], "history:\n{seen}");
}
