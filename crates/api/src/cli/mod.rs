//! CLI pieces the `alcove` binary wires in: clap argument types and `run_*` functions.
//!
//! - `alcove server` → [`ServerArgs`] + [`run_server`] (the caller supplies the backend)
//! - `alcove keys create|list|revoke` → [`KeysArgs`] + [`run_keys`] (works on the data dir)
//! - `alcove sandbox create|ls|info|kill|logs` → [`SandboxArgs`] + [`run_sandbox`] (REST client)
//! - `alcove template ls` → [`TemplateArgs`] + [`run_template`] (REST client)
//! - `alcove snapshot tree|ls|create|fork|rm` → [`SnapshotArgs`] + [`run_snapshot`] (REST client)
//!
//! Output goes to the writer the caller passes (stdout in the binary); `--json` prints the API's
//! JSON as is, for scripts and agents. `exec`/`shell` need the envd protocol client and are left
//! to the binary.

pub mod client;
pub mod envd;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use alcove_store::{DB_FILE, Store};

use crate::backend::SandboxBackend;
use crate::config::{Limits, ServerConfig};
use crate::server::{API_KEY_FILE, Server};
use client::ApiClient;

/// `$ALCOVE_DATA_DIR`, else `$XDG_DATA_HOME/alcove`, else `~/.local/share/alcove`.
pub fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(d).join("alcove");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/var/lib".into());
    PathBuf::from(home).join(".local/share/alcove")
}

/// `alcove server`.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Address for the API and sandbox traffic.
    #[arg(long, env = "ALCOVE_LISTEN", default_value = "127.0.0.1:3000")]
    pub listen: SocketAddr,
    /// Holds the database and, after the first start, the admin key (`api-key`).
    #[arg(long, env = "ALCOVE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Domain for `<port>-<sandboxID>.<domain>` routing (default `localhost:<port>`).
    #[arg(long, env = "ALCOVE_DOMAIN")]
    pub domain: Option<String>,
    /// Lifetime in seconds of a sandbox created without a timeout.
    #[arg(long, default_value_t = 300)]
    pub default_timeout: u64,
    /// Longest lifetime in seconds a sandbox may ask for.
    #[arg(long, default_value_t = 86_400)]
    pub max_timeout: u64,
    /// Sandboxes one team may run at once.
    #[arg(long, default_value_t = 100)]
    pub max_sandboxes: usize,
    /// Largest REST request body in bytes (sandbox traffic is not capped).
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
}

impl ServerArgs {
    pub fn config(&self) -> ServerConfig {
        ServerConfig {
            listen: self.listen,
            data_dir: self.data_dir.clone().unwrap_or_else(default_data_dir),
            domain: self.domain.clone(),
            limits: Limits {
                default_timeout: Duration::from_secs(self.default_timeout),
                max_timeout: Duration::from_secs(self.max_timeout),
                max_concurrent_sandboxes: self.max_sandboxes,
                max_body_bytes: self.max_body_bytes,
                ..Limits::default()
            },
        }
    }
}

/// Runs `alcove server` until Ctrl-C, printing how to point the SDKs at it.
pub async fn run_server(
    args: ServerArgs,
    backend: Arc<dyn SandboxBackend>,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let config = args.config();
    let data_dir = config.data_dir.clone();
    let server = Server::bind(config, backend)
        .await
        .context("starting the server")?;
    writeln!(
        out,
        "alcove API listening on http://{}",
        server.local_addr()
    )?;
    if server.first_start_key().is_some() {
        writeln!(
            out,
            "First start: created the admin API key in {}",
            data_dir.join(API_KEY_FILE).display()
        )?;
    }
    writeln!(
        out,
        "Point the E2B SDKs at it with:\n\n{}",
        server.sdk_env()
    )?;
    out.flush()?;
    server
        .run(async {
            crate::server::shutdown_signal().await;
        })
        .await
        .context("serving")?;
    Ok(())
}

/// `alcove keys ...`.
#[derive(Debug, Clone, Args)]
pub struct KeysArgs {
    #[arg(long, env = "ALCOVE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
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
    let db = dir.join(DB_FILE);
    if !db.exists() {
        bail!(
            "no database at {}: start `alcove server --data-dir {}` once first",
            db.display(),
            dir.display()
        );
    }
    let store = Store::open(&db).context("opening the database")?;
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
                               "prefix": k.prefix, "createdAt": crate::models::rfc3339(k.created_at),
                               "lastUsedAt": k.last_used_at.map(crate::models::rfc3339),
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

/// Connection to a running server, for the client commands.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Base URL of the Alcove API.
    #[arg(long, env = "E2B_API_URL", default_value = "http://127.0.0.1:3000")]
    pub api_url: String,
    /// API key (default: the `api-key` file in the data directory).
    #[arg(long, env = "E2B_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    #[arg(long, env = "ALCOVE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Print the API's JSON.
    #[arg(long, global = true)]
    pub json: bool,
}

impl ClientArgs {
    fn client(&self) -> anyhow::Result<ApiClient> {
        let key = match &self.api_key {
            Some(k) => k.clone(),
            None => {
                let path = self
                    .data_dir
                    .clone()
                    .unwrap_or_else(default_data_dir)
                    .join(API_KEY_FILE);
                std::fs::read_to_string(&path)
                    .with_context(|| {
                        format!(
                            "no API key: set E2B_API_KEY or --api-key (tried {})",
                            path.display()
                        )
                    })?
                    .trim()
                    .to_owned()
            }
        };
        Ok(ApiClient::new(&self.api_url, &key)?)
    }
}

/// `alcove sandbox ...`.
#[derive(Debug, Clone, Args)]
pub struct SandboxArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: SandboxCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum SandboxCommand {
    /// Create a sandbox and print its id.
    Create {
        /// Template id or alias.
        #[arg(default_value = "base")]
        template: String,
        /// Lifetime in seconds.
        #[arg(long)]
        timeout: Option<u64>,
        /// Metadata, KEY=VALUE (repeatable).
        #[arg(long = "metadata", short = 'm', value_parser = parse_kv)]
        metadata: Vec<(String, String)>,
        /// Environment variable, KEY=VALUE (repeatable).
        #[arg(long = "env", short = 'e', value_parser = parse_kv)]
        env: Vec<(String, String)>,
    },
    /// List sandboxes (running and paused unless --state says otherwise).
    Ls {
        /// Comma-separated states: running, paused, creating, killed, lost.
        #[arg(long)]
        state: Option<String>,
        /// Metadata filter, KEY=VALUE (repeatable; all must match).
        #[arg(long = "metadata", short = 'm', value_parser = parse_kv)]
        metadata: Vec<(String, String)>,
    },
    /// Show a sandbox's full record and state history.
    Info { id: String },
    /// Kill a sandbox.
    Kill { id: String },
    /// Print a sandbox's log (lifecycle events and its own lines).
    Logs { id: String },
    /// Run a command in a sandbox (bash -l -c, as the SDK's commands.run); exits with its code.
    Exec {
        id: String,
        /// Run as this user (default: the sandbox's default user).
        #[arg(long)]
        user: Option<String>,
        /// Working directory.
        #[arg(long)]
        cwd: Option<String>,
        /// Environment variable, KEY=VALUE (repeatable).
        #[arg(long = "env", short = 'e', value_parser = parse_kv)]
        env: Vec<(String, String)>,
        /// The command; several words are joined with spaces.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// An interactive shell on a terminal in the sandbox.
    Shell {
        id: String,
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        cwd: Option<String>,
    },
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected KEY=VALUE, got '{s}'"))
}

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Runs a client sandbox command; returns the process exit code (`exec`, `shell`) or 0.
pub async fn run_sandbox(args: SandboxArgs, out: &mut (dyn Write + Send)) -> anyhow::Result<i32> {
    let api = args.client.client()?;
    let json_out = args.client.json;
    let envd = |id: &str, token: Option<String>, user: Option<String>| {
        envd::EnvdClient::new(&args.client.api_url, id, token, user)
    };
    let token_of = |reply: &client::Reply| {
        reply
            .json
            .get("envdAccessToken")
            .and_then(|t| t.as_str())
            .map(str::to_owned)
    };
    match args.command {
        SandboxCommand::Exec {
            id,
            user,
            cwd,
            env,
            command,
        } => {
            let info = api
                .call("GET", &format!("/sandboxes/{}", enc(&id)), None)
                .await?;
            let client = envd(&id, token_of(&info), user);
            return envd::exec(&client, &command.join(" "), cwd, env, json_out, out).await;
        }
        SandboxCommand::Shell { id, user, cwd } => {
            let info = api
                .call("GET", &format!("/sandboxes/{}", enc(&id)), None)
                .await?;
            let client = std::sync::Arc::new(envd(&id, token_of(&info), user));
            return envd::shell(client, cwd).await;
        }
        SandboxCommand::Create {
            template,
            timeout,
            metadata,
            env,
        } => {
            let mut body = json!({
                "templateID": template,
                "metadata": metadata.into_iter().collect::<BTreeMap<_, _>>(),
                "envVars": env.into_iter().collect::<BTreeMap<_, _>>(),
            });
            if let Some(t) = timeout {
                body["timeout"] = json!(t);
            }
            let r = api.call("POST", "/v2/sandboxes", Some(&body)).await?;
            if json_out {
                writeln!(out, "{}", r.json)?;
            } else {
                writeln!(out, "{}", r.json["sandboxID"].as_str().unwrap_or_default())?;
            }
        }
        SandboxCommand::Ls { state, metadata } => {
            let mut items = Vec::new();
            let mut token: Option<String> = None;
            loop {
                let mut q = vec!["limit=100".to_owned()];
                if let Some(s) = &state {
                    q.push(format!("state={}", enc(s)));
                }
                if !metadata.is_empty() {
                    let m: Vec<String> = metadata
                        .iter()
                        .map(|(k, v)| format!("{}={}", enc(&enc(k)), enc(&enc(v))))
                        .collect();
                    q.push(format!("metadata={}", enc(&m.join("&"))));
                }
                if let Some(t) = &token {
                    q.push(format!("nextToken={}", enc(t)));
                }
                let r = api
                    .call("GET", &format!("/v2/sandboxes?{}", q.join("&")), None)
                    .await?;
                items.extend(r.json.as_array().cloned().unwrap_or_default());
                token = r
                    .headers
                    .get("x-next-token")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                if token.is_none() {
                    break;
                }
            }
            if json_out {
                writeln!(out, "{}", Value::Array(items))?;
            } else {
                let rows = items
                    .iter()
                    .map(|s| {
                        let meta = s["metadata"]
                            .as_object()
                            .map(|m| {
                                m.iter()
                                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                                    .collect::<Vec<_>>()
                                    .join(",")
                            })
                            .unwrap_or_default();
                        vec![
                            str_of(&s["sandboxID"]),
                            s["alias"]
                                .as_str()
                                .map_or_else(|| str_of(&s["templateID"]), str::to_owned),
                            str_of(&s["state"]),
                            str_of(&s["startedAt"]),
                            str_of(&s["endAt"]),
                            meta,
                        ]
                    })
                    .collect();
                table(
                    out,
                    &["ID", "TEMPLATE", "STATE", "STARTED", "ENDS", "METADATA"],
                    rows,
                )?;
            }
        }
        SandboxCommand::Info { id } => {
            let r = api
                .call("GET", &format!("/alcove/v1/sandboxes/{}", enc(&id)), None)
                .await?;
            if json_out {
                writeln!(out, "{}", r.json)?;
            } else {
                let j = &r.json;
                writeln!(out, "id:       {}", str_of(&j["sandboxID"]))?;
                writeln!(out, "template: {}", str_of(&j["templateID"]))?;
                writeln!(out, "state:    {}", str_of(&j["state"]))?;
                if let Some(reason) = j["endReason"].as_str() {
                    writeln!(out, "ended:    {reason}")?;
                }
                writeln!(out, "history:")?;
                for h in j["history"].as_array().into_iter().flatten() {
                    writeln!(
                        out,
                        "  {}  {:<9} {}",
                        str_of(&h["at"]),
                        str_of(&h["to"]),
                        str_of(&h["reason"])
                    )?;
                }
            }
        }
        SandboxCommand::Kill { id } => {
            api.call("DELETE", &format!("/sandboxes/{}", enc(&id)), None)
                .await?;
            if json_out {
                writeln!(out, "{}", json!({"sandboxID": id, "killed": true}))?;
            } else {
                writeln!(out, "Killed {id}.")?;
            }
        }
        SandboxCommand::Logs { id } => {
            let r = api
                .call("GET", &format!("/v2/sandboxes/{}/logs", enc(&id)), None)
                .await?;
            if json_out {
                writeln!(out, "{}", r.json)?;
            } else {
                for l in r.json["logs"].as_array().into_iter().flatten() {
                    writeln!(
                        out,
                        "{} {:<5} {}",
                        str_of(&l["timestamp"]),
                        str_of(&l["level"]),
                        str_of(&l["message"])
                    )?;
                }
            }
        }
    }
    Ok(0)
}

/// `alcove template ...` (the REST side; building templates belongs to the image layer).
#[derive(Debug, Clone, Args)]
pub struct TemplateArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: TemplateCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum TemplateCommand {
    /// List templates the server can create sandboxes from.
    Ls,
}

pub async fn run_template(args: TemplateArgs, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    let api = args.client.client()?;
    match args.command {
        TemplateCommand::Ls => {
            let r = api.call("GET", "/templates", None).await?;
            if args.client.json {
                writeln!(out, "{}", r.json)?;
            } else {
                let rows = r
                    .json
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|t| {
                        let aliases = t["aliases"]
                            .as_array()
                            .map(|a| {
                                a.iter()
                                    .filter_map(Value::as_str)
                                    .collect::<Vec<_>>()
                                    .join(",")
                            })
                            .unwrap_or_default();
                        vec![
                            str_of(&t["templateID"]),
                            aliases,
                            t["cpuCount"].to_string(),
                            t["memoryMB"].to_string(),
                            str_of(&t["envdVersion"]),
                        ]
                    })
                    .collect();
                table(out, &["ID", "ALIASES", "CPUS", "MEMORY_MB", "ENVD"], rows)?;
            }
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Args)]
pub struct SnapshotArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: SnapshotCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum SnapshotCommand {
    /// Show the checkpoint tree: every snapshot under the one its sandbox came from, with the
    /// live sandboxes on each.
    Tree,
    /// List restorable snapshots (newest first).
    Ls,
    /// Snapshot a running sandbox (it goes on running) and print the snapshot id.
    Create {
        sandbox: String,
        #[arg(long)]
        name: Option<String>,
    },
    /// Fork a running sandbox into COUNT children (1-100) and print their ids.
    Fork {
        sandbox: String,
        #[arg(long, default_value_t = 1)]
        count: u32,
    },
    /// Delete a snapshot (its files go once no sandbox or other snapshot needs them).
    Rm { snapshot: String },
}

pub async fn run_snapshot(args: SnapshotArgs, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    let api = args.client.client()?;
    let json = args.client.json;
    match args.command {
        SnapshotCommand::Tree => {
            let r = api.call("GET", "/alcove/v1/snapshots/tree", None).await?;
            if json {
                writeln!(out, "{}", r.json)?;
            } else if r.json["roots"].as_array().is_none_or(|a| a.is_empty()) {
                writeln!(out, "no snapshots")?;
            } else {
                for root in r.json["roots"].as_array().into_iter().flatten() {
                    writeln!(out, "{}", str_of(&root["templateID"]))?;
                    print_tree(out, root, "")?;
                }
            }
        }
        SnapshotCommand::Ls => {
            let r = api.call("GET", "/snapshots?limit=1000", None).await?;
            if json {
                writeln!(out, "{}", r.json)?;
            } else {
                let rows = r
                    .json
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|s| {
                        vec![
                            str_of(&s["snapshotID"]),
                            s["names"]
                                .as_array()
                                .map(|n| n.iter().map(str_of).collect::<Vec<_>>().join(","))
                                .unwrap_or_default(),
                        ]
                    })
                    .collect();
                table(out, &["ID", "NAMES"], rows)?;
            }
        }
        SnapshotCommand::Create { sandbox, name } => {
            let body = json!({ "name": name });
            let r = api
                .call(
                    "POST",
                    &format!("/sandboxes/{sandbox}/snapshots"),
                    Some(&body),
                )
                .await?;
            if json {
                writeln!(out, "{}", r.json)?;
            } else {
                writeln!(out, "{}", str_of(&r.json["snapshotID"]))?;
            }
        }
        SnapshotCommand::Fork { sandbox, count } => {
            let body = json!({ "count": count });
            let r = api
                .call(
                    "POST",
                    &format!("/alcove/v1/sandboxes/{sandbox}/fork"),
                    Some(&body),
                )
                .await?;
            if json {
                writeln!(out, "{}", r.json)?;
            } else {
                for c in r.json["children"].as_array().into_iter().flatten() {
                    match c.get("sandbox") {
                        Some(s) => writeln!(out, "{}", str_of(&s["sandboxID"]))?,
                        None => writeln!(out, "error: {}", str_of(&c["error"]["message"]))?,
                    }
                }
            }
        }
        SnapshotCommand::Rm { snapshot } => {
            api.call("DELETE", &format!("/templates/{snapshot}"), None)
                .await?;
        }
    }
    Ok(())
}

fn print_tree(out: &mut dyn Write, node: &Value, indent: &str) -> std::io::Result<()> {
    let mut label = str_of(&node["snapshotID"]);
    if let Some(n) = node["name"].as_str() {
        label.push_str(&format!(" ({n})"));
    }
    if node["kind"] == "fork" {
        label.push_str(" [fork]");
    }
    if node["deleted"] == true {
        label.push_str(" [deleted]");
    }
    label.push_str(&format!(" from {}", str_of(&node["sandboxID"])));
    writeln!(out, "{indent}└─ {label}")?;
    let child_indent = format!("{indent}   ");
    for s in node["sandboxes"].as_array().into_iter().flatten() {
        writeln!(out, "{child_indent}• sandbox {}", str_of(s))?;
    }
    for c in node["children"].as_array().into_iter().flatten() {
        print_tree(out, c, &child_indent)?;
    }
    Ok(())
}

fn str_of(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
}

fn table(out: &mut dyn Write, header: &[&str], rows: Vec<Vec<String>>) -> std::io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    writeln!(
        out,
        "{}",
        line(header.iter().map(|h| h.to_string()).collect())
    )?;
    for r in rows {
        writeln!(out, "{}", line(r))?;
    }
    Ok(())
}
