//! The `network` part of a create body and `PUT /sandboxes/{id}/network`: parsed and checked into
//! egress rules before anything reaches the backend.

use crate::error::ApiError;

/// The create body's `network` (and top-level `allowInternetAccess`): `allowPublicTraffic` and the
/// egress rules (`allowOut`, `denyOut`), and `maskRequestHost` (the Host header the proxy sends
/// to the sandbox's ports); `dnsServers` is accepted and has nothing to do here (every DNS packet
/// goes to the sandbox's own resolver). Other non-empty fields (transform rules, egress proxies, HTTPS ports) are refused, naming the field and what
/// to do instead, rather than silently ignored.
pub(super) fn parse_network(
    network: &Option<serde_json::Value>,
    allow_internet_access: Option<bool>,
) -> Result<ParsedNetwork, ApiError> {
    let mut public = None;
    let internet = allow_internet_access.unwrap_or(true);
    let map = match network {
        None | Some(serde_json::Value::Null) => {
            let egress = alcove_net::NetworkConfig {
                allow_internet_access: internet,
                ..Default::default()
            };
            return Ok(ParsedNetwork {
                public: None,
                egress,
                mask_request_host: None,
            });
        }
        Some(serde_json::Value::Object(m)) => m,
        Some(_) => {
            return Err(ApiError::InvalidBody {
                detail: "network must be an object".into(),
            });
        }
    };
    let map = &normalize(map, "network.")?;
    for (k, v) in map {
        match (k.as_str(), v) {
            ("allowPublicTraffic", serde_json::Value::Bool(b)) => public = Some(*b),
            ("allowPublicTraffic", serde_json::Value::Null) => {}
            ("allowPublicTraffic", _) => {
                return Err(ApiError::InvalidBody {
                    detail: "network.allowPublicTraffic must be a boolean".into(),
                });
            }
            (_, serde_json::Value::Null) => {}
            (
                "allowOut"
                | "denyOut"
                | "allowInternetAccess"
                | "dnsServers"
                | "maskRequestHost"
                | "rules",
                _,
            ) => {}
            (_, serde_json::Value::Array(a)) if a.is_empty() => {}
            (_, serde_json::Value::Object(o)) if o.is_empty() => {}
            (k, _) => return Err(unsupported(&format!("network.{k}"), k, true)),
        }
    }
    Ok(ParsedNetwork {
        public,
        egress: egress_config(map, internet)?,
        mask_request_host: mask_request_host(map.get("maskRequestHost"))?,
    })
}

/// What a create's `network` asks for.
#[derive(Debug)]
pub(super) struct ParsedNetwork {
    /// `allowPublicTraffic`.
    pub(super) public: Option<bool>,
    pub(super) egress: alcove_net::NetworkConfig,
    /// `maskRequestHost`, checked.
    pub(super) mask_request_host: Option<String>,
}

/// `network.maskRequestHost`: a host name (with an optional `:port`) in which `${PORT}` stands
/// for the sandbox port a request goes to, e.g. `${PORT}-myapp.example.com`.
fn mask_request_host(v: Option<&serde_json::Value>) -> Result<Option<String>, ApiError> {
    let bad = |why: &str| ApiError::InvalidBody {
        detail: format!(
            "network.maskRequestHost {why}: give a host name such as \"${{PORT}}-myapp.example.com\", where ${{PORT}} becomes the sandbox port"
        ),
    };
    let s = match v {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(serde_json::Value::String(s)) => s,
        Some(_) => return Err(bad("must be a string")),
    };
    if s.is_empty() || s.len() > 253 {
        return Err(bad("must be 1 to 253 characters"));
    }
    let bare = s.replace("${PORT}", "1");
    if !bare
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'))
    {
        return Err(bad(
            "may hold only letters, digits, '.', '-', ':' and ${PORT}",
        ));
    }
    Ok(Some(s.clone()))
}

/// The fields of a `network` object under the names this module reads: the SDKs send
/// `allowInternetAccess` as `allow_internet_access` in `PUT .../network` (Python `e2b` 2.63's
/// generated client), so both spellings are taken, and giving both with different values is an
/// error.
fn normalize(
    map: &serde_json::Map<String, serde_json::Value>,
    prefix: &str,
) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
    let mut out = serde_json::Map::new();
    for (k, v) in map {
        let name = match k.as_str() {
            "allow_internet_access" => "allowInternetAccess",
            other => other,
        };
        if let Some(prev) = out.get(name)
            && prev != v
        {
            return Err(ApiError::InvalidBody {
                detail: format!(
                    "{prefix}allowInternetAccess and {prefix}allow_internet_access disagree: send one of them"
                ),
            });
        }
        out.insert(name.to_string(), v.clone());
    }
    Ok(out)
}

/// The refusal for a network field this server does not act on, saying what to do instead.
fn unsupported(field: &str, key: &str, at_create: bool) -> ApiError {
    let supported = if at_create {
        "allowOut, denyOut, allowInternetAccess, rules, allowPublicTraffic, dnsServers and maskRequestHost"
    } else {
        "allowOut, denyOut, allowInternetAccess, rules and dnsServers"
    };
    let instead = match key {
        "egressProxy" => format!(
            "tunnelling the sandbox's outbound traffic through your SOCKS5 proxy is not available; limit egress with allowOut and denyOut (supported network fields: {supported})"
        ),
        "httpsPorts" => format!(
            "the proxy speaks plain HTTP to sandbox ports, so serve plain HTTP on the port and reach it at get_host(port) (supported network fields: {supported})"
        ),
        "allowPublicTraffic" | "maskRequestHost" => {
            format!("{key} is set at create only; PUT /sandboxes/{{id}}/network takes {supported}")
        }
        _ => format!("unknown network field; the supported ones are {supported}"),
    };
    ApiError::UnsupportedField {
        field: field.to_string(),
        instead,
    }
}

/// The egress rules of a create or `PUT .../network` body, checked. Internet access is on when
/// `internet` is and the body does not turn it off.
fn egress_config(
    map: &serde_json::Map<String, serde_json::Value>,
    internet: bool,
) -> Result<alcove_net::NetworkConfig, ApiError> {
    fn list(
        map: &serde_json::Map<String, serde_json::Value>,
        k: &str,
    ) -> Result<Vec<String>, ApiError> {
        match map.get(k) {
            None | Some(serde_json::Value::Null) => Ok(Vec::new()),
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| ApiError::InvalidBody {
                            detail: format!(
                                "network.{k} must be a list of strings (CIDRs, IPs or domains)"
                            ),
                        })
                })
                .collect(),
            Some(_) => Err(ApiError::InvalidBody {
                detail: format!("network.{k} must be a list of strings (CIDRs, IPs or domains)"),
            }),
        }
    }
    let allow_internet_access = match map.get("allowInternetAccess") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Bool(b)) => Some(*b),
        Some(_) => {
            return Err(ApiError::InvalidBody {
                detail: "allowInternetAccess must be a boolean".into(),
            });
        }
    };
    let rules = match map.get("rules") {
        None | Some(serde_json::Value::Null) => Default::default(),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| ApiError::InvalidBody {
            detail: format!(
                "network.rules must map a domain to a list of rules like [{{\"transform\": {{\"headers\": {{\"Authorization\": \"Bearer ${{e2b.secrets.NAME}}\"}}}}}}]: {e}"
            ),
        })?,
    };
    let cfg = alcove_net::NetworkConfig {
        allow_internet_access: internet && allow_internet_access != Some(false),
        allow_out: list(map, "allowOut")?,
        deny_out: list(map, "denyOut")?,
        rules,
    };
    alcove_net::Rules::from_config(&cfg).map_err(|e| ApiError::InvalidBody {
        detail: format!("network: {e}"),
    })?;
    Ok(cfg)
}

/// Refuses a secret placeholder in what would reach the guest (a create's `envVars`): secret
/// values never enter a sandbox, and a placeholder there would arrive as the literal text.
pub(super) fn refuse_placeholders_in_envs(
    envs: &std::collections::BTreeMap<String, String>,
) -> Result<(), ApiError> {
    for (k, v) in envs {
        if alcove_net::secrets::has_placeholder(v.as_bytes())
            || alcove_net::secrets::has_placeholder(k.as_bytes())
        {
            return Err(ApiError::InvalidBody {
                detail: format!(
                    "envVars[{k:?}] holds a ${{e2b...}} placeholder: secret values never enter the sandbox, so a placeholder there would stay literal text. Put it in a header the egress proxy sets for the host that needs it: network.rules[\"api.example.com\"] = [{{\"transform\": {{\"headers\": {{\"Authorization\": \"Bearer ${{e2b.secrets.NAME}}\"}}}}}}]"
                ),
            });
        }
    }
    Ok(())
}

impl super::Service {
    /// Refuses network rules that use a secret the team does not have, naming it (a typo would
    /// otherwise surface only as a failed request from inside the sandbox).
    pub(super) async fn check_secret_refs(
        &self,
        team_id: &str,
        cfg: &alcove_net::NetworkConfig,
    ) -> Result<(), ApiError> {
        if cfg.rules.is_empty() {
            return Ok(());
        }
        let names = alcove_net::Rules::from_config(cfg)
            .map_err(|e| ApiError::InvalidBody {
                detail: format!("network: {e}"),
            })?
            .secret_names();
        let missing = self.missing_secrets(team_id, &names).await?;
        if missing.is_empty() {
            return Ok(());
        }
        Err(ApiError::InvalidBody {
            detail: format!(
                "network.rules use secrets this team does not have: {}. Create them first (Secret.create(name, value), POST /secrets) or fix the names in the ${{e2b.secrets.NAME}} placeholders",
                missing.join(", ")
            ),
        })
    }
}

/// `PUT /sandboxes/{id}/network`: the new rules, replacing the old ones whole (omitted fields are
/// cleared, as in E2B).
pub fn network_update(body: &serde_json::Value) -> Result<alcove_net::NetworkConfig, ApiError> {
    let Some(map) = body.as_object() else {
        return Err(ApiError::InvalidBody {
            detail: "the body must be a JSON object like {\"allowOut\": [...], \"denyOut\": [...]}"
                .into(),
        });
    };
    let map = &normalize(map, "")?;
    for (k, v) in map {
        let empty = v.is_null()
            || v.as_array().is_some_and(|a| a.is_empty())
            || v.as_object().is_some_and(|o| o.is_empty());
        if !matches!(
            k.as_str(),
            "allowOut" | "denyOut" | "allowInternetAccess" | "dnsServers" | "rules"
        ) && !empty
        {
            return Err(unsupported(k, k, false));
        }
    }
    egress_config(map, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn message(e: ApiError) -> String {
        let r = axum::response::IntoResponse::into_response(e);
        assert_eq!(r.status(), axum::http::StatusCode::BAD_REQUEST);
        let b = futures::executor::block_on(axum::body::to_bytes(r.into_body(), 1 << 16)).unwrap();
        serde_json::from_slice::<serde_json::Value>(&b).unwrap()["message"]
            .as_str()
            .unwrap()
            .to_string()
    }

    #[test]
    fn the_update_takes_the_sdks_snake_case_internet_switch() {
        // What `update_network({"allow_internet_access": False})` sends (e2b 2.63).
        let cfg = network_update(&json!({"allow_internet_access": false})).unwrap();
        assert!(!cfg.allow_internet_access);
        let cfg = network_update(&json!({"allow_internet_access": true, "allowOut": []})).unwrap();
        assert!(cfg.allow_internet_access);
        let cfg = network_update(&json!({"allowInternetAccess": false})).unwrap();
        assert!(!cfg.allow_internet_access);
        let e =
            network_update(&json!({"allowInternetAccess": false, "allow_internet_access": true}))
                .unwrap_err();
        assert!(message(e).contains("disagree"));
        let n = parse_network(&Some(json!({"allow_internet_access": false})), None).unwrap();
        assert!(!n.egress.allow_internet_access);
    }

    #[test]
    fn refusals_name_the_field_sent_and_what_to_do() {
        let cases = [
            (
                json!({"httpsPorts": [3000]}),
                "'network.httpsPorts'",
                "plain HTTP",
            ),
            (
                json!({"egressProxy": {"address": "p:1080"}}),
                "'network.egressProxy'",
                "SOCKS5",
            ),
            (
                json!({"allowOutt": ["x.com"]}),
                "'network.allowOutt'",
                "supported ones are allowOut",
            ),
        ];
        for (body, field, hint) in cases {
            let m = message(parse_network(&Some(body.clone()), None).unwrap_err());
            assert!(m.contains(field) && m.contains(hint), "{body}: {m}");
        }
        let m = message(network_update(&json!({"rules": {"h": [{}]}})).unwrap_err());
        assert!(
            m.contains("rules[h]") && m.contains("not a domain name"),
            "{m}"
        );
        let m = message(network_update(&json!({"rules": {"a.example.com": {}}})).unwrap_err());
        assert!(m.contains("network.rules must map a domain"), "{m}");
        let m = message(network_update(&json!({"maskRequestHost": "x"})).unwrap_err());
        assert!(m.contains("set at create only"), "{m}");
    }

    #[test]
    fn rules_are_taken_at_create_and_in_updates_and_placeholders_stay_out_of_envs() {
        let rules = json!({"api.example.com": [{"transform": {"headers": {"Authorization": "Bearer ${e2b.secrets.Key}"}}}]});
        let n = parse_network(&Some(json!({"rules": rules.clone()})), None).unwrap();
        let r = alcove_net::Rules::from_config(&n.egress).unwrap();
        assert_eq!(r.secret_names(), vec!["key"]);
        let u = network_update(&json!({"rules": rules, "allow_internet_access": false})).unwrap();
        assert_eq!(u.rules.len(), 1);
        assert!(!u.allow_internet_access);
        let envs = [("TOKEN".to_string(), "${e2b.secrets.key}".to_string())].into();
        let m = message(refuse_placeholders_in_envs(&envs).unwrap_err());
        assert!(
            m.contains("envVars[\"TOKEN\"]") && m.contains("network.rules"),
            "{m}"
        );
        refuse_placeholders_in_envs(&[("A".to_string(), "b".to_string())].into()).unwrap();
    }

    #[test]
    fn the_request_host_mask_is_checked_and_fills_in_the_port() {
        let n = parse_network(
            &Some(json!({"maskRequestHost": "${PORT}-app.example.com"})),
            None,
        )
        .unwrap();
        let mask = n.mask_request_host.unwrap();
        assert_eq!(
            crate::proxy::masked_host(&mask, 3000),
            "3000-app.example.com"
        );
        for bad in [json!(""), json!(3), json!("a b"), json!("x\r\nX-Evil: 1")] {
            let m =
                message(parse_network(&Some(json!({"maskRequestHost": bad})), None).unwrap_err());
            assert!(m.contains("network.maskRequestHost"), "{m}");
        }
    }
}
