//! Discovering a service's instances from inside the cluster: watch what Roster projects (the
//! service's EndpointSlices, or its ConfigMap), keep it in a local cache, balance requests over
//! the ready instances, and report every change as a stream.
//!
//! The two sources carry the same instances. EndpointSlices are what kube-proxy and DNS read,
//! and they carry zones but no weights (every instance weighs 100 there). The ConfigMap adds
//! weights and metadata, at the cost of a whole-service object per change. Either way an
//! instance is a candidate while Roster reports it ready, which an instance of weight 0 (the
//! API's "no traffic") never is.

use std::{
    collections::BTreeMap,
    fmt,
    str::FromStr,
    sync::{Arc, Mutex, PoisonError},
};

use futures::{Stream, StreamExt};
use k8s_openapi::api::{core::v1::ConfigMap, discovery::v1::EndpointSlice};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, reflector, watcher},
};
use serde::Deserialize;
use tokio::sync::mpsc;

use super::pick::{Balancer, Endpoint, Pick, Strategy};
use crate::{
    Error, Result,
    names::{CONFIG_KEY, SERVICE_NAME_LABEL, config_map_name},
};

/// Where discovery reads a service's instances.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The service's EndpointSlices (`kubernetes.io/service-name=<service>`).
    EndpointSlices,
    /// The service's `<service>-roster` ConfigMap.
    ConfigMap,
}

impl FromStr for Source {
    type Err = Error;
    fn from_str(s: &str) -> Result<Source> {
        match s {
            "endpointslices" => Ok(Source::EndpointSlices),
            "configmap" => Ok(Source::ConfigMap),
            other => Err(Error::Invalid(format!(
                "unknown discovery source {other:?}; valid values are endpointslices, configmap"
            ))),
        }
    }
}

/// How to discover.
#[derive(Clone, Debug)]
pub struct Options {
    pub source: Source,
    pub strategy: Strategy,
    /// The caller's zone: its instances are preferred while any is ready.
    pub zone: Option<String>,
    /// Seed of the weighted-random strategy (tests); `None` seeds from the clock.
    pub seed: Option<u64>,
}

/// A change of the service's ready instances, in the order the watch saw them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Added(Endpoint),
    /// Still ready, with another address, ports, zone or weight.
    Updated {
        from: Endpoint,
        to: Endpoint,
    },
    Removed(Endpoint),
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Added(e) => write!(f, "+ {} {}", e.name, e.address),
            Change::Updated { to, .. } => write!(f, "~ {} {}", to.name, to.address),
            Change::Removed(e) => write!(f, "- {} {}", e.name, e.address),
        }
    }
}

/// A service's ready instances, kept current by a watch; dropping it stops the watch.
pub struct Discovery {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

struct Shared {
    balancer: Balancer,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Ready instances by name.
    endpoints: BTreeMap<String, Endpoint>,
    subscribers: Vec<mpsc::UnboundedSender<Change>>,
}

impl Discovery {
    /// Starts watching `namespace/service` and returns once the first list is in the cache.
    /// It waits as long as the apiserver takes: wrap it in a timeout to bound that.
    pub async fn start(
        client: Client,
        namespace: &str,
        service: &str,
        options: Options,
    ) -> Result<Discovery> {
        let mut balancer = Balancer::new(options.strategy, options.zone.clone());
        if let Some(seed) = options.seed {
            balancer = balancer.with_seed(seed);
        }
        let shared = Arc::new(Shared {
            balancer,
            state: Mutex::default(),
        });
        let (synced_tx, synced_rx) = tokio::sync::oneshot::channel();
        let task = match options.source {
            Source::EndpointSlices => {
                let api = Api::<EndpointSlice>::namespaced(client, namespace);
                let config =
                    watcher::Config::default().labels(&format!("{SERVICE_NAME_LABEL}={service}"));
                tokio::spawn(follow(api, config, from_slices, shared.clone(), synced_tx))
            }
            Source::ConfigMap => {
                let api = Api::<ConfigMap>::namespaced(client, namespace);
                let config = watcher::Config::default()
                    .fields(&format!("metadata.name={}", config_map_name(service)));
                tokio::spawn(follow(
                    api,
                    config,
                    from_config_maps,
                    shared.clone(),
                    synced_tx,
                ))
            }
        };
        let discovery = Discovery { shared, task };
        // The task only ends (dropping the sender) if its watch stream does, which it does not.
        synced_rx.await.map_err(|_| {
            Error::Invalid(format!(
                "the watch of {namespace}/{service} ended before its first list"
            ))
        })?;
        Ok(discovery)
    }

    /// An instance for one request, by the strategy; hold the [`Pick`] while the request is in
    /// flight. `None` while no instance is ready.
    pub fn pick(&self) -> Option<Pick> {
        self.shared.balancer.pick()
    }

    /// The ready instances, by name.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.shared.lock().endpoints.values().cloned().collect()
    }

    /// Every change from now on, led by an `Added` for each instance ready now, so a consumer
    /// that applies the stream in order holds the same set as the cache. Nothing is dropped.
    /// Watch events come in the order the apiserver sent them; the changes one event makes
    /// (a ConfigMap update can add and remove several instances) come removals and updates
    /// first, by name, then additions.
    pub fn changes(&self) -> impl Stream<Item = Change> + Send + 'static {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut state = self.shared.lock();
        for endpoint in state.endpoints.values() {
            let _ = tx.send(Change::Added(endpoint.clone()));
        }
        state.subscribers.push(tx);
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) })
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces the ready set, telling subscribers what changed (under the lock, so every
    /// subscriber sees every change in the same order).
    fn update(&self, next: BTreeMap<String, Endpoint>) {
        let mut state = self.lock();
        let mut changes = Vec::new();
        for (name, old) in &state.endpoints {
            match next.get(name) {
                None => changes.push(Change::Removed(old.clone())),
                Some(new) if new != old => changes.push(Change::Updated {
                    from: old.clone(),
                    to: new.clone(),
                }),
                Some(_) => {}
            }
        }
        for (name, new) in &next {
            if !state.endpoints.contains_key(name) {
                changes.push(Change::Added(new.clone()));
            }
        }
        if changes.is_empty() {
            return;
        }
        self.balancer
            .set_endpoints(next.values().filter(|e| e.weight > 0).cloned().collect());
        state.endpoints = next;
        state
            .subscribers
            .retain(|tx| changes.iter().all(|c| tx.send(c.clone()).is_ok()));
    }
}

/// Mirrors `api` (filtered by `config`) into a reflector store and, after each event, hands
/// the store's objects to `read` and the result to `shared`.
async fn follow<K>(
    api: Api<K>,
    config: watcher::Config,
    read: fn(&[Arc<K>]) -> BTreeMap<String, Endpoint>,
    shared: Arc<Shared>,
    synced: tokio::sync::oneshot::Sender<()>,
) where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let mut events = reflector(writer, watcher(api, config))
        .default_backoff()
        .boxed();
    let mut synced = Some(synced);
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::InitDone | watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                shared.update(read(&reader.state()));
                if let Some(tx) = synced.take() {
                    let _ = tx.send(());
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "discovery watch failed; retrying"),
        }
    }
}

/// Ready endpoints of a service's EndpointSlices; an instance in two slices counts once.
fn from_slices(slices: &[Arc<EndpointSlice>]) -> BTreeMap<String, Endpoint> {
    let mut out = BTreeMap::new();
    for slice in slices {
        let ports: BTreeMap<String, u16> = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                let port = u16::try_from(p.port?).ok()?;
                Some((p.name.clone().unwrap_or_default(), port))
            })
            .collect();
        for e in &slice.endpoints {
            let ready = e.conditions.as_ref().and_then(|c| c.ready) == Some(true);
            let Some(address) = e.addresses.first().filter(|_| ready) else {
                continue;
            };
            let name = e
                .target_ref
                .as_ref()
                .and_then(|t| t.name.clone())
                .unwrap_or_else(|| address.clone());
            out.entry(name.clone()).or_insert_with(|| Endpoint {
                name,
                address: address.clone(),
                ports: ports.clone(),
                zone: e.zone.clone(),
                weight: 100,
            });
        }
    }
    out
}

/// The JSON view's instances (projection::config_json writes it).
#[derive(Deserialize)]
struct View {
    instances: Vec<ViewInstance>,
}

#[derive(Deserialize)]
struct ViewInstance {
    name: String,
    address: String,
    #[serde(default)]
    ports: BTreeMap<String, i64>,
    #[serde(default)]
    weight: i64,
    #[serde(default)]
    zone: Option<String>,
    #[serde(default)]
    ready: bool,
}

/// Ready instances of a service's ConfigMap. A view that does not parse (not Roster's, or
/// hand-edited) counts as no instances, with a warning: never a crash of the consumer.
fn from_config_maps(maps: &[Arc<ConfigMap>]) -> BTreeMap<String, Endpoint> {
    let mut out = BTreeMap::new();
    for cm in maps {
        let Some(json) = cm.data.as_ref().and_then(|d| d.get(CONFIG_KEY)) else {
            continue;
        };
        let view: View = match serde_json::from_str(json) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, configmap = ?cm.metadata.name, "the ConfigMap's {CONFIG_KEY} is not Roster's view; ignoring it");
                continue;
            }
        };
        for i in view.instances.into_iter().filter(|i| i.ready) {
            let ports = i
                .ports
                .into_iter()
                .filter_map(|(name, port)| Some((name, u16::try_from(port).ok()?)))
                .collect();
            out.insert(
                i.name.clone(),
                Endpoint {
                    name: i.name,
                    address: i.address,
                    ports,
                    zone: i.zone,
                    weight: u32::try_from(i.weight).unwrap_or(0),
                },
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        api::{InstancePort, Phase},
        projection::{Backend, config_json},
    };

    fn member(name: &str, phase: Phase, weight: i32, zone: Option<&str>) -> Backend {
        Backend {
            name: name.into(),
            uid: format!("uid-{name}"),
            address: format!("10.0.0.{}", name.len()),
            ports: vec![InstancePort::tcp("http", 8080)],
            weight,
            zone: zone.map(Into::into),
            metadata: BTreeMap::new(),
            phase: Some(phase),
            deleting: false,
        }
    }

    fn config_map(json: &str) -> Arc<ConfigMap> {
        Arc::new(ConfigMap {
            data: Some(BTreeMap::from([(CONFIG_KEY.to_string(), json.to_string())])),
            ..ConfigMap::default()
        })
    }

    /// The view the projector writes reads back: ready ones only, with weights and zones.
    #[test]
    fn reads_the_projectors_config_map() {
        let json = config_json(
            "pay",
            &[
                member("a", Phase::Ready, 100, Some("z1")),
                member("bb", Phase::Unhealthy, 100, None),
                member("ccc", Phase::Ready, 0, None),
            ],
        );
        let got = from_config_maps(&[config_map(&json)]);
        // Weight 0 means no traffic: the projector never reports it ready.
        assert_eq!(got.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(got["a"].zone.as_deref(), Some("z1"));
        assert_eq!(got["a"].ports.get("http"), Some(&8080));
        assert_eq!(got["a"].weight, 100);
    }

    #[test]
    fn a_foreign_config_map_is_no_instances() {
        assert!(from_config_maps(&[config_map("{not json")]).is_empty());
        assert!(from_config_maps(&[config_map(r#"{"instances": 3}"#)]).is_empty());
    }

    #[test]
    fn changes_are_diffs_in_order() {
        let shared = Shared {
            balancer: Balancer::new(Strategy::RoundRobin, None),
            state: Mutex::default(),
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        shared.lock().subscribers.push(tx);
        let e = |name: &str, address: &str, weight| Endpoint {
            name: name.into(),
            address: address.into(),
            ports: BTreeMap::new(),
            zone: None,
            weight,
        };
        let set = |es: &[Endpoint]| es.iter().map(|e| (e.name.clone(), e.clone())).collect();
        shared.update(set(&[e("a", "1", 100), e("b", "2", 0)]));
        shared.update(set(&[e("a", "1", 100), e("b", "3", 0)]));
        shared.update(set(&[e("b", "3", 0)]));
        let mut got = Vec::new();
        while let Ok(c) = rx.try_recv() {
            got.push(c.to_string());
        }
        assert_eq!(got, ["+ a 1", "+ b 2", "~ b 3", "- a 1"]);
        // b weighs 0 (a view from elsewhere could say so): listed, but no traffic.
        assert!(shared.balancer.pick().is_none());
    }

    #[test]
    fn sources_parse_with_a_clear_error() {
        assert_eq!("configmap".parse::<Source>().ok(), Some(Source::ConfigMap));
        let err = "dns".parse::<Source>().err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("endpointslices, configmap")));
    }
}
