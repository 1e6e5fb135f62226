//! The prober: runs every instance's health check on its period, spread by a per-instance
//! offset (jitter) and bounded in concurrency, on tasks of its own, so probing never delays
//! heartbeat handling. It tells the controller only when a verdict crosses a threshold.

use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use futures::{StreamExt, channel::mpsc::UnboundedSender};
use kube::{ResourceExt, runtime::reflector::ObjectRef};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::{sync::CancellationToken, time::DelayQueue};

use crate::{
    cache::Instance,
    metrics::Metrics,
    probe::{self, Clients, Outcome, Streak, Target, Verdict},
};

/// The current verdict of every probed instance, by uid.
#[derive(Default)]
pub struct Verdicts(Mutex<HashMap<String, Verdict>>);

impl Verdicts {
    pub fn get(&self, uid: &str) -> Verdict {
        let map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(uid).cloned().unwrap_or(Verdict::Unknown)
    }

    fn set(&self, uid: &str, verdict: Option<Verdict>) {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match verdict {
            Some(v) => map.insert(uid.to_string(), v),
            None => map.remove(uid),
        };
    }
}

enum Command {
    Upsert {
        uid: String,
        key: ObjectRef<Instance>,
        target: Box<Target>,
    },
    Remove {
        uid: String,
    },
}

/// Feeds the prober from the instance watch.
#[derive(Clone)]
pub struct Prober {
    commands: mpsc::UnboundedSender<Command>,
    pub verdicts: Arc<Verdicts>,
}

impl Prober {
    /// Probes `si` if it declares a check (again from scratch if the check changed), else stops.
    pub fn watch(&self, si: &Instance) {
        let Some(uid) = si.uid() else {
            return;
        };
        let command = match (
            &si.spec.health_check,
            si.metadata.deletion_timestamp.is_some(),
        ) {
            (Some(check), false) => Command::Upsert {
                uid,
                key: ObjectRef::from_obj(si),
                target: Box::new(Target {
                    address: si.spec.address.clone(),
                    ports: si.spec.ports.clone(),
                    check: (**check).clone(),
                }),
            },
            _ => Command::Remove { uid },
        };
        let _ = self.commands.send(command);
    }

    pub fn forget(&self, uid: &str) {
        let _ = self.commands.send(Command::Remove {
            uid: uid.to_string(),
        });
    }
}

struct Entry {
    key: ObjectRef<Instance>,
    target: Target,
    streak: Streak,
    scheduled: Option<tokio_util::time::delay_queue::Key>,
}

/// Starts the prober. Verdict changes are sent to `reconcile`; at most `concurrency` checks run
/// at once.
pub fn spawn(
    concurrency: usize,
    reconcile: UnboundedSender<ObjectRef<Instance>>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Prober {
    let (commands, rx) = mpsc::unbounded_channel();
    let verdicts = Arc::new(Verdicts::default());
    tokio::spawn(run(
        rx,
        verdicts.clone(),
        reconcile,
        Arc::new(Semaphore::new(concurrency.max(1))),
        metrics,
        shutdown,
    ));
    Prober { commands, verdicts }
}

/// A stable offset within the period, so that many instances with the same period spread
/// evenly instead of all firing at once.
fn offset(uid: &str, period: Duration) -> Duration {
    let mut h = DefaultHasher::new();
    uid.hash(&mut h);
    let millis = u64::try_from(period.as_millis()).unwrap_or(u64::MAX).max(1);
    Duration::from_millis(h.finish() % millis)
}

async fn run(
    mut commands: mpsc::UnboundedReceiver<Command>,
    verdicts: Arc<Verdicts>,
    reconcile: UnboundedSender<ObjectRef<Instance>>,
    slots: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let clients = Arc::new(Clients::default());
    let mut entries: HashMap<String, Entry> = HashMap::new();
    let mut queue: DelayQueue<String> = DelayQueue::new();
    let (results_tx, mut results) = mpsc::unbounded_channel::<(String, Target, Outcome)>();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            command = commands.recv() => match command {
                None => return,
                Some(Command::Upsert { uid, key, target }) => {
                    let target = *target;
                    if entries.get(&uid).is_some_and(|e| e.target == target) {
                        continue;
                    }
                    // New, or its check changed: start afresh.
                    if let Some(old) = entries.remove(&uid)
                        && let Some(k) = old.scheduled
                    {
                        queue.remove(&k);
                    }
                    let first = offset(&uid, target.period());
                    let scheduled = Some(queue.insert(uid.clone(), first));
                    if verdicts.get(&uid) != Verdict::Unknown {
                        verdicts.set(&uid, None);
                        let _ = reconcile.unbounded_send(key.clone());
                    }
                    entries.insert(uid, Entry { key, target, streak: Streak::default(), scheduled });
                }
                Some(Command::Remove { uid }) => {
                    if let Some(old) = entries.remove(&uid)
                        && let Some(k) = old.scheduled
                    {
                        queue.remove(&k);
                    }
                    verdicts.set(&uid, None);
                }
            },
            Some(expired) = queue.next(), if !queue.is_empty() => {
                let uid = expired.into_inner();
                let Some(entry) = entries.get_mut(&uid) else { continue };
                entry.scheduled = None;
                let (target, clients, slots, done) = (entry.target.clone(), clients.clone(), slots.clone(), results_tx.clone());
                tokio::spawn(async move {
                    let Ok(_slot) = slots.acquire_owned().await else { return };
                    let outcome = probe::check(&target, &clients).await;
                    let _ = done.send((uid, target, outcome));
                });
            }
            Some((uid, target, outcome)) = results.recv() => {
                // Removed, or its check changed while this ran: the result is stale.
                let Some(entry) = entries.get_mut(&uid).filter(|e| e.target == target) else { continue };
                metrics.probed(matches!(outcome, Outcome::Pass));
                let before = entry.streak.verdict.clone();
                let check = &entry.target.check;
                let after = entry
                    .streak
                    .record(
                        outcome,
                        u32::try_from(check.success_threshold).unwrap_or(1),
                        u32::try_from(check.failure_threshold).unwrap_or(1),
                    )
                    .clone();
                if after != before {
                    tracing::debug!(name = %entry.key.name, ?after, "health check verdict");
                    verdicts.set(&uid, Some(after));
                    let _ = reconcile.unbounded_send(entry.key.clone());
                }
                entry.scheduled = Some(queue.insert(uid, entry.target.period()));
            }
        }
    }
}
