//! Active health checks: one HTTP GET, TCP connect or gRPC health check against an instance,
//! classified into a short reason a person understands (Timeout, ConnectionRefused,
//! HTTPStatus503, NotServing …), and the threshold logic as a pure function.

use std::{sync::Arc, time::Duration};

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};

use crate::api::{HealthCheck, InstancePort, PortRef};

/// The result of one check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail { reason: String, message: String },
}

impl Outcome {
    fn fail(reason: impl Into<String>, message: impl Into<String>) -> Outcome {
        Outcome::Fail {
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// Where a check stands after its thresholds: what the status shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No verdict yet (no check has completed since this controller started).
    Unknown,
    Passing,
    Failing {
        reason: String,
        message: String,
    },
}

/// Consecutive results of one instance's check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Streak {
    pub verdict: Verdict,
    successes: u32,
    failures: u32,
}

impl Default for Streak {
    fn default() -> Self {
        Streak {
            verdict: Verdict::Unknown,
            successes: 0,
            failures: 0,
        }
    }
}

impl Streak {
    /// Records one outcome and returns the verdict after it. As with Kubernetes probes, the
    /// verdict moves to passing after `success_threshold` consecutive passes and to failing
    /// after `failure_threshold` consecutive failures; the first result decides an unknown
    /// verdict at once. A failing verdict keeps the reason it failed with until it passes
    /// again, so the status changes only when a threshold is crossed.
    pub fn record(
        &mut self,
        outcome: Outcome,
        success_threshold: u32,
        failure_threshold: u32,
    ) -> &Verdict {
        match outcome {
            Outcome::Pass => {
                self.successes += 1;
                self.failures = 0;
                if self.verdict == Verdict::Unknown || self.successes >= success_threshold.max(1) {
                    self.verdict = Verdict::Passing;
                }
            }
            Outcome::Fail { reason, message } => {
                self.failures += 1;
                self.successes = 0;
                match &self.verdict {
                    Verdict::Failing { .. } => {}
                    Verdict::Unknown => {
                        self.verdict = Verdict::Failing { reason, message };
                    }
                    Verdict::Passing if self.failures >= failure_threshold.max(1) => {
                        self.verdict = Verdict::Failing { reason, message };
                    }
                    Verdict::Passing => {}
                }
            }
        }
        &self.verdict
    }
}

/// Everything a check needs, resolved from the instance.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    pub address: String,
    pub ports: Vec<InstancePort>,
    pub check: HealthCheck,
}

impl Target {
    pub fn period(&self) -> Duration {
        secs(self.check.period_seconds)
    }

    pub fn timeout(&self) -> Duration {
        secs(self.check.timeout_seconds)
    }

    fn port(&self, port: &PortRef) -> Result<u16, Outcome> {
        let number = match port {
            PortRef::Number(n) => *n,
            PortRef::Name(name) => match self.ports.iter().find(|p| &p.name == name) {
                Some(p) => p.port,
                None => {
                    return Err(Outcome::fail(
                        "PortNotFound",
                        format!("healthCheck names port {name:?}, which is not in spec.ports"),
                    ));
                }
            },
        };
        u16::try_from(number)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| Outcome::fail("PortNotFound", format!("port {number} is out of range")))
    }

    fn authority(&self, port: u16) -> String {
        if self.address.contains(':') {
            format!("[{}]:{port}", self.address)
        } else {
            format!("{}:{port}", self.address)
        }
    }
}

fn secs(s: i32) -> Duration {
    Duration::from_secs(u64::try_from(s).unwrap_or(1).max(1))
}

/// Runs one check, bounded by its timeout.
pub async fn check(target: &Target, clients: &Clients) -> Outcome {
    let timeout = target.timeout();
    let run = async {
        if let Some(http) = &target.check.http {
            let port = match target.port(&http.port) {
                Ok(p) => p,
                Err(o) => return o,
            };
            check_http(target, http, port, clients).await
        } else if let Some(tcp) = &target.check.tcp {
            match target.port(&tcp.port) {
                Ok(port) => check_tcp(&target.authority(port)).await,
                Err(o) => o,
            }
        } else if let Some(grpc) = &target.check.grpc {
            match target.port(&grpc.port) {
                Ok(port) => {
                    check_grpc(
                        &target.authority(port),
                        grpc.service.as_deref().unwrap_or_default(),
                        timeout,
                    )
                    .await
                }
                Err(o) => o,
            }
        } else {
            Outcome::fail("NoCheck", "healthCheck has none of http, tcp or grpc")
        }
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(outcome) => outcome,
        Err(_) => Outcome::fail(
            "Timeout",
            format!("no answer within {} s (timeoutSeconds)", timeout.as_secs()),
        ),
    }
}

/// HTTP clients shared by every check (connection pools off: a check is one fresh connection,
/// as a kubelet probe is).
pub struct Clients {
    http: Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    https: Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        Empty<Bytes>,
    >,
}

impl Default for Clients {
    fn default() -> Self {
        let builder = || {
            let mut b = Client::builder(TokioExecutor::new());
            b.pool_max_idle_per_host(0);
            b
        };
        // Fails only for a crypto provider without TLS 1.2 and 1.3, which ring is not: a
        // static invariant, not input.
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports TLS 1.2 and 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoVerification))
        .with_no_client_auth();
        let https_connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .build();
        Clients {
            http: builder().build_http(),
            https: builder().build(https_connector),
        }
    }
}

async fn check_http(
    target: &Target,
    http: &crate::api::HttpCheck,
    port: u16,
    clients: &Clients,
) -> Outcome {
    let https = http.scheme.as_deref() == Some("HTTPS");
    let uri = format!(
        "{}://{}{}",
        if https { "https" } else { "http" },
        target.authority(port),
        if http.path.starts_with('/') {
            http.path.clone()
        } else {
            format!("/{}", http.path)
        }
    );
    let mut request = hyper::Request::get(&uri).header("user-agent", "roster-health-check");
    for header in &http.headers {
        request = request.header(header.name.as_str(), header.value.as_str());
    }
    let request = match request.body(Empty::<Bytes>::new()) {
        Ok(r) => r,
        Err(e) => return Outcome::fail("InvalidRequest", format!("cannot build GET {uri}: {e}")),
    };
    let response = if https {
        clients.https.request(request).await
    } else {
        clients.http.request(request).await
    };
    match response {
        Ok(response) => {
            let status = response.status().as_u16();
            let (min, max) = (
                http.min_status.unwrap_or(200),
                http.max_status.unwrap_or(399),
            );
            if (min..=max).contains(&status) {
                Outcome::Pass
            } else {
                Outcome::fail(
                    format!("HTTPStatus{status}"),
                    format!("GET {uri} answered {status} (accepted {min}-{max})"),
                )
            }
        }
        Err(e) => connection_failure(&uri, &e),
    }
}

async fn check_tcp(authority: &str) -> Outcome {
    match tokio::net::TcpStream::connect(authority).await {
        Ok(_) => Outcome::Pass,
        Err(e) => io_failure(authority, &e),
    }
}

async fn check_grpc(authority: &str, service: &str, timeout: Duration) -> Outcome {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let uri = format!("http://{authority}");
    let endpoint = match tonic::transport::Endpoint::from_shared(uri.clone()) {
        Ok(e) => e.connect_timeout(timeout).timeout(timeout),
        Err(e) => return Outcome::fail("InvalidAddress", format!("{uri}: {e}")),
    };
    let channel = match endpoint.connect().await {
        Ok(c) => c,
        Err(e) => return connection_failure(&uri, &e),
    };
    let request = HealthCheckRequest {
        service: service.to_string(),
    };
    match HealthClient::new(channel).check(request).await {
        Ok(response) => match ServingStatus::try_from(response.into_inner().status) {
            Ok(ServingStatus::Serving) => Outcome::Pass,
            Ok(status) => Outcome::fail(
                match status {
                    ServingStatus::NotServing => "NotServing",
                    ServingStatus::ServiceUnknown => "ServiceUnknown",
                    _ => "UnknownStatus",
                },
                format!(
                    "grpc.health.v1 Check({service:?}) at {authority} answered {}",
                    status.as_str_name()
                ),
            ),
            Err(_) => Outcome::fail(
                "UnknownStatus",
                format!("grpc.health.v1 at {authority} answered an unknown status"),
            ),
        },
        Err(status) => Outcome::fail(
            format!("GRPC{:?}", status.code()),
            format!(
                "grpc.health.v1 Check({service:?}) at {authority}: {}",
                status.message()
            ),
        ),
    }
}

/// Names a failure to connect or talk by its root cause.
fn connection_failure(target: &str, error: &(dyn std::error::Error + 'static)) -> Outcome {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return io_failure(target, io);
        }
        source = e.source();
    }
    Outcome::fail(
        "ConnectionFailed",
        format!("{target}: {}", crate::error::report(error)),
    )
}

fn io_failure(target: &str, error: &std::io::Error) -> Outcome {
    use std::io::ErrorKind::*;
    let reason = match error.kind() {
        ConnectionRefused => "ConnectionRefused",
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof => "ConnectionReset",
        TimedOut => "Timeout",
        HostUnreachable | NetworkUnreachable | AddrNotAvailable => "Unreachable",
        _ => "ConnectionFailed",
    };
    Outcome::fail(reason, format!("{target}: {error}"))
}

/// Accepts any server certificate: as with Kubernetes' HTTPS probes, a health check verifies
/// that the instance answers, not who it is.
#[derive(Debug)]
struct NoVerification;

impl rustls::client::danger::ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail(reason: &str) -> Outcome {
        Outcome::fail(reason, "m")
    }

    #[test]
    fn thresholds_table() {
        use Verdict::*;
        let failing = |r: &str| Failing {
            reason: r.into(),
            message: "m".into(),
        };
        // (success threshold, failure threshold, outcomes, verdict after each)
        let cases: Vec<(u32, u32, Vec<Outcome>, Vec<Verdict>)> = vec![
            // The first result decides at once.
            (1, 3, vec![Outcome::Pass], vec![Passing]),
            (1, 3, vec![fail("Timeout")], vec![failing("Timeout")]),
            // Passing → failing after 3 consecutive failures; a pass in between resets.
            (
                1,
                3,
                vec![
                    Outcome::Pass,
                    fail("A"),
                    fail("A"),
                    Outcome::Pass,
                    fail("B"),
                    fail("B"),
                    fail("C"),
                ],
                vec![
                    Passing,
                    Passing,
                    Passing,
                    Passing,
                    Passing,
                    Passing,
                    failing("C"),
                ],
            ),
            // Failing → passing after 2 consecutive passes; the reason follows the latest failure.
            (
                2,
                1,
                vec![
                    fail("A"),
                    fail("B"),
                    Outcome::Pass,
                    fail("C"),
                    Outcome::Pass,
                    Outcome::Pass,
                ],
                vec![
                    failing("A"),
                    failing("A"),
                    failing("A"),
                    failing("A"),
                    failing("A"),
                    Passing,
                ],
            ),
        ];
        for (i, (st, ft, outcomes, want)) in cases.into_iter().enumerate() {
            let mut streak = Streak::default();
            let got: Vec<Verdict> = outcomes
                .into_iter()
                .map(|o| streak.record(o, st, ft).clone())
                .collect();
            assert_eq!(got, want, "case {i}");
        }
    }

    #[test]
    fn ports_resolve_by_name_or_number() {
        let target = Target {
            address: "fd00::1".into(),
            ports: vec![InstancePort::tcp("http", 8080)],
            check: serde_json::from_value(
                serde_json::json!({"tcp": {"port": "http"}, "periodSeconds": 10,
                "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3}),
            )
            .expect("check"),
        };
        assert_eq!(target.port(&PortRef::Name("http".into())), Ok(8080));
        assert_eq!(target.port(&PortRef::Number(9090)), Ok(9090));
        assert!(
            matches!(target.port(&PortRef::Name("grpc".into())), Err(Outcome::Fail { reason, .. }) if reason == "PortNotFound")
        );
        assert_eq!(target.authority(8080), "[fd00::1]:8080");
    }
}
