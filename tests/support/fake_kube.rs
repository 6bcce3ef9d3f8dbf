//! An in-process Kubernetes API server for Secrets, speaking the real list/watch protocol:
//! `GET /api/v1/namespaces/<ns>/secrets` answers a `SecretList` with a `resourceVersion`, and
//! with `watch=true` a chunked stream of `{"type":"ADDED|MODIFIED|DELETED","object":...}` lines.
//! `labelSelector` (`k=v[,k=v]`) and `fieldSelector` (`metadata.name=x`) are honoured, so a
//! client selecting by name or label sees what a real API server would show it. Requests are
//! recorded (path and query) to check what the client asked for.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = UnsyncBoxBody<Bytes, BoxError>;

#[derive(Clone)]
struct StoredSecret {
    labels: BTreeMap<String, String>,
    type_: String,
    data: BTreeMap<String, Vec<u8>>,
    resource_version: u64,
}

struct State {
    namespace: String,
    secrets: BTreeMap<String, StoredSecret>,
    resource_version: u64,
    requests: Vec<String>,
    /// Every change so far, so a watch starting at an older resourceVersion gets what it
    /// missed, as the API server replays it.
    history: Vec<(String, String, StoredSecret)>,
}

struct Shared {
    state: Mutex<State>,
    /// (event type, name, secret as stored after the change)
    events: broadcast::Sender<(String, String, StoredSecret)>,
}

pub struct FakeKube {
    shared: Arc<Shared>,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeKube {
    /// Serves the Secrets of `namespace` on 127.0.0.1:0.
    pub async fn start(namespace: &str) -> FakeKube {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("binding 127.0.0.1:0 for the fake API server");
        let addr = listener.local_addr().expect("an address");
        let (events, _) = broadcast::channel(256);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                namespace: namespace.to_owned(),
                secrets: BTreeMap::new(),
                resource_version: 1,
                requests: Vec::new(),
                history: Vec::new(),
            }),
            events,
        });
        let accept = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let shared = accept.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(&shared, req)) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeKube { shared, addr, task }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates or replaces a Secret of `type_` holding `data`, and tells the watchers.
    pub fn put_secret(
        &self,
        name: &str,
        type_: &str,
        labels: &[(&str, &str)],
        data: &[(&str, &str)],
    ) {
        let mut state = self.shared.state.lock().expect("state");
        state.resource_version += 1;
        let secret = StoredSecret {
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            type_: type_.to_owned(),
            data: data
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec()))
                .collect(),
            resource_version: state.resource_version,
        };
        let kind = if state.secrets.contains_key(name) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        state.secrets.insert(name.to_owned(), secret.clone());
        let event = (kind.to_owned(), name.to_owned(), secret);
        state.history.push(event.clone());
        let _ = self.shared.events.send(event);
    }

    pub fn delete_secret(&self, name: &str) {
        let mut state = self.shared.state.lock().expect("state");
        state.resource_version += 1;
        if let Some(mut secret) = state.secrets.remove(name) {
            secret.resource_version = state.resource_version;
            let event = ("DELETED".to_owned(), name.to_owned(), secret);
            state.history.push(event.clone());
            let _ = self.shared.events.send(event);
        }
    }

    /// Path and query of every request so far.
    pub fn requests(&self) -> Vec<String> {
        self.shared.state.lock().expect("state").requests.clone()
    }
}

fn secret_json(namespace: &str, name: &str, s: &StoredSecret) -> Value {
    let data: serde_json::Map<String, Value> = s
        .data
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                Value::String(base64::engine::general_purpose::STANDARD.encode(v)),
            )
        })
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "resourceVersion": s.resource_version.to_string(),
            "labels": s.labels,
        },
        "type": s.type_,
        "data": data,
    })
}

/// Whether a Secret passes the request's selectors.
fn selected(query: &BTreeMap<String, String>, name: &str, s: &StoredSecret) -> bool {
    let labels_ok = query.get("labelSelector").is_none_or(|sel| {
        sel.split(',').filter(|t| !t.is_empty()).all(|term| {
            let (k, v) = term.split_once('=').unwrap_or((term, ""));
            s.labels.get(k.trim()).map(String::as_str) == Some(v.trim_start_matches('='))
        })
    });
    let fields_ok = query.get("fieldSelector").is_none_or(|sel| {
        sel.split(',')
            .filter(|t| !t.is_empty())
            .all(|term| term.strip_prefix("metadata.name=") == Some(name))
    });
    labels_ok && fields_ok
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(UnsyncBoxBody::new(
        Full::new(Bytes::from(value.to_string())).map_err(|never| match never {}),
    ));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let query: BTreeMap<String, String> =
        form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let mut state = shared.state.lock().expect("state");
    state
        .requests
        .push(format!("{path}?{}", req.uri().query().unwrap_or_default()));
    let namespace = state.namespace.clone();
    if path != format!("/api/v1/namespaces/{namespace}/secrets") {
        return json_response(
            StatusCode::NOT_FOUND,
            &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
        );
    }
    let watching = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    if !watching {
        let items: Vec<Value> = state
            .secrets
            .iter()
            .filter(|(name, s)| selected(&query, name, s))
            .map(|(name, s)| secret_json(&namespace, name, s))
            .collect();
        return json_response(
            StatusCode::OK,
            &json!({
                "apiVersion": "v1",
                "kind": "SecretList",
                "metadata": {"resourceVersion": state.resource_version.to_string()},
                "items": items,
            }),
        );
    }
    // Events after the resourceVersion the client listed at.
    let since: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // Subscribed under the state lock: nothing changes between the replay and the live events.
    let mut receiver = shared.events.subscribe();
    let mut missed: std::collections::VecDeque<_> = state
        .history
        .iter()
        .filter(|(_, _, s)| s.resource_version > since)
        .cloned()
        .collect();
    drop(state);
    let stream = async_stream(move |tx: tokio::sync::mpsc::Sender<Bytes>| async move {
        loop {
            let next = match missed.pop_front() {
                Some(event) => Ok(event),
                None => receiver.recv().await,
            };
            match next {
                Ok((kind, name, secret)) => {
                    if secret.resource_version <= since || !selected(&query, &name, &secret) {
                        continue;
                    }
                    let line =
                        json!({"type": kind, "object": secret_json(&namespace, &name, &secret)});
                    if tx.send(Bytes::from(format!("{line}\n"))).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    let mut response = Response::new(stream);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// A streaming body fed by a task that sends chunks until it returns or the client goes.
fn async_stream<F, Fut>(produce: F) -> Body
where
    F: FnOnce(tokio::sync::mpsc::Sender<Bytes>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::spawn(produce(tx));
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((Ok::<_, BoxError>(Frame::data(chunk)), rx))
    });
    UnsyncBoxBody::new(StreamBody::new(frames))
}
