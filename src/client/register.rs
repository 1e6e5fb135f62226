//! Registering an instance and keeping it alive: what `roster agent` runs, and what a Rust
//! service that registers itself calls.
//!
//! One [`Registrar`] owns one instance. [`Registrar::run`] is the whole life of it in a single
//! loop: register, renew the Lease every TTL/3 (with backoff on errors), follow the app's health
//! into `spec.draining`, register again if the instance is deleted from under it, and on
//! shutdown drain, then deregister. Being one loop, it can never run two heartbeats at once.

use std::{collections::BTreeMap, time::Duration};

use futures::StreamExt;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference},
};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    Error, Result,
    api::{InstancePort, ServiceInstance, ServiceInstanceSpec},
};

/// Field manager of the agent's server-side applies: the agent owns the spec it registers, the
/// controller owns the status.
pub const FIELD_MANAGER: &str = "roster.dev/agent";

/// What to register.
#[derive(Clone, Debug)]
pub struct Registration {
    pub namespace: String,
    /// The instance's name; also its Lease's name.
    pub name: String,
    pub service: String,
    pub address: String,
    pub ports: Vec<InstancePort>,
    pub weight: i32,
    pub zone: Option<String>,
    pub metadata: BTreeMap<String, String>,
    /// The instance's TTL; the Lease is renewed every third of it.
    pub ttl: Duration,
    /// Silence after which the controller deletes the instance (`None`: its default).
    pub delete_after: Option<Duration>,
    /// The Pod the instance belongs to: its owner, so deleting the Pod deletes the instance.
    pub owner: Option<PodRef>,
    /// Who renews the Lease (its `holderIdentity`).
    pub identity: String,
}

/// A Pod, by name and uid.
#[derive(Clone, Debug)]
pub struct PodRef {
    pub name: String,
    pub uid: String,
}

/// How [`Registrar::run`] ends an instance's life.
#[derive(Clone, Copy, Debug)]
pub struct Shutdown {
    /// From `draining: true` to deletion: time for consumers to see the instance leave.
    pub drain: Duration,
    /// Everything (drain and deregistration) must fit in this, as in a Pod's
    /// `terminationGracePeriodSeconds`.
    pub grace: Duration,
}

/// Registers, renews and deregisters one instance.
pub struct Registrar {
    reg: Registration,
    instances: Api<ServiceInstance>,
    leases: Api<Lease>,
}

impl Registrar {
    /// Fails on a registration the API would refuse anyway (a clear error before any request).
    pub fn new(client: Client, reg: Registration) -> Result<Registrar> {
        let ttl = reg.ttl.as_secs();
        if !(1..=3600).contains(&ttl) || reg.ttl.subsec_nanos() != 0 {
            return Err(Error::Invalid(format!(
                "the TTL must be whole seconds from 1s to 1h; got {:?}",
                reg.ttl
            )));
        }
        for (what, value) in [
            ("namespace", &reg.namespace),
            ("name", &reg.name),
            ("service", &reg.service),
            ("address", &reg.address),
        ] {
            if value.is_empty() {
                return Err(Error::Invalid(format!("the instance's {what} is empty")));
            }
        }
        Ok(Registrar {
            instances: Api::namespaced(client.clone(), &reg.namespace),
            leases: Api::namespaced(client, &reg.namespace),
            reg,
        })
    }

    pub fn registration(&self) -> &Registration {
        &self.reg
    }

    /// How often the Lease is renewed: a third of the TTL, as Kubernetes nodes renew theirs at
    /// a quarter of theirs and Eureka clients at a third of the eviction window.
    pub fn interval(&self) -> Duration {
        self.reg.ttl / 3
    }

    /// The instance as the agent applies it.
    pub fn instance(&self, draining: bool) -> ServiceInstance {
        let r = &self.reg;
        let secs = |d: Duration| i32::try_from(d.as_secs()).unwrap_or(i32::MAX);
        let mut si = ServiceInstance::new(
            &r.name,
            ServiceInstanceSpec {
                service: r.service.clone(),
                address: r.address.clone(),
                ports: r.ports.clone(),
                weight: r.weight,
                zone: r.zone.clone(),
                metadata: r.metadata.clone(),
                ttl_seconds: Some(secs(r.ttl)),
                delete_after_seconds: r.delete_after.map(secs),
                lease_name: Some(r.name.clone()),
                draining,
                health_check: None,
            },
        );
        si.metadata.namespace = Some(r.namespace.clone());
        si.metadata.owner_references = r.owner.as_ref().map(|pod| {
            vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Pod".into(),
                name: pod.name.clone(),
                uid: pod.uid.clone(),
                // blockOwnerDeletion would need update on pods/finalizers; GC works without it.
                block_owner_deletion: None,
                controller: None,
            }]
        });
        si
    }

    /// Creates or updates the instance (server-side apply) and its Lease, renewed now.
    pub async fn register(&self, draining: bool) -> Result<()> {
        self.renew().await?;
        let params = PatchParams::apply(FIELD_MANAGER).force();
        self.instances
            .patch(
                &self.reg.name,
                &params,
                &Patch::Apply(&self.instance(draining)),
            )
            .await
            .map_err(Error::kube("register the ServiceInstance"))?;
        Ok(())
    }

    /// One heartbeat: renews the Lease, creating it when it is missing.
    pub async fn renew(&self) -> Result<()> {
        let now = MicroTime(jiff::Timestamp::now());
        let patch = json!({"spec": {"renewTime": now, "holderIdentity": self.reg.identity}});
        match self
            .leases
            .patch(
                &self.reg.name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.reg.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.reg.identity.clone()),
                        lease_duration_seconds: i32::try_from(self.reg.ttl.as_secs()).ok(),
                        acquire_time: Some(now.clone()),
                        renew_time: Some(now),
                        ..LeaseSpec::default()
                    }),
                };
                match self.leases.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(()),
                    // Created meanwhile by someone else: the next renewal patches it.
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
                    Err(e) => Err(Error::kube("create the heartbeat Lease")(e)),
                }
            }
            Err(e) => Err(Error::kube("renew the heartbeat Lease")(e)),
        }
    }

    /// Marks the instance draining (or not): it stays registered, out of traffic.
    pub async fn set_draining(&self, draining: bool) -> Result<()> {
        self.register(draining).await
    }

    /// Deletes the instance and its Lease; gone already is fine.
    pub async fn deregister(&self) -> Result<()> {
        for result in [
            self.instances
                .delete(&self.reg.name, &DeleteParams::default())
                .await
                .map(|_| ()),
            self.leases
                .delete(&self.reg.name, &DeleteParams::default())
                .await
                .map(|_| ()),
        ] {
            match result {
                Ok(()) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(Error::kube("deregister")(e)),
            }
        }
        Ok(())
    }

    /// The instance's whole life, until `shutdown` is cancelled: then drain and deregister
    /// within `end.grace`. `healthy` (from a local probe) drives `spec.draining`; without it the
    /// instance is never drained before shutdown.
    ///
    /// Every API call is bounded by a heartbeat interval and abandoned at once when `shutdown`
    /// comes, so a hung apiserver can neither stall the heartbeats nor eat the grace period.
    pub async fn run(
        &self,
        healthy: Option<watch::Receiver<bool>>,
        shutdown: CancellationToken,
        end: Shutdown,
    ) -> Result<()> {
        let mut health = Health::new(healthy);
        let mut backoff = Backoff::new(self.interval());
        // Register, retrying: the apiserver may not be reachable yet.
        loop {
            match self
                .bounded(&shutdown, self.register(health.draining()))
                .await
            {
                Some(Ok(())) => break,
                // It may have got as far as the Lease: clean up whatever exists.
                None => return self.end(end).await,
                Some(Err(e)) => {
                    let wait = backoff.failed();
                    tracing::warn!(error = %crate::error::report(&e), ?wait, "registration failed; retrying");
                    tokio::select! {
                        biased;
                        () = shutdown.cancelled() => return self.end(end).await,
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        backoff.reset();
        tracing::info!(namespace = %self.reg.namespace, name = %self.reg.name, service = %self.reg.service, interval = ?self.interval(), "registered");
        let own = watcher::Config::default().fields(&format!("metadata.name={}", self.reg.name));
        let mut events = watcher(self.instances.clone(), own)
            .default_backoff()
            .boxed();
        // Seen in the current (re)list: a relist that misses it means it was deleted.
        let mut listed = false;
        let mut present = true;
        let mut next = tokio::time::Instant::now() + self.interval();
        loop {
            // Shutdown first: nothing else starts once it has come.
            let result = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep_until(next) => {
                    let call = async {
                        if present { self.renew().await } else { self.register(health.draining()).await }
                    };
                    self.bounded(&shutdown, call).await
                }
                Some(()) = health.changed() => {
                    let drain = health.draining();
                    tracing::info!(draining = drain, "the app's health changed");
                    // Applied at the next heartbeat, with the registration.
                    present = false;
                    next = tokio::time::Instant::now();
                    continue;
                }
                event = events.next() => {
                    let gone = match event {
                        Some(Ok(watcher::Event::Init)) => { listed = false; false }
                        Some(Ok(watcher::Event::InitApply(_) | watcher::Event::Apply(_))) => { listed = true; false }
                        Some(Ok(watcher::Event::InitDone)) => !listed,
                        Some(Ok(watcher::Event::Delete(_))) => true,
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "watching the instance failed; retrying with backoff");
                            false
                        }
                        None => false,
                    };
                    if gone {
                        tracing::warn!(name = %self.reg.name, "the instance was deleted from under the agent; registering it again");
                        present = false;
                        next = tokio::time::Instant::now();
                    }
                    continue;
                }
            };
            match result {
                None => break,
                Some(Ok(())) => {
                    backoff.reset();
                    present = true;
                    next = tokio::time::Instant::now() + self.interval();
                }
                Some(Err(e)) => {
                    let wait = backoff.failed();
                    tracing::warn!(error = %crate::error::report(&e), ?wait, "heartbeat failed; retrying");
                    next = tokio::time::Instant::now() + wait;
                }
            }
        }
        drop(events);
        self.end(end).await
    }

    /// One API call, bounded by a heartbeat interval; `None` when `shutdown` came first.
    async fn bounded(
        &self,
        shutdown: &CancellationToken,
        call: impl std::future::Future<Output = Result<()>>,
    ) -> Option<Result<()>> {
        let limit = self.interval();
        tokio::select! {
            biased;
            () = shutdown.cancelled() => None,
            result = tokio::time::timeout(limit, call) => Some(result.unwrap_or_else(|_| {
                Err(Error::Timeout { what: format!("a request for {}/{}", self.reg.namespace, self.reg.name), after: limit })
            })),
        }
    }

    /// Drain, wait for consumers to notice, deregister: all within `end.grace` of the call
    /// (which [`Registrar::run`] makes as soon as shutdown comes).
    async fn end(&self, end: Shutdown) -> Result<()> {
        let deadline = tokio::time::Instant::now() + end.grace;
        // Marking it draining may take a third of the grace period at most; the rest is for the
        // drain and the deletion.
        let mark = tokio::time::timeout(end.grace / 3, self.set_draining(true)).await;
        match mark {
            Ok(Ok(())) => {
                tracing::info!(drain = ?end.drain, "draining");
                // Leave at least a second of the grace period for deregistration.
                let latest = deadline - Duration::from_secs(1);
                let until = (tokio::time::Instant::now() + end.drain).min(latest);
                tokio::time::sleep_until(until).await;
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %crate::error::report(&e), "cannot mark the instance draining; deregistering");
            }
            Err(_) => tracing::warn!("marking the instance draining took too long; deregistering"),
        }
        let deregister = async {
            let mut backoff = Backoff::new(Duration::from_secs(1));
            loop {
                match self.deregister().await {
                    Ok(()) => return,
                    Err(e) => {
                        let wait = backoff.failed();
                        tracing::warn!(error = %crate::error::report(&e), ?wait, "deregistration failed; retrying");
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        };
        match tokio::time::timeout_at(deadline, deregister).await {
            Ok(()) => {
                tracing::info!(name = %self.reg.name, "deregistered");
                Ok(())
            }
            Err(_) => Err(Error::Timeout {
                what: format!(
                    "deregistering {}/{} (the controller will expire it)",
                    self.reg.namespace, self.reg.name
                ),
                after: end.grace,
            }),
        }
    }
}

/// The app's health as the local probe reports it. It keeps the last value when the probe
/// stops, so an ending probe never clears `draining`.
struct Health {
    rx: Option<watch::Receiver<bool>>,
    open: bool,
}

impl Health {
    fn new(rx: Option<watch::Receiver<bool>>) -> Health {
        Health { rx, open: true }
    }

    /// Without a probe, never draining; with one, draining while the app is unhealthy.
    fn draining(&self) -> bool {
        self.rx.as_ref().is_some_and(|h| !*h.borrow())
    }

    /// Resolves on a change; `None` once the probe has stopped (and never again after that).
    async fn changed(&mut self) -> Option<()> {
        match self.rx.as_mut().filter(|_| self.open) {
            Some(rx) => match rx.changed().await {
                Ok(()) => Some(()),
                Err(_) => {
                    self.open = false;
                    None
                }
            },
            None => std::future::pending().await,
        }
    }
}

/// Exponential backoff with jitter (backon, which kube-runtime's watcher uses too), from
/// 200 ms up to `cap`: a retry never waits longer than a heartbeat would.
struct Backoff {
    cap: Duration,
    delays: backon::ExponentialBackoff,
}

impl Backoff {
    fn new(cap: Duration) -> Backoff {
        Backoff {
            cap,
            delays: Self::delays(cap),
        }
    }

    fn delays(cap: Duration) -> backon::ExponentialBackoff {
        use backon::BackoffBuilder;
        backon::ExponentialBuilder::new()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(cap.max(Duration::from_millis(200)))
            .with_jitter()
            .without_max_times()
            .build()
    }

    fn reset(&mut self) {
        self.delays = Self::delays(self.cap);
    }

    /// The next wait. backon adds its jitter after capping, so the cap is applied again.
    fn failed(&mut self) -> Duration {
        self.delays.next().unwrap_or(self.cap).min(self.cap)
    }
}
