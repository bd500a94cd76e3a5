//! `alcove keys create|list|revoke`: API keys, straight in the data directory's database (no
//! server needed, and none may be reachable yet).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use alcove_api::models::rfc3339;
use alcove_store::{Database, Store};
use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::client::table;
use crate::config::default_data_dir;

/// `alcove keys ...`.
#[derive(Debug, Clone, Args)]
pub struct KeysArgs {
    #[arg(long, env = "ALCOVE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The server's store, as `alcove server --database-url` (default: DATA_DIR/alcove.db).
    #[arg(long, env = "ALCOVE_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(subcommand)]
    pub command: KeysCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum KeysCommand {
    /// Create a key; its secret is printed once and never stored.
    Create {
        /// A label for the key.
        #[arg(long, default_value = "cli")]
        name: String,
        /// Team id or name (default: the first team, `admin`). Created if it does not exist.
        #[arg(long)]
        team: Option<String>,
    },
    /// List keys (never their secrets).
    List,
    /// Revoke a key by its id.
    Revoke { id: String },
}

/// Runs `alcove keys` against the data directory's database.
pub fn run_keys(args: KeysArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let dir = args.data_dir.unwrap_or_else(default_data_dir);
    let db = Database::from_url(args.database_url.as_deref(), &dir)
        .map_err(|e| anyhow::anyhow!("--database-url: {e}"))?;
    if let Database::Sqlite(path) = &db
        && !path.exists()
    {
        bail!(
            "no database at {}: start `alcove server --data-dir {}` once first",
            path.display(),
            dir.display()
        );
    }
    let store = Store::connect(&db).with_context(|| format!("opening the database {db}"))?;
    match args.command {
        KeysCommand::Create { name, team } => {
            let team = match team {
                Some(t) => match store.team(&t)? {
                    Some(team) => team,
                    None => store.create_team(&t)?,
                },
                None => store
                    .teams()?
                    .into_iter()
                    .next()
                    .context("no team exists yet")?,
            };
            let key = store.create_api_key(&team.id, &name)?;
            if args.json {
                let v = json!({"id": key.info.id, "team": team.name, "name": key.info.name,
                               "key": key.secret});
                writeln!(out, "{v}")?;
            } else {
                writeln!(out, "Created key {} for team {}.", key.info.id, team.name)?;
                writeln!(out, "Secret (shown once, store it now):\n{}", key.secret)?;
            }
        }
        KeysCommand::List => {
            let teams: BTreeMap<String, String> =
                store.teams()?.into_iter().map(|t| (t.id, t.name)).collect();
            let keys = store.list_api_keys(None)?;
            if args.json {
                let v: Vec<Value> = keys
                    .iter()
                    .map(|k| {
                        json!({"id": k.id, "team": teams.get(&k.team_id), "name": k.name,
                               "prefix": k.prefix, "createdAt": rfc3339(k.created_at),
                               "lastUsedAt": k.last_used_at.map(rfc3339),
                               "revoked": k.revoked_at.is_some()})
                    })
                    .collect();
                writeln!(out, "{}", Value::Array(v))?;
            } else {
                let rows = keys
                    .iter()
                    .map(|k| {
                        vec![
                            k.id.clone(),
                            teams.get(&k.team_id).cloned().unwrap_or_default(),
                            k.name.clone(),
                            format!("{}…", k.prefix),
                            if k.revoked_at.is_some() {
                                "revoked"
                            } else {
                                "active"
                            }
                            .into(),
                        ]
                    })
                    .collect();
                table(out, &["ID", "TEAM", "NAME", "PREFIX", "STATUS"], rows)?;
            }
        }
        KeysCommand::Revoke { id } => {
            if !store.revoke_api_key(&id)? {
                bail!("no active key with id {id}; see `alcove keys list`");
            }
            if args.json {
                writeln!(out, "{}", json!({"id": id, "revoked": true}))?;
            } else {
                writeln!(out, "Revoked {id}.")?;
            }
        }
    }
    Ok(())
}
