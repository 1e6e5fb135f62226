//! Events: one per transition, and the announcements of protection against mass expiry.

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::{
    api::{core::v1::ObjectReference, events::v1::Event as K8sEvent},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{
    Api, Client, Resource,
    api::PostParams,
    runtime::{
        events::{Event, EventType, Recorder, Reporter},
        reflector::ObjectRef,
    },
};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::views::Views;
use crate::{
    api::Phase,
    cache::Instance,
    liveness::Timing,
    metrics::Metrics,
    projector::Busy,
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

/// A term's transition Events: best effort (a failure is logged, never fails the reconcile),
/// and written off the reconcile's path, behind the projection.
///
/// Awaiting each one on the reconcile's path doubled the time a transition took, and sending
/// each one at once sent a registration burst's Events (one per instance) to the apiserver all
/// together, where the benchmark's audit log showed them costing it as much time as the
/// registrations themselves while the slices waited. So they queue, in the order published,
/// and go out a few at a time, each waiting (a bounded time, so never starved) while the
/// projector has work in hand, and only while the term lasts: an Event is a write, and another
/// leader may be writing. What waits is a small record of the Event, not a task per Event (a
/// task each held 3 KB: 28 MB during a registration of 10 000).
///
/// Why not kube's `Recorder` here: it keeps every Event it sent for six minutes, in a map it
/// scans on every publish, to turn repeats into a series. A transition's Event names the
/// instance at its resourceVersion, so it never repeats; the map only grew (heaptrack, 10 000
/// registrations: 12 MB of table and the Events in it, kept at its largest size for good) and
/// each publish scanned it. The Event created here is the one the `Recorder` creates for a
/// first occurrence.
pub(super) struct Events {
    queue: tokio::sync::mpsc::UnboundedSender<Queued>,
}

/// An Event waiting in the lane: what it is about and when, kept small (a registration of
/// 10 000 queues 10 000 of them; as whole Event objects they held 12 MB, per heaptrack), and
/// made into the Event object when its turn comes.
struct Queued {
    regarding: ObjectReference,
    event: Event,
    at: Timestamp,
}

/// Events in flight at once.
const EVENTS_IN_FLIGHT: usize = 4;
/// The longest an Event waits for the projector to have nothing in hand.
const YIELD_TO_PROJECTION: Duration = Duration::from_millis(500);

impl Events {
    /// Starts the lane; it ends with `term`, and what is still queued then is dropped.
    pub(super) fn new(
        client: Client,
        reporter: Reporter,
        projection: Busy,
        term: CancellationToken,
    ) -> Events {
        let (queue, mut pending) = tokio::sync::mpsc::unbounded_channel::<Queued>();
        let permits = Arc::new(Semaphore::new(EVENTS_IN_FLIGHT));
        let lane_term = term.clone();
        let lane = async move {
            while let Some(queued) = pending.recv().await {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                let event = event_object(&reporter, &queued.event, queued.regarding, queued.at);
                let (client, projection) = (client.clone(), projection.clone());
                tokio::spawn(lane_term.clone().run_until_cancelled_owned(async move {
                    let _permit = permit;
                    projection.idle_within(YIELD_TO_PROJECTION).await;
                    let namespace = event.metadata.namespace.as_deref().unwrap_or("default");
                    let api: Api<K8sEvent> = Api::namespaced(client, namespace);
                    if let Err(e) = api.create(&PostParams::default(), &event).await {
                        let regarding = event.regarding.as_ref().and_then(|r| r.name.as_deref());
                        tracing::warn!(name = regarding, reason = event.reason.as_deref(), error = %e, "cannot publish Event");
                    }
                }));
            }
        };
        tokio::spawn(term.clone().run_until_cancelled_owned(lane));
        Events { queue }
    }

    /// Queues `event` about `si`, stamped now.
    pub(super) fn publish(&self, si: &Instance, event: Event) {
        let queued = Queued {
            regarding: si.object_ref(&()),
            event,
            at: Timestamp::now(),
        };
        // Closed only once the term has ended, when nothing more is written.
        let _ = self.queue.send(queued);
    }
}

/// The events.k8s.io Event for `event` about `regarding` at `now`: the fields and the name
/// kube's `Recorder` gives a first occurrence.
fn event_object(
    reporter: &Reporter,
    event: &Event,
    regarding: ObjectReference,
    now: Timestamp,
) -> K8sEvent {
    let name = regarding.name.as_deref().unwrap_or(&reporter.controller);
    K8sEvent {
        metadata: ObjectMeta {
            name: Some(format!("{name}.{:x}", now.as_nanosecond())),
            namespace: regarding.namespace.clone(),
            ..ObjectMeta::default()
        },
        action: Some(event.action.clone()),
        reason: Some(event.reason.clone()),
        note: event.note.clone(),
        event_time: Some(MicroTime(now)),
        reporting_controller: Some(reporter.controller.clone()),
        reporting_instance: Some(
            reporter
                .instance
                .clone()
                .unwrap_or_else(|| reporter.controller.clone()),
        ),
        type_: Some(
            match event.type_ {
                EventType::Normal => "Normal",
                EventType::Warning => "Warning",
            }
            .into(),
        ),
        related: event.secondary.clone(),
        regarding: Some(regarding),
        ..K8sEvent::default()
    }
}

/// Announces changes of protection: a log line, the metrics, an Event on the Service (on the
/// election Lease for all instances; only the leader writes Events), and a reconcile of every
/// silent instance of the scope, so that their status and the projection follow at once.
pub(super) async fn announce(
    mut changes: futures::channel::mpsc::UnboundedReceiver<Vec<protection::Change>>,
    views: Arc<Views>,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    requeue: futures::channel::mpsc::UnboundedSender<ObjectRef<Instance>>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ServiceInstanceSpec;
    use http::{Request, Response};
    use kube::{Client, client::Body};

    type Apiserver = tower_test::mock::Handle<Request<Body>, Response<Body>>;
    type Respond = tower_test::mock::SendResponse<Response<Body>>;

    fn instance(name: &str) -> Instance {
        let mut si = crate::api::ServiceInstance::new(
            name,
            ServiceInstanceSpec::new("web", "10.0.0.1", vec![]),
        );
        si.metadata.namespace = Some("ns".into());
        si.metadata.uid = Some(format!("u-{name}"));
        si.into()
    }

    /// The next request within `limit`, if one comes.
    async fn request(
        apiserver: &mut Apiserver,
        limit: Duration,
    ) -> Option<(Request<Body>, Respond)> {
        tokio::time::timeout(limit, apiserver.next_request())
            .await
            .ok()
            .flatten()
    }

    /// Answers an Event create with the Event it was sent.
    async fn answer(request: Request<Body>, respond: Respond) {
        assert_eq!(request.method(), http::Method::POST);
        assert_eq!(
            request.uri().path(),
            "/apis/events.k8s.io/v1/namespaces/ns/events"
        );
        let body = request.into_body().collect_bytes().await.expect("body");
        respond.send_response(
            Response::builder()
                .status(201)
                .body(Body::from(body.to_vec()))
                .expect("response"),
        );
    }

    fn reporter() -> Reporter {
        Reporter {
            controller: "roster.dev/controller".into(),
            instance: None,
        }
    }

    fn lane() -> (
        Apiserver,
        tokio::sync::watch::Sender<bool>,
        CancellationToken,
        Events,
    ) {
        let (service, apiserver) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let (busy, projection) = Busy::manual();
        busy.send_replace(true);
        let term = CancellationToken::new();
        let events = Events::new(
            Client::new(service, "default"),
            reporter(),
            projection,
            term.clone(),
        );
        (apiserver, busy, term, events)
    }

    fn ready() -> Event {
        let timing = Timing {
            ttl: Duration::from_secs(30),
            delete_after: None,
        };
        transition_event(timing, Phase::Ready)
    }

    /// The lane against a mocked apiserver, on a paused clock: nothing is sent while the
    /// projector is busy, everything that may go goes the moment it is idle, at most four at a
    /// time, and nothing once the term has ended.
    #[tokio::test(start_paused = true)]
    async fn events_yield_to_the_projection_go_four_at_a_time_and_end_with_the_term() {
        let (mut apiserver, busy, term, events) = lane();
        for i in 0..6 {
            events.publish(&instance(&format!("i-{i}")), ready());
        }
        assert!(
            request(&mut apiserver, Duration::from_millis(200))
                .await
                .is_none(),
            "an Event was sent while the projector was busy"
        );
        busy.send_replace(false);
        let mut held = Vec::new();
        for _ in 0..EVENTS_IN_FLIGHT {
            held.push(
                request(&mut apiserver, Duration::from_millis(1))
                    .await
                    .expect("an Event the moment the projector is idle"),
            );
        }
        assert!(
            request(&mut apiserver, Duration::from_millis(200))
                .await
                .is_none(),
            "more than {EVENTS_IN_FLIGHT} Events in flight"
        );
        // One answered: the fifth goes.
        let (first, respond) = held.remove(0);
        answer(first, respond).await;
        let (fifth, respond) = request(&mut apiserver, Duration::from_millis(1))
            .await
            .expect("the fifth Event once one is answered");
        // The term ends: the sixth, still waiting for a permit, is never sent.
        term.cancel();
        answer(fifth, respond).await;
        for (request, respond) in held {
            answer(request, respond).await;
        }
        assert!(
            request(&mut apiserver, Duration::from_secs(5))
                .await
                .is_none(),
            "an Event was sent after its term ended"
        );
    }

    /// A projector that stays busy holds an Event back for the yield limit, not longer.
    #[tokio::test(start_paused = true)]
    async fn an_event_waits_for_a_busy_projection_at_most_the_yield_limit() {
        let (mut apiserver, _busy, _term, events) = lane();
        events.publish(&instance("i-0"), ready());
        let almost = YIELD_TO_PROJECTION - Duration::from_millis(1);
        assert!(
            request(&mut apiserver, almost).await.is_none(),
            "sent before the yield limit while the projector was busy"
        );
        let (request, respond) = request(&mut apiserver, Duration::from_millis(2))
            .await
            .expect("sent at the yield limit");
        answer(request, respond).await;
    }

    /// What is created is what kube's `Recorder` creates for a first occurrence: the instance
    /// it regards, who reports it, when, and a name unique to the moment.
    #[test]
    fn an_event_object_regards_the_instance_and_names_its_reporter() {
        let si = instance("i-0");
        let now: Timestamp = "2026-12-04T10:00:00Z".parse().expect("a timestamp");
        let event = event_object(&reporter(), &ready(), si.object_ref(&()), now);
        assert_eq!(event.metadata.namespace.as_deref(), Some("ns"));
        assert_eq!(
            event.metadata.name,
            Some(format!("i-0.{:x}", now.as_nanosecond()))
        );
        let regarding = event.regarding.expect("regarding");
        assert_eq!(
            (
                regarding.kind.as_deref(),
                regarding.name.as_deref(),
                regarding.uid.as_deref()
            ),
            (Some("ServiceInstance"), Some("i-0"), Some("u-i-0"))
        );
        assert_eq!(
            (
                event.reason.as_deref(),
                event.type_.as_deref(),
                event.action.as_deref()
            ),
            (Some("Ready"), Some("Normal"), Some("Reconcile"))
        );
        assert_eq!(
            event.note.as_deref(),
            Some("Heartbeat observed; receiving traffic")
        );
        assert_eq!(event.event_time, Some(MicroTime(now)));
        assert_eq!(
            (
                event.reporting_controller.as_deref(),
                event.reporting_instance.as_deref()
            ),
            (Some("roster.dev/controller"), Some("roster.dev/controller"))
        );
        assert_eq!(event.series, None);
    }
}
