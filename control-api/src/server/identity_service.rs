//! `IdentityService.Certify` (workload certificates), `TokenService.Create` (join tokens), and
//! the admin check that guards `PolicyService` and `TokenService`.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};
use trellis_proto::pb::identity_service_server::IdentityService;
use trellis_proto::pb::token_service_server::TokenService;
use trellis_proto::pb::{CertifyRequest, CertifyResponse, CreateTokenRequest, CreateTokenResponse};

use crate::identity::Authority;
use crate::tls::PeerInfo;

/// The bearer token in `authorization: Bearer <token>`, if any.
fn bearer<T>(req: &Request<T>) -> Option<String> {
    let value = req.metadata().get("authorization")?.to_str().ok()?;
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

pub struct IdentityServer {
    authority: Arc<Authority>,
}

impl IdentityServer {
    pub fn new(authority: Arc<Authority>) -> Self {
        Self { authority }
    }
}

#[tonic::async_trait]
impl IdentityService for IdentityServer {
    async fn certify(
        &self,
        req: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let peer = req.extensions().get::<PeerInfo>().cloned();
        let token = bearer(&req);
        let rsp = self
            .authority
            .certify(peer.as_ref(), token.as_deref(), req.into_inner())
            .await?;
        Ok(Response::new(rsp))
    }
}

pub struct TokenServer {
    authority: Arc<Authority>,
}

impl TokenServer {
    pub fn new(authority: Arc<Authority>) -> Self {
        Self { authority }
    }
}

#[tonic::async_trait]
impl TokenService for TokenServer {
    async fn create(
        &self,
        req: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let req = req.into_inner();
        let valid = req.identity.split_once('/').is_some_and(|(ns, sa)| {
            format!("spiffe://{}/ns/{ns}/sa/{sa}", self.authority.trust_domain())
                .parse::<trellis_identity::SpiffeId>()
                .is_ok()
        });
        if !valid {
            return Err(Status::invalid_argument(format!(
                "--identity {:?} is not NAMESPACE/SERVICE_ACCOUNT (lowercase letters, digits, '-', '.')",
                req.identity
            )));
        }
        if req.ttl_seconds == 0 {
            return Err(Status::invalid_argument("--ttl must be more than 0s"));
        }
        let ttl = Duration::from_secs(req.ttl_seconds);
        let (token, expires) = self
            .authority
            .tokens
            .create(&req.identity, ttl)
            .map_err(Status::unavailable)?;
        tracing::info!(identity = %req.identity, token = %crate::identity::tokens::fingerprint(&token), expires, "join token created");
        Ok(Response::new(CreateTokenResponse {
            token,
            identity: req.identity,
            expires_unix: expires,
        }))
    }
}

/// A tonic interceptor admitting only callers with the admin credential: the admin client
/// certificate, or the admin token as `authorization: Bearer`.
pub fn admin_only(
    authority: Arc<Authority>,
    service: &'static str,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |req: Request<()>| {
        let peer = req.extensions().get::<PeerInfo>();
        let token = bearer(&req);
        if authority.is_admin(peer, token.as_deref()) {
            return Ok(req);
        }
        authority.metrics().unauthorized(service);
        let who = peer.and_then(|p| p.identity.as_ref()).map_or_else(
            || "an unauthenticated caller".to_string(),
            |id| id.to_string(),
        );
        tracing::warn!(peer = ?peer.and_then(|p| p.addr), caller = %who, service, "refused: no admin credential");
        Err(Status::unauthenticated(format!(
            "{service} requires the admin credential (the admin certificate or token in the control plane's state dir); {who} does not hold it"
        )))
    }
}
