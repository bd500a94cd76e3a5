//! `Idempotency-Key` on sandbox creates: one key names one create per team for
//! [`IDEMPOTENCY_TTL_MS`]. A create claims its key before it starts, so a second request with the
//! same key (an SDK retry, a client that lost the answer) finds the claim instead of starting a
//! second sandbox, and the claim names the sandbox once it exists.

use crate::db::{OptionalExtension, Sql, SqlExt, params};
use crate::{Result, Store};

/// How long a key names its create (E2B's and the payment APIs' 24 h).
pub const IDEMPOTENCY_TTL_MS: i64 = 24 * 3600 * 1000;
/// A claim without a sandbox older than this belongs to a create that can no longer finish
/// (the server stopped during it): it is given up and the key can be used again.
pub const ABANDONED_CLAIM_MS: i64 = 15 * 60 * 1000;

/// What claiming a key found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The key is this request's: create, then [`Store::idempotency_done`] or
    /// [`Store::idempotency_release`].
    Claimed,
    /// Another request holds the key. `sandbox_id` is `None` while its create runs.
    Held {
        body_hash: String,
        sandbox_id: Option<String>,
    },
}

impl Store {
    /// Claims `key` for `team_id`'s create with a body whose hash is `body_hash`, or says who
    /// holds it. Expired keys and abandoned claims are dropped first.
    pub fn idempotency_claim(
        &self,
        team_id: &str,
        key: &str,
        body_hash: &str,
        now: i64,
    ) -> Result<Claim> {
        let mut conn = self.conn();
        let tx = conn.begin()?;
        tx.execute(
            "DELETE FROM idempotency_keys WHERE created_at < ?1
                OR (sandbox_id IS NULL AND created_at < ?2)",
            params![now - IDEMPOTENCY_TTL_MS, now - ABANDONED_CLAIM_MS],
        )?;
        let held = tx
            .query_row(
                "SELECT body_hash, sandbox_id FROM idempotency_keys WHERE team_id = ?1 AND key = ?2",
                params![team_id, key],
                |r| {
                    Ok(Claim::Held {
                        body_hash: r.get(0)?,
                        sandbox_id: r.get(1)?,
                    })
                },
            )
            .optional()?;
        let claim = match held {
            Some(h) => h,
            None => {
                tx.execute(
                    "INSERT INTO idempotency_keys (team_id, key, body_hash, created_at)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![team_id, key, body_hash, now],
                )?;
                Claim::Claimed
            }
        };
        tx.commit()?;
        Ok(claim)
    }

    /// The claimed create made `sandbox_id`.
    pub fn idempotency_done(&self, team_id: &str, key: &str, sandbox_id: &str) -> Result<()> {
        self.conn().execute(
            "UPDATE idempotency_keys SET sandbox_id = ?3 WHERE team_id = ?1 AND key = ?2",
            params![team_id, key, sandbox_id],
        )?;
        Ok(())
    }

    /// The claimed create failed: the key is free again (a retry may succeed).
    pub fn idempotency_release(&self, team_id: &str, key: &str) -> Result<()> {
        self.conn().execute(
            "DELETE FROM idempotency_keys WHERE team_id = ?1 AND key = ?2 AND sandbox_id IS NULL",
            params![team_id, key],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_claimed_once_names_its_sandbox_and_expires() {
        let store = Store::open_in_memory().unwrap();
        let t = store.create_team("a").unwrap().id;
        let u = store.create_team("b").unwrap().id;
        let now = 1_000_000_000;
        assert_eq!(
            store.idempotency_claim(&t, "k", "h1", now).unwrap(),
            Claim::Claimed
        );
        // Another team's key of the same name is its own.
        assert_eq!(
            store.idempotency_claim(&u, "k", "h1", now).unwrap(),
            Claim::Claimed
        );
        let held = Claim::Held {
            body_hash: "h1".into(),
            sandbox_id: None,
        };
        assert_eq!(
            store.idempotency_claim(&t, "k", "h2", now + 1).unwrap(),
            held
        );
        store.idempotency_done(&t, "k", "sbx1").unwrap();
        let done = Claim::Held {
            body_hash: "h1".into(),
            sandbox_id: Some("sbx1".into()),
        };
        // Done claims outlive the abandonment limit, not the 24 h.
        let later = now + ABANDONED_CLAIM_MS + 1;
        assert_eq!(store.idempotency_claim(&t, "k", "h1", later).unwrap(), done);
        store.idempotency_release(&t, "k").unwrap();
        assert_eq!(store.idempotency_claim(&t, "k", "h1", later).unwrap(), done);
        let expired = now + IDEMPOTENCY_TTL_MS + 1;
        assert_eq!(
            store.idempotency_claim(&t, "k", "h3", expired).unwrap(),
            Claim::Claimed
        );
    }

    #[test]
    fn a_failed_or_abandoned_create_frees_its_key() {
        let store = Store::open_in_memory().unwrap();
        let t = store.create_team("a").unwrap().id;
        let now = 1_000_000_000;
        assert_eq!(
            store.idempotency_claim(&t, "k", "h", now).unwrap(),
            Claim::Claimed
        );
        store.idempotency_release(&t, "k").unwrap();
        assert_eq!(
            store.idempotency_claim(&t, "k", "h", now).unwrap(),
            Claim::Claimed
        );
        let later = now + ABANDONED_CLAIM_MS + 1;
        assert_eq!(
            store.idempotency_claim(&t, "k", "h", later).unwrap(),
            Claim::Claimed
        );
    }
}
