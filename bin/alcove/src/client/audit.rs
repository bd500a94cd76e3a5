//! `alcove audit export|verify`: the audit log through a running server's API, and offline
//! verification of an export's hash chains (`docs/audit.md`).

use std::io::{BufRead, Write};
use std::path::PathBuf;

use alcove_api::models::AuditEventView;
use anyhow::Context;
use clap::{Args, Subcommand};

use super::ClientArgs;

/// `alcove audit ...`.
#[derive(Debug, Clone, Args)]
pub struct AuditArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: AuditCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum AuditCommand {
    /// Print the team's audit records as JSONL (one per line, oldest first), every page.
    Export {
        /// RFC 3339: records at or after it.
        #[arg(long)]
        since: Option<String>,
        /// RFC 3339: records before it.
        #[arg(long)]
        until: Option<String>,
        /// Output format (jsonl is the one there is).
        #[arg(long, default_value = "jsonl", value_parser = ["jsonl"])]
        format: String,
        /// Another team's id or name, or * for every team (admin key only).
        #[arg(long)]
        team: Option<String>,
        /// Check the hash chains of what was exported, and fail if they break.
        #[arg(long)]
        verify: bool,
    },
    /// Check the hash chains of an export (a file, or - for stdin): each team's records link to
    /// the one before and each hash matches its record. Exits 1 at the first break.
    Verify { file: PathBuf },
}

fn verify(records: &[AuditEventView]) -> anyhow::Result<()> {
    let chain: Vec<_> = records.iter().map(alcove_api::service::record_of).collect();
    alcove_store::verify_chain(&chain)
        .map_err(|b| anyhow::anyhow!("the audit chain breaks at record {}: {}", b.seq, b.why))
}

pub async fn run_audit(args: AuditArgs, out: &mut (dyn Write + Send)) -> anyhow::Result<u8> {
    match args.command {
        AuditCommand::Export {
            since,
            until,
            format: _,
            team,
            verify: check,
        } => {
            let api = args.client.client()?;
            let mut after = 0i64;
            let mut all = Vec::new();
            loop {
                let mut q = form_urlencoded::Serializer::new(String::new());
                q.append_pair("after", &after.to_string());
                q.append_pair("limit", "10000");
                if let Some(s) = &since {
                    q.append_pair("since", s);
                }
                if let Some(u) = &until {
                    q.append_pair("until", u);
                }
                if let Some(t) = &team {
                    q.append_pair("team", t);
                }
                let (bytes, _) = api
                    .raw("GET", &format!("/alcove/v1/audit?{}", q.finish()), None)
                    .await?;
                let text = String::from_utf8_lossy(&bytes).into_owned();
                let mut n = 0;
                for line in text.lines().filter(|l| !l.trim().is_empty()) {
                    let r: AuditEventView =
                        serde_json::from_str(line).context("the server sent a malformed record")?;
                    writeln!(out, "{line}")?;
                    after = r.seq;
                    n += 1;
                    if check {
                        all.push(r);
                    }
                }
                if n < 10_000 {
                    break;
                }
            }
            if check {
                verify(&all)?;
                eprintln!("verified: {} records, every chain intact", all.len());
            }
            Ok(0)
        }
        AuditCommand::Verify { file } => {
            let reader: Box<dyn BufRead> = if file.as_os_str() == "-" {
                Box::new(std::io::BufReader::new(std::io::stdin()))
            } else {
                Box::new(std::io::BufReader::new(
                    std::fs::File::open(&file)
                        .with_context(|| format!("opening {}", file.display()))?,
                ))
            };
            let mut records = Vec::new();
            for (i, line) in reader.lines().enumerate() {
                let line = line?;
                if line.trim().is_empty() {
                    continue;
                }
                records.push(
                    serde_json::from_str::<AuditEventView>(&line)
                        .with_context(|| format!("line {} is not an audit record", i + 1))?,
                );
            }
            match verify(&records) {
                Ok(()) => {
                    if args.client.json {
                        writeln!(
                            out,
                            "{}",
                            serde_json::json!({"ok": true, "records": records.len()})
                        )?;
                    } else {
                        writeln!(out, "ok: {} records, every chain intact", records.len())?;
                    }
                    Ok(0)
                }
                Err(e) => {
                    if args.client.json {
                        writeln!(
                            out,
                            "{}",
                            serde_json::json!({"ok": false, "error": e.to_string()})
                        )?;
                    } else {
                        writeln!(out, "{e}")?;
                    }
                    Ok(1)
                }
            }
        }
    }
}
