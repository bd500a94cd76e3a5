//! The guest contract: everything the host side (`alcove-image`, `alcove-node`,
//! `alcove-agent-client`, `alcove-api`) and the guest side (`alcove-agent`, `alcove-interpreter`)
//! must agree on, defined once, and the one-line form their error messages take ([`error_chain`]).
//!
//! Changing a value here changes what a template's guest expects, so a change means rebuilding
//! templates (the guest network settings and the agent's path are part of every template's
//! kernel command line, which is hashed into its key). Serde only, so both sides can depend on it
//! without pulling anything else in.

pub mod net;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// envd's port inside the guest: the agent serves the envd protocol on it, and the SDKs address
/// it (`E2b-Sandbox-Port: 49983`).
pub const ENVD_PORT: u16 = 49983;
/// The code interpreter's port inside a `code-interpreter-v1` guest (`E2b-Sandbox-Port: 49999`).
pub const CODE_INTERPRETER_PORT: u16 = 49999;
/// The MCP gateway's port inside a guest (`mcp-gateway`, started by the SDKs after
/// `Sandbox.create(mcp=...)`; `get_mcp_url()` is `https://50005-<id>.<domain>/mcp`).
pub const MCP_GATEWAY_PORT: u16 = 50005;
/// Where `mcp-gateway` lives in every template: a link to the agent, which runs the gateway when
/// called by that name.
pub const MCP_GATEWAY_GUEST_PATH: &str = "/usr/local/bin/mcp-gateway";
/// The name of the virtio-serial port the host reaches the agent over (`/dev/virtio-ports/...`
/// in the guest, QEMU's `virtserialport,name=...` on the host).
pub const AGENT_CHANNEL: &str = "alcove.agent";
/// The console line the agent prints once it serves and the template's start and ready commands
/// succeeded: the host snapshots a template VM when it sees it.
pub const READY_LINE: &str = "ALCOVE_AGENT_READY";
/// The sandbox's environment variables as the agent publishes them at every `/init` (JSON, 0600;
/// on a tmpfs), for in-guest servers that start processes of their own.
pub const SANDBOX_ENV_FILE: &str = "/run/alcove/envs.json";
/// Where the guest keeps its sandbox's environment variables across a filesystem-only pause
/// (the host never stores their values): the host has the guest copy them here before it
/// flushes the disk, and the agent takes them back at the next boot and removes the file.
pub const PERSISTED_ENV_FILE: &str = "/var/lib/alcove/envs.json";
/// Where the agent lives in the guest; the kernel starts it as init (`init=` on the command line).
pub const AGENT_GUEST_PATH: &str = "/usr/local/bin/alcove-agent";

/// The body of `POST /init`: envd's fields (`envVars`, `accessToken`, `timestamp`,
/// `defaultUser`, `defaultWorkdir`) plus Alcove's extensions (`hostname`, `entropy`,
/// `sandboxId`, `egressCa`). The host sends it after every boot or restore; the agent applies it.
///
/// The JSON is envd's: camelCase names, absent fields left out (and read as absent).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InitRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env_vars: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
    /// The host's wall clock, RFC 3339, e.g. `2026-11-22T18:23:00.123Z`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_workdir: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Base64 of at least 32 random bytes, credited to the guest kernel's entropy pool.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entropy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox_id: Option<String>,
    /// The PEM certificate of the sandbox's egress CA, which signs what the egress proxy shows
    /// for hosts whose requests network rules transform: the agent adds it to the system trust
    /// store (replacing an earlier one) and points `SSL_CERT_FILE`, `REQUESTS_CA_BUNDLE` and
    /// `NODE_EXTRA_CA_CERTS` at it unless the sandbox sets them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress_ca: Option<String>,
}

/// Where the agent puts the sandbox's egress CA certificate (`update-ca-certificates` keeps it).
pub const EGRESS_CA_FILE: &str = "/usr/local/share/ca-certificates/alcove-egress.crt";
/// The system trust bundle the agent adds it to, between [`EGRESS_CA_BEGIN`] and [`EGRESS_CA_END`].
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
pub const EGRESS_CA_BEGIN: &str = "# alcove egress CA: begin";
pub const EGRESS_CA_END: &str = "# alcove egress CA: end";

/// An error and its sources on one line (`what failed: why: root cause`), the form every error
/// message takes on both sides: the agent's and the interpreter's error bodies (which reach the
/// host, the SDK and the LLM reading them verbatim) and the host's messages about a sandbox. A log
/// line may record the error itself instead (`error = &e as &dyn Error`); the subscriber prints
/// its sources.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chain_names_every_cause_in_order() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("starting the kernel")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = Outer(std::io::Error::other("no such file"));
        assert_eq!(error_chain(&e), "starting the kernel: no such file");
    }

    #[test]
    fn init_request_speaks_envd_json() {
        let req = InitRequest {
            env_vars: Some([("A".to_owned(), "1".to_owned())].into()),
            access_token: Some("tok".into()),
            timestamp: Some("2026-11-22T18:23:00Z".into()),
            default_user: Some("user".into()),
            default_workdir: Some("/home/user".into()),
            hostname: Some("sbx".into()),
            entropy: Some("AAAA".into()),
            sandbox_id: Some("sbx".into()),
            egress_ca: Some("PEM".into()),
        };
        assert_eq!(
            serde_json::to_string(&req).unwrap(),
            r#"{"envVars":{"A":"1"},"accessToken":"tok","timestamp":"2026-11-22T18:23:00Z","defaultUser":"user","defaultWorkdir":"/home/user","hostname":"sbx","entropy":"AAAA","sandboxId":"sbx","egressCa":"PEM"}"#
        );
        let back: InitRequest =
            serde_json::from_str(&serde_json::to_string(&req).unwrap()).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn absent_fields_are_left_out_and_read_as_absent() {
        assert_eq!(
            serde_json::to_string(&InitRequest::default()).unwrap(),
            "{}"
        );
        let req: InitRequest = serde_json::from_str(r#"{"accessToken":null,"unknown":1}"#).unwrap();
        assert_eq!(req, InitRequest::default());
    }
}
