//! `roster agent` through a restart of kube-apiserver (a control plane of this test's own, so
//! the shared one is never restarted under other tests), beside a controller: its heartbeats
//! fail while the apiserver is down, back off, and resume on the same instance once it is back,
//! and the instance never leaves Ready.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use roster::{
    api::{Phase, ServiceInstance},
    control_plane::{ControlPlane, Options},
};

use crate::harness::{ControllerProcess, History, await_phase};

const TIMEOUT: Duration = Duration::from_secs(60);

/// The Lease's last renewal, as the agent stamped it.
async fn renewed(leases: &Api<Lease>) -> Option<jiff::Timestamp> {
    let lease = leases.get_opt("web").await.ok().flatten()?;
    Some(lease.spec?.renew_time?.0)
}

#[tokio::test]
async fn the_agent_keeps_heartbeating_its_instance_through_an_apiserver_restart() {
    let mut cp = ControlPlane::start(Options::default())
        .await
        .expect("start a control plane");
    let client = cp.client().await.expect("admin client");
    roster::api::install_crd(&client)
        .await
        .expect("install the CRD");
    let kubeconfig = cp.kubeconfig().to_string_lossy().to_string();
    let _controller = ControllerProcess::start(cp.kubeconfig(), "default");
    let mut agent = ControllerProcess::spawn(&[
        "agent",
        "--kubeconfig",
        &kubeconfig,
        "--namespace",
        "default",
        "--name",
        "web",
        "--service",
        "web",
        "--address",
        "10.3.0.1",
        "--port",
        "http=80",
        "--ttl",
        "3s",
    ]);
    let instances: Api<ServiceInstance> = Api::namespaced(client.clone(), "default");
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    let deadline = Instant::now() + TIMEOUT;
    let uid = loop {
        if let (Ok(Some(si)), Some(_)) = (instances.get_opt("web").await, renewed(&leases).await) {
            break si.metadata.uid;
        }
        assert!(
            Instant::now() < deadline,
            "not registered:\n{}",
            agent.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await; // polling interval
    };
    await_phase(&instances, "web", Phase::Ready, TIMEOUT).await;
    let history = History::start(instances.clone()).await;

    cp.restart_apiserver()
        .await
        .expect("restart kube-apiserver");
    let back = jiff::Timestamp::now();
    // A fresh client: the admin's connections went with the old process.
    let client = cp.client().await.expect("admin client");
    let instances: Api<ServiceInstance> = Api::namespaced(client.clone(), "default");
    let leases: Api<Lease> = Api::namespaced(client, "default");
    // Two renewals after the restart: heartbeats resumed, and go on.
    let mut after = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    while after.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "no renewals after the restart ({after:?}):\n{}",
            agent.output()
        );
        if let Some(t) = renewed(&leases).await
            && t > back
            && after.last() != Some(&t)
        {
            after.push(t);
        }
        tokio::time::sleep(Duration::from_millis(100)).await; // polling interval
    }
    // The same instance, not a new registration, and the agent is still running.
    let si = await_phase(&instances, "web", Phase::Ready, TIMEOUT).await;
    assert_eq!(si.metadata.uid, uid);
    let phases: Vec<Option<Phase>> = history.of("web").iter().map(|s| s.phase).collect();
    assert_eq!(
        phases,
        [Some(Phase::Ready)],
        "it left Ready through the restart"
    );
    assert!(agent.running(), "the agent exited:\n{}", agent.output());
    assert!(
        agent.output().contains("heartbeat failed; retrying"),
        "the restart was not seen by the agent:\n{}",
        agent.output()
    );
}
