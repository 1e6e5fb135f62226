//! What every command shares: connecting to a cluster, and parsing durations and shares in flags.

use std::{path::PathBuf, time::Duration};

use kube::{
    Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};

use crate::{Error, Result};

/// Parses "15s", "1m 30s", "500ms" (jiff's friendly format) or ISO 8601 ("PT15S").
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let d: jiff::SignedDuration = s
        .parse()
        .map_err(|e| format!("{s:?} is not a duration like 15s, 1m30s or 500ms: {e}"))?;
    Duration::try_from(d).map_err(|_| format!("{s:?} is negative"))
}

pub fn parse_share(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if (0.0..=1.0).contains(&x) && x > 0.0 => Ok(x),
        _ => Err(format!(
            "{s:?} is not a share between 0 (exclusive) and 1, like 0.5"
        )),
    }
}

/// Builds a client the usual way: `--kubeconfig` (and `--context`) when given, else inference
/// (KUBECONFIG, ~/.kube/config, in-cluster). Returns the cluster URL for error messages.
pub async fn connect(
    kubeconfig: Option<&PathBuf>,
    context: Option<&String>,
) -> Result<(Client, String)> {
    let options = KubeConfigOptions {
        context: context.cloned(),
        ..Default::default()
    };
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|e| Error::Config(Box::new(e)))?;
            Config::from_custom_kubeconfig(kc, &options)
                .await
                .map_err(|e| Error::Config(Box::new(e)))?
        }
        None if context.is_some() => Config::from_kubeconfig(&options)
            .await
            .map_err(|e| Error::Config(Box::new(e)))?,
        None => Config::infer()
            .await
            .map_err(|e| Error::Config(Box::new(e)))?,
    };
    let url = config.cluster_url.to_string();
    let client = Client::try_from(config).map_err(|e| Error::Config(Box::new(e)))?;
    Ok((client, url))
}
