//! Logging setup: human-readable text for a terminal, JSON for log pipelines.

use std::io::IsTerminal;

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber. `RUST_LOG` wins over `level` when set, so one module can be
/// turned up without a flag change.
pub fn init(format: LogFormat, level: &str) {
    // kube-client logs every failed request at ERROR, retries included; Roster reports each
    // failure itself, with context, so those lines are off unless RUST_LOG asks for them.
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(format!("{level},kube_client::client::builder=off")))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::stderr().is_terminal();
    let registry = tracing_subscriber::registry().with(filter);
    // Logs go to stderr so that commands such as `roster crd` keep a clean stdout.
    let result = match format {
        LogFormat::Text => registry
            .with(fmt::layer().with_ansi(ansi).with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => registry
            .with(fmt::layer().json().with_writer(std::io::stderr))
            .try_init(),
    };
    // A second init (tests, `roster dev` calling the controller) keeps the first subscriber.
    let _ = result;
}
