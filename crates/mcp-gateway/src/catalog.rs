//! The servers the gateway can run, and the `--config` JSON that names them.
//!
//! The config is what the SDKs send (`Sandbox.create(mcp={...})`): an object of server name to
//! that server's settings, in the names of E2B's catalog (`e2b/sandbox/mcp.py`). Only servers
//! that need no outside service are supported; they are installed in the `mcp-gateway` template
//! (`templates/mcp-gateway.toml`). Everything else is refused here, by name, before anything
//! starts, so the SDK's "Failed to start MCP gateway" names what to change.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

/// Largest `--config` accepted (the API refuses larger bodies first).
pub const MAX_CONFIG_BYTES: usize = 64 * 1024;
/// Most paths a `filesystem` or `git` entry may name.
const MAX_PATHS: usize = 64;

/// One supported catalog entry: how it is started and which settings it takes.
struct Entry {
    name: &'static str,
    /// The executable installed by the `mcp-gateway` template.
    program: &'static str,
    /// What it is, for error messages and docs.
    what: &'static str,
    settings: Settings,
}

#[derive(Clone, Copy)]
enum Settings {
    /// `{}`: no settings; unknown keys are refused.
    None,
    /// `{"paths": ["/abs", ...]}`, at least one.
    Paths,
    /// `{"paths": [...]}` optional: with one path the server is bound to that repository.
    GitPaths,
}

const CATALOG: &[Entry] = &[
    Entry {
        name: "filesystem",
        program: "mcp-server-filesystem",
        what: "read, write and search files under the given paths",
        settings: Settings::Paths,
    },
    Entry {
        name: "git",
        program: "mcp-server-git",
        what: "status, diff, log and commits of git repositories",
        settings: Settings::GitPaths,
    },
    Entry {
        name: "memory",
        program: "mcp-server-memory",
        what: "a knowledge graph kept in a file in the sandbox",
        settings: Settings::None,
    },
    Entry {
        name: "sequentialthinking",
        program: "mcp-server-sequential-thinking",
        what: "step-by-step problem solving",
        settings: Settings::None,
    },
    Entry {
        name: "time",
        program: "mcp-server-time",
        what: "the current time and time zone conversion",
        settings: Settings::None,
    },
];

/// The names of the supported servers, comma separated (for messages and docs).
pub fn supported_names() -> String {
    CATALOG
        .iter()
        .map(|e| e.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The supported servers with what they do (`name: what`), one a line.
pub fn describe_supported() -> String {
    CATALOG
        .iter()
        .map(|e| format!("{}: {}", e.name, e.what))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The executables of the named servers (`mcp-gateway pull NAME...`, what the SDKs' template
/// builder runs for `add_mcp_server`); unsupported names are refused together.
pub fn programs(names: &[String]) -> Result<Vec<(&'static str, &'static str)>, ConfigError> {
    if names.is_empty() {
        return Err(ConfigError::Empty);
    }
    let unsupported: Vec<String> = names
        .iter()
        .filter(|n| !CATALOG.iter().any(|e| e.name == n.as_str()))
        .map(|n| format!("`{}`", printable(n)))
        .collect();
    if !unsupported.is_empty() {
        return Err(ConfigError::Unsupported(unsupported));
    }
    Ok(names
        .iter()
        .filter_map(|n| CATALOG.iter().find(|e| e.name == n.as_str()))
        .map(|e| (e.name, e.program))
        .collect())
}

/// A server to start: its catalog name and command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSpec {
    pub name: String,
    pub program: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
}

/// What is wrong with a `--config`. The messages reach the SDK caller verbatim (the SDK raises
/// "Failed to start MCP gateway: <stderr>"), so each says what to change.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--config is not valid JSON ({0}): pass an object such as {{\"time\": {{}}}}")]
    Json(String),
    #[error("--config is {0} bytes, more than the {MAX_CONFIG_BYTES} allowed")]
    TooLarge(usize),
    #[error("--config must be a JSON object of server name to settings, e.g. {{\"time\": {{}}}}")]
    NotObject,
    #[error("no MCP server named: name at least one of: {}", supported_names())]
    Empty,
    #[error(
        "unsupported MCP server(s): {}. This gateway runs servers that need no outside service: {}",
        .0.join(", "),
        supported_names()
    )]
    Unsupported(Vec<String>),
    #[error("MCP server `{server}`: {detail}")]
    Settings { server: String, detail: String },
}

/// Parses and checks `--config`: every name must be supported and its settings valid. The
/// result is in the config's order of names (sorted: JSON objects are maps).
pub fn parse(text: &str) -> Result<Vec<ServerSpec>, ConfigError> {
    if text.len() > MAX_CONFIG_BYTES {
        return Err(ConfigError::TooLarge(text.len()));
    }
    let v: Value = serde_json::from_str(text).map_err(|e| ConfigError::Json(e.to_string()))?;
    let Value::Object(map) = v else {
        return Err(ConfigError::NotObject);
    };
    if map.is_empty() {
        return Err(ConfigError::Empty);
    }
    let unsupported: Vec<String> = map
        .keys()
        .filter(|k| !CATALOG.iter().any(|e| e.name == k.as_str()))
        .map(|k| format!("`{}`", printable(k)))
        .collect();
    if !unsupported.is_empty() {
        return Err(ConfigError::Unsupported(unsupported));
    }
    let mut out = Vec::with_capacity(map.len());
    for (name, settings) in &map {
        let entry = CATALOG
            .iter()
            .find(|e| e.name == name.as_str())
            .expect("checked above");
        out.push(spec(entry, settings)?);
    }
    Ok(out)
}

/// A name as it may appear in a message: control characters escaped, long names cut.
fn printable(s: &str) -> String {
    let mut out: String = s.chars().take(64).flat_map(char::escape_debug).collect();
    if s.chars().count() > 64 {
        out.push('…');
    }
    out
}

fn spec(entry: &Entry, settings: &Value) -> Result<ServerSpec, ConfigError> {
    let bad = |detail: String| ConfigError::Settings {
        server: entry.name.to_string(),
        detail,
    };
    let obj = match settings {
        Value::Object(m) => m.clone(),
        Value::Null => serde_json::Map::new(),
        _ => return Err(bad("settings must be an object, e.g. {}".into())),
    };
    let allowed: &[&str] = match entry.settings {
        Settings::None => &[],
        Settings::Paths | Settings::GitPaths => &["paths"],
    };
    if let Some(k) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        let takes = if allowed.is_empty() {
            "takes no settings: pass {}".to_string()
        } else {
            format!("takes only {}", allowed.join(", "))
        };
        return Err(bad(format!(
            "unknown setting `{}`; it {takes}",
            printable(k)
        )));
    }
    let mut args = Vec::new();
    let mut env = BTreeMap::new();
    match entry.settings {
        Settings::None => {}
        Settings::Paths => {
            let paths = paths(obj.get("paths")).map_err(bad)?;
            if paths.is_empty() {
                return Err(bad(
                    "needs \"paths\": the directories it may use, e.g. {\"paths\": [\"/home/user\"]}"
                        .into(),
                ));
            }
            args.extend(paths);
        }
        Settings::GitPaths => {
            let paths = paths(obj.get("paths")).map_err(bad)?;
            // mcp-server-git takes one repository; with none (or several) each tool call names
            // its `repo_path`.
            if let [one] = paths.as_slice() {
                args.push("--repository".into());
                args.push(one.clone());
            }
        }
    }
    if entry.name == "git" {
        // The server runs as root and the repositories are usually the sandbox user's: git's
        // ownership check ("dubious ownership") would refuse every one. The sandbox is the
        // boundary here, so every repository is trusted.
        env.insert("GIT_CONFIG_COUNT".into(), "1".into());
        env.insert("GIT_CONFIG_KEY_0".into(), "safe.directory".into());
        env.insert("GIT_CONFIG_VALUE_0".into(), "*".into());
    }
    if entry.name == "memory" {
        // The graph lives where root can write it and a user of the sandbox can find it.
        env.insert(
            "MEMORY_FILE_PATH".into(),
            "/var/lib/mcp-gateway/memory.jsonl".into(),
        );
    }
    Ok(ServerSpec {
        name: entry.name.to_string(),
        program: entry.program.to_string(),
        args,
        env,
    })
}

/// `paths`: absent or a list of absolute paths.
fn paths(v: Option<&Value>) -> Result<Vec<String>, String> {
    let list = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(_) => return Err("\"paths\" must be a list of absolute paths".into()),
    };
    if list.len() > MAX_PATHS {
        return Err(format!(
            "\"paths\" has {} entries, at most {MAX_PATHS}",
            list.len()
        ));
    }
    list.iter()
        .map(|p| match p {
            Value::String(s)
                if Path::new(s).is_absolute() && s.len() <= 4096 && !s.contains('\0') =>
            {
                Ok(s.clone())
            }
            _ => Err(format!(
                "\"paths\" entries must be absolute paths such as \"/home/user\", got {}",
                printable(&p.to_string())
            )),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_supported_servers_with_their_settings() {
        let s = parse(
            r#"{"time": {}, "filesystem": {"paths": ["/home/user", "/tmp"]}, "memory": null}"#,
        )
        .unwrap();
        let names: Vec<_> = s.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["filesystem", "memory", "time"]);
        assert_eq!(s[0].program, "mcp-server-filesystem");
        assert_eq!(s[0].args, ["/home/user", "/tmp"]);
        assert_eq!(
            s[1].env.get("MEMORY_FILE_PATH").map(String::as_str),
            Some("/var/lib/mcp-gateway/memory.jsonl")
        );
        assert!(s[2].args.is_empty());
    }

    #[test]
    fn git_binds_one_repository_and_leaves_several_to_the_caller() {
        let one = parse(r#"{"git": {"paths": ["/repo"]}}"#).unwrap();
        assert_eq!(one[0].args, ["--repository", "/repo"]);
        // Root's server trusts the user's repositories.
        assert_eq!(one[0].env["GIT_CONFIG_KEY_0"], "safe.directory");
        assert_eq!(one[0].env["GIT_CONFIG_VALUE_0"], "*");
        let two = parse(r#"{"git": {"paths": ["/a", "/b"]}}"#).unwrap();
        assert!(two[0].args.is_empty());
        let none = parse(r#"{"git": {}}"#).unwrap();
        assert!(none[0].args.is_empty());
    }

    #[test]
    fn unsupported_names_are_all_named_with_the_supported_list() {
        let e = parse(r#"{"time": {}, "github": {"personalAccessToken": "x"}, "notion": {}}"#)
            .unwrap_err();
        assert_eq!(
            e,
            ConfigError::Unsupported(vec!["`github`".into(), "`notion`".into()])
        );
        let msg = e.to_string();
        assert!(msg.contains("`github`, `notion`"), "{msg}");
        for name in ["filesystem", "git", "memory", "sequentialthinking", "time"] {
            assert!(msg.contains(name), "{msg}");
        }
    }

    #[test]
    fn pull_knows_the_supported_servers_and_names_the_others() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            programs(&names(&["time", "memory"])).unwrap(),
            [("time", "mcp-server-time"), ("memory", "mcp-server-memory")]
        );
        let e = programs(&names(&["exa", "time", "brave"])).unwrap_err();
        assert_eq!(
            e,
            ConfigError::Unsupported(vec!["`exa`".into(), "`brave`".into()])
        );
        assert_eq!(programs(&[]).unwrap_err(), ConfigError::Empty);
    }

    #[test]
    fn bad_shapes_say_what_to_pass() {
        assert!(matches!(parse("[]"), Err(ConfigError::NotObject)));
        assert!(matches!(parse("{"), Err(ConfigError::Json(_))));
        assert!(matches!(parse("{}"), Err(ConfigError::Empty)));
        let big = format!(r#"{{"time": {{"x": "{}"}}}}"#, "a".repeat(MAX_CONFIG_BYTES));
        assert!(matches!(parse(&big), Err(ConfigError::TooLarge(_))));
        let e = parse(r#"{"time": 3}"#).unwrap_err().to_string();
        assert!(
            e.contains("`time`") && e.contains("must be an object"),
            "{e}"
        );
        let e = parse(r#"{"time": {"zone": "UTC"}}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown setting `zone`") && e.contains("pass {}"),
            "{e}"
        );
        let e = parse(r#"{"filesystem": {}}"#).unwrap_err().to_string();
        assert!(e.contains("needs \"paths\""), "{e}");
        let e = parse(r#"{"filesystem": {"paths": ["relative"]}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("absolute"), "{e}");
        let e = parse(r#"{"filesystem": {"paths": "/tmp"}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("must be a list"), "{e}");
    }

    #[test]
    fn hostile_names_are_escaped_and_cut_in_messages() {
        let name = format!("evil\n{}", "x".repeat(500));
        let cfg = serde_json::json!({ name: {} }).to_string();
        let msg = parse(&cfg).unwrap_err().to_string();
        assert!(!msg.contains('\n'), "{msg}");
        assert!(msg.len() < 400, "{msg}");
    }
}
