//! What a run measured: the one structure the JSON, the Markdown table, the plot and the
//! summary line are all written from.

use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct Run {
    /// When the run started (RFC 3339).
    pub started: String,
    /// "quick" or "full".
    pub mode: String,
    /// "release" or "debug": debug numbers are never claims.
    pub build: String,
    pub roster_version: String,
    pub kubernetes_version: String,
    pub machine: Machine,
    pub params: Params,
    pub metrics: Vec<Metric>,
    pub distributions: Vec<Distribution>,
    /// The command line that produced the run.
    pub command: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub memory_gib: f64,
    pub cpu: String,
    pub kernel: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Params {
    pub instances: usize,
    pub services: usize,
    /// "annotation" or "lease".
    pub heartbeat: String,
    pub heartbeat_interval_ms: u64,
    pub ttl_seconds: u64,
}

/// One row of the table: a number for Roster and, where the brief names one, for the peer
/// (kube-controller-manager's EndpointSlice controller) measured the same way in the same run.
#[derive(Clone, Debug, Serialize)]
pub struct Metric {
    /// The brief's metric number (1-8).
    pub id: u8,
    pub name: String,
    pub unit: String,
    pub roster: Option<f64>,
    pub peer: Option<f64>,
    /// The brief's target, as text ("p99 ≤ 1000 ms").
    pub target: String,
    /// Whether Roster met it; `None` when the run could not say.
    pub met: Option<bool>,
    /// How it was measured, or why it missed.
    pub note: String,
}

impl Metric {
    /// Roster ÷ peer, when both exist and the peer's is not zero.
    pub fn ratio(&self) -> Option<f64> {
        match (self.roster, self.peer) {
            (Some(r), Some(p)) if p != 0.0 => Some(r / p),
            _ => None,
        }
    }
}

/// Raw latency samples (milliseconds), for the plot and for readers who want the shape.
#[derive(Clone, Debug, Serialize)]
pub struct Distribution {
    /// e.g. "registration → routable (Roster)".
    pub name: String,
    pub samples_ms: Vec<f64>,
}

/// The `q` quantile (0–1) of samples, nearest rank; `None` when there are none.
pub fn quantile(samples: &[f64], q: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}
