//! The apiserver refuses bad ServiceInstances with the messages a kubectl user reads:
//! `kubectl apply` prints `The ServiceInstance "x" is invalid:` and then these causes.

use kube::{
    Api,
    api::{ApiResource, DynamicObject, PostParams},
};
use roster::api::ServiceInstance;
use serde_json::{Value, json};

use crate::harness::{self, TestNamespace};

fn valid() -> Value {
    json!({"service": "web", "address": "10.0.0.1", "ports": [{"name": "http", "port": 80}]})
}

/// `valid()` with `field` set to `value` (or removed when `value` is null).
fn with(field: &str, value: Value) -> Value {
    let mut spec = valid();
    match value {
        Value::Null => {
            spec.as_object_mut().map(|o| o.remove(field));
        }
        v => spec[field] = v,
    }
    spec
}

/// Creates an instance with `spec`; returns the apiserver's message, or None if it was accepted.
/// Untyped, so that objects the Rust types could not even express reach the apiserver too.
async fn create(api: &Api<DynamicObject>, name: &str, spec: Value) -> Option<kube::core::Status> {
    let si: DynamicObject = match serde_json::from_value(json!({
        "apiVersion": "roster.dev/v1alpha1",
        "kind": "ServiceInstance",
        "metadata": {"name": name},
        "spec": spec,
    })) {
        Ok(si) => si,
        Err(e) => panic!("{name}: not even well-typed: {e}"),
    };
    match api.create(&PostParams::default(), &si).await {
        Err(kube::Error::Api(status)) => Some(*status),
        Err(e) => panic!("{name}: unexpected error {e}"),
        Ok(_) => None,
    }
}

#[tokio::test]
async fn invalid_instances_are_refused_with_clear_messages() {
    let client = harness::client().await;
    let ns = TestNamespace::new(&client, "validation").await;
    let api: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns.name,
        &ApiResource::erase::<ServiceInstance>(&()),
    );

    let long = "x".repeat(257);
    let many: serde_json::Map<String, Value> =
        (0..33).map(|i| (format!("k{i}"), json!("v"))).collect();
    // (name, spec, the cause a kubectl user reads)
    let cases = [
        (
            "svc-case",
            with("service", json!("Bad_Name")),
            r#"spec.service: Invalid value: "Bad_Name": service must be a DNS-1035 label"#,
        ),
        (
            "svc-digit",
            with("service", json!("1web")),
            r#"spec.service: Invalid value: "1web": service must be a DNS-1035 label"#,
        ),
        (
            "svc-long",
            with("service", json!("a".repeat(64))),
            "spec.service: Too long: may not be more than 63 bytes",
        ),
        (
            "addr-bad",
            with("address", json!("not an address!")),
            r#"spec.address: Invalid value: "not an address!": address must be an IPv4 or IPv6 address that is not link-local"#,
        ),
        (
            "addr-link-local",
            with("address", json!("fe80::1")),
            "address must be an IPv4 or IPv6 address that is not link-local",
        ),
        (
            "addr-unspecified",
            with("address", json!("0.0.0.0")),
            "address must be an IPv4 or IPv6 address that is not link-local",
        ),
        (
            "addr-single-label",
            with("address", json!("db")),
            "address must be an IPv4 or IPv6 address that is not link-local",
        ),
        (
            "addr-ip",
            with("address", json!("300.1.1.1")),
            "address must be an IPv4 or IPv6 address that is not link-local",
        ),
        (
            "no-ports",
            with("ports", json!([])),
            "spec.ports: Invalid value: 0: spec.ports in body should have at least 1 items",
        ),
        (
            "port-range",
            with("ports", json!([{"name": "http", "port": 70000}])),
            "spec.ports[0].port: Invalid value: 70000: spec.ports[0].port in body should be less than or equal to 65535",
        ),
        (
            "port-zero",
            with("ports", json!([{"name": "http", "port": 0}])),
            "spec.ports[0].port: Invalid value: 0: spec.ports[0].port in body should be greater than or equal to 1",
        ),
        (
            "port-dup",
            with(
                "ports",
                json!([{"name": "http", "port": 80}, {"name": "http", "port": 81}]),
            ),
            "spec.ports: Invalid value: port names must be unique",
        ),
        (
            "ttl-zero",
            with("ttlSeconds", json!(0)),
            "spec.ttlSeconds: Invalid value: 0: spec.ttlSeconds in body should be greater than or equal to 1",
        ),
        (
            "ttl-huge",
            with("ttlSeconds", json!(3601)),
            "spec.ttlSeconds: Invalid value: 3601: spec.ttlSeconds in body should be less than or equal to 3600",
        ),
        (
            "delete-short",
            json!({"service": "web", "address": "10.0.0.1", "ports": [{"name": "http", "port": 80}], "ttlSeconds": 30, "deleteAfterSeconds": 10}),
            "spec.deleteAfterSeconds: Invalid value: deleteAfterSeconds must be 0 (never delete) or at least ttlSeconds",
        ),
        (
            "meta-many",
            with("metadata", Value::Object(many)),
            "spec.metadata: Too many: 33: must have at most 32 items",
        ),
        (
            "meta-long",
            with("metadata", json!({"version": long})),
            "metadata values must be at most 256 characters",
        ),
        (
            "meta-key",
            with("metadata", json!({"bad key!": "v"})),
            "metadata keys must be 1-63 characters",
        ),
        (
            "weight",
            with("weight", json!(-1)),
            "spec.weight: Invalid value: -1: spec.weight in body should be greater than or equal to 0",
        ),
        (
            "no-address",
            with("address", Value::Null),
            "spec.address: Required value",
        ),
    ];
    let mut failures = Vec::new();
    for (name, spec, expected) in cases {
        match create(&api, name, spec).await {
            None => failures.push(format!("{name}: accepted")),
            Some(status) => {
                assert_eq!(status.code, 422, "{name}: {}", status.message);
                let prefix = format!(r#"ServiceInstance.roster.dev "{name}" is invalid: "#);
                if !status.message.starts_with(&prefix) || !status.message.contains(expected) {
                    failures.push(format!(
                        "{name}: expected {expected:?} in\n    {}",
                        status.message
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));

    // And good input is accepted, defaults filled in by the apiserver.
    for (name, spec) in [
        ("ipv4", valid()),
        ("ipv6", with("address", json!("fd00::1"))),
        ("fqdn", with("address", json!("db-1.example.internal"))),
        // Loopback is accepted (local development, tests) but never put in an EndpointSlice.
        ("loopback", with("address", json!("127.0.0.1"))),
        ("persistent", with("deleteAfterSeconds", json!(0))),
        // Without ttlSeconds the installation's default TTL applies, and the controller never
        // deletes before it.
        ("short-deletion", with("deleteAfterSeconds", json!(5))),
    ] {
        if let Some(status) = create(&api, name, spec).await {
            panic!("{name} refused: {}", status.message);
        }
    }
    let si = Api::<ServiceInstance>::namespaced(client, &ns.name)
        .get("ipv4")
        .await
        .expect("get");
    assert_eq!(
        (si.spec.weight, si.spec.ttl_seconds, si.spec.draining),
        (100, None, false)
    );
}
