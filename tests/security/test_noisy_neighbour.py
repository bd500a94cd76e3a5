"""A sandbox that misbehaves in every way at once (fork bomb, memory hog, disk filler, CPU
spinner) leaves its neighbour working, with its command latency within 3x of idle (the one
timing assertion of the suite, asked for by issue 13; medians of several runs on both sides).
"""

import statistics
import time

from e2b import CommandExitException, Sandbox

from conftest import TEMPLATE


def echo_latency(sbx, n=7):
    times = []
    for _ in range(n):
        t = time.monotonic()
        assert sbx.commands.run("echo ok", timeout=60).stdout.strip() == "ok"
        times.append(time.monotonic() - t)
    return statistics.median(times)


MEMORY_HOG = "python3 -c 'a=[]\nwhile True: a.append(bytearray(8<<20))'"


def test_noisy_neighbour_leaves_the_other_sandbox_working():
    quiet = Sandbox.create(TEMPLATE, timeout=300, metadata={"suite": "security"})
    noisy = Sandbox.create(TEMPLATE, timeout=300, metadata={"suite": "security"})
    try:
        echo_latency(quiet, 2)  # warm the connection and the guest's page cache
        idle = echo_latency(quiet)

        # Everything at once, in the background.
        noisy.commands.run(f"while :; do {MEMORY_HOG}; done", background=True)
        noisy.commands.run("sh -c 'while :; do :; done'", background=True)
        noisy.commands.run("sh -c 'while :; do :; done'", background=True)
        noisy.commands.run("dd if=/dev/zero of=/home/user/fill bs=1M status=none; sleep 600",
                           background=True)
        noisy.commands.run("python3 -c 'import os\nwhile True:\n  try: os.fork()\n  except OSError: pass'",
                           background=True)
        noisy.commands.run("bash -c ':(){ :|:& };:'", background=True)
        time.sleep(5)

        busy = echo_latency(quiet)
        # The neighbour does real work too: files and processes.
        quiet.files.write("/home/user/ok.txt", "still fine")
        assert quiet.files.read("/home/user/ok.txt") == "still fine"
        assert quiet.commands.run("python3 -c 'print(sum(range(1000)))'", timeout=60).stdout.strip() == "499500"
        assert busy <= 3 * idle, f"neighbour echo p50 {busy * 1000:.0f} ms vs {idle * 1000:.0f} ms idle"
    finally:
        quiet.kill()
        noisy.kill()


def test_memory_hog_is_reported_as_out_of_memory(sandbox):
    """The kernel's OOM killer stops it; the caller is told why, and the sandbox lives on."""
    try:
        sandbox.commands.run(MEMORY_HOG, timeout=120)
        raise AssertionError("the memory hog was not stopped")
    except CommandExitException as e:
        text = f"{e.error} {e.stderr}".lower()
        assert "out of memory" in text or "oom" in text, (e.error, e.stderr[-500:])
    assert sandbox.commands.run("echo alive", timeout=60).stdout.strip() == "alive"
