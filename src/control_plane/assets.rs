//! Where the control plane's binaries come from.
//!
//! The logic lives in `hack/control-plane-assets.sh` (it drives `go`, which is what builds them);
//! it is embedded here so that the `roster` binary obtains its assets without a checkout, and so
//! the script and the binary cannot disagree on versions or the cache layout.

use std::{collections::HashMap, path::PathBuf, process::Stdio};

use crate::{Error, Result};

const SCRIPT: &str = include_str!("../../hack/control-plane-assets.sh");

/// Makes sure each named binary exists (from `KUBEBUILDER_ASSETS`, the cache, or a build from its
/// Go module) and returns its path. Build progress goes to this process's stderr.
pub async fn ensure(names: &[&str]) -> Result<HashMap<String, PathBuf>> {
    let output = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(SCRIPT)
        .arg("control-plane-assets")
        .args(names)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .await
        .map_err(|e| {
            Error::control_plane("cannot run bash to obtain the control plane binaries")(e.into())
        })?;
    if !output.status.success() {
        return Err(Error::ControlPlane {
            context: format!(
                "obtaining {} failed ({}); see the messages above",
                names.join(", "),
                output.status
            ),
            source: None,
        });
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let paths: HashMap<String, PathBuf> = stdout
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(name, path)| (name.to_string(), PathBuf::from(path)))
        .collect();
    match names.iter().find(|n| !paths.contains_key(**n)) {
        Some(missing) => Err(Error::ControlPlane {
            context: format!("the assets script printed no path for {missing}"),
            source: None,
        }),
        None => Ok(paths),
    }
}
