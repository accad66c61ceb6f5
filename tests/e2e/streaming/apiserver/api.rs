//! The API kubectl 1.20 asks for before it streams: discovery, the pod,
//! and metav1 Status bodies for failures.

use serde_json::{Value, json};

use super::http::Head;
use super::{PodSpec, Shared};

/// The answer to a plain (non-streaming) request.
pub(super) fn route(head: &Head, shared: &Shared) -> (u16, Value) {
    if head.method != "GET" {
        return status(
            405,
            &format!(
                "the fake API server does not serve {} {}",
                head.method,
                head.path()
            ),
        );
    }
    let segments: Vec<&str> = head.path().trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["api"] => (
            200,
            json!({
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": shared.addr.to_string()}
                ],
            }),
        ),
        ["apis"] => (
            200,
            json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}),
        ),
        ["api", "v1"] => (200, core_v1_resources()),
        ["version"] => (
            200,
            json!({
                "major": "1", "minor": "20", "gitVersion": "v1.20.2",
                "gitCommit": "frakti-fake-apiserver", "gitTreeState": "clean",
                "buildDate": "2021-01-01T00:00:00Z", "goVersion": "go1.15",
                "compiler": "gc", "platform": "linux/amd64",
            }),
        ),
        ["api", "v1", "namespaces", ns, "pods"] => {
            let mut pods: Vec<PodSpec> = shared
                .pods
                .lock()
                .unwrap()
                .values()
                .filter(|p| p.namespace == *ns)
                .cloned()
                .collect();
            pods.sort_by(|a, b| a.name.cmp(&b.name));
            (
                200,
                json!({
                    "kind": "PodList",
                    "apiVersion": "v1",
                    "metadata": {"resourceVersion": "1"},
                    "items": pods.iter().map(pod_json).collect::<Vec<_>>(),
                }),
            )
        }
        ["api", "v1", "namespaces", ns, "pods", name] => match shared.pod(ns, name) {
            Some(pod) => (200, pod_json(&pod)),
            None => pod_not_found(name),
        },
        _ => status(
            404,
            &format!(
                "the server could not find the requested resource ({})",
                head.path()
            ),
        ),
    }
}

fn core_v1_resources() -> Value {
    let verbs = json!([
        "create", "delete", "get", "list", "patch", "update", "watch"
    ]);
    let sub = |name: &str, kind: &str| {
        json!({
            "name": name, "singularName": "", "namespaced": true,
            "kind": kind, "verbs": ["create", "get"],
        })
    };
    json!({
        "kind": "APIResourceList",
        "groupVersion": "v1",
        "resources": [
            {
                "name": "pods", "singularName": "", "namespaced": true, "kind": "Pod",
                "verbs": verbs, "shortNames": ["po"], "categories": ["all"],
            },
            sub("pods/attach", "PodAttachOptions"),
            sub("pods/exec", "PodExecOptions"),
            sub("pods/portforward", "PodPortForwardOptions"),
            {
                "name": "namespaces", "singularName": "", "namespaced": false,
                "kind": "Namespace", "verbs": verbs, "shortNames": ["ns"],
            },
        ],
    })
}

const CREATED: &str = "2024-01-01T00:00:00Z";

fn pod_json(pod: &PodSpec) -> Value {
    let containers: Vec<Value> = pod
        .containers
        .iter()
        .map(|c| {
            json!({
                "name": c.name, "image": c.image, "stdin": c.stdin, "tty": c.tty,
                "imagePullPolicy": "IfNotPresent",
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
            })
        })
        .collect();
    let statuses: Vec<Value> = pod
        .containers
        .iter()
        .map(|c| {
            json!({
                "name": c.name, "image": c.image, "imageID": "",
                "containerID": format!("frakti://{}", c.name),
                "ready": true, "started": true, "restartCount": 0,
                "state": {"running": {"startedAt": CREATED}},
            })
        })
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod.name,
            "namespace": pod.namespace,
            "uid": format!("uid-{}", pod.name),
            "resourceVersion": "1",
            "creationTimestamp": CREATED,
        },
        "spec": {
            "containers": containers,
            "restartPolicy": "Always",
            "nodeName": "frakti-test",
        },
        "status": {
            "phase": "Running",
            "conditions": [
                {"type": "Ready", "status": "True", "lastTransitionTime": CREATED},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": CREATED},
            ],
            "hostIP": "127.0.0.1",
            "podIP": "127.0.0.1",
            "startTime": CREATED,
            "containerStatuses": statuses,
        },
    })
}

/// A metav1 Status.
pub(super) fn status(code: u16, message: &str) -> (u16, Value) {
    let reason = match code {
        400 => "BadRequest",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        409 => "AlreadyExists",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "InternalError",
    };
    (
        code,
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": reason, "code": code,
        }),
    )
}

pub(super) fn pod_not_found(name: &str) -> (u16, Value) {
    let (code, mut body) = status(404, &format!("pods \"{name}\" not found"));
    body["details"] = json!({"name": name, "kind": "pods"});
    (code, body)
}
