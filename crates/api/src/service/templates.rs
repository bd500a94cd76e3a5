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

    pub async fn templates(&self, team_id: &str) -> Result<Vec<models::Template>, ApiError> {
        let team = team_id.to_owned();
        let list = self.db(move |s| s.templates(Some(&team))).await?;
        Ok(list.iter().map(template_view).collect())
    }

    pub async fn template(&self, id: &str) -> Result<models::TemplateWithBuilds, ApiError> {
        let t = self.resolve_template(id).await?;
        let view = template_view(&t);
        let build = models::TemplateBuild {
            build_id: view.build_id.clone(),
            status: "ready".into(),
            created_at: view.created_at.clone(),
            updated_at: view.updated_at.clone(),
            cpu_count: t.cpu_count,
            memory_mb: t.memory_mb,
            disk_size_mb: t.disk_size_mb,
            envd_version: t.envd_version.clone(),
        };
        Ok(models::TemplateWithBuilds {
            template: view,
            builds: vec![build],
        })
    }

    pub async fn template_alias(
        &self,
        alias: &str,
    ) -> Result<models::TemplateAliasResponse, ApiError> {
        let t = self.resolve_template(alias).await?;
        Ok(models::TemplateAliasResponse {
            template_id: t.id,
            public: t.public,
        })
    }
}

fn template_view(t: &TemplateRecord) -> models::Template {
    models::Template {
        template_id: t.id.clone(),
        build_id: build_uuid(&t.build_id),
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
        build_count: 1,
        envd_version: t.envd_version.clone(),
        build_status: "ready".into(),
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
