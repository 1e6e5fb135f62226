//! The peer: kube-controller-manager's EndpointSlice controller, fed by Pods whose status the
//! benchmark sets, as a kubelet would (there is none here).

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
    time::Instant,
};

use anyhow::Result;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;

pub const NAMESPACE: &str = "bench-peer";
const NODE: &str = "bench-node";

/// Pod i's name, service and IP (10.100.0.0 onwards).
pub fn pod(i: usize, services: usize) -> (String, String, String) {
    (
        format!("p-{i}"),
        format!("svc-{}", i % services),
        format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256),
    )
}

pub struct Peer {
    pods: Api<Pod>,
    /// When each Pod's ready status was answered, by IP.
    pub answered: Mutex<HashMap<String, Instant>>,
    services: usize,
}

impl Peer {
    /// The Node the pods are bound to and the Services with selectors.
    pub async fn create(admin: &Client, load: &Client, services: usize) -> Result<Peer> {
        let node: Node = serde_json::from_value(json!({"metadata": {"name": NODE}}))?;
        Api::<Node>::all(admin.clone())
            .create(&PostParams::default(), &node)
            .await?;
        let svcs = Api::<Service>::namespaced(load.clone(), NAMESPACE);
        for s in 0..services {
            let svc: Service = serde_json::from_value(json!({
                "metadata": {"name": format!("svc-{s}")},
                "spec": {"selector": {"app": format!("svc-{s}")}, "ports": [{"name": "http", "port": 8080}]},
            }))?;
            svcs.create(&PostParams::default(), &svc).await?;
        }
        let pods = Api::<Pod>::namespaced(load.clone(), NAMESPACE);
        Ok(Peer {
            pods,
            answered: Mutex::default(),
            services,
        })
    }

    /// Creates the Pods `which` and, at once, marks each running and ready, as a kubelet that
    /// starts containers instantly would (64 in flight, as Roster's registrations); returns
    /// when each create was sent, by IP: the same clock start as a Roster instance's
    /// registration.
    pub async fn register(
        &self,
        which: std::ops::Range<usize>,
    ) -> Result<HashMap<String, Instant>> {
        let sent = Mutex::new(HashMap::new());
        futures::stream::iter(which)
            .map(|i| {
                let sent = &sent;
                async move {
                    let (name, service, ip) = pod(i, self.services);
                    let pod: Pod = serde_json::from_value(json!({
                        "metadata": {"name": name, "labels": {"app": service}},
                        "spec": {"nodeName": NODE, "containers": [{"name": "app", "image": "app", "ports": [{"name": "http", "containerPort": 8080}]}]},
                    }))?;
                    let at = Instant::now();
                    self.pods.create(&PostParams::default(), &pod).await?;
                    self.status(i, true).await?;
                    self.answered
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(ip.clone(), Instant::now());
                    sent.lock().unwrap_or_else(PoisonError::into_inner).insert(ip, at);
                    anyhow::Ok(())
                }
            })
            .buffer_unordered(64)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(sent.into_inner().unwrap_or_else(PoisonError::into_inner))
    }

    async fn status(&self, i: usize, ready: bool) -> kube::Result<Pod> {
        let (name, _, ip) = pod(i, self.services);
        let status = if ready { "True" } else { "False" };
        let patch = json!({"status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [
                {"type": "Ready", "status": status},
                {"type": "ContainersReady", "status": status},
            ],
        }});
        self.pods
            .patch_status(&name, &PatchParams::default(), &Patch::Strategic(&patch))
            .await
    }

    /// Marks the pods `which` running and ready (or not ready) through /status; returns when
    /// each status write was sent, by IP.
    pub async fn set_ready(
        &self,
        which: impl Iterator<Item = usize>,
        ready: bool,
    ) -> Result<HashMap<String, Instant>> {
        let sent = Mutex::new(HashMap::new());
        futures::stream::iter(which)
            .map(|i| {
                let sent = &sent;
                async move {
                    let (_, _, ip) = pod(i, self.services);
                    let at = Instant::now();
                    self.status(i, ready).await?;
                    sent.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(ip, at);
                    anyhow::Ok(())
                }
            })
            .buffer_unordered(64)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(sent.into_inner().unwrap_or_else(PoisonError::into_inner))
    }
}
