//! The apiserver refuses bad ServiceInstances with the messages a kubectl user reads.

use kube::{Api, api::PostParams};
use roster::api::ServiceInstance;

use crate::harness::{self, TestNamespace};

/// Creates `spec` and returns the apiserver's refusal.
async fn refusal(
    api: &Api<ServiceInstance>,
    name: &str,
    spec: serde_json::Value,
) -> kube::core::Status {
    let si: ServiceInstance = serde_json::from_value(serde_json::json!({
        "apiVersion": "roster.dev/v1alpha1",
        "kind": "ServiceInstance",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .expect("a well-typed (if invalid) object");
    match api.create(&PostParams::default(), &si).await {
        Err(kube::Error::Api(status)) => *status,
        other => panic!("{name}: expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn invalid_instances_are_refused_with_clear_messages() {
    let client = harness::client().await;
    let ns = TestNamespace::new(&client, "validation").await;
    let api: Api<ServiceInstance> = Api::namespaced(client, &ns.name);

    let status = refusal(
        &api,
        "bad",
        serde_json::json!({"service": "Bad_Name", "address": "10.0.0.1", "ports": []}),
    )
    .await;
    assert_eq!(status.code, 422);
    assert_eq!(status.reason, "Invalid");
    // kubectl prints this message after `The ServiceInstance "bad" is invalid:`, one line per cause.
    let message = &status.message;
    assert!(
        message.starts_with(r#"ServiceInstance.roster.dev "bad" is invalid: "#),
        "{message}"
    );
    for expected in [
        r#"spec.service: Invalid value: "Bad_Name": spec.service in body should match '^[a-z]([-a-z0-9]*[a-z0-9])?$'"#,
        "spec.ports: Invalid value: 0: spec.ports in body should have at least 1 items",
    ] {
        assert!(
            message.contains(expected),
            "missing {expected:?} in {message}"
        );
    }

    let status = refusal(
        &api,
        "port",
        serde_json::json!({"service": "web", "address": "10.0.0.1", "ports": [{"name": "http", "port": 70000}]}),
    )
    .await;
    assert!(
        status
            .message
            .contains("spec.ports[0].port: Invalid value: 70000: spec.ports[0].port in body should be less than or equal to 65535"),
        "{}",
        status.message
    );
}
