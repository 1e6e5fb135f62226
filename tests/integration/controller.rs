//! The controller against the real apiserver: status, endpoints, shutdown and clear failures.

use std::time::Duration;

use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use roster::api::{InstancePort, Phase, ServiceInstance, ServiceInstanceSpec};

use crate::harness::{self, ControllerProcess, TestNamespace, http_get, wait_for};

const TIMEOUT: Duration = Duration::from_secs(30);

fn instance(name: &str) -> ServiceInstance {
    ServiceInstance::new(
        name,
        ServiceInstanceSpec::new(
            "checkout",
            "10.20.0.11",
            vec![InstancePort::tcp("http", 8080)],
        ),
    )
}

fn ready_condition(si: &ServiceInstance) -> Option<(String, String)> {
    let status = si.status.as_ref()?;
    let c = status.conditions.iter().find(|c| c.type_ == "Ready")?;
    Some((c.status.clone(), c.reason.clone()))
}

#[tokio::test]
async fn controller_writes_status_and_serves_health_and_metrics() {
    let client = harness::client().await;
    let ns = TestNamespace::new(&client, "status").await;
    let api: Api<ServiceInstance> = Api::namespaced(client.clone(), &ns.name);
    api.create(&PostParams::default(), &instance("a"))
        .await
        .expect("create");

    let controller = ControllerProcess::start(&harness::kubeconfig().await, &ns.name);
    let si = wait_for(
        &api,
        "a",
        "Pending with Ready=Unknown",
        TIMEOUT,
        |si: Option<&ServiceInstance>| {
            si.and_then(|si| si.status.as_ref())
                .is_some_and(|s| s.phase == Some(Phase::Pending) && s.observed_generation.is_some())
        },
    )
    .await;
    assert_eq!(
        ready_condition(&si),
        Some(("Unknown".into(), "AwaitingHeartbeat".into()))
    );
    assert_eq!(
        si.status.as_ref().and_then(|s| s.observed_generation),
        si.metadata.generation
    );
    // The status is owned by Roster's field manager (Server-Side Apply).
    let managers: Vec<_> = si
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.subresource.as_deref() == Some("status"))
        .map(|m| (m.manager.clone(), m.operation.clone()))
        .collect();
    assert_eq!(
        managers,
        vec![(Some("roster.dev/controller".into()), Some("Apply".into()))]
    );

    // A spec change is a new generation; the controller observes it.
    let patch = serde_json::json!({"spec": {"address": "10.20.0.12"}});
    let changed = api
        .patch("a", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch spec");
    let generation = changed.metadata.generation;
    assert_eq!(generation, Some(2));
    wait_for(
        &api,
        "a",
        "observedGeneration 2",
        TIMEOUT,
        move |si: Option<&ServiceInstance>| {
            si.and_then(|si| si.status.as_ref())
                .is_some_and(|s| s.observed_generation == generation)
        },
    )
    .await;

    let addr = controller.http_addr(TIMEOUT).await;
    assert_eq!(http_get(&addr, "/healthz").await.0, 200);
    controller
        .await_output("that its cache synced", TIMEOUT, |out| {
            out.contains("cache synced").then_some(())
        })
        .await;
    assert_eq!(http_get(&addr, "/readyz").await, (200, "ok".into()));
    let (code, metrics) = http_get(&addr, "/metrics").await;
    assert_eq!(code, 200);
    let reconciles: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("roster_reconciles_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no roster_reconciles_total in:\n{metrics}"));
    assert!(
        reconciles >= 2.0,
        "two generations were reconciled, metrics say {reconciles}"
    );
    assert!(
        metrics.contains("roster_reconcile_duration_seconds_bucket"),
        "{metrics}"
    );
}

#[tokio::test]
async fn controller_stops_cleanly_on_sigterm_and_sigint() {
    let client = harness::client().await;
    let ns = TestNamespace::new(&client, "shutdown").await;
    let kubeconfig = harness::kubeconfig().await;
    for (signal, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")] {
        let mut controller = ControllerProcess::start(&kubeconfig, &ns.name);
        controller
            .await_output("that it started", TIMEOUT, |out| {
                out.contains("cache synced").then_some(())
            })
            .await;
        controller.signal(signal);
        let status = controller.wait_exit(TIMEOUT).await;
        let out = controller.output();
        assert!(status.success(), "{name}: exit {status}; printed:\n{out}");
        assert!(out.contains(&format!("{name} received")), "{out}");
        assert!(out.contains("controller stopped"), "{out}");
        // It handed the leader Lease back, so the next replica leads at once.
        assert!(out.contains("released the leader Lease"), "{out}");
        let lease =
            Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(client.clone(), &ns.name)
                .get("roster-controller")
                .await
                .expect("the election Lease");
        assert_eq!(lease.spec.and_then(|s| s.holder_identity), None);
    }
}

#[tokio::test]
async fn controller_exits_with_a_clear_message_when_the_apiserver_is_unreachable() {
    // A kubeconfig that points at a loopback port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let dir = std::env::temp_dir().join(format!("roster-unreachable-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:{port}\n\
             users:\n- name: u\n  user:\n    token: t\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\n\
             current-context: c\n"
        ),
    )
    .expect("write kubeconfig");
    let mut controller = ControllerProcess::spawn(&[
        "controller",
        "--kubeconfig",
        kubeconfig.to_str().expect("utf-8"),
    ]);
    let status = controller.wait_exit(Duration::from_secs(60)).await;
    let _ = std::fs::remove_dir_all(&dir);
    let out = controller.output();
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(
        out.contains(&format!(
            "error: cannot reach the Kubernetes API server at https://127.0.0.1:{port}/"
        )),
        "{out}"
    );
    assert!(!out.contains("panicked"), "{out}");
}
