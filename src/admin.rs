//! Admin HTTP: `GET /metrics` (Prometheus text), `GET /livez`, `GET /readyz`.
//!
//! Owns: the small hyper server on `admin_listen` and the periodic upkeep of the Prometheus
//! recorder (which otherwise buffers histogram samples without bound). Does not own: metric
//! definitions (`metrics`) or the health check itself (`upstream`).
//!
//! `/livez` answers 200 while the process serves, whatever Redis does, so Kubernetes never
//! restarts a sidecar because Redis is down; `/readyz` is 200 only when Redis answers.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::server::Context;

/// How often buffered histogram samples are folded into buckets.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

fn text(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    resp
}

fn route(req: &Request<Incoming>, ctx: &Context, prom: &PrometheusHandle) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "method not allowed\n");
        resp.headers_mut().insert(hyper::header::ALLOW, hyper::header::HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    match req.uri().path() {
        "/metrics" => text(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", prom.render()),
        "/livez" => text(StatusCode::OK, PLAIN, "ok\n"),
        "/readyz" => {
            if ctx.draining.load(std::sync::atomic::Ordering::Relaxed) {
                text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, "shutting down\n")
            } else if let Some(cache) = ctx.cache.as_ref().filter(|c| ctx.upstream.is_up() && !c.is_up()) {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    PLAIN,
                    format!("near-cache coherence down: {}\n", cache.down_reason()),
                )
            } else if ctx.upstream.is_up() {
                text(StatusCode::OK, PLAIN, "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    PLAIN,
                    format!("upstream unreachable: {}\n", ctx.upstream.down_reason()),
                )
            }
        }
        _ => text(StatusCode::NOT_FOUND, PLAIN, "not found\n"),
    }
}

/// Serves admin HTTP on `listener` until `stop` fires.
pub async fn serve(listener: TcpListener, ctx: Arc<Context>, prom: PrometheusHandle, stop: CancellationToken) {
    let upkeep = prom.clone();
    let upkeep_stop = stop.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = upkeep_stop.cancelled() => return,
                _ = tokio::time::sleep(UPKEEP_INTERVAL) => upkeep.run_upkeep(),
            }
        }
    });
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "Admin accept failed.");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let ctx = ctx.clone();
        let prom = prom.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let resp = route(&req, &ctx, &prom);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
        });
    }
}
