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
            self.audit_intent(intent).await?;
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

    /// An enterprise keeps a new version of a site's fleet template.
    pub async fn push_template(
        &self,
        caller: &Caller,
        req: pb::PushTemplateRequest,
    ) -> Result<pb::PushTemplateResponse, ApiError> {
        let receiver = self.fleet_receiver()?;
        let site = Self::parse_path("site", &req.site)?;
        self.allow(caller, Role::Admin, &site, "push a template")?;
        if !receiver.accepts(site.as_str()) {
            return Err(ApiError::BadArgument(format!(
                "site: {site} is not a site this enterprise accepts"
            )));
        }
        if req.plant_toml.len() + req.site_toml.len() > MAX_PLANT_BYTES {
            return Err(ApiError::BadArgument(format!(
                "plant_toml and site_toml: at most {MAX_PLANT_BYTES} bytes"
            )));
        }
        let by = Self::actor_name(caller, req.by, "pushes")?;
        let plant = ferrotwin_models::spec::PlantSpec::from_toml(&req.plant_toml, "template plant")
            .map_err(|e| ApiError::BadArgument(e.to_string()))?;
        let holds_only_it = plant.sites.len() == 1
            && plant.sites[0].name == site.name()
            && site
                .parent()
                .is_some_and(|p| p.as_str() == plant.enterprise);
        if !holds_only_it {
            return Err(ApiError::BadArgument(format!(
                "plant_toml: a template holds its own site only ({site})"
            )));
        }
        if !req.site_toml.is_empty() {
            crate::connections::parse_connections(&req.site_toml, None)
                .map_err(ApiError::BadArgument)?;
        }
        self.keep_template(caller, &site, req.plant_toml, req.site_toml, by, "push")
            .await
    }

    /// A site's template back to an earlier version (kept as a new version).
    pub async fn rollback_template(
        &self,
        caller: &Caller,
        req: pb::RollbackTemplateRequest,
    ) -> Result<pb::PushTemplateResponse, ApiError> {
        self.fleet_receiver()?;
        let site = Self::parse_path("site", &req.site)?;
        self.allow(caller, Role::Admin, &site, "roll a template back")?;
        let by = Self::actor_name(caller, req.by, "rolls back")?;
        let all = self.ctx.store.templates(site.as_str())?;
        let target = match req.to_version {
            0 => all.len().checked_sub(2).and_then(|i| all.get(i)),
            v => all.iter().find(|t| t.version == v),
        }
        .cloned()
        .ok_or_else(|| {
            ApiError::BadArgument(format!(
                "to_version: {site} has no such template version (kept: {})",
                all.iter()
                    .map(|t| t.version.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        self.keep_template(
            caller,
            &site,
            target.plant_toml,
            target.site_toml,
            by,
            "rollback",
        )
        .await
    }

    /// Every accepted site's template versions.
    pub async fn fleet_status(
        &self,
        caller: &Caller,
        _req: pb::FleetStatusRequest,
    ) -> Result<pb::FleetStatusResponse, ApiError> {
        let receiver = self.fleet_receiver()?;
        self.allow_root(caller, Role::Engineer, "read the fleet")?;
        Ok(pb::FleetStatusResponse {
            sites: receiver
                .fleet_status()
                .into_iter()
                .map(|(site, desired, applied, error, connected)| pb::SiteFleet {
                    site,
                    desired,
                    applied,
                    error,
                    connected,
                })
                .collect(),
        })
    }

    /// Keeps a template as `site`'s next version (unless it equals the newest), audited,
    /// and tells the site (its stream ends; its next hello gets it).
    async fn keep_template(
        &self,
        caller: &Caller,
        site: &ferrotwin_models::AssetPath,
        plant_toml: String,
        site_toml: String,
        by: String,
        what: &'static str,
    ) -> Result<pb::PushTemplateResponse, ApiError> {
        // One push at a time: each takes the next version number.
        let receiver = self.fleet_receiver()?;
        let _one = receiver.fleet_lock.lock().await;
        let store = self.ctx.store.clone();
        let newest = store.newest_template(site.as_str())?;
        if let Some(n) = &newest
            && n.plant_toml == plant_toml
            && n.site_toml == site_toml
        {
            return Ok(pb::PushTemplateResponse {
                version: n.version,
                new_version: false,
            });
        }
        let version = newest.map_or(1, |n| n.version + 1);
        let record = ferrotwin_proto::store::v1::SiteTemplateRecord {
            version,
            plant_toml,
            site_toml,
            pushed_us: ferrotwin_models::Timestamp::now().0,
            pushed_by: by,
        };
        let key = site.to_string();
        let kept = tokio::task::spawn_blocking(move || {
            store.put_template(
                &key,
                &record,
                crate::replication::enterprise::KEEP_TEMPLATES,
            )
        })
        .await
        .map_err(|e| ApiError::Unavailable(format!("fleet: {e}")))?
        .map_err(ApiError::from);
        self.audit_result(
            caller,
            "template",
            site.to_string(),
            format!("{what} v{version}"),
            &kept,
        );
        kept?;
        if let Some(r) = &self.enterprise {
            r.kick(site.as_str());
        }
        Ok(pb::PushTemplateResponse {
            version,
            new_version: true,
        })
    }

    fn fleet_receiver(
        &self,
    ) -> Result<&crate::replication::enterprise::EnterpriseReceiver, ApiError> {
        self.enterprise.as_deref().ok_or_else(|| {
            ApiError::BadArgument(
                "fleet templates are kept by an enterprise; this runtime is not one".into(),
            )
        })
    }

    fn applier(&self) -> Result<&crate::apply::Applier, ApiError> {
        self.applier
            .as_deref()
            .ok_or_else(|| ApiError::Unavailable("this runtime takes no live changes".into()))
    }
}
