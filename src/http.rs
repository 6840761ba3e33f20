//! The HTTPS listener: `/metrics` (Prometheus), `/healthz` (the process serves) and `/readyz`
//! (this node knows a leader and has applied the membership).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::auth::TokenCheck;
use crate::service::Core;

/// Connections served at once; more wait in the kernel backlog.
const HTTP_CONNECTIONS_MAX: usize = 256;
/// Time allowed for a TLS handshake.
const HTTP_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for a request's headers, counted from when the connection waits for them (an
/// idle keep-alive connection included): idle connections must not hold the permits above.
pub const HTTP_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection older than this finishes the request in hand and is closed (after at most
/// [`HTTP_HEADER_READ_TIMEOUT`] more), whatever its client does; scrapers reconnect.
pub const HTTP_CONNECTION_MAX_AGE: Duration = Duration::from_secs(300);

/// Who may read `/metrics`: its labels name every tenant, so it takes a bearer credential,
/// the ops token or the metrics-only token. `/healthz` and `/readyz` say nothing of tenants and
/// stay open for load balancers and supervisors.
#[derive(Clone)]
pub struct ScrapeCredentials {
    pub ops: TokenCheck,
    pub metrics: Option<TokenCheck>,
}

impl ScrapeCredentials {
    fn admits(&self, headers: &HeaderMap) -> Result<(), &'static str> {
        let presented = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(crate::auth::bearer)
            .ok_or("missing credential: send 'Authorization: Bearer <token>' (the metrics or ops token)\n")?;
        if self.ops.matches(presented)
            || self.metrics.as_ref().is_some_and(|m| m.matches(presented))
        {
            Ok(())
        } else {
            Err("invalid credential\n")
        }
    }
}

pub fn router(core: Arc<Core>, scrape: ScrapeCredentials) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state((core.clone(), scrape))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz).with_state(core))
}

async fn metrics(
    State((core, scrape)): State<(Arc<Core>, ScrapeCredentials)>,
    headers: HeaderMap,
) -> axum::response::Response {
    if let Err(why) = scrape.admits(&headers) {
        return (
            StatusCode::UNAUTHORIZED,
            [(axum::http::header::WWW_AUTHENTICATE, "Bearer")],
            why,
        )
            .into_response();
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        core.metrics.encode(),
    )
        .into_response()
}

async fn readyz(State(core): State<Arc<Core>>) -> impl IntoResponse {
    let m = core.raft.metrics().borrow().clone();
    match (m.current_leader, m.last_applied) {
        (Some(leader), Some(applied)) => (
            StatusCode::OK,
            format!("ready: leader {leader}, applied {}\n", applied.index),
        ),
        (None, _) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no leader known\n".to_string(),
        ),
        (_, None) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: nothing applied yet\n".to_string(),
        ),
    }
}

/// Serves `router` over TLS on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let permits = Arc::new(tokio::sync::Semaphore::new(HTTP_CONNECTIONS_MAX));
    loop {
        let (tcp, peer): (tokio::net::TcpStream, SocketAddr) = tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "http accept failed");
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let permit = tokio::select! {
            _ = shutdown.changed() => return,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(HTTP_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "http tls handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let service = hyper_util::service::TowerToHyperService::new(router);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HTTP_HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(tls), service);
            tokio::pin!(conn);
            let ended = tokio::select! {
                ended = conn.as_mut() => ended,
                _ = tokio::time::sleep(HTTP_CONNECTION_MAX_AGE) => {
                    conn.as_mut().graceful_shutdown();
                    tokio::time::timeout(HTTP_HEADER_READ_TIMEOUT, conn.as_mut())
                        .await
                        .unwrap_or(Ok(()))
                }
            };
            if let Err(e) = ended {
                tracing::debug!(%peer, error = %e, "http connection ended with an error");
            }
        });
    }
}
