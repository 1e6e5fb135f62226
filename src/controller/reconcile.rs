//! One instance's reconcile: observe its heartbeat signals, judge, protect, and write the
//! difference.

use std::{
    sync::{Arc, PoisonError, atomic::Ordering},
    time::Duration,
};

use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    Api, Client, ResourceExt,
    runtime::{
        controller::Action,
        events::{Event, EventType},
        reflector::{ObjectRef, Store},
    },
};

use super::{
    events::transition_event,
    expire::expire,
    views::{Views, renewal},
};
use crate::{
    Error, Result,
    api::ServiceInstance,
    cache::Instance,
    liveness::{self, Liveness, Sight, Signals, Tick, Timing},
    metrics::Metrics,
    names::HEARTBEAT_ANNOTATION,
    probe,
    protection::{Protection, Scope, Silence},
    status::{self, SignalProblems},
};

/// State shared by every reconcile.
pub(super) struct Context {
    pub(super) client: Client,
    pub(super) metrics: Arc<Metrics>,
    pub(super) leases: Store<Lease>,
    pub(super) views: Arc<Views>,
    /// TTL and deletion for instances that leave them unset.
    pub(super) defaults: liveness::Defaults,
}

pub(super) async fn reconcile(si: Arc<Instance>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started();
    let (Some(namespace), Some(uid)) = (si.namespace(), si.uid()) else {
        // A namespaced object from the apiserver always has both.
        return Ok(Action::await_change());
    };
    let name = si.name_any();
    let views = &ctx.views;
    if si.metadata.deletion_timestamp.is_some() {
        // Being deleted (by us, its owner's garbage collection, or a user): nothing to judge.
        return Ok(Action::await_change());
    }

    // Heartbeat signals. Until the Lease cache is complete, a Lease that is not in it yet would
    // look like one that appears later (a heartbeat): judge once it is complete.
    let lease = match &si.spec.lease_name {
        Some(_) if !views.leases_synced.load(Ordering::Relaxed) => {
            return Ok(Action::requeue(Duration::from_millis(100)));
        }
        Some(lease) => Some(ctx.leases.get(&ObjectRef::new(lease).within(&namespace))),
        None => None,
    };
    let annotation = si.heartbeat.clone();
    let mut problems = SignalProblems {
        lease_missing: matches!(lease, Some(None)),
        annotation_not_timestamp: annotation
            .as_deref()
            .is_some_and(|v| v.parse::<jiff::Timestamp>().is_err()),
        health_check: None,
        protected: None,
    };
    let signals = Signals {
        annotation,
        lease: lease.flatten().and_then(|l| renewal(&l)),
    };
    let cached = signals.clone();

    let now = views.now();
    let sight = Sight {
        namespace: &namespace,
        name: &name,
        uid: &uid,
        fresh: si.status.is_none(),
        signals,
    };
    let floor = views.view_floor();
    let (observed, heartbeat) = views
        .observations
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .observe(sight, now, floor);
    if heartbeat {
        ctx.metrics.heartbeat_observed();
    }
    let timing = Timing::of(&si.spec, &ctx.defaults);
    // A standby judges too (its registry index is ready the moment it leads) but writes nothing.
    let term = views.term();
    // What the status says now: what this term last wrote when it has (the cache may not have
    // caught up with our own writes yet), else the cache's.
    let baseline = match &term {
        Some(term) => term.baseline(&si, &uid),
        None => status::liveness_view(si.status.as_ref()),
    };
    let judgement = liveness::judge(timing, observed, status::prior(Some(&baseline)), now);
    // The health check's verdict (only the leader probes); before this term has one, the
    // written one stands.
    problems.health_check = si.spec.health_check.as_ref().map(|_| {
        match term.as_ref().map(|t| t.prober.verdicts.get(&uid)) {
            None | Some(probe::Verdict::Unknown) => status::health_check_prior(Some(&baseline)),
            Some(verdict) => verdict,
        }
    });
    let silent = matches!(judgement.liveness, Liveness::Silent | Liveness::Expired);
    if silent {
        if views.any_watch_broken() {
            // Heartbeats may be arriving unseen: judge nothing silent until the watch is back.
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
        // Believe only a silence the apiserver could have broken: a request that started after
        // the verdict became due must have been answered (a paused apiserver or etcd breaks no
        // watch, it just delivers nothing).
        if let Some(due) = judgement.due
            && !views
                .elector
                .contact()
                .confirmed_since(views.instant(due))
                .await
        {
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
        if views.view_floor() != floor {
            // A watch relisted while this waited: judge again in the fresh view.
            return Ok(Action::requeue(Duration::from_millis(10)));
        }
        // The apiserver stalled for a quarter of the TTL or more within this silence: it may
        // have cost the instance heartbeats, so it gets a full TTL from the stall's end.
        // Only the last TTL before the verdict counts: a live instance would have heartbeated
        // in it (for `Expired`, whose window is deleteAfterSeconds long, an earlier stall says
        // nothing about the heartbeats that should have followed it).
        if let Some(due) = judgement.due
            && let Some(end) = views.elector.contact().fresh_view(
                views.instant(
                    observed
                        .silence_start()
                        .max(Tick(due.0.saturating_sub(timing.ttl))),
                ),
                views.instant(due),
                timing.ttl,
            )
        {
            views
                .observations
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .rebase(&namespace, &name, views.tick(end));
            return Ok(Action::requeue(Duration::from_millis(10)));
        }
        // A watch can be connected and lagging: believe the silence only if a read made now,
        // after the verdict became due, shows the heartbeat signals this judgement used.
        if !delivered(&ctx.client, &si, &namespace, &uid, &cached).await? {
            ctx.metrics.heartbeat_not_yet_delivered();
            return Ok(Action::requeue(Duration::from_millis(200)));
        }
    }

    // Protection against mass expiry: every verdict counts; the scope decides.
    let key = (namespace.clone(), name.clone());
    let silence = match (silent, judgement.silent_since) {
        (false, _) => Silence::None,
        (true, Some(at)) => Silence::Since(at),
        (true, None) => Silence::Older,
    };
    let service = Scope::Service {
        namespace: namespace.clone(),
        service: si.spec.service.clone(),
    };
    let (changes, protection, max_duration) = {
        let mut guard = views.protection();
        let changes = guard.report(key.clone(), service, silence, timing.ttl, now);
        (
            changes,
            guard.protects(&key).filter(|_| silent),
            guard.policy().max_duration,
        )
    };
    views.announce(changes);
    let was_alive = observed.last_heartbeat.is_some()
        || status::prior(Some(&baseline)) == liveness::Prior::Alive;
    problems.protected = protection.as_ref().map(|p| {
        let hold_readiness = p.readiness_held && was_alive;
        status::Protected {
            message: protected_message(p, hold_readiness, max_duration),
            hold_readiness,
        }
    });
    if judgement.liveness == Liveness::Expired
        && protection.is_none()
        && let Some(term) = &term
    {
        return expire(&si, timing, &namespace, &uid, term, &ctx).await;
    }

    let desired = status::desired(
        &si,
        timing,
        Some(&baseline),
        judgement.liveness,
        &problems,
        jiff::Timestamp::now(),
    );
    // The verdict goes into the registry index first: the projector reads it from there, so
    // the instance is routed (or not) without waiting for the status write below.
    if let Some(phase) = desired.phase {
        views.registry.judged(&namespace, &name, &uid, phase);
    }
    // A protected instance is judged again when the time cap releases it at the latest.
    let next = [judgement.next_check, protection.map(|p| p.until)]
        .into_iter()
        .flatten()
        .min();
    let next = match next {
        Some(at) => Action::requeue(at.saturating_since(now)),
        None => Action::await_change(),
    };
    let Some(term) = term else {
        return Ok(next);
    };
    if baseline != desired {
        term.write(&namespace, &name, &uid, desired.clone());
        let before = baseline.phase;
        if let Some(phase) = desired.phase
            && before != Some(phase)
        {
            ctx.metrics.transitioned(phase);
            tracing::info!(%namespace, %name, from = ?before, to = ?phase, "transition");
            let held = problems
                .protected
                .as_ref()
                .is_some_and(|p| p.hold_readiness);
            let event = if held && silent {
                Event {
                    type_: EventType::Warning,
                    reason: "Protected".into(),
                    note: Some(
                        "No heartbeat, but held at its last-known-good readiness by protection \
                         against mass expiry"
                            .into(),
                    ),
                    action: "Reconcile".into(),
                    secondary: None,
                }
            } else {
                transition_event(timing, phase)
            };
            term.events.publish(&si, event);
        }
    }
    Ok(next)
}

/// Whether the watches have delivered every heartbeat of `si` up to now: a fresh read of its
/// heartbeat annotation (and of its Lease, if it names one) shows what the cache showed. A
/// difference is a heartbeat on its way through a lagging watch; its event will reconcile again.
async fn delivered(
    client: &Client,
    si: &Instance,
    namespace: &str,
    uid: &str,
    cached: &Signals,
) -> Result<bool> {
    let name = si.name_any();
    let instances: Api<ServiceInstance> = Api::namespaced(client.clone(), namespace);
    let fresh = instances
        .get_metadata_opt(&name)
        .await
        .map_err(Error::kube(format!(
            "read ServiceInstance {namespace}/{name}"
        )))?;
    let Some(fresh) = fresh.filter(|f| f.metadata.uid.as_deref() == Some(uid)) else {
        // Deleted (or replaced) since: the watch will say so.
        return Ok(false);
    };
    if fresh.annotations().get(HEARTBEAT_ANNOTATION) != cached.annotation.as_ref() {
        return Ok(false);
    }
    let Some(lease) = &si.spec.lease_name else {
        return Ok(true);
    };
    let leases: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let fresh = leases.get_opt(lease).await.map_err(Error::kube(format!(
        "read Lease {namespace}/{lease} of {name}"
    )))?;
    Ok(fresh.as_ref().and_then(renewal) == cached.lease)
}

/// The `Protected` condition's message: the same for the whole episode, so it causes no write.
pub(super) fn protected_message(p: &Protection, hold_readiness: bool, max: Duration) -> String {
    let held = if hold_readiness {
        " and its last-known-good readiness is held"
    } else {
        ""
    };
    format!(
        "{} of {} instances ({}) fell silent within one TTL, more likely a partition or an \
         apiserver problem than mass death: its deletion is suspended{held} until they recover, \
         for at most {} s",
        p.silent,
        p.total,
        p.scope,
        max.as_secs()
    )
}

pub(super) fn error_policy(si: Arc<Instance>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed(error);
    tracing::warn!(name = %si.name_any(), namespace = si.namespace().unwrap_or_default(), error = %crate::error::report(error), "reconcile failed");
    Action::requeue(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::json;

    /// What the apiserver answers to the fresh reads: the instance's metadata (or 404), then
    /// the Lease's.
    struct Fresh {
        uid: &'static str,
        annotation: Option<&'static str>,
        renew_time: Option<&'static str>,
    }

    fn not_found() -> serde_json::Value {
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404})
    }

    async fn answer(
        apiserver: &mut tower_test::mock::Handle<Request<Body>, Response<Body>>,
        path: &str,
        body: serde_json::Value,
    ) {
        let (request, respond) =
            tokio::time::timeout(Duration::from_secs(5), apiserver.next_request())
                .await
                .expect("a request within 5 s")
                .expect("a request");
        assert_eq!(request.method(), http::Method::GET);
        assert_eq!(request.uri().path(), path);
        let code = body["code"].as_u64().map_or(200, |c| c as u16);
        respond.send_response(
            Response::builder()
                .status(code)
                .body(Body::from(serde_json::to_vec(&body).expect("JSON")))
                .expect("response"),
        );
    }

    /// A silence is believed only when a fresh read shows the heartbeat signals the cache
    /// showed: a heartbeat a lagging watch has not delivered yet, a deletion or a replacement
    /// all say "not yet".
    #[tokio::test]
    async fn a_silence_is_believed_only_when_a_fresh_read_shows_no_newer_heartbeat() {
        let cached_at = "2026-12-01T10:00:00Z";
        let renewed = "2026-12-01T10:00:00.000000Z";
        let cases = [
            (
                "same annotation, no Lease",
                false,
                Some(Fresh {
                    uid: "u1",
                    annotation: Some(cached_at),
                    renew_time: None,
                }),
                true,
            ),
            (
                "a newer annotation",
                false,
                Some(Fresh {
                    uid: "u1",
                    annotation: Some("2026-12-01T10:00:05Z"),
                    renew_time: None,
                }),
                false,
            ),
            ("deleted", false, None, false),
            (
                "replaced under its name",
                false,
                Some(Fresh {
                    uid: "u2",
                    annotation: Some(cached_at),
                    renew_time: None,
                }),
                false,
            ),
            (
                "the same Lease renewal",
                true,
                Some(Fresh {
                    uid: "u1",
                    annotation: Some(cached_at),
                    renew_time: Some(renewed),
                }),
                true,
            ),
            (
                "a newer Lease renewal",
                true,
                Some(Fresh {
                    uid: "u1",
                    annotation: Some(cached_at),
                    renew_time: Some("2026-12-01T10:00:09.000000Z"),
                }),
                false,
            ),
        ];
        for (case, with_lease, fresh, believed) in cases {
            let (service, mut apiserver) =
                tower_test::mock::pair::<Request<Body>, Response<Body>>();
            let client = Client::new(service, "default");
            let mut spec = crate::api::ServiceInstanceSpec::new("web", "10.0.0.1", vec![]);
            spec.lease_name = with_lease.then(|| "hb".to_string());
            let mut si = ServiceInstance::new("a", spec);
            si.metadata.namespace = Some("ns".into());
            si.metadata.uid = Some("u1".into());
            let lease = |renew: &str| {
                json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                       "metadata": {"name": "hb", "namespace": "ns"},
                       "spec": {"holderIdentity": "a", "renewTime": renew}})
            };
            let cached = Signals {
                annotation: Some(cached_at.to_string()),
                lease: with_lease
                    .then(|| serde_json::from_value::<Lease>(lease(renewed)).ok())
                    .flatten()
                    .as_ref()
                    .and_then(renewal),
            };
            let check = tokio::spawn({
                let (client, si, cached) =
                    (client.clone(), Instance::from(si.clone()), cached.clone());
                async move { delivered(&client, &si, "ns", "u1", &cached).await }
            });
            let path = "/apis/roster.dev/v1alpha1/namespaces/ns/serviceinstances/a";
            let reads_lease = fresh
                .as_ref()
                .is_some_and(|f| f.uid == "u1" && f.annotation == Some(cached_at))
                && with_lease;
            let renew_time = fresh.as_ref().and_then(|f| f.renew_time);
            let metadata = match fresh {
                Some(f) => json!({
                    "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                    "metadata": {"name": "a", "namespace": "ns", "uid": f.uid,
                                 "annotations": {HEARTBEAT_ANNOTATION: f.annotation}},
                }),
                None => not_found(),
            };
            answer(&mut apiserver, path, metadata).await;
            if reads_lease {
                let body = renew_time.map_or_else(not_found, lease);
                answer(
                    &mut apiserver,
                    "/apis/coordination.k8s.io/v1/namespaces/ns/leases/hb",
                    body,
                )
                .await;
            }
            let result = check.await.expect("join").expect("no error");
            assert_eq!(result, believed, "{case}");
        }
    }
}
