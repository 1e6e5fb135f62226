//! One instance's reconcile: observe its heartbeat signals, judge, protect, and write the
//! difference.

use std::{
    sync::{Arc, PoisonError, atomic::Ordering},
    time::Duration,
};

use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    Client, ResourceExt,
    runtime::{
        controller::Action,
        events::{Event, EventType, Recorder},
        reflector::{ObjectRef, Store},
    },
};

use super::{
    events::{publish, transition_event},
    expire::expire,
    views::{Views, renewal},
};
use crate::{
    Error, Result,
    api::ServiceInstance,
    liveness::{self, Liveness, Sight, Signals, Timing},
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
    pub(super) recorder: Recorder,
    pub(super) leases: Store<Lease>,
    pub(super) views: Arc<Views>,
    /// TTL and deletion for instances that leave them unset.
    pub(super) defaults: liveness::Defaults,
}

pub(super) async fn reconcile(si: Arc<ServiceInstance>, ctx: Arc<Context>) -> Result<Action> {
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
    let annotation = si.annotations().get(HEARTBEAT_ANNOTATION).cloned();
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
    let cached_renewal = signals.lease.clone();

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
    // What the status says now: what we last wrote when we have it (the cache may not have
    // caught up with our own writes yet), else the cache's.
    let baseline = {
        let mut written = views.written.lock().unwrap_or_else(PoisonError::into_inner);
        if views.status_writer.take_abandoned(&uid) {
            // Its last write was refused for good: decide it again against what is stored.
            written.remove(&uid);
        }
        written
            .get(&uid)
            .cloned()
            .unwrap_or_else(|| status::liveness_view(si.status.as_ref()))
    };
    let judgement = liveness::judge(timing, observed, status::prior(Some(&baseline)), now);
    // The health check's verdict; before this controller has one, the written one stands.
    problems.health_check =
        si.spec
            .health_check
            .as_ref()
            .map(|_| match views.prober.verdicts.get(&uid) {
                probe::Verdict::Unknown => status::health_check_prior(Some(&baseline)),
                verdict => verdict,
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
            // Contact came back while this waited: judge again in the fresh view.
            return Ok(Action::requeue(Duration::from_millis(10)));
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
    if judgement.liveness == Liveness::Expired && protection.is_none() {
        return expire(&si, timing, &namespace, &uid, cached_renewal, &ctx).await;
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
    if baseline != desired {
        views
            .status_writer
            .submit(&namespace, &name, &uid, desired.clone());
        views
            .written
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(uid.clone(), desired.clone());
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
            publish(&ctx, &si, event);
        }
    }
    // A protected instance is judged again when the time cap releases it at the latest.
    let next = [judgement.next_check, protection.map(|p| p.until)]
        .into_iter()
        .flatten()
        .min();
    Ok(match next {
        Some(at) => Action::requeue(at.saturating_since(now)),
        None => Action::await_change(),
    })
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

pub(super) fn error_policy(si: Arc<ServiceInstance>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed(error);
    tracing::warn!(name = %si.name_any(), namespace = si.namespace().unwrap_or_default(), error = %crate::error::report(error), "reconcile failed");
    Action::requeue(Duration::from_secs(1))
}
