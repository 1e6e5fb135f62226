//! Leader election on a `coordination.k8s.io/v1` Lease, with client-go's rules. Every round
//! trip's outcome is recorded in [`Contact`].
//!
//! The rules, as client-go's `leaderelection` package:
//! - A candidate takes the Lease when it has no holder, or when the holder's record has not
//!   changed for `leaseDuration` *as observed on the candidate's own monotonic clock* (never by
//!   comparing the holder's `renewTime` with the local wall clock: clocks skew).
//! - Every write carries the resourceVersion it read, so two candidates never both win.
//! - The leader renews every `retryPeriod`, and steps down when it has not renewed for
//!   `renewDeadline`. `renewDeadline < leaseDuration`, so it stops before anyone else may start.
//! - On a clean shutdown the leader releases the Lease, and a standby takes over at once.
//!
//! One difference: a standby also *watches* the Lease. client-go's candidates see a renewal
//! only when they poll (every `retryPeriod`, with jitter), so they start the `leaseDuration`
//! count up to a retry period late and try again up to a retry period after it ran out: a
//! takeover 13–20 s after a leader dies at the defaults. Roster's standby starts the count when
//! the watch delivers the renewal and tries again the moment the count runs out (or at once
//! when the Lease is released or deleted), so it takes over `leaseDuration` after the dead
//! leader's last renewal, within `leaseDuration` of its death. Polling stays, as the fallback
//! when the watch is down.
//!
//! Why hand-written: the kube-5 crate for this, kube-lease-manager 0.13, keeps reporting
//! leadership while renewals fail (its watch loop logs the error and retries), sets no request
//! timeout, and judges expiry by comparing the holder's wall-clock `renewTime` with its own.
//! kube-leader-election and kubert's lease module are built on older kube releases. A leader
//! that cannot reach the apiserver must stop acting before another is elected, and Roster needs
//! every round trip's outcome for [`Contact`]; the protocol itself is about a hundred lines.

use std::{
    sync::{Mutex, PoisonError},
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::runtime::{
    WatchStreamExt,
    watcher::{self, watcher},
};
use kube::{
    Api, Client,
    api::{PostParams, ResourceExt},
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use crate::contact::Contact;

/// How the election is run; client-go's defaults are 15 s / 10 s / 2 s.
#[derive(Clone, Debug)]
pub struct Params {
    pub name: String,
    pub namespace: String,
    /// Unique among the candidates. A restarted process with the same identity (the same Pod)
    /// resumes its own term at once.
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

/// The outcome of one attempt to take or renew the Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Attempt {
    Leader,
    HeldBy(String),
}

/// Why a term ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TermEnd {
    /// Renewal failed for longer than the renew deadline, or another candidate holds the Lease.
    Lost,
    /// The process is shutting down.
    Stopped,
}

/// A Lease record as this process saw it.
#[derive(Debug)]
struct Seen {
    /// Holder, renew time, duration and resourceVersion: a change of any is a renewal.
    record: String,
    /// When this process first saw `record`, on its own monotonic clock.
    at: Instant,
    /// The holder, when there is one.
    holder: Option<String>,
    /// The Lease's own duration.
    held_for: Duration,
}

/// A candidate for leadership.
pub struct Elector {
    api: Api<Lease>,
    params: Params,
    /// The last Lease record seen, and when this process first saw it.
    observed: Mutex<Option<Seen>>,
    contact: Contact,
}

impl Elector {
    pub fn new(client: Client, params: Params) -> Elector {
        let api: Api<Lease> = Api::namespaced(client, &params.namespace);
        Elector {
            contact: Contact::new(
                api.clone(),
                params.name.clone(),
                params.retry_period.max(Duration::from_secs(1)),
            ),
            api,
            params,
            observed: Mutex::new(None),
        }
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    pub fn contact(&self) -> &Contact {
        &self.contact
    }

    /// Waits until this process holds the Lease: `true`, or `false` when `shutdown` comes first.
    /// `standing_by` is called once a round trip has shown who leads.
    ///
    /// It tries every retry period (with jitter), and besides at the moment the Lease, as
    /// watched, runs out: `leaseDuration` after this process saw its last renewal.
    pub async fn acquire(&self, shutdown: &CancellationToken, standing_by: impl Fn()) -> bool {
        let mut logged: Option<String> = None;
        let config =
            watcher::Config::default().fields(&format!("metadata.name={}", self.params.name));
        let mut watch = std::pin::pin!(watcher(self.api.clone(), config).default_backoff());
        loop {
            let attempted = Instant::now();
            match self.attempt(self.params.retry_period).await {
                Some(Attempt::Leader) => return true,
                Some(Attempt::HeldBy(holder)) => {
                    standing_by();
                    if logged.as_ref() != Some(&holder) {
                        tracing::info!(leader = %holder, lease = %self.params.name, "standing by");
                        logged = Some(holder);
                    }
                }
                None => {}
            }
            // Up to 20 % jitter, as client-go, so that candidates do not move in step.
            let jitter = self.params.retry_period.mul_f64(jitter_fraction() * 0.2);
            let retry = Instant::now() + self.params.retry_period + jitter;
            loop {
                // An expiry the last attempt already saw is not a reason to try again at once.
                let wake = self
                    .runs_out()
                    .filter(|&at| at > attempted)
                    .map_or(retry, |at| at.min(retry));
                tokio::select! {
                    () = shutdown.cancelled() => return false,
                    () = tokio::time::sleep_until(wake) => break,
                    Some(event) = watch.next() => match event {
                        Ok(watcher::Event::Apply(lease) | watcher::Event::InitApply(lease)) => {
                            self.observe(&lease);
                        }
                        // Gone: whoever creates it first leads.
                        Ok(watcher::Event::Delete(_)) => break,
                        // Errors are retried with backoff by the watcher; polling goes on.
                        Ok(watcher::Event::Init | watcher::Event::InitDone) | Err(_) => {}
                    },
                }
            }
        }
    }

    /// Renews the Lease every retry period until `stop` is cancelled or leadership is lost:
    /// another holder, or no successful renewal for the renew deadline.
    pub async fn hold(&self, stop: &CancellationToken) -> TermEnd {
        let mut renewed = Instant::now();
        loop {
            tokio::select! {
                () = stop.cancelled() => return TermEnd::Stopped,
                () = tokio::time::sleep(self.params.retry_period) => {}
            }
            let left = self.params.renew_deadline.saturating_sub(renewed.elapsed());
            let attempt = match self.attempt(left.min(self.params.retry_period)).await {
                // A conflict on a Lease we still hold is someone else's edit of it (a Helm
                // upgrade relabelling it), not another leader: retry within the renew deadline.
                Some(Attempt::HeldBy(holder)) if holder == self.params.identity => None,
                other => other,
            };
            match attempt {
                Some(Attempt::Leader) => renewed = Instant::now(),
                Some(Attempt::HeldBy(holder)) => {
                    tracing::warn!(leader = %holder, "another candidate holds the Lease");
                    return TermEnd::Lost;
                }
                None if renewed.elapsed() >= self.params.renew_deadline => {
                    tracing::warn!(
                        deadline = ?self.params.renew_deadline,
                        "could not renew the leader Lease within the renew deadline"
                    );
                    return TermEnd::Lost;
                }
                None => {}
            }
        }
    }

    /// Gives the Lease up (best effort, bounded), so a standby takes over without waiting for
    /// it to expire.
    pub async fn release(&self) {
        let release = async {
            let mut lease = self
                .api
                .get_opt(&self.params.name)
                .await?
                .unwrap_or_default();
            let Some(spec) = lease.spec.as_mut() else {
                return Ok(());
            };
            if spec.holder_identity.as_deref() != Some(&self.params.identity) {
                return Ok(());
            }
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(MicroTime(jiff::Timestamp::now()));
            self.api
                .replace(&self.params.name, &PostParams::default(), &lease)
                .await
                .map(|_| ())
        };
        match tokio::time::timeout(self.params.retry_period, release).await {
            Ok(Ok(())) => tracing::info!(lease = %self.params.name, "released the leader Lease"),
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot release the leader Lease"),
            Err(_) => tracing::warn!("timed out releasing the leader Lease"),
        }
    }

    /// One attempt, bounded by `timeout`; `None` when the apiserver did not answer in time or
    /// failed. Every outcome is recorded in [`Contact`].
    async fn attempt(&self, timeout: Duration) -> Option<Attempt> {
        let started = Instant::now();
        match tokio::time::timeout(timeout, self.try_acquire_or_renew()).await {
            Ok(Ok(attempt)) => {
                self.contact.answered(started);
                Some(attempt)
            }
            Ok(Err(e)) => {
                self.contact.unanswered(started);
                tracing::warn!(error = %e, lease = %self.params.name, "leader election");
                None
            }
            Err(_) => {
                self.contact.unanswered(started);
                tracing::warn!(lease = %self.params.name, ?timeout, "leader election: no answer in time");
                None
            }
        }
    }

    async fn try_acquire_or_renew(&self) -> Result<Attempt, kube::Error> {
        let p = &self.params;
        let now = MicroTime(jiff::Timestamp::now());
        let duration = i32::try_from(p.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&p.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(p.name.clone()),
                    namespace: Some(p.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(p.identity.clone()),
                    lease_duration_seconds: Some(duration),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observe(&created);
                    Ok(Attempt::Leader)
                }
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::HeldBy("?".into())),
                Err(e) => Err(e),
            };
        };
        let first_seen = self.observe(&lease);
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let held_for = held_for(spec, p.lease_duration);
        if let Some(holder) = &holder
            && holder != &p.identity
            && first_seen.elapsed() < held_for
        {
            return Ok(Attempt::HeldBy(holder.clone()));
        }
        if holder.as_deref() != Some(&p.identity) {
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
            if let Some(previous) = &holder {
                tracing::info!(%previous, "the leader Lease expired; taking over");
            }
        }
        spec.holder_identity = Some(p.identity.clone());
        spec.lease_duration_seconds = Some(duration);
        spec.renew_time = Some(now);
        // The read resourceVersion travels with the object: a concurrent writer makes this 409.
        match self
            .api
            .replace(&p.name, &PostParams::default(), &lease)
            .await
        {
            Ok(updated) => {
                self.observe(&updated);
                Ok(Attempt::Leader)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                Ok(Attempt::HeldBy(holder.unwrap_or_else(|| "?".into())))
            }
            Err(e) => Err(e),
        }
    }

    /// Records the Lease's record and returns when this process first saw it unchanged.
    fn observe(&self, lease: &Lease) -> Instant {
        let spec = lease.spec.clone().unwrap_or_default();
        let record = format!(
            "{:?}|{:?}|{:?}|{:?}",
            spec.holder_identity,
            spec.renew_time.as_ref().map(|t| t.0),
            spec.lease_duration_seconds,
            lease.resource_version(),
        );
        let mut observed = self.observed.lock().unwrap_or_else(PoisonError::into_inner);
        match observed.as_ref() {
            Some(seen) if seen.record == record => seen.at,
            _ => {
                let now = Instant::now();
                *observed = Some(Seen {
                    record,
                    at: now,
                    held_for: held_for(&spec, self.params.lease_duration),
                    holder: spec.holder_identity.filter(|h| !h.is_empty()),
                });
                now
            }
        }
    }

    /// When the Lease as last seen is free for this process to take: `leaseDuration` after the
    /// record was first seen, at once when it has no holder; `None` before anything was seen.
    fn runs_out(&self) -> Option<Instant> {
        let observed = self.observed.lock().unwrap_or_else(PoisonError::into_inner);
        observed.as_ref().map(|seen| match seen.holder {
            Some(_) => seen.at + seen.held_for,
            None => seen.at,
        })
    }
}

/// How long a Lease is held without renewal: its own `leaseDurationSeconds`, else `default`.
fn held_for(spec: &LeaseSpec, default: Duration) -> Duration {
    spec.lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map_or(default, Duration::from_secs)
}

/// A number in [0, 1) that differs between processes and calls; only for jitter.
fn jitter_fraction() -> f64 {
    use std::hash::{BuildHasher, RandomState};
    let bits = RandomState::new().hash_one(std::time::SystemTime::now());
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// This process's identity: `POD_NAME` when set (a restarted container resumes its own term),
/// else the host name with the pid.
pub fn default_identity() -> String {
    if let Ok(pod) = std::env::var("POD_NAME")
        && !pod.is_empty()
    {
        return pod;
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "roster".into());
    format!("{host}_{}", std::process::id())
}
