//! The tenant service (ops): register, suspend, resume, show and list tenants, each with the
//! freshness of its mirror.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{now_ms, status, Core};
use crate::domain::{NamespaceStats, TenantId, TenantInfo, TenantState};
use crate::ledger::{Command, Outcome};
use crate::pb;

pub struct TenantsService {
    pub core: Arc<Core>,
}

/// Freshness of a namespace as seen now by this node's clock. A namespace that never received
/// a mirrored change is stale from the start: silence is exactly what the flag is for.
pub fn freshness(stats: &NamespaceStats, stale_after_s: u64, now_ms: u64) -> pb::Freshness {
    let last_heard = stats.last_source_ms.max(stats.last_commit_ms);
    let silent_ms = if last_heard == 0 {
        0
    } else {
        now_ms.saturating_sub(last_heard)
    };
    pb::Freshness {
        records: stats.records,
        record_bytes: stats.record_bytes,
        versions: stats.versions,
        last_source_ms: stats.last_source_ms,
        last_commit_ms: stats.last_commit_ms,
        lag_ms: stats.last_lag_ms,
        silent_ms,
        stale: last_heard == 0 || silent_ms > stale_after_s.saturating_mul(1000),
    }
}

fn tenant_id(raw: &str) -> Result<TenantId, Status> {
    TenantId::parse(raw).map_err(status::input)
}

impl TenantsService {
    fn view(&self, info: &TenantInfo, now: u64) -> Result<pb::Tenant, Status> {
        let stats = self.core.reader.stats(&info.id).map_err(status::storage)?;
        Ok(pb::Tenant {
            id: info.id.as_str().to_string(),
            state: info.state.as_str().to_string(),
            created_index: info.created_index,
            created_ms: info.created_ms,
            freshness: Some(freshness(&stats, self.core.mirror.stale_after_s, now)),
        })
    }

    fn vendor_view(&self, now: u64) -> Result<pb::Tenant, Status> {
        let vendor = TenantId::vendor();
        let stats = self.core.reader.stats(&vendor).map_err(status::storage)?;
        Ok(pb::Tenant {
            id: vendor.as_str().to_string(),
            state: "shared".into(),
            created_index: 0,
            created_ms: 0,
            freshness: Some(freshness(&stats, self.core.mirror.stale_after_s, now)),
        })
    }

    async fn change(&self, command: Command) -> Result<Response<pb::Tenant>, Status> {
        match self.core.write(command, true).await? {
            Outcome::Tenant(info) => Ok(Response::new(self.view(&info, now_ms())?)),
            other => Err(status::rejected(other)),
        }
    }

    fn set_state(&self, raw: &str, state: TenantState) -> Result<Command, Status> {
        Ok(Command::SetTenantState {
            tenant: tenant_id(raw)?,
            state,
        })
    }
}

#[tonic::async_trait]
impl pb::tenants_server::Tenants for TenantsService {
    async fn add(
        &self,
        request: Request<pb::TenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let tenant = tenant_id(&request.into_inner().tenant)?;
        self.change(Command::AddTenant { tenant }).await
    }

    async fn suspend(
        &self,
        request: Request<pb::TenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let command = self.set_state(&request.into_inner().tenant, TenantState::Suspended)?;
        self.change(command).await
    }

    async fn resume(
        &self,
        request: Request<pb::TenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let command = self.set_state(&request.into_inner().tenant, TenantState::Active)?;
        self.change(command).await
    }

    async fn show(
        &self,
        request: Request<pb::TenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let id = tenant_id(&request.into_inner().tenant)?;
        self.core.read_barrier(true, true).await?;
        let now = now_ms();
        if id.is_vendor() {
            return Ok(Response::new(self.vendor_view(now)?));
        }
        match self.core.reader.tenant(&id).map_err(status::storage)? {
            Some(info) => Ok(Response::new(self.view(&info, now)?)),
            None => Err(Status::not_found(format!(
                "unknown tenant {:?}",
                id.as_str()
            ))),
        }
    }

    async fn list(
        &self,
        request: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsReply>, Status> {
        let linearizable = request.into_inner().consistency != pb::ReadConsistency::Local as i32;
        let read_index = self.core.read_barrier(linearizable, true).await?;
        let now = now_ms();
        let tenants = self
            .core
            .reader
            .tenants()
            .map_err(status::storage)?
            .iter()
            .map(|t| self.view(t, now))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Response::new(pb::ListTenantsReply {
            tenants,
            vendor: Some(self.vendor_view(now)?),
            read_index,
            stale_after_s: self.core.mirror.stale_after_s,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: a namespace is stale when it never heard from its source or has been silent past
    // the bound, and fresh otherwise.
    #[test]
    fn staleness_follows_the_last_source_time() {
        let never = NamespaceStats::default();
        assert!(freshness(&never, 60, 1_000_000).stale);
        let recent = NamespaceStats {
            last_source_ms: 990_000,
            last_commit_ms: 995_000,
            ..Default::default()
        };
        let f = freshness(&recent, 60, 1_000_000);
        assert!(!f.stale);
        assert_eq!(f.silent_ms, 5_000);
        assert!(freshness(&recent, 60, 1_056_000).stale);
    }
}
