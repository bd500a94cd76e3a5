//! Secrets in egress: the `${e2b.secrets.NAME}` placeholders a sandbox's network rules carry, and
//! the source the egress proxy asks for their values when it forwards a request. Values exist
//! on the host only, for the time one request's headers are built; the guest, records and logs
//! only ever hold placeholders.

use std::future::Future;
use std::pin::Pin;

/// What every placeholder starts with (E2B's SDK: `Secret.fill(name)`).
pub const PLACEHOLDER_PREFIX: &str = "${e2b.secrets.";
/// Any E2B runtime placeholder (secrets, workload identity tokens): refused wherever it would
/// reach the guest or leave the host unsubstituted.
pub const ANY_PLACEHOLDER: &str = "${e2b.";

/// A secret's value, wiped from memory when dropped.
pub type SecretValue = zeroize::Zeroizing<Vec<u8>>;

/// Why a value could not be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretLookupError {
    #[error(
        "the secret {0:?} does not exist for this sandbox's team: create it (Secret.create) or fix the network rule"
    )]
    NotFound(String),
    #[error("the secret store is unavailable: {0}")]
    Unavailable(String),
}

/// A lookup under way ([`SecretSource::resolve`]).
pub type Resolving<'a> =
    Pin<Box<dyn Future<Output = Result<SecretValue, SecretLookupError>> + Send + 'a>>;

/// Where the egress proxy gets secret values: the server's encrypted secret store (or, on a
/// cluster node, the control plane's, through the link).
pub trait SecretSource: Send + Sync + 'static {
    /// The current value of the secret `name` (already lower-cased) of the team that owns
    /// `sandbox_id`.
    fn resolve<'a>(&'a self, sandbox_id: &'a str, name: &'a str) -> Resolving<'a>;
}

/// One piece of a header template: literal text or a secret's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    Secret(String),
}

/// Why a template is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("a placeholder starting at byte {0} has no closing '}}'")]
    Unclosed(usize),
    #[error(
        "the placeholder {0:?} names no secret: use Secret.fill(\"name\"), which gives ${{e2b.secrets.name}}"
    )]
    Empty(String),
    #[error(
        "the placeholder {0:?} is not a secret: Alcove substitutes only ${{e2b.secrets.NAME}} (workload identity tokens are not supported)"
    )]
    Unsupported(String),
}

/// Splits `s` into text and secret names (lower-cased, as the store keeps them).
pub fn parse_template(s: &str) -> Result<Vec<Piece>, TemplateError> {
    let mut out = Vec::new();
    let mut rest = s;
    let mut at = 0usize;
    while let Some(i) = rest.find(ANY_PLACEHOLDER) {
        if i > 0 {
            out.push(Piece::Text(rest[..i].to_string()));
        }
        let tail = &rest[i..];
        let Some(end) = tail.find('}') else {
            return Err(TemplateError::Unclosed(at + i));
        };
        let whole = &tail[..=end];
        let Some(name) = whole
            .strip_prefix(PLACEHOLDER_PREFIX)
            .and_then(|n| n.strip_suffix('}'))
        else {
            return Err(TemplateError::Unsupported(whole.to_string()));
        };
        if name.trim().is_empty() {
            return Err(TemplateError::Empty(whole.to_string()));
        }
        out.push(Piece::Secret(name.to_lowercase()));
        at += i + end + 1;
        rest = &tail[end + 1..];
    }
    if !rest.is_empty() {
        out.push(Piece::Text(rest.to_string()));
    }
    Ok(out)
}

/// The secret names `s` refers to, in order, repeated ones once.
pub fn referenced(s: &str) -> Result<Vec<String>, TemplateError> {
    let mut names: Vec<String> = Vec::new();
    for p in parse_template(s)? {
        if let Piece::Secret(n) = p
            && !names.contains(&n)
        {
            names.push(n);
        }
    }
    Ok(names)
}

/// Whether `bytes` hold anything that looks like a runtime placeholder.
pub fn has_placeholder(bytes: &[u8]) -> bool {
    bytes
        .windows(ANY_PLACEHOLDER.len())
        .any(|w| w == ANY_PLACEHOLDER.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_split_into_text_and_lower_cased_names() {
        assert_eq!(
            parse_template("Bearer ${e2b.secrets.OpenAI-Key} and ${e2b.secrets.b}!").unwrap(),
            vec![
                Piece::Text("Bearer ".into()),
                Piece::Secret("openai-key".into()),
                Piece::Text(" and ".into()),
                Piece::Secret("b".into()),
                Piece::Text("!".into()),
            ]
        );
        assert_eq!(
            parse_template("plain").unwrap(),
            vec![Piece::Text("plain".into())]
        );
        assert_eq!(
            referenced("${e2b.secrets.a}${e2b.secrets.A}x").unwrap(),
            vec!["a"]
        );
    }

    #[test]
    fn malformed_and_foreign_placeholders_are_refused() {
        assert_eq!(
            parse_template("x ${e2b.secrets.a"),
            Err(TemplateError::Unclosed(2))
        );
        assert!(matches!(
            parse_template("${e2b.secrets.}"),
            Err(TemplateError::Empty(_))
        ));
        assert!(matches!(
            parse_template("${e2b.identity.tokens.aws}"),
            Err(TemplateError::Unsupported(_))
        ));
        assert!(has_placeholder(b"GET /?k=${e2b.secrets.a} HTTP/1.1"));
        assert!(!has_placeholder(b"${e2b"));
    }
}
