//! The plant itself as the API serves it: which version runs, and a changed plant applied
//! live (`apply`). Roles: reading the plant needs engineer on the root (the spec reveals the
//! whole plant), a dry run too; an apply needs admin there. An apply is on the audit log
//! before it changes anything, and its result after.

use ferrotwin_proto::v1 as pb;

use super::{ApiError, AuditEntry, TwinApi};
use crate::apply::ApplyRequest;
use crate::security::{Caller, Role};

/// Longest plant text an apply takes (the gRPC request limit is 4 MiB).
pub const MAX_PLANT_BYTES: usize = 4 << 20;

impl TwinApi {
    /// The plant this runtime runs.
    pub async fn plant(
        &self,
        caller: &Caller,
        req: pb::GetPlantRequest,
    ) -> Result<pb::PlantVersion, ApiError> {
        self.allow_root(caller, Role::Engineer, "read the plant")?;
        let applier = self.applier()?;
        let v = applier.current();
        Ok(pb::PlantVersion {
            version: v.version,
            applied_us: v.applied.0,
            applied_by: v.applied_by.clone(),
            plant_toml: if req.with_spec {
                v.spec.to_toml()
            } else {
                String::new()
            },
            assets: v.assets.len() as u64,
        })
    }

    /// Plans a changed plant against the running one and, unless `dry_run`, applies it.
    pub async fn apply_plant(
        &self,
        caller: &Caller,
        req: pb::ApplyPlantRequest,
    ) -> Result<pb::ApplyPlantResponse, ApiError> {
        let role = if req.dry_run {
            Role::Engineer
        } else {
            Role::Admin
        };
        self.allow_root(caller, role, "apply a plant")?;
        if req.plant_toml.len() + req.site_toml.len() > MAX_PLANT_BYTES {
            return Err(ApiError::BadArgument(format!(
                "plant_toml and site_toml: {} bytes, at most {MAX_PLANT_BYTES}",
                req.plant_toml.len() + req.site_toml.len()
            )));
        }
        let by = Self::actor_name(caller, req.by, "applies")?;
        self.applier()?;
        let audited = !req.dry_run;
        if audited {
            // On record before anything changes, or it does not happen.
            let intent = AuditEntry {
                subject: caller.name().to_owned(),
                source: caller.source(),
                action: "apply",
                target: "plant".into(),
                value: format!("against v{}", req.base_version),
                result: "requested".into(),
            };
            let store = self.ctx.store.clone();
            tokio::task::spawn_blocking(move || store.audit().append(intent, true))
                .await
                .map_err(|e| ApiError::Unavailable(format!("audit: {e}")))?
                .map_err(|e| {
                    ApiError::Unavailable(format!(
                        "apply refused: its audit record cannot be written ({e})"
                    ))
                })?;
        }
        let base = req.base_version;
        let request = ApplyRequest {
            plant_toml: req.plant_toml,
            base_version: req.base_version,
            dry_run: req.dry_run,
            by,
            site_toml: (!req.site_toml.is_empty()).then_some(req.site_toml),
        };
        // In a task of its own: a client that goes away (Ctrl-C, a deadline) must not cut an
        // apply short between its record and its last twin, nor lose its audit result.
        let (api, caller) = (self.clone(), caller.clone());
        let outcome = tokio::spawn(async move {
            let outcome = api.applier()?.apply(request).await.map_err(ApiError::from);
            if audited {
                let value = match &outcome {
                    Ok(o) if o.applied => format!(
                        "v{base} → v{}: {}; connections +{} ~{} −{}",
                        o.version,
                        o.summary,
                        o.connections.added.len(),
                        o.connections.changed.len(),
                        o.connections.removed.len()
                    ),
                    Ok(_) => format!("v{base}: nothing changed"),
                    Err(_) => format!("against v{base}"),
                };
                api.audit_result(&caller, "apply", "plant".into(), value, &outcome);
            }
            outcome
        })
        .await
        .map_err(|e| ApiError::Unavailable(format!("apply: {e}")))?;
        let o = outcome?;
        Ok(pb::ApplyPlantResponse {
            version: o.version,
            applied: o.applied,
            changes: o
                .changes
                .into_iter()
                .map(|c| pb::PlantChange {
                    path: c.path.to_string(),
                    op: c.op.as_str().to_owned(),
                    detail: c.detail,
                })
                .collect(),
            changes_total: o.changes_total as u64,
            summary: o.summary,
            warnings: o.warnings,
            connections: [
                (o.connections.added, "added"),
                (o.connections.changed, "changed"),
                (o.connections.removed, "removed"),
            ]
            .into_iter()
            .flat_map(|(names, op)| {
                names.into_iter().map(move |name| pb::ConnectionChange {
                    name,
                    op: op.to_owned(),
                })
            })
            .collect(),
        })
    }

    fn applier(&self) -> Result<&crate::apply::Applier, ApiError> {
        self.applier
            .as_deref()
            .ok_or_else(|| ApiError::Unavailable("this runtime takes no live changes".into()))
    }
}
