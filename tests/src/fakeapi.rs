//! A fake Kubernetes API server for the end-to-end tests: no kube-apiserver can be installed
//! on these machines, so this in-memory one serves what weir uses, over real HTTP, to the real
//! agent binary and its real kube-rs client:
//!
//! - list (`GET …/{resource}`, items with `apiVersion` and `kind`, one page) and watch
//!   (`?watch=true&resourceVersion=N`: every change after N, then live, as JSON lines) of any
//!   resource, cluster-wide or in a namespace;
//! - get, create (`POST`, 409 when it exists), replace (`PUT`, 409 when `resourceVersion` is
//!   stale), delete;
//! - `PATCH …/status` as server-side apply of a Service status: `loadBalancer` is replaced,
//!   conditions are merged by type, and weir's condition goes when the patch omits it (what
//!   field ownership would do for weir's own fields);
//! - `GET /_requests`: every request so far as `METHOD path` (watches marked `?watch`), for
//!   tests that check what the agent asked for;
//! - Events (`POST`, and `PATCH` as a merge patch for a repeated Event's series), kept for
//!   the tests to read.
//!
//! It is not a validating API server: it stores what it is given.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Query, State},
    http::{Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// (resource, namespace ("" for cluster-scoped), name).
type Key = (String, String, String);

#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    resource: String,
    namespace: String,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct Inner {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    log: Vec<Change>,
    /// Every request as `METHOD path` (`?watch` marked), for `GET /_requests`.
    requests: Vec<String>,
    /// Where the objects are kept across a restart (`fake-apiserver ADDR STATE`).
    state: Option<std::path::PathBuf>,
}

impl Inner {
    /// Writes the objects and the resourceVersion to the state file, if any (whole, then
    /// renamed into place: a kill never leaves half a file).
    fn save(&self) {
        let Some(path) = &self.state else { return };
        let objects: Vec<Value> = self
            .objects
            .iter()
            .map(|((r, n, name), o)| json!([r, n, name, o]))
            .collect();
        let tmp = path.with_extension("tmp");
        let text = json!({"rv": self.rv, "objects": objects}).to_string();
        if std::fs::write(&tmp, text).is_ok() {
            let _ = std::fs::rename(&tmp, path);
        }
    }

    /// The state `save` wrote, if `path` holds one.
    fn load(path: &std::path::Path) -> Self {
        let mut inner = Self {
            state: Some(path.to_path_buf()),
            ..Self::default()
        };
        let Ok(text) = std::fs::read_to_string(path) else {
            return inner;
        };
        let Ok(v) = serde_json::from_str::<Value>(&text) else {
            return inner;
        };
        inner.rv = v["rv"].as_u64().unwrap_or(0);
        for o in v["objects"].as_array().into_iter().flatten() {
            let part = |i: usize| o[i].as_str().unwrap_or_default().to_string();
            inner
                .objects
                .insert((part(0), part(1), part(2)), o[3].clone());
        }
        inner
    }
}

#[derive(Clone)]
struct Fake {
    inner: Arc<Mutex<Inner>>,
    tx: broadcast::Sender<Change>,
}

/// apiVersion and kind of a resource (plural).
fn type_of(group: &str, version: &str, resource: &str) -> (String, String) {
    let kind = match resource {
        "services" => "Service",
        "endpointslices" => "EndpointSlice",
        "nodes" => "Node",
        "ippools" => "IPPool",
        "bgppeers" => "BGPPeer",
        "bgpadvertisements" => "BGPAdvertisement",
        "secrets" => "Secret",
        "leases" => "Lease",
        "events" => "Event",
        "namespaces" => "Namespace",
        other => other,
    };
    let api_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    (api_version, kind.to_string())
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "reason": reason, "message": message, "code": code.as_u16()
        })
        .to_string(),
    )
        .into_response()
}

fn ok_json(code: StatusCode, v: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

/// The parts of an API path.
struct Target {
    api_version: String,
    kind: String,
    resource: String,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn parse(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match parts.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, r @ ..] if !r.is_empty() => (Some(ns.to_string()), r),
        r => (None, r),
    };
    let (resource, name, status) = match rest {
        [r] => (*r, None, false),
        [r, n] => (*r, Some(n.to_string()), false),
        [r, n, "status"] => (*r, Some(n.to_string()), true),
        _ => return None,
    };
    let (api_version, kind) = type_of(group, version, resource);
    Some(Target {
        api_version,
        kind,
        resource: resource.to_string(),
        namespace,
        name,
        status,
    })
}

impl Fake {
    /// The stored object, if any.
    fn get(&self, t: &Target, ns: &str, name: &str) -> Option<Value> {
        let key = (t.resource.clone(), ns.to_string(), name.to_string());
        self.inner.lock().unwrap().objects.get(&key).cloned()
    }

    /// Stores `object` (setting its resourceVersion, uid, apiVersion and kind) and logs the
    /// change for watchers.
    fn write(
        &self,
        t: &Target,
        ns: &str,
        name: &str,
        mut object: Value,
        kind: &'static str,
    ) -> Value {
        let mut inner = self.inner.lock().unwrap();
        inner.rv += 1;
        let rv = inner.rv;
        object["apiVersion"] = json!(t.api_version);
        object["kind"] = json!(t.kind);
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        if object["metadata"]["uid"].is_null() {
            object["metadata"]["uid"] = json!(format!("uid-{rv}"));
        }
        if !ns.is_empty() {
            object["metadata"]["namespace"] = json!(ns);
        }
        let key = (t.resource.clone(), ns.to_string(), name.to_string());
        if kind == "DELETED" {
            inner.objects.remove(&key);
        } else {
            inner.objects.insert(key, object.clone());
        }
        inner.save();
        let change = Change {
            rv,
            resource: t.resource.clone(),
            namespace: ns.to_string(),
            kind,
            object: object.clone(),
        };
        inner.log.push(change.clone());
        let _ = self.tx.send(change);
        object
    }
}

async fn handle(
    State(fake): State<Fake>,
    method: Method,
    uri: Uri,
    Query(q): Query<BTreeMap<String, String>>,
    body: Bytes,
) -> Response {
    if uri.path() == "/_requests" {
        let requests = fake.inner.lock().unwrap().requests.clone();
        return ok_json(StatusCode::OK, &json!(requests));
    }
    let watching = q.get("watch").is_some_and(|w| w == "true" || w == "1");
    fake.inner.lock().unwrap().requests.push(format!(
        "{method} {}{}",
        uri.path(),
        if watching { "?watch" } else { "" }
    ));
    let Some(t) = parse(uri.path()) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("no route {}", uri.path()),
        );
    };
    let ns = t.namespace.clone().unwrap_or_default();
    let body: Value = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
        }
    };
    match (&method, &t.name) {
        (&Method::GET, None) if q.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            let from: u64 = q
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let timeout = q
                .get("timeoutSeconds")
                .and_then(|v| v.parse().ok())
                .unwrap_or(290u64);
            watch(fake, t, from, Duration::from_secs(timeout))
        }
        (&Method::GET, None) => {
            let inner = fake.inner.lock().unwrap();
            let items: Vec<Value> = inner
                .objects
                .iter()
                .filter(|((r, n, _), _)| *r == t.resource && (t.namespace.is_none() || *n == ns))
                .map(|(_, v)| v.clone())
                .collect();
            ok_json(
                StatusCode::OK,
                &json!({
                    "apiVersion": t.api_version, "kind": format!("{}List", t.kind),
                    "metadata": {"resourceVersion": inner.rv.to_string()}, "items": items
                }),
            )
        }
        (&Method::GET, Some(name)) => {
            let inner = fake.inner.lock().unwrap();
            match inner
                .objects
                .get(&(t.resource.clone(), ns.clone(), name.clone()))
            {
                Some(v) => ok_json(StatusCode::OK, v),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{} {name} not found", t.resource),
                ),
            }
        }
        (&Method::POST, None) => {
            let name = body["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let mut body = body;
            if name.is_empty() {
                // Events use generateName.
                let g = body["metadata"]["generateName"]
                    .as_str()
                    .unwrap_or("obj-")
                    .to_string();
                let n = fake.inner.lock().unwrap().rv + 1;
                body["metadata"]["name"] = json!(format!("{g}{n}"));
            }
            let name = body["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let exists = fake.inner.lock().unwrap().objects.contains_key(&(
                t.resource.clone(),
                ns.clone(),
                name.clone(),
            ));
            if exists {
                return status(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    &format!("{name} already exists"),
                );
            }
            let v = fake.write(&t, &ns, &name, body, "ADDED");
            ok_json(StatusCode::CREATED, &v)
        }
        (&Method::PUT, Some(name)) => {
            let current = fake.get(&t, &ns, name);
            let given = body["metadata"]["resourceVersion"]
                .as_str()
                .map(str::to_string);
            if let (Some(cur), Some(given)) = (&current, &given)
                && cur["metadata"]["resourceVersion"].as_str() != Some(given.as_str())
            {
                return status(
                    StatusCode::CONFLICT,
                    "Conflict",
                    "the object has been modified",
                );
            }
            let kind = if current.is_some() {
                "MODIFIED"
            } else {
                "ADDED"
            };
            let v = fake.write(&t, &ns, name, body, kind);
            ok_json(StatusCode::OK, &v)
        }
        (&Method::DELETE, Some(name)) => {
            let current = fake.get(&t, &ns, name);
            match current {
                Some(obj) => {
                    let v = fake.write(&t, &ns, name, obj, "DELETED");
                    ok_json(StatusCode::OK, &v)
                }
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{name} not found"),
                ),
            }
        }
        // kube's Event recorder bumps a repeated Event's series with a merge patch.
        (&Method::PATCH, Some(name)) if !t.status && t.resource == "events" => {
            let Some(mut obj) = fake.get(&t, &ns, name) else {
                return status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{name} not found"),
                );
            };
            merge_patch(&mut obj, &body);
            let v = fake.write(&t, &ns, name, obj, "MODIFIED");
            ok_json(StatusCode::OK, &v)
        }
        (&Method::PATCH, Some(name)) if t.status => {
            let current = fake.get(&t, &ns, name);
            let Some(mut obj) = current else {
                return status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{name} not found"),
                );
            };
            let patch = &body["status"];
            if t.resource != "services" {
                // One manager owns the whole status of weir's own resources.
                obj["status"] = patch.clone();
                let v = fake.write(&t, &ns, name, obj, "MODIFIED");
                return ok_json(StatusCode::OK, &v);
            }
            obj["status"]["loadBalancer"] = patch["loadBalancer"].clone();
            let mut conditions: Vec<Value> = obj["status"]["conditions"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let given: Vec<Value> = patch["conditions"].as_array().cloned().unwrap_or_default();
            // The patch owns the condition types it names; weir's type goes when omitted.
            conditions.retain(|c| {
                c["type"] != "weir.dev/AddressAssigned"
                    && !given.iter().any(|g| g["type"] == c["type"])
            });
            conditions.extend(given);
            obj["status"]["conditions"] = json!(conditions);
            let v = fake.write(&t, &ns, name, obj, "MODIFIED");
            ok_json(StatusCode::OK, &v)
        }
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            &format!("{method} {}", uri.path()),
        ),
    }
}

/// RFC 7386 JSON merge patch: objects merge, `null` removes, anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

/// The watch stream: logged changes after `from`, then live ones, until `timeout`.
fn watch(fake: Fake, t: Target, from: u64, timeout: Duration) -> Response {
    // Subscribe before reading the log: nothing falls between the two (duplicates are
    // skipped by resourceVersion).
    let rx = fake.tx.subscribe();
    let backlog: Vec<Change> = fake
        .inner
        .lock()
        .unwrap()
        .log
        .iter()
        .filter(|c| c.rv > from)
        .cloned()
        .collect();
    let last = backlog.last().map_or(from, |c| c.rv);
    let (resource, namespace) = (t.resource, t.namespace);
    let wanted = move |c: &Change| {
        c.resource == resource && namespace.as_ref().is_none_or(|n| *n == c.namespace)
    };
    let line =
        |c: &Change| Bytes::from(format!("{}\n", json!({"type": c.kind, "object": c.object})));
    let first: Vec<Bytes> = backlog.iter().filter(|c| wanted(c)).map(line).collect();
    let deadline = tokio::time::Instant::now() + timeout;
    let live = futures_util::stream::unfold((rx, last), move |(mut rx, last)| {
        let wanted = wanted.clone();
        async move {
            loop {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Err(_) => return None,
                    Ok(Ok(c)) if c.rv > last && wanted(&c) => {
                        let rv = c.rv;
                        return Some((Ok::<_, std::io::Error>(line(&c)), (rx, rv)));
                    }
                    Ok(Ok(_) | Err(broadcast::error::RecvError::Lagged(_))) => {}
                    Ok(Err(broadcast::error::RecvError::Closed)) => return None,
                }
            }
        }
    });
    let stream = futures_util::StreamExt::chain(
        futures_util::stream::iter(first.into_iter().map(Ok::<_, std::io::Error>)),
        live,
    );
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .expect("response")
}

/// A request to the fake API at `api` from namespace `ns`: (status, JSON body or null).
pub fn request(
    ns: &crate::netns::Netns,
    api: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> std::io::Result<(u16, Value)> {
    let body = body.map(Value::to_string);
    let r = ns.run_in(|| {
        crate::clients::http_request(
            None,
            api,
            method,
            path,
            body.as_deref(),
            Duration::from_secs(3),
        )
    })?;
    Ok((
        r.status,
        serde_json::from_slice(&r.body).unwrap_or(Value::Null),
    ))
}

/// Serves the fake API on `addr` until the process ends (`weir-lab fake-apiserver ADDR`).
/// Serves at `addr`; with `state`, the objects are kept in that file and read back when the
/// server starts again (an API server restart, whose clients' watches break and resume).
/// With `seed`, a JSON array of `{"path": collection path, "object": ...}` (what a `POST`
/// would create), the objects are created before it serves: tens of thousands of them in a
/// second, where as many requests take minutes.
pub fn serve(
    addr: SocketAddr,
    state: Option<&std::path::Path>,
    seed: Option<&std::path::Path>,
) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (tx, _) = broadcast::channel(4096);
        let fake = Fake {
            inner: Arc::new(Mutex::new(state.map(Inner::load).unwrap_or_default())),
            tx,
        };
        if let Some(path) = seed {
            let text = std::fs::read_to_string(path)?;
            let items: Vec<Value> = serde_json::from_str(&text)
                .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?;
            for item in items {
                let (Some(t), Some(name)) = (
                    item["path"].as_str().and_then(parse),
                    item["object"]["metadata"]["name"].as_str(),
                ) else {
                    return Err(std::io::Error::other(format!(
                        "seed item {item}: no path or name"
                    )));
                };
                let ns = t.namespace.clone().unwrap_or_default();
                fake.write(&t, &ns, name, item["object"].clone(), "ADDED");
            }
        }
        let app = Router::new().fallback(handle).with_state(fake);
        // As kube-apiserver (Go sets TCP_NODELAY on every connection): a watch event goes out
        // when it happens, not after the client's delayed acknowledgement (40 ms) of the last.
        let listener = axum::serve::ListenerExt::tap_io(
            tokio::net::TcpListener::bind(addr).await?,
            |tcp: &mut tokio::net::TcpStream| {
                let _ = tcp.set_nodelay(true);
            },
        );
        axum::serve(listener, app).await
    })
}

/// A kubeconfig for a client of the fake API at `addr` (plain HTTP, no credentials).
pub fn kubeconfig(addr: SocketAddr) -> String {
    format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
         clusters:\n- name: fake\n  cluster:\n    server: http://{addr}\n\
         users:\n- name: fake\n  user: {{}}\n\
         contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n"
    )
}
