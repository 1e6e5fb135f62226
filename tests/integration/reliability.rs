//! Reliability against the real apiserver: leader election and failover, protection against
//! mass expiry, and controller restarts at random moments.

use std::{
    collections::BTreeSet,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::{coordination::v1::Lease, discovery::v1::EndpointSlice};
use kube::{
    Api,
    api::{ListParams, PostParams},
};
use roster::{
    api::{Phase, ServiceInstance},
    leader,
};
use tokio_util::sync::CancellationToken;

use crate::{
    harness::{
        self, Beats, ControllerProcess, FAST_ELECTION, History, TestNamespace, await_event,
        wait_for,
    },
    liveness::{await_metric, await_phase, heartbeat, instance, metric},
};

const TIMEOUT: Duration = Duration::from_secs(30);

/// Creates `name` (service `service`), heartbeats it, and waits until it is Ready.
async fn ready_instance(
    api: &Api<ServiceInstance>,
    beats: &mut Beats,
    service: &str,
    name: &str,
    ttl: i32,
    delete_after: i32,
) {
    let mut si = instance(name, ttl, delete_after);
    si.spec.service = service.into();
    api.create(&PostParams::default(), &si)
        .await
        .expect("create");
    heartbeat(api, name).await;
    beats.start(name);
    await_phase(api, name, Phase::Ready, TIMEOUT).await;
}

/// The names of the instances whose last recorded state is not Ready (or that were deleted).
fn left_ready(history: &History, names: &[String]) -> Vec<String> {
    names
        .iter()
        .filter(|n| {
            history
                .of(n)
                .iter()
                .skip_while(|s| s.phase != Some(Phase::Ready))
                .any(|s| s.phase != Some(Phase::Ready))
        })
        .cloned()
        .collect()
}

#[tokio::test]
async fn a_warm_standby_takes_over_from_a_killed_leader_on_its_own_clock() {
    let _timing = harness::timing().await;
    let client = harness::client().await;
    let ns = TestNamespace::new(&client, "failover").await;
    let api: Api<ServiceInstance> = Api::namespaced(client.clone(), &ns.name);
    let kubeconfig = harness::kubeconfig().await;
    let start = |id: &'static str| {
        let mut args = FAST_ELECTION.to_vec();
        args.extend(["--leader-election-identity", id]);
        ControllerProcess::start_with(&kubeconfig, &ns.name, &args)
    };
    let mut a = start("a");
    a.await_output("a leads", TIMEOUT, |o| {
        o.contains("became leader").then_some(())
    })
    .await;
    let b = start("b");
    let b_addr = b.http_addr(TIMEOUT).await;
    b.await_output("b stands by", TIMEOUT, |o| {
        o.contains("standing by").then_some(())
    })
    .await;

    let mut beats = Beats::new(&api, Duration::from_millis(400));
    let steady: Vec<String> = (0..4).map(|i| format!("steady-{i}")).collect();
    for name in &steady {
        ready_instance(&api, &mut beats, "pay", name, 2, 4).await;
    }
    // Persistent, TTL 2 s: it stops heartbeating when the leader dies, and its TTL runs out
    // before the Lease does (4 s).
    ready_instance(&api, &mut beats, "pay", "quiet", 2, 0).await;
    let history = History::start(api.clone()).await;

    // The standby has written nothing and says it is not the leader.
    assert_eq!(metric(&b_addr, "roster_leader").await, 0.0);
    assert_eq!(metric(&b_addr, "roster_status_writes_total").await, 0.0);
    assert_eq!(harness::http_get(&b_addr, "/readyz").await.0, 200);

    beats.stop("quiet");
    let killed = Instant::now();
    a.kill().await;
    b.await_output("b takes over", TIMEOUT, |o| {
        o.contains("became leader").then_some(())
    })
    .await;
    let took = killed.elapsed();
    let took_over = Instant::now();
    // The Lease runs out 4 s after a's last renewal, which was less than a retry period (1 s)
    // before the kill; b tries every retry period.
    assert!(
        took <= Duration::from_secs(4) + Duration::from_secs(1) + Duration::from_millis(500),
        "took over after {took:?}"
    );
    await_metric(&b_addr, "roster_leader", 1.0).await;

    // The standby watched all along and judged quiet's silence on its own clock: quiet is
    // Unhealthy at once when b leads (not a full TTL, 2 s, later, as a leader that starts from
    // nothing would have it).
    let unhealthy = await_phase(&api, "quiet", Phase::Unhealthy, TIMEOUT).await;
    let recorded = async {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tick.tick().await;
            let unhealthy = history
                .of("quiet")
                .into_iter()
                .find(|s| s.phase == Some(Phase::Unhealthy));
            if let Some(seen) = unhealthy {
                return seen.at;
            }
        }
    };
    let seen = tokio::time::timeout(TIMEOUT, recorded)
        .await
        .expect("the history records quiet's Unhealthy");
    assert!(
        seen.saturating_duration_since(took_over) < Duration::from_millis(1500),
        "Unhealthy {:?} after the takeover",
        seen.saturating_duration_since(took_over)
    );
    assert!(unhealthy.metadata.deletion_timestamp.is_none());
    // It led without a relist: its one sync was at its start, as a standby.
    let output = b.output();
    assert_eq!(
        output.matches("ServiceInstance cache synced").count(),
        1,
        "{output}"
    );
    // Nothing else changed state: the steady instances stayed Ready through the failover.
    assert_eq!(left_ready(&history, &steady), Vec::<String>::new());
    assert_eq!(history.deleted(), Vec::<String>::new());
}

/// A standby watches the election Lease: it takes over `leaseDuration` after the dead leader's
/// last renewal, as it saw it through the watch, not at its next poll (client-go's candidates
/// see renewals only when they poll, and take over up to two retry periods late).
#[tokio::test]
async fn a_standby_takes_over_when_the_watched_lease_runs_out_not_at_its_next_poll() {
    let _timing = harness::timing().await;
    let client = harness::client().await;
    let ns = TestNamespace::new(&client, "election").await;
    let params = |identity: &str, retry_period| leader::Params {
        name: "election".into(),
        namespace: ns.name.clone(),
        identity: identity.into(),
        lease_duration: Duration::from_secs(3),
        renew_deadline: Duration::from_secs(2),
        retry_period,
    };
    let a = Arc::new(leader::Elector::new(
        client.clone(),
        params("a", Duration::from_millis(500)),
    ));
    assert!(a.acquire(&CancellationToken::new(), || {}).await);
    let a_term = CancellationToken::new();
    let a_holds = tokio::spawn({
        let (a, term) = (a.clone(), a_term.clone());
        async move { a.hold(&term).await }
    });

    // b polls once a minute: every renewal of a's after its first poll reaches it by the watch.
    let b = Arc::new(leader::Elector::new(
        client.clone(),
        params("b", Duration::from_secs(60)),
    ));
    let stood_by = Arc::new(tokio::sync::Notify::new());
    let b_leads = tokio::spawn({
        let (b, stood_by) = (b.clone(), stood_by.clone());
        async move {
            b.acquire(&CancellationToken::new(), || stood_by.notify_one())
                .await
        }
    });
    tokio::time::timeout(TIMEOUT, stood_by.notified())
        .await
        .expect("b stands by");
    // a renews after b's poll, then dies without releasing the Lease. Without the watch, b
    // would see that renewal only when it polled again at the expiry of what it had seen (3 s
    // after its poll) and take over 3 s after that: over 5 s after the death.
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    let renewed = |lease: &Lease| lease.spec.as_ref().and_then(|s| s.renew_time.clone());
    let polled = renewed(&leases.get("election").await.expect("the Lease"));
    wait_for(
        &leases,
        "election",
        "a renews",
        TIMEOUT,
        move |l: Option<&Lease>| l.is_some_and(|l| renewed(l) != polled),
    )
    .await;
    a_holds.abort();
    let died = Instant::now();

    let led = tokio::time::timeout(TIMEOUT, b_leads)
        .await
        .expect("b leads before its next poll")
        .expect("b's task");
    let took = died.elapsed();
    assert!(led);
    // a's last renewal was at most a retry period (0.5 s) before it died; b took the Lease
    // 3 s after it saw that renewal.
    assert!(
        took <= Duration::from_millis(3000 + 1500),
        "took over {took:?} after the leader died"
    );
    let holder = leases.get("election").await.expect("the Lease").spec;
    assert_eq!(holder.and_then(|s| s.holder_identity).as_deref(), Some("b"));
}

/// `n` names `<prefix>-<i>`.
fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

async fn ready_endpoints(client: &kube::Client, ns: &str, service: &str) -> BTreeSet<String> {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    let list = slices
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={service}")))
        .await
        .expect("list slices");
    list.items
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        .filter_map(|e| e.target_ref.as_ref().and_then(|t| t.name.clone()))
        .collect()
}

#[tokio::test]
async fn protection_holds_a_service_that_falls_silent_at_once_and_releases_on_recovery() {
    let _timing = harness::timing().await;
    let client = harness::client().await;
    let ns = TestNamespace::new(&client, "protect").await;
    let api: Api<ServiceInstance> = Api::namespaced(client.clone(), &ns.name);
    let controller = ControllerProcess::start_with(
        &harness::kubeconfig().await,
        &ns.name,
        &[
            "--protection-min-instances",
            "4",
            "--protection-threshold",
            "0.5",
        ],
    );
    let addr = controller.http_addr(TIMEOUT).await;
    let mut beats = Beats::new(&api, Duration::from_millis(400));
    let pay = names("pay", 6);
    for name in &pay {
        ready_instance(&api, &mut beats, "pay", name, 2, 3).await;
    }
    let history = History::start(api.clone()).await;

    // Four of six fall silent at once (a partition, say).
    for name in &pay[..4] {
        beats.stop(name);
    }
    let reasons = await_event(&client, &ns.name, "pay", "ProtectionEngaged", TIMEOUT).await;
    assert!(reasons.contains(&"ProtectionEngaged".to_string()));
    await_metric(&addr, "roster_protected_scopes{scope=\"service\"}", 1.0).await;
    // Each silent one says so, and keeps its last-known-good readiness...
    for name in &pay[..4] {
        let si = wait_for(
            &api,
            name,
            "Protected",
            TIMEOUT,
            |si: Option<&ServiceInstance>| {
                si.and_then(|si| si.status.as_ref())
                    .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Protected"))
            },
        )
        .await;
        assert_eq!(si.status.and_then(|s| s.phase), Some(Phase::Ready));
    }
    // ...so all six are ready in the EndpointSlice (the first to fall silent, before the
    // threshold was reached, are restored), and stay there, none deleted, for 5 s: long past
    // deleteAfterSeconds (3 s).
    let all: BTreeSet<String> = pay.iter().cloned().collect();
    let restored = async {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            if ready_endpoints(&client, &ns.name, "pay").await == all {
                return;
            }
        }
    };
    tokio::time::timeout(TIMEOUT, restored)
        .await
        .expect("all six ready in the EndpointSlice");
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    for _ in 0..10 {
        tick.tick().await;
        assert_eq!(ready_endpoints(&client, &ns.name, "pay").await, all);
    }
    assert_eq!(history.deleted(), Vec::<String>::new());

    // Three come back: once one of six held is below half, protection releases. Every instance
    // it held gets a fresh TTL from the release (a straggler whose heartbeat comes a moment
    // later is not deleted on the spot); the one that stays silent is then judged as usual:
    // Unhealthy, then deleted.
    let uid = api
        .get(&pay[3])
        .await
        .expect("get")
        .metadata
        .uid
        .unwrap_or_default();
    for name in &pay[..3] {
        beats.start(name);
    }
    await_event(&client, &ns.name, "pay", "ProtectionReleased", TIMEOUT).await;
    await_metric(
        &addr,
        "roster_protection_releases_total{reason=\"recovered\"}",
        1.0,
    )
    .await;
    harness::wait_deleted(&api, &pay[3], &uid, TIMEOUT).await;
    history.await_deleted(&pay[3], TIMEOUT).await;
    assert_eq!(history.deleted(), vec![pay[3].clone()]);
    assert_eq!(
        metric(&addr, "roster_protected_scopes{scope=\"service\"}").await,
        0.0
    );
    let live: Vec<String> = pay.iter().filter(|n| **n != pay[3]).cloned().collect();
    for name in &live {
        await_phase(&api, name, Phase::Ready, TIMEOUT).await;
    }
}

#[tokio::test]
async fn protection_releases_at_its_time_cap_and_never_holds_small_services() {
    let _timing = harness::timing().await;
    let client = harness::client().await;
    let ns = TestNamespace::new(&client, "protect-cap").await;
    let api: Api<ServiceInstance> = Api::namespaced(client.clone(), &ns.name);
    let controller = ControllerProcess::start_with(
        &harness::kubeconfig().await,
        &ns.name,
        &[
            "--protection-min-instances",
            "4",
            "--protection-max-duration",
            "5s",
        ],
    );
    let addr = controller.http_addr(TIMEOUT).await;
    let mut beats = Beats::new(&api, Duration::from_millis(400));
    let big = names("big", 4);
    let small = names("small", 3);
    for name in &big {
        ready_instance(&api, &mut beats, "big", name, 2, 3).await;
    }
    for name in &small {
        ready_instance(&api, &mut beats, "small", name, 2, 3).await;
    }
    let history = History::start(api.clone()).await;
    let stopped = Instant::now();
    for name in big.iter().chain(&small) {
        beats.stop(name);
    }
    await_event(&client, &ns.name, "big", "ProtectionEngaged", TIMEOUT).await;
    let engaged = Instant::now();
    // The small service (3 < 4 instances) is not protected: its instances expire on time.
    for name in &small {
        let uid = api
            .get(name)
            .await
            .map(|si| si.metadata.uid.unwrap_or_default());
        if let Ok(uid) = uid {
            harness::wait_deleted(&api, name, &uid, TIMEOUT).await;
        }
    }
    // The big one is held until the 5 s cap, then released without recovery...
    await_event(&client, &ns.name, "big", "ProtectionTimedOut", TIMEOUT).await;
    await_metric(
        &addr,
        "roster_protection_releases_total{reason=\"time_cap\"}",
        1.0,
    )
    .await;
    // ...and then its silent instances expire as usual: protection never holds forever.
    for name in &big {
        if let Ok(si) = api.get(name).await {
            harness::wait_deleted(&api, name, &si.metadata.uid.unwrap_or_default(), TIMEOUT).await;
        }
        history.await_deleted(name, TIMEOUT).await;
    }
    // None went before the cap (the Event was seen a little after protection engaged).
    for seen in history
        .all()
        .iter()
        .filter(|s| s.phase.is_none() && s.name.starts_with("big"))
    {
        let held = seen.at.duration_since(engaged);
        assert!(
            held >= Duration::from_millis(4500),
            "{} deleted {held:?} after protection engaged",
            seen.name
        );
    }
    assert!(stopped.elapsed() >= Duration::from_secs(5));
    assert_eq!(
        metric(
            &addr,
            "roster_protection_engagements_total{scope=\"service\"}"
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn global_protection_catches_a_silence_spread_over_many_services() {
    let _timing = harness::timing().await;
    let client = harness::client().await;
    let ns = TestNamespace::new(&client, "protect-all").await;
    let api: Api<ServiceInstance> = Api::namespaced(client.clone(), &ns.name);
    let controller = ControllerProcess::start_with(
        &harness::kubeconfig().await,
        &ns.name,
        &[
            "--protection-min-instances",
            "100",
            "--protection-global-min-instances",
            "6",
        ],
    );
    let addr = controller.http_addr(TIMEOUT).await;
    let mut beats = Beats::new(&api, Duration::from_millis(400));
    let services = names("svc", 6);
    for service in &services {
        ready_instance(&api, &mut beats, service, service, 2, 3).await;
    }
    for service in &services[..3] {
        beats.stop(service);
    }
    // One instance per service: no service is protected, all of them together are. The Event
    // goes to the election Lease.
    await_event(
        &client,
        &ns.name,
        "roster-controller",
        "ProtectionEngaged",
        TIMEOUT,
    )
    .await;
    await_metric(&addr, "roster_protected_scopes{scope=\"global\"}", 1.0).await;
    for service in &services[..3] {
        let si = wait_for(
            &api,
            service,
            "Protected",
            TIMEOUT,
            |si: Option<&ServiceInstance>| {
                si.and_then(|si| si.status.as_ref())
                    .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Protected"))
            },
        )
        .await;
        assert_eq!(si.status.and_then(|s| s.phase), Some(Phase::Ready));
    }
    for service in &services[..3] {
        beats.start(service);
    }
    await_event(
        &client,
        &ns.name,
        "roster-controller",
        "ProtectionReleased",
        TIMEOUT,
    )
    .await;
}

/// A small deterministic generator for the randomized test (xorshift64*), so a seed replays.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

#[tokio::test]
async fn controller_killed_at_random_moments_deletes_only_what_expired() {
    let _timing = harness::timing().await;
    let seed = std::env::var("ROSTER_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
                | 1
        });
    eprintln!("random restarts: seed {seed} (replay with ROSTER_TEST_SEED={seed})");
    let mut rng = Rng(seed);
    let client = harness::client().await;
    let ns = TestNamespace::new(&client, "restarts").await;
    let api: Api<ServiceInstance> = Api::namespaced(client.clone(), &ns.name);
    let kubeconfig = harness::kubeconfig().await;
    // The same identity across restarts, as a restarted container of one Pod: it resumes its
    // term at once. Protection is kept out of the way: this test is about restarts.
    let args = [
        "--leader-election-identity",
        "restarts",
        "--protection-min-instances",
        "1000",
        "--protection-global-min-instances",
        "1000",
    ];
    let mut controller = ControllerProcess::start_with(&kubeconfig, &ns.name, &args);
    controller.http_addr(TIMEOUT).await;

    let mut beats = Beats::new(&api, Duration::from_millis(400));
    let alive = names("alive", 6);
    for name in &alive {
        ready_instance(&api, &mut beats, "run", name, 2, 4).await;
    }
    let history = History::start(api.clone()).await;
    // Over about 12 s: register doomed instances (one heartbeat, then silence: TTL 1 s, deleted
    // after 2 s), and kill -9 and restart the controller at random moments.
    let mut doomed = Vec::new();
    let mut kills = 0;
    for step in 0..24 {
        match rng.below(4) {
            0 => {
                let name = format!("doomed-{step}");
                let mut si = instance(&name, 1, 2);
                si.spec.service = "run".into();
                api.create(&PostParams::default(), &si)
                    .await
                    .expect("create");
                heartbeat(&api, &name).await;
                doomed.push(name);
            }
            1 => {
                controller.kill().await;
                kills += 1;
                controller = ControllerProcess::start_with(&kubeconfig, &ns.name, &args);
                controller.http_addr(TIMEOUT).await;
            }
            _ => {}
        }
        // Pacing of the scenario (the random moments), not synchronisation.
        let pause = Duration::from_millis(100 + rng.below(800));
        tokio::time::sleep_until((Instant::now() + pause).into()).await;
    }
    eprintln!("seed {seed}: {kills} kills, {} doomed", doomed.len());

    // Convergence: every doomed instance is deleted, every live one is Ready, and nothing live
    // was ever deleted or left Ready.
    for name in &doomed {
        if let Ok(si) = api.get(name).await {
            harness::wait_deleted(&api, name, &si.metadata.uid.unwrap_or_default(), TIMEOUT).await;
        }
        history.await_deleted(name, TIMEOUT).await;
    }
    for name in &alive {
        await_phase(&api, name, Phase::Ready, TIMEOUT).await;
    }
    let wrongly_deleted: Vec<String> = history
        .deleted()
        .into_iter()
        .filter(|n| !doomed.contains(n))
        .collect();
    assert_eq!(wrongly_deleted, Vec::<String>::new(), "seed {seed}");
    assert_eq!(
        left_ready(&history, &alive),
        Vec::<String>::new(),
        "seed {seed}"
    );
}
