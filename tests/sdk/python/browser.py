"""Headless Chromium on this host for the SDK suites (test_desktop.py, test_dashboard.py):
Debian's `chromium` driven by playwright-core through tests/sdk/js/lib/browser.mjs."""

import json
import os
import select
import subprocess
from pathlib import Path

JS_DIR = Path(__file__).resolve().parents[1] / "js"


class Browser:
    """Headless Chromium on this host, driven by playwright-core (tests/sdk/js/lib/browser.mjs):
    one JSON command per line in, one answer per line out."""

    def __init__(self):
        env = dict(os.environ)
        # tests/sdk/run.sh serves TLS for alcove.localhost:PORT with a certificate of its own.
        env["ALCOVE_TLS_CERT"] = os.environ["ALCOVE_SDK_TLS_CERT"]
        env["NODE_EXTRA_CA_CERTS"] = os.environ["ALCOVE_SDK_TLS_CA"]
        self.proc = subprocess.Popen(
            ["node", "lib/browser.mjs"], cwd=JS_DIR, env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )

    def call(self, timeout=300, **msg):
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"the browser did not answer {msg} within {timeout} s"
        line = self.proc.stdout.readline()
        assert line, f"the browser exited (status {self.proc.poll()})"
        answer = json.loads(line)
        return answer

    def ok(self, **msg):
        answer = self.call(**msg)
        assert "error" not in answer, answer["error"]
        return answer

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
