//! An instance stored before a schema change, which the controller cannot decode, is reported
//! and skipped; the watch goes on for every other instance. Its own control plane: the test
//! replaces the cluster-wide CRD.

use std::time::Duration;

use k8s_openapi::{
    api::core::v1::Event,
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, CustomResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
    core::{DynamicObject, GroupVersionKind},
    discovery::ApiResource,
};
use roster::api::{InstancePort, Phase, ServiceInstance, ServiceInstanceSpec};
use serde_json::json;

use crate::harness::{ControllerProcess, LocalControlPlane, http_get, wait_for};

const TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn an_instance_the_controller_cannot_decode_is_reported_and_skipped() {
    let cp = LocalControlPlane::start();
    let client = roster::control_plane::client_for(&cp.kubeconfig)
        .await
        .expect("admin client");

    // An older, looser schema: spec fields of any type.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut old = serde_json::to_value(ServiceInstance::crd()).expect("CRD as JSON");
    old["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"] = json!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    });
    crds.patch(
        "serviceinstances.roster.dev",
        &PatchParams::apply("roster.dev/controller").force(),
        &Patch::Apply(&old),
    )
    .await
    .expect("apply the old CRD");
    let gvk = GroupVersionKind::gvk("roster.dev", "v1alpha1", "ServiceInstance");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "serviceinstances");
    let raw: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &resource);
    let store_bad = || async {
        let bad: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "roster.dev/v1alpha1",
            "kind": "ServiceInstance",
            "metadata": {"name": "old"},
            "spec": {"service": "web", "address": "10.0.0.9", "ports": [{"name": "http", "port": 80}], "ttlSeconds": "thirty"},
        }))
        .expect("object literal");
        raw.create(&PostParams::default(), &bad).await
    };
    // The CRD's new schema may take a moment to be served: retry until it is.
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut created = None;
    for _ in 0..50 {
        tick.tick().await;
        if let Ok(obj) = store_bad().await {
            created = Some(obj);
            break;
        }
    }
    assert!(created.is_some(), "could not store the old-schema object");

    // The schema changes; the stored object stays as it was.
    roster::api::install_crd(&client)
        .await
        .expect("install the current CRD");
    let api: Api<ServiceInstance> = Api::namespaced(client.clone(), "default");
    let mut spec =
        ServiceInstanceSpec::new("web", "10.0.0.10", vec![InstancePort::tcp("http", 80)]);
    spec.ttl_seconds = Some(5);
    api.create(&PostParams::default(), &ServiceInstance::new("good", spec))
        .await
        .expect("create a good instance");

    let controller = ControllerProcess::start_with(&cp.kubeconfig, "default", &[]);
    let addr = controller.http_addr(TIMEOUT).await;
    controller
        .await_output("that it skips the old object", TIMEOUT, |out| {
            out.lines()
                .find(|l| l.contains("cannot decode a ServiceInstance") && l.contains("old"))
                .map(str::to_string)
        })
        .await;

    // The watch is not stalled: the good instance is judged, and heartbeats reach it.
    let patch = json!({"metadata": {"annotations": {"roster.dev/heartbeat": jiff::Timestamp::now().to_string()}}});
    api.patch("good", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("heartbeat");
    wait_for(
        &api,
        "good",
        "Ready",
        TIMEOUT,
        |si: Option<&ServiceInstance>| {
            si.and_then(|si| si.status.as_ref()).and_then(|s| s.phase) == Some(Phase::Ready)
        },
    )
    .await;

    // It is reported where `kubectl describe` and the metrics show it, and left as it is.
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let reported = async {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            let list = events
                .list(&ListParams::default().fields("involvedObject.name=old"))
                .await
                .expect("list events");
            if let Some(e) = list
                .items
                .into_iter()
                .find(|e| e.reason.as_deref() == Some("Undecodable"))
            {
                return e;
            }
        }
    };
    let event = tokio::time::timeout(TIMEOUT, reported)
        .await
        .expect("an Undecodable Event on the old object");
    assert!(
        event
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("ttlSeconds")
            || event
                .message
                .as_deref()
                .unwrap_or_default()
                .contains("invalid type"),
        "{event:?}"
    );
    let (_, metrics) = http_get(&addr, "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "roster_undecodable_instances 1"),
        "{metrics}"
    );
    let old = raw.get("old").await.expect("the old object is still there");
    assert!(old.metadata.deletion_timestamp.is_none());
    assert!(old.data.get("status").is_none(), "written to: {old:?}");
}
