//! What the watch caches keep. Every cached object is pruned, before the reflector stores it,
//! to the fields Roster reads: managed fields (often the largest part of a small object) always
//! go, and annotations go except the ones Roster acts on (`kubectl apply` alone adds a copy of
//! the whole object as `last-applied-configuration`).

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
}
