//! Roster's error type. Every variant keeps its source, and names itself for metrics.

/// Everything that can go wrong in Roster, with enough context to act on it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot load a Kubernetes client configuration (in-cluster, KUBECONFIG or --kubeconfig)"
    )]
    Config(#[source] Box<dyn std::error::Error + Send + Sync>),

    #[error("cannot reach the Kubernetes API server at {url}")]
    Unreachable {
        url: String,
        #[source]
        source: kube::Error,
    },

    #[error(
        "the ServiceInstance CRD (serviceinstances.roster.dev) is not installed in the cluster at {url}; \
         install it with `roster crd | kubectl apply --server-side -f -` (or the Helm chart)"
    )]
    CrdNotInstalled { url: String },

    #[error("Kubernetes API request failed: {context}")]
    Kube {
        context: String,
        #[source]
        source: kube::Error,
    },

    #[error("cannot serialize {what}")]
    Serialize {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },

    #[error("cannot serve health and metrics on {addr}")]
    Serve {
        addr: String,
        #[source]
        source: std::io::Error,
    },

    #[error("invalid settings: {0}")]
    Invalid(String),

    #[error("no answer within {after:?}: {what}")]
    Timeout {
        what: String,
        after: std::time::Duration,
    },

    #[error("local control plane: {context}")]
    ControlPlane {
        context: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl Error {
    /// A short, stable label for the `roster_reconcile_failures_total` metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Config(_) => "config",
            Error::Unreachable { .. } => "unreachable",
            Error::CrdNotInstalled { .. } => "crd_not_installed",
            Error::Kube { .. } => "kube",
            Error::Serialize { .. } => "serialize",
            Error::Serve { .. } => "serve",
            Error::ControlPlane { .. } => "control_plane",
            Error::Invalid(_) => "invalid",
            Error::Timeout { .. } => "timeout",
        }
    }

    /// Wraps a kube error with what Roster was doing when it happened.
    pub fn kube(context: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let context = context.into();
        move |source| Error::Kube { context, source }
    }

    /// A control-plane error with an underlying cause.
    pub fn control_plane(
        context: impl Into<String>,
    ) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> Error {
        let context = context.into();
        move |source| Error::ControlPlane {
            context,
            source: Some(source),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Renders an error with its chain of causes on one line, as the CLI prints it.
pub fn report(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}
