//! The build context of a Dockerfile build: which files a `COPY` step uploads, their
//! `filesHash`, and the tar.gz the server extracts.
//!
//! Mirrors the SDKs (`e2b/template/utils.py`): entries are named by their path relative to the
//! context (`COPY dir /app/` uploads `dir`, `dir/a`, …; the server places them as Docker does), a
//! directory brings everything under it, symlinks are archived as links and never followed, and
//! `.dockerignore` (Docker's syntax: globs with `**`, `!` exceptions, the last match wins, a
//! pattern that matches a directory excludes what is under it) is honoured. The hash covers the
//! instruction (`COPY src dest`) and each file's relative path, mode, size and contents (or link
//! target), not owners or times, so an unchanged context hashes the same on any machine and the
//! server finds it `present`; it is the SDK's `calculate_files_hash` value for the same files.
//!
//! Only paths inside the context are read: sources are relative and may not leave it, and a
//! source whose parent directories resolve (through symlinks) outside the context is refused.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use regex::Regex;
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error(
        "the build context {0} is not a directory: pass the directory COPY sources are in with --context"
    )]
    NotADir(PathBuf),
    #[error("reading {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error(
        "COPY {0}: nothing in the build context matches (check the path, --context and .dockerignore)"
    )]
    NoMatch(String),
    #[error("COPY {0}: the source leaves the build context (through `..` or a symlink)")]
    Escapes(String),
    #[error(".dockerignore line `{0}` is not a valid pattern")]
    Pattern(String),
    #[error("writing the archive")]
    Archive(#[source] std::io::Error),
}

/// A directory whose files `COPY` sources name.
pub struct Context {
    root: PathBuf,
    ignore: Ignore,
}

/// One archived path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Relative to the context, `/`-separated.
    pub rel: String,
    pub kind: EntryKind,
    /// `st_mode` (type and permission bits).
    pub mode: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    File { size: u64 },
    Dir,
    Symlink { target: PathBuf },
}

impl Context {
    /// The context at `dir`, with its `.dockerignore` if any.
    pub fn open(dir: &Path) -> Result<Self, ContextError> {
        let root = dir
            .canonicalize()
            .map_err(|e| ContextError::Read(dir.to_owned(), e))?;
        if !root.is_dir() {
            return Err(ContextError::NotADir(dir.to_owned()));
        }
        let ignore_file = root.join(".dockerignore");
        let ignore = match fs::read_to_string(&ignore_file) {
            Ok(text) => Ignore::parse(&text)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ignore::default(),
            Err(e) => return Err(ContextError::Read(ignore_file, e)),
        };
        Ok(Context { root, ignore })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// What `COPY src …` uploads, sorted by path. `src` may be a glob (`*.py`).
    pub fn entries(&self, src: &str) -> Result<Vec<Entry>, ContextError> {
        let clean = clean_rel(src).ok_or_else(|| ContextError::Escapes(src.to_owned()))?;
        let mut out = Vec::new();
        if clean.contains(['*', '?', '[']) {
            let re = glob_regex(&clean).ok_or_else(|| ContextError::NoMatch(src.to_owned()))?;
            let mut all = Vec::new();
            self.walk(&self.root, "", &mut all)?;
            let matched: Vec<Entry> = all.into_iter().filter(|e| re.is_match(&e.rel)).collect();
            for e in matched {
                // A directory that a glob matches brings what is under it.
                if e.kind == EntryKind::Dir && !out.iter().any(|o: &Entry| under(&e.rel, &o.rel)) {
                    let path = self.root.join(&e.rel);
                    let rel = e.rel.clone();
                    out.push(e);
                    self.walk(&path, &rel, &mut out)?;
                } else if !out.iter().any(|o: &Entry| under(&e.rel, &o.rel)) {
                    out.push(e);
                }
            }
        } else if clean.is_empty() {
            self.walk(&self.root, "", &mut out)?;
        } else {
            let path = self.root.join(&clean);
            // Every parent must resolve inside the context: no symlinked way out.
            let parent = path.parent().unwrap_or(&self.root);
            let real_parent = parent
                .canonicalize()
                .map_err(|_| ContextError::NoMatch(src.to_owned()))?;
            if !real_parent.starts_with(&self.root) {
                return Err(ContextError::Escapes(src.to_owned()));
            }
            if self.ignore.excludes(&clean) {
                return Err(ContextError::NoMatch(src.to_owned()));
            }
            let entry = match entry_of(&path, &clean) {
                Ok(Some(e)) => e,
                Ok(None) => return Err(ContextError::NoMatch(src.into())),
                Err(ContextError::Read(_, e)) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(ContextError::NoMatch(src.into()));
                }
                Err(e) => return Err(e),
            };
            let is_dir = entry.kind == EntryKind::Dir;
            out.push(entry);
            if is_dir {
                self.walk(&path, &clean, &mut out)?;
            }
        }
        if out.is_empty() {
            return Err(ContextError::NoMatch(src.to_owned()));
        }
        out.sort_by(|a, b| a.rel.cmp(&b.rel));
        out.dedup_by(|a, b| a.rel == b.rel);
        Ok(out)
    }

    /// Everything under `dir` (relative path `rel`) that `.dockerignore` keeps.
    fn walk(&self, dir: &Path, rel: &str, out: &mut Vec<Entry>) -> Result<(), ContextError> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .map_err(|e| ContextError::Read(dir.to_owned(), e))?
            .map(|d| d.map(|d| d.file_name()))
            .collect::<Result<_, _>>()
            .map_err(|e| ContextError::Read(dir.to_owned(), e))?;
        names.sort();
        for name in names {
            let Some(name) = name.to_str().map(str::to_owned) else {
                continue;
            };
            let child_rel = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let path = dir.join(&name);
            let ignored = self.ignore.excludes(&child_rel);
            let Some(entry) = entry_of(&path, &child_rel)? else {
                continue;
            };
            let is_dir = entry.kind == EntryKind::Dir;
            if !ignored {
                out.push(entry);
            }
            if is_dir && (!ignored || self.ignore.has_exceptions) {
                self.walk(&path, &child_rel, out)?;
            }
        }
        Ok(())
    }

    /// The step's `filesHash`: sha256 over `COPY src dest` and each entry's path, mode, size and
    /// contents (or link target).
    pub fn files_hash(&self, src: &str, dest: &str) -> Result<String, ContextError> {
        let mut h = Sha256::new();
        h.update(format!("COPY {src} {dest}").as_bytes());
        for e in self.entries(src)? {
            h.update(e.rel.as_bytes());
            h.update(e.mode.to_string().as_bytes());
            match &e.kind {
                EntryKind::Dir => {}
                EntryKind::Symlink { target } => {
                    // The SDK hashes a link's lstat size, then its target.
                    h.update(target.as_os_str().len().to_string().as_bytes());
                    h.update(target.as_os_str().as_encoded_bytes());
                }
                EntryKind::File { size } => {
                    h.update(size.to_string().as_bytes());
                    let path = self.root.join(&e.rel);
                    let mut f = fs::File::open(&path)
                        .map_err(|err| ContextError::Read(path.clone(), err))?;
                    let mut buf = vec![0u8; 1 << 20];
                    loop {
                        let n = f
                            .read(&mut buf)
                            .map_err(|err| ContextError::Read(path.clone(), err))?;
                        if n == 0 {
                            break;
                        }
                        h.update(&buf[..n]);
                    }
                }
            }
        }
        Ok(hex::encode(h.finalize()))
    }

    /// The tar.gz of what `COPY src …` uploads.
    pub fn archive(&self, src: &str) -> Result<Vec<u8>, ContextError> {
        let entries = self.entries(src)?;
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        let mut tar = tar::Builder::new(gz);
        for e in &entries {
            let mut header = tar::Header::new_gnu();
            header.set_mode(e.mode & 0o7777);
            header.set_mtime(0);
            header.set_uid(0);
            header.set_gid(0);
            let path = self.root.join(&e.rel);
            let res = match &e.kind {
                EntryKind::Dir => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_size(0);
                    tar.append_data(&mut header, &e.rel, std::io::empty())
                }
                EntryKind::Symlink { target } => {
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_size(0);
                    tar.append_link(&mut header, &e.rel, target)
                }
                EntryKind::File { size } => {
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_size(*size);
                    let f = fs::File::open(&path)
                        .map_err(|err| ContextError::Read(path.clone(), err))?;
                    // A file that changed size since it was listed would corrupt the archive.
                    tar.append_data(&mut header, &e.rel, f.take(*size))
                }
            };
            res.map_err(ContextError::Archive)?;
        }
        let gz = tar.into_inner().map_err(ContextError::Archive)?;
        let mut gz = gz;
        gz.flush().map_err(ContextError::Archive)?;
        gz.finish().map_err(ContextError::Archive)
    }
}

/// An entry for `path` (never following a symlink), `None` for what a tar of a context does
/// not carry (sockets, devices, FIFOs).
fn entry_of(path: &Path, rel: &str) -> Result<Option<Entry>, ContextError> {
    let md = fs::symlink_metadata(path).map_err(|e| ContextError::Read(path.to_owned(), e))?;
    let ft = md.file_type();
    let kind = if ft.is_symlink() {
        EntryKind::Symlink {
            target: fs::read_link(path).map_err(|e| ContextError::Read(path.to_owned(), e))?,
        }
    } else if ft.is_dir() {
        EntryKind::Dir
    } else if ft.is_file() {
        EntryKind::File { size: md.len() }
    } else {
        return Ok(None);
    };
    Ok(Some(Entry {
        rel: rel.to_owned(),
        kind,
        mode: md.mode(),
    }))
}

/// `src` as a clean relative path (`""` for the context itself), `None` if it leaves it.
fn clean_rel(src: &str) -> Option<String> {
    if src.starts_with('/') {
        return None;
    }
    let mut parts: Vec<&str> = Vec::new();
    for p in src.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    Some(parts.join("/"))
}

/// `path` is `dir` or below it.
fn under(path: &str, dir: &str) -> bool {
    path == dir || path.strip_prefix(dir).is_some_and(|r| r.starts_with('/'))
}

/// A glob (Go's `filepath.Match` plus `**`, as Docker reads `.dockerignore`) as an anchored
/// regex over `/`-separated relative paths.
fn glob_regex(pattern: &str) -> Option<Regex> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut re = String::from("^");
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '*' if chars.get(i + 1) == Some(&'*') => {
                if chars.get(i + 2) == Some(&'/') {
                    re.push_str("(?:.*/)?");
                    i += 3;
                } else {
                    re.push_str(".*");
                    i += 2;
                }
                continue;
            }
            '*' => re.push_str("[^/]*"),
            '?' => re.push_str("[^/]"),
            '[' => {
                let close = chars[i + 1..].iter().position(|&c| c == ']')? + i + 1;
                let mut class: String = chars[i + 1..close].iter().collect();
                if let Some(rest) = class.strip_prefix('^').or_else(|| class.strip_prefix('!')) {
                    class = format!("^{}", rest.replace('\\', "\\\\"));
                } else {
                    class = class.replace('\\', "\\\\");
                }
                re.push('[');
                re.push_str(&class);
                re.push(']');
                i = close + 1;
                continue;
            }
            '\\' if i + 1 < chars.len() => {
                re.push_str(&regex::escape(&chars[i + 1].to_string()));
                i += 2;
                continue;
            }
            c => re.push_str(&regex::escape(&c.to_string())),
        }
        i += 1;
    }
    re.push('$');
    Regex::new(&re).ok()
}

/// `.dockerignore`'s rules.
#[derive(Default)]
struct Ignore {
    rules: Vec<(Regex, bool)>,
    has_exceptions: bool,
}

impl Ignore {
    fn parse(text: &str) -> Result<Self, ContextError> {
        let mut ig = Ignore::default();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (exception, pat) = match line.strip_prefix('!') {
                Some(p) => (true, p.trim()),
                None => (false, line),
            };
            let pat = clean_rel(pat.trim_start_matches('/'))
                .ok_or_else(|| ContextError::Pattern(line.to_owned()))?;
            if pat.is_empty() {
                continue;
            }
            let re = glob_regex(&pat).ok_or_else(|| ContextError::Pattern(line.to_owned()))?;
            ig.has_exceptions |= exception;
            ig.rules.push((re, exception));
        }
        Ok(ig)
    }

    /// Whether `rel` is excluded: the last rule that matches it or one of its parents decides.
    fn excludes(&self, rel: &str) -> bool {
        let mut excluded = false;
        for (re, exception) in &self.rules {
            let mut hit = re.is_match(rel);
            let mut p = rel;
            while !hit {
                match p.rfind('/') {
                    Some(i) => {
                        p = &p[..i];
                        hit = re.is_match(p);
                    }
                    None => break,
                }
            }
            if hit {
                excluded = !exception;
            }
        }
        excluded
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{PermissionsExt, symlink};

    fn tree() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::write(r.join("a.txt"), "alpha").unwrap();
        fs::create_dir_all(r.join("dir/sub")).unwrap();
        fs::write(r.join("dir/one.py"), "1").unwrap();
        fs::write(r.join("dir/sub/two.py"), "2").unwrap();
        fs::write(r.join("dir/skip.log"), "x").unwrap();
        fs::set_permissions(r.join("dir/one.py"), fs::Permissions::from_mode(0o755)).unwrap();
        d
    }

    fn rels(es: &[Entry]) -> Vec<&str> {
        es.iter().map(|e| e.rel.as_str()).collect()
    }

    #[test]
    fn a_file_and_a_dir_are_named_relative_to_the_context() {
        let d = tree();
        let c = Context::open(d.path()).unwrap();
        assert_eq!(rels(&c.entries("a.txt").unwrap()), ["a.txt"]);
        assert_eq!(rels(&c.entries("./a.txt").unwrap()), ["a.txt"]);
        assert_eq!(
            rels(&c.entries("dir").unwrap()),
            [
                "dir",
                "dir/one.py",
                "dir/skip.log",
                "dir/sub",
                "dir/sub/two.py"
            ]
        );
        assert_eq!(rels(&c.entries("dir/*.py").unwrap()), ["dir/one.py"]);
        assert_eq!(
            rels(&c.entries("dir/**/*.py").unwrap()),
            ["dir/one.py", "dir/sub/two.py"]
        );
        assert!(matches!(c.entries("nope"), Err(ContextError::NoMatch(_))));
        assert!(matches!(c.entries("../x"), Err(ContextError::Escapes(_))));
    }

    #[test]
    fn dockerignore_excludes_with_exceptions() {
        let d = tree();
        fs::write(
            d.path().join(".dockerignore"),
            "# comment\n*.log\ndir/**\n!dir/sub\n**/two.py\n!dir/sub/two.py\n",
        )
        .unwrap();
        let c = Context::open(d.path()).unwrap();
        assert_eq!(
            rels(&c.entries("dir").unwrap()),
            ["dir", "dir/sub", "dir/sub/two.py"]
        );
        assert!(matches!(
            c.entries("dir/one.py"),
            Err(ContextError::NoMatch(_))
        ));
        let all = rels(&c.entries(".").unwrap()).join(",");
        assert!(all.contains("a.txt") && !all.contains("skip.log"), "{all}");
    }

    #[test]
    fn symlinks_are_kept_as_links_and_never_followed_out() {
        let d = tree();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), "s").unwrap();
        symlink(outside.path(), d.path().join("out")).unwrap();
        symlink("a.txt", d.path().join("link")).unwrap();
        let c = Context::open(d.path()).unwrap();
        assert!(matches!(
            c.entries("out/secret"),
            Err(ContextError::Escapes(_))
        ));
        let es = c.entries("out").unwrap();
        assert_eq!(es.len(), 1);
        assert!(matches!(es[0].kind, EntryKind::Symlink { .. }));
        let es = c.entries("link").unwrap();
        assert_eq!(
            es[0].kind,
            EntryKind::Symlink {
                target: "a.txt".into()
            }
        );
    }

    #[test]
    fn files_hash_is_stable_and_sees_every_change() {
        let d = tree();
        let c = Context::open(d.path()).unwrap();
        let h1 = c.files_hash("dir", "/app/").unwrap();
        assert_eq!(h1.len(), 64);
        assert_eq!(h1, c.files_hash("dir", "/app/").unwrap());
        // mtime is not part of it
        let f = fs::File::options()
            .write(true)
            .open(d.path().join("dir/one.py"))
            .unwrap();
        f.set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(h1, c.files_hash("dir", "/app/").unwrap());
        // but the destination, contents, modes and names are
        assert_ne!(h1, c.files_hash("dir", "/other/").unwrap());
        fs::write(d.path().join("dir/sub/two.py"), "3").unwrap();
        let h2 = c.files_hash("dir", "/app/").unwrap();
        assert_ne!(h1, h2);
        fs::set_permissions(
            d.path().join("dir/sub/two.py"),
            fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let h3 = c.files_hash("dir", "/app/").unwrap();
        assert_ne!(h2, h3);
        fs::rename(
            d.path().join("dir/sub/two.py"),
            d.path().join("dir/sub/three.py"),
        )
        .unwrap();
        assert_ne!(h3, c.files_hash("dir", "/app/").unwrap());
        // the same tree elsewhere hashes the same
        let d2 = tree();
        let d3 = tree();
        assert_eq!(
            Context::open(d2.path())
                .unwrap()
                .files_hash("dir", "/app/")
                .unwrap(),
            Context::open(d3.path())
                .unwrap()
                .files_hash("dir", "/app/")
                .unwrap()
        );
    }

    #[test]
    fn archive_layout_is_the_sdks() {
        let d = tree();
        symlink("one.py", d.path().join("dir/link.py")).unwrap();
        let c = Context::open(d.path()).unwrap();
        let gz = c.archive("dir").unwrap();
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(&gz[..]));
        let mut seen = Vec::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let mode = e.header().mode().unwrap();
            let kind = e.header().entry_type();
            let mut body = String::new();
            if kind.is_file() {
                e.read_to_string(&mut body).unwrap();
            }
            if kind.is_symlink() {
                body = e
                    .link_name()
                    .unwrap()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
            }
            seen.push((path, mode & 0o777, body));
        }
        let names: Vec<&str> = seen.iter().map(|s| s.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "dir",
                "dir/link.py",
                "dir/one.py",
                "dir/skip.log",
                "dir/sub",
                "dir/sub/two.py"
            ]
        );
        let one = seen.iter().find(|s| s.0 == "dir/one.py").unwrap();
        assert_eq!((one.1, one.2.as_str()), (0o755, "1"));
        let link = seen.iter().find(|s| s.0 == "dir/link.py").unwrap();
        assert_eq!(link.2, "one.py");
        let gz = c.archive("a.txt").unwrap();
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(&gz[..]));
        let names: Vec<String> = ar
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["a.txt"]);
    }
}

#[cfg(test)]
mod sdk_parity {
    use super::*;
    use std::os::unix::fs::{PermissionsExt, symlink};

    /// The hashes e2b==2.63.0's `calculate_files_hash(src, dest, ctx, [], False, None)` gives for
    /// this tree (computed with the SDK): a build from the CLI and one from the SDK share cached
    /// uploads and layers.
    #[test]
    fn files_hash_equals_the_sdks() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("dir/sub")).unwrap();
        fs::write(r.join("a.txt"), "alpha").unwrap();
        fs::write(r.join("dir/one.py"), "1").unwrap();
        fs::write(r.join("dir/sub/two.py"), "2").unwrap();
        symlink("one.py", r.join("dir/link.py")).unwrap();
        for (p, m) in [
            ("a.txt", 0o644),
            ("dir/sub/two.py", 0o644),
            ("dir/one.py", 0o755),
            ("dir", 0o755),
            ("dir/sub", 0o755),
        ] {
            fs::set_permissions(r.join(p), fs::Permissions::from_mode(m)).unwrap();
        }
        let c = Context::open(r).unwrap();
        assert_eq!(
            c.files_hash("a.txt", "/app/").unwrap(),
            "1f632f0aa354a3354bef371323392c036f6d10ca2c9fe982778789b2947b3adb"
        );
        assert_eq!(
            c.files_hash("dir", "/app/").unwrap(),
            "8546c189ef5030482edc999ff769b81b2f7e0160c580a69acc5232248eb0b5d8"
        );
        assert_eq!(
            c.files_hash("dir/*.py", "/x/").unwrap(),
            "ffbb7b5bb712778c76d323b4f03be878dd5b26e64b09deed0ca62ced0f7575a2"
        );
    }
}
