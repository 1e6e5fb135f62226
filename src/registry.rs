//! The registry index: every instance the watch has shown, grouped by service, with the phase
//! the judge gave it in this term. It is the one answer to "who is routable": the projector
//! reads its members from here, never from instance status read back through the watch, so a
//! verdict is projected the moment it is reached, without waiting for its status write's echo.
//!
//! The model is linkerd2's policy-controller index: the watch feeds it synchronously (`apply`,
//! `delete`, and a relist as `resync_started` … `resync_done`), the judge feeds it verdicts
//! (`judged`), and every call returns the services whose projection changed, only on a
//! difference. [`Index`] is plain data, tested synchronously; [`Registry`] shares it and wakes
//! the projector for each service that changed.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, PoisonError},
};

use kube::ResourceExt;

use crate::{
    api::Phase, cache::Instance, projection::Backend, projector::Trigger,
    status::conditions::PROJECTED,
};

/// A service: (namespace, service name).
pub type ServiceKey = (String, String);

/// An instance: (namespace, name).
pub type InstanceKey = (String, String);

/// One instance in the index.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// The instance as the watch last showed it: once the watch has stored it, the instance
    /// cache's own allocation ([`Index::share`]), so the index keeps no second copy of it.
    instance: Arc<Instance>,
    /// The judge's phase in this term. It outranks the status's, which may lag behind it.
    verdict: Option<Phase>,
    /// What the projector last wrote of the `Projected` condition, until the watch shows it:
    /// the projection is woken by verdicts now, often before the echo of its last write.
    reported: Option<Option<(String, String)>>,
    /// Relist round in which the watch last showed it.
    seen: u64,
}

impl Entry {
    /// The instance as the projection sees it: its phase is the judge's in this term once
    /// there is one, else the status's.
    /// (`None` never happens: the index holds only instances with a name and a uid.)
    pub fn backend(&self) -> Option<Backend> {
        Backend::from_instance(&self.instance).map(|b| Backend {
            phase: self.phase(),
            ..b
        })
    }

    /// The phase it is projected with.
    pub fn phase(&self) -> Option<Phase> {
        self.verdict
            .or_else(|| self.instance.status.as_ref().and_then(|s| s.phase))
    }

    /// The `Projected` condition as it stands: (reason, message), what the projector last
    /// wrote, else what the status shows.
    pub fn projected(&self) -> Option<(&str, &str)> {
        match &self.reported {
            Some(reported) => reported.as_ref().map(|(r, m)| (r.as_str(), m.as_str())),
            None => status_projected(&self.instance),
        }
    }

    /// `metadata.generation`, for the conditions the projector writes.
    pub fn generation(&self) -> Option<i64> {
        self.instance.metadata.generation
    }

    pub fn name(&self) -> &str {
        self.instance.metadata.name.as_deref().unwrap_or_default()
    }

    pub fn uid(&self) -> &str {
        self.instance.metadata.uid.as_deref().unwrap_or_default()
    }

    fn of(instance: Arc<Instance>, seen: u64) -> Option<Entry> {
        Backend::from_instance(&instance)?;
        Some(Entry {
            instance,
            verdict: None,
            reported: None,
            seen,
        })
    }

    /// Whether this entry holds `si` as it is now: the same object at the same
    /// resourceVersion (an object without one is never taken for another).
    fn holds_version_of(&self, si: &Instance) -> bool {
        self.instance.metadata.uid == si.metadata.uid
            && si.metadata.resource_version.is_some()
            && self.instance.metadata.resource_version == si.metadata.resource_version
    }
}

/// The `Projected` condition a status shows: (reason, message).
fn status_projected(si: &Instance) -> Option<(&str, &str)> {
    si.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == PROJECTED)
        .map(|c| (c.reason.as_str(), c.message.as_str()))
}

/// The index itself: plain data, no client.
#[derive(Debug, Default)]
pub struct Index {
    /// Members of every service with at least one instance, by name (so in name order).
    services: HashMap<ServiceKey, BTreeMap<String, Entry>>,
    /// The service each instance is a member of.
    instances: HashMap<InstanceKey, String>,
    /// The current relist round; entries not seen in it are gone when it is done.
    round: u64,
}

/// An instance a relist did not show again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gone {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// Services whose projection changed: at most two per call (an instance that moved), so a
/// small vector.
pub type Changed = Vec<ServiceKey>;

impl Index {
    /// The watch delivered `si` (created, changed, or listed); `stored` is the instance
    /// cache's copy of it when the cache holds it already (not during a relist, whose objects
    /// the cache takes in whole at its end: [`Index::share`]). Returns the services that
    /// changed and, if it replaced an object of the same name with another uid (deleted and
    /// recreated while the watch was down), that object's uid, to be forgotten.
    pub fn apply(
        &mut self,
        si: &Instance,
        stored: Option<Arc<Instance>>,
    ) -> (Changed, Option<String>) {
        // What has no name or uid is not projected (`Backend::from_instance`), and leaves the
        // index as it was.
        let (Some(namespace), Some(name), true) = (
            si.namespace(),
            si.metadata.name.clone(),
            si.metadata.uid.is_some(),
        ) else {
            return (Changed::new(), None);
        };
        let service = si.spec.service.clone();
        let mut changed = Changed::new();
        let previous = self
            .instances
            .insert((namespace.clone(), name.clone()), service.clone());
        let before = previous.and_then(|old| {
            let key = (namespace.clone(), old);
            let entry = self.remove_member(&key, &name);
            if key.1 != service && entry.is_some() {
                changed.push(key);
            }
            entry
        });
        // A relist shows most objects unchanged: keep the copy already held.
        let instance = match (stored, &before) {
            (Some(stored), _) => stored,
            (None, Some(before)) if before.holds_version_of(si) => before.instance.clone(),
            (None, _) => Arc::new(si.clone()),
        };
        let Some(mut entry) = Entry::of(instance, self.round) else {
            self.instances.remove(&(namespace, name));
            return (changed, None);
        };
        // The same object (not one recreated under the same name) keeps its verdict, and what
        // the projector wrote until the watch shows it.
        let mut replaced = None;
        if let Some(before) = &before {
            if before.uid() == entry.uid() {
                entry.verdict = before.verdict;
                entry.reported = before.reported.clone().filter(|reported| {
                    reported.as_ref().map(|(r, m)| (r.as_str(), m.as_str()))
                        != status_projected(&entry.instance)
                });
            } else {
                replaced = Some(before.uid().to_string());
            }
        }
        let key = (namespace, service);
        if before.as_ref().and_then(Entry::backend) != entry.backend() || !changed.is_empty() {
            changed.push(key.clone());
        }
        self.services.entry(key).or_default().insert(name, entry);
        (changed, replaced)
    }

    /// After a relist, once the instance cache has taken in what it listed: every entry that
    /// holds the same version of an object as the cache takes the cache's copy, so the
    /// relist's own copies go.
    pub fn share(&mut self, stored: impl Fn(&str, &str) -> Option<Arc<Instance>>) {
        for ((namespace, _), members) in &mut self.services {
            for (name, entry) in members.iter_mut() {
                if let Some(stored) = stored(namespace, name)
                    && !Arc::ptr_eq(&stored, &entry.instance)
                    && entry.holds_version_of(&stored)
                {
                    entry.instance = stored;
                }
            }
        }
    }

    /// Whether the index holds `namespace/name` as the object with `uid`.
    pub fn holds(&self, namespace: &str, name: &str, uid: &str) -> bool {
        self.entry(namespace, name).is_some_and(|e| e.uid() == uid)
    }

    /// The projector wrote the instance's `Projected` condition (`None`: removed it).
    pub fn reported(
        &mut self,
        namespace: &str,
        name: &str,
        uid: &str,
        now: Option<(String, String)>,
    ) {
        if let Some(entry) = self.entry_mut(namespace, name)
            && entry.uid() == uid
        {
            entry.reported = Some(now);
        }
    }

    fn entry(&self, namespace: &str, name: &str) -> Option<&Entry> {
        let service = self
            .instances
            .get(&(namespace.to_string(), name.to_string()))?;
        self.services
            .get(&(namespace.to_string(), service.clone()))?
            .get(name)
    }

    fn entry_mut(&mut self, namespace: &str, name: &str) -> Option<&mut Entry> {
        let service = self
            .instances
            .get(&(namespace.to_string(), name.to_string()))?;
        self.services
            .get_mut(&(namespace.to_string(), service.clone()))?
            .get_mut(name)
    }

    /// The watch saw `namespace/name` deleted.
    pub fn delete(&mut self, namespace: &str, name: &str) -> Changed {
        let Some(service) = self
            .instances
            .remove(&(namespace.to_string(), name.to_string()))
        else {
            return Changed::new();
        };
        let key = (namespace.to_string(), service);
        self.remove_member(&key, name);
        vec![key]
    }

    /// The judge's verdict on an instance. Ignored for an instance the index does not hold
    /// under that uid (deleted, or recreated since).
    pub fn judged(&mut self, namespace: &str, name: &str, uid: &str, phase: Phase) -> Changed {
        // Called on every reconcile, heartbeats included: a verdict that did not change costs
        // two lookups and no clone.
        let Some(service) = self
            .instances
            .get(&(namespace.to_string(), name.to_string()))
        else {
            return Changed::new();
        };
        let key = (namespace.to_string(), service.clone());
        let Some(entry) = self.services.get_mut(&key).and_then(|m| m.get_mut(name)) else {
            return Changed::new();
        };
        if entry.uid() != uid || entry.verdict == Some(phase) {
            return Changed::new();
        }
        let projected_before = entry.phase();
        entry.verdict = Some(phase);
        if projected_before == Some(phase) {
            return Changed::new();
        }
        vec![key]
    }

    /// A relist began: what it does not show again is gone when it is done.
    pub fn resync_started(&mut self) {
        self.round += 1;
    }

    /// The relist is complete: drops the instances it did not show (deleted while the watch
    /// was down) and returns them, with their uids, beside the services that changed.
    pub fn resync_done(&mut self) -> (Changed, Vec<Gone>) {
        let round = self.round;
        let gone: Vec<Gone> = self
            .services
            .iter()
            .flat_map(|((ns, _), members)| {
                members.values().filter(|e| e.seen != round).map(|e| Gone {
                    namespace: ns.clone(),
                    name: e.name().to_string(),
                    uid: e.uid().to_string(),
                })
            })
            .collect();
        let mut changed = Changed::new();
        for g in &gone {
            for key in self.delete(&g.namespace, &g.name) {
                if !changed.contains(&key) {
                    changed.push(key);
                }
            }
        }
        (changed, gone)
    }

    /// The members of a service, in name order.
    pub fn members(&self, key: &ServiceKey) -> Vec<Entry> {
        self.services
            .get(key)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Every service with at least one instance.
    pub fn services(&self) -> impl Iterator<Item = &ServiceKey> {
        self.services.keys()
    }

    fn remove_member(&mut self, key: &ServiceKey, name: &str) -> Option<Entry> {
        let members = self.services.get_mut(key)?;
        let entry = members.remove(name);
        if members.is_empty() {
            self.services.remove(key);
        }
        entry
    }
}

/// The index, shared by the watch, the judge and the projector; every change wakes the
/// projector for the services it touched.
pub struct Registry {
    index: Mutex<Index>,
    projection: Trigger,
}

impl Registry {
    pub fn new(projection: Trigger) -> Registry {
        Registry {
            index: Mutex::default(),
            projection,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Index) -> T) -> T {
        f(&mut self.index.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn wake(&self, changed: Changed) {
        for (namespace, service) in changed {
            self.projection.project(&namespace, &service);
        }
    }

    /// Returns the uid of an object of the same name that `si` replaced, to be forgotten.
    /// `stored`: the instance cache's copy of `si`, if it holds it already.
    pub fn apply(&self, si: &Instance, stored: Option<Arc<Instance>>) -> Option<String> {
        let (changed, replaced) = self.with(|i| i.apply(si, stored));
        tracing::trace!(name = %si.name_any(), changed = !changed.is_empty(), "observed");
        self.wake(changed);
        replaced
    }

    pub fn holds(&self, namespace: &str, name: &str, uid: &str) -> bool {
        self.with(|i| i.holds(namespace, name, uid))
    }

    pub fn reported(&self, namespace: &str, name: &str, uid: &str, now: Option<(String, String)>) {
        self.with(|i| i.reported(namespace, name, uid, now));
    }

    pub fn delete(&self, namespace: &str, name: &str) {
        self.wake(self.with(|i| i.delete(namespace, name)));
    }

    pub fn judged(&self, namespace: &str, name: &str, uid: &str, phase: Phase) {
        let changed = self.with(|i| i.judged(namespace, name, uid, phase));
        tracing::trace!(%namespace, %name, ?phase, changed = !changed.is_empty(), "judged");
        self.wake(changed);
    }

    pub fn resync_started(&self) {
        self.with(Index::resync_started);
    }

    /// Returns the instances the relist did not show again, for the rest of the controller to
    /// forget.
    pub fn resync_done(&self) -> Vec<Gone> {
        let (changed, gone) = self.with(Index::resync_done);
        self.wake(changed);
        gone
    }

    pub fn members(&self, key: &ServiceKey) -> Vec<Entry> {
        self.with(|i| i.members(key))
    }

    pub fn share(&self, stored: impl Fn(&str, &str) -> Option<Arc<Instance>>) {
        self.with(|i| i.share(stored));
    }

    pub fn services(&self) -> Vec<ServiceKey> {
        self.with(|i| i.services().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{InstancePort, ServiceInstance, ServiceInstanceSpec, ServiceInstanceStatus};

    fn instance(name: &str, uid: &str, service: &str, phase: Option<Phase>) -> Instance {
        let mut si = ServiceInstance::new(
            name,
            ServiceInstanceSpec::new(service, "10.0.0.1", vec![InstancePort::tcp("http", 80)]),
        );
        si.metadata.namespace = Some("ns".into());
        si.metadata.uid = Some(uid.into());
        si.status = phase.map(|p| ServiceInstanceStatus {
            phase: Some(p),
            ..ServiceInstanceStatus::default()
        });
        si.into()
    }

    fn key(service: &str) -> ServiceKey {
        ("ns".into(), service.into())
    }

    fn phases(index: &Index, service: &str) -> Vec<(String, Option<Phase>)> {
        index
            .members(&key(service))
            .iter()
            .map(|e| (e.name().to_string(), e.phase()))
            .collect()
    }

    /// The services an apply changed (the replaced uid is tested on its own).
    fn applied(index: &mut Index, si: &Instance) -> Changed {
        index.apply(si, None).0
    }

    #[test]
    fn a_verdict_is_projected_at_once_and_only_on_a_difference() {
        let mut index = Index::default();
        assert_eq!(
            applied(&mut index, &instance("a", "u1", "web", None)),
            vec![key("web")]
        );
        // The same object again (a heartbeat): nothing the projection shows changed.
        assert_eq!(
            applied(&mut index, &instance("a", "u1", "web", None)),
            vec![]
        );
        assert_eq!(
            index.judged("ns", "a", "u1", Phase::Ready),
            vec![key("web")]
        );
        assert_eq!(index.judged("ns", "a", "u1", Phase::Ready), vec![]);
        assert_eq!(phases(&index, "web"), [("a".into(), Some(Phase::Ready))]);
        // The status write's echo changes nothing; a stale status does not undo the verdict.
        assert_eq!(
            applied(&mut index, &instance("a", "u1", "web", Some(Phase::Ready))),
            vec![]
        );
        assert_eq!(
            applied(
                &mut index,
                &instance("a", "u1", "web", Some(Phase::Pending))
            ),
            vec![]
        );
        assert_eq!(phases(&index, "web"), [("a".into(), Some(Phase::Ready))]);
    }

    #[test]
    fn before_any_verdict_the_written_status_stands() {
        let mut index = Index::default();
        applied(
            &mut index,
            &instance("a", "u1", "web", Some(Phase::Unhealthy)),
        );
        assert_eq!(
            phases(&index, "web"),
            [("a".into(), Some(Phase::Unhealthy))]
        );
    }

    #[test]
    fn verdicts_for_another_uid_or_an_unknown_instance_are_ignored() {
        let mut index = Index::default();
        applied(&mut index, &instance("a", "u1", "web", None));
        assert_eq!(index.judged("ns", "a", "u0", Phase::Ready), vec![]);
        assert_eq!(index.judged("ns", "b", "u2", Phase::Ready), vec![]);
        // Recreated under the same name: the old object's verdict does not carry over.
        index.judged("ns", "a", "u1", Phase::Ready);
        assert_eq!(
            applied(&mut index, &instance("a", "u2", "web", None)),
            vec![key("web")]
        );
        assert_eq!(phases(&index, "web"), [("a".into(), None)]);
    }

    #[test]
    fn moving_to_another_service_changes_both_and_keeps_the_verdict() {
        let mut index = Index::default();
        applied(&mut index, &instance("a", "u1", "web", None));
        index.judged("ns", "a", "u1", Phase::Ready);
        assert_eq!(
            applied(&mut index, &instance("a", "u1", "api", None)),
            vec![key("web"), key("api")]
        );
        assert_eq!(phases(&index, "web"), []);
        assert_eq!(phases(&index, "api"), [("a".into(), Some(Phase::Ready))]);
        assert_eq!(index.services().collect::<Vec<_>>(), [&key("api")]);
    }

    #[test]
    fn deletion_removes_the_member_and_its_empty_service() {
        let mut index = Index::default();
        applied(&mut index, &instance("a", "u1", "web", None));
        applied(&mut index, &instance("b", "u2", "web", None));
        assert_eq!(index.delete("ns", "a"), vec![key("web")]);
        assert_eq!(index.delete("ns", "a"), vec![]);
        assert_eq!(phases(&index, "web"), [("b".into(), None)]);
        assert_eq!(index.delete("ns", "b"), vec![key("web")]);
        assert_eq!(index.services().count(), 0);
    }

    #[test]
    fn a_relist_drops_what_it_did_not_show_and_keeps_verdicts() {
        let mut index = Index::default();
        for (name, uid, service) in [("a", "u1", "web"), ("b", "u2", "web"), ("c", "u3", "api")] {
            applied(&mut index, &instance(name, uid, service, None));
            index.judged("ns", name, uid, Phase::Ready);
        }
        index.resync_started();
        assert_eq!(
            applied(&mut index, &instance("a", "u1", "web", None)),
            vec![]
        );
        let (mut changed, mut gone) = index.resync_done();
        changed.sort();
        gone.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(changed, vec![key("api"), key("web")]);
        let gone: Vec<(&str, &str)> = gone
            .iter()
            .map(|g| (g.name.as_str(), g.uid.as_str()))
            .collect();
        assert_eq!(gone, [("b", "u2"), ("c", "u3")]);
        assert_eq!(phases(&index, "web"), [("a".into(), Some(Phase::Ready))]);
        assert_eq!(phases(&index, "api"), []);
        // The next relist starts from what is there now.
        index.resync_started();
        applied(&mut index, &instance("a", "u1", "web", None));
        assert_eq!(index.resync_done(), (vec![], vec![]));
    }

    #[test]
    fn members_are_in_name_order_and_carry_their_projected_condition() {
        let mut index = Index::default();
        let mut b = instance("b", "u2", "web", None);
        b.status = Some(ServiceInstanceStatus {
            conditions: vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                type_: PROJECTED.into(),
                status: "False".into(),
                reason: "ServiceConflict".into(),
                message: "taken".into(),
                last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    jiff::Timestamp::UNIX_EPOCH,
                ),
                observed_generation: None,
            }],
            ..ServiceInstanceStatus::default()
        });
        index.apply(&b, None);
        applied(&mut index, &instance("a", "u1", "web", None));
        let members = index.members(&key("web"));
        let names: Vec<&str> = members.iter().map(Entry::name).collect();
        assert_eq!(names, ["a", "b"]);
        let conflict = ("ServiceConflict", "taken");
        assert_eq!(members[1].projected(), Some(conflict));
        // What the projector wrote stands until the watch shows it, then the watch rules.
        index.reported("ns", "b", "u2", None);
        assert_eq!(index.members(&key("web"))[1].projected(), None);
        index.apply(&b, None); // an echo from before the write
        assert_eq!(index.members(&key("web"))[1].projected(), None);
        let mut cleared = b.clone();
        cleared.status = None;
        index.apply(&cleared, None); // the write's echo
        index.apply(&b, None); // someone else sets it again
        assert_eq!(index.members(&key("web"))[1].projected(), Some(conflict));
    }

    #[test]
    fn a_recreated_object_hands_back_the_uid_it_replaced() {
        let mut index = Index::default();
        assert_eq!(index.apply(&instance("a", "u1", "web", None), None).1, None);
        assert_eq!(index.apply(&instance("a", "u1", "web", None), None).1, None);
        assert!(index.holds("ns", "a", "u1"));
        assert_eq!(
            index.apply(&instance("a", "u2", "web", None), None).1,
            Some("u1".into())
        );
        assert!(!index.holds("ns", "a", "u1") && index.holds("ns", "a", "u2"));
        // An object without a uid is not projected and leaves the index as it was.
        let mut no_uid = instance("a", "u3", "web", None);
        no_uid.metadata.uid = None;
        assert_eq!(index.apply(&no_uid, None), (vec![], None));
        assert!(index.holds("ns", "a", "u2"));
    }

    #[test]
    fn the_index_holds_the_instance_caches_copy_not_its_own() {
        let members = |index: &Index| index.members(&key("web"));
        let held =
            |index: &Index, copy: &Arc<Instance>| Arc::ptr_eq(&members(index)[0].instance, copy);
        let mut index = Index::default();
        let mut si = instance("a", "u1", "web", None);
        si.metadata.resource_version = Some("1".into());
        let cached = Arc::new(si.clone());
        index.apply(&si, Some(cached.clone()));
        assert!(held(&index, &cached));
        // A relist shows it unchanged: the copy held stays, none is made.
        index.resync_started();
        index.apply(&si, None);
        assert!(held(&index, &cached));
        // A relist shows a newer version: the index holds its own copy until the cache has
        // taken in the relist, then the cache's.
        si.metadata.resource_version = Some("2".into());
        index.resync_started();
        index.apply(&si, None);
        assert!(!held(&index, &cached));
        assert_eq!(*members(&index)[0].instance, si);
        index.resync_done();
        let relisted = Arc::new(si.clone());
        index.share(|ns, name| (ns == "ns" && name == "a").then(|| relisted.clone()));
        assert!(held(&index, &relisted));
        // Never a cached copy of another version.
        index.share(|_, _| Some(cached.clone()));
        assert!(held(&index, &relisted));
    }
}
