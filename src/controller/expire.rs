//! Deletion of instances silent for `deleteAfterSeconds`.

use std::time::Duration;

use kube::{
    Api, ResourceExt,
    api::{DeleteParams, Preconditions},
    runtime::{
        controller::Action,
        events::{Event, EventType},
    },
};

use super::{reconcile::Context, term::Term};
use crate::{Error, Result, api::ServiceInstance, cache::Instance, liveness::Timing};

/// Deletes an instance after `deleteAfterSeconds` of observed silence. It loses every race
/// with a heartbeat: the reconcile has just read the heartbeat signals afresh (a heartbeat the
/// cache has not delivered yet cancels the verdict), and an annotation heartbeat since changes
/// the instance's resourceVersion, so the delete's preconditions refuse it.
pub(super) async fn expire(
    si: &Instance,
    timing: Timing,
    namespace: &str,
    uid: &str,
    term: &Term,
    ctx: &Context,
) -> Result<Action> {
    let name = si.name_any();
    if term.token.is_cancelled() {
        // The term ended while this looked: the next leader decides.
        return Ok(Action::await_change());
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
            term.events.publish(si, event);
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
