//! The projection against the real apiserver: Service, EndpointSlices and ConfigMap follow the
//! registry; a user's Service is left alone; kube-controller-manager's EndpointSlice and
//! mirroring controllers (running in the harness's control plane) do not fight Roster.

use std::{collections::BTreeMap, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{ConfigMap, Endpoints, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use roster::api::{InstancePort, Phase, ServiceInstance, ServiceInstanceSpec};
use serde_json::json;

use crate::harness::{
    self, ControllerProcess, TestNamespace, await_event, http_get, wait_deleted, wait_for,
};

const TIMEOUT: Duration = Duration::from_secs(30);

fn instance(service: &str, name: &str, address: &str) -> ServiceInstance {
    let mut spec =
        ServiceInstanceSpec::new(service, address, vec![InstancePort::tcp("http", 8080)]);
    // One heartbeat keeps it Ready for the whole test, however long a loaded machine takes.
    spec.ttl_seconds = Some(3600);
    spec.delete_after_seconds = Some(0);
    let mut si = ServiceInstance::new(name, spec);
    // Registered with a heartbeat: Ready at once.
    si.metadata.annotations = Some(BTreeMap::from([(
        "roster.dev/heartbeat".to_string(),
        jiff::Timestamp::now().to_string(),
    )]));
    si
}

/// (ready, serving, terminating) of the endpoint for `name` across the service's slices.
fn endpoint(slices: &[EndpointSlice], name: &str) -> Option<(bool, bool, bool)> {
    slices.iter().flat_map(|s| &s.endpoints).find_map(|e| {
        (e.target_ref.as_ref()?.name.as_deref() == Some(name)).then(|| {
            let c = e.conditions.clone().unwrap_or_default();
            (
                c.ready.unwrap_or(false),
                c.serving.unwrap_or(false),
                c.terminating.unwrap_or(false),
            )
        })
    })
}

async fn slices_of(client: &Client, ns: &str, service: &str) -> Vec<EndpointSlice> {
    Api::<EndpointSlice>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={service}")))
        .await
        .expect("list slices")
        .items
}

/// Waits until the service's slices satisfy `done`, watching them.
async fn await_slices(
    client: &Client,
    ns: &str,
    service: &str,
    what: &str,
    done: impl Fn(&[EndpointSlice]) -> bool,
) -> Vec<EndpointSlice> {
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    let config =
        watcher::Config::default().labels(&format!("kubernetes.io/service-name={service}"));
    let (reader, writer) = kube::runtime::reflector::store();
    let wait = async {
        let mut events = std::pin::pin!(watcher(api, config).reflect(writer));
        let mut synced = false;
        while let Some(event) = events.next().await {
            synced |= matches!(event, Ok(watcher::Event::InitDone));
            if synced {
                let state: Vec<EndpointSlice> =
                    reader.state().iter().map(|s| (**s).clone()).collect();
                if done(&state) {
                    return state;
                }
            }
        }
        panic!("the slice watch ended");
    };
    match tokio::time::timeout(TIMEOUT, wait).await {
        Ok(slices) => slices,
        Err(_) => panic!(
            "timed out waiting for slices: {what}; last: {:#?}",
            slices_of(client, ns, service).await
        ),
    }
}

/// Creates `n` instances made by `make`, 16 requests at a time.
async fn create_many(
    api: &Api<ServiceInstance>,
    n: usize,
    make: impl Fn(usize) -> ServiceInstance,
) {
    futures::stream::iter((0..n).map(make))
        .map(|si| async move {
            api.create(&PostParams::default(), &si)
                .await
                .expect("create")
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
}

/// Waits until the instance carries `Projected=False` with this reason.
async fn await_projected(api: &Api<ServiceInstance>, name: &str, reason: &str) -> ServiceInstance {
    let what = format!("the {reason} condition");
    let reason = reason.to_string();
    wait_for(
        api,
        name,
        &what,
        TIMEOUT,
        move |si: Option<&ServiceInstance>| {
            si.and_then(|si| si.status.as_ref()).is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Projected" && c.reason == reason)
            })
        },
    )
    .await
}

/// How many endpoints across the slices are ready.
fn ready_endpoints(slices: &[EndpointSlice]) -> usize {
    slices
        .iter()
        .flat_map(|s| &s.endpoints)
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        .count()
}

fn config_json(cm: &ConfigMap) -> serde_json::Value {
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get("instances.json"))
        .cloned()
        .unwrap_or_default();
    serde_json::from_str(&text).unwrap_or_default()
}

#[tokio::test]
async fn instances_are_projected_into_service_slices_and_config_map() {
    let client = harness::client().await;
    let ns = TestNamespace::new(&client, "project").await;
    let api: Api<ServiceInstance> = Api::namespaced(client.clone(), &ns.name);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    let _controller = ControllerProcess::start(&harness::kubeconfig().await, &ns.name);

    // Register: ready in the slice and in the ConfigMap, behind a selectorless ClusterIP Service.
    let mut a = instance("shop", "a", "10.1.0.1");
    a.spec.zone = Some("zone-a".into());
    a.spec.metadata.insert("version".into(), "1.2.3".into());
    api.create(&PostParams::default(), &a)
        .await
        .expect("create a");
    api.create(&PostParams::default(), &instance("shop", "b", "10.1.0.2"))
        .await
        .expect("create b");
    let slices = await_slices(&client, &ns.name, "shop", "a and b ready", |s| {
        endpoint(s, "a") == Some((true, true, false))
            && endpoint(s, "b") == Some((true, true, false))
    })
    .await;
    assert_eq!(slices.len(), 1);
    let slice = &slices[0];
    assert_eq!(slice.address_type, "IPv4");
    assert_eq!(
        slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("endpointslice.kubernetes.io/managed-by"))
            .map(String::as_str),
        Some("roster.dev")
    );
    let zone = slice
        .endpoints
        .iter()
        .find(|e| e.addresses == ["10.1.0.1"])
        .and_then(|e| e.zone.clone());
    assert_eq!(zone.as_deref(), Some("zone-a"));
    let svc = services.get("shop").await.expect("Service");
    let spec = svc.spec.clone().unwrap_or_default();
    assert!(spec.selector.is_none(), "selectorless");
    assert!(spec.cluster_ip.is_some_and(|ip| ip != "None"), "ClusterIP");
    assert_eq!(
        spec.ports
            .unwrap_or_default()
            .first()
            .map(|p| (p.name.clone(), p.port)),
        Some((Some("http".into()), 8080))
    );
    let cm = wait_for(
        &cms,
        "shop-roster",
        "the ConfigMap with a and b",
        TIMEOUT,
        |cm: Option<&ConfigMap>| {
            cm.is_some_and(|cm| {
                config_json(cm)["instances"]
                    .as_array()
                    .is_some_and(|i| i.len() == 2)
            })
        },
    )
    .await;
    let view = config_json(&cm);
    assert_eq!(view["instances"][0]["name"], "a");
    assert_eq!(view["instances"][0]["metadata"]["version"], "1.2.3");
    assert_eq!(view["instances"][0]["weight"], 100);
    assert_eq!(view["instances"][0]["ready"], true);

    // Draining: serving and terminating, not ready.
    api.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"draining": true}})),
    )
    .await
    .expect("drain");
    await_slices(&client, &ns.name, "shop", "a draining", |s| {
        endpoint(s, "a") == Some((false, true, true))
    })
    .await;

    // Unhealthy: not ready (b stops heartbeating: TTL 1 s).
    api.patch(
        "b",
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"ttlSeconds": 1}})),
    )
    .await
    .expect("short ttl");
    await_slices(&client, &ns.name, "shop", "b unhealthy", |s| {
        endpoint(s, "b") == Some((false, false, false))
    })
    .await;
    let cm = wait_for(
        &cms,
        "shop-roster",
        "b not ready in the ConfigMap",
        TIMEOUT,
        |cm: Option<&ConfigMap>| {
            cm.is_some_and(|cm| config_json(cm)["instances"][1]["ready"] == false)
        },
    )
    .await;
    assert_eq!(config_json(&cm)["instances"][1]["serving"], false);

    // Deletion: the endpoint goes; with the last instance, everything goes.
    api.delete("b", &DeleteParams::default())
        .await
        .expect("delete b");
    await_slices(&client, &ns.name, "shop", "b gone", |s| {
        endpoint(s, "b").is_none() && endpoint(s, "a").is_some()
    })
    .await;
    let svc_uid = svc.metadata.uid.clone().unwrap_or_default();
    let cm_uid = cm.metadata.uid.clone().unwrap_or_default();
    api.delete("a", &DeleteParams::default())
        .await
        .expect("delete a");
    wait_deleted(&services, "shop", &svc_uid, TIMEOUT).await;
    wait_deleted(&cms, "shop-roster", &cm_uid, TIMEOUT).await;
    await_slices(
        &client,
        &ns.name,
        "shop",
        "no slices",
        <[EndpointSlice]>::is_empty,
    )
    .await;
}

#[tokio::test]
async fn two_hundred_fifty_instances_make_three_slices_and_one_change_writes_one() {
    let _heavy = harness::heavy().await;
    let client = harness::client().await;
    let ns = TestNamespace::new(&client, "slices").await;
    let api: Api<ServiceInstance> = Api::namespaced(client.clone(), &ns.name);
    let controller = ControllerProcess::start(&harness::kubeconfig().await, &ns.name);
    let addr = controller.http_addr(TIMEOUT).await;

    create_many(&api, 250, |i| {
        instance(
            "big",
            &format!("i{i:03}"),
            &format!("10.2.{}.{}", i / 200, i % 200 + 1),
        )
    })
    .await;
    let slices = await_slices(&client, &ns.name, "big", "250 ready endpoints", |s| {
        ready_endpoints(s) == 250
    })
    .await;
    let mut sizes: Vec<usize> = slices.iter().map(|s| s.endpoints.len()).collect();
    sizes.sort();
    assert_eq!(sizes, vec![50, 100, 100]);

    // The ConfigMap is written after the slices in the same projection: once it shows all
    // 250, every slice write of that projection has been counted.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let all_ready = |cm: Option<&ConfigMap>| {
        cm.is_some_and(|cm| {
            let view = config_json(cm);
            let instances = view["instances"].as_array().cloned().unwrap_or_default();
            instances.len() == 250 && instances.iter().all(|i| i["ready"] == true)
        })
    };
    wait_for(
        &cms,
        "big-roster",
        "250 ready in the ConfigMap",
        TIMEOUT,
        all_ready,
    )
    .await;

    // One instance starts draining: exactly one slice is rewritten.
    let writes = slice_writes(&addr).await;
    let versions: BTreeMap<String, String> = slices
        .iter()
        .map(|s| {
            (
                s.metadata.name.clone().unwrap_or_default(),
                s.metadata.resource_version.clone().unwrap_or_default(),
            )
        })
        .collect();
    api.patch(
        "i123",
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"draining": true}})),
    )
    .await
    .expect("drain");
    let after = await_slices(&client, &ns.name, "big", "i123 draining", |s| {
        endpoint(s, "i123") == Some((false, true, true))
    })
    .await;
    let changed: Vec<String> = after
        .iter()
        .filter(|s| {
            versions.get(s.metadata.name.as_deref().unwrap_or_default())
                != s.metadata.resource_version.as_ref()
        })
        .filter_map(|s| s.metadata.name.clone())
        .collect();
    assert_eq!(changed.len(), 1, "slices rewritten: {changed:?}");
    // And the projector wrote one slice for it: counted by the time the ConfigMap shows it.
    wait_for(
        &cms,
        "big-roster",
        "i123 draining in the ConfigMap",
        TIMEOUT,
        |cm: Option<&ConfigMap>| {
            cm.is_some_and(|cm| {
                let view = config_json(cm);
                view["instances"][123]["name"] == "i123" && view["instances"][123]["ready"] == false
            })
        },
    )
    .await;
    assert_eq!(slice_writes(&addr).await, writes + 1.0);
}

async fn slice_writes(addr: &str) -> f64 {
    projection_writes(addr, "EndpointSlice").await
}

/// `roster_projection_writes_total` of one kind; a kind that was never written is missing from
/// the metrics, and that fails the test.
async fn projection_writes(addr: &str, kind: &str) -> f64 {
    let (_, body) = http_get(addr, "/metrics").await;
    let prefix = format!("roster_projection_writes_total{{kind=\"{kind}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {prefix}in the metrics:\n{body}"))
}

#[tokio::test]
async fn a_users_service_is_left_alone_and_the_conflict_is_reported() {
    let client = harness::client().await;
    let ns = TestNamespace::new(&client, "conflict").await;
    let api: Api<ServiceInstance> = Api::namespaced(client.clone(), &ns.name);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    let _controller = ControllerProcess::start(&harness::kubeconfig().await, &ns.name);

    let theirs: Service = serde_json::from_value(json!({
        "metadata": {"name": "payments"},
        "spec": {"selector": {"app": "payments"}, "ports": [{"name": "web", "port": 80}]},
    }))
    .expect("service");
    let theirs = services
        .create(&PostParams::default(), &theirs)
        .await
        .expect("create Service");
    api.create(
        &PostParams::default(),
        &instance("payments", "p1", "10.3.0.1"),
    )
    .await
    .expect("create");
    await_projected(&api, "p1", "ServiceConflict").await;
    // The liveness status and the projector's condition stand side by side (two field
    // managers; the projection no longer waits for the status write, so either may land
    // first), and neither write removes the other's.
    let si = harness::await_phase(&api, "p1", Phase::Ready, TIMEOUT).await;
    assert!(
        si.status
            .iter()
            .flat_map(|s| &s.conditions)
            .any(|c| c.type_ == "Projected" && c.reason == "ServiceConflict"),
        "the status write removed the Projected condition"
    );
    await_event(&client, &ns.name, "p1", "ServiceConflict", TIMEOUT).await;
    // The ConfigMap is still written (it is Roster's own), but the Service and slices are not.
    wait_for(
        &Api::<ConfigMap>::namespaced(client.clone(), &ns.name),
        "payments-roster",
        "the ConfigMap",
        TIMEOUT,
        |cm: Option<&ConfigMap>| cm.is_some(),
    )
    .await;
    let now = services.get("payments").await.expect("get");
    assert_eq!(
        now.metadata.resource_version, theirs.metadata.resource_version,
        "the user's Service was modified"
    );
    assert!(
        slices_of(&client, &ns.name, "payments")
            .await
            .iter()
            .all(|s| s
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("endpointslice.kubernetes.io/managed-by"))
                .map(String::as_str)
                != Some("roster.dev")),
        "Roster wrote slices for a Service it does not own"
    );

    // Opting in hands it over; the condition clears.
    services
        .patch(
            "payments",
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"annotations": {"roster.dev/adopt": "true"}}})),
        )
        .await
        .expect("opt in");
    await_slices(&client, &ns.name, "payments", "p1 projected", |s| {
        endpoint(s, "p1") == Some((true, true, false))
    })
    .await;
    let adopted = services.get("payments").await.expect("get");
    let selector = adopted.spec.and_then(|s| s.selector).unwrap_or_default();
    assert!(
        selector.is_empty(),
        "the adopted Service kept its selector: {selector:?}"
    );
    wait_for(
        &api,
        "p1",
        "the condition cleared",
        TIMEOUT,
        |si: Option<&ServiceInstance>| {
            si.and_then(|si| si.status.as_ref())
                .is_some_and(|s| !s.conditions.iter().any(|c| c.type_ == "Projected"))
        },
    )
    .await;
}

/// A Service created for adoption before its first instance registers (as the benchmark's
/// are) is the user's until then: Roster does not delete it for having no instances, and the
/// first instance is projected into it.
#[tokio::test]
async fn a_service_adopted_before_its_first_instance_is_kept_and_used() {
    let client = harness::client().await;
    let ns = TestNamespace::new(&client, "adoptearly").await;
    let api: Api<ServiceInstance> = Api::namespaced(client.clone(), &ns.name);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    let _controller = ControllerProcess::start(&harness::kubeconfig().await, &ns.name);
    // The projector runs (a term has started) before the Service appears.
    api.create(&PostParams::default(), &instance("other", "o1", "10.3.1.1"))
        .await
        .expect("create");
    await_slices(&client, &ns.name, "other", "o1 projected", |s| {
        endpoint(s, "o1") == Some((true, true, false))
    })
    .await;
    let early: Service = serde_json::from_value(json!({
        "metadata": {"name": "early", "annotations": {"roster.dev/adopt": "true"}},
        "spec": {"ports": [{"name": "http", "port": 8080}]},
    }))
    .expect("service");
    let early = services
        .create(&PostParams::default(), &early)
        .await
        .expect("create Service");
    // Another instance, projected after the projector has been woken by the early Service.
    api.create(&PostParams::default(), &instance("other", "o2", "10.3.1.3"))
        .await
        .expect("create");
    await_slices(&client, &ns.name, "other", "o2 projected", |s| {
        endpoint(s, "o2") == Some((true, true, false))
    })
    .await;
    api.create(&PostParams::default(), &instance("early", "e1", "10.3.1.2"))
        .await
        .expect("create");
    await_slices(&client, &ns.name, "early", "e1 projected", |s| {
        endpoint(s, "e1") == Some((true, true, false))
    })
    .await;
    let now = services.get("early").await.expect("the adopted Service");
    assert_eq!(
        now.metadata.uid, early.metadata.uid,
        "the adopted Service was deleted (and created again) before its first instance came"
    );
}

#[tokio::test]
async fn kube_controller_managers_slice_controllers_do_not_fight_roster() {
    let client = harness::client().await;
    let ns = TestNamespace::new(&client, "nofight").await;
    let api: Api<ServiceInstance> = Api::namespaced(client.clone(), &ns.name);
    let _controller = ControllerProcess::start(&harness::kubeconfig().await, &ns.name);
    for i in 0..3 {
        api.create(
            &PostParams::default(),
            &instance("calm", &format!("c{i}"), &format!("10.4.0.{}", i + 1)),
        )
        .await
        .expect("create");
    }
    let slices = await_slices(&client, &ns.name, "calm", "3 ready", |s| {
        (0..3).all(|i| endpoint(s, &format!("c{i}")) == Some((true, true, false)))
    })
    .await;
    assert_eq!(slices.len(), 1);
    let ours = slices[0].metadata.name.clone().unwrap_or_default();
    let version = slices[0].metadata.resource_version.clone();

    // Give kube-controller-manager's mirroring controller work on Roster's selectorless Service:
    // an Endpoints object of the same name, which it mirrors into a slice of its own.
    let endpoints: k8s_openapi::api::core::v1::Endpoints = serde_json::from_value(json!({
        "metadata": {"name": "calm"},
        "subsets": [{"addresses": [{"ip": "10.4.9.9"}], "ports": [{"name": "http", "port": 8080}]}],
    }))
    .expect("endpoints");
    Api::<k8s_openapi::api::core::v1::Endpoints>::namespaced(client.clone(), &ns.name)
        .create(&PostParams::default(), &endpoints)
        .await
        .expect("create Endpoints");
    let mirrored = |s: &EndpointSlice| {
        s.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("endpointslice.kubernetes.io/managed-by"))
            .is_some_and(|m| m.starts_with("endpointslicemirroring"))
    };
    await_slices(&client, &ns.name, "calm", "the mirrored slice", |s| {
        s.iter().any(mirrored)
    })
    .await;

    // For five seconds, nobody touches Roster's slice, and Roster leaves the mirrored one be.
    let watch = watcher(
        Api::<EndpointSlice>::namespaced(client.clone(), &ns.name),
        watcher::Config::default().labels("kubernetes.io/service-name=calm"),
    );
    let fight = async {
        let mut watch = std::pin::pin!(watch);
        while let Some(event) = watch.next().await {
            match event {
                Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s))
                    if s.metadata.name.as_deref() == Some(ours.as_str())
                        && s.metadata.resource_version != version =>
                {
                    return format!("Roster's slice was rewritten: {s:#?}");
                }
                Ok(watcher::Event::Delete(s)) => return format!("a slice was deleted: {s:#?}"),
                Ok(_) => {}
                Err(e) => return format!("the watch failed: {e}"),
            }
        }
        "the watch ended".to_string()
    };
    if let Ok(problem) = tokio::time::timeout(Duration::from_secs(5), fight).await {
        panic!("{problem}");
    }
}

#[tokio::test]
async fn a_service_too_big_for_a_config_map_says_so_and_keeps_its_slices() {
    let _heavy = harness::heavy().await;
    let client = harness::client().await;
    let ns = TestNamespace::new(&client, "toobig").await;
    let api: Api<ServiceInstance> = Api::namespaced(client.clone(), &ns.name);
    let controller = ControllerProcess::start(&harness::kubeconfig().await, &ns.name);
    let addr = controller.http_addr(TIMEOUT).await;

    // 32 metadata values of 256 characters: ~8.5 kB of JSON per instance; 130 of them pass 1 MB.
    let metadata: BTreeMap<String, String> = (0..32)
        .map(|i| (format!("k{i:02}"), "v".repeat(256)))
        .collect();
    create_many(&api, 130, |i| {
        let mut si = instance("huge", &format!("h{i:03}"), &format!("10.5.0.{}", i + 1));
        si.spec.metadata = metadata.clone();
        si
    })
    .await;

    // The slices stay correct...
    await_slices(&client, &ns.name, "huge", "130 ready endpoints", |s| {
        ready_endpoints(s) == 130
    })
    .await;
    // ...and the instances, an Event and a metric say why the ConfigMap is not written.
    let si = await_projected(&api, "h000", "ConfigMapTooLarge").await;
    let message = si
        .status
        .iter()
        .flat_map(|s| &s.conditions)
        .find(|c| c.type_ == "Projected")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(message.contains("over the 1000000-byte limit"), "{message}");
    let (_, metrics) = http_get(&addr, "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "roster_config_maps_too_large 1"),
        "{metrics}"
    );
    await_event(&client, &ns.name, "h000", "ConfigMapTooLarge", TIMEOUT).await;
}

/// Routing does not wait for the status write: with every status write of the namespace refused
/// (a ValidatingAdmissionPolicy on `serviceinstances/status`), a registered instance is still
/// routed from the judge's verdict in the registry index; once writes are allowed again, its
/// next reconcile decides the refused status again and writes it.
#[tokio::test]
async fn routing_does_not_wait_for_the_status_write() {
    use k8s_openapi::api::admissionregistration::v1::{
        ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
    };
    let client = harness::client().await;
    let ns = TestNamespace::new(&client, "held").await;
    let api: Api<ServiceInstance> = Api::namespaced(client.clone(), &ns.name);
    let name = format!("roster-test-hold-status-{}", ns.name);
    let policies: Api<ValidatingAdmissionPolicy> = Api::all(client.clone());
    let bindings: Api<ValidatingAdmissionPolicyBinding> = Api::all(client.clone());
    let policy: ValidatingAdmissionPolicy = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{
                "apiGroups": ["roster.dev"], "apiVersions": ["*"],
                "operations": ["CREATE", "UPDATE"], "resources": ["serviceinstances/status"],
            }]},
            "validations": [{"expression": "false", "message": "status writes held back by the test"}],
        },
    }))
    .expect("policy");
    policies
        .create(&PostParams::default(), &policy)
        .await
        .expect("create policy");
    let binding: ValidatingAdmissionPolicyBinding = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "policyName": name,
            "validationActions": ["Deny"],
            "matchResources": {"namespaceSelector": {"matchLabels": {
                "kubernetes.io/metadata.name": ns.name,
            }}},
        },
    }))
    .expect("binding");
    bindings
        .create(&PostParams::default(), &binding)
        .await
        .expect("create binding");
    // The policy takes effect once the apiserver has loaded it: probe with a status write of
    // our own until it is refused (and, later, accepted again).
    let probe = |name: &'static str| {
        let api = api.clone();
        async move {
            api.create(&PostParams::default(), &instance("probe", name, "10.9.0.9"))
                .await
                .expect("create probe");
            name.to_string()
        }
    };
    let status_writes_refused = |probe: String, refused: bool| {
        let api = api.clone();
        async move {
            let patch = json!({"status": {"phase": "Pending"}});
            let attempt = async {
                let mut retry = tokio::time::interval(Duration::from_millis(200));
                loop {
                    retry.tick().await;
                    let result = api
                        .patch_status(&probe, &PatchParams::default(), &Patch::Merge(&patch))
                        .await;
                    if result.is_err() == refused {
                        return;
                    }
                }
            };
            tokio::time::timeout(TIMEOUT, attempt)
                .await
                .unwrap_or_else(|_| panic!("status writes never became refused={refused}"));
        }
    };
    let before = probe("probe-before").await;
    status_writes_refused(before.clone(), true).await;
    api.delete(&before, &DeleteParams::default())
        .await
        .expect("delete probe");

    let _controller = ControllerProcess::start(&harness::kubeconfig().await, &ns.name);
    api.create(&PostParams::default(), &instance("held", "a", "10.9.0.1"))
        .await
        .expect("create a");
    await_slices(&client, &ns.name, "held", "a ready", |s| {
        endpoint(s, "a") == Some((true, true, false))
    })
    .await;
    let a = api.get("a").await.expect("get a");
    assert_eq!(harness::phase(Some(&a)), None, "a status write got through");

    bindings
        .delete(&name, &DeleteParams::default())
        .await
        .expect("delete binding");
    let after = probe("probe-after").await;
    status_writes_refused(after, false).await;
    // A heartbeat brings a reconcile, which decides the refused status again.
    api.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(&json!({"metadata": {"annotations": {
            "roster.dev/heartbeat": jiff::Timestamp::now().to_string(),
        }}})),
    )
    .await
    .expect("heartbeat");
    harness::await_phase(&api, "a", Phase::Ready, TIMEOUT).await;
    policies
        .delete(&name, &DeleteParams::default())
        .await
        .expect("delete policy");
}

/// (ready, not ready) addresses of an Endpoints object, each sorted.
fn endpoints_addresses(e: &Endpoints) -> (Vec<String>, Vec<String>) {
    let mut ready = Vec::new();
    let mut not_ready = Vec::new();
    for subset in e.subsets.iter().flatten() {
        ready.extend(subset.addresses.iter().flatten().map(|a| a.ip.clone()));
        not_ready.extend(
            subset
                .not_ready_addresses
                .iter()
                .flatten()
                .map(|a| a.ip.clone()),
        );
    }
    ready.sort();
    not_ready.sort();
    (ready, not_ready)
}

#[tokio::test]
async fn opt_in_endpoints_follow_the_registry_are_never_mirrored_and_leave_a_users_alone() {
    let client = harness::client().await;
    let ns = TestNamespace::new(&client, "endpoints").await;
    let api: Api<ServiceInstance> = Api::namespaced(client.clone(), &ns.name);
    let eps: Api<Endpoints> = Api::namespaced(client.clone(), &ns.name);
    // A user's own Endpoints object for a service that then gets instances stays theirs.
    let theirs: Endpoints = serde_json::from_value(json!({
        "metadata": {"name": "theirs"},
        "subsets": [{"addresses": [{"ip": "10.5.9.9"}], "ports": [{"name": "http", "port": 8080}]}],
    }))
    .expect("endpoints");
    let theirs = eps
        .create(&PostParams::default(), &theirs)
        .await
        .expect("create Endpoints");
    let controller =
        ControllerProcess::start_with(&harness::kubeconfig().await, &ns.name, &["--endpoints"]);
    let addr = controller.http_addr(TIMEOUT).await;

    let mut pending = instance("old", "old-pending", "10.5.0.3");
    pending.metadata.annotations = None;
    for si in [
        instance("old", "old-a", "10.5.0.1"),
        instance("old", "old-b", "10.5.0.2"),
        pending,
        instance("old", "old-by-name", "old.example.com"),
        instance("theirs", "t0", "10.5.1.1"),
    ] {
        api.create(&PostParams::default(), &si)
            .await
            .expect("create");
    }
    let old = wait_for(
        &eps,
        "old",
        "two ready addresses and one not ready",
        TIMEOUT,
        |e: Option<&Endpoints>| {
            e.is_some_and(|e| {
                endpoints_addresses(e)
                    == (
                        vec!["10.5.0.1".into(), "10.5.0.2".into()],
                        vec!["10.5.0.3".into()],
                    )
            })
        },
    )
    .await;
    let labels = old.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels
            .get("endpointslice.kubernetes.io/skip-mirror")
            .map(String::as_str),
        Some("true")
    );
    assert!(
        !old.metadata
            .annotations
            .unwrap_or_default()
            .contains_key("endpoints.kubernetes.io/over-capacity")
    );
    // The name-addressed instance is in the slices (FQDN) but cannot be an Endpoints address.
    await_slices(&client, &ns.name, "old", "the FQDN endpoint", |s| {
        endpoint(s, "old-by-name") == Some((true, true, false))
    })
    .await;
    await_projected(&api, "t0", "EndpointsConflict").await;
    assert_eq!(
        eps.get("theirs").await.expect("theirs").subsets,
        theirs.subsets,
        "a user's Endpoints object was changed"
    );

    // For five seconds nothing mirrors Roster's Endpoints into a slice, and Roster does not
    // rewrite it: unchanged instances write nothing.
    let version = old.metadata.resource_version.clone();
    let slices = watcher(
        Api::<EndpointSlice>::namespaced(client.clone(), &ns.name),
        watcher::Config::default().labels("kubernetes.io/service-name=old"),
    );
    let endpoints = watcher(
        eps.clone(),
        watcher::Config::default().fields("metadata.name=old"),
    );
    let slice_problems = slices.map(|event| match event {
        Ok(watcher::Event::Apply(s)) => Some(format!("a slice was written: {s:#?}")),
        Ok(watcher::Event::InitApply(s))
            if s.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("endpointslice.kubernetes.io/managed-by"))
                .is_some_and(|m| m.starts_with("endpointslicemirroring")) =>
        {
            Some(format!("the Endpoints object was mirrored: {s:#?}"))
        }
        Ok(_) => None,
        Err(e) => Some(format!("the slice watch failed: {e}")),
    });
    let endpoints_problems = endpoints.map(|event| match event {
        Ok(watcher::Event::Apply(e) | watcher::Event::InitApply(e))
            if e.metadata.resource_version != version =>
        {
            Some(format!("the Endpoints object was rewritten: {e:#?}"))
        }
        Ok(_) => None,
        Err(e) => Some(format!("the Endpoints watch failed: {e}")),
    });
    let fight = async {
        let problems = futures::stream::select(slice_problems, endpoints_problems)
            .filter_map(futures::future::ready);
        std::pin::pin!(problems)
            .next()
            .await
            .unwrap_or_else(|| "the watches ended".to_string())
    };
    if let Ok(problem) = tokio::time::timeout(Duration::from_secs(5), fight).await {
        panic!("{problem}");
    }

    // A change the Endpoints object does not show (the ConfigMap does) writes no Endpoints.
    let writes = projection_writes(&addr, "Endpoints").await;
    api.patch(
        "old-a",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"metadata": {"version": "2"}}})),
    )
    .await
    .expect("patch old-a");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    wait_for(
        &cms,
        "old-roster",
        "version 2",
        TIMEOUT,
        |cm: Option<&ConfigMap>| {
            cm.is_some_and(|cm| config_json(cm).to_string().contains(r#""version":"2""#))
        },
    )
    .await;
    assert_eq!(projection_writes(&addr, "Endpoints").await, writes);

    // A change rewrites it; the last instance gone, it goes too.
    api.delete("old-a", &DeleteParams::default())
        .await
        .expect("delete old-a");
    wait_for(
        &eps,
        "old",
        "old-a gone",
        TIMEOUT,
        |e: Option<&Endpoints>| e.is_some_and(|e| endpoints_addresses(e).0 == ["10.5.0.2"]),
    )
    .await;
    let uid = old.metadata.uid.clone().unwrap_or_default();
    for name in ["old-b", "old-pending", "old-by-name"] {
        api.delete(name, &DeleteParams::default())
            .await
            .expect("delete");
    }
    wait_deleted(&eps, "old", &uid, TIMEOUT).await;
}
