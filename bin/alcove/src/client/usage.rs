//! `alcove usage` and `alcove teams limits get|set`: metering and team limits through a running
//! server's API (`docs/metering.md`).

use std::io::Write;

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::{ClientArgs, str_of, table};

/// `alcove usage`.
#[derive(Debug, Clone, Args)]
pub struct UsageArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Window start, RFC 3339 (default: the start of this month, UTC).
    #[arg(long)]
    pub start: Option<String>,
    /// Window end, RFC 3339 (default: now).
    #[arg(long)]
    pub end: Option<String>,
    /// sandbox, template, day or team.
    #[arg(long, default_value = "sandbox")]
    pub group_by: String,
    /// Another team's id or name, or * for every team (admin key only).
    #[arg(long)]
    pub team: Option<String>,
    /// Print CSV (a header row, then one row per group and a total row).
    #[arg(long, conflicts_with = "json")]
    pub csv: bool,
}

const COLUMNS: [&str; 8] = [
    "KEY",
    "SANDBOXES",
    "VCPU_S",
    "MEM_GIB_S",
    "STORAGE_GIB_H",
    "EGRESS_B",
    "INGRESS_B",
    "COST_USD",
];

fn row(key: &str, v: &Value) -> Vec<String> {
    let f = |k: &str, prec: usize| format!("{:.prec$}", v[k].as_f64().unwrap_or(0.0));
    vec![
        key.to_owned(),
        str_of(&v["sandboxes"]),
        f("vcpuSeconds", 1),
        f("memoryGibSeconds", 1),
        f("storageGibHours", 4),
        str_of(&v["egressBytes"]),
        str_of(&v["ingressBytes"]),
        f("costUsd", 6),
    ]
}

pub async fn run_usage(args: UsageArgs, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    let api = args.client.client()?;
    let mut q: Vec<(&str, &str)> = vec![("groupBy", &args.group_by)];
    if let Some(s) = &args.start {
        q.push(("start", s));
    }
    if let Some(e) = &args.end {
        q.push(("end", e));
    }
    if let Some(t) = &args.team {
        q.push(("team", t));
    }
    let r = api.usage(&q).await?;
    if args.client.json {
        writeln!(out, "{r}")?;
        return Ok(());
    }
    let mut rows: Vec<Vec<String>> = r["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| row(&str_of(&i["key"]), i))
        .collect();
    rows.push(row("TOTAL", &r["total"]));
    if args.csv {
        writeln!(out, "{}", COLUMNS.join(",").to_lowercase())?;
        for r in rows {
            let cells: Vec<String> = r
                .into_iter()
                .map(|c| {
                    if c.contains([',', '"', '\n']) {
                        format!("\"{}\"", c.replace('"', "\"\""))
                    } else {
                        c
                    }
                })
                .collect();
            writeln!(out, "{}", cells.join(","))?;
        }
        return Ok(());
    }
    writeln!(
        out,
        "usage from {} to {} by {}",
        str_of(&r["start"]),
        str_of(&r["end"]),
        str_of(&r["groupBy"])
    )?;
    table(out, &COLUMNS, rows)?;
    Ok(())
}

/// `alcove teams ...`.
#[derive(Debug, Clone, Args)]
pub struct TeamsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: TeamsCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum TeamsCommand {
    /// A team's limits and spend cap.
    #[command(subcommand)]
    Limits(LimitsCommand),
}

#[derive(Debug, Clone, Subcommand)]
pub enum LimitsCommand {
    /// Show a team's limits, what is in force, its spend this month and the warnings reached.
    Get {
        /// Team id or name.
        team: String,
    },
    /// Replace a team's limits (admin key). Options left out go back to the server's
    /// defaults (no cap).
    Set {
        /// Team id or name.
        team: String,
        #[arg(long)]
        max_running: Option<u64>,
        #[arg(long)]
        max_paused: Option<u64>,
        #[arg(long)]
        max_storage_gib: Option<f64>,
        /// Monthly spend cap in USD (UTC calendar month).
        #[arg(long)]
        monthly_spend_cap_usd: Option<f64>,
        /// Comma-separated percentages of the cap that raise a warning (default 50,80,100).
        #[arg(long, value_delimiter = ',')]
        warn_at_percent: Option<Vec<u32>>,
        /// At the cap: refuse (new work only), pause or kill the running sandboxes.
        #[arg(long)]
        on_cap: Option<String>,
    },
}

pub async fn run_teams(args: TeamsArgs, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    let api = args.client.client()?;
    let TeamsCommand::Limits(cmd) = args.command;
    let r = match cmd {
        LimitsCommand::Get { team } => api.team_limits(&team).await?,
        LimitsCommand::Set {
            team,
            max_running,
            max_paused,
            max_storage_gib,
            monthly_spend_cap_usd,
            warn_at_percent,
            on_cap,
        } => {
            let body = json!({
                "maxRunning": max_running,
                "maxPaused": max_paused,
                "maxStorageGib": max_storage_gib,
                "monthlySpendCapUsd": monthly_spend_cap_usd,
                "warnAtPercent": warn_at_percent,
                "onCap": on_cap,
            });
            api.set_team_limits(&team, &body).await?
        }
    };
    if args.client.json {
        writeln!(out, "{r}")?;
        return Ok(());
    }
    let set_or = |k: &str, eff: &str| match &r[k] {
        Value::Null => format!("{} (server default)", str_of(&r["effective"][eff])),
        v => str_of(v),
    };
    writeln!(
        out,
        "team {} ({})",
        str_of(&r["teamName"]),
        str_of(&r["teamID"])
    )?;
    writeln!(
        out,
        "  running       {} of {}",
        str_of(&r["running"]),
        set_or("maxRunning", "maxRunning")
    )?;
    writeln!(
        out,
        "  paused        {} of {}",
        str_of(&r["paused"]),
        set_or("maxPaused", "maxPaused")
    )?;
    writeln!(
        out,
        "  storage GiB   {}",
        set_or("maxStorageGib", "maxStorageGib")
    )?;
    let cap = match &r["monthlySpendCapUsd"] {
        Value::Null => "none".to_owned(),
        v => format!(
            "${} (warn at {}%, on cap: {})",
            str_of(v),
            r["warnAtPercent"],
            str_of(&r["onCap"])
        ),
    };
    writeln!(
        out,
        "  spend {}    ${:.4}, cap {}{}",
        str_of(&r["month"]),
        r["monthSpendUsd"].as_f64().unwrap_or(0.0),
        cap,
        if r["capped"] == true {
            " — CAPPED: creates are refused"
        } else {
            ""
        }
    )?;
    for n in r["notices"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "  warning {}% at {} (${:.4}){}",
            str_of(&n["percent"]),
            str_of(&n["at"]),
            n["spendUsd"].as_f64().unwrap_or(0.0),
            match &n["deliveredAt"] {
                Value::Null => " not delivered".to_owned(),
                d => format!(" delivered {}", str_of(d)),
            }
        )?;
    }
    Ok(())
}
