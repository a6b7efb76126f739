//! The HTTP/JSON face of `datamux serve` (axum on tokio): `POST /v1/classify`, `POST /v1/embed`,
//! `GET /health`, `GET /metrics`. Inputs are prepared (tokenised, decoded) on the runtime's
//! blocking threads, queued, and answered by the inference loop ([`super::engine`]); every
//! bad request is a 4xx with a one-line JSON error, and a full queue a 503 with `Retry-After`.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use datamux_pipeline::serve::{Answer, Input, InputKind, Output, Prepared};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::engine::{Engine, Refused};
use super::metrics::Metrics;

/// What every handler shares.
pub struct App {
    pub engine: Engine,
    pub metrics: Arc<Metrics>,
    /// Inputs per request at most.
    pub max_inputs: usize,
    pub threads: usize,
}

/// An error response: status and a one-line message, as `{"error": "..."}`.
struct Fail(StatusCode, String);

impl IntoResponse for Fail {
    fn into_response(self) -> Response {
        let mut r = (self.0, axum::Json(json!({ "error": self.1 }))).into_response();
        if self.0 == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

fn bad(msg: impl Into<String>) -> Fail {
    Fail(StatusCode::BAD_REQUEST, msg.into())
}

/// The router over `app`; `body_limit` bytes per request body.
pub fn router(app: Arc<App>, body_limit: usize) -> Router {
    Router::new()
        .route("/v1/classify", post(classify))
        .route("/v1/embed", post(embed))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async { Fail(StatusCode::NOT_FOUND, "no such route".into()) })
        .layer(axum::extract::DefaultBodyLimit::max(body_limit))
        .with_state(app)
}

async fn health(State(app): State<Arc<App>>) -> Response {
    let c = &app.engine.card;
    app.metrics.request("/health", 200);
    axum::Json(json!({
        "status": "ok",
        "model": c.run_id,
        "experiment": c.run.experiment,
        "dataset": c.run.data.dataset,
        "modality": c.modality,
        "output": c.output,
        "input": c.input,
        "labels": c.labels,
        "n_instances": c.n_instances,
        "serve_n": c.serve_n,
        "policy": app.engine.settings.policy.to_string(),
        "max_rows": app.engine.settings.max_rows,
        "threads": app.threads,
        "queued": app.engine.queued(),
    }))
    .into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    app.metrics.request("/metrics", 200);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.render(),
    )
        .into_response()
}

async fn classify(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    answer(app, "/v1/classify", Output::Classify, body).await
}

async fn embed(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    answer(app, "/v1/embed", Output::Embed, body).await
}

async fn answer(
    app: Arc<App>,
    route: &'static str,
    want: Output,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let start = Instant::now();
    let result = respond(&app, want, body, start).await;
    let response = result.unwrap_or_else(IntoResponse::into_response);
    app.metrics.request(route, response.status().as_u16());
    response
}

async fn respond(
    app: &Arc<App>,
    want: Output,
    body: Result<Bytes, BytesRejection>,
    start: Instant,
) -> Result<Response, Fail> {
    let card = &app.engine.card;
    if card.output != want {
        let (has, route) = match card.output {
            Output::Classify => ("classifies", "/v1/classify"),
            Output::Embed => ("embeds", "/v1/embed"),
        };
        return Err(Fail(
            StatusCode::NOT_FOUND,
            format!("this model {has}: POST {route}"),
        ));
    }
    let body = body.map_err(|e| Fail(e.status(), e.body_text().replace('\n', " ")))?;
    let inputs = parse(&body, card.input, app.max_inputs)?;
    // Tokenising and decoding are CPU work: off the async threads.
    let prep = app.engine.prepare.clone();
    let prepared = tokio::task::spawn_blocking(move || prepare_all(&*prep, &inputs))
        .await
        .map_err(|e| Fail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    let (tx, rx) = oneshot::channel();
    app.engine.submit(prepared, tx).map_err(|r| match r {
        Refused::Full => Fail(StatusCode::SERVICE_UNAVAILABLE, "the queue is full".into()),
        Refused::Closed => Fail(StatusCode::SERVICE_UNAVAILABLE, "shutting down".into()),
    })?;
    let (answers, n) = rx
        .await
        .map_err(|_| {
            Fail(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the inference loop stopped".into(),
            )
        })?
        .map_err(|e| Fail(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    app.metrics.latency.observe(start.elapsed().as_secs_f64());
    let outputs: Vec<Value> = answers
        .into_iter()
        .map(|a| match a {
            Answer::Class {
                label,
                probabilities,
            } => json!({
                "label": label,
                "name": card.labels.get(label),
                "probabilities": probabilities,
            }),
            Answer::Embedding(v) => json!({ "embedding": v }),
        })
        .collect();
    Ok(axum::Json(json!({ "model": card.run_id, "n": n, "outputs": outputs })).into_response())
}

/// A request's raw inputs, owned so they can move to a blocking thread.
enum Raw {
    Text(String),
    Image(Vec<u8>),
}

/// `{"inputs": [...]}`: strings for a text model, base64 PNG / JPEG strings for an image one.
fn parse(body: &[u8], kind: InputKind, max: usize) -> Result<Vec<Raw>, Fail> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| bad(format!("the body is not JSON: {e}")))?;
    let Some(items) = v.get("inputs") else {
        return Err(bad("the body needs `inputs`, a list"));
    };
    let Some(items) = items.as_array() else {
        return Err(bad("`inputs` must be a list"));
    };
    if items.is_empty() {
        return Err(bad("`inputs` is empty"));
    }
    if items.len() > max {
        return Err(Fail(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("{} inputs, at most {max} per request", items.len()),
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let Some(s) = item.as_str() else {
                return Err(bad(format!("inputs[{i}] must be a string")));
            };
            Ok(match kind {
                InputKind::Text => Raw::Text(s.to_string()),
                InputKind::Image => Raw::Image(
                    base64::engine::general_purpose::STANDARD
                        .decode(s)
                        .map_err(|e| bad(format!("inputs[{i}] is not base64: {e}")))?,
                ),
            })
        })
        .collect()
}

fn prepare_all(
    prep: &dyn datamux_pipeline::serve::Prepare,
    inputs: &[Raw],
) -> Result<Vec<Prepared>, Fail> {
    inputs
        .iter()
        .enumerate()
        .map(|(i, raw)| {
            let input = match raw {
                Raw::Text(t) => Input::Text(t),
                Raw::Image(b) => Input::Image(b),
            };
            prep.prepare(input).map_err(|e| {
                Fail(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("inputs[{i}]: {e}"),
                )
            })
        })
        .collect()
}
