//! Heartbeats, liveness, expiry and deletion against the real apiserver, with short TTLs.

use std::time::{Duration, Instant};

use k8s_openapi::api::{coordination::v1::Lease, core::v1::Event};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams, PostParams},
    runtime::wait::conditions::is_deleted,
};
use roster::api::{InstancePort, Phase, ServiceInstance, ServiceInstanceSpec};
use serde_json::json;

use crate::harness::{
    self, ControllerProcess, TestNamespace, await_event, http_get, wait_deleted, wait_for,
};

const TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) fn instance(name: &str, ttl: i32, delete_after: i32) -> ServiceInstance {
    let mut spec = ServiceInstanceSpec::new(
        "checkout",
        "10.20.0.11",
        vec![InstancePort::tcp("http", 8080)],
    );
    spec.ttl_seconds = Some(ttl);
    spec.delete_after_seconds = Some(delete_after);
    ServiceInstance::new(name, spec)
}

pub(crate) use crate::harness::{await_phase, condition, phase};

pub(crate) async fn heartbeat(api: &Api<ServiceInstance>, name: &str) -> Instant {
    let value = jiff::Timestamp::now().to_string();
    let patch = json!({"metadata": {"annotations": {"roster.dev/heartbeat": value}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("heartbeat");
    Instant::now()
}

async fn renew(leases: &Api<Lease>, name: &str) -> Instant {
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(jiff::Timestamp::now());
    let patch =
        json!({"spec": {"holderIdentity": "test", "leaseDurationSeconds": 2, "renewTime": now}});
    leases
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("renew lease");
    Instant::now()
}

/// Heartbeats every `every` for `count` beats, asserting after each that the instance is Ready.
async fn keep_alive(
    api: &Api<ServiceInstance>,
    name: &str,
    every: Duration,
    count: u32,
) -> Instant {
    let mut tick = tokio::time::interval(every);
    let mut last = Instant::now();
    for _ in 0..count {
        tick.tick().await;
        last = heartbeat(api, name).await;
        let si = api.get(name).await.expect("get");
        assert_eq!(
            phase(Some(&si)),
            Some(Phase::Ready),
            "left Ready while heartbeating: {:?}",
            si.status
        );
    }
    last
}

pub(crate) async fn metric(addr: &str, name: &str) -> f64 {
    let (_, body) = http_get(addr, "/metrics").await;
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn reasons(client: &Client, ns: &str, name: &str) -> Vec<String> {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let list = events
        .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
        .await
        .expect("list events");
    list.items.into_iter().filter_map(|e| e.reason).collect()
}

#[tokio::test]
async fn annotation_heartbeats_keep_an_instance_ready_then_silence_expires_it() {
    let _timing = harness::timing().await;
    let client = harness::client().await;
    let ns = TestNamespace::new(&client, "annotation").await;
    let api: Api<ServiceInstance> = Api::namespaced(client.clone(), &ns.name);
    let controller = ControllerProcess::start(&harness::kubeconfig().await, &ns.name);
    let addr = controller.http_addr(TIMEOUT).await;

    // Registered without a heartbeat: Pending.
    api.create(&PostParams::default(), &instance("a", 2, 4))
        .await
        .expect("create");
    await_phase(&api, "a", Phase::Pending, TIMEOUT).await;
    // The first heartbeat makes it Ready.
    heartbeat(&api, "a").await;
    let si = await_phase(&api, "a", Phase::Ready, TIMEOUT).await;
    assert_eq!(
        condition(&si, "Ready"),
        ("True".into(), "Heartbeating".into())
    );
    assert_eq!(
        condition(&si, "Heartbeating"),
        ("True".into(), "HeartbeatObserved".into())
    );

    // Steady heartbeats for 2.5 TTLs: always Ready, and not one status write.
    // Pending and Ready were written (counted just after the apiserver answered).
    await_metric(&addr, "roster_status_writes_total", 2.0).await;
    let writes = metric(&addr, "roster_status_writes_total").await;
    let beats = metric(&addr, "roster_heartbeats_observed_total").await;
    let last = keep_alive(&api, "a", Duration::from_millis(500), 10).await;
    await_metric(&addr, "roster_heartbeats_observed_total", beats + 10.0).await;
    assert_eq!(
        metric(&addr, "roster_status_writes_total").await,
        writes,
        "steady heartbeats wrote status"
    );

    // Silence: Unhealthy after the TTL (not before, and within TTL + 1 s), then deleted after
    // deleteAfterSeconds.
    let si = await_phase(&api, "a", Phase::Unhealthy, TIMEOUT).await;
    let silent = last.elapsed();
    assert!(
        silent >= Duration::from_secs(2),
        "Unhealthy after only {silent:?}"
    );
    assert!(
        silent <= Duration::from_secs(3),
        "Unhealthy only after {silent:?}"
    );
    assert_eq!(
        condition(&si, "Ready"),
        ("False".into(), "HeartbeatSilent".into())
    );
    wait_deleted(
        &api,
        "a",
        &si.metadata.uid.clone().unwrap_or_default(),
        TIMEOUT,
    )
    .await;
    let gone = last.elapsed();
    assert!(
        gone >= Duration::from_secs(4),
        "deleted after only {gone:?}"
    );
    assert!(
        gone <= Duration::from_secs(5),
        "deleted only after {gone:?}"
    );

    // Each transition was one status write (Pending, Ready, Unhealthy) and one Event, which is
    // what `kubectl describe` / `kubectl get events` show. (Expired is published just after the
    // delete, so it is awaited.)
    assert_eq!(metric(&addr, "roster_status_writes_total").await, 3.0);
    let all = ["Expired", "HeartbeatSilent", "Ready", "Registered"];
    let wait = async {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            let mut seen = reasons(&client, &ns.name, "a").await;
            seen.sort();
            if seen.len() >= all.len() {
                return seen;
            }
        }
    };
    let seen = tokio::time::timeout(TIMEOUT, wait)
        .await
        .expect("the four Events");
    assert_eq!(seen, all);
}

pub(crate) async fn await_metric(addr: &str, name: &str, at_least: f64) {
    let wait = async {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tick.tick().await;
            if metric(addr, name).await >= at_least {
                return;
            }
        }
    };
    if tokio::time::timeout(TIMEOUT, wait).await.is_err() {
        panic!(
            "{name} did not reach {at_least}: {}",
            metric(addr, name).await
        );
    }
}

#[tokio::test]
async fn a_heartbeat_brings_an_instance_back_and_persistent_instances_stay() {
    let client = harness::client().await;
    let ns = TestNamespace::new(&client, "persistent").await;
    let api: Api<ServiceInstance> = Api::namespaced(client.clone(), &ns.name);
    let _controller = ControllerProcess::start(&harness::kubeconfig().await, &ns.name);

    // deleteAfterSeconds: 0 — persistent: only ever marked Unhealthy.
    let mut si = instance("p", 2, 0);
    si.metadata.annotations = Some(
        [(
            "roster.dev/heartbeat".to_string(),
            "2026-01-01T00:00:00Z".to_string(),
        )]
        .into(),
    );
    api.create(&PostParams::default(), &si)
        .await
        .expect("create");
    // Registered with a heartbeat: Ready at once.
    await_phase(&api, "p", Phase::Ready, TIMEOUT).await;
    let unhealthy = await_phase(&api, "p", Phase::Unhealthy, TIMEOUT).await;
    let uid = unhealthy.metadata.uid.clone().unwrap_or_default();
    // Five TTLs later it still exists (3 × TTL would have deleted an ordinary instance).
    let deleted = tokio::time::timeout(
        Duration::from_secs(5),
        kube::runtime::wait::await_condition(api.clone(), "p", is_deleted(&uid)),
    )
    .await;
    assert!(deleted.is_err(), "a persistent instance was deleted");
    // A heartbeat brings it back.
    heartbeat(&api, "p").await;
    await_phase(&api, "p", Phase::Ready, TIMEOUT).await;
}

#[tokio::test]
async fn lease_renewals_keep_an_instance_ready() {
    let _timing = harness::timing().await;
    let client = harness::client().await;
    let ns = TestNamespace::new(&client, "lease").await;
    let api: Api<ServiceInstance> = Api::namespaced(client.clone(), &ns.name);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    let _controller = ControllerProcess::start(&harness::kubeconfig().await, &ns.name);

    let mut si = instance("l", 2, 0);
    si.spec.lease_name = Some("l-lease".into());
    api.create(&PostParams::default(), &si)
        .await
        .expect("create");
    // A missing Lease is a clear condition, not a crash.
    let pending = await_phase(&api, "l", Phase::Pending, TIMEOUT).await;
    assert_eq!(
        condition(&pending, "Heartbeating"),
        ("Unknown".into(), "LeaseNotFound".into())
    );

    let lease: Lease = serde_json::from_value(json!({"metadata": {"name": "l-lease"}, "spec": {}}))
        .expect("lease");
    leases
        .create(&PostParams::default(), &lease)
        .await
        .expect("create lease");
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut last = Instant::now();
    for i in 0..10 {
        tick.tick().await;
        last = renew(&leases, "l-lease").await;
        if i == 0 {
            let ready = await_phase(&api, "l", Phase::Ready, TIMEOUT).await;
            assert_eq!(
                condition(&ready, "Heartbeating"),
                ("True".into(), "HeartbeatObserved".into())
            );
        } else {
            assert_eq!(
                phase(Some(&api.get("l").await.expect("get"))),
                Some(Phase::Ready)
            );
        }
    }
    await_phase(&api, "l", Phase::Unhealthy, TIMEOUT).await;
    let silent = last.elapsed();
    assert!(
        (Duration::from_secs(2)..=Duration::from_secs(3)).contains(&silent),
        "Unhealthy after {silent:?}"
    );
}

#[tokio::test]
async fn draining_and_malformed_heartbeats() {
    let client = harness::client().await;
    let ns = TestNamespace::new(&client, "draining").await;
    let api: Api<ServiceInstance> = Api::namespaced(client.clone(), &ns.name);
    let _controller = ControllerProcess::start(&harness::kubeconfig().await, &ns.name);

    api.create(&PostParams::default(), &instance("d", 30, 0))
        .await
        .expect("create");
    heartbeat(&api, "d").await;
    await_phase(&api, "d", Phase::Ready, TIMEOUT).await;
    let patch = json!({"spec": {"draining": true}});
    api.patch("d", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("drain");
    let si = await_phase(&api, "d", Phase::Draining, TIMEOUT).await;
    assert_eq!(condition(&si, "Ready"), ("False".into(), "Draining".into()));
    await_event(&client, &ns.name, "d", "Draining", TIMEOUT).await;

    // Any change of the annotation is a heartbeat, but a non-timestamp is named on the condition.
    let patch = json!({"metadata": {"annotations": {"roster.dev/heartbeat": "not a time"}}, "spec": {"draining": false}});
    api.patch("d", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch");
    let si = wait_for(
        &api,
        "d",
        "HeartbeatNotTimestamp",
        TIMEOUT,
        |si: Option<&ServiceInstance>| {
            si.is_some_and(|si| condition(si, "Heartbeating").1 == "HeartbeatNotTimestamp")
        },
    )
    .await;
    assert_eq!(phase(Some(&si)), Some(Phase::Ready));
}

#[tokio::test]
async fn a_controller_restart_deletes_nothing_early() {
    let _timing = harness::timing().await;
    let client = harness::client().await;
    let ns = TestNamespace::new(&client, "restart").await;
    let api: Api<ServiceInstance> = Api::namespaced(client.clone(), &ns.name);
    let kubeconfig = harness::kubeconfig().await;
    let first = ControllerProcess::start(&kubeconfig, &ns.name);

    api.create(&PostParams::default(), &instance("r", 2, 4))
        .await
        .expect("create");
    heartbeat(&api, "r").await;
    await_phase(&api, "r", Phase::Ready, TIMEOUT).await;
    // Silence; the instance turns Unhealthy; the controller dies before deleteAfter.
    let si = await_phase(&api, "r", Phase::Unhealthy, TIMEOUT).await;
    let uid = si.metadata.uid.clone().unwrap_or_default();
    drop(first);
    let restarted = Instant::now();
    let second = ControllerProcess::start(&kubeconfig, &ns.name);
    second
        .await_output("that its cache synced", TIMEOUT, |out| {
            out.contains("cache synced").then_some(())
        })
        .await;
    // The new controller gives the instance a full deleteAfter from its own start.
    wait_deleted(&api, "r", &uid, TIMEOUT).await;
    let after = restarted.elapsed();
    assert!(
        after >= Duration::from_secs(4),
        "deleted {after:?} after the restart"
    );
}

#[tokio::test]
async fn a_pod_backed_instance_disappears_with_its_pod() {
    use k8s_openapi::api::core::v1::Pod;
    let client = harness::client().await;
    let ns = TestNamespace::new(&client, "owned").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let api: Api<ServiceInstance> = Api::namespaced(client.clone(), &ns.name);

    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "web-0"},
        "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]},
    }))
    .expect("pod");
    let pod = pods
        .create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    let mut si = instance("web-0", 30, 90);
    si.metadata.owner_references = Some(vec![
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod", "name": "web-0",
            "uid": pod.metadata.uid.clone().unwrap_or_default(), "controller": true,
        }))
        .expect("owner reference"),
    ]);
    let si = api
        .create(&PostParams::default(), &si)
        .await
        .expect("create instance");

    pods.delete("web-0", &Default::default())
        .await
        .expect("delete pod");
    // kube-controller-manager's garbage collector removes the dependent instance.
    wait_deleted(
        &api,
        "web-0",
        &si.metadata.uid.clone().unwrap_or_default(),
        Duration::from_secs(60),
    )
    .await;
}
