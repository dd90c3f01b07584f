//! The admin API: a separate, privileged HTTP/1.1 JSON listener for the
//! control plane. It mints tokens, serves the JWKS, and registers,
//! lists and unregisters sandboxes. Every `/v1` call needs the admin bearer
//! token, compared in constant time. Errors are JSON
//! `{"error": "<reason>", "detail": "…"}`. Bodies are capped and unknown
//! fields refused; nothing here panics on what a caller sends.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use crate::config::Config;
use crate::identity::store::Store;
use crate::identity::token::{MintRequest, Signer, Verifier};
use crate::identity::{BindError, MacAddr, Origin, Registry, Sandbox};
use crate::sandbox::{LaunchError, LaunchRequest, RegisterError, Sandboxes};

/// Largest request body the admin API reads.
const MAX_BODY: usize = 64 * 1024;
/// `POST /v1/tokens` without `ttl_seconds`: the CLI's default, 4 h.
const DEFAULT_TTL_S: u64 = 4 * 3600;

pub struct AdminState {
    pub config: Arc<Config>,
    pub registry: Arc<Registry>,
    pub verifier: Arc<Verifier>,
    pub signer: Option<Arc<Signer>>,
    pub admin_token: String,
    pub store: Arc<Store>,
    pub sandboxes: Arc<Sandboxes>,
    /// The data plane, whose decision `GET /v1/explain` asks.
    pub gateway: Arc<crate::proxy::Gateway>,
}

impl AdminState {
    /// Writes the registry before a change is acknowledged.
    fn persist(&self) -> Result<(), ApiError> {
        self.store
            .save(&self.registry, &self.verifier)
            .map_err(|e| {
                let detail = crate::error_chain(&e);
                tracing::error!(error = %detail, "cannot persist the registry");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "persist_failed", detail)
            })
    }
}

/// An API error: a status, a stable reason and a human detail.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error: &'static str,
    detail: String,
}

impl ApiError {
    fn new(status: StatusCode, error: &'static str, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            error,
            detail: detail.into(),
        }
    }

    fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", detail)
    }

    fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", detail)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({ "error": self.error, "detail": self.detail }));
        let mut resp = (self.status, body).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

/// A JSON body with unknown fields refused and every failure answered as
/// a JSON error.
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            let error = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                "payload_too_large"
            } else {
                "bad_request"
            };
            ApiError::new(e.status(), error, format!("cannot read body: {e}"))
        })?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }
}

pub fn router(state: Arc<AdminState>) -> Router {
    let v1 = Router::new()
        .route("/tokens", post(mint_token))
        .route("/sandboxes", post(register).get(list))
        .route("/sandboxes/launch", post(launch))
        .route("/sandboxes/{id}", get(show).delete(unregister))
        .route("/sandboxes/{id}/exec", post(exec))
        .route("/revocations", post(revoke))
        .route("/explain", get(explain))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            require_admin,
        ));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/.well-known/jwks.json", get(jwks))
        .nest("/v1", v1)
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

async fn require_admin(
    State(state): State<Arc<AdminState>>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("");
    let ok: bool = presented
        .as_bytes()
        .ct_eq(state.admin_token.as_bytes())
        .into();
    if !ok || presented.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid admin bearer token is required",
        ));
    }
    Ok(next.run(req).await)
}

async fn jwks(State(state): State<Arc<AdminState>>) -> Json<Value> {
    Json(state.verifier.jwks().public().clone())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TokenRequest {
    container_id: String,
    user_id: String,
    allowed_hosts: Vec<String>,
    #[serde(default)]
    ttl_seconds: Option<u64>,
}

async fn mint_token(
    State(state): State<Arc<AdminState>>,
    JsonBody(req): JsonBody<TokenRequest>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let signer = state.signer.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_signing_key",
            "this gateway has no signing key configured",
        )
    })?;
    let ttl = req.ttl_seconds.unwrap_or(DEFAULT_TTL_S);
    if ttl == 0 || ttl > state.config.auth.max_ttl_s {
        return Err(ApiError::bad_request(format!(
            "ttl_seconds must be between 1 and {}",
            state.config.auth.max_ttl_s
        )));
    }
    let minted = signer
        .mint(&MintRequest {
            container_id: req.container_id,
            user_id: req.user_id,
            allowed_hosts: req.allowed_hosts,
            ttl: Duration::from_secs(ttl),
        })
        .map_err(|e| match e {
            crate::identity::token::MintError::BadRequest(d) => ApiError::bad_request(d),
            other => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                other.to_string(),
            ),
        })?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "token": minted.token,
            "jti": minted.claims.jti,
            "expires_at": minted.claims.exp,
        })),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RegisterRequest {
    source_ip: String,
    token: String,
    /// The sandbox's MAC, on a bridge several sandboxes share
    /// (`gateway.l2_bind_iface`).
    #[serde(default)]
    mac: Option<String>,
}

async fn register(
    State(state): State<Arc<AdminState>>,
    JsonBody(req): JsonBody<RegisterRequest>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let ip: IpAddr = req.source_ip.trim().parse().map_err(|_| {
        ApiError::bad_request(format!(
            "source_ip {:?} is not an IP address",
            req.source_ip
        ))
    })?;
    let ip = ip.to_canonical();
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(ApiError::bad_request("source_ip must be a unicast address"));
    }
    let grant = state
        .verifier
        .verify(&req.token)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.deny().as_str(), e.to_string()))?;
    let mac = match req.mac.as_deref().map(str::parse::<MacAddr>) {
        None => None,
        Some(Ok(mac)) => Some(mac),
        Some(Err(e)) => return Err(ApiError::bad_request(e)),
    };
    let sandbox = Sandbox::new(ip, req.token, grant, Origin::Registered).with_mac(mac);
    let sandbox = state.sandboxes.register(sandbox).await.map_err(|e| {
        let detail = crate::error_chain(&e);
        match e {
            RegisterError::Taken(BindError::AddressTaken(_)) => {
                ApiError::new(StatusCode::CONFLICT, "address_taken", detail)
            }
            RegisterError::Taken(BindError::ContainerTaken(_)) => {
                ApiError::new(StatusCode::CONFLICT, "container_taken", detail)
            }
            RegisterError::MacRequired | RegisterError::MacUnexpected => {
                ApiError::bad_request(detail)
            }
            RegisterError::L2(_) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "l2_bind_failed", detail)
            }
            RegisterError::Persist(_) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "persist_failed", detail)
            }
        }
    })?;
    tracing::info!(container_id = %sandbox.container_id, source_ip = %ip, "sandbox registered");
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "container_id": sandbox.container_id,
            "source_ip": sandbox.source_ip,
            "expires_at": sandbox.grant.claims.exp,
        })),
    ))
}

fn view(s: &Sandbox, registry: &Registry) -> Value {
    let c = &s.grant.claims;
    json!({
        "container_id": s.container_id,
        "source_ip": s.source_ip,
        "mac": s.mac,
        "user_id": c.user_id,
        "allowed_hosts": c.allowed_hosts.0,
        "jti": c.jti,
        "expires_at": c.exp,
        "registered_at": s.registered_at,
        "origin": s.origin,
        "live_connections": registry.connections().live(s.container_id.as_str()),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    after: Option<String>,
}

/// Registered sandboxes, a page at a time in container-id order.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

async fn list(
    State(state): State<Arc<AdminState>>,
    query: Result<axum::extract::Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let axum::extract::Query(q) =
        query.map_err(|e| ApiError::bad_request(format!("bad query: {e}")))?;
    let limit = q.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    let (page, next) = state.registry.page(q.after.as_deref(), limit);
    let all: Vec<Value> = page.iter().map(|s| view(s, &state.registry)).collect();
    Ok(Json(json!({ "sandboxes": all, "next": next })))
}

async fn show(
    State(state): State<Arc<AdminState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    state
        .registry
        .get_by_id(&id)
        .map(|s| Json(view(&s, &state.registry)))
        .ok_or_else(|| ApiError::not_found(format!("no sandbox {id:?}")))
}

impl From<LaunchError> for ApiError {
    fn from(e: LaunchError) -> ApiError {
        let status = match &e {
            LaunchError::BadRequest(_) => StatusCode::BAD_REQUEST,
            LaunchError::NotFound => StatusCode::NOT_FOUND,
            LaunchError::NotLaunched(_) => StatusCode::CONFLICT,
            LaunchError::Unavailable(_) | LaunchError::Exhausted(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            LaunchError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            LaunchError::Failed(_) | LaunchError::Rules(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.reason(), crate::error_chain(&e))
    }
}

/// Unregisters a sandbox (and stops it, if sluice launched it); its live
/// connections close.
async fn unregister(
    State(state): State<Arc<AdminState>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.sandboxes.destroy(&id).await.map_err(|e| match e {
        LaunchError::NotFound => ApiError::not_found(format!("no sandbox {id:?}")),
        other => other.into(),
    })?;
    tracing::info!(container_id = %id, "sandbox unregistered");
    Ok(StatusCode::NO_CONTENT)
}

async fn launch(
    State(state): State<Arc<AdminState>>,
    JsonBody(req): JsonBody<LaunchRequest>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let launched = state.sandboxes.launch(req).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "container_id": launched.container_id,
            "source_ip": launched.source_ip,
            "token": launched.token,
            "expires_at": launched.expires_at,
        })),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExecRequest {
    command: Vec<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

async fn exec(
    State(state): State<Arc<AdminState>>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<ExecRequest>,
) -> Result<Json<Value>, ApiError> {
    let out = state
        .sandboxes
        .exec(&id, req.command, req.timeout_ms)
        .await?;
    Ok(Json(json!({
        "exit_code": out.exit_code,
        "stdout": out.stdout,
        "stderr": out.stderr,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RevokeRequest {
    jti: String,
}

/// Refuses a token from now on and closes its live connections.
async fn revoke(
    State(state): State<Arc<AdminState>>,
    JsonBody(req): JsonBody<RevokeRequest>,
) -> Result<StatusCode, ApiError> {
    let jti = req.jti.trim();
    if jti.is_empty()
        || jti.len() > 128
        || !jti
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(ApiError::bad_request(
            "jti must be 1-128 letters, digits, '-' or '_'",
        ));
    }
    // Kept until the token would have expired anyway: its own exp when a
    // registered sandbox holds it, else the longest lifetime sluice mints.
    let exp = state
        .registry
        .list()
        .iter()
        .find(|s| s.grant.claims.jti == jti)
        .map(|s| s.grant.claims.exp)
        .unwrap_or_else(|| crate::identity::token::now_s() + state.config.auth.max_ttl_s);
    // Its live connections, on both doors, watch the token: they close.
    state.verifier.revoke(jti, exp);
    state.persist()?;
    tracing::info!(jti, "token revoked");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExplainQuery {
    container_id: String,
    host: String,
    #[serde(default)]
    port: Option<u16>,
}

/// The decision the data plane would make for a registered sandbox and a
/// target, with the allowlist entry that matched.
async fn explain(
    State(state): State<Arc<AdminState>>,
    query: Result<axum::extract::Query<ExplainQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let axum::extract::Query(q) =
        query.map_err(|e| ApiError::bad_request(format!("bad query: {e}")))?;
    let sandbox = state
        .registry
        .get_by_id(&q.container_id)
        .ok_or_else(|| ApiError::not_found(format!("no sandbox {:?}", q.container_id)))?;
    let (host, port) = crate::host::split_authority(q.host.trim())
        .map_err(|e| ApiError::bad_request(format!("host {:?}: {e}", q.host)))?;
    let port = q.port.or(port).unwrap_or(443);
    if port == 0 {
        return Err(ApiError::bad_request("port must be 1-65535"));
    }
    let policy = state.gateway.policy();
    let explained = state.gateway.decision(&policy).explain(
        &crate::decision::Caller::Sandbox(sandbox),
        &crate::decision::Target { host, port },
    );
    Ok(Json(explained.to_json()))
}
