//! Projection: from a service's instances to the objects Kubernetes clients read — a
//! selectorless Service, EndpointSlices and a ConfigMap with a JSON view.
//!
//! Pure functions over plain data; the projector (`src/projector/`) reads the registry index, calls
//! these, and writes only what differs.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use serde::Serialize;

use crate::{
    api::{InstancePort, Phase},
    cache::Instance,
};

pub mod objects;

/// At most this many endpoints per EndpointSlice, as the built-in controller.
pub const MAX_ENDPOINTS_PER_SLICE: usize = 100;

/// One instance, as the projection sees it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Backend {
    pub name: String,
    pub uid: String,
    pub address: String,
    pub ports: Vec<InstancePort>,
    pub weight: i32,
    pub zone: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub phase: Option<Phase>,
    /// Being deleted (it has a deletionTimestamp): projected as terminating.
    pub deleting: bool,
}

impl Backend {
    pub fn from_instance(si: &Instance) -> Option<Backend> {
        Some(Backend {
            name: si.metadata.name.clone()?,
            uid: si.metadata.uid.clone()?,
            address: si.spec.address.clone(),
            ports: si.spec.ports.clone(),
            weight: si.spec.weight,
            zone: si.spec.zone.clone(),
            metadata: si.spec.metadata.clone(),
            phase: si.status.as_ref().and_then(|s| s.phase),
            deleting: si.metadata.deletion_timestamp.is_some(),
        })
    }

    /// Why this instance's address cannot be an EndpointSlice endpoint, if it cannot: the
    /// apiserver refuses loopback, link-local, unspecified and multicast IPs in slices, and an
    /// FQDN needs at least two labels.
    pub fn endpoint_problem(&self) -> Option<String> {
        let special = || {
            Some(format!(
                "address {} is a loopback, link-local, unspecified or multicast IP, which an EndpointSlice cannot hold",
                self.address
            ))
        };
        match self.address.parse::<IpAddr>() {
            Ok(ip) if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() => special(),
            Ok(IpAddr::V4(v4)) if v4.is_link_local() => special(),
            Ok(IpAddr::V6(v6)) if v6.is_unicast_link_local() => special(),
            Ok(_) => None,
            Err(_) if !self.address.trim_end_matches('.').contains('.') => Some(format!(
                "address {:?} is a single-label name; an EndpointSlice needs a fully qualified domain name",
                self.address
            )),
            Err(_) => None,
        }
    }

    /// Endpoint conditions: Ready → ready; Draining, or being deleted → serving (if it was)
    /// and terminating, so in-flight work drains; Pending, Unhealthy, or weight 0 (registered
    /// but takes no traffic) → none.
    pub fn conditions(&self) -> Conditions {
        if self.deleting {
            return Conditions {
                ready: false,
                serving: matches!(self.phase, Some(Phase::Ready | Phase::Draining)),
                terminating: true,
            };
        }
        if self.weight == 0 {
            return Conditions::default();
        }
        match self.phase {
            Some(Phase::Ready) => Conditions {
                ready: true,
                serving: true,
                terminating: false,
            },
            Some(Phase::Draining) => Conditions {
                ready: false,
                serving: true,
                terminating: true,
            },
            Some(Phase::Pending | Phase::Unhealthy) | None => Conditions::default(),
        }
    }

    fn slice_key(&self) -> SliceKey {
        let mut ports: Vec<PortKey> = self.ports.iter().map(PortKey::from).collect();
        ports.sort();
        SliceKey {
            address_type: AddressType::of(&self.address),
            ports,
        }
    }
}

/// An endpoint's conditions, as in `discovery.k8s.io/v1`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Conditions {
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

/// An EndpointSlice holds one address type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AddressType {
    IPv4,
    IPv6,
    Fqdn,
}

impl AddressType {
    pub fn of(address: &str) -> AddressType {
        match address.parse::<IpAddr>() {
            Ok(IpAddr::V4(_)) => AddressType::IPv4,
            Ok(IpAddr::V6(_)) => AddressType::IPv6,
            Err(_) => AddressType::Fqdn,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AddressType::IPv4 => "IPv4",
            AddressType::IPv6 => "IPv6",
            AddressType::Fqdn => "FQDN",
        }
    }

    pub fn parse(s: &str) -> Option<AddressType> {
        match s {
            "IPv4" => Some(AddressType::IPv4),
            "IPv6" => Some(AddressType::IPv6),
            "FQDN" => Some(AddressType::Fqdn),
            _ => None,
        }
    }
}

/// A port as an EndpointSlice carries it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortKey {
    pub name: String,
    pub port: i32,
    pub protocol: String,
    pub app_protocol: Option<String>,
}

impl From<&InstancePort> for PortKey {
    fn from(p: &InstancePort) -> Self {
        PortKey {
            name: p.name.clone(),
            port: p.port,
            protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
            app_protocol: p.app_protocol.clone(),
        }
    }
}

/// Endpoints share a slice only when they share its address type and its port list (an
/// EndpointSlice has one list of ports for all its endpoints).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SliceKey {
    pub address_type: AddressType,
    pub ports: Vec<PortKey>,
}

/// A slice as it stands in the cluster: its name, what it holds, and for whom.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExistingSlice {
    pub name: String,
    pub key: SliceKey,
    /// Names of the instances it holds endpoints for (from the endpoints' targetRefs).
    pub members: Vec<String>,
}

/// A slice as it should be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredSlice {
    pub name: String,
    pub key: SliceKey,
    /// Sorted by name.
    pub members: Vec<Backend>,
}

/// Packs the members into slices of at most [`MAX_ENDPOINTS_PER_SLICE`], keeping every endpoint
/// in the slice it is already in whenever that slice still fits it, so that one instance's
/// change rewrites one slice. New endpoints fill existing slices with room first (in name
/// order), then new slices named `<service>-<n>` with the smallest free `n`. Slices left empty
/// are not in the result: the caller deletes them.
pub fn pack(service: &str, members: &[Backend], existing: &[ExistingSlice]) -> Vec<DesiredSlice> {
    let by_name: BTreeMap<&str, &Backend> = members.iter().map(|m| (m.name.as_str(), m)).collect();
    let mut placed: BTreeSet<&str> = BTreeSet::new();
    let mut slices: BTreeMap<String, (SliceKey, Vec<&Backend>)> = BTreeMap::new();

    let mut existing: Vec<&ExistingSlice> = existing.iter().collect();
    existing.sort_by(|a, b| a.name.cmp(&b.name));
    for slice in &existing {
        let mut kept = Vec::new();
        for name in &slice.members {
            if let Some(m) = by_name.get(name.as_str())
                && m.slice_key() == slice.key
                && kept.len() < MAX_ENDPOINTS_PER_SLICE
                && placed.insert(m.name.as_str())
            {
                kept.push(*m);
            }
        }
        slices.insert(slice.name.clone(), (slice.key.clone(), kept));
    }

    let mut taken: BTreeSet<String> = existing.iter().map(|s| s.name.clone()).collect();
    for m in by_name
        .values()
        .filter(|m| !placed.contains(m.name.as_str()))
    {
        let key = m.slice_key();
        let room = slices
            .iter_mut()
            .find(|(_, (k, ms))| *k == key && ms.len() < MAX_ENDPOINTS_PER_SLICE);
        match room {
            Some((_, (_, ms))) => ms.push(m),
            None => {
                let name = (0..)
                    .map(|n| format!("{service}-{n}"))
                    .find(|n| !taken.contains(n))
                    .unwrap_or_else(|| format!("{service}-x"));
                taken.insert(name.clone());
                slices.insert(name, (key, vec![m]));
            }
        }
    }

    slices
        .into_iter()
        .filter(|(_, (_, ms))| !ms.is_empty())
        .map(|(name, (key, ms))| {
            let mut members: Vec<Backend> = ms.into_iter().cloned().collect();
            members.sort_by(|a, b| a.name.cmp(&b.name));
            DesiredSlice { name, key, members }
        })
        .collect()
}

/// The Service's ports: one per port name across the instances, with the lowest port number
/// seen for that name (a selectorless Service forwards by name to each endpoint's own number).
pub fn service_ports(members: &[Backend]) -> Vec<PortKey> {
    let mut by_name: BTreeMap<String, PortKey> = BTreeMap::new();
    for port in members
        .iter()
        .flat_map(|m| m.ports.iter().map(PortKey::from))
    {
        match by_name.get(&port.name) {
            Some(existing) if existing.port <= port.port => {}
            _ => {
                by_name.insert(port.name.clone(), port);
            }
        }
    }
    // A Service cannot hold two ports with the same number and protocol: a later name (in name
    // order) whose number is taken is left out of the Service; its endpoints still carry it.
    let mut taken = BTreeSet::new();
    by_name
        .into_values()
        .filter(|p| taken.insert((p.port, p.protocol.clone())))
        .collect()
}

/// One instance in the ConfigMap's JSON view. Field order is the JSON order.
#[derive(Debug, Serialize)]
struct JsonInstance<'a> {
    name: &'a str,
    address: &'a str,
    ports: BTreeMap<&'a str, i32>,
    weight: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    zone: Option<&'a str>,
    metadata: &'a BTreeMap<String, String>,
    ready: bool,
    serving: bool,
}

#[derive(Debug, Serialize)]
struct JsonView<'a> {
    service: &'a str,
    instances: Vec<JsonInstance<'a>>,
}

/// Deterministic JSON of the service's instances (sorted by name; maps sorted by key): the
/// same registry always gives the same bytes, so an unchanged view is never rewritten.
pub fn config_json(service: &str, members: &[Backend]) -> String {
    let mut sorted: Vec<&Backend> = members.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let view = JsonView {
        service,
        instances: sorted
            .into_iter()
            .map(|m| {
                let c = m.conditions();
                JsonInstance {
                    name: &m.name,
                    address: &m.address,
                    ports: m.ports.iter().map(|p| (p.name.as_str(), p.port)).collect(),
                    weight: m.weight,
                    zone: m.zone.as_deref(),
                    metadata: &m.metadata,
                    ready: c.ready,
                    serving: c.serving,
                }
            })
            .collect(),
    };
    // Serializing plain strings, numbers and maps with string keys cannot fail.
    serde_json::to_string_pretty(&view).unwrap_or_default()
}

/// Largest ConfigMap payload Roster writes: etcd's 1.5 MiB request limit and the apiserver's
/// 1 MiB ConfigMap data limit, less room for metadata.
pub const MAX_CONFIG_BYTES: usize = 1_000_000;

/// At most this many addresses in an Endpoints object, as Kubernetes' endpoints controller
/// (which marks a truncated object with `endpoints.kubernetes.io/over-capacity: truncated`).
pub const MAX_ENDPOINTS_ADDRESSES: usize = 1000;

/// The v1 Endpoints view of a service, for readers that predate EndpointSlices.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointsView {
    /// Ordered by ports; addresses in each ordered by address, then name.
    pub subsets: Vec<DesiredSubset>,
    /// More instances could be listed than [`MAX_ENDPOINTS_ADDRESSES`].
    pub truncated: bool,
}

/// One subset: the instances that share a port list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredSubset {
    pub ports: Vec<PortKey>,
    pub ready: Vec<Backend>,
    pub not_ready: Vec<Backend>,
}

/// What an Endpoints object should hold. An Endpoints address is an IP, so instances addressed
/// by name (and those no endpoint can hold) are left out, as are instances being deleted (the
/// endpoints controller drops terminating pods; Endpoints cannot say "serving"). Ready instances
/// are `addresses`; the rest (Pending, Unhealthy, Draining, weight 0) are `notReadyAddresses`.
/// Over the cap, ready instances are kept first, then by name, so the choice is stable.
pub fn endpoints_view(members: &[Backend]) -> EndpointsView {
    let mut listed: Vec<(&Backend, bool)> = members
        .iter()
        .filter(|m| {
            !m.deleting && m.endpoint_problem().is_none() && m.address.parse::<IpAddr>().is_ok()
        })
        .map(|m| (m, m.conditions().ready))
        .collect();
    listed.sort_by(|(a, a_ready), (b, b_ready)| b_ready.cmp(a_ready).then(a.name.cmp(&b.name)));
    let truncated = listed.len() > MAX_ENDPOINTS_ADDRESSES;
    listed.truncate(MAX_ENDPOINTS_ADDRESSES);
    let mut subsets: BTreeMap<Vec<PortKey>, DesiredSubset> = BTreeMap::new();
    for (member, ready) in listed {
        let ports = member.slice_key().ports;
        let subset = subsets
            .entry(ports.clone())
            .or_insert_with(|| DesiredSubset {
                ports,
                ready: Vec::new(),
                not_ready: Vec::new(),
            });
        if ready {
            subset.ready.push(member.clone());
        } else {
            subset.not_ready.push(member.clone());
        }
    }
    let mut subsets: Vec<DesiredSubset> = subsets.into_values().collect();
    for subset in &mut subsets {
        for list in [&mut subset.ready, &mut subset.not_ready] {
            list.sort_by(|a, b| a.address.cmp(&b.address).then(a.name.cmp(&b.name)));
        }
    }
    EndpointsView { subsets, truncated }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn member(name: &str, address: &str, phase: Phase) -> Backend {
        Backend {
            name: name.into(),
            uid: format!("uid-{name}"),
            address: address.into(),
            ports: vec![InstancePort::tcp("http", 8080)],
            weight: 100,
            zone: None,
            metadata: BTreeMap::new(),
            phase: Some(phase),
            deleting: false,
        }
    }

    fn many(n: usize) -> Vec<Backend> {
        (0..n)
            .map(|i| {
                member(
                    &format!("i{i:04}"),
                    &format!("10.0.{}.{}", i / 250, i % 250),
                    Phase::Ready,
                )
            })
            .collect()
    }

    #[test]
    fn endpoints_list_ready_and_not_ready_ip_addresses_by_port_list() {
        let mut members = vec![
            member("b", "10.0.0.2", Phase::Ready),
            member("a", "10.0.0.1", Phase::Ready),
            member("pending", "10.0.0.3", Phase::Pending),
            member("draining", "10.0.0.4", Phase::Draining),
            member("by-name", "svc.example.com", Phase::Ready),
            member("loopback", "127.0.0.1", Phase::Ready),
            member("grpc", "10.0.0.9", Phase::Ready),
            member("going", "10.0.0.5", Phase::Ready),
        ];
        members[6].ports = vec![InstancePort::tcp("grpc", 9090)];
        members[7].deleting = true;
        let view = endpoints_view(&members);
        assert!(!view.truncated);
        let names = |list: &[Backend]| list.iter().map(|m| m.name.clone()).collect::<Vec<_>>();
        let summary: Vec<(String, Vec<String>, Vec<String>)> = view
            .subsets
            .iter()
            .map(|s| {
                (
                    s.ports[0].name.clone(),
                    names(&s.ready),
                    names(&s.not_ready),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("grpc".into(), vec!["grpc".into()], vec![]),
                (
                    "http".into(),
                    vec!["a".into(), "b".into()],
                    vec!["pending".into(), "draining".into()]
                ),
            ]
        );
    }

    #[test]
    fn endpoints_over_the_cap_keep_ready_instances_first() {
        let mut members = many(MAX_ENDPOINTS_ADDRESSES + 10);
        // The 20 last by name are not ready: 10 of them are dropped, the ready ones all stay.
        for m in members.iter_mut().rev().take(20) {
            m.phase = Some(Phase::Unhealthy);
        }
        members.reverse();
        let view = endpoints_view(&members);
        assert!(view.truncated);
        let subset = &view.subsets[0];
        assert_eq!(subset.ready.len(), MAX_ENDPOINTS_ADDRESSES + 10 - 20);
        assert_eq!(subset.not_ready.len(), 10);
        assert!(!endpoints_view(&members[..MAX_ENDPOINTS_ADDRESSES]).truncated);
        // The same registry in any order gives the same view.
        members.reverse();
        assert_eq!(endpoints_view(&members), view);
    }

    fn as_existing(slices: &[DesiredSlice]) -> Vec<ExistingSlice> {
        slices
            .iter()
            .map(|s| ExistingSlice {
                name: s.name.clone(),
                key: s.key.clone(),
                members: s.members.iter().map(|m| m.name.clone()).collect(),
            })
            .collect()
    }

    #[test]
    fn conditions_table() {
        let cases = [
            (Phase::Ready, (true, true, false)),
            (Phase::Draining, (false, true, true)),
            (Phase::Unhealthy, (false, false, false)),
            (Phase::Pending, (false, false, false)),
        ];
        for (phase, (ready, serving, terminating)) in cases {
            let c = member("a", "10.0.0.1", phase).conditions();
            assert_eq!(
                (c.ready, c.serving, c.terminating),
                (ready, serving, terminating),
                "{phase:?}"
            );
        }
    }

    #[test]
    fn weight_zero_and_deletion() {
        let mut m = member("a", "10.0.0.1", Phase::Ready);
        m.weight = 0;
        assert_eq!(m.conditions(), Conditions::default());
        m.weight = 100;
        m.deleting = true;
        let draining = Conditions {
            ready: false,
            serving: true,
            terminating: true,
        };
        assert_eq!(m.conditions(), draining);
    }

    #[test]
    fn endpoint_problems() {
        let cases = [
            ("10.0.0.1", false),
            ("127.0.0.1", true),
            ("169.254.1.1", true),
            ("0.0.0.0", true),
            ("fd00::1", false),
            ("fe80::1", true),
            ("::1", true),
            ("db.example.internal", false),
            ("db", true),
        ];
        for (address, problem) in cases {
            let m = member("a", address, Phase::Ready);
            assert_eq!(m.endpoint_problem().is_some(), problem, "{address}");
        }
    }

    #[test]
    fn service_ports_never_repeat_a_number() {
        let mut a = member("a", "10.0.0.1", Phase::Ready);
        a.ports = vec![
            InstancePort::tcp("http", 8080),
            InstancePort::tcp("web", 8080),
        ];
        let names: Vec<String> = service_ports(&[a]).into_iter().map(|p| p.name).collect();
        assert_eq!(names, vec!["http"]);
    }

    #[test]
    fn address_types() {
        assert_eq!(AddressType::of("10.0.0.1"), AddressType::IPv4);
        assert_eq!(AddressType::of("fd00::1"), AddressType::IPv6);
        assert_eq!(AddressType::of("db.example.internal"), AddressType::Fqdn);
    }

    #[test]
    fn packs_250_into_3_slices_and_one_change_touches_one() {
        let members = many(250);
        let slices = pack("web", &members, &[]);
        let sizes: Vec<usize> = slices.iter().map(|s| s.members.len()).collect();
        assert_eq!(sizes, vec![100, 100, 50]);
        assert_eq!(slices[0].name, "web-0");
        // One instance turns unhealthy: only the slice holding it changes.
        let mut changed = members.clone();
        changed[120].phase = Some(Phase::Unhealthy);
        let again = pack("web", &changed, &as_existing(&slices));
        let differ: Vec<&str> = again
            .iter()
            .zip(&slices)
            .filter(|(a, b)| a != b)
            .map(|(a, _)| a.name.as_str())
            .collect();
        assert_eq!(differ, vec!["web-1"]);
    }

    #[test]
    fn mixed_address_types_and_port_sets_get_their_own_slices() {
        let mut other_ports = member("c", "10.0.0.3", Phase::Ready);
        other_ports.ports = vec![InstancePort::tcp("grpc", 9090)];
        let members = vec![
            member("a", "10.0.0.1", Phase::Ready),
            member("b", "fd00::1", Phase::Ready),
            other_ports,
            member("d", "db.example.internal", Phase::Ready),
        ];
        let slices = pack("web", &members, &[]);
        assert_eq!(slices.len(), 4);
        for s in &slices {
            for m in &s.members {
                assert_eq!(m.slice_key(), s.key);
            }
        }
        assert_eq!(service_ports(&members).len(), 2);
    }

    #[test]
    fn deleted_members_leave_and_empty_slices_go() {
        let members = many(150);
        let slices = pack("web", &members, &[]);
        let remaining: Vec<Backend> = members[..100].to_vec();
        let again = pack("web", &remaining, &as_existing(&slices));
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].name, "web-0");
        // A new member fills the free room of an existing slice before a new slice is made.
        let mut grown = members[..150].to_vec();
        grown.remove(10);
        grown.push(member("zzz", "10.9.9.9", Phase::Ready));
        let packed = pack("web", &grown, &as_existing(&slices));
        assert_eq!(packed.len(), 2);
        assert!(
            packed[0].members.iter().any(|m| m.name == "zzz"),
            "filled the hole in web-0"
        );
    }

    #[test]
    fn config_json_is_deterministic_and_sorted() {
        let mut a = member("b", "10.0.0.2", Phase::Draining);
        a.metadata.insert("version".into(), "2".into());
        a.zone = Some("z1".into());
        let b = member("a", "10.0.0.1", Phase::Ready);
        let one = config_json("web", &[a.clone(), b.clone()]);
        let two = config_json("web", &[b, a]);
        assert_eq!(one, two);
        let parsed: serde_json::Value = serde_json::from_str(&one).expect("valid JSON");
        assert_eq!(parsed["instances"][0]["name"], "a");
        assert_eq!(parsed["instances"][1]["serving"], true);
        assert_eq!(parsed["instances"][1]["ready"], false);
        assert_eq!(parsed["instances"][1]["zone"], "z1");
        assert_eq!(parsed["instances"][1]["metadata"]["version"], "2");
    }

    fn arb_member() -> impl Strategy<Value = Backend> {
        (0u32..400, 0u8..3, 0u8..4, 0u8..2).prop_map(|(i, ty, phase, ports)| {
            let address = match ty {
                0 => format!("10.0.{}.{}", i / 200, i % 200),
                1 => format!("fd00::{i:x}"),
                _ => format!("host-{i}.example.internal"),
            };
            let phase = [
                Phase::Pending,
                Phase::Ready,
                Phase::Unhealthy,
                Phase::Draining,
            ][phase as usize];
            let mut m = member(&format!("m{i:03}"), &address, phase);
            if ports == 1 {
                m.ports.push(InstancePort::tcp("metrics", 9000));
            }
            m
        })
    }

    fn dedup(members: Vec<Backend>) -> Vec<Backend> {
        let mut seen = BTreeSet::new();
        members
            .into_iter()
            .filter(|m| seen.insert(m.name.clone()))
            .collect()
    }

    proptest! {
        /// Every member lands in exactly one slice that fits it; no slice is over capacity or
        /// empty; packing is deterministic; and repacking an unchanged registry changes nothing.
        #[test]
        fn packing_invariants(
            before in proptest::collection::vec(arb_member(), 0..400),
            after in proptest::collection::vec(arb_member(), 0..400),
        ) {
            let (before, after) = (dedup(before), dedup(after));
            let first = pack("svc", &before, &[]);
            let slices = pack("svc", &after, &as_existing(&first));
            let mut seen = BTreeSet::new();
            for s in &slices {
                prop_assert!(!s.members.is_empty());
                prop_assert!(s.members.len() <= MAX_ENDPOINTS_PER_SLICE);
                for m in &s.members {
                    prop_assert_eq!(&m.slice_key(), &s.key);
                    prop_assert!(seen.insert(m.name.clone()), "{} twice", m.name);
                }
            }
            prop_assert_eq!(seen.len(), after.len());
            prop_assert_eq!(&slices, &pack("svc", &after, &as_existing(&first)));
            prop_assert_eq!(&pack("svc", &after, &as_existing(&slices)), &slices);
            // Members present before and after, with the same key, keep their slice.
            let home: BTreeMap<&str, &str> = first.iter()
                .flat_map(|s| s.members.iter().map(move |m| (m.name.as_str(), s.name.as_str())))
                .collect();
            let before_by_name: BTreeMap<&str, &Backend> = before.iter().map(|m| (m.name.as_str(), m)).collect();
            for s in &slices {
                for m in &s.members {
                    if let (Some(old), Some(prev)) = (home.get(m.name.as_str()), before_by_name.get(m.name.as_str()))
                        && prev.slice_key() == m.slice_key()
                    {
                        prop_assert_eq!(*old, s.name.as_str(), "{} moved", m.name);
                    }
                }
            }
        }
    }
}
