"""PTY: create, send input, resize. Needs real sandboxes."""

from e2b import PtySize


def test_pty_create_send_and_resize(sandbox):
    data = bytearray()
    h = sandbox.pty.create(PtySize(rows=24, cols=80))
    resized = False
    try:
        sandbox.pty.send_stdin(h.pid, b"stty size\n")
        # Resize only once the first answer is in: the shell reads its input when it gets to
        # it, so a resize sent at once could land before the first `stty size` runs.
        for _stdout, _stderr, pty in h:
            if pty:
                data.extend(pty)
            if not resized and b"24 80" in data:
                resized = True
                sandbox.pty.resize(h.pid, PtySize(rows=40, cols=120))
                sandbox.pty.send_stdin(h.pid, b"stty size; exit\n")
        h.wait()
    except Exception:
        sandbox.pty.kill(h.pid)
        raise
    text = data.decode(errors="replace")
    assert "24 80" in text, text
    assert "40 120" in text, text
