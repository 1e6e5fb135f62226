//! The projector's writes: each object applied only when it differs, and cleaned up when its
//! service has no instances left.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::PoisonError,
};

use k8s_openapi::{
    api::{
        core::v1::{ConfigMap, Endpoints, Service, ServicePort, ServiceSpec},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::{apis::meta::v1::OwnerReference, util::intstr::IntOrString},
};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams},
    runtime::reflector::{self},
};
use serde_json::json;

use super::{Problem, Projector};
use crate::projection::objects::*;
use crate::{
    Error, Result,
    names::{
        CONFIG_KEY, MANAGED_BY, MANAGED_BY_LABEL, PROJECTION_MANAGER, SERVICE_LABEL,
        config_map_name,
    },
    projection::{self, Backend, ExistingSlice},
};

impl Projector {
    pub(super) async fn apply_service(
        &self,
        ns: &str,
        service: &str,
        members: &[Backend],
        stored: Option<&Service>,
    ) -> Result<Service> {
        let ports: Vec<ServicePort> = projection::service_ports(members)
            .into_iter()
            .map(|p| ServicePort {
                name: Some(p.name),
                port: p.port,
                target_port: Some(IntOrString::Int(p.port)),
                protocol: Some(p.protocol),
                app_protocol: p.app_protocol,
                ..ServicePort::default()
            })
            .collect();
        let api: Api<Service> = Api::namespaced(self.client.clone(), ns);
        let applied = match stored {
            Some(stored) => {
                if has_labels(stored.labels(), &[(MANAGED_BY_LABEL, MANAGED_BY)])
                    && let Some(spec) = &stored.spec
                    && spec.selector.as_ref().is_none_or(BTreeMap::is_empty)
                    && same_ports(spec.ports.as_deref().unwrap_or_default(), &ports)
                {
                    return Ok(stored.clone());
                }
                // Ours, or adopted: a merge patch, which replaces the port list and drops a
                // selector whoever set them (an apply would leave other managers' fields).
                let patch = json!({
                    "metadata": {"labels": {MANAGED_BY_LABEL: MANAGED_BY}},
                    "spec": {"selector": null, "ports": ports},
                });
                api.patch(service, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map_err(Error::kube(format!("update Service {ns}/{service}")))?
            }
            None => {
                let desired = Service {
                    metadata: ObjectMeta {
                        name: Some(service.into()),
                        namespace: Some(ns.into()),
                        labels: Some(BTreeMap::from([(
                            MANAGED_BY_LABEL.into(),
                            MANAGED_BY.into(),
                        )])),
                        ..ObjectMeta::default()
                    },
                    spec: Some(ServiceSpec {
                        type_: Some("ClusterIP".into()),
                        cluster_ip: self.options.headless.then(|| "None".into()),
                        ports: Some(ports),
                        ..ServiceSpec::default()
                    }),
                    status: None,
                };
                api.patch(service, &apply_params(), &Patch::Apply(&desired))
                    .await
                    .map_err(Error::kube(format!("create Service {ns}/{service}")))?
            }
        };
        self.metrics.projection_written("Service");
        Ok(applied)
    }

    pub(super) async fn apply_slices(
        &self,
        ns: &str,
        service: &str,
        members: &[Backend],
        owner: &OwnerReference,
    ) -> Result<()> {
        let stored = self.caches.slices.of(ns, service);
        let existing: Vec<ExistingSlice> =
            stored.iter().filter_map(|s| s.existing.clone()).collect();
        let desired = projection::pack(service, members, &existing);
        let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), ns);
        for slice in &desired {
            let object = slice_object(ns, service, slice, owner);
            let json = serde_json::to_string(&object).map_err(|source| Error::Serialize {
                what: "an EndpointSlice",
                source,
            })?;
            let current = stored
                .iter()
                .find(|s| s.metadata.name.as_deref() == Some(slice.name.as_str()));
            if self
                .written
                .unchanged("EndpointSlice", ns, &slice.name, &json)
                || current.is_some_and(|c| same_slice(c, &object))
            {
                continue;
            }
            let applied = api
                .patch(&slice.name, &apply_params(), &Patch::Apply(&object))
                .await
                .map_err(Error::kube(format!(
                    "apply EndpointSlice {ns}/{}",
                    slice.name
                )))?;
            self.written.record(
                "EndpointSlice",
                ns,
                &slice.name,
                applied.resource_version(),
                &json,
            );
            self.metrics.projection_written("EndpointSlice");
        }
        let keep: BTreeSet<&str> = desired.iter().map(|s| s.name.as_str()).collect();
        for orphan in stored
            .iter()
            .filter(|s| !keep.contains(s.name_any().as_str()))
        {
            delete(&api, &orphan.name_any()).await?;
            self.written
                .record("EndpointSlice", ns, &orphan.name_any(), None, "");
            self.metrics.projection_written("EndpointSlice");
        }
        Ok(())
    }

    /// Writes the service's v1 Endpoints object if it is asked for and differs; returns a
    /// problem instead if an Endpoints object of that name exists that is not Roster's.
    pub(super) async fn apply_endpoints(
        &self,
        ns: &str,
        service: &str,
        members: &[Backend],
        owner: &OwnerReference,
    ) -> Result<Option<Problem>> {
        let Some(cache) = &self.caches.endpoints else {
            return Ok(None);
        };
        let desired = endpoints_object(ns, service, &projection::endpoints_view(members), owner);
        let stored = cache.get(&reflector::ObjectRef::new(service).within(ns));
        if stored
            .as_deref()
            .is_some_and(|s| same_endpoints(s, &desired))
        {
            return Ok(None);
        }
        let json = serde_json::to_string(&desired).map_err(|source| Error::Serialize {
            what: "an Endpoints object",
            source,
        })?;
        if self.written.unchanged("Endpoints", ns, service, &json) {
            return Ok(None);
        }
        let api: Api<Endpoints> = Api::namespaced(self.client.clone(), ns);
        if stored.is_none()
            && let Some(problem) = someone_elses(&api, ns, service, "EndpointsConflict").await?
        {
            return Ok(Some(problem));
        }
        let applied = api
            .patch(service, &apply_params(), &Patch::Apply(&desired))
            .await
            .map_err(Error::kube(format!("apply Endpoints {ns}/{service}")))?;
        self.written
            .record("Endpoints", ns, service, applied.resource_version(), &json);
        self.metrics.projection_written("Endpoints");
        Ok(None)
    }

    /// Writes the ConfigMap if it differs; returns a problem instead if a ConfigMap of that
    /// name exists that is not Roster's.
    pub(super) async fn apply_config_map(
        &self,
        ns: &str,
        service: &str,
        json: String,
        owner: Option<OwnerReference>,
    ) -> Result<Option<Problem>> {
        let name = config_map_name(service);
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        let stored = self
            .caches
            .config_maps
            .get(&reflector::ObjectRef::new(&name).within(ns));
        let owners: Vec<OwnerReference> = owner.clone().into_iter().collect();
        if let Some(stored) = &stored
            && crate::cache::config_map_holds(stored, &json)
            && stored.metadata.owner_references.clone().unwrap_or_default() == owners
        {
            return Ok(None);
        }
        let fingerprint = format!("{json}{owners:?}");
        if self.written.unchanged("ConfigMap", ns, &name, &fingerprint) {
            return Ok(None);
        }
        if stored.is_none()
            && let Some(problem) = someone_elses(&api, ns, &name, "ConfigMapConflict").await?
        {
            return Ok(Some(problem));
        }
        let desired = ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.into()),
                labels: Some(BTreeMap::from([
                    (MANAGED_BY_LABEL.into(), MANAGED_BY.into()),
                    (SERVICE_LABEL.into(), service.into()),
                ])),
                owner_references: owner.map(|o| vec![o]),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([(CONFIG_KEY.into(), json)])),
            ..ConfigMap::default()
        };
        let applied = api
            .patch(&name, &apply_params(), &Patch::Apply(&desired))
            .await
            .map_err(Error::kube(format!("apply ConfigMap {ns}/{name}")))?;
        self.written.record(
            "ConfigMap",
            ns,
            &name,
            applied.resource_version(),
            &fingerprint,
        );
        self.metrics.projection_written("ConfigMap");
        Ok(None)
    }

    /// The last instance of a service went: its Service, slices and ConfigMap go too.
    pub(super) async fn clean_up(
        &self,
        ns: &str,
        service: &str,
        our_service: Option<&Service>,
    ) -> Result<()> {
        self.track_too_large(&(ns.to_string(), service.to_string()), false);
        let slices: Api<EndpointSlice> = Api::namespaced(self.client.clone(), ns);
        for slice in self.caches.slices.of(ns, service) {
            delete(&slices, &slice.name_any()).await?;
            self.written
                .record("EndpointSlice", ns, &slice.name_any(), None, "");
        }
        let name = config_map_name(service);
        if self
            .caches
            .config_maps
            .get(&reflector::ObjectRef::new(&name).within(ns))
            .is_some()
        {
            delete(
                &Api::<ConfigMap>::namespaced(self.client.clone(), ns),
                &name,
            )
            .await?;
            self.written.record("ConfigMap", ns, &name, None, "");
        }
        if let Some(cache) = &self.caches.endpoints
            && cache
                .get(&reflector::ObjectRef::new(service).within(ns))
                .is_some()
        {
            delete(
                &Api::<Endpoints>::namespaced(self.client.clone(), ns),
                service,
            )
            .await?;
            self.written.record("Endpoints", ns, service, None, "");
        }
        if let Some(svc) = our_service {
            delete(
                &Api::<Service>::namespaced(self.client.clone(), ns),
                service,
            )
            .await?;
            if let Some(uid) = svc.uid() {
                self.state
                    .deleted_services
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(uid);
            }
        }
        Ok(())
    }
}

/// An object that is not in our (label-selected) cache may still exist, and be someone else's:
/// read it before applying, and say so (with `reason`) if it is not Roster's.
async fn someone_elses<K>(
    api: &Api<K>,
    ns: &str,
    name: &str,
    reason: &'static str,
) -> Result<Option<Problem>>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let kind = K::kind(&());
    let theirs = api
        .get_opt(name)
        .await
        .map_err(Error::kube(format!("read {kind} {ns}/{name}")))?;
    Ok(theirs
        .filter(|theirs| !has_labels(theirs.labels(), &[(MANAGED_BY_LABEL, MANAGED_BY)]))
        .map(|_| {
            (
                reason,
                format!(
                    "{kind} {name:?} exists and is not managed by Roster; it is left untouched"
                ),
            )
        }))
}

pub(super) fn apply_params() -> PatchParams {
    PatchParams::apply(PROJECTION_MANAGER).force()
}

pub(super) async fn delete<K>(api: &Api<K>, name: &str) -> Result<()>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(Error::kube(format!("delete {name}"))(e)),
    }
}
