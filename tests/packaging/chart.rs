//! The Helm chart against a real control plane: lint, render and server-side dry run, install,
//! the controller run as the chart's ServiceAccount (a token from the TokenRequest API) through
//! the core scenario, least privilege checked by SubjectAccessReviews, upgrade and uninstall.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        authentication::v1::{TokenRequest, TokenRequestSpec},
        authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
        coordination::v1::Lease,
        core::v1::{ConfigMap, Namespace, Service, ServiceAccount},
        discovery::v1::EndpointSlice,
        flowcontrol::v1::FlowSchema,
        policy::v1::PodDisruptionBudget,
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DynamicObject, ListParams, Patch, PatchParams, PostParams},
    config::{AuthInfo, Kubeconfig},
    discovery::Discovery,
};
use roster::api::{InstancePort, Phase, ServiceInstance, ServiceInstanceSpec};
use serde_json::{Value, json};

use crate::harness::{self, Beats, ControllerProcess, LocalControlPlane};

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/roster");
const RELEASE_NS: &str = "roster-system";
const WAIT: Duration = Duration::from_secs(30);

/// The helm binary (built from its Go module and cached, like the control plane's), with its
/// own config and cache directories so no user setup leaks in.
struct Helm {
    bin: PathBuf,
    home: PathBuf,
    kubeconfig: Option<PathBuf>,
}

impl Helm {
    async fn new(kubeconfig: Option<&Path>) -> Helm {
        let bins = roster::control_plane::assets::ensure(&["helm"])
            .await
            .expect("obtain helm");
        let home = std::env::temp_dir().join(format!(
            "roster-helm-{}-{}",
            std::process::id(),
            jiff::Timestamp::now().as_nanosecond()
        ));
        Helm {
            bin: bins["helm"].clone(),
            home,
            kubeconfig: kubeconfig.map(Path::to_path_buf),
        }
    }

    /// Runs helm; returns (success, stdout, stderr).
    fn run(&self, args: &[&str]) -> (bool, String, String) {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .env("HELM_CACHE_HOME", self.home.join("cache"))
            .env("HELM_CONFIG_HOME", self.home.join("config"))
            .env("HELM_DATA_HOME", self.home.join("data"))
            .env_remove("KUBECONFIG");
        if let Some(kubeconfig) = &self.kubeconfig {
            cmd.arg("--kubeconfig").arg(kubeconfig);
        }
        let out = cmd.output().expect("run helm");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let (ok, stdout, stderr) = self.run(args);
        assert!(ok, "helm {args:?} failed:\n{stderr}\n{stdout}");
        stdout
    }
}

impl Drop for Helm {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml)
        .expect("helm renders valid YAML")
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_chart_lints_refuses_bad_values_and_renders_what_the_apiserver_accepts() {
    let helm = Helm::new(None).await;
    let namespaced = ["--set", "watchNamespace=team-a"];
    for extra in [
        &[][..],
        &namespaced,
        &["--set", "serviceMonitor.enabled=true"],
    ] {
        let mut args = vec!["lint", "--strict", CHART];
        args.extend_from_slice(extra);
        helm.ok(&args);
    }
    // Bad values are refused by values.schema.json, naming the value.
    for (value, mentions) in [
        ("watchNamespace=Team_A", "/watchNamespace"),
        ("registry.defaultTTL=30", "/registry/defaultTTL"),
        ("registry.defaultTTL=soon", "/registry/defaultTTL"),
        ("protection.threshold=1.5", "/protection/threshold"),
        ("replicaCount=0", "/replicaCount"),
        ("log.format=xml", "/log/format"),
        ("no.such.value=1", "additional properties 'no'"),
        ("registry.defaultTTL=30s1m", "/registry/defaultTTL"),
    ] {
        let (ok, _, stderr) = helm.run(&["template", "r", CHART, "--set", value]);
        assert!(!ok, "{value} was accepted");
        assert!(stderr.contains(mentions), "{value}: {stderr}");
    }

    // What the chart renders, as the cluster-wide and the one-namespace installation.
    let cp = tokio::task::spawn_blocking(LocalControlPlane::start)
        .await
        .expect("start a control plane");
    let client = roster::control_plane::client_for(&cp.kubeconfig)
        .await
        .expect("admin client");
    for ns in [RELEASE_NS, "team-a"] {
        create_namespace(&client, ns).await;
    }
    for extra in [&[][..], &namespaced] {
        let mut args = vec![
            "template",
            "roster",
            CHART,
            "-n",
            RELEASE_NS,
            "--include-crds",
        ];
        args.extend_from_slice(extra);
        let docs = documents(&helm.ok(&args));
        let crd = find(&docs, "CustomResourceDefinition");
        assert_eq!(crd.len(), 1);
        // The CRD goes in first (as helm does), then everything else is a server-side dry run.
        apply(&client, crd[0], false).await;
        let discovery = Discovery::new(client.clone())
            .run()
            .await
            .expect("discovery");
        for doc in docs
            .iter()
            .filter(|d| d["kind"] != "CustomResourceDefinition")
        {
            dry_run(&client, &discovery, doc).await;
        }
        assert_restricted(&docs);
        assert_exact_rules(&docs, &[]);
        admitted_as_restricted(&client, &docs).await;
        let cluster_wide = extra.is_empty();
        assert_eq!(find(&docs, "ClusterRole").len(), usize::from(cluster_wide));
        assert_eq!(
            find(&docs, "ClusterRoleBinding").len(),
            usize::from(cluster_wide)
        );
    }
    // Endpoints are opt-in, and so is the power to write them.
    let docs = documents(&helm.ok(&[
        "template",
        "roster",
        CHART,
        "--set",
        "registry.endpoints=true",
    ]));
    assert_exact_rules(
        &docs,
        &[("/endpoints", "get list watch create patch delete")],
    );
    let args = &find(&docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"];
    assert!(
        args.as_array()
            .is_some_and(|a| a.iter().any(|a| a == "--endpoints")),
        "{args}"
    );
    // The optional ServiceMonitor scrapes the metrics Service's port. (Its CRD belongs to the
    // Prometheus Operator, which this control plane does not run: checked by shape.)
    let docs = documents(&helm.ok(&[
        "template",
        "roster",
        CHART,
        "--set",
        "serviceMonitor.enabled=true",
    ]));
    let monitor = find(&docs, "ServiceMonitor");
    let service = find(&docs, "Service");
    assert_eq!((monitor.len(), service.len()), (1, 1));
    assert_eq!(
        monitor[0]["spec"]["endpoints"][0]["port"],
        service[0]["spec"]["ports"][0]["name"]
    );
    for (key, value) in monitor[0]["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("labels")
    {
        assert_eq!(&service[0]["metadata"]["labels"][key], value, "{key}");
    }
    assert!(
        find(
            &documents(&helm.ok(&["template", "r", CHART])),
            "ServiceMonitor"
        )
        .is_empty()
    );
    // The default image tag is the controller's version.
    let chart = std::fs::read_to_string(format!("{CHART}/Chart.yaml")).expect("Chart.yaml");
    let app_version = format!("appVersion: \"{}\"", env!("CARGO_PKG_VERSION"));
    assert!(
        chart.contains(&app_version),
        "Chart.yaml lacks {app_version}"
    );
}

/// The rules are exactly the accesses docs/install.md lists: a rule added to the chart without
/// a reason fails here, as one the controller needs and lacks fails the core scenario.
fn assert_exact_rules(docs: &[Value], opted_in: &[(&str, &str)]) {
    let role = docs
        .iter()
        .find(|d| {
            (d["kind"] == "ClusterRole" || d["kind"] == "Role")
                && !d["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .ends_with("-election")
        })
        .expect("the controller's rules");
    let mut granted = std::collections::BTreeSet::new();
    for rule in role["rules"].as_array().expect("rules") {
        for group in rule["apiGroups"].as_array().expect("groups") {
            for resource in rule["resources"].as_array().expect("resources") {
                for verb in rule["verbs"].as_array().expect("verbs") {
                    granted.insert(format!(
                        "{}/{} {}",
                        group.as_str().unwrap_or_default(),
                        resource.as_str().unwrap_or_default(),
                        verb.as_str().unwrap_or_default()
                    ));
                }
            }
        }
    }
    let expected: std::collections::BTreeSet<String> = [
        ("roster.dev/serviceinstances", "get list watch delete"),
        ("roster.dev/serviceinstances/status", "patch"),
        ("coordination.k8s.io/leases", "get list watch"),
        ("/services", "list watch create patch delete"),
        ("/services/finalizers", "update"),
        (
            "discovery.k8s.io/endpointslices",
            "list watch create patch delete",
        ),
        ("/configmaps", "get list watch create patch delete"),
        ("events.k8s.io/events", "create patch"),
    ]
    .iter()
    .chain(opted_in)
    .flat_map(|(r, verbs)| verbs.split(' ').map(move |v| format!("{r} {v}")))
    .collect();
    assert_eq!(granted, expected);
}

/// The Deployment as the issue asks: two replicas, probes, requests, a restricted pod.
fn assert_restricted(docs: &[Value]) {
    let deployment = find(docs, "Deployment")[0];
    assert_eq!(deployment["spec"]["replicas"], 2);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let container = &pod["containers"][0];
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(container["resources"]["requests"]["cpu"].is_string());
    assert!(container["resources"]["requests"]["memory"].is_string());
    assert_eq!(find(docs, "PodDisruptionBudget").len(), 1);
}

/// A Pod of the Deployment's template, created (dry run) in a namespace that enforces the
/// `restricted` Pod Security Standard: the apiserver's PodSecurity admission accepts it.
async fn admitted_as_restricted(client: &Client, docs: &[Value]) {
    let ns = "restricted-check";
    let namespaces = Api::<Namespace>::all(client.clone());
    if namespaces.get_opt(ns).await.expect("get").is_none() {
        let labelled: Namespace = serde_json::from_value(json!({"metadata": {
            "name": ns,
            "labels": {"pod-security.kubernetes.io/enforce": "restricted"},
        }}))
        .expect("a namespace");
        namespaces
            .create(&PostParams::default(), &labelled)
            .await
            .expect("create the restricted namespace");
    }
    let template = &find(docs, "Deployment")[0]["spec"]["template"];
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
        "metadata": {"name": "roster-pod", "labels": template["metadata"]["labels"]},
        "spec": template["spec"],
    }))
    .expect("a pod");
    let params = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    if let Err(e) = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), ns)
        .create(&params, &pod)
        .await
    {
        panic!("the restricted Pod Security Standard refuses the chart's pod: {e}");
    }
}

async fn create_namespace(client: &Client, name: &str) {
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": name}})).expect("a namespace");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
}

async fn apply(client: &Client, doc: &Value, dry_run: bool) {
    let discovery = Discovery::new(client.clone())
        .run()
        .await
        .expect("discovery");
    if dry_run {
        return self::dry_run(client, &discovery, doc).await;
    }
    let obj: DynamicObject = serde_json::from_value(doc.clone()).expect("an object");
    let (api, name) = api_for(client, &discovery, &obj);
    api.patch(
        &name,
        &PatchParams::apply("chart-test").force(),
        &Patch::Apply(&obj),
    )
    .await
    .unwrap_or_else(|e| panic!("apply {name}: {e}"));
}

async fn dry_run(client: &Client, discovery: &Discovery, doc: &Value) {
    let obj: DynamicObject = serde_json::from_value(doc.clone()).expect("an object");
    let (api, name) = api_for(client, discovery, &obj);
    let mut params = PatchParams::apply("chart-test").force();
    params.dry_run = true;
    if let Err(e) = api.patch(&name, &params, &Patch::Apply(&obj)).await {
        panic!("the apiserver refused {} {name}: {e}", doc["kind"]);
    }
}

fn api_for(
    client: &Client,
    discovery: &Discovery,
    obj: &DynamicObject,
) -> (Api<DynamicObject>, String) {
    let types = obj.types.as_ref().expect("apiVersion and kind");
    let gvk = kube::api::GroupVersionKind::try_from(types).expect("a GVK");
    let (resource, caps) = discovery
        .resolve_gvk(&gvk)
        .unwrap_or_else(|| panic!("the apiserver serves no {gvk:?}"));
    let api = match (caps.scope, obj.namespace()) {
        (kube::discovery::Scope::Namespaced, Some(ns)) => {
            Api::namespaced_with(client.clone(), &ns, &resource)
        }
        (kube::discovery::Scope::Namespaced, None) => panic!("{} has no namespace", obj.name_any()),
        (kube::discovery::Scope::Cluster, _) => Api::all_with(client.clone(), &resource),
    };
    (api, obj.name_any())
}

/// A kubeconfig for the same cluster that authenticates as `namespace/name`'s ServiceAccount
/// with a token from the TokenRequest API: what a pod of the Deployment would present.
async fn service_account_kubeconfig(
    admin: &Path,
    client: &Client,
    namespace: &str,
    name: &str,
) -> PathBuf {
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![],
            expiration_seconds: Some(3600),
            ..TokenRequestSpec::default()
        },
        ..TokenRequest::default()
    };
    let token = Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .create_token_request(name, &PostParams::default(), &request)
        .await
        .expect("a token for the chart's ServiceAccount")
        .status
        .expect("the token")
        .token;
    let mut config = Kubeconfig::read_from(admin).expect("read the admin kubeconfig");
    for user in &mut config.auth_infos {
        user.auth_info = Some(AuthInfo {
            token: Some(token.clone().into()),
            ..AuthInfo::default()
        });
    }
    let path = admin.with_file_name(format!("kubeconfig-{namespace}-{name}"));
    // JSON is YAML: the kubeconfig loader reads it as is.
    std::fs::write(&path, serde_json::to_vec(&config).expect("serialize")).expect("write");
    path
}

/// The controller as the Deployment runs it: the chart's arguments (bar the listen address,
/// which must stay on loopback here), under the chart's ServiceAccount; returned once it leads.
async fn run_as_deployed(cp: &LocalControlPlane, client: &Client) -> ControllerProcess {
    let kubeconfig = service_account_kubeconfig(&cp.kubeconfig, client, RELEASE_NS, "roster").await;
    let deployment = Api::<Deployment>::namespaced(client.clone(), RELEASE_NS)
        .get("roster")
        .await
        .expect("the Deployment");
    let container = &deployment
        .spec
        .and_then(|s| s.template.spec)
        .expect("a pod spec")
        .containers[0];
    let mut args: Vec<String> = container
        .args
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|a| !a.starts_with("--http-addr"))
        .collect();
    args.extend([
        "--http-addr=127.0.0.1:0".into(),
        format!("--kubeconfig={}", kubeconfig.display()),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let controller = ControllerProcess::spawn(&args);
    controller
        .await_output("became leader", WAIT, |log| {
            log.contains("became leader").then_some(())
        })
        .await;
    controller
}

struct Access<'a> {
    verb: &'a str,
    group: &'a str,
    resource: &'a str,
    subresource: &'a str,
    namespace: &'a str,
    name: &'a str,
    allowed: bool,
}

fn can<'a>(verb: &'a str, resource: &'a str, namespace: &'a str) -> Access<'a> {
    let (resource, subresource) = resource.split_once('/').unwrap_or((resource, ""));
    let (resource, group) = resource.split_once('.').unwrap_or((resource, ""));
    Access {
        verb,
        group,
        resource,
        subresource,
        namespace,
        name: "",
        allowed: true,
    }
}

fn cannot<'a>(verb: &'a str, resource: &'a str, namespace: &'a str) -> Access<'a> {
    Access {
        allowed: false,
        ..can(verb, resource, namespace)
    }
}

impl<'a> Access<'a> {
    fn named(self, name: &'a str) -> Self {
        Access { name, ..self }
    }
}

/// Asks the apiserver's authorizer about each access for the ServiceAccount, and reports every
/// answer that differs from the expected one.
async fn assert_access(client: &Client, namespace: &str, account: &str, table: &[Access<'_>]) {
    let user = format!("system:serviceaccount:{namespace}:{account}");
    let api = Api::<SubjectAccessReview>::all(client.clone());
    let mut wrong = Vec::new();
    for a in table {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.clone()),
                groups: Some(vec![
                    "system:serviceaccounts".into(),
                    format!("system:serviceaccounts:{namespace}"),
                    "system:authenticated".into(),
                ]),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(a.verb.into()),
                    group: Some(a.group.into()),
                    resource: Some(a.resource.into()),
                    subresource: Some(a.subresource.into()),
                    namespace: Some(a.namespace.into()),
                    name: Some(a.name.into()),
                    ..ResourceAttributes::default()
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let answer = api
            .create(&PostParams::default(), &review)
            .await
            .expect("a SubjectAccessReview");
        let allowed = answer.status.is_some_and(|s| s.allowed);
        if allowed != a.allowed {
            wrong.push(format!(
                "{} {}.{}/{} in {:?} named {:?}: allowed={allowed}, expected {}",
                a.verb, a.resource, a.group, a.subresource, a.namespace, a.name, a.allowed
            ));
        }
    }
    assert!(wrong.is_empty(), "{user}:\n{}", wrong.join("\n"));
}

/// What no installation of Roster may do, wherever it watches.
fn never<'a>(workload_ns: &'a str) -> Vec<Access<'a>> {
    vec![
        cannot("get", "secrets", workload_ns),
        cannot("list", "secrets", ""),
        cannot("get", "secrets", RELEASE_NS),
        // It registers nothing itself, and never edits what users wrote.
        cannot("create", "serviceinstances.roster.dev", workload_ns),
        cannot("update", "serviceinstances.roster.dev", workload_ns),
        cannot("patch", "serviceinstances.roster.dev", workload_ns),
        // Heartbeat Leases belong to the workloads: read only.
        cannot("update", "leases.coordination.k8s.io", workload_ns),
        cannot("create", "leases.coordination.k8s.io", workload_ns),
        cannot("delete", "leases.coordination.k8s.io", workload_ns),
        // Only its own election Lease.
        cannot("update", "leases.coordination.k8s.io", RELEASE_NS).named("someone-else"),
        cannot("delete", "leases.coordination.k8s.io", RELEASE_NS).named("roster"),
        cannot("get", "pods", workload_ns),
        cannot("delete", "pods", workload_ns),
        cannot("update", "services", workload_ns),
        cannot("list", "nodes", ""),
        cannot(
            "create",
            "customresourcedefinitions.apiextensions.k8s.io",
            "",
        ),
        cannot(
            "create",
            "clusterrolebindings.rbac.authorization.k8s.io",
            "",
        ),
        cannot(
            "create",
            "rolebindings.rbac.authorization.k8s.io",
            workload_ns,
        ),
        cannot("impersonate", "serviceaccounts", workload_ns),
        cannot("create", "serviceaccounts/token", RELEASE_NS),
        cannot("create", "events", workload_ns),
    ]
}

/// What serving one namespace needs there (the core scenario proves it sufficient).
fn serving(ns: &str) -> Vec<Access<'_>> {
    vec![
        can("get", "serviceinstances.roster.dev", ns),
        can("list", "serviceinstances.roster.dev", ns),
        can("watch", "serviceinstances.roster.dev", ns),
        can("delete", "serviceinstances.roster.dev", ns),
        can("patch", "serviceinstances.roster.dev/status", ns),
        can("get", "leases.coordination.k8s.io", ns),
        can("watch", "leases.coordination.k8s.io", ns),
        can("create", "services", ns),
        can("patch", "services", ns),
        can("delete", "services", ns),
        can("update", "services/finalizers", ns),
        can("create", "endpointslices.discovery.k8s.io", ns),
        can("patch", "configmaps", ns),
        can("create", "events.events.k8s.io", ns),
        // Election, in the release's namespace.
        can("get", "leases.coordination.k8s.io", RELEASE_NS).named("roster"),
        can("update", "leases.coordination.k8s.io", RELEASE_NS).named("roster"),
        can("watch", "leases.coordination.k8s.io", RELEASE_NS).named("roster"),
    ]
}

/// Register, heartbeat, project, go silent, expire, unproject: the instance leaves ttlSeconds
/// unset, so the chart's `registry.defaultTTL` (2s) is what expires it.
async fn core_scenario(client: &Client, controller: &ControllerProcess, ns: &str) {
    let api = Api::<ServiceInstance>::namespaced(client.clone(), ns);
    let mut spec = ServiceInstanceSpec::new(
        "web",
        "10.40.0.7",
        vec![InstancePort {
            name: "http".into(),
            port: 8080,
            protocol: None,
            app_protocol: None,
        }],
    );
    spec.ttl_seconds = None;
    let si = ServiceInstance::new("web-1", spec);
    let si = api
        .create(&PostParams::default(), &si)
        .await
        .expect("register an instance");
    let mut beats = Beats::new(&api, Duration::from_millis(400));
    beats.start("web-1");
    harness::await_phase(&api, "web-1", Phase::Ready, WAIT).await;

    // Projected: a ready endpoint in the Service's slice, and the ConfigMap's JSON.
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), ns);
    let of_web = ListParams::default().labels("kubernetes.io/service-name=web");
    poll("a ready endpoint in web's EndpointSlice", || async {
        slices.list(&of_web).await.is_ok_and(|list| {
            list.items.iter().flat_map(|s| &s.endpoints).any(|e| {
                e.addresses == ["10.40.0.7"]
                    && e.conditions.as_ref().and_then(|c| c.ready) == Some(true)
            })
        })
    })
    .await;
    let config_maps = Api::<ConfigMap>::namespaced(client.clone(), ns);
    poll("the instance in web's ConfigMap", || async {
        config_maps.get_opt("web-roster").await.is_ok_and(|cm| {
            cm.and_then(|cm| cm.data?.remove("instances.json"))
                .is_some_and(|json| json.contains("10.40.0.7"))
        })
    })
    .await;
    harness::await_event(client, ns, "web-1", "Ready", WAIT).await;

    // Silent: unhealthy after the default TTL, deleted after three, and unprojected.
    beats.stop("web-1");
    harness::await_phase(&api, "web-1", Phase::Unhealthy, WAIT).await;
    let uid = si.uid().expect("a uid");
    harness::wait_deleted(&api, "web-1", &uid, WAIT).await;
    let services = Api::<Service>::namespaced(client.clone(), ns);
    poll("the Service web to go with its last instance", || async {
        services.get_opt("web").await.is_ok_and(|s| s.is_none())
    })
    .await;
    let log = controller.output();
    assert!(
        !log.to_lowercase().contains("forbidden"),
        "the controller was refused something:\n{log}"
    );
}

/// Awaits a condition, asking every 100 ms, for at most [`WAIT`].
async fn poll<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let wait = async {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            if check().await {
                return;
            }
        }
    };
    if tokio::time::timeout(WAIT, wait).await.is_err() {
        panic!("timed out after {WAIT:?} waiting for {what}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn installed_cluster_wide_its_service_account_runs_the_core_scenario_and_nothing_more() {
    let cp = tokio::task::spawn_blocking(LocalControlPlane::start)
        .await
        .expect("start a control plane");
    let client = roster::control_plane::client_for(&cp.kubeconfig)
        .await
        .expect("admin client");
    let helm = Helm::new(Some(&cp.kubeconfig)).await;
    helm.ok(&[
        "install",
        "roster",
        CHART,
        "-n",
        RELEASE_NS,
        "--create-namespace",
        "--set",
        "registry.defaultTTL=2s",
    ]);
    // Installed as rendered (no kubelet runs the pods here: the controller runs below).
    let deployment = Api::<Deployment>::namespaced(client.clone(), RELEASE_NS)
        .get("roster")
        .await
        .expect("the Deployment");
    assert_eq!(deployment.spec.and_then(|s| s.replicas), Some(2));
    Api::<CustomResourceDefinition>::all(client.clone())
        .get("serviceinstances.roster.dev")
        .await
        .expect("the chart installed the CRD");

    create_namespace(&client, "shop").await;
    let controller = run_as_deployed(&cp, &client).await;
    core_scenario(&client, &controller, "shop").await;

    let mut table = serving("shop");
    table.extend(never("shop"));
    table.extend([
        // Cluster-wide, it serves every namespace.
        can("list", "serviceinstances.roster.dev", ""),
        can("watch", "leases.coordination.k8s.io", ""),
        can("list", "endpointslices.discovery.k8s.io", ""),
    ]);
    assert_access(&client, RELEASE_NS, "roster", &table).await;
    election_requests_use_the_leader_election_priority_level(&cp, &client).await;
}

/// API Priority and Fairness says which FlowSchema classified each request (a response header):
/// the ServiceAccount's requests on its election Lease match the chart's, and nothing else does.
async fn election_requests_use_the_leader_election_priority_level(
    cp: &LocalControlPlane,
    client: &Client,
) {
    let schema = Api::<FlowSchema>::all(client.clone())
        .get(&format!("{RELEASE_NS}-roster-election"))
        .await
        .expect("the chart's FlowSchema");
    assert_eq!(
        schema
            .spec
            .as_ref()
            .map(|s| s.priority_level_configuration.name.as_str()),
        Some("leader-election")
    );
    let uid = schema.metadata.uid.clone().unwrap_or_default();
    let kubeconfig = service_account_kubeconfig(&cp.kubeconfig, client, RELEASE_NS, "roster").await;
    let account = roster::control_plane::client_for(&kubeconfig)
        .await
        .expect("the ServiceAccount's client");
    let classified = |path: String| {
        let account = account.clone();
        async move {
            let mut request = http::Request::new(kube::client::Body::empty());
            *request.uri_mut() = path.parse().expect("a path");
            let response = account.send(request).await.expect("a response");
            assert!(
                response.status().is_success(),
                "{path}: {}",
                response.status()
            );
            response
                .headers()
                .get("X-Kubernetes-PF-FlowSchema-UID")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        }
    };
    let lease = format!("/apis/coordination.k8s.io/v1/namespaces/{RELEASE_NS}/leases/roster");
    assert_eq!(classified(lease).await, uid, "the election Lease");
    let instances = "/apis/roster.dev/v1alpha1/serviceinstances".to_string();
    assert_ne!(
        classified(instances).await,
        uid,
        "the controller's other requests"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn installed_for_one_namespace_it_reaches_no_other_and_upgrade_and_uninstall_leave_no_orphans()
 {
    let cp = tokio::task::spawn_blocking(LocalControlPlane::start)
        .await
        .expect("start a control plane");
    let client = roster::control_plane::client_for(&cp.kubeconfig)
        .await
        .expect("admin client");
    let helm = Helm::new(Some(&cp.kubeconfig)).await;
    for ns in ["team-a", "team-b"] {
        create_namespace(&client, ns).await;
    }
    helm.ok(&[
        "install",
        "roster",
        CHART,
        "-n",
        RELEASE_NS,
        "--create-namespace",
        "--set",
        "watchNamespace=team-a",
        "--set",
        "registry.defaultTTL=2s",
    ]);
    let mut controller = run_as_deployed(&cp, &client).await;
    core_scenario(&client, &controller, "team-a").await;

    let mut table = serving("team-a");
    table.extend(never("team-a"));
    table.extend([
        cannot("list", "serviceinstances.roster.dev", ""),
        cannot("list", "serviceinstances.roster.dev", "team-b"),
        cannot("patch", "serviceinstances.roster.dev/status", "team-b"),
        cannot("list", "leases.coordination.k8s.io", "team-b"),
        cannot("create", "services", "team-b"),
        cannot("delete", "configmaps", "team-b"),
        cannot("create", "endpointslices.discovery.k8s.io", "team-b"),
    ]);
    table.extend(never("team-b"));
    assert_access(&client, RELEASE_NS, "roster", &table).await;
    controller.signal(libc::SIGTERM);
    controller.wait_exit(WAIT).await;

    // Upgrade to serve every namespace with three replicas: the namespaced Role goes, a
    // ClusterRole comes, and the Deployment follows.
    let before = owned(&client).await;
    assert!(
        before.contains(&"Role team-a/roster".to_string()),
        "{before:?}"
    );
    helm.ok(&[
        "upgrade",
        "roster",
        CHART,
        "-n",
        RELEASE_NS,
        "--set",
        "replicaCount=3",
        "--set",
        "log.level=debug",
    ]);
    let after = owned(&client).await;
    for (gone, came) in [
        ("Role team-a/roster", "ClusterRole roster"),
        ("RoleBinding team-a/roster", "ClusterRoleBinding roster"),
    ] {
        assert!(!after.contains(&gone.to_string()), "{after:?}");
        assert!(after.contains(&came.to_string()), "{after:?}");
    }
    let deployment = Api::<Deployment>::namespaced(client.clone(), RELEASE_NS)
        .get("roster")
        .await
        .expect("the Deployment");
    assert_eq!(deployment.spec.as_ref().and_then(|s| s.replicas), Some(3));
    let args = deployment
        .spec
        .and_then(|s| s.template.spec)
        .map(|p| p.containers[0].args.clone().unwrap_or_default())
        .unwrap_or_default();
    assert!(
        !args.iter().any(|a| a.starts_with("--namespace")),
        "{args:?}"
    );

    // Uninstall: nothing of the release is left (the election Lease included), but the CRD
    // stays, as Helm never deletes CRDs (docs/install.md says how to remove it).
    helm.ok(&["uninstall", "roster", "-n", RELEASE_NS, "--wait"]);
    let left = owned(&client).await;
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(
        Api::<Lease>::namespaced(client.clone(), RELEASE_NS)
            .get_opt("roster")
            .await
            .expect("get")
            .is_none()
    );
    Api::<CustomResourceDefinition>::all(client.clone())
        .get("serviceinstances.roster.dev")
        .await
        .expect("the CRD stays");
}

/// Every object carrying the release's label, of every kind the chart renders, as "Kind ns/name".
async fn owned(client: &Client) -> Vec<String> {
    let params = ListParams::default().labels("app.kubernetes.io/instance=roster");
    let mut found = Vec::new();
    macro_rules! collect {
        ($($kind:ty),*) => {$(
            for o in Api::<$kind>::all(client.clone()).list(&params).await.expect("list").items {
                let kind = <$kind as kube::Resource>::kind(&()).to_string();
                found.push(match o.namespace() {
                    Some(ns) => format!("{kind} {ns}/{}", o.name_any()),
                    None => format!("{kind} {}", o.name_any()),
                });
            }
        )*};
    }
    collect!(
        Deployment,
        ServiceAccount,
        Service,
        PodDisruptionBudget,
        Lease,
        Role,
        RoleBinding,
        ClusterRole,
        ClusterRoleBinding,
        ConfigMap,
        FlowSchema
    );
    found.sort();
    found
}
