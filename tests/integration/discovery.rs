//! The client library against the real apiserver and controller: instances registered with
//! `client::register` and discovered with `client::discovery`, from the EndpointSlices and from
//! the ConfigMap.

use std::time::Duration;

use futures::{Stream, StreamExt};
use roster::{
    api::InstancePort,
    client::{
        discovery::{Change, Discovery, Options, Source},
        pick::Strategy,
        register::{Registrar, Registration, Shutdown},
    },
};
use tokio_util::sync::CancellationToken;

use crate::harness::{self, ControllerProcess, TestNamespace};

const TIMEOUT: Duration = Duration::from_secs(30);

/// One registered instance, heartbeating in a task of this test.
struct Running {
    task: tokio::task::JoinHandle<roster::Result<()>>,
    stop: CancellationToken,
}

async fn register(ns: &str, name: &str, address: &str, weight: i32, zone: &str) -> Running {
    let registrar = Registrar::new(
        harness::client().await,
        Registration {
            namespace: ns.into(),
            name: name.into(),
            service: "api".into(),
            address: address.into(),
            ports: vec![InstancePort::tcp("http", 8080)],
            weight,
            zone: Some(zone.into()),
            metadata: Default::default(),
            ttl: Duration::from_secs(2),
            delete_after: Some(Duration::from_secs(4)),
            owner: None,
            identity: format!("test/{name}"),
        },
    )
    .expect("a valid registration");
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move {
        let end = Shutdown {
            drain: Duration::from_millis(500),
            grace: Duration::from_secs(5),
        };
        registrar.run(None, token, end).await
    });
    Running { task, stop }
}

/// The next `n` changes, as "+ name address" / "- name address" lines.
async fn next(changes: &mut (impl Stream<Item = Change> + Unpin), n: usize) -> Vec<String> {
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout(TIMEOUT, changes.next()).await {
            Ok(Some(change)) => got.push(change.to_string()),
            _ => panic!("{} changes within {TIMEOUT:?}; got {got:?}", n),
        }
    }
    got
}

#[tokio::test]
async fn discovery_sees_additions_and_removals_in_order_and_balances_over_them() {
    let client = harness::client().await;
    let ns = TestNamespace::new(&client, "discovery").await;
    let _controller = ControllerProcess::start(&harness::kubeconfig().await, &ns.name);
    let options = |source, strategy, zone: Option<&str>| Options {
        source,
        strategy,
        zone: zone.map(Into::into),
        // A fixed seed: the chi-square test below is then deterministic.
        seed: Some(7),
    };
    let slices = Discovery::start(
        client.clone(),
        &ns.name,
        "api",
        options(Source::EndpointSlices, Strategy::RoundRobin, Some("z2")),
    )
    .await
    .expect("discovery from EndpointSlices");
    assert!(slices.endpoints().is_empty());
    assert!(slices.pick().is_none());
    let mut from_slices = Box::pin(slices.changes());

    let a = register(&ns.name, "a", "10.2.0.1", 100, "z1").await;
    assert_eq!(next(&mut from_slices, 1).await, ["+ a 10.2.0.1"]);
    let b = register(&ns.name, "b", "10.2.0.2", 300, "z2").await;
    assert_eq!(next(&mut from_slices, 1).await, ["+ b 10.2.0.2"]);

    // Zone preference: from z2, only b while b is ready.
    for _ in 0..4 {
        assert_eq!(slices.pick().map(|p| p.name.clone()).as_deref(), Some("b"));
    }
    // The ConfigMap carries weights; a late subscriber first gets what is there now.
    let config = Discovery::start(
        client.clone(),
        &ns.name,
        "api",
        options(Source::ConfigMap, Strategy::WeightedRandom, None),
    )
    .await
    .expect("discovery from the ConfigMap");
    let mut from_config = Box::pin(config.changes());
    let mut now = next(&mut from_config, 2).await;
    now.sort();
    assert_eq!(now, ["+ a 10.2.0.1", "+ b 10.2.0.2"]);
    let weights: Vec<(String, u32)> = config
        .endpoints()
        .into_iter()
        .map(|e| (e.name, e.weight))
        .collect();
    assert_eq!(weights, [("a".into(), 100), ("b".into(), 300)]);
    // 300 : 100 over 4000 picks; chi-square with 1 degree of freedom below 10.83 (p = 0.001).
    let picks_of_b = (0..4000)
        .filter(|_| config.pick().is_some_and(|p| p.name == "b"))
        .count() as f64;
    let (eb, ea) = (3000.0, 1000.0);
    let chi2 = (picks_of_b - eb).powi(2) / eb + ((4000.0 - picks_of_b) - ea).powi(2) / ea;
    assert!(
        chi2 < 10.83,
        "b picked {picks_of_b} of 4000 (chi-square {chi2:.1})"
    );

    // a falls silent (its agent dies): removed once Unhealthy. b deregisters: removed as it
    // starts draining.
    a.task.abort();
    assert_eq!(next(&mut from_slices, 1).await, ["- a 10.2.0.1"]);
    assert_eq!(next(&mut from_config, 1).await, ["- a 10.2.0.1"]);
    b.stop.cancel();
    assert_eq!(next(&mut from_slices, 1).await, ["- b 10.2.0.2"]);
    assert_eq!(next(&mut from_config, 1).await, ["- b 10.2.0.2"]);
    assert!(
        tokio::time::timeout(TIMEOUT, b.task)
            .await
            .is_ok_and(|r| r.is_ok_and(|r| r.is_ok())),
        "b deregistered within its grace period"
    );
    assert!(slices.pick().is_none());
    assert!(config.endpoints().is_empty());
}
