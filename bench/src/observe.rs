//! One watcher, on one monotonic clock, of what clients see: which addresses are ready in the
//! EndpointSlices (Roster's and the peer's) and in Roster's ConfigMaps of the benchmark's
//! namespaces, and when that changed.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, PoisonError},
    time::Instant,
};

use futures::StreamExt;
use k8s_openapi::api::{core::v1::ConfigMap, discovery::v1::EndpointSlice};
use kube::{
    Api, Client, ResourceExt,
    runtime::{
        WatchStreamExt,
        watcher::{self, Event, watcher},
    },
};

/// Where an address was seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum View {
    Slice,
    ConfigMap,
}

#[derive(Clone, Debug)]
pub struct Change {
    pub view: View,
    pub address: String,
    pub ready: bool,
    pub at: Instant,
}

#[derive(Default)]
struct State {
    /// Per object (view, namespace/name): its ready addresses.
    objects: HashMap<(View, String), HashSet<String>>,
    /// Objects listed since the last Init, per view, while a relist runs.
    relisting: HashMap<View, HashMap<String, HashSet<String>>>,
    changes: Vec<Change>,
}

impl State {
    fn set(&mut self, view: View, key: String, ready: HashSet<String>) {
        let now = Instant::now();
        let old = self
            .objects
            .remove(&(view, key.clone()))
            .unwrap_or_default();
        for a in ready.difference(&old) {
            self.changes.push(Change {
                view,
                address: a.clone(),
                ready: true,
                at: now,
            });
        }
        for a in old.difference(&ready) {
            self.changes.push(Change {
                view,
                address: a.clone(),
                ready: false,
                at: now,
            });
        }
        if !ready.is_empty() {
            self.objects.insert((view, key), ready);
        }
    }

    fn apply(&mut self, view: View, event: Event<(String, HashSet<String>)>) {
        match event {
            Event::Apply((key, ready)) => self.set(view, key, ready),
            Event::Delete((key, _)) => self.set(view, key, HashSet::new()),
            Event::Init => {
                self.relisting.insert(view, HashMap::new());
            }
            Event::InitApply((key, ready)) => {
                self.relisting.entry(view).or_default().insert(key, ready);
            }
            Event::InitDone => {
                let listed = self.relisting.remove(&view).unwrap_or_default();
                let gone: Vec<String> = self
                    .objects
                    .keys()
                    .filter(|(v, k)| *v == view && !listed.contains_key(k))
                    .map(|(_, k)| k.clone())
                    .collect();
                for key in gone {
                    self.set(view, key, HashSet::new());
                }
                for (key, ready) in listed {
                    self.set(view, key, ready);
                }
            }
        }
    }
}

/// The observer's watches retry every 200 ms. Without a backoff a failing watch retries in a
/// busy loop that never yields (and keeps the runtime from shutting down at the end); with
/// kube's default (up to 30 s) the observer would come back long after the apiserver does, and
/// time what it sees then. A fixed short wait is neither: hence this, not `default_backoff`.
#[derive(Clone, Copy, Default)]
struct Retry;

impl Iterator for Retry {
    type Item = std::time::Duration;
    fn next(&mut self) -> Option<std::time::Duration> {
        Some(std::time::Duration::from_millis(200))
    }
}

impl kube::runtime::utils::Backoff for Retry {
    fn reset(&mut self) {}
}

#[derive(Clone, Default)]
pub struct Observer {
    state: Arc<Mutex<State>>,
}

fn slice_ready(slice: &EndpointSlice) -> (String, HashSet<String>) {
    let ready = slice
        .endpoints
        .iter()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        .flat_map(|e| e.addresses.iter().cloned())
        .collect();
    (
        format!(
            "{}/{}",
            slice.namespace().unwrap_or_default(),
            slice.name_any()
        ),
        ready,
    )
}

fn config_map_ready(cm: &ConfigMap) -> (String, HashSet<String>) {
    let ready = cm
        .data
        .as_ref()
        .and_then(|d| d.get(roster::names::CONFIG_KEY))
        .and_then(|json| serde_json::from_str::<serde_json::Value>(json).ok())
        .and_then(|v| v["instances"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter(|i| i["ready"] == true)
        .filter_map(|i| i["address"].as_str().map(String::from))
        .collect();
    (
        format!("{}/{}", cm.namespace().unwrap_or_default(), cm.name_any()),
        ready,
    )
}

fn convert<K, T>(event: Event<K>, f: impl Fn(&K) -> T) -> Event<T> {
    match event {
        Event::Apply(k) => Event::Apply(f(&k)),
        Event::Delete(k) => Event::Delete(f(&k)),
        Event::Init => Event::Init,
        Event::InitApply(k) => Event::InitApply(f(&k)),
        Event::InitDone => Event::InitDone,
    }
}

impl Observer {
    /// Starts watching; returns once both watches have listed.
    pub async fn start(client: &Client) -> Observer {
        let observer = Observer::default();
        let (synced_tx, mut synced_rx) = tokio::sync::mpsc::unbounded_channel();
        let slices = watcher(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default(),
        )
        .backoff(Retry)
        .map(|e| e.map(|e| (View::Slice, convert(e, slice_ready))));
        let maps = watcher(
            Api::<ConfigMap>::all(client.clone()),
            watcher::Config::default().labels("app.kubernetes.io/managed-by=roster.dev"),
        )
        .backoff(Retry)
        .map(|e| e.map(|e| (View::ConfigMap, convert(e, config_map_ready))));
        let state = observer.state.clone();
        tokio::spawn(async move {
            let mut events = std::pin::pin!(futures::stream::select(slices, maps));
            while let Some(event) = events.next().await {
                let Ok((view, event)) = event else { continue };
                let done = matches!(event, Event::InitDone);
                state
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .apply(view, event);
                if done {
                    let _ = synced_tx.send(view);
                }
            }
        });
        let mut seen = HashSet::new();
        while seen.len() < 2 {
            match synced_rx.recv().await {
                Some(view) => {
                    seen.insert(view);
                }
                None => break,
            }
        }
        observer
    }

    /// Every change so far, in the order observed.
    pub fn changes(&self) -> Vec<Change> {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .changes
            .clone()
    }

    /// How many of `addresses` are ready in `view` now.
    pub fn ready_count(&self, view: View, addresses: &HashSet<String>) -> usize {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let ready: HashSet<&String> = state
            .objects
            .iter()
            .filter(|((v, _), _)| *v == view)
            .flat_map(|(_, r)| r.iter())
            .collect();
        addresses.iter().filter(|a| ready.contains(a)).count()
    }
}

/// The first time each address became ready in `view` after `since`.
pub fn first_ready(changes: &[Change], view: View, since: Instant) -> HashMap<String, Instant> {
    let mut first = HashMap::new();
    for c in changes
        .iter()
        .filter(|c| c.view == view && c.ready && c.at >= since)
    {
        first.entry(c.address.clone()).or_insert(c.at);
    }
    first
}

/// The first time each address stopped being ready in `view` after `since`.
pub fn first_removed(changes: &[Change], view: View, since: Instant) -> HashMap<String, Instant> {
    let mut first = HashMap::new();
    for c in changes
        .iter()
        .filter(|c| c.view == view && !c.ready && c.at >= since)
    {
        first.entry(c.address.clone()).or_insert(c.at);
    }
    first
}
