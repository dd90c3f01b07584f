//! The admin API: a separate, privileged HTTP/1.1 JSON listener for the
//! control plane, and only the HTTP mapping of it: each call's input is
//! read and checked here, the change itself is the
//! [`crate::control::ControlPlane`]'s, and its errors map to
//! statuses here. Every `/v1` call needs the admin bearer
//! token, compared in constant time. Errors are JSON
//! `{"error": "<reason>", "detail": "…"}`. Bodies are capped and unknown
//! fields refused; nothing here panics on what a caller sends. The
//! OpenAPI document (`GET /v1/openapi.json`) is generated from these
//! handlers and their request and answer types (`utoipa`), so it describes
//! what is served.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::config::Config;
use crate::control::{ControlPlane, RegisterError};
use crate::identity::token::Verifier;
use crate::identity::{BindError, MacAddr, Origin, Registry, Sandbox};
use crate::sandbox::{LaunchError, LaunchRequest};

/// Largest request body the admin API reads.
const MAX_BODY: usize = 64 * 1024;

pub struct AdminState {
    pub config: Arc<Config>,
    pub registry: Arc<Registry>,
    pub verifier: Arc<Verifier>,
    pub admin_token: String,
    /// Every change of state goes through it.
    pub control: Arc<ControlPlane>,
    /// The data plane, whose decision `GET /v1/explain` asks.
    pub gateway: Arc<crate::proxy::Gateway>,
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

/// Every error answer: a stable reason and a human detail.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    /// The reason, e.g. `bad_request`, `unauthorized`, `not_found`,
    /// `address_taken`, or a token's deny reason.
    error: String,
    detail: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(ErrorBody {
            error: self.error.to_owned(),
            detail: self.detail,
        });
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

#[derive(OpenApi)]
#[openapi(
    info(
        title = "sluice admin API",
        description = "Mints tokens, serves the JWKS, registers, launches, lists and \
                       unregisters sandboxes, revokes tokens and explains decisions. Every \
                       /v1 call but this document needs `Authorization: Bearer <admin token>`."
    ),
    modifiers(&AdminAuth)
)]
struct ApiDoc;

/// The admin bearer token, as a security scheme.
struct AdminAuth;

impl utoipa::Modify for AdminAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The calls outside `/v1`'s admin token (this document included).
fn public() -> OpenApiRouter<Arc<AdminState>> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(healthz))
        .routes(routes!(jwks))
        .routes(routes!(openapi_json))
        .routes(routes!(ui))
}

/// The `/v1` calls, each behind the admin token.
fn v1() -> OpenApiRouter<Arc<AdminState>> {
    OpenApiRouter::new()
        .routes(routes!(mint_token))
        .routes(routes!(register, list))
        .routes(routes!(launch))
        .routes(routes!(show, unregister))
        .routes(routes!(ca_pem))
        .routes(routes!(replace_token))
        .routes(routes!(exec))
        .routes(routes!(revoke))
        .routes(routes!(explain))
        .routes(routes!(destinations))
        .routes(routes!(suggestion))
        .routes(routes!(events))
}

/// The admin API's OpenAPI 3 document, from the same registrations as the
/// router.
pub fn openapi() -> utoipa::openapi::OpenApi {
    public().nest("/v1", v1()).split_for_parts().1
}

pub fn router(state: Arc<AdminState>) -> Router {
    let v1 = v1().route_layer(middleware::from_fn_with_state(
        Arc::clone(&state),
        require_admin,
    ));
    let (router, _) = public().nest("/v1", v1).split_for_parts();
    router
        .route(
            "/ui",
            axum::routing::get(|| async { axum::response::Redirect::permanent("/ui/") }),
        )
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// The operator page: one self-contained document (no outside assets),
/// holding no data of its own. Everything it shows comes from `/v1`,
/// asked with the admin token the operator gives it: without the token
/// it shows nothing but the sign-in form.
#[utoipa::path(get, path = "/ui/", responses((status = 200, description = "The operator page (HTML, self-contained)", body = String, content_type = "text/html")))]
async fn ui() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        include_str!("ui/index.html"),
    )
        .into_response()
}

/// Whether the gateway is up.
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "`ok`", body = String, content_type = "text/plain")))]
async fn healthz() -> &'static str {
    "ok"
}

/// This document.
#[utoipa::path(get, path = "/v1/openapi.json", responses((status = 200, description = "The OpenAPI 3 document of this API", body = Object)))]
async fn openapi_json() -> Response {
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let doc = DOC.get_or_init(|| {
        openapi()
            .to_json()
            .unwrap_or_else(|e| json!({"error": "internal", "detail": e.to_string()}).to_string())
    });
    ([(header::CONTENT_TYPE, "application/json")], doc.as_str()).into_response()
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

/// The public keys tokens are verified with (several during a rotation,
/// chosen by `kid`).
#[utoipa::path(get, path = "/.well-known/jwks.json", responses((status = 200, description = "The public JWKS", body = Object)))]
async fn jwks(State(state): State<Arc<AdminState>>) -> Json<Value> {
    Json(state.verifier.jwks().public().clone())
}

/// `POST /v1/tokens`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct TokenRequest {
    /// The sandbox the token is for (claim `container_id`).
    #[schema(pattern = "^[A-Za-z0-9_.-]{1,128}$")]
    container_id: String,
    /// Who the sandbox runs for (claim `user_id`).
    #[schema(pattern = "^[A-Za-z0-9_.-]{1,128}$")]
    user_id: String,
    /// Allowlist entries: `name`, `*.suffix`, `host:port`, an IP literal,
    /// `@preset`.
    allowed_hosts: Vec<String>,
    /// Lifetime in seconds (default 4 h, at most `auth.max_ttl_s`).
    #[serde(default)]
    #[schema(minimum = 1)]
    ttl_seconds: Option<u64>,
    /// `[credentials.NAME]` the sandbox may use (claim `credentials`);
    /// each must be configured on this gateway.
    #[serde(default)]
    credentials: Vec<String>,
    /// Claim `enforce`: `"enforce"` (default) or `"report"` (allowlist
    /// and request-rule denials let through, recorded `would_deny`).
    #[serde(default)]
    enforce: crate::identity::token::Enforce,
    /// Claim `limits`: per-sandbox limits, every key optional.
    #[serde(default)]
    limits: crate::limits::Limits,
    /// Claim `organization_uuid`: whose `[limits.organizations]` budget
    /// the sandbox spends.
    #[serde(default)]
    #[schema(pattern = "^[A-Za-z0-9_.-]{1,128}$")]
    organization_uuid: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct TokenResponse {
    /// The ES256 JWT.
    token: String,
    jti: String,
    /// Unix seconds.
    expires_at: u64,
}

/// What a 401 means, on every `/v1` call.
const AUTH: &str = "a valid admin bearer token is required";

/// Mints a token.
#[utoipa::path(post, path = "/tokens", request_body = TokenRequest, security(("admin" = [])),
    responses(
        (status = 201, description = "Minted", body = TokenResponse),
        (status = 400, description = "A bad entry or lifetime", body = ErrorBody),
        (status = 401, description = AUTH, body = ErrorBody),
        (status = 413, description = "The body is over 64 KiB", body = ErrorBody),
        (status = 503, description = "No signing key is configured", body = ErrorBody),
    ))]
async fn mint_token(
    State(state): State<Arc<AdminState>>,
    JsonBody(req): JsonBody<TokenRequest>,
) -> Result<(StatusCode, Json<TokenResponse>), ApiError> {
    use crate::control::MintError;
    let seal = state.gateway.seal();
    if let Some(unknown) = req
        .credentials
        .iter()
        .find(|n| seal.credentials.get(n).is_none())
    {
        return Err(ApiError::bad_request(format!(
            "no [credentials.{unknown}] on this gateway"
        )));
    }
    let minted = state
        .control
        .mint(
            crate::identity::token::MintRequest {
                container_id: req.container_id,
                user_id: req.user_id,
                allowed_hosts: req.allowed_hosts,
                credentials: req.credentials,
                ttl: std::time::Duration::ZERO,
                enforce: req.enforce,
                limits: req.limits,
                organization_uuid: req.organization_uuid,
            },
            req.ttl_seconds,
        )
        .map_err(|e| match e {
            MintError::NoSigningKey => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_signing_key",
                e.to_string(),
            ),
            MintError::BadTtl(_) => ApiError::bad_request(e.to_string()),
            MintError::Token(crate::identity::token::MintError::BadRequest(d)) => {
                ApiError::bad_request(d)
            }
            MintError::Token(other) => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                crate::error_chain(&other),
            ),
        })?;
    Ok((
        StatusCode::CREATED,
        Json(TokenResponse {
            token: minted.token,
            jti: minted.claims.jti,
            expires_at: minted.claims.exp,
        }),
    ))
}

/// `POST /v1/sandboxes`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RegisterRequest {
    /// The sandbox's address, as the gateway sees its connections come.
    source_ip: String,
    /// Its token.
    token: String,
    /// The sandbox's MAC, on a bridge several sandboxes share
    /// (`gateway.l2_bind_iface`).
    #[serde(default)]
    #[schema(pattern = "^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")]
    mac: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct Registered {
    container_id: String,
    #[schema(value_type = String)]
    source_ip: IpAddr,
    /// Unix seconds.
    expires_at: u64,
    /// Each credential the token names → the sandbox's placeholder for
    /// it (what its environment holds instead of the secret).
    credentials: BTreeMap<String, String>,
}

/// A grant's placeholders, by credential name.
fn placeholders(
    gw: &crate::proxy::Gateway,
    grant: &crate::identity::token::Grant,
) -> BTreeMap<String, String> {
    gw.sealed(grant)
        .map(|(sealed, _)| {
            sealed
                .items
                .iter()
                .map(|(name, placeholder, _)| (name.to_string(), placeholder.clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// Registers a sandbox started elsewhere: its source address → its token.
#[utoipa::path(post, path = "/sandboxes", request_body = RegisterRequest, security(("admin" = [])),
    responses(
        (status = 201, description = "Registered (on disk)", body = Registered),
        (status = 400, description = "A bad address, MAC or token (the token's deny reason)", body = ErrorBody),
        (status = 401, description = AUTH, body = ErrorBody),
        (status = 409, description = "The address or the container is taken", body = ErrorBody),
        (status = 413, description = "The body is over 64 KiB", body = ErrorBody),
        (status = 500, description = "Not written to disk (nothing registered)", body = ErrorBody),
    ))]
async fn register(
    State(state): State<Arc<AdminState>>,
    JsonBody(req): JsonBody<RegisterRequest>,
) -> Result<(StatusCode, Json<Registered>), ApiError> {
    let ip: IpAddr = req.source_ip.trim().parse().map_err(|_| {
        ApiError::bad_request(format!(
            "source_ip {:?} is not an IP address",
            req.source_ip
        ))
    })?;
    let mac = match req.mac.as_deref().map(str::parse::<MacAddr>) {
        None => None,
        Some(Ok(mac)) => Some(mac),
        Some(Err(e)) => return Err(ApiError::bad_request(e)),
    };
    let sandbox = state
        .control
        .register_token(ip, req.token, mac)
        .await
        .map_err(|e| {
            let detail = crate::error_chain(&e);
            match e {
                RegisterError::Token(t) => {
                    ApiError::new(StatusCode::BAD_REQUEST, t.deny().as_str(), t.to_string())
                }
                RegisterError::NotUnicast => ApiError::bad_request(detail),
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
        Json(Registered {
            container_id: sandbox.container_id.clone(),
            source_ip: sandbox.source_ip,
            expires_at: sandbox.grant().claims.exp,
            credentials: placeholders(&state.gateway, &sandbox.grant()),
        }),
    ))
}

/// One registered sandbox.
#[derive(Serialize, ToSchema)]
pub(crate) struct SandboxView {
    container_id: String,
    #[schema(value_type = String)]
    source_ip: IpAddr,
    /// Bound on a shared bridge, else null.
    #[schema(value_type = Option<String>)]
    mac: Option<MacAddr>,
    user_id: Option<String>,
    /// As the token lists them (presets unexpanded).
    allowed_hosts: Vec<String>,
    jti: String,
    /// Unix seconds.
    expires_at: u64,
    /// Unix seconds.
    registered_at: u64,
    /// `registered` or `launched`.
    #[schema(value_type = String)]
    origin: Origin,
    live_connections: u64,
    /// Each credential the token names → the sandbox's placeholder.
    credentials: BTreeMap<String, String>,
    /// `enforce` or `report`.
    enforce: crate::identity::token::Enforce,
    /// The token's `limits` (a missing key is no limit).
    limits: crate::limits::Limits,
    /// What it uses of them now, on this gateway.
    usage: crate::live::Usage,
}

fn view(s: &Sandbox, registry: &Registry, gw: &crate::proxy::Gateway) -> SandboxView {
    let c = &s.grant().claims;
    SandboxView {
        container_id: s.container_id.clone(),
        source_ip: s.source_ip,
        mac: s.mac,
        user_id: c.user_id.clone(),
        allowed_hosts: c.allowed_hosts.0.clone(),
        jti: c.jti.clone(),
        expires_at: c.exp,
        registered_at: s.registered_at,
        origin: s.origin,
        live_connections: registry.connections().live(s.container_id.as_str()) as u64,
        credentials: placeholders(gw, &s.grant()),
        enforce: c.enforce,
        limits: c.limits,
        usage: registry.tenants().usage(&s.container_id),
    }
}

/// `GET /v1/sandboxes`.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Sandboxes per page (default 100).
    #[serde(default)]
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// Start after this container id (the previous page's `next`).
    #[serde(default)]
    after: Option<String>,
    /// Only sandboxes whose container id contains it, or whose address
    /// starts with it.
    #[serde(default)]
    q: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct SandboxPage {
    sandboxes: Vec<SandboxView>,
    /// The `after` of the next page; null on the last.
    next: Option<String>,
}

/// Registered sandboxes, a page at a time in container-id order.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// Lists registered sandboxes, a page at a time in container-id order.
#[utoipa::path(get, path = "/sandboxes", params(ListQuery), security(("admin" = [])),
    responses(
        (status = 200, description = "One page", body = SandboxPage),
        (status = 400, description = "A bad query", body = ErrorBody),
        (status = 401, description = AUTH, body = ErrorBody),
    ))]
async fn list(
    State(state): State<Arc<AdminState>>,
    query: Result<axum::extract::Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<SandboxPage>, ApiError> {
    let axum::extract::Query(q) =
        query.map_err(|e| ApiError::bad_request(format!("bad query: {e}")))?;
    let limit = q.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    let Some(search) = q.q.as_deref().filter(|s| !s.is_empty()) else {
        let (page, next) = state.registry.page(q.after.as_deref(), limit);
        let sandboxes = page
            .iter()
            .map(|s| view(s, &state.registry, &state.gateway))
            .collect();
        return Ok(Json(SandboxPage { sandboxes, next }));
    };
    // A search walks the pages until it has a page of matches (or the end).
    let mut sandboxes = Vec::new();
    let mut after = q.after.clone();
    let next = loop {
        let (page, more) = state.registry.page(after.as_deref(), MAX_PAGE);
        let mut last = None;
        for s in &page {
            last = Some(s.container_id.to_string());
            let hit =
                s.container_id.contains(search) || s.source_ip.to_string().starts_with(search);
            if hit {
                sandboxes.push(view(s, &state.registry, &state.gateway));
                if sandboxes.len() == limit {
                    break;
                }
            }
        }
        if sandboxes.len() == limit {
            break last;
        }
        match more {
            Some(m) => after = Some(m),
            None => break None,
        }
    };
    Ok(Json(SandboxPage { sandboxes, next }))
}

/// One registered sandbox.
#[utoipa::path(get, path = "/sandboxes/{container_id}", params(("container_id" = String, Path)), security(("admin" = [])),
    responses(
        (status = 200, description = "The sandbox", body = SandboxView),
        (status = 401, description = AUTH, body = ErrorBody),
        (status = 404, description = "No such sandbox", body = ErrorBody),
    ))]
async fn show(
    State(state): State<Arc<AdminState>>,
    Path(id): Path<String>,
) -> Result<Json<SandboxView>, ApiError> {
    state
        .registry
        .get_by_id(&id)
        .map(|s| Json(view(&s, &state.registry, &state.gateway)))
        .ok_or_else(|| ApiError::not_found(format!("no sandbox {id:?}")))
}

/// `PUT /v1/sandboxes/{container_id}/token`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReplaceRequest {
    /// The replacement token: for the same `container_id`, valid now.
    token: String,
}

/// What a replacement answers.
#[derive(Serialize, ToSchema)]
pub(crate) struct ReplacedView {
    container_id: String,
    #[schema(value_type = String)]
    source_ip: IpAddr,
    /// Unix seconds: the new token's expiry.
    expires_at: u64,
    /// Each credential the new token names → the sandbox's placeholder.
    credentials: BTreeMap<String, String>,
    /// Live connections (on this gateway) the new token still allows.
    kept: usize,
    /// Live connections (on this gateway) it closed, `policy_changed`.
    closed: usize,
}

/// Replaces a sandbox's token in place (same container, same address):
/// every live connection is checked again under the new token, on every
/// gateway of a fleet; those it no longer allows close
/// (`policy_changed`), and the old token is revoked. A refused
/// replacement changes nothing.
#[utoipa::path(put, path = "/sandboxes/{container_id}/token", params(("container_id" = String, Path)),
    request_body = ReplaceRequest, security(("admin" = [])),
    responses(
        (status = 200, description = "Replaced", body = ReplacedView),
        (status = 400, description = "The token does not verify (its deny reason), is for another container (`container_mismatch`) or is the sandbox's own (`bad_request`)", body = ErrorBody),
        (status = 401, description = AUTH, body = ErrorBody),
        (status = 404, description = "No such sandbox", body = ErrorBody),
        (status = 413, description = "The body is over 64 KiB", body = ErrorBody),
        (status = 500, description = "The store did not take it (nothing changed)", body = ErrorBody),
    ))]
async fn replace_token(
    State(state): State<Arc<AdminState>>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<ReplaceRequest>,
) -> Result<Json<ReplacedView>, ApiError> {
    use crate::control::ReplaceError;
    let replaced = state
        .control
        .replace_token(&id, req.token)
        .await
        .map_err(|e| {
            let detail = crate::error_chain(&e);
            match e {
                ReplaceError::NotFound => ApiError::not_found(format!("no sandbox {id:?}")),
                ReplaceError::Token(t) => {
                    ApiError::new(StatusCode::BAD_REQUEST, t.deny().as_str(), t.to_string())
                }
                ReplaceError::OtherContainer => ApiError::new(
                    StatusCode::BAD_REQUEST,
                    crate::deny::Deny::ContainerMismatch.as_str(),
                    detail,
                ),
                ReplaceError::SameToken => ApiError::bad_request(detail),
                ReplaceError::Persist(_) => {
                    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "persist_failed", detail)
                }
            }
        })?;
    let s = &replaced.sandbox;
    let grant = s.grant();
    Ok(Json(ReplacedView {
        container_id: s.container_id.clone(),
        source_ip: s.source_ip,
        expires_at: grant.claims.exp,
        credentials: placeholders(&state.gateway, &grant),
        kept: replaced.kept,
        closed: replaced.closed,
    }))
}

/// `GET /v1/sandboxes/{container_id}/destinations`.
#[derive(Serialize, ToSchema)]
pub(crate) struct DestinationsView {
    /// Each host and port the sandbox reached or tried, the most recent
    /// first (at most 512).
    destinations: Vec<crate::events::Destination>,
}

/// What a sandbox reached or tried: each host and port with its allowed
/// and denied counts, the last reason, bytes each way, first and last
/// seen (Unix seconds). Kept across a restart while it is registered.
#[utoipa::path(get, path = "/sandboxes/{container_id}/destinations", params(("container_id" = String, Path)), security(("admin" = [])),
    responses(
        (status = 200, description = "Its destinations", body = DestinationsView),
        (status = 401, description = AUTH, body = ErrorBody),
        (status = 404, description = "No such sandbox", body = ErrorBody),
    ))]
async fn destinations(
    State(state): State<Arc<AdminState>>,
    Path(id): Path<String>,
) -> Result<Json<DestinationsView>, ApiError> {
    if state.registry.get_by_id(&id).is_none() {
        return Err(ApiError::not_found(format!("no sandbox {id:?}")));
    }
    Ok(Json(DestinationsView {
        destinations: state.gateway.events.destinations(&id),
    }))
}

/// `GET /v1/sandboxes/{container_id}/suggestion`.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct SuggestionQuery {
    /// Also what an enforcing sandbox was refused by its allowlist.
    #[serde(default)]
    include_denied: bool,
}

/// An `allowed_hosts` value from what the sandbox reached (as `sluice
/// policy suggest` prints it, from the live table).
#[utoipa::path(get, path = "/sandboxes/{container_id}/suggestion", params(("container_id" = String, Path), SuggestionQuery), security(("admin" = [])),
    responses(
        (status = 200, description = "The suggestion", body = crate::suggest::Suggestion),
        (status = 400, description = "A bad query", body = ErrorBody),
        (status = 401, description = AUTH, body = ErrorBody),
        (status = 404, description = "No such sandbox", body = ErrorBody),
    ))]
async fn suggestion(
    State(state): State<Arc<AdminState>>,
    Path(id): Path<String>,
    query: Result<axum::extract::Query<SuggestionQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<crate::suggest::Suggestion>, ApiError> {
    let axum::extract::Query(q) =
        query.map_err(|e| ApiError::bad_request(format!("bad query: {e}")))?;
    if state.registry.get_by_id(&id).is_none() {
        return Err(ApiError::not_found(format!("no sandbox {id:?}")));
    }
    let policy = state.gateway.policy();
    Ok(Json(crate::suggest::suggest(
        &state.gateway.events.destinations(&id),
        &policy.gateway.allowed_ports,
        q.include_denied,
    )))
}

/// `GET /v1/events`.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct EventsQuery {
    /// Only this sandbox's events.
    #[serde(default)]
    container_id: Option<String>,
}

/// Every event as it happens, as server-sent events (`event:` the kind,
/// `data:` the event as JSON; `event: lagged` says how many a slow reader
/// missed). Ends when the gateway stops.
#[utoipa::path(get, path = "/events", params(EventsQuery), security(("admin" = [])),
    responses(
        (status = 200, description = "The stream", content_type = "text/event-stream", body = String),
        (status = 400, description = "A bad query", body = ErrorBody),
        (status = 401, description = AUTH, body = ErrorBody),
    ))]
async fn events(
    State(state): State<Arc<AdminState>>,
    query: Result<axum::extract::Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
    use tokio::sync::broadcast::error::RecvError;
    let axum::extract::Query(q) =
        query.map_err(|e| ApiError::bad_request(format!("bad query: {e}")))?;
    let rx = state.gateway.events.subscribe();
    let stop = state.gateway.shutdown.clone();
    let filter = q.container_id;
    let stream =
        futures_util::stream::unfold((rx, stop, filter), |(mut rx, stop, filter)| async move {
            loop {
                let got = tokio::select! {
                    () = stop.stopping() => return None,
                    got = rx.recv() => got,
                };
                let out = match got {
                    Ok(e)
                        if filter
                            .as_deref()
                            .is_some_and(|f| e.container_id.as_deref() != Some(f)) =>
                    {
                        continue;
                    }
                    Ok(e) => SseEvent::default()
                        .event(e.kind.as_str())
                        .json_data(&*e)
                        .unwrap_or_else(|_| SseEvent::default().event("error")),
                    Err(RecvError::Lagged(n)) => {
                        SseEvent::default().event("lagged").data(n.to_string())
                    }
                    Err(RecvError::Closed) => return None,
                };
                return Some((Ok::<_, std::convert::Infallible>(out), (rx, stop, filter)));
            }
        });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// The sandbox's inspection CA (PEM), for its trust store: beside the
/// system's roots, never instead of them.
#[utoipa::path(get, path = "/sandboxes/{container_id}/ca.pem", params(("container_id" = String, Path)), security(("admin" = [])),
    responses(
        (status = 200, description = "The CA certificate, PEM", content_type = "application/x-pem-file", body = String),
        (status = 401, description = AUTH, body = ErrorBody),
        (status = 404, description = "No such sandbox", body = ErrorBody),
        (status = 500, description = "The CA could not be made", body = ErrorBody),
    ))]
async fn ca_pem(
    State(state): State<Arc<AdminState>>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let sandbox = state
        .registry
        .get_by_id(&id)
        .ok_or_else(|| ApiError::not_found(format!("no sandbox {id:?}")))?;
    let ca = state.gateway.sandbox_ca(&sandbox.grant()).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            crate::error_chain(&e),
        )
    })?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-pem-file")],
        ca.pem.clone(),
    ))
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
            LaunchError::Failed(_)
            | LaunchError::Rules(_)
            | LaunchError::Store(_)
            | LaunchError::Io { .. }
            | LaunchError::Spec(_)
            | LaunchError::Json(_)
            | LaunchError::Task(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.reason(), crate::error_chain(&e))
    }
}

/// Unregisters a sandbox (and stops it, if sluice launched it); its live
/// connections close.
#[utoipa::path(delete, path = "/sandboxes/{container_id}", params(("container_id" = String, Path)), security(("admin" = [])),
    responses(
        (status = 204, description = "Gone (on disk)"),
        (status = 401, description = AUTH, body = ErrorBody),
        (status = 404, description = "No such sandbox", body = ErrorBody),
        (status = 500, description = "Not written to disk", body = ErrorBody),
    ))]
async fn unregister(
    State(state): State<Arc<AdminState>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.control.destroy(&id).await.map_err(|e| match e {
        LaunchError::NotFound => ApiError::not_found(format!("no sandbox {id:?}")),
        other => other.into(),
    })?;
    tracing::info!(container_id = %id, "sandbox unregistered");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, ToSchema)]
pub(crate) struct LaunchResponse {
    container_id: String,
    #[schema(value_type = String)]
    source_ip: std::net::Ipv4Addr,
    /// The token minted for it (also in its environment).
    token: String,
    /// Unix seconds.
    expires_at: u64,
    /// Each credential the token names → the sandbox's placeholder (also
    /// in its environment, under the credential's `env`).
    credentials: BTreeMap<String, String>,
}

/// Starts a gVisor sandbox in its own network namespace and registers it.
#[utoipa::path(post, path = "/sandboxes/launch", request_body = LaunchRequest, security(("admin" = [])),
    responses(
        (status = 201, description = "Started and registered", body = LaunchResponse),
        (status = 400, description = "A bad request (limits, command, allowlist)", body = ErrorBody),
        (status = 401, description = AUTH, body = ErrorBody),
        (status = 413, description = "The body is over 64 KiB", body = ErrorBody),
        (status = 500, description = "The launch failed and was undone", body = ErrorBody),
        (status = 503, description = "No runtime, root filesystem or free address", body = ErrorBody),
    ))]
async fn launch(
    State(state): State<Arc<AdminState>>,
    JsonBody(req): JsonBody<LaunchRequest>,
) -> Result<(StatusCode, Json<LaunchResponse>), ApiError> {
    let launched = state.control.launch(req).await?;
    Ok((
        StatusCode::CREATED,
        Json(LaunchResponse {
            container_id: launched.container_id,
            source_ip: launched.source_ip,
            token: launched.token,
            expires_at: launched.expires_at,
            credentials: launched.credentials,
        }),
    ))
}

/// `POST /v1/sandboxes/{container_id}/exec`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExecRequest {
    /// The program and its arguments.
    command: Vec<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct ExecResponse {
    exit_code: i32,
    stdout: String,
    stderr: String,
}

/// Runs a command in a launched sandbox.
#[utoipa::path(post, path = "/sandboxes/{container_id}/exec", params(("container_id" = String, Path)), request_body = ExecRequest, security(("admin" = [])),
    responses(
        (status = 200, description = "It ran", body = ExecResponse),
        (status = 400, description = "A bad command", body = ErrorBody),
        (status = 401, description = AUTH, body = ErrorBody),
        (status = 404, description = "No such sandbox", body = ErrorBody),
        (status = 409, description = "Registered, not launched: nothing to exec in", body = ErrorBody),
        (status = 413, description = "The body is over 64 KiB", body = ErrorBody),
        (status = 500, description = "The runtime failed", body = ErrorBody),
        (status = 504, description = "It did not finish within timeout_ms", body = ErrorBody),
    ))]
async fn exec(
    State(state): State<Arc<AdminState>>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<ExecRequest>,
) -> Result<Json<ExecResponse>, ApiError> {
    let out = state.control.exec(&id, req.command, req.timeout_ms).await?;
    Ok(Json(ExecResponse {
        exit_code: out.exit_code,
        stdout: out.stdout,
        stderr: out.stderr,
    }))
}

/// `POST /v1/revocations`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RevokeRequest {
    /// The token's `jti`.
    #[schema(pattern = "^[A-Za-z0-9_-]{1,128}$")]
    jti: String,
}

/// Refuses a token from now on and closes its live connections.
#[utoipa::path(post, path = "/revocations", request_body = RevokeRequest, security(("admin" = [])),
    responses(
        (status = 204, description = "Revoked (on disk)"),
        (status = 400, description = "A bad jti", body = ErrorBody),
        (status = 401, description = AUTH, body = ErrorBody),
        (status = 413, description = "The body is over 64 KiB", body = ErrorBody),
        (status = 500, description = "Not written to disk", body = ErrorBody),
    ))]
async fn revoke(
    State(state): State<Arc<AdminState>>,
    JsonBody(req): JsonBody<RevokeRequest>,
) -> Result<StatusCode, ApiError> {
    use crate::control::RevokeError;
    state.control.revoke(&req.jti).await.map_err(|e| match e {
        RevokeError::BadJti => ApiError::bad_request(e.to_string()),
        RevokeError::Persist(_) => {
            let detail = crate::error_chain(&e);
            tracing::error!(error = %detail, "cannot persist the registry");
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "persist_failed", detail)
        }
    })?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/explain`.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ExplainQuery {
    /// A registered sandbox.
    container_id: String,
    /// A name or an IP (`host:port` works too).
    host: String,
    /// Default: the one in `host`, else 443.
    #[serde(default)]
    #[param(minimum = 1, maximum = 65535)]
    port: Option<u16>,
    /// A request's method, to judge it by the host's request rules.
    #[serde(default)]
    method: Option<String>,
    /// A request's path (default `/` with a method).
    #[serde(default)]
    path: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct ExplainResponse {
    /// `allow`, `deny`, or `would_deny` (a report-mode sandbox's denial,
    /// let through).
    decision: &'static str,
    /// The deny reason, or `none`.
    reason: &'static str,
    /// The allowlist entry that admitted the target (with a method, the
    /// request rule that admitted the request), as written.
    matched: Option<String>,
    /// What each preset the sandbox's token names stands for, entry by
    /// entry (absent when it names none).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    presets: std::collections::BTreeMap<String, Vec<String>>,
}

/// The decision the data plane would make for a registered sandbox and a
/// target, with the allowlist entry that matched.
#[utoipa::path(get, path = "/explain", params(ExplainQuery), security(("admin" = [])),
    responses(
        (status = 200, description = "The decision", body = ExplainResponse),
        (status = 400, description = "A bad query", body = ErrorBody),
        (status = 401, description = AUTH, body = ErrorBody),
        (status = 404, description = "No such sandbox", body = ErrorBody),
    ))]
async fn explain(
    State(state): State<Arc<AdminState>>,
    query: Result<axum::extract::Query<ExplainQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ExplainResponse>, ApiError> {
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
    if q.path.is_some() && q.method.is_none() {
        return Err(ApiError::bad_request("a path is explained with a method"));
    }
    let request = q
        .method
        .as_deref()
        .map(|m| (m, q.path.as_deref().unwrap_or("/")));
    let explained = state.gateway.decision(&policy).explain(
        &crate::decision::Caller::Sandbox(sandbox),
        &crate::decision::Target { host, port },
        request,
    );
    let (decision, reason) = explained.verdict();
    Ok(Json(ExplainResponse {
        decision,
        reason,
        matched: explained.matched,
        presets: explained.presets,
    }))
}
