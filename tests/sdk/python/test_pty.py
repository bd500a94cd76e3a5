"""PTY: create, send input, resize. Needs real sandboxes."""

import time

from e2b import PtySize


def test_pty_create_send_and_resize(sandbox):
    data = bytearray()
    h = sandbox.pty.create(PtySize(rows=24, cols=80))
    try:
        sandbox.pty.send_stdin(h.pid, b"stty size\n")
        sandbox.pty.resize(h.pid, PtySize(rows=40, cols=120))
        sandbox.pty.send_stdin(h.pid, b"stty size; exit\n")
        h.wait(on_pty=lambda b: data.extend(b))
    except Exception:
        sandbox.pty.kill(h.pid)
        raise
    text = data.decode(errors="replace")
    assert "24 80" in text, text
    assert "40 120" in text, text
