//! The manifests in `examples/` against a real control plane: each one is applied as `kubectl
//! apply --server-side` would apply it (strict field validation, so a misspelt field fails
//! instead of being pruned), the instances behave as their header comments say under a running
//! controller, and the workload RBAC grants what a registering workload needs and nothing more.

use std::{
    future::Future,
    path::{Path, PathBuf},
    time::Duration,
};

use k8s_openapi::api::{
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
    coordination::v1::Lease,
    core::v1::Namespace,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, DynamicObject, Patch, PatchParams, PostParams, ValidationDirective},
    core::GroupVersionKind,
    discovery::{Scope, pinned_kind},
};
use roster::api::{Phase, ServiceInstance};
use serde_json::json;

use crate::harness::{self, ControllerProcess, TestNamespace, condition, phase};

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
const TIMEOUT: Duration = Duration::from_secs(30);
const FIELD_MANAGER: &str = "examples-test";
/// The example that must keep its own namespace.
const RBAC: &str = "workload-rbac.yaml";
const SHOP: &str = "shop";

/// The tests that apply workload-rbac.yaml share its namespace `shop`: one at a time, each
/// leaving it deleted.
static SHOP_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The top-level examples (not examples/discovery/), by file name, sorted.
fn example_files() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(EXAMPLES)
        .expect("read examples/")
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| name.ends_with(".yaml"))
        .collect();
    files.sort();
    files
}

/// Every document of `examples/<file>`.
fn documents(file: &str) -> Vec<DynamicObject> {
    let path: PathBuf = Path::new(EXAMPLES).join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {file}: {e}"));
    assert!(
        text.starts_with('#'),
        "{file} should start with a comment saying what it shows and how to use it"
    );
    let docs: Vec<DynamicObject> = serde_saphyr::from_multiple(&text)
        .unwrap_or_else(|e| panic!("{file} is not YAML Kubernetes objects: {e}"));
    assert!(!docs.is_empty(), "{file} has no objects");
    for doc in &docs {
        assert!(
            doc.types.is_some() && doc.metadata.name.is_some(),
            "{file}: an object without apiVersion, kind or name: {doc:?}"
        );
    }
    docs
}

/// The name of the only object of `kind` in `examples/<file>`.
fn name_of(file: &str, kind: &str) -> String {
    let names: Vec<String> = documents(file)
        .into_iter()
        .filter(|d| d.types.as_ref().is_some_and(|t| t.kind == kind))
        .map(|d| d.name_any())
        .collect();
    assert_eq!(names.len(), 1, "{file} should hold one {kind}: {names:?}");
    names.into_iter().next().unwrap_or_default()
}

/// Applies the objects of `examples/<file>` with server-side apply, each kind resolved through
/// discovery; namespaced objects go to `namespace` when given, else where the file says.
async fn apply(client: &Client, file: &str, namespace: Option<&str>) -> Vec<DynamicObject> {
    let params = PatchParams::apply(FIELD_MANAGER)
        .force()
        .validation(ValidationDirective::Strict);
    let mut applied = Vec::new();
    for mut obj in documents(file) {
        let types = obj.types.clone().unwrap_or_default();
        let gvk = GroupVersionKind::try_from(&types)
            .unwrap_or_else(|e| panic!("{file}: apiVersion {:?}: {e}", types.api_version));
        let (resource, caps) = pinned_kind(client, &gvk)
            .await
            .unwrap_or_else(|e| panic!("{file}: the apiserver does not serve {gvk:?}: {e}"));
        let api: Api<DynamicObject> = match caps.scope {
            Scope::Namespaced => {
                if let Some(ns) = namespace {
                    obj.metadata.namespace = Some(ns.to_string());
                }
                let ns = obj.namespace().unwrap_or_else(|| "default".into());
                Api::namespaced_with(client.clone(), &ns, &resource)
            }
            Scope::Cluster => Api::all_with(client.clone(), &resource),
        };
        let name = obj.name_any();
        let result = api
            .patch(&name, &params, &Patch::Apply(&obj))
            .await
            .unwrap_or_else(|e| panic!("{file}: the apiserver refused {} {name}: {e}", gvk.kind));
        applied.push(result);
    }
    applied
}

async fn await_phase(api: &Api<ServiceInstance>, name: &str, want: Phase) -> ServiceInstance {
    harness::await_phase(api, name, want, TIMEOUT).await
}

/// Heartbeats with `beat` every 200 ms (the comments' TTL/3 loop, faster) until the instance
/// reaches `want`, then three more times, asserting it stays there.
async fn beat_until<F, Fut>(
    api: &Api<ServiceInstance>,
    name: &str,
    want: Phase,
    mut beat: F,
) -> ServiceInstance
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let reached = async {
        loop {
            tick.tick().await;
            beat().await;
            let si = api.get(name).await.expect("get the instance");
            if phase(Some(&si)) == Some(want) {
                return si;
            }
        }
    };
    let Ok(mut si) = tokio::time::timeout(TIMEOUT, reached).await else {
        let last = api.get_opt(name).await;
        panic!("{name} did not reach {want:?} while heartbeating; last seen: {last:#?}");
    };
    for _ in 0..3 {
        tick.tick().await;
        beat().await;
        si = api.get(name).await.expect("get the instance");
        assert_eq!(
            phase(Some(&si)),
            Some(want),
            "{name} left {want:?} while heartbeating: {:?}",
            si.status
        );
    }
    si
}

async fn annotate(api: &Api<ServiceInstance>, name: &str, value: String) {
    let patch = json!({"metadata": {"annotations": {"roster.dev/heartbeat": value}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_or_else(|e| panic!("annotate {name}: {e}"));
}

/// `$(date -u +%FT%T.%NZ)`: an RFC 3339 timestamp with nanoseconds.
fn timestamp() -> String {
    jiff::Timestamp::now().to_string()
}

/// Leaves no namespace `shop` behind that this test created: [`Shop::delete`] deletes it and
/// waits until it is gone; a test that fails before that deletes it on drop.
struct Shop {
    client: Client,
    kubeconfig: PathBuf,
    created: bool,
}

impl Shop {
    /// Waits for a `shop` left terminating by an earlier test; remembers whether it exists.
    async fn before(client: &Client) -> Shop {
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let wait = async {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tick.tick().await;
                match namespaces.get_opt(SHOP).await.expect("get namespace shop") {
                    Some(ns) if ns.metadata.deletion_timestamp.is_some() => continue,
                    found => return found.is_none(),
                }
            }
        };
        let created = tokio::time::timeout(Duration::from_secs(60), wait)
            .await
            .expect("namespace shop still terminating after 60 s");
        Shop {
            client: client.clone(),
            kubeconfig: harness::kubeconfig().await,
            created,
        }
    }

    async fn delete(mut self) {
        if !std::mem::take(&mut self.created) {
            return;
        }
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let _ = namespaces
            .delete(SHOP, &DeleteParams::background())
            .await
            .expect("delete namespace shop");
        let gone = async {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            while namespaces
                .get_opt(SHOP)
                .await
                .expect("get namespace shop")
                .is_some()
            {
                tick.tick().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), gone)
            .await
            .expect("namespace shop not gone 60 s after its deletion");
    }
}

impl Drop for Shop {
    fn drop(&mut self) {
        if !self.created {
            return;
        }
        harness::delete_namespace_from_drop(self.kubeconfig.clone(), SHOP.to_string());
    }
}

#[tokio::test]
async fn every_example_is_yaml_the_apiserver_accepts() {
    let files = example_files();
    for expected in [
        "instance.yaml",
        "heartbeat-annotation.yaml",
        "heartbeat-lease.yaml",
        "persistent.yaml",
        "draining.yaml",
        "agent-sidecar.yaml",
        RBAC,
    ] {
        assert!(
            files.iter().any(|f| f == expected),
            "examples/{expected} is missing: {files:?}"
        );
    }

    let client = harness::client().await;
    let ns = TestNamespace::new(&client, "examples").await;
    let _shop_lock = SHOP_LOCK.lock().await;
    let shop = Shop::before(&client).await;
    let mut instances = 0;
    for file in &files {
        let target = (file != RBAC).then_some(ns.name.as_str());
        for obj in apply(&client, file, target).await {
            let kind = obj.types.as_ref().map(|t| t.kind.as_str()).unwrap_or("");
            if kind == "ServiceInstance" {
                instances += 1;
            }
        }
    }
    // What was applied reads back as the typed resource the controller works with.
    let api: Api<ServiceInstance> = Api::namespaced(client.clone(), &ns.name);
    let listed = api.list(&Default::default()).await.expect("list instances");
    assert_eq!(listed.items.len(), instances, "{:#?}", listed.items);
    shop.delete().await;
}

#[tokio::test]
async fn example_instances_behave_as_their_comments_say() {
    let _timing = harness::timing().await;
    let client = harness::client().await;
    let kubeconfig = harness::kubeconfig().await;
    let ns = TestNamespace::new(&client, "examples-liveness").await;
    let files = [
        "heartbeat-annotation.yaml",
        "heartbeat-lease.yaml",
        "persistent.yaml",
        "draining.yaml",
    ];
    for file in files {
        apply(&client, file, Some(&ns.name)).await;
    }
    let api: Api<ServiceInstance> = Api::namespaced(client.clone(), &ns.name);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    let _controller = ControllerProcess::start(&kubeconfig, &ns.name);

    // heartbeat-annotation.yaml: Pending until the loop of `kubectl annotate ... $(date ...)`
    // runs, then Ready, its heartbeats observed as timestamps.
    let name = name_of("heartbeat-annotation.yaml", "ServiceInstance");
    await_phase(&api, &name, Phase::Pending).await;
    let si = beat_until(&api, &name, Phase::Ready, || {
        annotate(&api, &name, timestamp())
    })
    .await;
    assert_eq!(
        condition(&si, "Ready"),
        ("True".into(), "Heartbeating".into())
    );
    assert_eq!(
        condition(&si, "Heartbeating"),
        ("True".into(), "HeartbeatObserved".into())
    );

    // heartbeat-lease.yaml: the Lease its leaseName names exists beside it, never renewed, so the
    // instance awaits a heartbeat (not LeaseNotFound); patching renewTime as the comment does
    // makes it Ready.
    let name = name_of("heartbeat-lease.yaml", "ServiceInstance");
    let si = await_phase(&api, &name, Phase::Pending).await;
    assert_eq!(
        condition(&si, "Heartbeating").1,
        "AwaitingHeartbeat",
        "{:?}",
        si.status
    );
    let lease = si.spec.lease_name.clone().expect("spec.leaseName");
    assert_eq!(lease, name_of("heartbeat-lease.yaml", "Lease"));
    let si = beat_until(&api, &name, Phase::Ready, || async {
        // `date -u +%FT%T.%6NZ`: the MicroTime format of renewTime.
        let now = jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S.%6fZ");
        let patch = json!({"spec": {"renewTime": now.to_string()}});
        leases
            .patch(&lease, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap_or_else(|e| panic!("renew lease {lease}: {e}"));
    })
    .await;
    assert_eq!(
        condition(&si, "Heartbeating"),
        ("True".into(), "HeartbeatObserved".into())
    );

    // draining.yaml: once it heartbeats it is Draining, not Ready; un-draining makes it Ready.
    let name = name_of("draining.yaml", "ServiceInstance");
    await_phase(&api, &name, Phase::Pending).await;
    let si = beat_until(&api, &name, Phase::Draining, || {
        annotate(&api, &name, jiff::Timestamp::now().to_string())
    })
    .await;
    assert!(si.spec.draining);
    assert_eq!(condition(&si, "Ready"), ("False".into(), "Draining".into()));
    let undrain = json!({"spec": {"draining": false}});
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&undrain))
        .await
        .expect("un-drain");
    await_phase(&api, &name, Phase::Ready).await;

    // persistent.yaml: deleteAfterSeconds 0 as applied; silent, it becomes Unhealthy after its
    // TTL and is still there.
    let name = name_of("persistent.yaml", "ServiceInstance");
    let si = api.get(&name).await.expect("get the persistent instance");
    assert_eq!(si.spec.delete_after_seconds, Some(0), "{:?}", si.spec);
    let si = await_phase(&api, &name, Phase::Unhealthy).await;
    assert_eq!(si.spec.delete_after_seconds, Some(0));
    assert_eq!(
        condition(&si, "Ready"),
        ("False".into(), "HeartbeatSilent".into())
    );
    // ... and it says it will never be deleted (rather than waiting out a deletion time).
    let ready = si
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(ready.contains("never deleted"), "{ready}");
}

/// One row of the RBAC table: (verb, (group, resource), subresource, namespace ("" for
/// cluster-wide), allowed).
type Access = (
    &'static str,
    (&'static str, &'static str),
    &'static str,
    &'static str,
    bool,
);

#[tokio::test]
async fn workload_rbac_lets_checkout_register_only_in_shop() {
    let client = harness::client().await;
    let _shop_lock = SHOP_LOCK.lock().await;
    let shop = Shop::before(&client).await;
    let applied = apply(&client, RBAC, None).await;
    assert!(
        applied
            .iter()
            .all(|o| o.namespace().is_none_or(|ns| ns == SHOP)),
        "{RBAC} should keep everything in namespace {SHOP}"
    );
    let account = name_of(RBAC, "ServiceAccount");
    let user = format!("system:serviceaccount:{SHOP}:{account}");

    let si = ("roster.dev", "serviceinstances");
    let lease = ("coordination.k8s.io", "leases");
    let table: &[Access] = &[
        ("get", si, "", SHOP, true),
        ("list", si, "", SHOP, true),
        ("watch", si, "", SHOP, true),
        ("create", si, "", SHOP, true),
        ("update", si, "", SHOP, true),
        ("patch", si, "", SHOP, true),
        ("delete", si, "", SHOP, true),
        ("get", lease, "", SHOP, true),
        ("create", lease, "", SHOP, true),
        ("update", lease, "", SHOP, true),
        ("patch", lease, "", SHOP, true),
        // Only in its own namespace.
        ("create", si, "", "default", false),
        ("get", si, "", "default", false),
        ("update", lease, "", "default", false),
        // Never the status: only the controller judges liveness.
        ("patch", si, "status", SHOP, false),
        ("update", si, "status", SHOP, false),
        // Nothing else in shop, nothing it does not need of Leases.
        ("get", ("", "secrets"), "", SHOP, false),
        ("delete", lease, "", SHOP, false),
        ("list", lease, "", SHOP, false),
        // Nothing cluster-wide.
        ("list", si, "", "", false),
        ("watch", si, "", "", false),
    ];

    let reviews: Api<SubjectAccessReview> = Api::all(client.clone());
    let check = async || {
        let mut mismatches = Vec::new();
        for &(verb, (group, resource), subresource, namespace, allowed) in table {
            let review = SubjectAccessReview {
                spec: SubjectAccessReviewSpec {
                    user: Some(user.clone()),
                    groups: Some(vec![
                        "system:serviceaccounts".into(),
                        format!("system:serviceaccounts:{SHOP}"),
                        "system:authenticated".into(),
                    ]),
                    resource_attributes: Some(ResourceAttributes {
                        verb: Some(verb.into()),
                        group: Some(group.into()),
                        resource: Some(resource.into()),
                        subresource: (!subresource.is_empty()).then(|| subresource.into()),
                        namespace: (!namespace.is_empty()).then(|| namespace.into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ..Default::default()
            };
            let answer = reviews
                .create(&PostParams::default(), &review)
                .await
                .expect("create a SubjectAccessReview");
            let got = answer.status.map(|s| s.allowed).unwrap_or(false);
            if got != allowed {
                let sub = if subresource.is_empty() {
                    String::new()
                } else {
                    format!("/{subresource}")
                };
                let scope = if namespace.is_empty() {
                    "cluster-wide".to_string()
                } else {
                    format!("in namespace {namespace:?}")
                };
                mismatches.push(format!(
                    "{verb} {resource}{sub} (group {group:?}) {scope}: expected {}, got {}",
                    if allowed { "allowed" } else { "denied" },
                    if got { "allowed" } else { "denied" },
                ));
            }
        }
        mismatches
    };
    // RBAC takes effect when the apiserver's informers see the binding: ask until every row
    // holds, and report every row that still does not.
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        tick.tick().await;
        let mismatches = check().await;
        if mismatches.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{user} under {RBAC}, after {TIMEOUT:?}:\n  {}",
            mismatches.join("\n  ")
        );
    }
    shop.delete().await;
}
