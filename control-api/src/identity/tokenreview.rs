//! Kubernetes service-account tokens, checked with the TokenReview API.
//!
//! The proxy sends its pod's projected service-account token (audience `trellis`); the control
//! plane asks the API server whether it is valid for that audience, and derives the identity
//! from the answer (`system:serviceaccount:<ns>:<sa>`) — never from what the proxy asked for.
//! The request is the API's real JSON (`authentication.k8s.io/v1`, kind `TokenReview`) over
//! HTTPS through [`crate::kube::KubeClient`], authenticated with the control plane's own
//! service-account token and verifying the API server against its CA.

use http::{Method, StatusCode};

use crate::kube::{KubeClient, KubeConfig, excerpt};

pub const AUDIENCE: &str = "trellis";

/// The API server to ask; the same settings as every other Kubernetes API call.
pub type TokenReviewConfig = KubeConfig;

pub struct TokenReviewer {
    client: KubeClient,
}

impl TokenReviewer {
    pub fn new(config: TokenReviewConfig) -> Result<Self, String> {
        Ok(Self {
            client: KubeClient::new(config)?,
        })
    }

    /// The (namespace, service account) a token proves, or why it proves nothing.
    pub async fn review(&self, token: &str) -> Result<(String, String), String> {
        let body = serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [AUDIENCE]},
        });
        let (status, bytes) = self
            .client
            .request(
                Method::POST,
                "/apis/authentication.k8s.io/v1/tokenreviews",
                Some("application/json"),
                Some(body.to_string().into_bytes()),
            )
            .await?;
        // 201 Created is the API's answer; 200 is accepted too, as from older servers.
        if !status.is_success() {
            return Err(format!(
                "the TokenReview API answered {status}{}: {}",
                if status == StatusCode::FORBIDDEN {
                    " (may the control plane's service account create tokenreviews? see its ClusterRole)"
                } else {
                    ""
                },
                excerpt(&bytes)
            ));
        }
        let review: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| format!("the TokenReview API answered invalid JSON: {e}"))?;
        interpret(&review)
    }
}

/// Reads a TokenReview's status: authenticated, for our audience, a service account.
fn interpret(review: &serde_json::Value) -> Result<(String, String), String> {
    let status = &review["status"];
    if status["authenticated"].as_bool() != Some(true) {
        let why = status["error"].as_str().unwrap_or("no reason given");
        return Err(format!("the service-account token was not accepted: {why}"));
    }
    if let Some(audiences) = status["audiences"].as_array()
        && !audiences.iter().any(|a| a.as_str() == Some(AUDIENCE))
    {
        return Err(format!(
            "the service-account token is not for audience {AUDIENCE:?} (project it with `audience: {AUDIENCE}`)"
        ));
    }
    let username = status["user"]["username"].as_str().unwrap_or_default();
    match username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
    {
        Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() => Ok((ns.to_string(), sa.to_string())),
        _ => Err(format!(
            "the token belongs to {username:?}, not to a service account"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_identity_from_the_review_not_the_request() {
        let ok = serde_json::json!({"status": {"authenticated": true, "audiences": ["trellis"],
            "user": {"username": "system:serviceaccount:shop:cart", "uid": "1"}}});
        assert_eq!(interpret(&ok), Ok(("shop".into(), "cart".into())));
        let denied =
            serde_json::json!({"status": {"authenticated": false, "error": "token expired"}});
        assert!(interpret(&denied).unwrap_err().contains("token expired"));
        let other_audience = serde_json::json!({"status": {"authenticated": true, "audiences": ["api"],
            "user": {"username": "system:serviceaccount:shop:cart"}}});
        assert!(interpret(&other_audience).unwrap_err().contains("audience"));
        let user =
            serde_json::json!({"status": {"authenticated": true, "user": {"username": "alice"}}});
        assert!(
            interpret(&user)
                .unwrap_err()
                .contains("not to a service account")
        );
    }
}
