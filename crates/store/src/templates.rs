//! Templates and their aliases. The API syncs the templates the host has built into this table
//! at startup, so listings and sandbox records survive the backend being unavailable.

use crate::db::{self, OptionalExtension, Row, Sql, SqlExt, params};

use crate::{Result, Store, now_ms};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateRecord {
    pub id: String,
    /// Owning team; `None` for templates the host provides to every team.
    pub team_id: Option<String>,
    pub build_id: String,
    pub cpu_count: u32,
    pub memory_mb: u32,
    pub disk_size_mb: u32,
    pub envd_version: String,
    pub public: bool,
    pub aliases: Vec<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

impl TemplateRecord {
    #[cfg(test)]
    pub(crate) fn sample(id: &str, aliases: &[&str]) -> TemplateRecord {
        TemplateRecord {
            id: id.into(),
            team_id: None,
            build_id: "b1".into(),
            cpu_count: 2,
            memory_mb: 512,
            disk_size_mb: 1024,
            envd_version: "0.2.0".into(),
            public: true,
            aliases: aliases.iter().map(|a| a.to_string()).collect(),
            created_at: 1,
            updated_at: 1,
        }
    }
}

const COLUMNS: &str = "id, team_id, build_id, cpu_count, memory_mb, disk_size_mb, envd_version, \
                       public, created_at, updated_at";

fn row_to_template(r: &Row) -> db::Result<TemplateRecord> {
    Ok(TemplateRecord {
        id: r.get(0)?,
        team_id: r.get(1)?,
        build_id: r.get(2)?,
        cpu_count: r.get(3)?,
        memory_mb: r.get(4)?,
        disk_size_mb: r.get(5)?,
        envd_version: r.get(6)?,
        public: r.get(7)?,
        created_at: r.get(8)?,
        updated_at: r.get(9)?,
        aliases: Vec::new(),
    })
}

/// A template's aliases, in order.
fn aliases_of(conn: &dyn Sql, template_id: &str) -> db::Result<Vec<String>> {
    conn.query_map(
        "SELECT alias FROM template_aliases WHERE template_id = ?1 ORDER BY alias",
        params![template_id],
        |r| r.get(0),
    )
}

impl Store {
    /// Inserts or updates a template and replaces its aliases. An alias another template held
    /// moves to this one (the newest build of a name wins).
    pub fn upsert_template(&self, t: &TemplateRecord) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.begin()?;
        tx.execute(
            "INSERT INTO templates (id, team_id, build_id, cpu_count, memory_mb, disk_size_mb,
                 envd_version, public, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
             ON CONFLICT(id) DO UPDATE SET team_id = excluded.team_id,
                 build_id = excluded.build_id, cpu_count = excluded.cpu_count,
                 memory_mb = excluded.memory_mb, disk_size_mb = excluded.disk_size_mb,
                 envd_version = excluded.envd_version, public = excluded.public,
                 updated_at = ?11",
            params![
                t.id,
                t.team_id,
                t.build_id,
                t.cpu_count,
                t.memory_mb,
                t.disk_size_mb,
                t.envd_version,
                t.public,
                t.created_at,
                t.updated_at,
                now_ms()
            ],
        )?;
        tx.execute(
            "DELETE FROM template_aliases WHERE template_id = ?1",
            params![t.id],
        )?;
        for alias in &t.aliases {
            tx.execute(
                "INSERT INTO template_aliases (alias, template_id) VALUES (?1, ?2)
                 ON CONFLICT(alias) DO UPDATE SET template_id = excluded.template_id",
                params![alias, t.id],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// All templates visible to `team_id` (its own and the host's), with aliases.
    pub fn templates(&self, team_id: Option<&str>) -> Result<Vec<TemplateRecord>> {
        let conn = self.conn();
        let mut out = conn.query_map(
            &format!(
                "SELECT {COLUMNS} FROM templates
                 WHERE team_id IS NULL OR CAST(?1 AS TEXT) IS NULL OR team_id = CAST(?1 AS TEXT)
                 ORDER BY created_at, id"
            ),
            params![team_id],
            row_to_template,
        )?;
        for t in &mut out {
            t.aliases = aliases_of(&*conn, &t.id)?;
        }
        Ok(out)
    }

    /// The template named by id or alias.
    pub fn resolve_template(&self, id_or_alias: &str) -> Result<Option<TemplateRecord>> {
        let conn = self.conn();
        let t = conn
            .query_row(
                &format!(
                    "SELECT {COLUMNS} FROM templates WHERE id = ?1
                     OR id = (SELECT template_id FROM template_aliases WHERE alias = ?1)
                     ORDER BY id = ?1 DESC LIMIT 1"
                ),
                params![id_or_alias],
                row_to_template,
            )
            .optional()?;
        let Some(mut t) = t else { return Ok(None) };
        t.aliases = aliases_of(&*conn, &t.id)?;
        Ok(Some(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_resolve_and_move_to_the_newest_template() {
        let store = Store::open_in_memory().unwrap();
        store
            .upsert_template(&TemplateRecord::sample("t1", &["base", "py"]))
            .unwrap();
        assert_eq!(store.resolve_template("base").unwrap().unwrap().id, "t1");
        assert_eq!(
            store.resolve_template("t1").unwrap().unwrap().aliases,
            ["base", "py"]
        );
        assert!(store.resolve_template("nope").unwrap().is_none());

        store
            .upsert_template(&TemplateRecord::sample("t2", &["base"]))
            .unwrap();
        assert_eq!(store.resolve_template("base").unwrap().unwrap().id, "t2");
        let all = store.templates(None).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].aliases, ["py"]);
    }
}
