//! Templates: the backend's templates copied into the store, and resolving ids and aliases.

use alcove_store::{TemplateRecord, now_ms};

use super::Service;
use crate::backend::{BackendError, BackendOp};
use crate::error::{ApiError, chain};
use crate::models::{self, rfc3339};

impl Service {
    /// Copies the backend's templates into the store. Returns how many it has.
    pub async fn sync_templates(&self) -> Result<usize, BackendError> {
        let templates = self
            .call(BackendOp::Templates, "", self.backend.templates())
            .await?;
        let n = templates.len();
        let now = now_ms();
        let records: Vec<TemplateRecord> = templates
            .into_iter()
            .map(|t| TemplateRecord {
                id: t.template_id,
                team_id: None,
                build_id: t.build_id,
                cpu_count: t.cpu_count,
                memory_mb: t.memory_mb,
                disk_size_mb: t.disk_size_mb,
                envd_version: t.envd_version,
                public: true,
                aliases: t.aliases,
                created_at: now,
                updated_at: now,
            })
            .collect();
        let res = self
            .db(move |s| {
                for r in &records {
                    s.upsert_template(r)?;
                }
                Ok(())
            })
            .await;
        if let Err(e) = res {
            tracing::error!(error = %chain(&e), "storing templates failed");
        }
        Ok(n)
    }

    /// Resolves a template by id or alias, asking the backend once more if the store does not
    /// know it (a template built since the last sync).
    pub(super) async fn resolve_template(&self, name: &str) -> Result<TemplateRecord, ApiError> {
        let n = name.to_owned();
        if let Some(t) = self.db(move |s| s.resolve_template(&n)).await? {
            return Ok(t);
        }
        if let Err(e) = self.sync_templates().await {
            tracing::warn!(error = %chain(&e), "template sync failed");
        }
        let n = name.to_owned();
        self.db(move |s| s.resolve_template(&n))
            .await?
            .ok_or_else(|| ApiError::TemplateNotFound {
                template: name.to_owned(),
            })
    }

    /// The host's templates and the team's own, each with its newest build's status.
    pub async fn templates(&self, team_id: &str) -> Result<Vec<models::Template>, ApiError> {
        let team = team_id.to_owned();
        let list = self
            .db(move |s| {
                let mut out = Vec::new();
                for t in s.templates(Some(&team))? {
                    let builds = match t.team_id {
                        Some(_) => s.builds_of_template(&t.id)?,
                        None => Vec::new(),
                    };
                    out.push((t, builds));
                }
                Ok(out)
            })
            .await?;
        Ok(list.iter().map(|(t, b)| template_view(t, b)).collect())
    }

    /// A template the team can see (the host's, its own, or a public one), with its builds.
    pub async fn template(
        &self,
        team_id: &str,
        id: &str,
    ) -> Result<models::TemplateWithBuilds, ApiError> {
        let t = self.resolve_template(id).await?;
        if t.team_id.as_deref().is_some_and(|o| o != team_id) && !t.public {
            return Err(ApiError::TemplateNotFound {
                template: id.to_owned(),
            });
        }
        let tid = t.id.clone();
        let records = match t.team_id {
            Some(_) => self.db(move |s| s.builds_of_template(&tid)).await?,
            None => Vec::new(),
        };
        let view = template_view(&t, &records);
        let builds = if records.is_empty() {
            vec![models::TemplateBuild {
                build_id: view.build_id.clone(),
                status: "ready".into(),
                created_at: view.created_at.clone(),
                updated_at: view.updated_at.clone(),
                finished_at: Some(view.updated_at.clone()),
                cpu_count: t.cpu_count,
                memory_mb: t.memory_mb,
                disk_size_mb: t.disk_size_mb,
                envd_version: t.envd_version.clone(),
            }]
        } else {
            records
                .iter()
                .map(|b| models::TemplateBuild {
                    build_id: b.id.clone(),
                    status: b.status.to_string(),
                    created_at: rfc3339(b.created_at),
                    updated_at: rfc3339(b.updated_at),
                    finished_at: b.finished_at.map(rfc3339),
                    cpu_count: b.cpu_count,
                    memory_mb: b.memory_mb,
                    disk_size_mb: b.disk_size_mb,
                    envd_version: t.envd_version.clone(),
                })
                .collect()
        };
        Ok(models::TemplateWithBuilds {
            template: view,
            builds,
        })
    }

    /// `GET /templates/aliases/{alias}`: 403 when another team owns the name (the SDKs read
    /// that as "exists, not yours").
    pub async fn template_alias(
        &self,
        team_id: &str,
        alias: &str,
    ) -> Result<models::TemplateAliasResponse, ApiError> {
        let t = self.resolve_template(alias).await?;
        if t.team_id.as_deref().is_some_and(|o| o != team_id) && !t.public {
            return Err(ApiError::TemplateNotOwned {
                template: alias.to_owned(),
            });
        }
        Ok(models::TemplateAliasResponse {
            template_id: t.id,
            public: t.public,
        })
    }
}

/// E2B's view of a template; `builds` (newest first) are a team template's, empty for the host's.
fn template_view(t: &TemplateRecord, builds: &[alcove_store::BuildRecord]) -> models::Template {
    let (build_id, status) = match builds.first() {
        // A team template: its current (newest ready) build, else its newest build.
        Some(newest) => (
            if t.build_id.is_empty() {
                newest.id.clone()
            } else {
                t.build_id.clone()
            },
            newest.status.to_string(),
        ),
        None => (build_uuid(&t.build_id), "ready".into()),
    };
    models::Template {
        template_id: t.id.clone(),
        build_id,
        cpu_count: t.cpu_count,
        memory_mb: t.memory_mb,
        disk_size_mb: t.disk_size_mb,
        public: t.public,
        aliases: t.aliases.clone(),
        names: t.aliases.clone(),
        created_at: rfc3339(t.created_at),
        updated_at: rfc3339(t.updated_at),
        created_by: None,
        last_spawned_at: None,
        spawn_count: 0,
        build_count: builds.len().max(1) as u64,
        envd_version: t.envd_version.clone(),
        build_status: status,
    }
}

/// The SDK parses build ids as UUIDs; a backend build id that is not one (e.g. a content hash)
/// is mapped to a stable UUID derived from it.
fn build_uuid(build_id: &str) -> String {
    if let Ok(u) = uuid::Uuid::parse_str(build_id) {
        return u.to_string();
    }
    use sha2::Digest;
    let d = sha2::Sha256::digest(build_id.as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    uuid::Builder::from_random_bytes(b).into_uuid().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_ids_become_uuids() {
        let u = "0b6f3a1e-1111-4222-8333-444455556666";
        assert_eq!(build_uuid(u), u);
        let h = build_uuid("sha256-abc");
        assert!(uuid::Uuid::parse_str(&h).is_ok());
        assert_eq!(h, build_uuid("sha256-abc"));
    }
}
