//! `PolicyService`: Apply, Delete, List and Status — what the CLI and any gRPC client call.
//!
//! Apply and Delete validate every document first (nothing is written when one is bad). Then,
//! outside Kubernetes, the change is committed to the hub and its store; in Kubernetes it is
//! written through the API server as custom resources, and the answer comes once the watch has
//! brought it into force (see [`crate::crds::write`]). Either way the answer names the version and
//! the proxies it changed, so `apply --wait` works the same.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use trellis_proto::pb::policy_service_server::PolicyService;
use trellis_proto::pb::{
    self, ApplyRequest, ApplyResponse, ListRequest, ListResponse, StatusRequest, StatusResponse,
};
use trellis_proto::policy::PolicySet;
use trellis_proto::wire;

use super::Hub;
use crate::crds::{PolicyWriter, WriteError, write::Outcome};
use crate::store::StoreError;

pub struct PolicyServer {
    hub: Arc<Hub>,
    /// Kubernetes mode: where Apply and Delete write.
    kubernetes: Option<Arc<PolicyWriter>>,
}

impl PolicyServer {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self {
            hub,
            kubernetes: None,
        }
    }

    /// Apply and Delete write custom resources through `writer`; the hub follows the watch.
    pub fn kubernetes(hub: Arc<Hub>, writer: Arc<PolicyWriter>) -> Self {
        Self {
            hub,
            kubernetes: Some(writer),
        }
    }

    fn respond_written(
        &self,
        result: Result<Outcome, WriteError>,
    ) -> Result<Response<ApplyResponse>, Status> {
        match result {
            Ok(Outcome { changed, commit }) => {
                let affected_proxies = if changed.is_empty() {
                    Vec::new()
                } else {
                    tracing::info!(version = commit.version, changed = ?changed, affected = commit.affected.len(), "policy written to the Kubernetes API and in force");
                    commit.affected
                };
                Ok(Response::new(ApplyResponse {
                    version: commit.version,
                    changed,
                    affected_proxies,
                    committed_at_ms: commit.committed_at_ms,
                }))
            }
            Err(e) => {
                self.hub.metrics.apply_error("storage");
                tracing::warn!(error = %e, "writing policy to the Kubernetes API failed");
                let code = match &e {
                    WriteError::Refused { status, .. } => match status.as_u16() {
                        400 | 422 => tonic::Code::InvalidArgument,
                        401 | 403 => tonic::Code::PermissionDenied,
                        404 => tonic::Code::FailedPrecondition,
                        _ => tonic::Code::Unavailable,
                    },
                    WriteError::Unreachable { .. } => tonic::Code::Unavailable,
                    WriteError::Conflict { .. } => tonic::Code::Aborted,
                    WriteError::NotInForce { .. } => tonic::Code::DeadlineExceeded,
                };
                Err(Status::new(code, e.to_string()))
            }
        }
    }

    fn parse(&self, yaml: &str) -> Result<PolicySet, Status> {
        PolicySet::parse(yaml).map_err(|errors| {
            self.hub.metrics.apply_error("invalid");
            Status::invalid_argument(format!("{errors}\nnothing was applied"))
        })
    }

    fn respond(
        &self,
        result: Result<(u64, Vec<String>, Vec<String>, u64), StoreError>,
    ) -> Result<Response<ApplyResponse>, Status> {
        match result {
            Ok((version, changed, affected_proxies, committed_at_ms)) => {
                if !changed.is_empty() {
                    tracing::info!(version, changed = ?changed, affected = affected_proxies.len(), "policy committed");
                }
                Ok(Response::new(ApplyResponse {
                    version,
                    changed,
                    affected_proxies,
                    committed_at_ms,
                }))
            }
            Err(e) => {
                self.hub.metrics.apply_error("storage");
                tracing::error!(error = %e, "apply failed");
                Err(Status::unavailable(e.to_string()))
            }
        }
    }
}

#[tonic::async_trait]
impl PolicyService for PolicyServer {
    async fn apply(&self, req: Request<ApplyRequest>) -> Result<Response<ApplyResponse>, Status> {
        let yaml = req.into_inner().yaml;
        let set = self.parse(&yaml)?;
        match &self.kubernetes {
            Some(writer) => self.respond_written(writer.apply(&yaml, &set).await),
            None => self.respond(self.hub.commit(|state| state.with_applied(set))),
        }
    }

    async fn delete(&self, req: Request<ApplyRequest>) -> Result<Response<ApplyResponse>, Status> {
        let yaml = req.into_inner().yaml;
        let set = self.parse(&yaml)?;
        match &self.kubernetes {
            Some(writer) => self.respond_written(writer.delete(&yaml, &set).await),
            None => self.respond(self.hub.commit(|state| state.with_deleted(&set))),
        }
    }

    async fn list(&self, req: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let ListRequest { kind, name } = req.into_inner();
        let (version, set) = self.hub.policy_set();
        let keep = |k: &str, n: &str| {
            (kind.is_empty() || kind.eq_ignore_ascii_case(k)) && (name.is_empty() || name == n)
        };
        let traffic: Vec<pb::TrafficPolicy> = set
            .traffic
            .iter()
            .filter(|p| keep("TrafficPolicy", &p.name))
            .map(wire::traffic_to_wire)
            .collect();
        let server: Vec<pb::ServerPolicy> = set
            .server
            .iter()
            .filter(|p| keep("ServerPolicy", &p.name))
            .map(wire::server_to_wire)
            .collect();
        let yaml = wire::to_yaml(&traffic, &server);
        Ok(Response::new(ListResponse {
            version,
            traffic,
            server,
            yaml,
        }))
    }

    async fn status(
        &self,
        _req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let mut proxies: Vec<pb::ProxyStatus> = self
            .hub
            .lock_proxies()
            .values()
            .map(|p| pb::ProxyStatus {
                id: p.id.clone(),
                workload: p.workload.clone(),
                address: p.address.clone(),
                sent_version: p.sent_version.map(|v| v.to_string()).unwrap_or_default(),
                acked_version: p.acked_version.map(|v| v.to_string()).unwrap_or_default(),
                acked_at_ms: p.acked_at_ms,
                last_nack_version: p
                    .last_nack
                    .as_ref()
                    .map(|(v, _)| v.to_string())
                    .unwrap_or_default(),
                last_nack_error: p
                    .last_nack
                    .as_ref()
                    .map(|(_, e)| e.clone())
                    .unwrap_or_default(),
                last_seen_ms: p.last_seen_ms,
                connected: p.connected,
            })
            .collect();
        proxies.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(Response::new(StatusResponse {
            version: self.hub.version(),
            proxies,
        }))
    }
}
