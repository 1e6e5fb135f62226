//! The load generator: registers instances and heartbeats them (annotation or Lease) at a rate,
//! round-robin, under its own identity.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use roster::api::{InstancePort, ServiceInstance, ServiceInstanceSpec};
use serde_json::json;
use tokio_util_free::Stop;

pub const NAMESPACE: &str = "bench-roster";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Annotation,
    Lease,
}

/// Instance i's name, service and address (10.1.0.0 onwards, one per instance).
pub fn instance(i: usize, services: usize) -> (String, String, String) {
    (
        format!("i-{i}"),
        format!("svc-{}", i % services),
        format!("10.{}.{}.{}", 1 + i / 65536, (i / 256) % 256, i % 256),
    )
}

pub struct Load {
    instances: Api<ServiceInstance>,
    leases: Api<Lease>,
    pub mode: Mode,
    pub n: usize,
    services: usize,
    origin: Instant,
    /// Per instance: when its last heartbeat was answered (µs since `origin`; 0: never).
    last_beat: Arc<Vec<AtomicU64>>,
    stopped: Arc<Vec<AtomicBool>>,
    /// Heartbeats answered with success.
    pub sent: Arc<AtomicU64>,
    /// Heartbeats sent and not answered yet.
    in_flight: Arc<AtomicU64>,
    /// Target rate, in heartbeats per 1000 s.
    rate_milli: Arc<AtomicU64>,
    /// (sent at, latency ms) of each heartbeat.
    latencies: Arc<Mutex<Vec<(Instant, f64)>>>,
    /// When each registration's create was answered, by address.
    pub answered: Mutex<HashMap<String, Instant>>,
    stop: Stop,
}

impl Load {
    pub fn new(client: &Client, mode: Mode, n: usize, services: usize) -> Load {
        Load {
            instances: Api::namespaced(client.clone(), NAMESPACE),
            leases: Api::namespaced(client.clone(), NAMESPACE),
            mode,
            n,
            services,
            origin: Instant::now(),
            last_beat: Arc::new((0..n).map(|_| AtomicU64::new(0)).collect()),
            stopped: Arc::new((0..n).map(|_| AtomicBool::new(false)).collect()),
            sent: Arc::default(),
            in_flight: Arc::default(),
            rate_milli: Arc::default(),
            latencies: Arc::default(),
            answered: Mutex::default(),
            stop: Stop::default(),
        }
    }

    /// Registers instances `which` (64 requests in flight); returns when each create was
    /// sent, by address. Each is created already carrying a heartbeat (annotation, or a fresh
    /// Lease).
    pub async fn register(
        &self,
        which: std::ops::Range<usize>,
        ttl_seconds: i32,
    ) -> Result<HashMap<String, Instant>> {
        let sent = Mutex::new(HashMap::new());
        futures::stream::iter(which)
            .map(|i| {
                let sent = &sent;
                async move {
                    let (name, service, address) = instance(i, self.services);
                    let mut spec = ServiceInstanceSpec::new(
                        &service,
                        &address,
                        vec![InstancePort::tcp("http", 8080)],
                    );
                    spec.ttl_seconds = Some(ttl_seconds);
                    let mut si = ServiceInstance::new(&name, spec);
                    if self.mode == Mode::Lease {
                        si.spec.lease_name = Some(name.clone());
                        let lease: Lease = serde_json::from_value(json!({
                            "metadata": {"name": name},
                            "spec": {"renewTime": now_micro(), "leaseDurationSeconds": ttl_seconds},
                        }))?;
                        self.leases.create(&PostParams::default(), &lease).await?;
                    } else {
                        si.metadata.annotations = Some(
                            [(roster::names::HEARTBEAT_ANNOTATION.to_string(), now_micro())].into(),
                        );
                    }
                    let at = Instant::now();
                    self.instances.create(&PostParams::default(), &si).await?;
                    self.beat_answered(i);
                    self.answered
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(address.clone(), Instant::now());
                    sent.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(address, at);
                    anyhow::Ok(())
                }
            })
            .buffer_unordered(64)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(sent.into_inner().unwrap_or_else(PoisonError::into_inner))
    }

    fn beat_answered(&self, i: usize) {
        let us = u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.last_beat[i].store(us.max(1), Ordering::Relaxed);
    }

    /// When instance i's last heartbeat was answered.
    pub fn last_beat(&self, i: usize) -> Option<Instant> {
        match self.last_beat[i].load(Ordering::Relaxed) {
            0 => None,
            us => Some(self.origin + Duration::from_micros(us)),
        }
    }

    pub fn silence(&self, i: usize) {
        self.stopped[i].store(true, Ordering::Relaxed);
    }

    pub fn set_rate(&self, per_second: f64) {
        self.rate_milli
            .store((per_second * 1000.0) as u64, Ordering::Relaxed);
    }

    /// Heartbeat latencies (ms) of heartbeats sent in [from, to].
    pub fn latencies(&self, from: Instant, to: Instant) -> Vec<f64> {
        self.latencies
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(at, _)| *at >= from && *at <= to)
            .map(|(_, ms)| *ms)
            .collect()
    }

    /// Runs the heartbeaters until `stop`: every 20 ms, the heartbeats the rate allows, to the
    /// next instances in turn (silenced ones skipped), at most 512 in flight.
    pub fn start(self: &Arc<Self>) {
        let load = self.clone();
        tokio::spawn(async move {
            let permits = Arc::new(tokio::sync::Semaphore::new(512));
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let (mut credit, mut next) = (0.0_f64, 0usize);
            let mut last = Instant::now();
            while !load.stop.stopped() {
                tick.tick().await;
                let now = Instant::now();
                let rate = load.rate_milli.load(Ordering::Relaxed) as f64 / 1000.0;
                credit =
                    (credit + rate * now.duration_since(last).as_secs_f64()).min(rate.max(1.0));
                last = now;
                let mut skipped = 0;
                while credit >= 1.0 && skipped < load.n {
                    let i = next;
                    next = (next + 1) % load.n;
                    if load.stopped[i].load(Ordering::Relaxed) {
                        skipped += 1;
                        continue;
                    }
                    credit -= 1.0;
                    let Ok(permit) = permits.clone().acquire_owned().await else {
                        return;
                    };
                    let load = load.clone();
                    load.in_flight.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(async move {
                        let sent = Instant::now();
                        let beat = load.beat(i).await;
                        load.in_flight.fetch_sub(1, Ordering::Relaxed);
                        if beat.is_ok() {
                            load.beat_answered(i);
                            load.sent.fetch_add(1, Ordering::Relaxed);
                            let ms = sent.elapsed().as_secs_f64() * 1000.0;
                            load.latencies
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .push((sent, ms));
                        }
                        drop(permit);
                    });
                }
            }
        });
    }

    /// Waits until no more than `most` heartbeats have been in flight for a whole second,
    /// for at most `limit`; returns how long it waited. A rate past the apiserver's knee
    /// leaves it a backlog of seconds after the rate drops, which the next phase would
    /// otherwise measure instead of what it is about.
    pub async fn calm(&self, most: u64, limit: Duration) -> Result<Duration> {
        let started = Instant::now();
        let mut calm_since = None;
        loop {
            let now = Instant::now();
            if self.in_flight.load(Ordering::Relaxed) > most {
                calm_since = None;
            } else if now.duration_since(*calm_since.get_or_insert(now)) >= Duration::from_secs(1) {
                return Ok(started.elapsed());
            }
            anyhow::ensure!(
                started.elapsed() < limit,
                "over {most} heartbeats were still in flight after {limit:?}"
            );
            // Polling: the in-flight count has no change notification.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn beat(&self, i: usize) -> kube::Result<()> {
        let (name, _, _) = instance(i, self.services);
        match self.mode {
            Mode::Annotation => {
                let patch = json!({"metadata": {"annotations": {roster::names::HEARTBEAT_ANNOTATION: now_micro()}}});
                self.instances
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
            }
            Mode::Lease => {
                let patch = json!({"spec": {"renewTime": now_micro()}});
                self.leases
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
            }
        }
        Ok(())
    }

    pub fn shutdown(&self) {
        self.stop.stop();
    }
}

/// A MicroTime as the Lease API writes it.
pub fn now_micro() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S.%6fZ")
        .to_string()
}

mod tokio_util_free {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };

    /// A stop flag shared with the heartbeat task.
    #[derive(Clone, Default)]
    pub struct Stop(Arc<AtomicBool>);

    impl Stop {
        pub fn stop(&self) {
            self.0.store(true, Ordering::Relaxed);
        }
        pub fn stopped(&self) -> bool {
            self.0.load(Ordering::Relaxed)
        }
    }
}
