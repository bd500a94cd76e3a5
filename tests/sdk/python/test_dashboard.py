"""The dashboard (`/dashboard`) in a real browser: Debian's Chromium driven by playwright-core
(tests/sdk/js/lib/browser.mjs), against the suite's server with real sandboxes made by the
official SDK. Screenshots are kept under $ALCOVE_TEST_ARTIFACTS/dashboard."""

import os
import time
from pathlib import Path

import pytest
from e2b import Sandbox

from browser import Browser

ARTIFACTS = Path(os.environ.get("ALCOVE_TEST_ARTIFACTS", "/tmp/alcove-test-artifacts")) / "dashboard"
# Metadata a caller wrote: the page must show it as text, never run it.
XSS = "<img src=x onerror=document.title='owned'>"


@pytest.fixture(scope="module")
def browser():
    b = Browser()
    yield b
    b.close()


def test_sign_in_filter_and_kill_from_the_dashboard(browser, run_id):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    sbx = Sandbox.create(metadata={"run": run_id, "note": XSS}, timeout=300)
    base = os.environ["E2B_API_URL"]
    try:
        r = browser.ok(cmd="goto", url=f"{base}/dashboard")
        assert r["title"].startswith("Sign in"), r
        # A wrong key is refused on the page, saying what to do.
        browser.ok(cmd="fill", selector="#api_key", value="e2b_" + "0" * 40)
        browser.ok(cmd="click", selector="form.signin button")
        assert "not valid" in browser.ok(cmd="text")["text"]
        browser.ok(cmd="fill", selector="#api_key", value=os.environ["E2B_API_KEY"])
        r = browser.ok(cmd="click", selector="form.signin button")
        assert r["url"].endswith("/dashboard/sandboxes"), r
        # This run's sandbox, by its metadata: listed, its metadata shown as text.
        browser.ok(cmd="fill", selector="#metadata", value=f"run={run_id}")
        r = browser.ok(cmd="click", selector="form.filters button")
        assert r["title"].startswith("Sandboxes"), r
        page = browser.ok(cmd="text", selector="table")["text"]
        assert sbx.sandbox_id in page and XSS in page, page
        assert "owned" not in r["title"]
        browser.ok(cmd="screenshot", path=str(ARTIFACTS / "sandboxes.png"))
        # Killed from the page: gone for the SDK too.
        browser.ok(cmd="click", selector=f'button[aria-label="Kill sandbox {sbx.sandbox_id}"]')
        assert f"Killed {sbx.sandbox_id}." in browser.ok(cmd="text")["text"]
        assert not sbx.is_running()
        browser.ok(cmd="screenshot", path=str(ARTIFACTS / "killed.png"))
        # Signed out: back at the sign-in page, and the list asks for it again.
        r = browser.ok(cmd="click", selector="form.signout button")
        assert r["title"].startswith("Sign in"), r
        r = browser.ok(cmd="goto", url=f"{base}/dashboard/sandboxes")
        assert r["title"].startswith("Sign in"), r
    finally:
        try:
            sbx.kill()
        except Exception:
            pass


def sign_in(browser, base):
    r = browser.ok(cmd="goto", url=f"{base}/dashboard/signin")
    if r["title"].startswith("Sign in"):
        browser.ok(cmd="fill", selector="#api_key", value=os.environ["E2B_API_KEY"])
        r = browser.ok(cmd="click", selector="form.signin button")
    assert r["url"].endswith("/dashboard/sandboxes"), r


def notice(browser):
    return browser.ok(cmd="text", selector=".notice")["text"]


# Round trips of single keystrokes through the terminal's socket: the time from sending a
# character to the shell's echo of it coming back (browser -> server -> agent -> PTY and back).
ECHO_PROBE = """(async () => {
  const ws = document.getElementById('terminal').alcove.ws;
  const enc = new TextEncoder(), dec = new TextDecoder();
  const out = [];
  for (let i = 0; i < 30; i++) {
    const t0 = performance.now();
    await new Promise((done) => {
      const on = (ev) => {
        if (typeof ev.data !== 'string' && dec.decode(ev.data).includes('x')) {
          ws.removeEventListener('message', on); done();
        }
      };
      ws.addEventListener('message', on);
      ws.send(enc.encode('x'));
    });
    out.push(performance.now() - t0);
    await new Promise((r) => setTimeout(r, 30));
  }
  ws.send(enc.encode('\\x15'));
  return out;
})()"""

TERMINAL_TEXT = """[...document.querySelectorAll('#terminal .xterm-rows > div')].map((d) => d.textContent)"""


def test_create_terminal_metrics_fork_kill_and_usage_from_the_dashboard(browser, run_id):
    """The issue's walk: create from the UI, `echo hi` in the terminal, the metrics chart,
    a snapshot and a sandbox started from its node in the tree, kill, the usage page."""
    from e2b import Sandbox as SdkSandbox

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    base = os.environ["E2B_API_URL"]
    made = []
    try:
        sign_in(browser, base)
        # Create from the list page's form.
        browser.ok(cmd="fill", selector="#new-template", value="base")
        browser.ok(cmd="fill", selector="#new-metadata", value=f"run={run_id}, from=dashboard")
        r = browser.ok(cmd="click", selector='form[aria-label="Create a sandbox"] button')
        sid = r["url"].split("/dashboard/sandboxes/")[1].split("?")[0]
        made.append(sid)
        assert f"Created {sid}" in notice(browser)
        sbx = SdkSandbox.connect(sid)
        assert sbx.get_info().metadata["from"] == "dashboard"

        # The terminal: a shell in a PTY; `echo hi` answers `hi` on a line of its own.
        browser.ok(cmd="click", selector="#terminal-open")
        browser.ok(cmd="wait", expr="document.getElementById('terminal').dataset.state === 'open'")
        browser.ok(cmd="wait", expr=f"{TERMINAL_TEXT}.some((l) => l.includes('$'))")
        browser.ok(cmd="type", selector="#terminal", text="echo hi\n")
        browser.ok(cmd="wait", expr=f"{TERMINAL_TEXT}.some((l) => l.trim() === 'hi')")
        browser.ok(cmd="screenshot", path=str(ARTIFACTS / "terminal.png"))
        echoes = sorted(browser.ok(cmd="evaluate", expr=ECHO_PROBE)["value"])
        p50 = echoes[len(echoes) // 2]
        print(f"terminal keystroke echo over the server: p50 {p50:.1f} ms, "
              f"p90 {echoes[int(len(echoes) * 0.9)]:.1f} ms, n={len(echoes)}")
        (ARTIFACTS / "terminal-echo-ms.txt").write_text(" ".join(f"{e:.2f}" for e in echoes) + "\n")
        # What the terminal ran is the sandbox's: a file it writes, the SDK reads.
        browser.ok(cmd="type", selector="#terminal", text=f"echo {run_id} > /tmp/from-terminal\n")
        for _ in range(50):
            if sbx.files.exists("/tmp/from-terminal"):
                break
            time.sleep(0.2)
        assert sbx.files.read("/tmp/from-terminal").strip() == run_id

        # Files: the terminal's file listed, one uploaded from the browser, one downloaded.
        browser.ok(cmd="goto", url=f"{base}/dashboard/sandboxes/{sid}/files?path=/tmp")
        assert "from-terminal" in browser.ok(cmd="text", selector="table")["text"]
        up = ARTIFACTS / "upload.txt"
        up.write_text(f"uploaded {run_id}\n")
        browser.ok(cmd="upload", selector="#file", path=str(up))
        browser.ok(cmd="click", selector='form[enctype="multipart/form-data"] button')
        assert "Uploaded /tmp/upload.txt" in notice(browser)
        assert sbx.files.read("/tmp/upload.txt") == f"uploaded {run_id}\n"
        got = browser.ok(cmd="evaluate", expr=(
            "fetch('/dashboard/sandboxes/" + sid + "/download?path=%2Ftmp%2Ffrom-terminal')"
            ".then(async (r) => [r.status, r.headers.get('content-disposition'), await r.text()])"))["value"]
        assert got[0] == 200 and "attachment" in got[1] and got[2].strip() == run_id, got

        # Ports: a server started in the sandbox is listed with its link.
        sbx.commands.run("python3 -m http.server 8123 >/dev/null 2>&1", background=True)
        for _ in range(50):
            if sbx.commands.run("ss -ltnH 'sport = :8123' | grep -q 8123 && echo up || true").stdout.strip() == "up":
                break
            time.sleep(0.2)
        browser.ok(cmd="goto", url=f"{base}/dashboard/sandboxes/{sid}")
        ports = browser.ok(cmd="text", selector='section[aria-labelledby="h-ports"]')["text"]
        assert f"8123-{sid}." in ports, ports

        # Egress rules, edited live: the SDK sees the new ones.
        browser.ok(cmd="fill", selector="#allow", value="pypi.org")
        browser.ok(cmd="fill", selector="#deny", value="0.0.0.0/0")
        browser.ok(cmd="click", selector="form.network button")
        assert "Egress rules updated." in notice(browser)
        net = sbx.get_info().network or {}
        allow = net.get("allow_out") if isinstance(net, dict) else getattr(net, "allow_out", None)
        assert allow == ["pypi.org"], net

        # The metrics chart draws from the sandbox's history (sampled every few seconds).
        browser.ok(cmd="wait", timeout=120,
                   expr="Number(document.getElementById('metrics').dataset.points || 0) >= 1 "
                        "&& !!document.querySelector('#metrics canvas') "
                        "&& !!document.querySelector('#network canvas')")
        browser.ok(cmd="screenshot", path=str(ARTIFACTS / "sandbox.png"))

        # A snapshot, then a sandbox started from its node in the checkpoint tree.
        browser.ok(cmd="fill", selector="#snap-name", value=f"dash-{run_id}")
        browser.ok(cmd="click", selector='form[action$="/do/snapshot"] button')
        snap = notice(browser).split("Snapshot ")[1].split(" ")[0]
        r = browser.ok(cmd="goto", url=f"{base}/dashboard/snapshots")
        assert r["title"].startswith("Checkpoints"), r
        assert f"dash-{run_id}" in browser.ok(cmd="text", selector="ul.tree")["text"]
        browser.ok(cmd="click", selector=f'button[aria-label="Start sandboxes from {snap}"]')
        msg = notice(browser)
        child = msg.split("Started ")[1].split(" ")[0]
        made.append(child)
        assert child != sid
        # The child shows as live on its node.
        browser.ok(cmd="goto", url=f"{base}/dashboard/snapshots")
        on_node = browser.ok(cmd="text", selector=f'li[data-snapshot="{snap}"] .live')["text"]
        assert child in on_node, on_node
        browser.ok(cmd="screenshot", path=str(ARTIFACTS / "tree.png"))
        # The child has the parent's file: it was restored from the snapshot.
        assert SdkSandbox.connect(child).files.read("/tmp/from-terminal").strip() == run_id

        # Kill the child from its page.
        browser.ok(cmd="goto", url=f"{base}/dashboard/sandboxes/{child}")
        browser.ok(cmd="click", selector='form[action$="/do/kill"] button')
        assert f"Killed {child}." in notice(browser)
        assert sbx.is_running()  # the parent is untouched

        # Usage: the chart and the limits.
        r = browser.ok(cmd="goto", url=f"{base}/dashboard/usage")
        assert r["title"].startswith("Usage"), r
        browser.ok(cmd="wait", expr="!!document.querySelector('#usage-chart canvas')")
        text = browser.ok(cmd="text")["text"]
        assert "Running sandboxes" in text and "Total:" in text, text
        browser.ok(cmd="screenshot", path=str(ARTIFACTS / "usage.png"))
    finally:
        for s in made:
            try:
                SdkSandbox.kill(s)
            except Exception:
                pass
