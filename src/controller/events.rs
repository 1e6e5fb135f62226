//! Events: one per transition, and the announcements of protection against mass expiry.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Resource, ResourceExt,
    runtime::{
        events::{Event, EventType, Recorder},
        reflector::ObjectRef,
    },
};
use tokio_util::sync::CancellationToken;

use super::{reconcile::Context, views::Views};
use crate::{
    api::{Phase, ServiceInstance},
    liveness::Timing,
    metrics::Metrics,
    protection::{self, ChangeKind, Release, Scope},
};

pub(super) fn transition_event(timing: Timing, phase: Phase) -> Event {
    let ttl = timing.ttl.as_secs();
    let (type_, reason, note) = match phase {
        Phase::Pending => (
            EventType::Normal,
            "Registered",
            "Registered; waiting for the first heartbeat".to_string(),
        ),
        Phase::Ready => (
            EventType::Normal,
            "Ready",
            "Heartbeat observed; receiving traffic".to_string(),
        ),
        Phase::Draining => (
            EventType::Normal,
            "Draining",
            "spec.draining is set; no new traffic, in-flight work drains".to_string(),
        ),
        Phase::Unhealthy => (
            EventType::Warning,
            "HeartbeatSilent",
            format!("No heartbeat observed for {ttl} s; out of rotation"),
        ),
    };
    Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    }
}

/// Events are best effort: a failure is logged, never fails the reconcile.
///
/// They are written off the reconcile's path: awaiting each one doubled the time a transition
/// took (the benchmark, docs/benchmark.md), and an Event never decides anything.
pub(super) fn publish(ctx: &Context, si: &ServiceInstance, event: Event) {
    let (recorder, reference, name) = (ctx.recorder.clone(), si.object_ref(&()), si.name_any());
    tokio::spawn(async move {
        if let Err(e) = recorder.publish(&event, &reference).await {
            tracing::warn!(%name, reason = %event.reason, error = %e, "cannot publish Event");
        }
    });
}

/// Announces changes of protection: a log line, the metrics, an Event on the Service (on the
/// election Lease for all instances; only the leader writes Events), and a reconcile of every
/// silent instance of the scope, so that their status and the projection follow at once.
pub(super) async fn announce(
    mut changes: futures::channel::mpsc::UnboundedReceiver<Vec<protection::Change>>,
    views: Arc<Views>,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    requeue: futures::channel::mpsc::UnboundedSender<ObjectRef<ServiceInstance>>,
    shutdown: CancellationToken,
) {
    loop {
        let batch = tokio::select! {
            () = shutdown.cancelled() => return,
            batch = changes.next() => match batch {
                Some(batch) => batch,
                None => return,
            },
        };
        for change in batch {
            let (engaged, max) = {
                let guard = views.protection();
                let engaged: Vec<Scope> = guard.engaged().cloned().collect();
                (engaged, guard.policy().max_duration.as_secs())
            };
            metrics.protection_changed(&change.kind, engaged.into_iter());
            let scope = &change.scope;
            let (type_, reason, note) = match change.kind {
                ChangeKind::Engaged { silent, total } => {
                    metrics.protection_engaged(scope);
                    tracing::warn!(%scope, silent, total, "protection against mass expiry engaged");
                    (
                        EventType::Warning,
                        "ProtectionEngaged",
                        format!(
                            "{silent} of {total} instances ({scope}) fell silent within one TTL: \
                             deletion suspended and last-known-good readiness held until they \
                             recover, for at most {max} s"
                        ),
                    )
                }
                ChangeKind::Released(Release::Recovered) => {
                    tracing::info!(%scope, "protection against mass expiry released: recovered");
                    (
                        EventType::Normal,
                        "ProtectionReleased",
                        format!("Heartbeats are back ({scope}): protection released"),
                    )
                }
                ChangeKind::Released(Release::TimeCap) => {
                    tracing::warn!(%scope, "protection against mass expiry released: time cap");
                    (
                        EventType::Warning,
                        "ProtectionTimedOut",
                        format!(
                            "Protection ({scope}) released after {max} s without recovery; silent \
                             instances are judged as usual again"
                        ),
                    )
                }
            };
            let reference = match scope {
                Scope::Service { namespace, service } => ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Service".into()),
                    name: Some(service.clone()),
                    namespace: Some(namespace.clone()),
                    ..ObjectReference::default()
                },
                Scope::All => {
                    let p = views.elector.params();
                    ObjectReference {
                        api_version: Some("coordination.k8s.io/v1".into()),
                        kind: Some("Lease".into()),
                        name: Some(p.name.clone()),
                        namespace: Some(p.namespace.clone()),
                        ..ObjectReference::default()
                    }
                }
            };
            let event = Event {
                type_,
                reason: reason.into(),
                note: Some(note),
                action: "Protect".into(),
                secondary: None,
            };
            if views.term().is_some()
                && let Err(e) = recorder.publish(&event, &reference).await
            {
                tracing::warn!(%scope, reason, error = %e, "cannot publish Event");
            }
            for (namespace, name) in change.affected {
                let _ = requeue.unbounded_send(ObjectRef::new(&name).within(&namespace));
            }
        }
    }
}
