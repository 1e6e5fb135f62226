//! The Kubernetes objects of a projection, built from its pure parts, and the comparisons that
//! decide whether a stored object already says what is desired.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        core::v1::{
            EndpointAddress, EndpointPort as CorePort, EndpointSubset, Endpoints, ObjectReference,
            Service, ServicePort,
        },
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use kube::{Resource, ResourceExt, api::ObjectMeta};

use crate::{
    api::ServiceInstance,
    cache::{Slice, digest},
    names::{
        ADOPT_ANNOTATION, MANAGED_BY, MANAGED_BY_LABEL, OVER_CAPACITY_ANNOTATION,
        SERVICE_NAME_LABEL, SKIP_MIRROR_LABEL, SLICE_MANAGED_BY_LABEL,
    },
    projection::{
        AddressType, Backend, DesiredSlice, EndpointsView, ExistingSlice, PortKey, SliceKey,
    },
};

/// A reference to an instance: an endpoint's `targetRef`, and what Events are about.
pub fn instance_reference(ns: &str, name: &str, uid: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some(ServiceInstance::api_version(&()).into()),
        kind: Some(ServiceInstance::kind(&()).into()),
        name: Some(name.into()),
        namespace: Some(ns.into()),
        uid: Some(uid.into()),
        ..ObjectReference::default()
    }
}

/// A Service is Roster's when it carries Roster's label or the user opted it in.
pub fn is_ours(svc: &Service) -> bool {
    has_labels(svc.labels(), &[(MANAGED_BY_LABEL, MANAGED_BY)])
        || svc.annotations().get(ADOPT_ANNOTATION).map(String::as_str) == Some("true")
}

pub fn has_labels(labels: &BTreeMap<String, String>, want: &[(&str, &str)]) -> bool {
    want.iter()
        .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
}

/// Whether `stored` carries every label `desired` sets (others may add more).
fn carries_labels_of<S: Resource, D: Resource>(stored: &S, desired: &D) -> bool {
    let want: Vec<(&str, &str)> = desired
        .labels()
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    has_labels(stored.labels(), &want)
}

pub fn same_ports(stored: &[ServicePort], desired: &[ServicePort]) -> bool {
    let key = |p: &ServicePort| {
        (
            p.name.clone(),
            p.port,
            p.target_port.clone().map(|t| format!("{t:?}")),
            p.protocol.clone().unwrap_or_else(|| "TCP".into()),
            p.app_protocol.clone(),
        )
    };
    let mut a: Vec<_> = stored.iter().map(key).collect();
    let mut b: Vec<_> = desired.iter().map(key).collect();
    a.sort();
    b.sort();
    a == b
}

pub fn owner_reference(svc: &Service) -> OwnerReference {
    OwnerReference {
        api_version: "v1".into(),
        kind: "Service".into(),
        name: svc.name_any(),
        uid: svc.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// Reads back what a stored slice holds; `None` for one that is not shaped like Roster's.
pub fn existing_slice(slice: &EndpointSlice) -> Option<ExistingSlice> {
    let mut ports: Vec<PortKey> = slice
        .ports
        .iter()
        .flatten()
        .map(|p| PortKey {
            name: p.name.clone().unwrap_or_default(),
            port: p.port.unwrap_or_default(),
            protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
            app_protocol: p.app_protocol.clone(),
        })
        .collect();
    ports.sort();
    Some(ExistingSlice {
        name: slice.metadata.name.clone()?,
        key: SliceKey {
            address_type: AddressType::parse(&slice.address_type)?,
            ports,
        },
        members: slice
            .endpoints
            .iter()
            .filter_map(|e| e.target_ref.as_ref()?.name.clone())
            .collect(),
    })
}

pub fn slice_object(
    ns: &str,
    service: &str,
    slice: &DesiredSlice,
    owner: &OwnerReference,
) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(slice.name.clone()),
            namespace: Some(ns.into()),
            labels: Some(BTreeMap::from([
                (SERVICE_NAME_LABEL.into(), service.into()),
                (SLICE_MANAGED_BY_LABEL.into(), MANAGED_BY.into()),
                // So `kubectl get svc,endpointslices,cm -l app.kubernetes.io/managed-by=roster.dev`
                // lists everything Roster writes.
                (MANAGED_BY_LABEL.into(), MANAGED_BY.into()),
            ])),
            owner_references: Some(vec![owner.clone()]),
            ..ObjectMeta::default()
        },
        address_type: slice.key.address_type.as_str().into(),
        ports: Some(
            slice
                .key
                .ports
                .iter()
                .map(|p| EndpointPort {
                    name: Some(p.name.clone()),
                    port: Some(p.port),
                    protocol: Some(p.protocol.clone()),
                    app_protocol: p.app_protocol.clone(),
                })
                .collect(),
        ),
        endpoints: slice
            .members
            .iter()
            .map(|m| {
                let c = m.conditions();
                Endpoint {
                    addresses: vec![m.address.clone()],
                    conditions: Some(EndpointConditions {
                        ready: Some(c.ready),
                        serving: Some(c.serving),
                        terminating: Some(c.terminating),
                    }),
                    zone: m.zone.clone(),
                    target_ref: Some(instance_reference(ns, &m.name, &m.uid)),
                    ..Endpoint::default()
                }
            })
            .collect(),
    }
}

/// Whether a cached slice already says what `desired` says (our labels, and the owner, address
/// type, ports and endpoints its [`slice_digest`] covers); fields others may add (more labels,
/// annotations) do not count.
pub fn same_slice(stored: &Slice, desired: &EndpointSlice) -> bool {
    carries_labels_of(stored, desired)
        && stored.digest.is_some()
        && stored.digest == slice_digest(desired)
}

/// A digest of what Roster writes of a slice beside its labels: owner, address type, ports and
/// endpoints (`None` only if they cannot be serialized).
pub fn slice_digest(slice: &EndpointSlice) -> Option<u64> {
    let written = (
        &slice.metadata.owner_references,
        &slice.address_type,
        &slice.ports,
        &slice.endpoints,
    );
    serde_json::to_string(&written)
        .ok()
        .map(|json| digest(&json))
}

/// The v1 Endpoints object of a service: labelled so the mirroring controller leaves it alone,
/// and annotated when it lists fewer addresses than there are. No subsets is `None`, as the
/// apiserver stores it.
pub fn endpoints_object(
    ns: &str,
    service: &str,
    view: &EndpointsView,
    owner: &OwnerReference,
) -> Endpoints {
    let address = |m: &Backend| EndpointAddress {
        ip: m.address.clone(),
        target_ref: Some(instance_reference(ns, &m.name, &m.uid)),
        ..EndpointAddress::default()
    };
    let some = |v: Vec<EndpointAddress>| (!v.is_empty()).then_some(v);
    let subsets: Vec<EndpointSubset> = view
        .subsets
        .iter()
        .map(|s| EndpointSubset {
            addresses: some(s.ready.iter().map(address).collect()),
            not_ready_addresses: some(s.not_ready.iter().map(address).collect()),
            ports: Some(
                s.ports
                    .iter()
                    .map(|p| CorePort {
                        name: Some(p.name.clone()),
                        port: p.port,
                        protocol: Some(p.protocol.clone()),
                        app_protocol: p.app_protocol.clone(),
                    })
                    .collect(),
            ),
        })
        .collect();
    Endpoints {
        metadata: ObjectMeta {
            name: Some(service.into()),
            namespace: Some(ns.into()),
            labels: Some(BTreeMap::from([
                (SKIP_MIRROR_LABEL.into(), "true".into()),
                (MANAGED_BY_LABEL.into(), MANAGED_BY.into()),
            ])),
            annotations: view
                .truncated
                .then(|| BTreeMap::from([(OVER_CAPACITY_ANNOTATION.into(), "truncated".into())])),
            owner_references: Some(vec![owner.clone()]),
            ..ObjectMeta::default()
        },
        subsets: (!subsets.is_empty()).then_some(subsets),
    }
}

/// Whether a stored Endpoints object already says what `desired` says: our labels, the
/// over-capacity mark, owner and subsets; what others add does not count.
pub fn same_endpoints(stored: &Endpoints, desired: &Endpoints) -> bool {
    let truncated = |e: &Endpoints| e.annotations().get(OVER_CAPACITY_ANNOTATION).cloned();
    carries_labels_of(stored, desired)
        && truncated(stored) == truncated(desired)
        && stored.metadata.owner_references == desired.metadata.owner_references
        && stored.subsets == desired.subsets
}
