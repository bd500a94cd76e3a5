//! Dashboard sign-ins. Signing in with an API key opens a session: a random token goes to the
//! browser in a cookie, and only its SHA-256 is stored, with the team, the key it was opened
//! with, a CSRF token for the session's forms, and an expiry. A session ends when it expires,
//! when its key is revoked, or on sign-out; [`Store::dashboard_session`] says which.

use crate::db::{OptionalExtension, Sql, SqlExt, params};

use crate::keys::{hash_secret, random_hex};
use crate::{Result, Store, now_ms};

/// An open session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DashboardSession {
    pub team_id: String,
    pub key_id: String,
    /// Every state-changing form of this session carries it.
    pub csrf: String,
    pub expires_at: i64,
}

/// What a presented session token is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionState {
    Open(DashboardSession),
    /// Past its expiry (then forgotten).
    Expired,
    /// Its API key was revoked (then forgotten).
    KeyRevoked,
    /// Never issued, signed out, or forgotten.
    Unknown,
}

impl Store {
    /// Opens a session for a key that has just authenticated; answers the cookie's token (the
    /// only copy) and the session.
    pub fn open_dashboard_session(
        &self,
        team_id: &str,
        key_id: &str,
        ttl_ms: i64,
    ) -> Result<(String, DashboardSession)> {
        let token = random_hex(32);
        let now = now_ms();
        let session = DashboardSession {
            team_id: team_id.to_owned(),
            key_id: key_id.to_owned(),
            csrf: random_hex(32),
            expires_at: now + ttl_ms,
        };
        let conn = self.conn();
        // Forget sessions long gone on the way.
        conn.execute(
            "DELETE FROM dashboard_sessions WHERE expires_at < ?1",
            params![now],
        )?;
        conn.execute(
            "INSERT INTO dashboard_sessions (token_hash, team_id, key_id, csrf, created_at, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                hash_secret(&token),
                session.team_id,
                session.key_id,
                session.csrf,
                now,
                session.expires_at
            ],
        )?;
        Ok((token, session))
    }

    /// The session a cookie's token names, checked against its expiry and its key.
    pub fn dashboard_session(&self, token: &str) -> Result<SessionState> {
        let hash = hash_secret(token);
        let conn = self.conn();
        let row = conn
            .query_row(
                "SELECT s.team_id, s.key_id, s.csrf, s.expires_at, k.revoked_at
                 FROM dashboard_sessions s LEFT JOIN api_keys k ON k.id = s.key_id
                 WHERE s.token_hash = ?1",
                params![hash],
                |r| {
                    Ok((
                        DashboardSession {
                            team_id: r.get(0)?,
                            key_id: r.get(1)?,
                            csrf: r.get(2)?,
                            expires_at: r.get(3)?,
                        },
                        r.get::<Option<i64>>(4)?,
                    ))
                },
            )
            .optional()?;
        let Some((session, revoked_at)) = row else {
            return Ok(SessionState::Unknown);
        };
        let state = if revoked_at.is_some() {
            SessionState::KeyRevoked
        } else if session.expires_at <= now_ms() {
            SessionState::Expired
        } else {
            return Ok(SessionState::Open(session));
        };
        conn.execute(
            "DELETE FROM dashboard_sessions WHERE token_hash = ?1",
            params![hash],
        )?;
        Ok(state)
    }

    /// Signs a session out; true if it was open.
    pub fn close_dashboard_session(&self, token: &str) -> Result<bool> {
        Ok(self.conn().execute(
            "DELETE FROM dashboard_sessions WHERE token_hash = ?1",
            params![hash_secret(token)],
        )? > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_with_key() -> (tempfile::TempDir, Store, String, String) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join(crate::DB_FILE)).unwrap();
        let team = store.create_team("t").unwrap();
        let key = store.create_api_key(&team.id, "k").unwrap();
        (dir, store, team.id, key.info.id)
    }

    #[test]
    fn a_session_opens_and_signs_out() {
        let (_d, store, team, key) = store_with_key();
        let (token, s) = store.open_dashboard_session(&team, &key, 60_000).unwrap();
        assert_eq!(
            store.dashboard_session(&token).unwrap(),
            SessionState::Open(s.clone())
        );
        assert_ne!(token, s.csrf);
        assert_eq!(
            store.dashboard_session("nope").unwrap(),
            SessionState::Unknown
        );
        assert!(store.close_dashboard_session(&token).unwrap());
        assert_eq!(
            store.dashboard_session(&token).unwrap(),
            SessionState::Unknown
        );
    }

    #[test]
    fn expiry_and_a_revoked_key_end_a_session_once() {
        let (_d, store, team, key) = store_with_key();
        let (old, _) = store.open_dashboard_session(&team, &key, -1).unwrap();
        assert_eq!(
            store.dashboard_session(&old).unwrap(),
            SessionState::Expired
        );
        assert_eq!(
            store.dashboard_session(&old).unwrap(),
            SessionState::Unknown
        );
        let (token, _) = store.open_dashboard_session(&team, &key, 60_000).unwrap();
        assert!(store.revoke_api_key(&key).unwrap());
        assert_eq!(
            store.dashboard_session(&token).unwrap(),
            SessionState::KeyRevoked
        );
        assert_eq!(
            store.dashboard_session(&token).unwrap(),
            SessionState::Unknown
        );
    }
}
