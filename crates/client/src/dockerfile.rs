//! A Dockerfile as E2B build steps, for `alcove template build NAME --dockerfile PATH`.
//!
//! The conversion follows what the SDKs' `Template.from_dockerfile` sends for the same file, so a
//! template built from the CLI and one built from the SDK agree: `USER root` and `WORKDIR /`
//! first (Docker's defaults), one step per instruction (one `COPY` step per source), and at the
//! end `USER user` / `WORKDIR /home/user` unless the Dockerfile set them. Where the SDK departs
//! from Docker this module keeps Docker's meaning and says so:
//! - `ARG` values (`--build-arg K=V` over the default) are substituted in the instructions that
//!   follow and given to `RUN` as exported variables; they are not stored in the template (the
//!   SDK turns them into `ENV`).
//! - `$VAR` / `${VAR}` / `${VAR:-x}` / `${VAR:+x}` are substituted in `FROM`, `COPY`, `ADD`,
//!   `ENV`, `WORKDIR` and `USER` from the `ARG`s and `ENV`s declared so far; a variable the file
//!   does not declare (`$PATH`, from the base) is passed through as written, as the SDK does.
//! - `ADD` of a local file is `COPY`; `ADD` of a URL or of a tar archive (which Docker would
//!   extract) is refused with what to write instead.
//! - `EXPOSE`, `LABEL` and `MAINTAINER` carry no meaning for a template: ignored, with a note.
//!   Anything else (`SHELL`, `HEALTHCHECK`, `VOLUME`, `ONBUILD`, `STOPSIGNAL`, multi-stage
//!   builds, `COPY --from`, heredocs) is refused with an error naming the line.
//!
//! No file is read here: `COPY` sources are checked as paths only (relative, inside the
//! context); [`crate::context`] collects, hashes and archives them.

use std::collections::BTreeMap;

use dockerfile_parser::{BreakableString, BreakableStringComponent, Dockerfile, Instruction};

/// The SDK's `wait_for_timeout(20_000)`: the ready command it pairs with a Dockerfile's start
/// command.
pub const DEFAULT_READY_CMD: &str = "sleep 20";

#[derive(Debug, thiserror::Error)]
pub enum DockerfileError {
    #[error(
        "the Dockerfile does not parse (heredocs and quoted COPY sources are not supported; check the line the cause points at)"
    )]
    Parse(#[source] dockerfile_parser::Error),
    #[error(
        "the Dockerfile has no FROM instruction: start it with `FROM base` (a template) or `FROM <image>`"
    )]
    NoFrom,
    #[error("Dockerfile line {line}: {message}")]
    Line { line: usize, message: String },
}

/// What a Dockerfile asks for, as build steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// `FROM`'s reference, ARGs substituted: a template name or an image.
    pub from: String,
    pub steps: Vec<PlanStep>,
    /// From `CMD`/`ENTRYPOINT` (exec form joined shell-safely).
    pub start_cmd: Option<String>,
    /// [`DEFAULT_READY_CMD`] when there is a start command.
    pub ready_cmd: Option<String>,
    /// What was ignored, one sentence each, for the user.
    pub notes: Vec<String>,
}

/// One step and the Dockerfile line it comes from (0 for the steps the conversion adds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanStep {
    pub line: usize,
    pub step: Step,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Run {
        cmd: String,
    },
    /// `owner` and `mode` are `""` when unset, as the SDK sends them; `mode` is 4 octal digits.
    Copy {
        src: String,
        dest: String,
        owner: String,
        mode: String,
    },
    Env {
        vars: Vec<(String, String)>,
    },
    Workdir {
        path: String,
    },
    User {
        user: String,
    },
}

impl Step {
    /// The wire `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            Step::Run { .. } => "RUN",
            Step::Copy { .. } => "COPY",
            Step::Env { .. } => "ENV",
            Step::Workdir { .. } => "WORKDIR",
            Step::User { .. } => "USER",
        }
    }

    /// The wire `args`, as the SDK builds them.
    pub fn args(&self) -> Vec<String> {
        match self {
            Step::Run { cmd } => vec![cmd.clone()],
            Step::Copy {
                src,
                dest,
                owner,
                mode,
            } => vec![src.clone(), dest.clone(), owner.clone(), mode.clone()],
            Step::Env { vars } => vars
                .iter()
                .flat_map(|(k, v)| [k.clone(), v.clone()])
                .collect(),
            Step::Workdir { path } => vec![path.clone()],
            Step::User { user } => vec![user.clone()],
        }
    }

    /// One line for a progress display.
    pub fn describe(&self) -> String {
        let mut s = format!("{} {}", self.kind(), self.args().join(" "));
        if let Some((i, _)) = s.char_indices().nth(100) {
            s.truncate(i);
            s.push('…');
        }
        s.replace('\n', " ")
    }
}

/// Converts `text` (a Dockerfile) with `build_args` (`--build-arg`, over the ARG defaults).
pub fn convert(text: &str, build_args: &BTreeMap<String, String>) -> Result<Plan, DockerfileError> {
    let parsed = Dockerfile::parse(text).map_err(DockerfileError::Parse)?;
    Converter::new(text, build_args).run(&parsed.instructions)
}

struct Converter<'a> {
    text: &'a str,
    build_args: &'a BTreeMap<String, String>,
    /// ARGs declared before FROM: usable in FROM, and as defaults of a later bare `ARG NAME`.
    global_args: BTreeMap<String, Option<String>>,
    /// Values substituted into instructions: ARGs in scope and ENVs so far.
    vars: BTreeMap<String, String>,
    /// ARGs in scope with a value, in declaration order: exported to RUN.
    run_args: Vec<(String, String)>,
    steps: Vec<PlanStep>,
    notes: Vec<String>,
    workdir: String,
    user_set: bool,
    workdir_set: bool,
    cmd: Option<(usize, StartForm)>,
    entrypoint: Option<(usize, StartForm)>,
}

#[derive(Debug, Clone)]
enum StartForm {
    Shell(String),
    Exec(Vec<String>),
}

impl<'a> Converter<'a> {
    fn new(text: &'a str, build_args: &'a BTreeMap<String, String>) -> Self {
        Converter {
            text,
            build_args,
            global_args: BTreeMap::new(),
            vars: BTreeMap::new(),
            run_args: Vec::new(),
            steps: Vec::new(),
            notes: Vec::new(),
            workdir: "/".into(),
            user_set: false,
            workdir_set: false,
            cmd: None,
            entrypoint: None,
        }
    }

    fn line_of(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())]
            .bytes()
            .filter(|&b| b == b'\n')
            .count()
            + 1
    }

    fn push(&mut self, line: usize, step: Step) {
        self.steps.push(PlanStep { line, step });
    }

    fn run(mut self, instructions: &[Instruction]) -> Result<Plan, DockerfileError> {
        let mut from: Option<String> = None;
        for ins in instructions {
            let line = self.line_of(span_start(ins));
            let err = |message: String| DockerfileError::Line { line, message };
            match ins {
                Instruction::From(f) => {
                    if from.is_some() {
                        return Err(err(
                            "a second FROM: multi-stage builds are not supported; build the earlier stage as a template of its own and start this one `FROM` it".into(),
                        ));
                    }
                    for flag in &f.flags {
                        self.notes.push(format!(
                            "line {line}: FROM --{} ignored (templates run on this host's architecture)",
                            flag.name.content
                        ));
                    }
                    let vars: BTreeMap<String, String> = self
                        .global_args
                        .iter()
                        .filter_map(|(k, v)| v.clone().map(|v| (k.clone(), v)))
                        .collect();
                    let image = expand(&f.image.content, &vars).map_err(err)?;
                    if image.is_empty() || image.contains('$') {
                        return Err(err(format!(
                            "FROM `{}` names no image or template after substitution: pass the missing value with --build-arg",
                            f.image.content
                        )));
                    }
                    if image == "scratch" {
                        return Err(err(
                            "FROM scratch has no shell or system for the sandbox agent; start from a template (`FROM base`) or an image with a Linux userland".into(),
                        ));
                    }
                    from = Some(image);
                    // Docker's defaults, which the SDK states as steps.
                    self.push(
                        0,
                        Step::User {
                            user: "root".into(),
                        },
                    );
                    self.push(0, Step::Workdir { path: "/".into() });
                }
                Instruction::Arg(a) => {
                    let name = a.name.content.clone();
                    if from.is_none() {
                        let default = match &a.value {
                            Some(v) => Some(expand(&v.content, &self.vars).map_err(err)?),
                            None => None,
                        };
                        let value = self.build_args.get(&name).cloned().or(default);
                        self.global_args.insert(name, value);
                        continue;
                    }
                    let default = match &a.value {
                        Some(v) => Some(expand(&v.content, &self.vars).map_err(err)?),
                        None => self.global_args.get(&name).cloned().flatten(),
                    };
                    if let Some(v) = self.build_args.get(&name).cloned().or(default) {
                        self.vars.insert(name.clone(), v.clone());
                        self.run_args.retain(|(k, _)| *k != name);
                        self.run_args.push((name, v));
                    }
                }
                _ if from.is_none() => {
                    return Err(err(
                        "only ARG may come before FROM: move this instruction after the FROM line"
                            .into(),
                    ));
                }
                Instruction::Run(r) => {
                    let cmd = match &r.expr {
                        dockerfile_parser::ShellOrExecExpr::Shell(s) => joined(s),
                        dockerfile_parser::ShellOrExecExpr::Exec(a) => shell_join(
                            &a.elements
                                .iter()
                                .map(|e| e.content.clone())
                                .collect::<Vec<_>>(),
                        ),
                    };
                    if cmd.trim().is_empty() {
                        return Err(err("RUN needs a command".into()));
                    }
                    let cmd = if self.run_args.is_empty() {
                        cmd
                    } else {
                        // Docker gives RUN its build args as environment variables.
                        let exports: Vec<String> = self
                            .run_args
                            .iter()
                            .map(|(k, v)| format!("{k}={}", shell_quote(v)))
                            .collect();
                        format!("export {}\n{cmd}", exports.join(" "))
                    };
                    self.push(line, Step::Run { cmd });
                }
                Instruction::Copy(c) => {
                    let mut owner = String::new();
                    let mut mode = String::new();
                    for flag in &c.flags {
                        let value = expand(&flag.value.content, &self.vars).map_err(err)?;
                        match flag.name.content.as_str() {
                            "from" => {
                                return Err(err(
                                    "COPY --from needs another build stage: multi-stage builds are not supported; copy from the build context instead".into(),
                                ));
                            }
                            "chown" => owner = value,
                            "chmod" => mode = octal_mode(&value).map_err(err)?,
                            "link" | "parents" | "exclude" => self
                                .notes
                                .push(format!("line {line}: COPY --{} ignored", flag.name.content)),
                            other => {
                                return Err(err(format!(
                                    "COPY --{other} is not supported (known: --chown, --chmod)"
                                )));
                            }
                        }
                    }
                    let sources: Vec<String> =
                        c.sources.iter().map(|s| s.content.clone()).collect();
                    self.copy("COPY", line, &sources, &c.destination.content, owner, mode)?;
                }
                Instruction::Env(e) => {
                    // Docker substitutes every value of one ENV from the variables before it.
                    let mut vars = Vec::new();
                    for v in &e.vars {
                        let key = v.key.content.clone();
                        if key.is_empty() {
                            return Err(err("ENV names can not be blank".into()));
                        }
                        vars.push((key, expand(&joined(&v.value), &self.vars).map_err(err)?));
                    }
                    for (k, v) in &vars {
                        self.vars.insert(k.clone(), v.clone());
                    }
                    self.push(line, Step::Env { vars });
                }
                Instruction::Cmd(c) => self.cmd = Some((line, start_form(&c.expr))),
                Instruction::Entrypoint(e) => self.entrypoint = Some((line, start_form(&e.expr))),
                Instruction::Label(_) => self.notes.push(format!(
                    "line {line}: LABEL ignored (templates carry no labels)"
                )),
                Instruction::Misc(m) => {
                    let name = m.instruction.content.to_ascii_uppercase();
                    let args = joined(&m.arguments).trim().to_owned();
                    self.misc(line, &name, &args)?;
                }
            }
        }
        let from = from.ok_or(DockerfileError::NoFrom)?;
        if !self.user_set {
            self.push(
                0,
                Step::User {
                    user: "user".into(),
                },
            );
        }
        if !self.workdir_set {
            self.push(
                0,
                Step::Workdir {
                    path: "/home/user".into(),
                },
            );
        }
        for name in self.build_args.keys() {
            let declared = self.global_args.contains_key(name) || self.vars.contains_key(name);
            if !declared {
                self.notes.push(format!(
                    "--build-arg {name} is not declared by an ARG: unused"
                ));
            }
        }
        let start_cmd = self.start_cmd();
        Ok(Plan {
            from,
            ready_cmd: start_cmd.as_ref().map(|_| DEFAULT_READY_CMD.to_owned()),
            start_cmd,
            steps: self.steps,
            notes: self.notes,
        })
    }

    fn misc(&mut self, line: usize, name: &str, args: &str) -> Result<(), DockerfileError> {
        let err = |message: String| DockerfileError::Line { line, message };
        match name {
            "USER" => {
                let user = expand(args, &self.vars).map_err(err)?;
                if user.is_empty() || user.split_whitespace().count() != 1 {
                    return Err(err("USER takes one argument: a user (or user:group)".into()));
                }
                self.user_set = true;
                self.push(line, Step::User { user });
            }
            "WORKDIR" => {
                let path = expand(args, &self.vars).map_err(err)?;
                if path.is_empty() {
                    return Err(err("WORKDIR takes one argument: a directory".into()));
                }
                // A relative WORKDIR is relative to the previous one, as in Docker.
                let path = absolute(&self.workdir, &path);
                self.workdir = path.clone();
                self.workdir_set = true;
                self.push(line, Step::Workdir { path });
            }
            "ADD" => {
                let (flags, words) = add_words(args).map_err(err)?;
                let mut owner = String::new();
                let mut mode = String::new();
                for (flag, value) in flags {
                    let value = expand(&value, &self.vars).map_err(err)?;
                    match flag.as_str() {
                        "chown" => owner = value,
                        "chmod" => mode = octal_mode(&value).map_err(err)?,
                        "link" => self.notes.push(format!("line {line}: ADD --link ignored")),
                        other => {
                            return Err(err(format!(
                                "ADD --{other} is not supported (known: --chown, --chmod)"
                            )));
                        }
                    }
                }
                let Some((dest, sources)) = words.split_last() else {
                    return Err(err("ADD needs a source and a destination".into()));
                };
                if sources.is_empty() {
                    return Err(err("ADD needs a source and a destination".into()));
                }
                for s in sources {
                    if is_remote(s) {
                        return Err(err(format!(
                            "ADD from a URL ({s}) is not supported: download it in a RUN step (`RUN curl -fsSLo DEST URL`) or put the file in the build context"
                        )));
                    }
                    if is_archive_name(s) {
                        return Err(err(format!(
                            "ADD {s} would extract the archive, which is not supported: use `COPY {s} DIR/` and `RUN tar -xf DIR/<name> -C DEST`"
                        )));
                    }
                }
                self.copy("ADD", line, sources, dest, owner, mode)?;
            }
            "EXPOSE" => self.notes.push(format!(
                "line {line}: EXPOSE ignored (every port of a sandbox is reachable through the proxy)"
            )),
            "MAINTAINER" => self.notes.push(format!("line {line}: MAINTAINER ignored")),
            other => {
                let hint = match other {
                    "SHELL" => "steps run with /bin/sh -c; call another shell in the RUN line",
                    "HEALTHCHECK" => "a template has a ready command instead (alcove template build --ready-cmd)",
                    "VOLUME" => "a sandbox has one disk; drop the line",
                    "ONBUILD" => "templates have no triggers; drop the line",
                    "STOPSIGNAL" => "sandboxes are stopped as a whole; drop the line",
                    _ => "supported: FROM, RUN, COPY, ADD (local), ENV, ARG, WORKDIR, USER, CMD, ENTRYPOINT",
                };
                return Err(err(format!("{other} is not supported: {hint}")));
            }
        }
        Ok(())
    }

    fn copy(
        &mut self,
        what: &str,
        line: usize,
        sources: &[String],
        dest: &str,
        owner: String,
        mode: String,
    ) -> Result<(), DockerfileError> {
        let err = |message: String| DockerfileError::Line { line, message };
        let dest = expand(dest, &self.vars).map_err(err)?;
        if dest.is_empty() {
            return Err(err(format!("{what} needs a destination")));
        }
        if sources.is_empty() {
            return Err(err(format!("{what} needs a source and a destination")));
        }
        if sources.len() > 1 && !dest.ends_with('/') {
            return Err(err(format!(
                "{what} with more than one source needs a directory destination ending in `/`"
            )));
        }
        // A relative destination is relative to WORKDIR, as in Docker.
        let dest = absolute(&self.workdir, &dest);
        for s in sources {
            let src = expand(s, &self.vars).map_err(err)?;
            check_source(&src).map_err(err)?;
            self.push(
                line,
                Step::Copy {
                    src,
                    dest: dest.clone(),
                    owner: owner.clone(),
                    mode: mode.clone(),
                },
            );
        }
        Ok(())
    }

    /// Docker's rules: an exec-form ENTRYPOINT gets CMD appended (a shell-form CMD as
    /// `/bin/sh -c CMD`), a shell-form ENTRYPOINT ignores CMD, else CMD alone.
    fn start_cmd(&mut self) -> Option<String> {
        let cmd = self.cmd.take().map(|(_, c)| c);
        let command = match (self.entrypoint.take().map(|(_, e)| e), cmd) {
            (Some(StartForm::Exec(mut words)), cmd) => {
                match cmd {
                    Some(StartForm::Exec(c)) => words.extend(c),
                    Some(StartForm::Shell(c)) if !c.trim().is_empty() => {
                        words.extend(["/bin/sh".into(), "-c".into(), c])
                    }
                    _ => {}
                }
                shell_join(&words)
            }
            (Some(StartForm::Shell(e)), _) => e,
            (None, Some(StartForm::Exec(c))) => shell_join(&c),
            (None, Some(StartForm::Shell(c))) => c,
            (None, None) => String::new(),
        };
        (!command.trim().is_empty()).then_some(command)
    }
}

/// `path` made absolute against `base` and cleaned of `.` and `..`; a trailing `/` (a directory
/// destination) is kept.
fn absolute(base: &str, path: &str) -> String {
    let joined = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("{base}/{path}")
    };
    let mut parts: Vec<&str> = Vec::new();
    for p in joined.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    let mut out = format!("/{}", parts.join("/"));
    let dir = path.ends_with('/') || path.ends_with("/.") || path == ".";
    if dir && !out.ends_with('/') {
        out.push('/');
    }
    out
}

fn span_start(ins: &Instruction) -> usize {
    match ins {
        Instruction::From(i) => i.span.start,
        Instruction::Arg(i) => i.span.start,
        Instruction::Label(i) => i.span.start,
        Instruction::Run(i) => i.span.start,
        Instruction::Entrypoint(i) => i.span.start,
        Instruction::Cmd(i) => i.span.start,
        Instruction::Copy(i) => i.span.start,
        Instruction::Env(i) => i.span.start,
        Instruction::Misc(i) => i.span.start,
    }
}

fn start_form(expr: &dockerfile_parser::ShellOrExecExpr) -> StartForm {
    match expr {
        dockerfile_parser::ShellOrExecExpr::Shell(s) => StartForm::Shell(joined(s)),
        dockerfile_parser::ShellOrExecExpr::Exec(a) => {
            StartForm::Exec(a.elements.iter().map(|e| e.content.clone()).collect())
        }
    }
}

/// A value broken over lines, without its continuation comments.
fn joined(s: &BreakableString) -> String {
    s.components
        .iter()
        .filter_map(|c| match c {
            BreakableStringComponent::String(s) => Some(s.content.as_str()),
            BreakableStringComponent::Comment(_) => None,
        })
        .collect()
}

/// One word for `/bin/sh`: as is when it has only safe characters, else single-quoted.
pub fn shell_quote(word: &str) -> String {
    let safe = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "@%+=:,./-_".contains(c));
    if safe {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r#"'"'"'"#))
    }
}

/// Words joined into one shell command line that runs exactly those words.
pub fn shell_join(words: &[String]) -> String {
    words
        .iter()
        .map(|w| shell_quote(w))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `--chmod` as the SDK sends it: four octal digits.
fn octal_mode(value: &str) -> Result<String, String> {
    let ok = (3..=4).contains(&value.len()) && value.chars().all(|c| ('0'..='7').contains(&c));
    let mode = ok
        .then(|| u32::from_str_radix(value, 8).ok())
        .flatten()
        .ok_or_else(|| format!("--chmod={value} is not an octal mode such as 0755"))?;
    Ok(format!("{mode:04o}"))
}

/// A COPY source must name something inside the build context.
fn check_source(src: &str) -> Result<(), String> {
    if src.is_empty() {
        return Err("an empty COPY source".into());
    }
    if src.starts_with('/') {
        return Err(format!(
            "COPY source `{src}` is absolute: sources are paths relative to the build context (--context)"
        ));
    }
    let mut depth: i64 = 0;
    for part in src.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                depth -= 1;
                if depth < 0 {
                    return Err(format!(
                        "COPY source `{src}` leaves the build context: move the file into the context directory or pass a wider --context"
                    ));
                }
            }
            _ => depth += 1,
        }
    }
    Ok(())
}

fn is_remote(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    lower.starts_with("git@")
        || lower.split_once("://").is_some_and(|(scheme, _)| {
            !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
        })
}

fn is_archive_name(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    [
        ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tbz", ".tar.xz", ".txz", ".tar.zst",
    ]
    .iter()
    .any(|ext| lower.ends_with(ext))
}

/// ADD's arguments (the parser leaves them raw): leading `--flag=value`s, then the words, or a
/// JSON array of words.
#[allow(clippy::type_complexity)]
fn add_words(args: &str) -> Result<(Vec<(String, String)>, Vec<String>), String> {
    let mut rest = args.trim();
    let mut flags = Vec::new();
    while let Some(after) = rest.strip_prefix("--") {
        let end = after.find(char::is_whitespace).unwrap_or(after.len());
        let (flag, tail) = after.split_at(end);
        let (name, value) = flag.split_once('=').unwrap_or((flag, ""));
        flags.push((name.to_owned(), value.to_owned()));
        rest = tail.trim_start();
    }
    let words = if rest.starts_with('[') {
        serde_json::from_str::<Vec<String>>(rest)
            .map_err(|_| "ADD's JSON form must be an array of strings".to_owned())?
    } else {
        if rest.contains(['"', '\'']) {
            return Err("quoted ADD arguments are not supported: use the JSON form `ADD [\"src\", \"dest\"]`".into());
        }
        rest.split_whitespace().map(str::to_owned).collect()
    };
    Ok((flags, words))
}

/// Substitutes `$NAME`, `${NAME}`, `${NAME:-word}` and `${NAME:+word}` from `vars`; `\$` is a
/// literal `$`; a variable not in `vars` stays as written (it may be set in the base).
pub fn expand(s: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    while i < chars.len() {
        let c = chars[i];
        if c == '\\' && chars.get(i + 1) == Some(&'$') {
            out.push('$');
            i += 2;
            continue;
        }
        if c != '$' {
            out.push(c);
            i += 1;
            continue;
        }
        if chars.get(i + 1) == Some(&'{') {
            let Some(close) = chars[i + 2..].iter().position(|&c| c == '}') else {
                return Err(format!("`{s}`: a `${{` without its `}}`"));
            };
            let inner: String = chars[i + 2..i + 2 + close].iter().collect();
            let whole: String = chars[i..i + 3 + close].iter().collect();
            i += 3 + close;
            let (name, op, word) = match inner.find(":-").or_else(|| inner.find(":+")) {
                Some(p) => (&inner[..p], &inner[p..p + 2], &inner[p + 2..]),
                None => (inner.as_str(), "", ""),
            };
            if name.is_empty() || !name.chars().all(is_name) {
                return Err(format!(
                    "`{whole}`: only ${{NAME}}, ${{NAME:-default}} and ${{NAME:+alternative}} are supported"
                ));
            }
            let value = vars.get(name).filter(|v| !v.is_empty());
            match op {
                ":-" => out.push_str(&match value {
                    Some(v) => v.clone(),
                    None => expand(word, vars)?,
                }),
                ":+" => {
                    if value.is_some() {
                        out.push_str(&expand(word, vars)?);
                    }
                }
                _ => match vars.get(name) {
                    Some(v) => out.push_str(v),
                    None => out.push_str(&whole),
                },
            }
            continue;
        }
        let len = chars[i + 1..].iter().take_while(|&&c| is_name(c)).count();
        if len == 0 {
            out.push('$');
            i += 1;
            continue;
        }
        let name: String = chars[i + 1..i + 1 + len].iter().collect();
        match vars.get(&name) {
            Some(v) => out.push_str(v),
            None => {
                out.push('$');
                out.push_str(&name);
            }
        }
        i += 1 + len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(text: &str) -> Plan {
        convert(text, &BTreeMap::new()).unwrap()
    }

    fn err(text: &str) -> String {
        convert(text, &BTreeMap::new()).unwrap_err().to_string()
    }

    /// The steps the user wrote: without the USER/WORKDIR defaults around them.
    fn body(p: &Plan) -> Vec<Step> {
        p.steps
            .iter()
            .filter(|s| s.line != 0)
            .map(|s| s.step.clone())
            .collect()
    }

    #[test]
    fn defaults_wrap_the_steps_as_the_sdk_does() {
        let p = plan("FROM base\nRUN echo hi\n");
        assert_eq!(p.from, "base");
        let kinds: Vec<(String, Vec<String>)> = p
            .steps
            .iter()
            .map(|s| (s.step.kind().to_owned(), s.step.args()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("USER".into(), vec!["root".into()]),
                ("WORKDIR".into(), vec!["/".into()]),
                ("RUN".into(), vec!["echo hi".into()]),
                ("USER".into(), vec!["user".into()]),
                ("WORKDIR".into(), vec!["/home/user".into()]),
            ]
        );
        assert_eq!(p.steps[2].line, 2);
        assert_eq!(p.start_cmd, None);
        assert_eq!(p.ready_cmd, None);
    }

    #[test]
    fn run_shell_and_exec_forms() {
        let p = plan("FROM base\nRUN echo a \\\n  && echo b\nRUN [\"echo\", \"x y\", \"it's\"]\n");
        assert_eq!(
            body(&p),
            vec![
                Step::Run {
                    cmd: "echo a   && echo b".into()
                },
                Step::Run {
                    cmd: r#"echo 'x y' 'it'"'"'s'"#.into()
                },
            ]
        );
    }

    #[test]
    fn env_user_workdir_become_steps_and_no_defaults_when_set() {
        let p = plan(
            "FROM base\nENV A=1 B=\"two words\" C=$A\nENV D=$A-$PATH\nUSER user\nWORKDIR /app\nWORKDIR sub\n",
        );
        let b = body(&p);
        assert_eq!(
            b[0],
            Step::Env {
                // One ENV sees only the variables before it, as in Docker.
                vars: vec![
                    ("A".into(), "1".into()),
                    ("B".into(), "two words".into()),
                    ("C".into(), "$A".into())
                ]
            }
        );
        assert_eq!(
            b[1],
            Step::Env {
                vars: vec![("D".into(), "1-$PATH".into())]
            }
        );
        assert_eq!(
            b[2],
            Step::User {
                user: "user".into()
            }
        );
        assert_eq!(
            b[3],
            Step::Workdir {
                path: "/app".into()
            }
        );
        assert_eq!(
            b[4],
            Step::Workdir {
                path: "/app/sub".into()
            }
        );
        // USER and WORKDIR were set: no trailing defaults.
        assert_eq!(p.steps.last().unwrap().line, 6);
    }

    #[test]
    fn copy_and_add_local_files() {
        let p = plan(
            "FROM base\nWORKDIR /w\nCOPY --chown=user:user --chmod=755 a.txt dir /app/\nCOPY b.txt rel\nCOPY e.txt ./\nCOPY f.txt ../up/\nADD c.txt /c.txt\nADD [\"d e.txt\", \"/d/\"]\n",
        );
        let copies: Vec<Vec<String>> = body(&p)
            .iter()
            .filter(|s| s.kind() == "COPY")
            .map(Step::args)
            .collect();
        assert_eq!(
            copies,
            vec![
                vec!["a.txt", "/app/", "user:user", "0755"],
                vec!["dir", "/app/", "user:user", "0755"],
                vec!["b.txt", "/w/rel", "", ""],
                vec!["e.txt", "/w/", "", ""],
                vec!["f.txt", "/up/", "", ""],
                vec!["c.txt", "/c.txt", "", ""],
                vec!["d e.txt", "/d/", "", ""],
            ]
        );
    }

    #[test]
    fn arg_defaults_build_args_and_substitution() {
        let text = "ARG BASE=base\nFROM $BASE\nARG BASE\nARG VERSION=1\nARG UNSET\nENV V=${VERSION} W=${UNSET:-dflt} X=${VERSION:+yes}\nCOPY app-$VERSION.txt /opt/$BASE/\nRUN echo $VERSION\n";
        let p = plan(text);
        assert_eq!(p.from, "base");
        let b = body(&p);
        assert_eq!(
            b[0],
            Step::Env {
                vars: vec![
                    ("V".into(), "1".into()),
                    ("W".into(), "dflt".into()),
                    ("X".into(), "yes".into())
                ]
            }
        );
        assert_eq!(b[1].args()[..2], ["app-1.txt", "/opt/base/"]);
        // RUN gets the args as exported variables; its text is left to the shell.
        assert_eq!(
            b[2],
            Step::Run {
                cmd: "export BASE=base VERSION=1\necho $VERSION".into()
            }
        );

        let args: BTreeMap<String, String> = [
            ("BASE".to_string(), "code-interpreter-v1".to_string()),
            ("VERSION".to_string(), "2 beta".to_string()),
            ("NOPE".to_string(), "x".to_string()),
        ]
        .into();
        let p = convert(text, &args).unwrap();
        assert_eq!(p.from, "code-interpreter-v1");
        let b = body(&p);
        assert_eq!(
            b[1].args()[..2],
            ["app-2 beta.txt", "/opt/code-interpreter-v1/"]
        );
        assert_eq!(
            b[2],
            Step::Run {
                cmd: "export BASE=code-interpreter-v1 VERSION='2 beta'\necho $VERSION".into()
            }
        );
        assert!(p.notes.iter().any(|n| n.contains("NOPE")), "{:?}", p.notes);
    }

    #[test]
    fn escaped_dollar_is_literal() {
        let vars = [("A".to_string(), "1".to_string())].into();
        assert_eq!(expand(r"\$A $A ${A} $", &vars).unwrap(), "$A 1 1 $");
        assert!(expand("${A", &vars).is_err());
        assert!(expand("${A%%x}", &vars).is_err());
    }

    #[test]
    fn cmd_and_entrypoint_become_the_start_command() {
        let p = plan("FROM base\nCMD [\"python3\", \"-m\", \"http.server\", \"8000\"]\n");
        assert_eq!(p.start_cmd.as_deref(), Some("python3 -m http.server 8000"));
        assert_eq!(p.ready_cmd.as_deref(), Some(DEFAULT_READY_CMD));
        let p = plan("FROM base\nCMD echo hi there\n");
        assert_eq!(p.start_cmd.as_deref(), Some("echo hi there"));
        let p = plan("FROM base\nENTRYPOINT [\"/bin/app\", \"--x\"]\nCMD [\"a b\"]\n");
        assert_eq!(p.start_cmd.as_deref(), Some("/bin/app --x 'a b'"));
        let p = plan("FROM base\nENTRYPOINT [\"/bin/app\"]\nCMD run it\n");
        assert_eq!(p.start_cmd.as_deref(), Some("/bin/app /bin/sh -c 'run it'"));
        let p = plan("FROM base\nENTRYPOINT exec app\nCMD [\"ignored\"]\n");
        assert_eq!(p.start_cmd.as_deref(), Some("exec app"));
    }

    #[test]
    fn expose_and_label_are_ignored_with_a_note() {
        let p = plan("FROM base\nEXPOSE 8000\nLABEL a=b\n");
        assert!(body(&p).is_empty());
        assert_eq!(p.notes.len(), 2);
        assert!(p.notes[0].starts_with("line 2: EXPOSE"));
        assert!(p.notes[1].starts_with("line 3: LABEL"));
    }

    #[test]
    fn unsupported_instructions_name_their_line() {
        assert!(
            err("FROM base\nRUN true\nHEALTHCHECK CMD true\n")
                .starts_with("Dockerfile line 3: HEALTHCHECK")
        );
        assert!(
            err("FROM base\nSHELL [\"/bin/bash\", \"-c\"]\n")
                .starts_with("Dockerfile line 2: SHELL")
        );
        assert!(err("FROM base\nVOLUME /data\n").contains("line 2"));
        assert!(err("FROM base\nONBUILD RUN x\n").contains("line 2"));
    }

    #[test]
    fn multi_stage_is_refused() {
        let e = err("FROM base AS build\nRUN make\nFROM base\nCOPY --from=build /out /out\n");
        assert!(
            e.starts_with("Dockerfile line 3:") && e.contains("multi-stage"),
            "{e}"
        );
        let e = err("FROM base\nCOPY --from=other /a /b\n");
        assert!(
            e.starts_with("Dockerfile line 2:") && e.contains("multi-stage"),
            "{e}"
        );
    }

    #[test]
    fn bad_input_is_refused_clearly() {
        assert!(matches!(
            convert("RUN true\n", &BTreeMap::new()),
            Err(DockerfileError::Line { line: 1, .. })
        ));
        assert!(matches!(
            convert("# nothing\n", &BTreeMap::new()),
            Err(DockerfileError::NoFrom)
        ));
        assert!(err("FROM scratch\n").contains("scratch"));
        assert!(err("FROM $NOPE\n").contains("--build-arg"));
        assert!(err("FROM base\nADD https://example.com/x /x\n").contains("URL"));
        assert!(err("FROM base\nADD site.tar.gz /srv/\n").contains("extract"));
        assert!(err("FROM base\nCOPY ../secret /x\n").contains("leaves the build context"));
        assert!(err("FROM base\nCOPY /etc/passwd /x\n").contains("absolute"));
        assert!(err("FROM base\nCOPY a b /x\n").contains("ending in `/`"));
        assert!(err("FROM base\nCOPY --chmod=rwx a /x\n").contains("octal"));
        assert!(
            err("FROM base\nUSER\n").contains("line 2")
                || err("FROM base\nUSER\n").contains("parse")
        );
        assert!(matches!(
            convert("FROM base\nRUN <<EOF\necho\nEOF\n", &BTreeMap::new()),
            Err(DockerfileError::Parse(_))
        ));
    }

    #[test]
    fn shell_quoting_round_trips_through_sh() {
        let words: Vec<String> = ["plain", "two words", "it's", "$HOME", "", "a\"b", "x\ny"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let line = format!("printf '%s\\0' {}", shell_join(&words));
        let out = std::process::Command::new("/bin/sh")
            .args(["-c", &line])
            .output()
            .unwrap();
        let got: Vec<String> = String::from_utf8(out.stdout)
            .unwrap()
            .split('\0')
            .filter(|_| true)
            .map(str::to_owned)
            .collect();
        assert_eq!(&got[..words.len()], &words[..]);
    }
}
