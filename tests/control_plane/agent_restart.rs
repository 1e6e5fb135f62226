//! `roster agent` through a restart of kube-apiserver (a control plane of this test's own, so
//! the shared one is never restarted under other tests), beside a controller: its heartbeats
//! fail while the apiserver is down, back off, and resume on the same instance once it is back,
//! and the instance never leaves Ready.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use roster::{
    api::{Phase, ServiceInstance},
    control_plane::{ControlPlane, Options},
};

use crate::harness::{ControllerProcess, History, Renewals, await_phase};

const TIMEOUT: Duration = Duration::from_secs(60);

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
    let renewals = Renewals::start(Api::<Lease>::namespaced(client.clone(), "default"), "web");
    let uid = await_phase(&instances, "web", Phase::Ready, TIMEOUT)
        .await
        .metadata
        .uid;
    let history = History::start(instances.clone()).await;

    cp.restart_apiserver()
        .await
        .expect("restart kube-apiserver");
    let back = jiff::Timestamp::now();
    // Two renewals after the restart: heartbeats resumed, and go on.
    renewals.await_after(back, 2, TIMEOUT).await;
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
