//! Paths inside a volume, as callers and guests spell them.

use crate::VolError;

/// A path's longest, in bytes.
pub const MAX_PATH: usize = 4096;
/// A name's longest, in bytes (Linux's NAME_MAX).
pub const MAX_COMPONENT: usize = 255;

/// Splits a volume path (`/a/b`, `a/b`, `""` and `/` are the root) into its names. Refuses `..`,
/// NUL bytes, over-long names and paths; drops empty names and `.`.
pub fn components(path: &str) -> Result<Vec<&str>, VolError> {
    let bad = |why| VolError::InvalidPath(path.to_owned(), why);
    if path.len() > MAX_PATH {
        return Err(bad("longer than 4096 bytes"));
    }
    if path.contains('\0') {
        return Err(bad("it contains a NUL byte"));
    }
    let mut out = Vec::new();
    for name in path.split('/') {
        match name {
            "" | "." => {}
            ".." => {
                return Err(bad(
                    "'..' is not allowed; name paths from the volume's root",
                ));
            }
            n if n.len() > MAX_COMPONENT => return Err(bad("a name is longer than 255 bytes")),
            n => out.push(n),
        }
    }
    Ok(out)
}

/// `/a/b` from names.
pub(crate) fn display(names: &[&str]) -> String {
    let mut s = String::with_capacity(names.iter().map(|n| n.len() + 1).sum::<usize>().max(1));
    for n in names {
        s.push('/');
        s.push_str(n);
    }
    if s.is_empty() {
        s.push('/');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_and_refuses_escapes() {
        assert_eq!(components("/a//b/./c/").unwrap(), vec!["a", "b", "c"]);
        assert!(components("").unwrap().is_empty());
        assert!(components("/").unwrap().is_empty());
        assert!(components("a/../b").is_err());
        assert!(components("/../../etc/passwd").is_err());
        assert!(components("a\0b").is_err());
        assert!(components(&"x".repeat(256)).is_err());
        assert_eq!(display(&["a", "b"]), "/a/b");
        assert_eq!(display(&[]), "/");
    }
}
