//! Deletion of instances silent for `deleteAfterSeconds`.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, Preconditions},
    runtime::{
        controller::Action,
        events::{Event, EventType},
    },
};

use super::{events::publish, reconcile::Context, views::renewal};
use crate::{Error, Result, api::ServiceInstance, liveness::Timing};

/// Deletes an instance after `deleteAfterSeconds` of observed silence. It loses every race
/// with a heartbeat: an annotation heartbeat changes the instance's resourceVersion, so the
/// delete's preconditions refuse it; a Lease renewal does not, so the Lease is read afresh
/// first and a renewal the cache has not delivered yet cancels the deletion.
pub(super) async fn expire(
    si: &ServiceInstance,
    timing: Timing,
    namespace: &str,
    uid: &str,
    cached_renewal: Option<String>,
    ctx: &Context,
) -> Result<Action> {
    let name = si.name_any();
    if let Some(lease) = &si.spec.lease_name {
        let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), namespace);
        let fresh = leases.get_opt(lease).await.map_err(Error::kube(format!(
            "read Lease {namespace}/{lease} before expiring {name}"
        )))?;
        if fresh.as_ref().and_then(renewal) != cached_renewal {
            // Renewed after what we saw: the Lease watch will bring it as a heartbeat.
            return Ok(Action::requeue(Duration::from_millis(200)));
        }
    }
    let api: Api<ServiceInstance> = Api::namespaced(ctx.client.clone(), namespace);
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some(uid.to_string()),
            resource_version: si.resource_version(),
        }),
        ..DeleteParams::default()
    };
    match api.delete(&name, &params).await {
        Ok(_) => {
            ctx.metrics.expired();
            let after = timing.delete_after.unwrap_or_default().as_secs();
            tracing::info!(%namespace, %name, after_seconds = after, "expired: deleted");
            let event = Event {
                type_: EventType::Warning,
                reason: "Expired".into(),
                note: Some(format!(
                    "Deleted after {after} s without an observed heartbeat (deleteAfterSeconds)"
                )),
                action: "Delete".into(),
                secondary: None,
            };
            publish(ctx, si, event);
            Ok(Action::await_change())
        }
        // Changed (a heartbeat?): judge again once the watch brings the new state.
        Err(kube::Error::Api(status)) if status.code == 409 => {
            Ok(Action::requeue(Duration::from_millis(200)))
        }
        // Already gone.
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(Action::await_change()),
        Err(e) => Err(Error::kube(format!(
            "delete expired ServiceInstance {namespace}/{name}"
        ))(e)),
    }
}
