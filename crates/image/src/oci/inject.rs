//! What Alcove adds to an unpacked image so the agent boots from it: the agent with its own
//! loader and C library, a `user` account, the guest's resolver, mount points, a `/bin/bash` for
//! the E2B protocol's commands, and `/etc/alcove/template.json`.
//!
//! The rootfs came from a hostile image: every directory written to is resolved inside the root
//! ([`in_root`]: symlinks are followed the way the guest would see them, with `/` and `..`
//! clamped at the root), and a file written over is first removed, never opened through a link.
//!
//! The agent is linked against the host's glibc, and images may have musl or no libc at all. So
//! it goes in with the glibc it was built against, in a private dir ([`PRIVATE_LIB`]): its ELF
//! interpreter and rpath point there (rewritten by `patchelf`, a copy of the binary), and nothing
//! of the image's is touched. Processes the agent starts use the image's own libraries.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use super::{ImageConfig, OciError};

/// The agent's loader and libraries inside the guest.
pub const PRIVATE_LIB: &str = "/usr/local/lib/alcove";
/// The loader's name in [`PRIVATE_LIB`].
const LOADER: &str = "ld-linux-x86-64.so.2";

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> OciError {
    let what = what.into();
    move |source| OciError::Inject { what, source }
}

/// The host path of guest directory `guest` (absolute), resolving symlinks inside `root` as the
/// guest would; missing directories are created (mode 0755) when `create`. `None` when it does
/// not exist (and `create` is off) or a component is not a directory.
pub fn in_root(root: &Path, guest: &str, create: bool) -> std::io::Result<Option<PathBuf>> {
    let mut todo: Vec<std::ffi::OsString> = Path::new(guest)
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut stack: Vec<std::ffi::OsString> = Vec::new();
    let mut links = 0;
    while let Some(c) = todo.pop() {
        if c == ".." {
            stack.pop();
            continue;
        }
        let mut here = root.to_path_buf();
        here.extend(&stack);
        here.push(&c);
        match std::fs::symlink_metadata(&here) {
            Ok(m) if m.is_dir() => stack.push(c),
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > 40 {
                    return Ok(None);
                }
                let target = std::fs::read_link(&here)?;
                if target.is_absolute() {
                    stack.clear();
                }
                for t in target.components().rev() {
                    match t {
                        Component::Normal(n) => todo.push(n.to_os_string()),
                        Component::ParentDir => todo.push("..".into()),
                        _ => {}
                    }
                }
            }
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                std::fs::create_dir(&here)?;
                std::fs::set_permissions(&here, std::fs::Permissions::from_mode(0o755))?;
                stack.push(c);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    let mut out = root.to_path_buf();
    out.extend(&stack);
    Ok(Some(out))
}

/// Whether guest path `guest` (a file or a link to one) exists, as the guest would resolve it.
fn exists_in_root(root: &Path, guest: &str) -> bool {
    exists_depth(root, Path::new(guest), 0)
}

fn exists_depth(root: &Path, p: &Path, depth: u32) -> bool {
    let (Some(parent), Some(name)) = (p.parent(), p.file_name()) else {
        return false;
    };
    if depth > 16 {
        return false;
    }
    let Ok(Some(dir)) = in_root(root, &parent.display().to_string(), false) else {
        return false;
    };
    let f = dir.join(name);
    match std::fs::symlink_metadata(&f) {
        Ok(m) if m.file_type().is_symlink() => match std::fs::read_link(&f) {
            Ok(t) if t.is_absolute() => exists_depth(root, &t, depth + 1),
            Ok(t) => exists_depth(root, &parent.join(t), depth + 1),
            Err(_) => false,
        },
        Ok(m) => m.is_file(),
        Err(_) => false,
    }
}

/// Makes guest symlink `guest` -> `target` (replacing whatever is there).
fn write_symlink(root: &Path, guest: &str, target: &str) -> Result<(), OciError> {
    let p = Path::new(guest);
    let parent = p
        .parent()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let dir = in_root(root, &parent, true)
        .map_err(io_err(format!("making {parent}")))?
        .ok_or_else(|| OciError::Inject {
            what: format!("making {parent}"),
            source: std::io::Error::other("a file is in the way of this directory"),
        })?;
    let dest = dir.join(p.file_name().expect("a file name"));
    super::unpack::remove_any(&dest).map_err(io_err(format!("replacing {guest}")))?;
    std::os::unix::fs::symlink(target, &dest).map_err(io_err(format!("linking {guest}")))
}

/// Writes guest file `guest` (replacing whatever is there: a link is removed, not followed).
fn write_file(root: &Path, guest: &str, body: &[u8], mode: u32) -> Result<PathBuf, OciError> {
    let p = Path::new(guest);
    let parent = p
        .parent()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let name = p.file_name().expect("a file name");
    let dir = in_root(root, &parent, true)
        .map_err(io_err(format!("making {parent}")))?
        .ok_or_else(|| OciError::Inject {
            what: format!("making {parent}"),
            source: std::io::Error::other("a file is in the way of this directory"),
        })?;
    let dest = dir.join(name);
    super::unpack::remove_any(&dest).map_err(io_err(format!("replacing {guest}")))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&dest)
        .map_err(io_err(format!("writing {guest}")))?;
    f.write_all(body)
        .map_err(io_err(format!("writing {guest}")))?;
    drop(f);
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode))
        .map_err(io_err(format!("chmod {guest}")))?;
    Ok(dest)
}

/// Reads a guest text file (no links followed at the last step; capped), or empty.
fn read_small(root: &Path, guest: &str) -> String {
    let p = Path::new(guest);
    let Some(parent) = p.parent() else {
        return String::new();
    };
    let Ok(Some(dir)) = in_root(root, &parent.display().to_string(), false) else {
        return String::new();
    };
    let f = dir.join(p.file_name().unwrap_or_default());
    match std::fs::symlink_metadata(&f) {
        Ok(m) if m.is_file() && m.len() <= 4 << 20 => {
            std::fs::read_to_string(&f).unwrap_or_default()
        }
        _ => String::new(),
    }
}

/// The agent ready to copy into images: a patched copy and the libraries it loads, made once
/// per agent binary in `dir`.
pub struct AgentBundle {
    pub agent: PathBuf,
    /// (file name in [`PRIVATE_LIB`], host path)
    pub libs: Vec<(String, PathBuf)>,
}

/// Copies the agent into `dir`, rewrites its interpreter and rpath to [`PRIVATE_LIB`], and lists
/// the host libraries `ldd` says it loads. A static agent (no interpreter) is used as is.
pub async fn agent_bundle(agent_bin: &Path, dir: &Path) -> Result<AgentBundle, OciError> {
    std::fs::create_dir_all(dir).map_err(io_err(format!("making {}", dir.display())))?;
    let agent = dir.join("alcove-agent");
    std::fs::copy(agent_bin, &agent)
        .map_err(io_err(format!("copying the agent {}", agent_bin.display())))?;
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        tokio::process::Command::new("ldd").arg(agent_bin).output(),
    )
    .await
    .map_err(|_| OciError::Tool {
        tool: "ldd",
        detail: "timed out after 30 s".into(),
    })?
    .map_err(|e| OciError::Tool {
        tool: "ldd",
        detail: format!("cannot start: {e}"),
    })?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("not a dynamic executable") || text.contains("statically linked") {
        return Ok(AgentBundle {
            agent,
            libs: vec![],
        });
    }
    let libs = parse_ldd(&text);
    if !libs.iter().any(|(n, _)| n == LOADER) {
        return Err(OciError::Tool {
            tool: "ldd",
            detail: format!("found no {LOADER} among the agent's libraries; ldd said:\n{text}"),
        });
    }
    let patched = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        tokio::process::Command::new("patchelf")
            .args(["--set-interpreter", &format!("{PRIVATE_LIB}/{LOADER}")])
            .args(["--force-rpath", "--set-rpath", PRIVATE_LIB])
            .arg(&agent)
            .output(),
    )
    .await
    .map_err(|_| OciError::Tool {
        tool: "patchelf",
        detail: "timed out after 30 s".into(),
    })?
    .map_err(|e| OciError::Tool {
        tool: "patchelf",
        detail: format!("cannot start: {e} (install Debian's `patchelf`: scripts/setup-host.sh)"),
    })?;
    if !patched.status.success() {
        return Err(OciError::Tool {
            tool: "patchelf",
            detail: String::from_utf8_lossy(&patched.stderr).into_owned(),
        });
    }
    Ok(AgentBundle { agent, libs })
}

/// `ldd` lines: `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` and the loader's
/// `/lib64/ld-linux-x86-64.so.2 (0x…)`; the vDSO has no file.
fn parse_ldd(text: &str) -> Vec<(String, PathBuf)> {
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let path = if let Some((_, rest)) = line.split_once("=> ") {
            rest.split(" (").next().unwrap_or("")
        } else {
            line.split(" (").next().unwrap_or("")
        };
        if !path.starts_with('/') {
            continue;
        }
        let path = PathBuf::from(path);
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !libs.iter().any(|(n, _)| n == &name) {
            libs.push((name, path));
        }
    }
    libs
}

/// Adds everything the agent needs to the unpacked image at `root` and writes
/// `/etc/alcove/template.json` from the image's config.
pub fn prepare(root: &Path, bundle: &AgentBundle, config: &ImageConfig) -> Result<(), OciError> {
    // Mount points the agent and the kernel use (devtmpfs needs /dev to exist to mount it).
    for (dir, mode) in [
        ("/dev", 0o755),
        ("/proc", 0o555),
        ("/sys", 0o555),
        ("/run", 0o755),
        ("/tmp", 0o1777),
        ("/root", 0o700),
        ("/etc/alcove", 0o755),
        ("/usr/local/bin", 0o755),
        (PRIVATE_LIB, 0o755),
    ] {
        let existed = in_root(root, dir, false)
            .map_err(io_err(format!("resolving {dir}")))?
            .is_some();
        let p = in_root(root, dir, true)
            .map_err(io_err(format!("making {dir}")))?
            .ok_or_else(|| OciError::Inject {
                what: format!("making {dir}"),
                source: std::io::Error::other("a file is in the way of this directory"),
            })?;
        if !existed || dir == "/tmp" {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
                .map_err(io_err(format!("chmod {dir}")))?;
        }
    }

    // The agent and its private glibc.
    for (name, host) in &bundle.libs {
        let body = std::fs::read(host).map_err(io_err(format!("reading {}", host.display())))?;
        write_file(root, &format!("{PRIVATE_LIB}/{name}"), &body, 0o755)?;
    }
    let agent = std::fs::read(&bundle.agent).map_err(io_err("reading the agent"))?;
    write_file(root, alcove_guest_contract::AGENT_GUEST_PATH, &agent, 0o755)?;
    // `mcp-gateway` in every template: the agent runs the MCP gateway when called by that name
    // (what the SDKs run after `Sandbox.create(mcp=...)`).
    write_symlink(
        root,
        alcove_guest_contract::MCP_GATEWAY_GUEST_PATH,
        "alcove-agent",
    )?;

    // Commands arrive as `/bin/bash -l -c CMD` (E2B's protocol): images without bash get a
    // wrapper that hands them to their `/bin/sh`, and images with no shell at all get the host's
    // static busybox as one.
    if !exists_in_root(root, "/bin/sh") {
        let busybox = std::fs::read("/bin/busybox").map_err(io_err(
            "reading the host's /bin/busybox (install Debian's busybox-static: scripts/setup-host.sh)",
        ))?;
        write_file(root, &format!("{PRIVATE_LIB}/busybox"), &busybox, 0o755)?;
        write_symlink(root, "/bin/sh", &format!("{PRIVATE_LIB}/busybox"))?;
    }
    if !exists_in_root(root, "/bin/bash") {
        write_file(
            root,
            "/bin/bash",
            b"#!/bin/sh\nexec /bin/sh \"$@\"\n",
            0o755,
        )?;
    }

    // Accounts: root and `user` (uid/gid 1000, as E2B's images have).
    let shell = "/bin/bash";
    let mut passwd = read_small(root, "/etc/passwd");
    let mut group = read_small(root, "/etc/group");
    let has = |text: &str, name: &str| text.lines().any(|l| l.split(':').next() == Some(name));
    let append = |text: &mut String, line: &str| {
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(line);
        text.push('\n');
    };
    if !has(&passwd, "root") {
        append(&mut passwd, &format!("root:x:0:0:root:/root:{shell}"));
    }
    if !has(&group, "root") {
        append(&mut group, "root:x:0:");
    }
    if !has(&passwd, "user") {
        append(
            &mut passwd,
            &format!("user:x:1000:1000::/home/user:{shell}"),
        );
    }
    if !has(&group, "user") {
        append(&mut group, "user:x:1000:");
    }
    write_file(root, "/etc/passwd", passwd.as_bytes(), 0o644)?;
    write_file(root, "/etc/group", group.as_bytes(), 0o644)?;
    let home_existed = in_root(root, "/home/user", false)
        .map_err(io_err("resolving /home/user"))?
        .is_some();
    let home = in_root(root, "/home/user", true)
        .map_err(io_err("making /home/user"))?
        .ok_or_else(|| OciError::Inject {
            what: "making /home/user".into(),
            source: std::io::Error::other("a file is in the way of this directory"),
        })?;
    if !home_existed {
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755))
            .map_err(io_err("chmod /home/user"))?;
        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::lchown(&home, Some(1000), Some(1000))
                .map_err(io_err("chown /home/user"))?;
        }
    }

    // The guest's resolver is the gateway of its network namespace (alcove-net).
    write_file(
        root,
        "/etc/resolv.conf",
        alcove_guest_contract::net::resolv_conf().as_bytes(),
        0o644,
    )?;
    write_file(
        root,
        "/etc/alcove/template.json",
        &serde_json::to_vec_pretty(&template_json(config, &passwd)).expect("serialises"),
        0o644,
    )?;
    Ok(())
}

/// The account commands run as by default: the image's `USER` as a name the agent can look up
/// (`USER 1000`, `USER 0:0` are uids, mapped through the image's `passwd`), else `user`.
pub fn default_user(config: &ImageConfig, passwd: &str) -> String {
    let Some(u) = config
        .user
        .as_deref()
        .map(str::trim)
        .filter(|u| !u.is_empty())
    else {
        return "user".into();
    };
    let name = u.split(':').next().unwrap_or(u);
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_digit()) {
        return if name.is_empty() {
            "user".into()
        } else {
            name.to_string()
        };
    }
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 2 && f[2] == name).then(|| f[0].to_string())
        })
        .unwrap_or_else(|| {
            if name == "0" {
                "root".into()
            } else {
                "user".into()
            }
        })
}

/// The agent's template config (`bin/alcove-agent/src/template.rs`) for an image: its env,
/// working dir and user ([`default_user`] over the image's `passwd`); no start command (the
/// builder adds `startCmd`, and an image's `Entrypoint`/`Cmd` is the builder's to use or not).
pub fn template_json(config: &ImageConfig, passwd: &str) -> serde_json::Value {
    let envs: std::collections::BTreeMap<&str, &str> = config
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    serde_json::json!({
        "start_cmd": null,
        "ready_cmd": null,
        "envs": envs,
        "user": default_user(config, passwd),
        "workdir": config.workdir.clone().filter(|w| !w.is_empty()).unwrap_or_else(|| "/home/user".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_root_clamps_links_at_the_root() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
        std::os::unix::fs::symlink("/../../../../tmp", root.join("evil")).unwrap();
        std::os::unix::fs::symlink("../../..", root.join("usr/up")).unwrap();
        assert_eq!(
            in_root(&root, "/bin", false).unwrap().unwrap(),
            root.join("usr/bin")
        );
        // Absolute and `..` targets stay inside: `/tmp` of the image, made on demand.
        assert_eq!(
            in_root(&root, "/evil", true).unwrap().unwrap(),
            root.join("tmp")
        );
        assert_eq!(in_root(&root, "/usr/up", false).unwrap().unwrap(), root);
        // A loop ends.
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        assert!(in_root(&root, "/loop", true).unwrap().is_none());
    }

    #[test]
    fn prepare_adds_accounts_shell_wrapper_and_config() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::write(root.join("bin/busybox"), b"").unwrap();
        std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
        std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh").unwrap();
        // An image's resolv.conf pointing out of the root is replaced, not followed.
        let outside = t.path().join("host-resolv.conf");
        std::fs::write(&outside, "host").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("etc/resolv.conf")).unwrap();
        let agent = t.path().join("agent");
        std::fs::write(&agent, b"\x7fELF").unwrap();
        let bundle = AgentBundle {
            agent,
            libs: vec![],
        };
        let cfg = ImageConfig {
            env: vec![("PATH".into(), "/bin".into())],
            workdir: Some("/www".into()),
            ..Default::default()
        };
        prepare(&root, &bundle, &cfg).unwrap();
        let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
        assert_eq!(
            passwd,
            "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/bash\n"
        );
        assert!(
            std::fs::read_to_string(root.join("etc/group"))
                .unwrap()
                .contains("user:x:1000:")
        );
        assert!(root.join("home/user").is_dir());
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "host");
        assert_eq!(
            std::fs::read_to_string(root.join("etc/resolv.conf")).unwrap(),
            alcove_guest_contract::net::resolv_conf()
        );
        assert!(
            std::fs::read_to_string(root.join("bin/bash"))
                .unwrap()
                .contains("exec /bin/sh")
        );
        assert!(root.join("usr/local/bin/alcove-agent").is_file());
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(root.join("etc/alcove/template.json")).unwrap())
                .unwrap();
        assert_eq!(json["workdir"], "/www");
        assert_eq!(json["user"], "user");
        assert_eq!(json["envs"]["PATH"], "/bin");
        assert!(json["start_cmd"].is_null());
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            std::fs::metadata(root.join("tmp")).unwrap().mode() & 0o7777,
            0o1777
        );
    }

    #[test]
    fn image_users_become_names() {
        let passwd = "root:x:0:0::/root:/bin/sh\nnode:x:1000:1000::/home/node:/bin/sh\n";
        let user = |u: Option<&str>| {
            default_user(
                &ImageConfig {
                    user: u.map(str::to_string),
                    ..Default::default()
                },
                passwd,
            )
        };
        assert_eq!(user(None), "user");
        assert_eq!(user(Some("")), "user");
        assert_eq!(user(Some("nginx")), "nginx");
        assert_eq!(user(Some("nginx:www")), "nginx");
        assert_eq!(user(Some("1000")), "node");
        assert_eq!(user(Some("0:0")), "root");
        assert_eq!(user(Some("4242")), "user");
    }

    #[test]
    fn ldd_output_is_parsed() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x1)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x2)\n\t/lib64/ld-linux-x86-64.so.2 (0x3)\n";
        let libs = parse_ldd(text);
        let names: Vec<_> = libs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["libgcc_s.so.1", "libc.so.6", "ld-linux-x86-64.so.2"]
        );
    }
}
