//! A consumer that calls a service through Roster's discovery client: it watches the service's
//! EndpointSlices, prints every change, and sends one HTTP request a second to the instance the
//! balancer picks (least outstanding requests, preferring its own zone).
//!
//! ```sh
//! cargo run --example consumer -- <namespace> <service> [port name] [zone]
//! ```
//!
//! It uses the current kubeconfig, or the in-cluster config in a Pod (which needs get, list and
//! watch on endpointslices, as examples/discovery/endpointslices.yaml grants).

use std::time::Duration;

use futures::StreamExt;
use roster::client::{
    discovery::{Discovery, Options, Source},
    pick::Strategy,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(namespace), Some(service)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: consumer <namespace> <service> [port name] [zone]");
    };
    let port_name = args.next().unwrap_or_else(|| "http".into());
    let zone = args.next();
    let client = kube::Client::try_default().await?;
    let discovery = Discovery::start(
        client,
        &namespace,
        &service,
        Options {
            source: Source::EndpointSlices,
            strategy: Strategy::LeastOutstanding,
            zone,
            seed: None,
        },
    )
    .await?;
    let mut changes = Box::pin(discovery.changes());
    tokio::spawn(async move {
        while let Some(change) = changes.next().await {
            println!("{change}");
        }
    });
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        // Held while the request is in flight: that is what least-outstanding counts.
        let Some(pick) = discovery.pick() else {
            println!("no ready instance of {namespace}/{service}");
            continue;
        };
        let Some(port) = pick.ports.get(&port_name) else {
            println!("{} has no port named {port_name}", pick.name);
            continue;
        };
        match get(&pick.address, *port, &service).await {
            Ok(status) => println!("{} ({}:{port}): {status}", pick.name, pick.address),
            Err(e) => println!("{} ({}:{port}): {e}", pick.name, pick.address),
        }
    }
}

/// A plain HTTP/1.0 GET of `/`, returning the status line (an example needs no HTTP client).
async fn get(address: &str, port: u16, host: &str) -> std::io::Result<String> {
    let target = if address.contains(':') {
        format!("[{address}]:{port}")
    } else {
        format!("{address}:{port}")
    };
    let call = async {
        let mut stream = tokio::net::TcpStream::connect(&target).await?;
        stream
            .write_all(format!("GET / HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
            .await?;
        let mut head = vec![0u8; 256];
        let n = stream.read(&mut head).await?;
        let text = String::from_utf8_lossy(&head[..n]).to_string();
        Ok(text.lines().next().unwrap_or_default().to_string())
    };
    tokio::time::timeout(Duration::from_secs(2), call)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("timed out")))
}
