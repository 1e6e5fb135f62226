//! Active health checks against real HTTP, TCP and gRPC servers on loopback.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU16, Ordering},
    },
    time::Duration,
};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use roster::api::{InstancePort, Phase, ServiceInstance, ServiceInstanceSpec};
use serde_json::json;
use tokio::net::TcpListener;
use tonic_health::ServingStatus;

use crate::harness::{self, ControllerProcess, TestNamespace, wait_for};

const TIMEOUT: Duration = Duration::from_secs(30);

/// An instance on 127.0.0.1 that heartbeated at registration (TTL an hour), with a check.
fn instance(name: &str, port: u16, check: serde_json::Value) -> ServiceInstance {
    let mut spec = ServiceInstanceSpec::new(
        "checked",
        "127.0.0.1",
        vec![InstancePort::tcp("app", i32::from(port))],
    );
    spec.ttl_seconds = Some(3600);
    spec.delete_after_seconds = Some(0);
    if !check.is_null() {
        spec.health_check = Some(serde_json::from_value(check).expect("health check"));
    }
    let mut si = ServiceInstance::new(name, spec);
    si.metadata.annotations = Some(BTreeMap::from([(
        "roster.dev/heartbeat".to_string(),
        jiff::Timestamp::now().to_string(),
    )]));
    si
}

fn condition(si: &ServiceInstance, type_: &str) -> Option<(String, String)> {
    si.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

/// Waits until the instance is in `phase` with its HealthCheck condition as given.
async fn await_check(
    api: &Api<ServiceInstance>,
    name: &str,
    phase: Phase,
    check: (&str, &str),
) -> ServiceInstance {
    let want = Some((check.0.to_string(), check.1.to_string()));
    wait_for(
        api,
        name,
        &format!("{phase:?} with HealthCheck {check:?}"),
        TIMEOUT,
        move |si: Option<&ServiceInstance>| {
            si.is_some_and(|si| {
                si.status.as_ref().and_then(|s| s.phase) == Some(phase)
                    && condition(si, "HealthCheck") == want
            })
        },
    )
    .await
}

/// An HTTP server: `/status` answers the code in `code`; `/fail` answers 500; `/hang` never answers.
async fn http_server(code: Arc<AtomicU16>) -> u16 {
    let app = Router::new()
        .route(
            "/status",
            get(|State(code): State<Arc<AtomicU16>>| async move {
                StatusCode::from_u16(code.load(Ordering::Relaxed))
                    .unwrap_or(StatusCode::IM_A_TEAPOT)
            }),
        )
        .route("/fail", get(|| async { StatusCode::INTERNAL_SERVER_ERROR }))
        .route("/hang", get(std::future::pending::<StatusCode>))
        .with_state(code);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

#[tokio::test]
async fn http_checks_follow_thresholds_and_name_the_failure() {
    let client = harness::client().await;
    let ns = TestNamespace::new(&client, "http-check").await;
    let api: Api<ServiceInstance> = Api::namespaced(client.clone(), &ns.name);
    let _controller = ControllerProcess::start(&harness::kubeconfig().await, &ns.name);
    let code = Arc::new(AtomicU16::new(200));
    let port = http_server(code.clone()).await;
    let check = |path: &str| {
        json!({"http": {"path": path, "port": "app"}, "periodSeconds": 1, "timeoutSeconds": 1,
               "successThreshold": 2, "failureThreshold": 2})
    };

    api.create(
        &PostParams::default(),
        &instance("toggle", port, check("/status")),
    )
    .await
    .expect("create");
    api.create(
        &PostParams::default(),
        &instance("fails", port, check("/fail")),
    )
    .await
    .expect("create");
    api.create(
        &PostParams::default(),
        &instance("hangs", port, check("/hang")),
    )
    .await
    .expect("create");
    api.create(
        &PostParams::default(),
        &instance("plain", port, serde_json::Value::Null),
    )
    .await
    .expect("create");

    let si = await_check(&api, "toggle", Phase::Ready, ("True", "Passing")).await;
    assert_eq!(
        condition(&si, "Ready"),
        Some(("True".into(), "Heartbeating".into()))
    );
    // A server that answers 500, and one that hangs past the timeout: named as such.
    let si = await_check(&api, "fails", Phase::Unhealthy, ("False", "HTTPStatus500")).await;
    assert_eq!(
        condition(&si, "Ready"),
        Some(("False".into(), "HealthCheckFailing".into()))
    );
    assert_eq!(
        condition(&si, "Heartbeating"),
        Some(("True".into(), "HeartbeatObserved".into()))
    );
    await_check(&api, "hangs", Phase::Unhealthy, ("False", "Timeout")).await;
    // An instance without a check is unaffected.
    let plain = wait_for(
        &api,
        "plain",
        "Ready",
        TIMEOUT,
        |si: Option<&ServiceInstance>| {
            si.and_then(|si| si.status.as_ref()).and_then(|s| s.phase) == Some(Phase::Ready)
        },
    )
    .await;
    assert_eq!(condition(&plain, "HealthCheck"), None);

    // 503 for long enough to cross the failure threshold (2 checks 1 s apart), then back.
    code.store(503, Ordering::Relaxed);
    await_check(&api, "toggle", Phase::Unhealthy, ("False", "HTTPStatus503")).await;
    code.store(200, Ordering::Relaxed);
    await_check(&api, "toggle", Phase::Ready, ("True", "Passing")).await;
}

#[tokio::test]
async fn tcp_check_sees_a_server_go_down_and_come_back() {
    let client = harness::client().await;
    let ns = TestNamespace::new(&client, "tcp-check").await;
    let api: Api<ServiceInstance> = Api::namespaced(client.clone(), &ns.name);
    let _controller = ControllerProcess::start(&harness::kubeconfig().await, &ns.name);

    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let accept = |listener: TcpListener| {
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                drop(conn);
            }
        })
    };
    let server = accept(listener);
    let check =
        json!({"tcp": {"port": i32::from(port)}, "periodSeconds": 1, "failureThreshold": 1});
    api.create(&PostParams::default(), &instance("tcp", port, check))
        .await
        .expect("create");
    await_check(&api, "tcp", Phase::Ready, ("True", "Passing")).await;

    server.abort();
    let _ = server.await; // the listener is dropped with the task: the port refuses
    await_check(
        &api,
        "tcp",
        Phase::Unhealthy,
        ("False", "ConnectionRefused"),
    )
    .await;

    let _server = accept(
        TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind again"),
    );
    await_check(&api, "tcp", Phase::Ready, ("True", "Passing")).await;
}

#[tokio::test]
async fn grpc_check_uses_the_standard_health_protocol() {
    let client = harness::client().await;
    let ns = TestNamespace::new(&client, "grpc-check").await;
    let api: Api<ServiceInstance> = Api::namespaced(client.clone(), &ns.name);
    let _controller = ControllerProcess::start(&harness::kubeconfig().await, &ns.name);

    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("shop.Checkout", ServingStatus::NotServing)
        .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let check = json!({"grpc": {"port": "app", "service": "shop.Checkout"}, "periodSeconds": 1, "failureThreshold": 1});
    api.create(&PostParams::default(), &instance("grpc", port, check))
        .await
        .expect("create");
    let si = await_check(&api, "grpc", Phase::Unhealthy, ("False", "NotServing")).await;
    assert_eq!(
        condition(&si, "Ready"),
        Some(("False".into(), "HealthCheckFailing".into()))
    );

    reporter
        .set_service_status("shop.Checkout", ServingStatus::Serving)
        .await;
    await_check(&api, "grpc", Phase::Ready, ("True", "Passing")).await;

    // Removing the check leaves a heartbeat-only instance.
    api.patch(
        "grpc",
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"healthCheck": null}})),
    )
    .await
    .expect("remove the check");
    wait_for(
        &api,
        "grpc",
        "no HealthCheck condition",
        TIMEOUT,
        |si: Option<&ServiceInstance>| si.is_some_and(|si| condition(si, "HealthCheck").is_none()),
    )
    .await;
}
