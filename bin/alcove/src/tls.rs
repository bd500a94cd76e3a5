//! `alcove tls init --domain D`: a local CA and a wildcard certificate for `D` and `*.D`, for
//! `alcove server --tls-cert --tls-key`, and how to make clients trust the CA.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::json;

use crate::config::default_data_dir;

/// `alcove tls ...`.
#[derive(Debug, Clone, Args)]
pub struct TlsArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(subcommand)]
    pub command: TlsCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum TlsCommand {
    /// Make a local CA (kept and reused) and a certificate it signs for DOMAIN and *.DOMAIN:
    /// the API at api.DOMAIN and every sandbox at <port>-<sandboxID>.DOMAIN.
    Init {
        /// The domain the SDKs get as E2B_DOMAIN (the server's --domain), e.g.
        /// alcove.localhost; a trailing :PORT is allowed and left out of the certificate.
        #[arg(long)]
        domain: String,
        /// Where to write ca.pem, cert.pem and key.pem (default: <data-dir>/tls).
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long, env = "ALCOVE_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
}

pub fn run(args: TlsArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    match args.command {
        TlsCommand::Init {
            domain,
            dir,
            data_dir,
        } => {
            let dir = dir.unwrap_or_else(|| data_dir.unwrap_or_else(default_data_dir).join("tls"));
            let f = alcove_api::tls::init(&domain, &dir)
                .with_context(|| format!("making certificates in {}", dir.display()))?;
            if args.json {
                let v = json!({"domain": domain, "names": f.names, "ca": f.ca, "cert": f.cert,
                               "key": f.key});
                writeln!(out, "{v}")?;
                return Ok(());
            }
            let (ca, cert, key) = (f.ca.display(), f.cert.display(), f.key.display());
            writeln!(
                out,
                "Made a certificate for {} in {}.\n\n\
                 Serve with it:\n  alcove server --domain {domain} --tls-cert {cert} --tls-key {key}\n\n\
                 Trust the CA ({ca}) where clients run:\n\
                 \x20 Debian/Ubuntu: cp {ca} /usr/local/share/ca-certificates/alcove.crt && update-ca-certificates\n\
                 \x20 Python SDK (e2b):  export SSL_CERT_FILE={ca}\n\
                 \x20 JS SDK (node):     export NODE_EXTRA_CA_CERTS={ca}\n\n\
                 Point the SDKs at the server with E2B_DOMAIN={domain} (and no E2B_API_URL or \
                 E2B_SANDBOX_URL). The names must resolve to the server: *.localhost does on most \
                 systems (RFC 6761); otherwise add a wildcard DNS record.",
                f.names.join(" and "),
                f.dir.display(),
            )?;
        }
    }
    Ok(())
}
