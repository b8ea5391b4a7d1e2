//! Running pods as local processes and reporting their status.
//!
//! A pod's files live under `<work>/pods/<namespace>/<pod>/`: `fs/` holds one symlink per
//! volume mount at the mount path (so `/etc/finetune/job.yaml` becomes `fs/etc/finetune/job.yaml`),
//! `volumes/` the ConfigMap, Secret and emptyDir contents, and `stdout.log`, `termination-log`
//! and `pid` what a person debugging a test wants. PVC contents live in `<work>/pvc/<ns>/<claim>`
//! and outlive pods, like a real volume. Paths in args and env values that start with a mount
//! path are rewritten into `fs/`. `$(VAR)` references in command, args and env values are
//! expanded from the container's environment, as a kubelet does.
//!
//! In-cluster API access: projected volumes are filled like a kubelet fills them (a
//! TokenRequest-issued token bound to the pod, ConfigMap/Secret items, the namespace), and
//! `KUBERNETES_SERVICE_HOST`/`PORT` point at the apiserver. Client libraries read the token from
//! the fixed path `/var/run/secrets/kubernetes.io/serviceaccount`, which a local process cannot
//! have remapped, so the executor also writes `$HOME/.kube/config` naming the same token and CA
//! files: the pod talks to the apiserver as its ServiceAccount, and RBAC applies as in a cluster.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Pod, ProjectedVolumeSource, Secret, ServiceAccount,
};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::Args;

/// Where the trainer looks for PVCs and ConfigMaps named in URIs, relative to a pod's `fs/`.
const VOLUME_ROOT_IN_POD: &str = "/mnt";

/// Where the ServiceAccount admission plugin mounts the API credentials.
const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Pods this executor has started, by `namespace/name`, with their process id once running.
type Running = Arc<Mutex<HashMap<String, Option<u32>>>>;

/// Watches the pods bound to this node and runs each new one.
pub async fn run_pods(client: Client, args: Arc<Args>) -> Result<(), watcher::Error> {
    let pods: Api<Pod> = Api::all(client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", args.node_name));
    let running: Running = Arc::default();
    let next_ip = Arc::new(AtomicU8::new(2));
    let mut events = watcher(pods, config).applied_objects().boxed();
    while let Some(pod) = events.try_next().await? {
        let key = format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
        let terminal = matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        );
        if pod.metadata.deletion_timestamp.is_some() {
            let pid = running.lock().await.get(&key).copied().flatten();
            tokio::spawn(stop_and_remove(client.clone(), pod, pid));
            continue;
        }
        let mut started = running.lock().await;
        if terminal || started.contains_key(&key) {
            continue;
        }
        started.insert(key.clone(), None);
        drop(started);
        let ip = format!(
            "{}.{}",
            args.pod_ip_prefix,
            next_ip.fetch_add(1, Ordering::SeqCst)
        );
        let (client, args, running) = (client.clone(), args.clone(), running.clone());
        tokio::spawn(async move {
            if let Err(message) = run_pod(&client, &args, &pod, &ip, &running, &key).await {
                eprintln!("executor: pod {key} failed to start: {message}");
                let status = failed_to_start(&message);
                let pods: Api<Pod> = Api::namespaced(client, &pod.namespace().unwrap_or_default());
                let _ = pods
                    .patch_status(
                        &pod.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(status),
                    )
                    .await;
            }
        });
    }
    Ok(())
}

async fn run_pod(
    client: &Client,
    args: &Args,
    pod: &Pod,
    ip: &str,
    running: &Running,
    key: &str,
) -> Result<(), String> {
    let namespace = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    let spec = pod.spec.as_ref().ok_or("pod has no spec")?;
    let container = spec.containers.first().ok_or("pod has no containers")?;
    let root = args.work_dir.join("pods").join(&namespace).join(&name);
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("fs")).map_err(|e| e.to_string())?;

    let volumes = prepare_volumes(client, args, pod, &root).await?;
    let mut mount_paths = Vec::new();
    for mount in container.volume_mounts.iter().flatten() {
        let source = volumes
            .get(&mount.name)
            .ok_or(format!("volume {} is not declared", mount.name))?;
        let target = in_fs(&root, &mount.mount_path);
        std::fs::create_dir_all(target.parent().unwrap_or(&root)).map_err(|e| e.to_string())?;
        std::os::unix::fs::symlink(source, &target)
            .map_err(|e| format!("mount {}: {e}", mount.mount_path))?;
        mount_paths.push(mount.mount_path.clone());
    }
    let termination_path = container
        .termination_message_path
        .clone()
        .unwrap_or("/dev/termination-log".into());
    let termination_file = root.join("termination-log");
    let rewrite = |value: &str| -> String {
        if value == termination_path {
            return termination_file.display().to_string();
        }
        let inside_mount = mount_paths
            .iter()
            .any(|m| value == m || value.starts_with(&format!("{m}/")));
        if inside_mount {
            in_fs(&root, value).display().to_string()
        } else {
            value.to_string()
        }
    };

    let image = container.image.clone().unwrap_or_default();
    let binary = args
        .binary_for(&image)
        .ok_or(format!("no local binary for image {image:?}"))?;
    let mut command = tokio::process::Command::new(&binary);
    let home = root.join("fs/tmp");
    std::fs::create_dir_all(&home).map_err(|e| e.to_string())?;
    let mut env = service_environment(args);
    for (key, value) in environment(client, pod, container, ip).await? {
        let value = expand(&value, &env);
        env.push((key, value));
    }
    let mut argv: Vec<String> = container
        .command
        .iter()
        .flatten()
        .skip(1)
        .cloned()
        .collect();
    argv.extend(container.args.iter().flatten().cloned());
    command.args(argv.iter().map(|a| rewrite(&expand(a, &env))));
    command.env_clear();
    command.env("PATH", std::env::var("PATH").unwrap_or_default());
    command.env("HOME", &home);
    command.env("FINETUNE_VOLUME_ROOT", in_fs(&root, VOLUME_ROOT_IN_POD));
    for (key, value) in &env {
        command.env(key, rewrite(value));
    }
    if mount_paths.iter().any(|m| m == SERVICE_ACCOUNT_DIR) {
        write_in_cluster_kubeconfig(args, &in_fs(&root, SERVICE_ACCOUNT_DIR), &home)?;
    }
    let log = std::fs::File::create(root.join("stdout.log")).map_err(|e| e.to_string())?;
    command
        .stdout(Stdio::from(log.try_clone().map_err(|e| e.to_string())?))
        .stderr(Stdio::from(log));
    command.current_dir(&root);
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
    let pid = child.id().ok_or("the process exited at once")?;
    std::fs::write(root.join("pid"), pid.to_string()).map_err(|e| e.to_string())?;
    running.lock().await.insert(key.to_string(), Some(pid));

    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let started = Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    let status = running_status(container, ip, &started);
    pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .map_err(|e| e.to_string())?;

    let exit = child.wait().await.map_err(|e| e.to_string())?;
    let code = exit
        .code()
        .unwrap_or_else(|| 128 + std::os::unix::process::ExitStatusExt::signal(&exit).unwrap_or(9));
    let mut message = std::fs::read_to_string(&termination_file).unwrap_or_default();
    let fallback = container.termination_message_policy.as_deref() == Some("FallbackToLogsOnError");
    if message.is_empty() && code != 0 && fallback {
        message = last_lines(&root.join("stdout.log"), 80);
    }
    message.truncate(floor_char_boundary(&message, 4096));
    let status = terminated_status(container, ip, &started, code, &message);
    // A pod being deleted is removed by stop_and_remove; its final status is still recorded.
    let _ = pods
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
        .await;
    eprintln!("executor: pod {key} exited with {code}");
    Ok(())
}

/// Materialises the pod's volumes; returns volume name → local directory.
async fn prepare_volumes(
    client: &Client,
    args: &Args,
    pod: &Pod,
    root: &Path,
) -> Result<HashMap<String, PathBuf>, String> {
    let namespace = pod.namespace().unwrap_or_default();
    let mut dirs = HashMap::new();
    for volume in pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .into_iter()
        .flatten()
    {
        let dir = root.join("volumes").join(&volume.name);
        if let Some(source) = &volume.config_map {
            let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
            let map = maps
                .get(&source.name)
                .await
                .map_err(|e| format!("configmap {}: {e}", source.name))?;
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            for (key, value) in map.data.unwrap_or_default() {
                std::fs::write(dir.join(key), value).map_err(|e| e.to_string())?;
            }
        } else if let Some(source) = &volume.secret {
            let secret_name = source.secret_name.clone().unwrap_or_default();
            let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
            let secret = secrets
                .get(&secret_name)
                .await
                .map_err(|e| format!("secret {secret_name}: {e}"))?;
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            for (key, value) in secret.data.unwrap_or_default() {
                std::fs::write(dir.join(key), value.0).map_err(|e| e.to_string())?;
            }
        } else if let Some(source) = &volume.persistent_volume_claim {
            let shared = args
                .work_dir
                .join("pvc")
                .join(&namespace)
                .join(&source.claim_name);
            std::fs::create_dir_all(&shared).map_err(|e| e.to_string())?;
            dirs.insert(volume.name.clone(), shared);
            continue;
        } else if let Some(source) = &volume.projected {
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            project(client, pod, source, &dir)
                .await
                .map_err(|e| format!("volume {}: {e}", volume.name))?;
        } else if volume.empty_dir.is_some() {
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        } else {
            return Err(format!(
                "volume {}: only configMap, secret, persistentVolumeClaim, emptyDir and projected are supported",
                volume.name
            ));
        }
        dirs.insert(volume.name.clone(), dir);
    }
    Ok(dirs)
}

/// Fills a projected volume as a kubelet does: a token from the TokenRequest API bound to the
/// pod, ConfigMap and Secret items, and downward-API fields.
async fn project(
    client: &Client,
    pod: &Pod,
    source: &ProjectedVolumeSource,
    dir: &Path,
) -> Result<(), String> {
    let namespace = pod.namespace().unwrap_or_default();
    let write = |path: &str, bytes: &[u8]| -> Result<(), String> {
        let target = dir.join(path);
        std::fs::create_dir_all(target.parent().unwrap_or(dir)).map_err(|e| e.to_string())?;
        std::fs::write(&target, bytes).map_err(|e| format!("{}: {e}", target.display()))
    };
    for projection in source.sources.iter().flatten() {
        if let Some(token) = &projection.service_account_token {
            let account = pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or("default".into());
            let request = TokenRequest {
                spec: TokenRequestSpec {
                    audiences: token.audience.iter().cloned().collect(),
                    expiration_seconds: token.expiration_seconds,
                    bound_object_ref: Some(BoundObjectReference {
                        api_version: Some("v1".into()),
                        kind: Some("Pod".into()),
                        name: Some(pod.name_any()),
                        uid: pod.uid(),
                    }),
                },
                ..TokenRequest::default()
            };
            let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &namespace);
            let issued: TokenRequest = accounts
                .create_subresource("token", &account, &PostParams::default(), &request)
                .await
                .map_err(|e| format!("token for serviceaccount {account}: {e}"))?;
            let status = issued.status.ok_or("the TokenRequest has no status")?;
            write(&token.path, status.token.as_bytes())?;
        }
        if let Some(map) = &projection.config_map {
            let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
            let data = match maps.get_opt(&map.name).await.map_err(|e| e.to_string())? {
                Some(found) => found.data.unwrap_or_default(),
                None if map.optional == Some(true) => continue,
                None => return Err(format!("configmap {} not found", map.name)),
            };
            for (key, path) in projected_items(data.keys(), map.items.as_deref()) {
                let value = data
                    .get(&key)
                    .ok_or(format!("configmap {}: no key {key}", map.name))?;
                write(&path, value.as_bytes())?;
            }
        }
        if let Some(secret) = &projection.secret {
            let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
            let data = match secrets
                .get_opt(&secret.name)
                .await
                .map_err(|e| e.to_string())?
            {
                Some(found) => found.data.unwrap_or_default(),
                None if secret.optional == Some(true) => continue,
                None => return Err(format!("secret {} not found", secret.name)),
            };
            for (key, path) in projected_items(data.keys(), secret.items.as_deref()) {
                let value = data
                    .get(&key)
                    .ok_or(format!("secret {}: no key {key}", secret.name))?;
                write(&path, &value.0)?;
            }
        }
        if let Some(downward) = &projection.downward_api {
            for item in downward.items.iter().flatten() {
                let value = match item.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                    Some("metadata.namespace") => namespace.clone(),
                    Some("metadata.name") => pod.name_any(),
                    other => return Err(format!("downwardAPI field {other:?} is not supported")),
                };
                write(&item.path, value.as_bytes())?;
            }
        }
    }
    Ok(())
}

/// `(key, path)` pairs of a projected ConfigMap or Secret: its items, or every key at its own name.
fn projected_items<'a>(
    keys: impl Iterator<Item = &'a String>,
    items: Option<&[k8s_openapi::api::core::v1::KeyToPath]>,
) -> Vec<(String, String)> {
    match items {
        Some(items) => items
            .iter()
            .map(|i| (i.key.clone(), i.path.clone()))
            .collect(),
        None => keys.map(|k| (k.clone(), k.clone())).collect(),
    }
}

/// `KUBERNETES_SERVICE_HOST`/`PORT`, as a kubelet sets them, from the apiserver's URL.
fn service_environment(args: &Args) -> Vec<(String, String)> {
    let Some(url) = args.api_server.as_deref() else {
        return Vec::new();
    };
    let authority = url
        .split_once("://")
        .map_or(url, |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or_default();
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => (host.to_string(), port.to_string()),
        _ => (authority.to_string(), "443".to_string()),
    };
    vec![
        ("KUBERNETES_SERVICE_HOST".into(), host),
        ("KUBERNETES_SERVICE_PORT".into(), port.clone()),
        ("KUBERNETES_SERVICE_PORT_HTTPS".into(), port),
    ]
}

/// A kubeconfig at `$HOME/.kube/config` that uses the pod's projected credentials (see the
/// module docs for why the in-cluster path alone does not reach a local process).
fn write_in_cluster_kubeconfig(args: &Args, credentials: &Path, home: &Path) -> Result<(), String> {
    let server = args
        .api_server
        .as_deref()
        .ok_or("the executor does not know the apiserver URL")?;
    let config = json!({
        "apiVersion": "v1", "kind": "Config", "current-context": "in-cluster",
        "clusters": [{"name": "in-cluster", "cluster": {
            "server": server,
            "certificate-authority": credentials.join("ca.crt"),
        }}],
        "users": [{"name": "service-account", "user": {"tokenFile": credentials.join("token")}}],
        "contexts": [{"name": "in-cluster", "context": {
            "cluster": "in-cluster", "user": "service-account",
            "namespace": std::fs::read_to_string(credentials.join("namespace")).unwrap_or_default(),
        }}],
    });
    let dir = home.join(".kube");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("config"), config.to_string()).map_err(|e| e.to_string())
}

/// Expands `$(NAME)` from `env` (later definitions win); `$$(NAME)` is a literal `$(NAME)` and
/// unknown names stay as written, as in Kubernetes.
fn expand(text: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('$') {
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some(inner) = tail.strip_prefix("$(")
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match env.iter().rev().find(|(k, _)| k == name) {
                Some((_, value)) => out.push_str(value),
                None => out.push_str(&tail[..end + 3]),
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// The container's environment with `valueFrom` resolved.
async fn environment(
    client: &Client,
    pod: &Pod,
    container: &Container,
    ip: &str,
) -> Result<Vec<(String, String)>, String> {
    let namespace = pod.namespace().unwrap_or_default();
    let mut resolved = Vec::new();
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(value), _) => value.clone(),
            (None, Some(from)) => {
                if let Some(field) = &from.field_ref {
                    match field.field_path.as_str() {
                        "status.podIP" => ip.to_string(),
                        "metadata.name" => pod.name_any(),
                        "metadata.namespace" => namespace.clone(),
                        "spec.nodeName" => pod
                            .spec
                            .as_ref()
                            .and_then(|s| s.node_name.clone())
                            .unwrap_or_default(),
                        other => {
                            return Err(format!(
                                "env {}: fieldRef {other} is not supported",
                                var.name
                            ));
                        }
                    }
                } else if let Some(key) = &from.secret_key_ref {
                    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
                    let secret = secrets
                        .get(&key.name)
                        .await
                        .map_err(|e| format!("env {}: {e}", var.name))?;
                    match secret.data.unwrap_or_default().remove(&key.key) {
                        Some(bytes) => String::from_utf8_lossy(&bytes.0).into_owned(),
                        // As the kubelet does: an optional key that is absent sets no variable.
                        None if key.optional == Some(true) => continue,
                        None => return Err(format!("env {}: no key {}", var.name, key.key)),
                    }
                } else if let Some(key) = &from.config_map_key_ref {
                    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
                    let map = maps
                        .get(&key.name)
                        .await
                        .map_err(|e| format!("env {}: {e}", var.name))?;
                    map.data
                        .unwrap_or_default()
                        .remove(&key.key)
                        .ok_or(format!("env {}: no key {}", var.name, key.key))?
                } else {
                    return Err(format!("env {}: unsupported valueFrom", var.name));
                }
            }
            (None, None) => String::new(),
        };
        resolved.push((var.name.clone(), value));
    }
    Ok(resolved)
}

/// SIGTERM, the pod's grace period, SIGKILL, then the final removal a kubelet performs.
async fn stop_and_remove(client: Client, pod: Pod, pid: Option<u32>) {
    let grace = pod
        .metadata
        .deletion_grace_period_seconds
        .unwrap_or(30)
        .max(0) as u64;
    if let Some(pid) = pid.map(|p| Pid::from_raw(p as i32)) {
        if kill(pid, Signal::SIGTERM).is_ok() {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(grace);
            while std::time::Instant::now() < deadline && kill(pid, None).is_ok() {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            let _ = kill(pid, Signal::SIGKILL);
        }
        // Give run_pod a moment to record the exit status.
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    let pods: Api<Pod> = Api::namespaced(client, &pod.namespace().unwrap_or_default());
    let _ = pods
        .delete(&pod.name_any(), &DeleteParams::default().grace_period(0))
        .await;
}

fn running_status(container: &Container, ip: &str, started: &str) -> Value {
    let conditions: Vec<Value> = ["PodScheduled", "Initialized", "ContainersReady", "Ready"]
        .iter()
        .map(|t| json!({"type": t, "status": "True", "lastTransitionTime": started}))
        .collect();
    json!({"status": {
        "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "127.0.0.1", "startTime": started,
        "conditions": conditions,
        "containerStatuses": [{
            "name": container.name, "image": container.image, "imageID": "", "ready": true, "started": true,
            "restartCount": 0, "state": {"running": {"startedAt": started}},
        }],
    }})
}

fn terminated_status(
    container: &Container,
    ip: &str,
    started: &str,
    code: i32,
    message: &str,
) -> Value {
    let finished = Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    let conditions: Vec<Value> = [
        ("PodScheduled", "True"),
        ("Initialized", "True"),
        ("ContainersReady", "False"),
        ("Ready", "False"),
    ]
    .iter()
    .map(|(t, s)| json!({"type": t, "status": s, "lastTransitionTime": finished}))
    .collect();
    let reason = if code == 0 { "Completed" } else { "Error" };
    json!({"status": {
        "phase": if code == 0 { "Succeeded" } else { "Failed" }, "podIP": ip, "podIPs": [{"ip": ip}],
        "conditions": conditions,
        "containerStatuses": [{
            "name": container.name, "image": container.image, "imageID": "", "ready": false, "started": false,
            "restartCount": 0,
            "state": {"terminated": {"exitCode": code, "reason": reason, "message": message,
                                     "startedAt": started, "finishedAt": finished}},
        }],
    }})
}

fn failed_to_start(message: &str) -> Value {
    json!({"status": {"phase": "Failed", "reason": "ExecutorError", "message": message}})
}

/// `mount_path` inside a pod's `fs/` directory.
fn in_fs(root: &Path, mount_path: &str) -> PathBuf {
    root.join("fs").join(mount_path.trim_start_matches('/'))
}

fn last_lines(path: &Path, count: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(count)..].join("\n")
}

fn floor_char_boundary(text: &str, limit: usize) -> usize {
    (0..=limit.min(text.len()))
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::expand;

    #[test]
    fn variables_expand_like_kubernetes() {
        let env = vec![("POD_IP".to_string(), "127.0.0.5".to_string())];
        assert_eq!(
            expand("--http-addr=$(POD_IP):8080", &env),
            "--http-addr=127.0.0.5:8080"
        );
        assert_eq!(expand("$$(POD_IP)", &env), "$(POD_IP)");
        assert_eq!(expand("$(MISSING) $5 $(", &env), "$(MISSING) $5 $(");
    }
}
