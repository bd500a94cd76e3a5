"""commands.run (foreground, background), cwd, user, envs, callbacks, stdin, kill, list,
connect, and the exit-code and timeout error paths. Needs real sandboxes."""

import time

import pytest
from e2b import CommandExitException, TimeoutException


def test_foreground_with_cwd_user_envs_and_callbacks(sandbox):
    out, err = [], []
    r = sandbox.commands.run(
        'echo "$GREETING from $(pwd) as $(whoami)"; echo oops >&2',
        envs={"GREETING": "hello"},
        cwd="/tmp",
        user="root",
        on_stdout=out.append,
        on_stderr=err.append,
    )
    assert r.exit_code == 0
    assert r.stdout.strip() == "hello from /tmp as root"
    assert "".join(out).strip() == "hello from /tmp as root"
    assert "".join(err).strip() == "oops"
    assert sandbox.commands.run("whoami").stdout.strip() == "user"


def test_envs_given_at_create_reach_commands(run_id):
    from e2b import Sandbox
    from conftest import TEMPLATE

    sbx = Sandbox.create(TEMPLATE, timeout=60, envs={"FROM_CREATE": "42"}, metadata={"run": run_id})
    try:
        assert sbx.commands.run("echo $FROM_CREATE").stdout.strip() == "42"
    finally:
        sbx.kill()


def test_python_and_node_run(sandbox):
    assert sandbox.commands.run("python3 -c 'print(6*7)'").stdout.strip() == "42"
    assert sandbox.commands.run("node -e 'console.log(6*7)'").stdout.strip() == "42"


def test_nonzero_exit_raises_with_the_result(sandbox):
    with pytest.raises(CommandExitException) as e:
        sandbox.commands.run("echo bad >&2; exit 3")
    assert e.value.exit_code == 3
    assert "bad" in e.value.stderr


def test_command_timeout(sandbox):
    with pytest.raises(TimeoutException):
        sandbox.commands.run("sleep 30", timeout=2)


def test_background_list_connect_and_kill(sandbox):
    h = sandbox.commands.run("for i in $(seq 1 300); do echo tick $i; sleep 0.1; done", background=True)
    pids = [p.pid for p in sandbox.commands.list()]
    assert h.pid in pids
    h.disconnect()
    time.sleep(0.5)
    again = sandbox.commands.connect(h.pid)
    time.sleep(1.0)
    assert sandbox.commands.kill(h.pid) is True
    with pytest.raises(CommandExitException) as e:
        again.wait()
    assert "tick" in e.value.stdout, "output streams on after reconnecting"
    assert h.pid not in [p.pid for p in sandbox.commands.list()]


def test_stdin_round_trip(sandbox):
    h = sandbox.commands.run("head -n 1", background=True, stdin=True)
    sandbox.commands.send_stdin(h.pid, "from stdin\n")
    r = h.wait()
    assert r.stdout.strip() == "from stdin"


def test_a_command_whose_sandbox_is_killed_ends_with_e2bs_error(run_id):
    # The stream ends with Connect's `unavailable`, not a broken body; the SDK probes the
    # sandbox, finds it gone and says so.
    import threading

    from e2b import Sandbox
    from e2b.exceptions import SandboxNotRunningException

    from conftest import TEMPLATE

    sbx = Sandbox.create(TEMPLATE, timeout=120, metadata={"run": run_id})
    threading.Timer(3, lambda: Sandbox.kill(sbx.sandbox_id)).start()
    with pytest.raises(SandboxNotRunningException) as e:
        sbx.commands.run("sleep 60", timeout=90)
    assert "killed or reached its end of life" in str(e.value)
    assert "ended before the stream completed" in str(e.value), str(e.value)
