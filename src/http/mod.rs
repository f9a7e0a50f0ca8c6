//! The HTTPS listener for browsers and probes: `/healthz` and the OAuth redirect target
//! `/oauth/callback`. It uses the gRPC server certificate but asks for no client certificate.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::api::Services;

#[derive(Deserialize)]
struct CallbackParams {
    state: Option<String>,
    code: Option<String>,
    error: Option<String>,
}

fn router(services: Arc<Services>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/oauth/callback", get(callback))
        .with_state(services)
}

async fn callback(
    State(services): State<Arc<Services>>,
    Query(params): Query<CallbackParams>,
) -> Response {
    let _ = (&services, params.state, params.code, params.error);
    (
        axum::http::StatusCode::NOT_IMPLEMENTED,
        "OAuth connections are not available in this build\n",
    )
        .into_response()
}

/// Appends `?status=…&…` to a return URL.
#[allow(dead_code)]
fn redirect_with(return_url: &str, pairs: &[(&str, &str)]) -> Response {
    let mut url = match reqwest::Url::parse(return_url) {
        Ok(url) => url,
        Err(_) => {
            return (
                axum::http::StatusCode::OK,
                "done: you may close this window\n",
            )
                .into_response();
        }
    };
    url.query_pairs_mut().extend_pairs(pairs);
    Redirect::to(url.as_str()).into_response()
}

/// Serves until the listener fails; each connection is handled on its own task.
pub async fn serve(listener: TcpListener, acceptor: TlsAcceptor, services: Arc<Services>) {
    let app = router(services);
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "http accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let Ok(Ok(tls)) =
                tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp))
                    .await
            else {
                return;
            };
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}
