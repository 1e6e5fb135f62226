//! `roster agent` as a separate process against the real apiserver, beside a real controller:
//! it registers (owned by its Pod), heartbeats through a Lease, drains while the app's local
//! probe fails, registers again what is deleted from under it (with one heartbeat loop), and on
//! SIGTERM drains, then deregisters; a killed agent's instance expires.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use k8s_openapi::api::{coordination::v1::Lease, core::v1::Pod};
use kube::{Api, api::PostParams};
use roster::api::{Phase, ServiceInstance};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{
    self, ControllerProcess, Renewals, TestNamespace, await_phase, wait_deleted, wait_for,
};

const TIMEOUT: Duration = Duration::from_secs(30);

/// `roster agent` for instance `name` of service `web` in `ns`, with `extra` flags.
async fn agent(ns: &str, name: &str, extra: &[&str]) -> ControllerProcess {
    let kubeconfig = harness::kubeconfig().await;
    let mut args = vec![
        "agent",
        "--kubeconfig",
        kubeconfig.to_str().expect("utf-8 path"),
        "--namespace",
        ns,
        "--name",
        name,
        "--service",
        "web",
        "--address",
        "10.1.0.1",
    ];
    args.extend_from_slice(extra);
    if !extra.contains(&"--port") {
        args.extend(["--port", "http=8080"]);
    }
    ControllerProcess::spawn(&args)
}

fn draining(si: Option<&ServiceInstance>) -> bool {
    si.is_some_and(|si| si.spec.draining)
}

#[tokio::test]
async fn the_agent_registers_heartbeats_and_on_sigterm_drains_then_deregisters() {
    let client = harness::client().await;
    let ns = TestNamespace::new(&client, "agent").await;
    let _controller = ControllerProcess::start(&harness::kubeconfig().await, &ns.name);
    let api: Api<ServiceInstance> = Api::namespaced(client.clone(), &ns.name);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    // The Pod it runs in (no kubelet runs it here; the agent only needs its name and uid).
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "web-1"},
        "spec": {"containers": [{"name": "app", "image": "app"}]},
    }))
    .expect("a Pod");
    let pod = Api::<Pod>::namespaced(client.clone(), &ns.name)
        .create(&PostParams::default(), &pod)
        .await
        .expect("create the Pod");
    let pod_uid = pod.metadata.uid.clone().unwrap_or_default();
    let mut agent = agent(
        &ns.name,
        "web-1",
        &[
            "--pod-name",
            "web-1",
            "--pod-uid",
            &pod_uid,
            "--ttl",
            "3s",
            "--drain",
            "5s",
            "--grace-period",
            "15s",
        ],
    )
    .await;

    let si = await_phase(&api, "web-1", Phase::Ready, TIMEOUT).await;
    let owners = si.metadata.owner_references.clone().unwrap_or_default();
    assert_eq!(
        owners
            .iter()
            .map(|o| (o.kind.as_str(), o.uid.as_str()))
            .collect::<Vec<_>>(),
        [("Pod", pod_uid.as_str())]
    );
    assert_eq!(si.spec.lease_name.as_deref(), Some("web-1"));
    assert_eq!(si.spec.ttl_seconds, Some(3));
    // Heartbeats: the Lease's renewTime moves, again and again: seven renewals a second apart
    // outlast two TTLs.
    let renewals = Renewals::start(leases.clone(), "web-1");
    renewals
        .await_after(jiff::Timestamp::now(), 7, TIMEOUT)
        .await;
    // Still Ready two TTLs later: the Lease is what keeps it alive.
    assert_eq!(
        harness::phase(api.get("web-1").await.ok().as_ref()),
        Some(Phase::Ready)
    );

    // SIGTERM: draining first (out of the EndpointSlice's ready endpoints), then gone.
    let uid = si.metadata.uid.clone().unwrap_or_default();
    let term = Instant::now();
    agent.signal(libc::SIGTERM);
    wait_for(&api, "web-1", "draining", TIMEOUT, draining).await;
    await_phase(&api, "web-1", Phase::Draining, TIMEOUT).await;
    wait_deleted(&api, "web-1", &uid, TIMEOUT).await;
    let status = agent.wait_exit(TIMEOUT).await;
    assert!(status.success(), "{status:?}\n{}", agent.output());
    assert!(
        term.elapsed() < Duration::from_secs(15),
        "deregistered after {:?}, past the 15 s grace period",
        term.elapsed()
    );
    assert!(
        term.elapsed() >= Duration::from_secs(5),
        "deregistered after {:?}, before the 5 s drain",
        term.elapsed()
    );
    assert!(leases.get_opt("web-1").await.expect("get").is_none());
}

#[tokio::test]
async fn a_killed_agents_instance_expires() {
    let client = harness::client().await;
    let ns = TestNamespace::new(&client, "agent-kill").await;
    let _controller = ControllerProcess::start(&harness::kubeconfig().await, &ns.name);
    let api: Api<ServiceInstance> = Api::namespaced(client.clone(), &ns.name);
    let mut agent = agent(&ns.name, "web-2", &["--ttl", "2s", "--delete-after", "10s"]).await;
    let si = await_phase(&api, "web-2", Phase::Ready, TIMEOUT).await;
    agent.kill().await;
    await_phase(&api, "web-2", Phase::Unhealthy, TIMEOUT).await;
    wait_deleted(&api, "web-2", &si.metadata.uid.unwrap_or_default(), TIMEOUT).await;
}

#[tokio::test]
async fn the_agent_registers_again_what_is_deleted_and_keeps_one_heartbeat_loop() {
    let client = harness::client().await;
    let ns = TestNamespace::new(&client, "agent-again").await;
    let _controller = ControllerProcess::start(&harness::kubeconfig().await, &ns.name);
    let api: Api<ServiceInstance> = Api::namespaced(client.clone(), &ns.name);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    // TTL 3 s: a renewal every second.
    let _agent = agent(&ns.name, "web-3", &["--ttl", "3s"]).await;
    let renewals = Renewals::start(leases.clone(), "web-3");
    let first = await_phase(&api, "web-3", Phase::Ready, TIMEOUT).await;
    let first_uid = first.metadata.uid.clone().unwrap_or_default();
    for _ in 0..2 {
        let uid = api
            .get("web-3")
            .await
            .expect("get")
            .metadata
            .uid
            .unwrap_or_default();
        api.delete("web-3", &Default::default())
            .await
            .expect("delete");
        let again = wait_for(
            &api,
            "web-3",
            "registered again",
            TIMEOUT,
            |si: Option<&ServiceInstance>| {
                si.is_some_and(|si| si.metadata.uid.as_deref() != Some(uid.as_str()))
            },
        )
        .await;
        assert_ne!(again.metadata.uid.as_deref(), Some(first_uid.as_str()));
        await_phase(&api, "web-3", Phase::Ready, TIMEOUT).await;
    }
    // One loop: renewals a second apart on average over seven of them (a retry after a failed
    // one comes sooner, but one retry cannot pull the mean below 0.7 s). Two loops would renew
    // about twice as often: a mean near 0.5 s.
    let seen = renewals
        .await_after(jiff::Timestamp::now(), 7, TIMEOUT)
        .await;
    let span = seen[6].duration_since(seen[0]).as_secs_f64();
    assert!(span / 6.0 >= 0.7, "mean gap {:.2} s: {seen:?}", span / 6.0);
}

/// A minimal HTTP app on loopback whose every answer is 200 while the flag holds, else 503.
async fn app() -> (u16, Arc<AtomicBool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let healthy = Arc::new(AtomicBool::new(true));
    let flag = healthy.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let status = if flag.load(Ordering::Relaxed) {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            tokio::spawn(async move {
                let mut request = [0u8; 1024];
                let _ = conn.read(&mut request).await;
                let response =
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                let _ = conn.write_all(response.as_bytes()).await;
            });
        }
    });
    (port, healthy)
}

#[tokio::test]
async fn the_agent_drains_the_instance_while_the_app_fails_its_probe() {
    let client = harness::client().await;
    let ns = TestNamespace::new(&client, "agent-probe").await;
    let _controller = ControllerProcess::start(&harness::kubeconfig().await, &ns.name);
    let api: Api<ServiceInstance> = Api::namespaced(client.clone(), &ns.name);
    // The "app": /healthz answers 200 or 503 as the test says.
    let (port, healthy) = app().await;
    let ports = format!("http={port}");
    let _agent = agent(
        &ns.name,
        "web-4",
        &[
            "--port",
            &ports,
            "--probe-port",
            "http",
            "--probe-path",
            "/healthz",
            "--probe-period",
            "1s",
            "--probe-failure-threshold",
            "1",
            "--ttl",
            "3s",
        ],
    )
    .await;
    await_phase(&api, "web-4", Phase::Ready, TIMEOUT).await;
    healthy.store(false, Ordering::Relaxed);
    wait_for(&api, "web-4", "draining", TIMEOUT, draining).await;
    await_phase(&api, "web-4", Phase::Draining, TIMEOUT).await;
    healthy.store(true, Ordering::Relaxed);
    wait_for(
        &api,
        "web-4",
        "not draining",
        TIMEOUT,
        |si: Option<&ServiceInstance>| si.is_some_and(|si| !si.spec.draining),
    )
    .await;
    await_phase(&api, "web-4", Phase::Ready, TIMEOUT).await;
}

#[tokio::test]
async fn the_agent_refuses_bad_flags_with_a_clear_message() {
    for (args, says) in [
        (
            vec!["--port", "http"],
            "expected name=number or name=number/PROTOCOL",
        ),
        (
            vec!["--port", "http=80", "--drain", "40s"],
            "must be shorter than --grace-period",
        ),
        (
            vec!["--port", "http=80", "--ttl", "2h"],
            "whole seconds from 1s to 1h",
        ),
    ] {
        let mut agent = agent("default", "web-5", &args).await;
        let status = agent.wait_exit(TIMEOUT).await;
        assert!(!status.success());
        assert!(
            agent.output().contains(says),
            "{args:?}:\n{}",
            agent.output()
        );
    }
}
