//! What the watch caches keep. Every cached object is pruned, before the reflector stores it,
//! to the fields Roster reads: managed fields (often the largest part of a small object) always
//! go, and annotations go except the ones Roster acts on (`kubectl apply` alone adds a copy of
//! the whole object as `last-applied-configuration`).

use std::collections::{BTreeSet, HashMap};

use kube::api::ObjectMeta;

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
