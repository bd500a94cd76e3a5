//! The `network` part of a create body and `PUT /sandboxes/{id}/network`: parsed and checked into
//! egress rules before anything reaches the backend.

use crate::error::ApiError;

/// The create body's `network` (and top-level `allowInternetAccess`): `allowPublicTraffic` and the
/// egress rules (`allowOut`, `denyOut`); `maskRequestHost` and `dnsServers` are accepted and have
/// nothing to do here (every DNS packet goes to the sandbox's own resolver). Other non-empty
/// fields (transform rules, egress proxies) are refused rather than silently ignored.
pub(super) fn parse_network(
    network: &Option<serde_json::Value>,
    allow_internet_access: Option<bool>,
) -> Result<(Option<bool>, alcove_net::NetworkConfig), ApiError> {
    let mut public = None;
    let internet = allow_internet_access.unwrap_or(true);
    let map = match network {
        None | Some(serde_json::Value::Null) => {
            let cfg = alcove_net::NetworkConfig {
                allow_internet_access: internet,
                ..Default::default()
            };
            return Ok((None, cfg));
        }
        Some(serde_json::Value::Object(m)) => m,
        Some(_) => {
            return Err(ApiError::InvalidBody {
                detail: "network must be an object".into(),
            });
        }
    };
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
                "allowOut" | "denyOut" | "allowInternetAccess" | "dnsServers" | "maskRequestHost",
                _,
            ) => {}
            (_, serde_json::Value::Array(a)) if a.is_empty() => {}
            (_, serde_json::Value::Object(o)) if o.is_empty() => {}
            _ => {
                return Err(ApiError::Unsupported {
                    feature: "network transform rules and egress proxies (network.allowOut, denyOut and allowPublicTraffic are supported)",
                });
            }
        }
    }
    Ok((public, egress_config(map, internet)?))
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
    let cfg = alcove_net::NetworkConfig {
        allow_internet_access: internet && allow_internet_access != Some(false),
        allow_out: list(map, "allowOut")?,
        deny_out: list(map, "denyOut")?,
    };
    alcove_net::Rules::from_config(&cfg).map_err(|e| ApiError::InvalidBody {
        detail: format!("network: {e}"),
    })?;
    Ok(cfg)
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
    for (k, v) in map {
        let empty = v.is_null()
            || v.as_array().is_some_and(|a| a.is_empty())
            || v.as_object().is_some_and(|o| o.is_empty());
        if !matches!(
            k.as_str(),
            "allowOut" | "denyOut" | "allowInternetAccess" | "dnsServers"
        ) && !empty
        {
            return Err(ApiError::Unsupported {
                feature: "network transform rules and egress proxies (allowOut, denyOut and allowInternetAccess are supported)",
            });
        }
    }
    egress_config(map, true)
}
