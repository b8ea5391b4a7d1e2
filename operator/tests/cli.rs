//! The `run` command's startup failures, without a cluster: each ends the process at once with
//! a non-zero status and says why.

use std::net::TcpListener;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn run(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_finetune-operator"))
        .arg("run")
        .args(args)
        // No cluster: a check that got as far as the apiserver would fail differently.
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the operator binary starts");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            child.kill().ok();
            panic!("the operator did not exit");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

#[test]
fn a_metrics_port_in_use_is_fatal() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let output = run(&["--http-addr", &address]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot serve /metrics, /healthz and /readyz on {address}"
        )),
        "{stderr}"
    );
}

#[test]
fn a_default_resource_that_is_no_quantity_is_refused() {
    let output = run(&["--trainer-default-memory", "16GB"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not a Kubernetes quantity"), "{stderr}");
}
