//! The `Projected` condition: why an instance, or its service, is not projected as asked.

use std::sync::PoisonError;

use kube::{
    Api, Resource,
    api::Patch,
    runtime::events::{Event, EventType},
};
use serde_json::json;

use super::{Problem, Projector, ServiceKey, apply::apply_params};
use crate::{
    Error, Result, api::ServiceInstance, projection::objects::instance_reference, registry::Entry,
    status::conditions::PROJECTED,
};

impl Projector {
    /// Sets (or clears) the `Projected` condition of an instance: written only when it
    /// changes, with an Event (if `announce`) when a problem appears.
    pub(super) async fn report(
        &self,
        ns: &str,
        entry: &Entry,
        problem: Option<&Problem>,
        announce: bool,
    ) -> Result<()> {
        let conditions = match (problem, entry.projected()) {
            (None, None) => return Ok(()),
            (Some((reason, message)), Some((r, m))) if r == *reason && m == message => {
                return Ok(());
            }
            (None, Some(_)) => json!([]),
            (Some((reason, message)), _) => json!([{
                "type": PROJECTED,
                "status": "False",
                "reason": reason,
                "message": message,
                "observedGeneration": entry.generation(),
                "lastTransitionTime": jiff::Timestamp::now().to_string(),
            }]),
        };
        let name = entry.name();
        let patch = json!({
            "apiVersion": ServiceInstance::api_version(&()),
            "kind": ServiceInstance::kind(&()),
            "status": {"conditions": conditions},
        });
        Api::<ServiceInstance>::namespaced(self.client.clone(), ns)
            .patch_status(name, &apply_params(), &Patch::Apply(&patch))
            .await
            .map_err(Error::kube(format!(
                "set the Projected condition of {ns}/{name}"
            )))?;
        self.registry.reported(
            ns,
            name,
            entry.uid(),
            problem.map(|(r, m)| ((*r).to_string(), m.clone())),
        );
        if let Some((reason, message)) = problem
            && announce
        {
            let event = Event {
                type_: EventType::Warning,
                reason: (*reason).into(),
                note: Some(message.clone()),
                action: "Project".into(),
                secondary: None,
            };
            let reference = instance_reference(ns, name, entry.uid());
            if let Err(e) = self.recorder.publish(&event, &reference).await {
                tracing::warn!(%name, error = %e, "cannot publish Event");
            }
        }
        Ok(())
    }

    pub(super) fn track_too_large(&self, key: &ServiceKey, too_large: bool) {
        let mut set = self
            .state
            .too_large
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let changed = if too_large {
            set.insert(key.clone())
        } else {
            set.remove(key)
        };
        if changed {
            self.metrics.set_config_maps_too_large(set.len());
        }
    }
}
