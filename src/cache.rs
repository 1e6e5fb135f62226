//! What the watch caches keep. Every cached object is pruned, before the reflector stores it,
//! to the fields Roster reads: managed fields (often the largest part of a small object) always
//! go, and annotations go except the ones Roster acts on (`kubectl apply` alone adds a copy of
//! the whole object as `last-applied-configuration`). An instance is kept as an [`Instance`].

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    hash::{BuildHasher, RandomState},
    sync::LazyLock,
};

use k8s_openapi::api::{
    core::v1::{ConfigMap, Service, ServiceSpec},
    discovery::v1::EndpointSlice,
};
use kube::{Resource, api::ObjectMeta};

use crate::{
    api::{ServiceInstance, ServiceInstanceSpec, ServiceInstanceStatus},
    names::{CONFIG_KEY, HEARTBEAT_ANNOTATION},
    projection::{
        ExistingSlice,
        objects::{existing_slice, slice_digest},
    },
};

/// What every replica keeps of a `ServiceInstance`: its metadata without annotations, the one
/// annotation Roster reads (the heartbeat) as a plain field, its spec and its status.
///
/// A map of one annotation costs a whole B-tree node (544 bytes, more than the heartbeat
/// itself ten times over): at 10 000 instances that was 5.4 MB of the instance cache.
#[derive(Clone, Debug, PartialEq)]
pub struct Instance {
    /// Never holds annotations (nor managed fields).
    pub metadata: ObjectMeta,
    /// The `roster.dev/heartbeat` annotation.
    pub heartbeat: Option<String>,
    pub spec: ServiceInstanceSpec,
    pub status: Option<ServiceInstanceStatus>,
}

impl Instance {
    /// Builds it from parts as read: `metadata` loses its annotations, the heartbeat is kept.
    pub fn new(
        mut metadata: ObjectMeta,
        spec: ServiceInstanceSpec,
        status: Option<ServiceInstanceStatus>,
    ) -> Instance {
        let heartbeat = metadata
            .annotations
            .take()
            .and_then(|mut a| a.remove(HEARTBEAT_ANNOTATION));
        metadata.managed_fields = None;
        Instance {
            metadata,
            heartbeat,
            spec,
            status,
        }
    }
}

impl From<ServiceInstance> for Instance {
    fn from(si: ServiceInstance) -> Instance {
        Instance::new(si.metadata, si.spec, si.status)
    }
}

/// Read as a `ServiceInstance` is (the controller's watch decodes with `decode::Incoming`
/// instead, so that one bad object does not fail a list).
impl<'de> serde::Deserialize<'de> for Instance {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        ServiceInstance::deserialize(deserializer).map(Instance::from)
    }
}

/// The type-level half of `Resource` for a type that stands for another, namespaced resource
/// (what the caches keep of a `ServiceInstance` or an EndpointSlice, what the watch decodes):
/// its kind, group, version and plural.
macro_rules! resource_of {
    ($of:ty) => {
        type DynamicType = ();
        type Scope = k8s_openapi::NamespaceResourceScope;

        fn kind(dt: &()) -> std::borrow::Cow<'_, str> {
            <$of as kube::Resource>::kind(dt)
        }
        fn group(dt: &()) -> std::borrow::Cow<'_, str> {
            <$of as kube::Resource>::group(dt)
        }
        fn version(dt: &()) -> std::borrow::Cow<'_, str> {
            <$of as kube::Resource>::version(dt)
        }
        fn plural(dt: &()) -> std::borrow::Cow<'_, str> {
            <$of as kube::Resource>::plural(dt)
        }
    };
}
pub(crate) use resource_of;

impl Resource for Instance {
    resource_of!(crate::api::ServiceInstance);

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// What the projector keeps of an EndpointSlice: its metadata (pruned like every cached
/// object's), what the packing reads back of it (address type, ports, members' names) and a
/// digest of the rest of what Roster writes, which tells whether a desired slice differs.
/// Whole slices were 5.6 MB of the projector's caches at 10 000 instances (heaptrack).
#[derive(Clone, Debug, PartialEq)]
pub struct Slice {
    pub metadata: ObjectMeta,
    /// `None` for a slice not shaped like Roster's.
    pub existing: Option<ExistingSlice>,
    /// [`slice_digest`] of the slice as stored.
    pub digest: Option<u64>,
}

impl From<EndpointSlice> for Slice {
    fn from(slice: EndpointSlice) -> Slice {
        Slice {
            existing: existing_slice(&slice),
            digest: slice_digest(&slice),
            metadata: slice.metadata,
        }
    }
}

impl<'de> serde::Deserialize<'de> for Slice {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        EndpointSlice::deserialize(deserializer).map(Slice::from)
    }
}

impl Resource for Slice {
    resource_of!(EndpointSlice);

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// Drops managed fields, and every annotation not in `keep`.
pub fn prune(meta: &mut ObjectMeta, keep: &[&str]) {
    meta.managed_fields = None;
    if let Some(annotations) = &mut meta.annotations {
        annotations.retain(|k, _| keep.contains(&k.as_str()));
        if annotations.is_empty() {
            meta.annotations = None;
        }
    }
}

/// Keeps of a Service's spec what the projector reads (its selector and ports), and no status:
/// the projector watches every Service in its namespaces, since any may be adopted.
pub fn slim_service(svc: &mut Service) {
    svc.spec = svc.spec.take().map(|spec| ServiceSpec {
        selector: spec.selector,
        ports: spec.ports,
        ..ServiceSpec::default()
    });
    svc.status = None;
}

/// A digest of `text`, to tell whether it changed without keeping it: SipHash with keys
/// drawn once per process (so nobody can craft a collision in advance), 64 bits, so two
/// different texts compare equal once in 2^64.
pub fn digest(text: &str) -> u64 {
    static KEYS: LazyLock<RandomState> = LazyLock::new(RandomState::new);
    KEYS.hash_one(text)
}

/// Where a cached ConfigMap of Roster's keeps the digest of its JSON view.
const DIGEST_KEY: &str = "digest";

/// Replaces a Roster ConfigMap's JSON view (the largest part of the projector's caches: the
/// whole service, per service) by its [`digest`]: the projector only ever asks whether it
/// differs from the view it would write.
pub fn digest_config_map(cm: &mut ConfigMap) {
    let view = cm.data.as_ref().and_then(|d| d.get(CONFIG_KEY));
    cm.data = view.map(|v| BTreeMap::from([(DIGEST_KEY.to_string(), digest(v).to_string())]));
    cm.binary_data = None;
}

/// Whether a ConfigMap pruned by [`digest_config_map`] holds `view`.
pub fn config_map_holds(cm: &ConfigMap, view: &str) -> bool {
    cm.data
        .as_ref()
        .and_then(|d| d.get(DIGEST_KEY))
        .is_some_and(|d| *d == digest(view).to_string())
}

/// Objects grouped by a name they point to (instances by their Lease, slices by their
/// service), both ways, within a namespace: so a group is found without scanning a cache, and
/// an object that moves or goes leaves nothing behind.
#[derive(Debug, Default)]
pub struct Grouping {
    /// (namespace, group) → members.
    groups: HashMap<(String, String), BTreeSet<String>>,
    /// (namespace, member) → its group.
    of: HashMap<(String, String), String>,
}

impl Grouping {
    /// Puts `member` in `group` (`None`: in none), leaving the group it was in.
    pub fn set(&mut self, ns: &str, member: &str, group: Option<String>) {
        let key = (ns.to_string(), member.to_string());
        if let Some(old) = self.of.remove(&key) {
            let old = (ns.to_string(), old);
            if let Some(members) = self.groups.get_mut(&old) {
                members.remove(member);
                if members.is_empty() {
                    self.groups.remove(&old);
                }
            }
        }
        if let Some(group) = group {
            self.groups
                .entry((ns.to_string(), group.clone()))
                .or_default()
                .insert(member.to_string());
            self.of.insert(key, group);
        }
    }

    /// The members of `group`, in name order.
    pub fn members(&self, ns: &str, group: &str) -> impl Iterator<Item = &String> {
        self.groups
            .get(&(ns.to_string(), group.to_string()))
            .into_iter()
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;

    use super::*;

    #[test]
    fn keeps_only_what_is_read() {
        let mut meta = ObjectMeta {
            name: Some("a".into()),
            labels: Some(BTreeMap::from([("l".into(), "v".into())])),
            annotations: Some(BTreeMap::from([
                ("roster.dev/heartbeat".into(), "1".into()),
                (
                    "kubectl.kubernetes.io/last-applied-configuration".into(),
                    "{}".into(),
                ),
            ])),
            managed_fields: Some(vec![ManagedFieldsEntry::default()]),
            ..ObjectMeta::default()
        };
        prune(&mut meta, &["roster.dev/heartbeat"]);
        assert_eq!(meta.managed_fields, None);
        assert_eq!(
            meta.annotations,
            Some(BTreeMap::from([(
                "roster.dev/heartbeat".into(),
                "1".into()
            )]))
        );
        assert_eq!(meta.labels.as_ref().map(BTreeMap::len), Some(1));
        prune(&mut meta, &[]);
        assert_eq!(meta.annotations, None);
    }

    #[test]
    fn a_cached_service_keeps_its_selector_and_ports_only() {
        use k8s_openapi::api::core::v1::{ServicePort, ServiceStatus};
        let ports = Some(vec![ServicePort {
            port: 80,
            ..ServicePort::default()
        }]);
        let selector = Some(BTreeMap::from([("app".to_string(), "web".to_string())]));
        let mut svc = Service {
            spec: Some(ServiceSpec {
                selector: selector.clone(),
                ports: ports.clone(),
                cluster_ips: Some(vec!["10.96.0.10".into()]),
                ip_families: Some(vec!["IPv4".into()]),
                ..ServiceSpec::default()
            }),
            status: Some(ServiceStatus::default()),
            ..Service::default()
        };
        slim_service(&mut svc);
        let want = ServiceSpec {
            selector,
            ports,
            ..ServiceSpec::default()
        };
        assert_eq!((svc.spec, svc.status), (Some(want), None));
    }

    #[test]
    fn a_cached_slice_keeps_what_the_packing_reads_and_tells_a_change() {
        use crate::projection::{
            Backend,
            objects::{same_slice, slice_object},
            pack,
        };
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
        let mut si = ServiceInstance::new(
            "a",
            ServiceInstanceSpec::new(
                "web",
                "10.0.0.1",
                vec![crate::api::InstancePort::tcp("http", 80)],
            ),
        );
        si.metadata.uid = Some("u1".into());
        let Some(member) = Backend::from_instance(&Instance::from(si)) else {
            panic!("an instance with a name and a uid is a backend");
        };
        let owner = OwnerReference {
            name: "web".into(),
            uid: "s1".into(),
            ..OwnerReference::default()
        };
        let desired = |member: &Backend| {
            let slices = pack("web", std::slice::from_ref(member), &[]);
            slice_object("ns", "web", &slices[0], &owner)
        };
        let written = desired(&member);
        // As the apiserver stores it: with fields and labels others add.
        let mut stored = written.clone();
        stored.metadata.managed_fields = Some(vec![ManagedFieldsEntry::default()]);
        stored.metadata.resource_version = Some("7".into());
        if let Some(labels) = &mut stored.metadata.labels {
            labels.insert("team".into(), "blue".into());
        }
        let cached = Slice::from(stored.clone());
        assert!(same_slice(&cached, &written));
        let existing = cached
            .existing
            .as_ref()
            .map(|e| (e.name.clone(), e.members.clone()));
        assert_eq!(
            existing,
            Some((
                written.metadata.name.clone().unwrap_or_default(),
                vec!["a".to_string()]
            ))
        );
        // Another phase, another address, or a missing label of Roster's: not the same.
        let mut ready = member.clone();
        ready.phase = Some(crate::api::Phase::Ready);
        let mut moved = member.clone();
        moved.address = "10.0.0.2".into();
        for other in [desired(&ready), desired(&moved)] {
            assert!(!same_slice(&cached, &other));
        }
        let mut unlabelled = stored;
        unlabelled.metadata.labels = None;
        assert!(!same_slice(&Slice::from(unlabelled), &written));
    }

    #[test]
    fn an_instance_keeps_its_heartbeat_and_no_annotations() {
        let mut si = ServiceInstance::new("a", ServiceInstanceSpec::new("web", "10.0.0.1", vec![]));
        si.metadata.annotations = Some(BTreeMap::from([
            (
                HEARTBEAT_ANNOTATION.to_string(),
                "2026-12-05T12:00:00Z".to_string(),
            ),
            ("other".to_string(), "x".to_string()),
        ]));
        si.metadata.managed_fields = Some(vec![ManagedFieldsEntry::default()]);
        let instance = Instance::from(si.clone());
        assert_eq!(instance.heartbeat.as_deref(), Some("2026-12-05T12:00:00Z"));
        assert_eq!(
            (
                instance.metadata.annotations,
                instance.metadata.managed_fields
            ),
            (None, None)
        );
        assert_eq!(
            (instance.spec, instance.metadata.name),
            (si.spec, si.metadata.name)
        );
        assert_eq!(
            Instance::from(ServiceInstance::new(
                "b",
                ServiceInstanceSpec::new("web", "10.0.0.2", vec![])
            ))
            .heartbeat,
            None
        );
    }

    #[test]
    fn a_cached_config_map_keeps_a_digest_of_its_view_and_tells_a_change() {
        let view = r#"{"instances":[{"name":"a"}]}"#;
        let mut cm = ConfigMap {
            data: Some(BTreeMap::from([(CONFIG_KEY.to_string(), view.to_string())])),
            ..ConfigMap::default()
        };
        digest_config_map(&mut cm);
        assert!(
            !cm.data
                .iter()
                .flatten()
                .any(|(_, v)| v.contains("instances"))
        );
        assert!(config_map_holds(&cm, view));
        assert!(!config_map_holds(&cm, r#"{"instances":[]}"#));
        let mut empty = ConfigMap::default();
        digest_config_map(&mut empty);
        assert!(!config_map_holds(&empty, view));
        assert!(!config_map_holds(&empty, ""));
    }

    #[test]
    fn a_member_that_moves_or_goes_leaves_nothing_behind() {
        let mut g = Grouping::default();
        let members = |g: &Grouping, group| g.members("ns", group).cloned().collect::<Vec<_>>();
        g.set("ns", "b", Some("web".into()));
        g.set("ns", "a", Some("web".into()));
        g.set("other", "c", Some("web".into()));
        assert_eq!(members(&g, "web"), ["a", "b"]);
        g.set("ns", "a", Some("api".into()));
        assert_eq!(
            (members(&g, "web"), members(&g, "api")),
            (vec!["b".into()], vec!["a".into()])
        );
        g.set("ns", "b", None);
        assert!(
            members(&g, "web").is_empty() && !g.groups.contains_key(&("ns".into(), "web".into()))
        );
        assert_eq!(g.members("other", "web").count(), 1);
    }
}
