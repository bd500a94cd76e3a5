#!/usr/bin/env python3
"""Checks the deployment files against the `alcove` binary they run (`tests/deploy/run.sh`).

- deploy/kubernetes: every YAML document parses; kinds and names are the expected ones; every
  reference resolves (Secrets, PersistentVolumeClaims, ConfigMaps and their keys, volume mounts,
  Service selectors and targetPorts, `$(VAR)` in env values); the control plane is one replica
  with strategy Recreate on its claim; the node DaemonSet is privileged, mounts /dev/kvm and
  /dev/net/tun from the host, selects `alcove.dev/node: "true"` and takes its node id and address
  from the downward API; the kustomization lists exactly the manifests.
- deploy/nomad/alcove.nomad.hcl: parses as HCL2 with balanced braces; job, groups and tasks are
  the expected ones; ports and the token template match the command lines.
- docs/cluster.md: its sections, and every `alcove` command in its code blocks and inline code.

Every `alcove` command line (in `command`/`args`, in `sh -c` scripts, in the docs) is walked
through the binary's own `--help`: each subcommand must exist, each `--flag` must be an option
of the command it is given to (taking a value or not as the help says), positionals must fit the
usage line, required options must be given (as a flag or through their env var), and each
ALCOVE_* variable in the environment of that command must be one its `--help` names.

ALCOVE_BIN names the binary (default target/debug/alcove). Exits 1 with one line per problem,
each naming the file.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import hcl2
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("ALCOVE_BIN") or str(ROOT / "target" / "debug" / "alcove")
K8S = ROOT / "deploy" / "kubernetes"
NOMAD = ROOT / "deploy" / "nomad" / "alcove.nomad.hcl"
DOC = ROOT / "docs" / "cluster.md"
NAMESPACE = "alcove"


class Problems:
    """Problems found in one file; reported together at the end."""

    def __init__(self):
        self.by_file = {}

    def add(self, path, message):
        self.by_file.setdefault(rel(path), []).append(message)


def rel(path):
    p = Path(path)
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


PROBLEMS = Problems()


# --- the binary's --help -----------------------------------------------------------------------

class Help:
    """One command's `--help`: its options (and whether each takes a value), the env vars it
    reads, its subcommands, and its usage line."""

    OPTION = re.compile(r"^\s{2,}(?:(-[A-Za-z0-9]), )?(--[a-z0-9][a-z0-9-]*)(?: <[^>]+>)?")
    SHORT_ONLY = re.compile(r"^\s{2,}(-[A-Za-z0-9])(?: <[^>]+>)?\s")

    def __init__(self, path):
        self.path = tuple(path)
        argv = [BIN, *self.path, "--help"]
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        except OSError as e:
            sys.exit(f"tests/deploy: cannot run {BIN}: {e} (build it with `cargo build -p alcove`, "
                     "or set ALCOVE_BIN)")
        if out.returncode != 0:
            raise KeyError(f"`{' '.join(argv[1:])}` failed: {out.stderr.strip()[:300]}")
        self.text = out.stdout
        self.options = {}      # "--name" / "-m" -> takes a value
        self.env_of = {}       # "--name" -> its env var
        self.envs = set()
        self.commands = set()
        section = None
        current = None
        self.usages = []
        for line in self.text.splitlines():
            if line.startswith("Usage: "):
                self.usages.append(line[len("Usage: "):].strip())
                section = "Usage"
                continue
            if section == "Usage" and line.startswith(" ") and line.strip():
                # Further forms, e.g. `alcove node <COMMAND>` beside the options form.
                self.usages.append(line.strip())
                continue
            if line and not line[0].isspace() and line.endswith(":"):
                section = line[:-1]
                current = None
                continue
            if section == "Commands":
                m = re.match(r"^\s{2}(\S+)", line)
                if m:
                    self.commands.add(m.group(1))
                continue
            if section != "Options":
                continue
            m = self.OPTION.match(line)
            s = None if m else self.SHORT_ONLY.match(line)
            if m:
                current = [n for n in (m.group(1), m.group(2)) if n]
                takes = "<" in line[: m.end()]
                for n in current:
                    self.options[n] = takes
            elif s:
                current = [s.group(1)]
                self.options[s.group(1)] = "<" in line[: s.end()]
            if current:
                for alias_list in re.findall(r"\[alias(?:es)?: ([^\]]+)\]", line):
                    for a in re.findall(r"--[a-z0-9-]+", alias_list):
                        self.options[a] = self.options[current[0]]
                        current.append(a)
                for env in re.findall(r"\[env: ([A-Z0-9_]+)", line):
                    self.envs.add(env)
                    for n in current:
                        self.env_of[n] = env
        self.options.setdefault("--help", False)
        self.options.setdefault("-h", False)
        # The form used when no subcommand is given: the first without <COMMAND>, if any.
        subcommand = (lambda u: self.commands and "<COMMAND>" in u.split())
        plain = [u for u in self.usages if not subcommand(u)]
        self.usage = plain[0] if plain else (self.usages[0] if self.usages else "")
        self.needs_command = bool(self.usages) and not plain

    def name(self):
        return "alcove " + " ".join(self.path) if self.path else "alcove"

    def positional_slots(self):
        """(least, most) positionals the usage line allows; most is None for any number."""
        # Drop `alcove` and the subcommand path.
        rest = self.usage.split()[1 + len(self.path):]
        least, most = 0, 0
        prev_option = False
        for tok in rest:
            if tok == "[OPTIONS]" or (tok == "<COMMAND>" and self.commands):
                prev_option = False
                continue
            if tok.startswith("-"):
                prev_option = True
                continue
            if re.fullmatch(r"[<\[][A-Za-z0-9_]+[>\]](\.\.\.)?\]?", tok):
                if prev_option:
                    prev_option = False
                    continue
                if tok.startswith("<"):
                    least += 1
                if most is not None:
                    most = None if "..." in tok else most + 1
            prev_option = False
        return least, most

    def required_options(self):
        """Options the usage line names outside brackets, e.g. `--server <SERVER>`."""
        rest = self.usage.split()[1 + len(self.path):]
        return [t for t in rest if t.startswith("--")]


_HELP = {}


def help_for(path):
    key = tuple(path)
    if key not in _HELP:
        _HELP[key] = Help(key)
    return _HELP[key]


def is_alcove(token):
    return token == "alcove" or token.endswith("/alcove")


class Command:
    """One `alcove ...` command line, walked through the help of each level."""

    def __init__(self, argv, env, where, path_file, strict=True):
        self.argv = list(argv)
        self.env = dict(env)          # env vars given to it: name -> value (or None)
        self.where = where            # e.g. "DaemonSet alcove-node, container node"
        self.file = path_file
        self.path = []                # the subcommand path, e.g. ["template", "build"]
        self.flags = {}               # "--name" -> value (True for a switch)
        self.positionals = []
        self.ok = True
        self._walk(strict)

    def problem(self, msg):
        self.ok = False
        PROBLEMS.add(self.file, f"{self.where}: `{shlex.join(self.argv)}`: {msg}")

    def _walk(self, strict):
        try:
            h = help_for([])
        except KeyError as e:
            self.problem(str(e))
            return
        helps = [h]
        i = 1
        while i < len(self.argv):
            t = self.argv[i]
            if t == "--":
                self.positionals.extend(self.argv[i + 1:])
                break
            if t.startswith("-") and len(t) > 1:
                name, eq, val = t.partition("=")
                if name not in h.options:
                    self.problem(f"{name} is not an option of `{h.name()}` (see `{h.name()} --help`)")
                elif h.options[name]:
                    if not eq:
                        if i + 1 < len(self.argv):
                            i += 1
                            val = self.argv[i]
                        elif strict:
                            self.problem(f"{name} needs a value")
                    self.flags[name] = val
                else:
                    if eq:
                        self.problem(f"{name} takes no value in `{h.name()}`")
                    self.flags[name] = True
            elif h.commands and not self.positionals:
                if t in h.commands:
                    self.path.append(t)
                    try:
                        h = help_for(self.path)
                    except KeyError as e:
                        self.problem(str(e))
                        return
                    helps.append(h)
                elif strict:
                    self.problem(f"`{t}` is not a subcommand of `{h.name()}` "
                                 f"(it has: {', '.join(sorted(h.commands))})")
                    return
                else:
                    self.positionals.append(t)
            else:
                self.positionals.append(t)
            i += 1
        self.help = h
        if strict and h.needs_command:
            self.problem(f"`{h.name()}` needs a subcommand ({', '.join(sorted(h.commands))})")
        if strict:
            least, most = h.positional_slots()
            if most is not None and len(self.positionals) > most:
                self.problem(f"`{h.name()}` takes at most {most} positional argument(s), got "
                             f"{self.positionals}")
            elif len(self.positionals) < least:
                self.problem(f"`{h.name()}` needs {least} positional argument(s) "
                             f"({h.usage}), got {self.positionals}")
            for req in h.required_options():
                env = h.env_of.get(req)
                if req not in self.flags and not (env and env in self.env):
                    self.problem(f"`{h.name()}` needs {req}" + (f" (or {env})" if env else ""))
        for name in self.env:
            if name.startswith("ALCOVE_") and name not in h.envs:
                self.problem(f"env {name} is not read by `{h.name()}` (its --help names: "
                             f"{', '.join(sorted(h.envs)) or 'none'})")

    def is_(self, *path):
        return tuple(self.path) == path

    def value(self, flag):
        """A flag's value, else its env var's, else None."""
        if flag in self.flags:
            return self.flags[flag]
        env = getattr(self, "help", None) and self.help.env_of.get(flag)
        if env and env in self.env:
            return self.env[env]
        return None


# --- shell text ---------------------------------------------------------------------------------

SHELL_WORDS = {"do", "then", "else", "elif", "exec", "time", "sudo", "!", "{", "nohup"}


def shell_commands(script):
    """The simple commands of a shell script, each as (argv, env assignments)."""
    script = script.replace("\\\n", " ")
    out = []
    for line in script.splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|()")
        lex.whitespace_split = True
        lex.commenters = "#"
        try:
            tokens = list(lex)
        except ValueError:  # unbalanced quotes: still check the words
            tokens = line.split("#")[0].split()
        cmd = []
        for tok in tokens + [";"]:
            if tok and set(tok) <= set(";&|()"):
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(tok)
    result = []
    for cmd in out:
        env = {}
        while cmd and (cmd[0] in SHELL_WORDS or re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", cmd[0])):
            if "=" in cmd[0] and cmd[0] not in SHELL_WORDS:
                k, _, v = cmd[0].partition("=")
                env[k] = v
            cmd = cmd[1:]
        if cmd:
            result.append((cmd, env))
    return result


def alcove_commands(argv, env, where, path_file, strict=True):
    """The `alcove` commands an argv runs: itself, a wrapper's tail, or `sh -c` scripts."""
    found = []
    if not argv:
        return found
    if is_alcove(argv[0]):
        return [Command(argv, env, where, path_file, strict)]
    if Path(argv[0]).name in ("sh", "bash", "dash") and "-c" in argv:
        script = argv[argv.index("-c") + 1] if argv.index("-c") + 1 < len(argv) else ""
        for cmd, extra in shell_commands(script):
            if is_alcove(cmd[0]):
                found.append(Command(cmd, {**env, **extra}, where, path_file, strict))
        return found
    # A wrapper (`sh /etc/…/cgroup-init.sh alcove node …`): the first `alcove` word on.
    for i, tok in enumerate(argv):
        if is_alcove(tok):
            return [Command(argv[i:], env, where, path_file, strict)]
    return found


def server_url_ok(url):
    """As `alcove node` (crates/cluster/src/node.rs, heartbeat_client): https, or plain http to
    a loopback address only."""
    m = re.match(r"^(https?)://(\[[^\]]+\]|[^/:]+)", url or "")
    if not m:
        return False
    host = m.group(2).strip("[]")
    loopback = host == "localhost" or host == "::1" or host.startswith("127.")
    return m.group(1) == "https" or loopback


def port_of(addr):
    m = re.search(r":(\d+)$", str(addr or ""))
    return int(m.group(1)) if m else None


# --- Kubernetes ---------------------------------------------------------------------------------

def load_k8s():
    docs = []
    for f in sorted(K8S.glob("*.yaml")) + sorted(K8S.glob("*.yml")):
        try:
            for d in yaml.safe_load_all(f.read_text()):
                if d is not None:
                    if not isinstance(d, dict) or "kind" not in d:
                        PROBLEMS.add(f, "a YAML document without `kind`")
                        continue
                    docs.append((f, d))
        except yaml.YAMLError as e:
            PROBLEMS.add(f, f"does not parse as YAML: {e}")
    return docs


def pod_commands(f, kind, name, pod):
    """Checks one pod template's containers; answers {container name: [Command]}."""
    spec = pod.get("spec", {})
    volumes = {v.get("name"): v for v in spec.get("volumes", []) or []}
    out = {}
    for group in ("initContainers", "containers"):
        for c in spec.get(group, []) or []:
            where = f"{kind} {name}, {'init ' if group == 'initContainers' else ''}container {c.get('name')}"
            env = {}
            for e in c.get("env", []) or []:
                n = e.get("name")
                v = e.get("value")
                for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", str(v or "")):
                    if ref not in env:
                        PROBLEMS.add(f, f"{where}: env {n} uses $({ref}), which is not defined "
                                        "before it (Kubernetes expands only earlier variables)")
                env[n] = v if "valueFrom" not in e else e["valueFrom"]
            mounts = c.get("volumeMounts", []) or []
            for m in mounts:
                if m.get("name") not in volumes:
                    PROBLEMS.add(f, f"{where}: volumeMount {m.get('name')} names no volume of the pod")
            argv = [str(x) for x in (c.get("command") or []) + (c.get("args") or [])]
            # Files from ConfigMaps and Secrets that the command line names must exist.
            for tok in argv:
                if tok.startswith("/"):
                    check_projected_file(f, where, tok, mounts, volumes)
            cmds = alcove_commands(argv, env, where, f)
            if not cmds:
                PROBLEMS.add(f, f"{where}: runs no `alcove` command ({argv})")
            for cmd in cmds:
                cmd.container = c
                cmd.mounts = mounts
                cmd.volumes = volumes
            out[c.get("name")] = cmds
    return out


OBJECTS = {}


def check_projected_file(f, where, path, mounts, volumes):
    for m in mounts:
        mp = m.get("mountPath", "").rstrip("/")
        if path.startswith(mp + "/"):
            v = volumes.get(m.get("name"), {})
            key = path[len(mp) + 1:]
            if "configMap" in v:
                cm = OBJECTS.get(("ConfigMap", v["configMap"].get("name")))
                if cm is None:
                    PROBLEMS.add(f, f"{where}: volume {m.get('name')} names ConfigMap "
                                    f"{v['configMap'].get('name')}, which is not in deploy/kubernetes")
                elif key not in (cm.get("data") or {}):
                    PROBLEMS.add(f, f"{where}: {path}: ConfigMap {v['configMap'].get('name')} has no key {key}")
            if "secret" in v:
                items = {i.get("path"): i.get("key") for i in v["secret"].get("items", []) or []}
                sec = OBJECTS.get(("Secret", v["secret"].get("secretName")))
                want = items.get(key, key)
                if items and key not in items:
                    PROBLEMS.add(f, f"{where}: {path}: the Secret volume {m.get('name')} projects no {key}")
                elif sec is not None:
                    keys = set((sec.get("data") or {}) | (sec.get("stringData") or {}))
                    if want not in keys:
                        PROBLEMS.add(f, f"{where}: {path}: Secret {sec['metadata']['name']} has no key {want}")
            return True
    return False


def mounted_from(cmd, path):
    """The volume a path in the container is on, and the mount, or (None, None)."""
    best = (None, None)
    for m in cmd.mounts:
        mp = m.get("mountPath", "").rstrip("/")
        if path == mp or path.startswith(mp + "/"):
            if best[1] is None or len(mp) > len(best[1].get("mountPath", "")):
                best = (cmd.volumes.get(m.get("name")), m)
    return best


def container_ports(c):
    return {p.get("name"): p.get("containerPort") for p in c.get("ports", []) or []}


def check_k8s():
    docs = load_k8s()
    for f, d in docs:
        key = (d["kind"], (d.get("metadata") or {}).get("name"))
        if key in OBJECTS and d["kind"] != "Kustomization":
            PROBLEMS.add(f, f"{key[0]} {key[1]} is defined twice")
        OBJECTS[key] = d
        OBJECTS.setdefault(("file", key), f)
    file_of = {k: OBJECTS[("file", k)] for k in list(OBJECTS) if k[0] != "file"}

    expected = {
        ("Namespace", NAMESPACE),
        ("Secret", "alcove-cluster-token"),
        ("PersistentVolumeClaim", "alcove-control-plane-data"),
        ("Deployment", "alcove-control-plane"),
        ("Service", "alcove-control-plane"),
        ("ConfigMap", "alcove-node-entrypoint"),
        ("DaemonSet", "alcove-node"),
        ("Service", "alcove-postgres"),
        ("Kustomization", None),
    }
    have = {k for k in file_of}
    for k in sorted(expected - have, key=str):
        PROBLEMS.add(K8S, f"no {k[0]} {k[1] or ''} in deploy/kubernetes".rstrip())
    for k in sorted(have - expected, key=str):
        PROBLEMS.add(file_of[k], f"unexpected {k[0]} {k[1]} (update tests/deploy/check.py if it is meant)")

    for k, f in file_of.items():
        d = OBJECTS[k]
        if k[0] in ("Namespace", "Kustomization"):
            continue
        ns = (d.get("metadata") or {}).get("namespace")
        if ns != NAMESPACE:
            PROBLEMS.add(f, f"{k[0]} {k[1]} is in namespace {ns!r}, not {NAMESPACE!r}")

    check_kustomization(docs)

    sec = OBJECTS.get(("Secret", "alcove-cluster-token"))
    if sec is not None:
        keys = (sec.get("data") or {}) | (sec.get("stringData") or {})
        if "token" not in keys:
            PROBLEMS.add(file_of[("Secret", "alcove-cluster-token")], "the Secret has no key `token`")

    pg = OBJECTS.get(("Service", "alcove-postgres"))
    if pg is not None:
        spec = pg.get("spec") or {}
        if spec.get("type") != "ExternalName" or not spec.get("externalName"):
            PROBLEMS.add(file_of[("Service", "alcove-postgres")],
                         "alcove-postgres must be an ExternalName Service with an externalName")

    dep = OBJECTS.get(("Deployment", "alcove-control-plane"))
    if dep is not None:
        check_control_plane(file_of[("Deployment", "alcove-control-plane")], dep)
    ds = OBJECTS.get(("DaemonSet", "alcove-node"))
    if ds is not None:
        check_nodes(file_of[("DaemonSet", "alcove-node")], ds)


def check_kustomization(docs):
    kf = [(f, d) for f, d in docs if d["kind"] == "Kustomization"]
    if not kf:
        return
    f, k = kf[0]
    listed = list(k.get("resources") or [])
    files = {p.name for p in K8S.iterdir() if p.suffix in (".yaml", ".yml") and p.name != f.name}
    for r in listed:
        if not (K8S / r).exists():
            PROBLEMS.add(f, f"resources lists {r}, which does not exist")
    for missing in sorted(files - set(listed)):
        PROBLEMS.add(f, f"{missing} is not listed in resources")
    images = {i.get("name") for i in k.get("images") or []}
    for _, d in docs:
        pod = (d.get("spec") or {}).get("template") or {}
        for c in ((pod.get("spec") or {}).get("containers") or []) + \
                 ((pod.get("spec") or {}).get("initContainers") or []):
            name = str(c.get("image", "")).rsplit(":", 1)[0]
            if images and name not in images:
                PROBLEMS.add(f, f"image {c.get('image')} of {d['kind']} {d['metadata']['name']} "
                                f"is not in `images` (so `kustomize edit set image` misses it)")


def check_control_plane(f, dep):
    spec = dep.get("spec") or {}
    if spec.get("replicas") != 1:
        PROBLEMS.add(f, f"the control plane must have replicas: 1 (SQLite), has {spec.get('replicas')}")
    if (spec.get("strategy") or {}).get("type") != "Recreate":
        PROBLEMS.add(f, "the control plane's strategy must be Recreate (never two at once on SQLite)")
    text = f.read_text()
    if "--database-url" not in text or "Postgres" not in text:
        PROBLEMS.add(f, "the comment that more replicas need the Postgres store (`--database-url`) is gone")
    pod = spec.get("template") or {}
    labels = (pod.get("metadata") or {}).get("labels") or {}
    sel = (spec.get("selector") or {}).get("matchLabels") or {}
    if not sel or any(labels.get(k) != v for k, v in sel.items()):
        PROBLEMS.add(f, "the Deployment's selector does not match its pod labels")
    check_pod_refs(f, "Deployment alcove-control-plane", pod)
    cmds = pod_commands(f, "Deployment", "alcove-control-plane", pod)
    servers = [c for cs in cmds.values() for c in cs if c.is_("server")]
    if len(servers) != 1:
        PROBLEMS.add(f, f"the control plane runs {len(servers)} `alcove server` commands, not 1")
        return
    s = servers[0]
    if not s.ok:
        return
    if not s.value("--cluster-listen"):
        PROBLEMS.add(f, "`alcove server` without --cluster-listen is no control plane")
    ports = container_ports(s.container)
    for flag, pname in (("--listen", "api"), ("--cluster-listen", "cluster")):
        addr = s.value(flag)
        if addr is None or port_of(addr) != ports.get(pname):
            PROBLEMS.add(f, f"{flag} {addr} does not listen on the containerPort named {pname} "
                            f"({ports.get(pname)})")
        if addr and addr.startswith("127."):
            PROBLEMS.add(f, f"{flag} {addr} is loopback: unreachable from other pods")
    data = s.value("--data-dir")
    vol, _ = mounted_from(s, data or "")
    if data is None or vol is None or "persistentVolumeClaim" not in vol:
        PROBLEMS.add(f, f"--data-dir {data} is not on the PersistentVolumeClaim")
    token = s.value("--cluster-token-file")
    vol, _ = mounted_from(s, token or "")
    if token is None or vol is None or (vol.get("secret") or {}).get("secretName") != "alcove-cluster-token":
        PROBLEMS.add(f, f"--cluster-token-file {token} is not a file of the Secret alcove-cluster-token")
    # The Service in front of it.
    svc = OBJECTS.get(("Service", "alcove-control-plane"))
    if svc is not None:
        sf = OBJECTS[("file", ("Service", "alcove-control-plane"))]
        ssel = (svc.get("spec") or {}).get("selector") or {}
        if not ssel or any(labels.get(k) != v for k, v in ssel.items()):
            PROBLEMS.add(sf, "the Service's selector does not select the control plane's pods")
        named = {p.get("name"): p for p in (svc.get("spec") or {}).get("ports") or []}
        for want in ("api", "cluster"):
            if want not in named:
                PROBLEMS.add(sf, f"the Service has no port named {want}")
        for p in named.values():
            t = p.get("targetPort", p.get("port"))
            if isinstance(t, str) and t not in ports:
                PROBLEMS.add(sf, f"targetPort {t} names no containerPort of the control plane "
                                 f"({', '.join(ports)})")
            if isinstance(t, int) and t not in ports.values():
                PROBLEMS.add(sf, f"targetPort {t} is no containerPort of the control plane")


def check_pod_refs(f, what, pod):
    """Every Secret, ConfigMap and PersistentVolumeClaim a pod's volumes name is defined here."""
    for v in (pod.get("spec") or {}).get("volumes") or []:
        for kind, field, ref in (("Secret", "secret", "secretName"),
                                 ("ConfigMap", "configMap", "name"),
                                 ("PersistentVolumeClaim", "persistentVolumeClaim", "claimName")):
            if field in v and (kind, v[field].get(ref)) not in OBJECTS:
                PROBLEMS.add(f, f"{what}: volume {v.get('name')} names {kind} {v[field].get(ref)}, "
                                "which is not in deploy/kubernetes")


def check_nodes(f, ds):
    spec = ds.get("spec") or {}
    pod = spec.get("template") or {}
    ps = pod.get("spec") or {}
    labels = (pod.get("metadata") or {}).get("labels") or {}
    sel = (spec.get("selector") or {}).get("matchLabels") or {}
    if not sel or any(labels.get(k) != v for k, v in sel.items()):
        PROBLEMS.add(f, "the DaemonSet's selector does not match its pod labels")
    if (ps.get("nodeSelector") or {}).get("alcove.dev/node") != "true":
        PROBLEMS.add(f, 'the DaemonSet must select nodes labelled alcove.dev/node: "true"')
    if ps.get("hostPID"):
        PROBLEMS.add(f, "the DaemonSet must not use hostPID")
    if ps.get("hostNetwork"):
        PROBLEMS.add(f, "the DaemonSet must not need hostNetwork")
    check_pod_refs(f, "DaemonSet alcove-node", pod)
    volumes = {v.get("name"): v for v in ps.get("volumes") or []}
    devices = {}
    for dev in ("/dev/kvm", "/dev/net/tun"):
        vs = [n for n, v in volumes.items() if (v.get("hostPath") or {}).get("path") == dev]
        if not vs:
            PROBLEMS.add(f, f"no hostPath volume for {dev}")
            continue
        if volumes[vs[0]]["hostPath"].get("type") != "CharDevice":
            PROBLEMS.add(f, f"the hostPath volume for {dev} must have type CharDevice")
        devices[dev] = vs[0]
    cmds = pod_commands(f, "DaemonSet", "alcove-node", pod)
    nodes = [c for cs in cmds.values() for c in cs if c.is_("node")]
    builds = [c for cs in cmds.values() for c in cs if c.is_("template", "build")]
    if len(nodes) != 1:
        PROBLEMS.add(f, f"the DaemonSet runs {len(nodes)} `alcove node` commands, not 1")
    built = {c.positionals[0] for c in builds if c.positionals}
    for t in ("base", "code-interpreter-v1"):
        if t not in built:
            PROBLEMS.add(f, f"no init container runs `alcove template build {t}`")
    for c in builds:
        if c.container not in (ps.get("initContainers") or []):
            PROBLEMS.add(f, f"{c.where}: template builds belong in init containers")
    for c in nodes + builds:
        where = c.where
        if not ((c.container.get("securityContext") or {}).get("privileged") is True):
            PROBLEMS.add(f, f"{where}: must be privileged (QEMU, KVM, netns, nftables, cgroups)")
        for dev, vname in devices.items():
            if not any(m.get("name") == vname and m.get("mountPath") == dev for m in c.mounts):
                PROBLEMS.add(f, f"{where}: does not mount {dev}")
        for flag, what in (("--data-dir", "data dir"), ("--cache-dir", "cache dir")):
            p = c.value(flag)
            vol, _ = mounted_from(c, p or "")
            if p is None or vol is None or "hostPath" not in vol:
                PROBLEMS.add(f, f"{where}: the {what} ({flag} {p}) is not on a hostPath volume")
    if len(builds) and nodes:
        n = nodes[0]
        for c in builds:
            for flag in ("--data-dir", "--cache-dir"):
                if c.value(flag) != n.value(flag):
                    PROBLEMS.add(f, f"{c.where}: {flag} {c.value(flag)} is not the node's "
                                    f"({n.value(flag)}): the node would not find the templates")
    if len(nodes) != 1 or not nodes[0].ok:
        return
    n = nodes[0]
    req = (n.container.get("resources") or {}).get("requests") or {}
    if not req.get("cpu") or not req.get("memory"):
        PROBLEMS.add(f, f"{n.where}: needs resources.requests for cpu and memory")
    server = n.value("--server")
    if not server_url_ok(server):
        PROBLEMS.add(f, f"{n.where}: --server {server}: `alcove node` accepts only https:// "
                        "(plain http only to loopback)")
    token = n.value("--token-file")
    vol, _ = mounted_from(n, token or "")
    if token is None or vol is None or (vol.get("secret") or {}).get("secretName") != "alcove-cluster-token":
        PROBLEMS.add(f, f"{n.where}: --token-file {token} is not a file of the Secret alcove-cluster-token")
    node_id = n.value("--node-id")
    if not (isinstance(node_id, dict) and (node_id.get("fieldRef") or {}).get("fieldPath") == "spec.nodeName"):
        PROBLEMS.add(f, f"{n.where}: the node id must come from the downward API (spec.nodeName)")
    ports = container_ports(n.container)
    listen = n.value("--listen") or help_default(n.help, "--listen")
    if port_of(listen) != ports.get("link"):
        PROBLEMS.add(f, f"{n.where}: --listen {listen} is not the containerPort named link ({ports.get('link')})")
    adv = n.value("--advertise")
    env = n.env
    pod_ip_vars = [k for k, v in env.items()
                   if isinstance(v, dict) and (v.get("fieldRef") or {}).get("fieldPath") == "status.podIP"]
    if not isinstance(adv, str) or not adv.startswith("https://"):
        PROBLEMS.add(f, f"{n.where}: --advertise {adv} must be https://")
    elif not any(f"$({v})" in adv for v in pod_ip_vars):
        PROBLEMS.add(f, f"{n.where}: --advertise {adv} does not use the pod IP (status.podIP)")
    elif port_of(adv) != ports.get("link"):
        PROBLEMS.add(f, f"{n.where}: --advertise {adv} is not on the link port {ports.get('link')}")


def help_default(h, flag):
    m = re.search(re.escape(flag) + r" <[^>]+>\n[^\n]*\[default: ([^\]]+)\]", h.text)
    return m.group(1) if m else None


# --- Nomad --------------------------------------------------------------------------------------

def unq(v):
    if isinstance(v, str) and len(v) >= 2 and v[0] == '"' and v[-1] == '"':
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v[1:-1]
    return v


def blocks(body, kind):
    """[(label or None, block body)] of the blocks of a kind in an hcl2 body."""
    out = []
    for item in (body or {}).get(kind, []) or []:
        if isinstance(item, dict) and item.get("__is_block__"):
            out.append((None, item))
        elif isinstance(item, dict):
            for label, b in item.items():
                if label.startswith("__"):
                    continue
                out.append((unq(label), b))
    return out


def balanced(text):
    """Whether braces and brackets balance outside strings, comments and heredocs; else the
    problem."""
    stack = []
    i, line = 0, 1
    n = len(text)
    heredoc = None
    while i < n:
        ch = text[i]
        if heredoc:
            end = text.find("\n", i)
            end = n if end < 0 else end
            if text[i:end].strip() == heredoc:
                heredoc = None
            line += 1
            i = end + 1
            continue
        if ch == "\n":
            line += 1
        elif ch == "#" or text.startswith("//", i):
            i = text.find("\n", i)
            i = n if i < 0 else i
            continue
        elif text.startswith("/*", i):
            j = text.find("*/", i)
            if j < 0:
                return f"line {line}: unterminated /* comment"
            line += text.count("\n", i, j)
            i = j + 2
            continue
        elif text.startswith("<<", i):
            m = re.match(r"<<-?([A-Za-z_]+)\n", text[i:])
            if m:
                heredoc = m.group(1)
                i += m.end()
                line += 1
                continue
        elif ch == '"':
            j = i + 1
            depth = 0
            while j < n:
                if text[j] == "\\":
                    j += 2
                    continue
                if text.startswith("${", j):
                    depth += 1
                elif text[j] == "}" and depth:
                    depth -= 1
                elif text[j] == '"' and not depth:
                    break
                elif text[j] == "\n":
                    return f"line {line}: unterminated string"
                j += 1
            i = j + 1
            continue
        elif ch in "{[(":
            stack.append((ch, line))
        elif ch in "}])":
            want = {"}": "{", "]": "[", ")": "("}[ch]
            if not stack or stack[-1][0] != want:
                return f"line {line}: unmatched {ch}"
            stack.pop()
        i += 1
    if heredoc:
        return f"unterminated heredoc {heredoc}"
    if stack:
        return f"line {stack[-1][1]}: {stack[-1][0]} is never closed"
    return None


def check_nomad():
    f = NOMAD
    if not f.exists():
        PROBLEMS.add(f, "missing")
        return
    text = f.read_text()
    bad = balanced(text)
    if bad:
        PROBLEMS.add(f, f"unbalanced: {bad}")
        return
    try:
        doc = hcl2.loads(text)
    except Exception as e:  # the parser's own error types vary by version
        PROBLEMS.add(f, f"does not parse as HCL2: {' '.join(str(e).split())[:300]}")
        return
    variables = {label: unq(b.get("default")) for label, b in blocks(doc, "variable")}

    def resolve(v):
        v = unq(v)
        if isinstance(v, str):
            m = re.fullmatch(r"\$\{var\.([A-Za-z0-9_]+)\}", v)
            if m:
                if m.group(1) not in variables:
                    PROBLEMS.add(f, f"var.{m.group(1)} is used but not declared")
                return str(variables.get(m.group(1)))
        return v

    jobs = blocks(doc, "job")
    if [j for j, _ in jobs] != ["alcove"]:
        PROBLEMS.add(f, f"expected one job, `alcove`; found {[j for j, _ in jobs]}")
        return
    job = jobs[0][1]
    if unq(job.get("type")) != "service":
        PROBLEMS.add(f, f"job alcove has type {unq(job.get('type'))}, expected service")
    groups = dict(blocks(job, "group"))
    for g in ("control-plane", "node"):
        if g not in groups:
            PROBLEMS.add(f, f"job alcove has no group {g!r} (it has {sorted(groups)})")
    cp, nd = groups.get("control-plane"), groups.get("node")
    if cp is not None and cp.get("count") != 1:
        PROBLEMS.add(f, f"group control-plane must have count = 1 (SQLite), has {cp.get('count')}")
    found = {}
    for gname, g in groups.items():
        ports = set()
        for _, net in blocks(g, "network"):
            ports |= {label for label, _ in blocks(net, "port")}
        for tname, t in blocks(g, "task"):
            where = f"group {gname}, task {tname}"
            driver = unq(t.get("driver"))
            if driver not in ("raw_exec", "exec"):
                PROBLEMS.add(f, f"{where}: driver {driver}, expected raw_exec or exec")
            if gname == "node" and driver != "raw_exec":
                PROBLEMS.add(f, f"{where}: runs VMs as root, so raw_exec (not {driver})")
            cfgs = blocks(t, "config")
            cfg = cfgs[0][1] if cfgs else {}
            argv = [str(resolve(cfg.get("command")))] + [str(resolve(a)) for a in cfg.get("args") or []]
            for used in sorted(set(re.findall(r"NOMAD_(?:PORT|IP|ADDR)_([A-Za-z0-9_-]+)", " ".join(argv)))):
                if used not in ports:
                    PROBLEMS.add(f, f"{where}: uses the port {used}, which group {gname} does not declare")
            env = {}
            for _, e in blocks(t, "env"):
                env.update({k: unq(v) for k, v in e.items() if not k.startswith("__")})
            cmds = alcove_commands(argv, env, where, f)
            if not cmds:
                PROBLEMS.add(f, f"{where}: runs no `alcove` command ({argv})")
            dests = [unq(b.get("destination")) for _, b in blocks(t, "template")]
            for c in cmds:
                found.setdefault(gname, []).append(c)
                for flag in ("--token-file", "--cluster-token-file"):
                    v = c.value(flag)
                    if v and not any(d and v == "${NOMAD_SECRETS_DIR}/" + d.removeprefix("secrets/")
                                     for d in dests):
                        PROBLEMS.add(f, f"{where}: {flag} {v} is no file that a template block of "
                                        f"this task renders ({dests})")
    cps = [c for c in found.get("control-plane", []) if c.is_("server")]
    if len(cps) != 1:
        PROBLEMS.add(f, "group control-plane must run one `alcove server`")
    elif cps[0].ok and not cps[0].value("--cluster-listen"):
        PROBLEMS.add(f, "group control-plane: `alcove server` without --cluster-listen")
    nodes = [c for c in found.get("node", []) if c.is_("node")]
    if len(nodes) != 1:
        PROBLEMS.add(f, "group node must run one `alcove node`")
    elif nodes[0].ok:
        server = nodes[0].value("--server")
        if not server_url_ok(server):
            PROBLEMS.add(f, f"group node: --server {server}: `alcove node` accepts only https:// "
                            "(plain http only to loopback)")
        adv = nodes[0].value("--advertise")
        if adv and not adv.startswith("https://"):
            PROBLEMS.add(f, f"group node: --advertise {adv} must be https://")
    built = {c.positionals[0] for c in found.get("node", []) if c.is_("template", "build") and c.positionals}
    for t in ("base", "code-interpreter-v1"):
        if t not in built:
            PROBLEMS.add(f, f"group node does not build the template {t}")


# --- docs/cluster.md ----------------------------------------------------------------------------

SECTIONS = ["## On one host (trying it out)", "## Kubernetes", "## Nomad", "## What is not there yet"]
MARKER = "<!-- how-it-works: written with the cluster code -->"


def check_doc():
    f = DOC
    if not f.exists():
        PROBLEMS.add(f, "missing")
        return
    text = f.read_text()
    lines = text.splitlines()
    if not lines or lines[0] != "# Running a cluster":
        PROBLEMS.add(f, "must start with `# Running a cluster`")
    if MARKER not in text and "\n## How it works\n" not in text:
        PROBLEMS.add(f, f"neither the line {MARKER} nor a `## How it works` section")
    at = [text.find("\n" + s + "\n") for s in SECTIONS]
    for s, pos in zip(SECTIONS, at):
        if pos < 0:
            PROBLEMS.add(f, f"no section {s!r}")
    found = [p for p in at if p >= 0]
    if found != sorted(found):
        PROBLEMS.add(f, f"sections out of order (expected {SECTIONS})")
    intro = text.find(MARKER) if MARKER in text else text.find("\n## How it works\n")
    if intro >= 0 and found and intro > min(found):
        PROBLEMS.add(f, "how it works (or its marker) must come before the sections")

    seen_cmds = []
    # Code blocks: every alcove command, strictly.
    in_block, start, block, lang = False, 0, [], ""
    for no, line in enumerate(lines, 1):
        if line.startswith("```"):
            if not in_block:
                start, lang = no, line[3:].strip()
            elif lang != "text":  # diagrams (```text) are not commands
                for cmd, env in shell_commands("\n".join(block)):
                    if is_alcove(cmd[0]):
                        seen_cmds.append(Command(cmd, env, f"code block at line {start}", f))
            block = []
            in_block = not in_block
        elif in_block:
            block.append(line)
    if in_block:
        PROBLEMS.add(f, f"the code block at line {start} is never closed")
    # Inline code outside blocks: `alcove …` spans (flags only), and bare `--flag` spans.
    prose = re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    prose = re.sub(r"\n[ \t]*", " \n", prose)
    spans = []
    for m in re.finditer(r"`([^`]+)`", prose):
        no = prose.count("\n", 0, m.start()) + 1
        spans.append((no, m.group(1).strip()))
    bare, bare_env = [], []
    for no, span in spans:
        words = span.split()
        if words and is_alcove(words[0]):
            seen_cmds.append(Command(words, {}, f"inline code at line {no}", f, strict=False))
        elif re.match(r"--[a-z0-9][a-z0-9-]*(?:[ =]|$)", span):
            bare.append((no, re.split(r"[ =]", span)[0]))
        elif re.fullmatch(r"ALCOVE_[A-Z0-9_]+", span):
            bare_env.append((no, span))
    known, envs = set(), set()
    for path in [("server",), ("node",), ("template", "build")] + [tuple(c.path) for c in seen_cmds]:
        try:
            known |= set(help_for(path).options)
            envs |= help_for(path).envs
        except KeyError:
            pass
    for no, name in bare_env:
        if name not in envs:
            PROBLEMS.add(f, f"line {no}: `{name}` is read by none of `alcove server`, `alcove node`, "
                            "`alcove template build` or the commands this page shows")
    for no, flag in bare:
        if flag not in known:
            PROBLEMS.add(f, f"line {no}: `{flag}` is not an option of `alcove server`, `alcove node`, "
                            "`alcove template build` or any command this page shows")


# --- main ---------------------------------------------------------------------------------------

def main():
    if not Path(BIN).is_file() or not os.access(BIN, os.X_OK):
        sys.exit(f"tests/deploy: no alcove binary at {BIN}: build it with `cargo build -p alcove` "
                 "or set ALCOVE_BIN")
    checks = [("deploy/kubernetes", check_k8s),
              ("deploy/nomad/alcove.nomad.hcl", check_nomad),
              ("docs/cluster.md", check_doc)]
    passed = failed = 0
    for name, fn in checks:
        before = sum(len(v) for v in PROBLEMS.by_file.values())
        fn()
        after = sum(len(v) for v in PROBLEMS.by_file.values())
        if after == before:
            print(f"ok    {name}")
            passed += 1
        else:
            print(f"FAIL  {name}")
            failed += 1
    sys.stdout.flush()
    for file, msgs in sorted(PROBLEMS.by_file.items()):
        for m in msgs:
            print(f"{file}: {m}", file=sys.stderr)
    sys.stderr.flush()
    print(f"deploy: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
