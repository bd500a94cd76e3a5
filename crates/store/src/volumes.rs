//! E2B's volumes: a team's named, persistent directories, and which sandboxes mount them.
//!
//! The store keeps only the registry: a volume's id (`vol_…`, chosen by the API), its team, its
//! name (unique in the team, compared as given) and when it was made; the files live in the
//! volume's directory, which the API creates and removes around these calls. A sandbox's mounts
//! are written with the sandbox in one transaction ([`crate::Store::insert_sandbox_with_mounts`])
//! after checking, in that transaction, that every volume is still the team's; deleting a volume
//! checks, in its own transaction, that no sandbox that is not killed (creating, running or
//! paused) mounts it. SQLite serialises the two, so a volume is never deleted under a sandbox
//! that mounts it. Mount rows outlive the volume (no foreign key), so a killed sandbox's record
//! still shows what it mounted.
//!
//! Callers: the API's volumes service (CRUD, the content API's lookups) and its sandbox create.

use crate::db::{OptionalExtension, Row, Sql, SqlExt, params};

use crate::{Result, Store, StoreError};

/// A volume as the registry holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRecord {
    /// `vol_` and hex.
    pub id: String,
    pub team_id: String,
    pub name: String,
    pub created_at: i64,
}

/// One volume mounted in a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMount {
    pub volume_id: String,
    /// The volume's name when the sandbox was created.
    pub name: String,
    /// Absolute path in the guest.
    pub path: String,
}

const COLUMNS: &str = "id, team_id, name, created_at";

fn row(r: &Row) -> crate::db::Result<VolumeRecord> {
    Ok(VolumeRecord {
        id: r.get(0)?,
        team_id: r.get(1)?,
        name: r.get(2)?,
        created_at: r.get(3)?,
    })
}

/// The mounts of one sandbox, in the order they were asked for.
/// The volume mounts of the sandboxes whose ids are the parameters `refs` (`marks`:
/// `?1,?2,…` for them), by sandbox, each sandbox's in mount order.
pub(crate) fn mounts_of(
    conn: &dyn Sql,
    marks: &str,
    refs: &[&dyn crate::db::ToValue],
) -> crate::db::Result<std::collections::HashMap<String, Vec<VolumeMount>>> {
    let mut out: std::collections::HashMap<String, Vec<VolumeMount>> = Default::default();
    for (id, m) in conn.query_map(
        &format!(
            "SELECT sandbox_id, volume_id, name, path FROM sandbox_volumes
             WHERE sandbox_id IN ({marks}) ORDER BY sandbox_id, seq"
        ),
        refs,
        |r| {
            Ok((
                r.get::<String>(0)?,
                VolumeMount {
                    volume_id: r.get(1)?,
                    name: r.get(2)?,
                    path: r.get(3)?,
                },
            ))
        },
    )? {
        out.entry(id).or_default().push(m);
    }
    Ok(out)
}

/// Refuses mounts of volumes the team does not have (any more).
pub(crate) fn check_mountable(tx: &dyn Sql, team_id: &str, mounts: &[VolumeMount]) -> Result<()> {
    for m in mounts {
        let found: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM volumes WHERE id = ?1 AND team_id = ?2)",
            params![m.volume_id, team_id],
            |r| r.get(0),
        )?;
        if !found {
            return Err(StoreError::MountedVolumeMissing {
                name: m.name.clone(),
            });
        }
    }
    Ok(())
}

pub(crate) fn insert_mounts(tx: &dyn Sql, sandbox_id: &str, mounts: &[VolumeMount]) -> Result<()> {
    for (seq, m) in mounts.iter().enumerate() {
        tx.execute(
            "INSERT INTO sandbox_volumes (sandbox_id, path, volume_id, name, seq)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![sandbox_id, m.path, m.volume_id, m.name, seq as i64],
        )?;
    }
    Ok(())
}

impl Store {
    /// Registers a new volume. Refused with [`StoreError::VolumeNameTaken`] when the team has
    /// a volume of that name, and with [`StoreError::VolumeLimit`] when it already has
    /// `max_per_team`.
    pub fn insert_volume(&self, rec: &VolumeRecord, max_per_team: usize) -> Result<VolumeRecord> {
        let mut conn = self.conn();
        let tx = conn.begin()?;
        let taken: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM volumes WHERE team_id = ?1 AND name = ?2)",
            params![rec.team_id, rec.name],
            |r| r.get(0),
        )?;
        if taken {
            return Err(StoreError::VolumeNameTaken);
        }
        let count: i64 = tx.query_row(
            "SELECT COUNT(*) FROM volumes WHERE team_id = ?1",
            params![rec.team_id],
            |r| r.get(0),
        )?;
        if count as usize >= max_per_team {
            return Err(StoreError::VolumeLimit {
                limit: max_per_team,
            });
        }
        tx.execute(
            &format!("INSERT INTO volumes ({COLUMNS}) VALUES (?1, ?2, ?3, ?4)"),
            params![rec.id, rec.team_id, rec.name, rec.created_at],
        )?;
        tx.commit()?;
        Ok(rec.clone())
    }

    /// A volume by id, whatever its team (the content API authenticates by the volume's own
    /// token, then asks this).
    pub fn volume(&self, volume_id: &str) -> Result<Option<VolumeRecord>> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {COLUMNS} FROM volumes WHERE id = ?1"),
                params![volume_id],
                row,
            )
            .optional()?)
    }

    /// A team's volume by id.
    pub fn team_volume(&self, team_id: &str, volume_id: &str) -> Result<Option<VolumeRecord>> {
        Ok(self.volume(volume_id)?.filter(|v| v.team_id == team_id))
    }

    /// A team's volume by name.
    pub fn volume_by_name(&self, team_id: &str, name: &str) -> Result<Option<VolumeRecord>> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {COLUMNS} FROM volumes WHERE team_id = ?1 AND name = ?2"),
                params![team_id, name],
                row,
            )
            .optional()?)
    }

    /// A team's volumes in name order.
    pub fn volumes_of_team(&self, team_id: &str) -> Result<Vec<VolumeRecord>> {
        Ok(self.conn().query_map(
            &format!("SELECT {COLUMNS} FROM volumes WHERE team_id = ?1 ORDER BY name"),
            params![team_id],
            row,
        )?)
    }

    /// The sandboxes that are not killed (creating, running or paused) and mount the volume,
    /// oldest first.
    pub fn volume_users(&self, volume_id: &str) -> Result<Vec<String>> {
        users(&*self.conn(), volume_id)
    }

    /// Unregisters a team's volume, unless a sandbox that is not killed mounts it
    /// ([`StoreError::VolumeInUse`], naming them). The caller removes its directory after.
    pub fn delete_volume(&self, team_id: &str, volume_id: &str) -> Result<VolumeRecord> {
        let mut conn = self.conn();
        let tx = conn.begin()?;
        let rec = tx
            .query_row(
                &format!("SELECT {COLUMNS} FROM volumes WHERE id = ?1 AND team_id = ?2"),
                params![volume_id, team_id],
                row,
            )
            .optional()?
            .ok_or(StoreError::VolumeNotFound)?;
        let sandboxes = users(&tx, volume_id)?;
        if !sandboxes.is_empty() {
            return Err(StoreError::VolumeInUse { sandboxes });
        }
        tx.execute("DELETE FROM volumes WHERE id = ?1", params![volume_id])?;
        crate::metering::on_volume_deleted(&tx, volume_id, crate::now_ms())?;
        tx.commit()?;
        Ok(rec)
    }

    /// Teams that have at least one volume.
    pub fn teams_with_volumes(&self) -> Result<Vec<String>> {
        Ok(self.conn().query_map(
            "SELECT DISTINCT team_id FROM volumes ORDER BY 1",
            params![],
            |r| r.get(0),
        )?)
    }
}

fn users(conn: &dyn Sql, volume_id: &str) -> Result<Vec<String>> {
    Ok(conn.query_map(
        "SELECT s.id FROM sandbox_volumes v JOIN sandboxes s ON s.id = v.sandbox_id
         WHERE v.volume_id = ?1 AND s.state IN ('creating', 'running', 'paused')
         ORDER BY s.created_at, s.id",
        params![volume_id],
        |r| r.get(0),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{NewSandboxRecord, SandboxState, TemplateRecord};

    fn vol(id: &str, team: &str, name: &str) -> VolumeRecord {
        VolumeRecord {
            id: id.into(),
            team_id: team.into(),
            name: name.into(),
            created_at: 1,
        }
    }

    fn mount(id: &str, name: &str, path: &str) -> VolumeMount {
        VolumeMount {
            volume_id: id.into(),
            name: name.into(),
            path: path.into(),
        }
    }

    #[test]
    fn volumes_are_found_within_their_team_and_names_are_unique_per_team() {
        let store = Store::open_in_memory().unwrap();
        let team = store.create_team("t").unwrap().id;
        let other = store.create_team("o").unwrap().id;
        let made = store
            .insert_volume(&vol("vol_1", &team, "data"), 10)
            .unwrap();
        assert_eq!(store.volume("vol_1").unwrap().unwrap(), made);
        assert_eq!(store.team_volume(&team, "vol_1").unwrap().unwrap(), made);
        assert!(store.team_volume(&other, "vol_1").unwrap().is_none());
        assert_eq!(store.volume_by_name(&team, "data").unwrap().unwrap(), made);
        assert!(store.volume_by_name(&other, "data").unwrap().is_none());
        assert!(
            store.volume_by_name(&team, "Data").unwrap().is_none(),
            "names compare as given"
        );
        assert!(matches!(
            store.insert_volume(&vol("vol_2", &team, "data"), 10),
            Err(StoreError::VolumeNameTaken)
        ));
        store
            .insert_volume(&vol("vol_3", &other, "data"), 10)
            .unwrap();
        store
            .insert_volume(&vol("vol_4", &team, "alpha"), 10)
            .unwrap();
        let names: Vec<_> = store
            .volumes_of_team(&team)
            .unwrap()
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(names, ["alpha", "data"]);
    }

    #[test]
    fn a_team_is_capped() {
        let store = Store::open_in_memory().unwrap();
        let team = store.create_team("t").unwrap().id;
        store.insert_volume(&vol("vol_1", &team, "a"), 2).unwrap();
        store.insert_volume(&vol("vol_2", &team, "b"), 2).unwrap();
        assert!(matches!(
            store.insert_volume(&vol("vol_3", &team, "c"), 2),
            Err(StoreError::VolumeLimit { limit: 2 })
        ));
        store.delete_volume(&team, "vol_1").unwrap();
        store.insert_volume(&vol("vol_3", &team, "c"), 2).unwrap();
    }

    #[test]
    fn a_mounted_volume_is_not_deleted_until_its_sandboxes_are_killed() {
        let store = Store::open_in_memory().unwrap();
        let team = store.create_team("t").unwrap().id;
        let other = store.create_team("o").unwrap().id;
        store
            .upsert_template(&TemplateRecord::sample("tpl1", &["base"]))
            .unwrap();
        store
            .insert_volume(&vol("vol_1", &team, "data"), 10)
            .unwrap();
        store
            .insert_volume(&vol("vol_2", &team, "logs"), 10)
            .unwrap();
        let mounts = [
            mount("vol_2", "logs", "/var/log/app"),
            mount("vol_1", "data", "/data"),
        ];
        store
            .insert_sandbox_with_mounts(&NewSandboxRecord::sample("sbx1", &team, "tpl1"), &mounts)
            .unwrap();
        store
            .insert_sandbox_with_mounts(
                &NewSandboxRecord::sample("sbx2", &team, "tpl1"),
                &mounts[1..],
            )
            .unwrap();
        let rec = store.sandbox("sbx1").unwrap().unwrap();
        assert_eq!(rec.volume_mounts, mounts, "in the order asked for");
        assert!(store.sandbox("sbx2").unwrap().unwrap().volume_mounts.len() == 1);
        assert!(matches!(
            store.delete_volume(&other, "vol_1"),
            Err(StoreError::VolumeNotFound)
        ));
        match store.delete_volume(&team, "vol_1") {
            Err(StoreError::VolumeInUse { sandboxes }) => assert_eq!(sandboxes, ["sbx1", "sbx2"]),
            other => panic!("{other:?}"),
        }
        store
            .transition("sbx1", SandboxState::Running, "started")
            .unwrap();
        store
            .transition("sbx1", SandboxState::Paused, "paused")
            .unwrap();
        store
            .transition("sbx2", SandboxState::Killed, "killed")
            .unwrap();
        assert_eq!(
            store.volume_users("vol_1").unwrap(),
            ["sbx1"],
            "paused still counts"
        );
        store
            .transition("sbx1", SandboxState::Killed, "killed")
            .unwrap();
        assert!(store.volume_users("vol_1").unwrap().is_empty());
        assert_eq!(store.delete_volume(&team, "vol_1").unwrap().name, "data");
        assert!(store.volume("vol_1").unwrap().is_none());
        // The killed sandbox still shows what it mounted.
        assert_eq!(
            store.sandbox("sbx1").unwrap().unwrap().volume_mounts.len(),
            2
        );
        // A mount of a volume that is gone (or another team's) is refused with its name, and
        // nothing is recorded.
        for (t, m) in [
            (&team, mount("vol_1", "data", "/data")),
            (&other, mount("vol_2", "logs", "/logs")),
        ] {
            match store.insert_sandbox_with_mounts(
                &NewSandboxRecord::sample("sbx3", t, "tpl1"),
                std::slice::from_ref(&m),
            ) {
                Err(StoreError::MountedVolumeMissing { name }) => assert_eq!(name, m.name),
                other => panic!("{other:?}"),
            }
            assert!(store.sandbox("sbx3").unwrap().is_none());
        }
    }
}
