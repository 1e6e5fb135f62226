//! The local control plane leaves nothing behind: not when its parent goes away, not when it is
//! killed with -9. And the controller refuses to run, clearly, on a cluster without the CRD.

use std::time::Duration;

use crate::harness::{ControllerProcess, LocalControlPlane, processes_mentioning};

const TIMEOUT: Duration = Duration::from_secs(30);

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tick.tick().await;
    }
}

#[tokio::test]
async fn control_plane_cleans_up_and_controller_needs_the_crd() {
    // kill -9 of the supervisor: PR_SET_PDEATHSIG takes etcd and kube-apiserver down with it.
    let mut killed = LocalControlPlane::start();
    let killed_dir = killed.dir();
    let dir_str = killed_dir.to_string_lossy().to_string();
    assert_eq!(
        processes_mentioning(&dir_str).len(),
        2,
        "etcd and kube-apiserver"
    );
    killed.child.kill().expect("kill -9 the supervisor");
    killed.child.wait().expect("reap");
    until("etcd and kube-apiserver are gone", || {
        processes_mentioning(&dir_str).is_empty()
    })
    .await;

    // The next start sweeps the directory the killed one could not remove.
    let mut cp = LocalControlPlane::start();
    assert!(
        !killed_dir.exists(),
        "{} was not swept",
        killed_dir.display()
    );

    // A cluster without the CRD: the controller says so and exits, no panic, no retry loop.
    let mut controller = ControllerProcess::spawn(&[
        "controller",
        "--kubeconfig",
        cp.kubeconfig.to_str().expect("utf-8"),
        "--http-addr",
        "127.0.0.1:0",
    ]);
    let status = controller.wait_exit(TIMEOUT).await;
    let out = controller.output();
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(
        out.contains(
            "error: the ServiceInstance CRD (serviceinstances.roster.dev) is not installed"
        ),
        "{out}"
    );
    assert!(
        out.contains("roster crd | kubectl apply"),
        "the message says how to fix it: {out}"
    );
    assert!(!out.contains("panicked"), "{out}");

    // The parent goes away (its end of stdin closes): everything stops and the directory goes.
    let dir = cp.dir();
    let dir_str = dir.to_string_lossy().to_string();
    drop(cp.stdin.take());
    let status = tokio::task::spawn_blocking(move || cp.child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(status.success(), "control plane exit: {status}");
    assert!(
        processes_mentioning(&dir_str).is_empty(),
        "processes left behind"
    );
    assert!(!dir.exists(), "{} left behind", dir.display());
}
