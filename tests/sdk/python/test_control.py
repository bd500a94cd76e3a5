"""Control API: create, info, list with filters, timeouts, metrics, kill, and the error paths."""

import datetime
import time

import pytest
from e2b import Sandbox, SandboxQuery, SandboxState
from e2b.exceptions import (
    AuthenticationException,
    NotFoundException,
    SandboxException,
)

from conftest import TEMPLATE

pytestmark = pytest.mark.control


def test_create_with_metadata_envs_and_timeout(run_id):
    sbx = Sandbox.create(
        TEMPLATE,
        timeout=90,
        metadata={"suite": "python", "run": run_id, "odd key&=": "v/?%"},
        envs={"ALCOVE_TEST": "yes"},
    )
    try:
        info = sbx.get_info()
        assert info.sandbox_id == sbx.sandbox_id
        assert info.state == SandboxState.RUNNING
        assert info.metadata["odd key&="] == "v/?%"
        assert info.cpu_count >= 1 and info.memory_mb >= 128
        lifetime = (info.end_at - info.started_at).total_seconds()
        assert 80 <= lifetime <= 100, lifetime
    finally:
        assert sbx.kill() is True


def test_set_timeout_moves_the_end_time(sandbox):
    before = sandbox.get_info().end_at
    sandbox.set_timeout(600)
    after = sandbox.get_info().end_at
    assert after > before
    sandbox.set_timeout(30)
    assert sandbox.get_info().end_at < after


def test_list_filters_by_metadata_and_state(run_id):
    boxes = [
        Sandbox.create(TEMPLATE, timeout=120, metadata={"run": run_id, "n": str(i)})
        for i in range(3)
    ]
    try:
        paginator = Sandbox.list(query=SandboxQuery(metadata={"run": run_id, "n": "1"}))
        found = paginator.next_items()
        assert [s.sandbox_id for s in found] == [boxes[1].sandbox_id]
        assert not paginator.has_next

        seen = []
        paginator = Sandbox.list(
            query=SandboxQuery(
                metadata={"run": run_id},
                state=[SandboxState.RUNNING],
                started_after=datetime.datetime.now() - datetime.timedelta(minutes=10),
            ),
            limit=2,
        )
        while paginator.has_next:
            seen.extend(s.sandbox_id for s in paginator.next_items())
        assert sorted(seen) == sorted(b.sandbox_id for b in boxes)

        # Pages come newest first, as E2B lists: one at a time, running, paused and both.
        boxes[0].pause()
        newest_first = [b.sandbox_id for b in reversed(boxes)]
        for states, expected in [
            ([SandboxState.RUNNING], newest_first[:2]),
            ([SandboxState.PAUSED], newest_first[2:]),
            ([SandboxState.RUNNING, SandboxState.PAUSED], newest_first),
        ]:
            paginator = Sandbox.list(query=SandboxQuery(metadata={"run": run_id}, state=states), limit=1)
            seen = []
            while paginator.has_next:
                seen.extend(s.sandbox_id for s in paginator.next_items())
            assert seen == expected, states
    finally:
        for b in boxes:
            b.kill()
    after = Sandbox.list(query=SandboxQuery(metadata={"run": run_id})).next_items()
    assert after == []


def test_get_metrics(sandbox):
    # Metrics may take a moment to appear after start.
    deadline = time.time() + 20
    metrics = sandbox.get_metrics()
    while not metrics and time.time() < deadline:
        time.sleep(1)
        metrics = sandbox.get_metrics()
    assert metrics, "no metrics sample within 20 s"
    m = metrics[-1]
    assert m.cpu_count >= 1
    assert m.mem_total > 0


def test_get_metrics_returns_the_history_in_a_window(sandbox):
    import datetime

    # The server samples every running sandbox every few seconds (--metrics-interval, 5 s).
    start = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=5)
    deadline = time.time() + 60
    series = []
    while len(series) < 3 and time.time() < deadline:
        time.sleep(2)
        series = sandbox.get_metrics(start=start, end=datetime.datetime.now(datetime.timezone.utc))
    assert len(series) >= 3, f"{len(series)} samples within 60 s"
    stamps = [m.timestamp for m in series]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    assert all(m.timestamp >= start - datetime.timedelta(seconds=1) for m in series)
    # A window before the sandbox existed holds nothing.
    old = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
    assert sandbox.get_metrics(start=old, end=old + datetime.timedelta(minutes=1)) == []


def test_connect_returns_a_usable_handle(sandbox):
    again = Sandbox.connect(sandbox.sandbox_id)
    assert again.sandbox_id == sandbox.sandbox_id
    assert again.is_running()


def test_a_timeout_of_zero_ends_the_sandbox_now(run_id):
    sbx = Sandbox.create(TEMPLATE, timeout=120, metadata={"run": run_id})
    sbx.set_timeout(0)
    # The end starts at once; under load the VM's kill can take a few seconds, and the API
    # reports the sandbox gone from the moment it starts.
    deadline = time.monotonic() + 60
    while sbx.is_running() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not sbx.is_running()
    with pytest.raises(NotFoundException):
        sbx.get_info()


def test_kill_then_everything_reports_not_found(run_id):
    sbx = Sandbox.create(TEMPLATE, timeout=60, metadata={"run": run_id})
    assert sbx.kill() is True
    assert Sandbox.kill(sbx.sandbox_id) is False
    with pytest.raises(NotFoundException):
        Sandbox.get_info(sbx.sandbox_id)
    with pytest.raises(NotFoundException):
        Sandbox.set_timeout(sbx.sandbox_id, 30)
    with pytest.raises(NotFoundException):
        Sandbox.connect(sbx.sandbox_id)


def test_api_keys_have_e2bs_format():
    # What e2b 2.45 checks client-side before sending anything (later SDKs dropped the check).
    import os
    import re

    assert re.fullmatch(r"e2b_[0-9a-f]+", os.environ["E2B_API_KEY"]), "the server's key is not e2b_<hex>"


def test_an_idempotency_key_returns_the_same_sandbox(run_id):
    key = f"create-{run_id}"
    a = Sandbox.create(TEMPLATE, timeout=60, metadata={"run": run_id}, idempotency_key=key)
    try:
        b = Sandbox.create(TEMPLATE, timeout=60, metadata={"run": run_id}, idempotency_key=key)
        assert b.sandbox_id == a.sandbox_id
        assert b.commands.run("echo same").stdout == "same\n"
        with pytest.raises(SandboxException) as e:
            Sandbox.create(TEMPLATE, timeout=61, metadata={"run": run_id}, idempotency_key=key)
        assert "different body" in str(e.value)
    finally:
        a.kill()


def test_unknown_sandbox():
    with pytest.raises(NotFoundException):
        Sandbox.get_info("doesnotexist0000")
    assert Sandbox.kill("doesnotexist0000") is False


def test_bad_api_key():
    with pytest.raises(AuthenticationException):
        Sandbox.create(TEMPLATE, api_key="alcove_not_a_real_key")
    with pytest.raises(AuthenticationException):
        Sandbox.list(api_key="alcove_not_a_real_key").next_items()


def test_unknown_template_is_a_clear_error():
    with pytest.raises(SandboxException) as e:
        Sandbox.create("no-such-template-anywhere")
    assert "404" in str(e.value) and "GET /templates" in str(e.value)


def test_timeout_over_the_maximum_is_refused():
    with pytest.raises(SandboxException) as e:
        Sandbox.create(TEMPLATE, timeout=10**9)
    assert "400" in str(e.value)


def test_sandbox_is_killed_at_its_timeout(run_id):
    sbx = Sandbox.create(TEMPLATE, timeout=2, metadata={"run": run_id})
    deadline = time.time() + 15
    while time.time() < deadline:
        try:
            Sandbox.get_info(sbx.sandbox_id)
        except NotFoundException:
            return
        time.sleep(0.5)
    sbx.kill()
    pytest.fail("sandbox outlived its 2 s timeout by more than 13 s")


def test_minimal_template_runs_commands_in_its_small_machine(run_id):
    """The `minimal` stock template: 1 vCPU and 128 MiB, enough for the agent, a shell and python."""
    sbx = Sandbox.create("minimal", timeout=60, metadata={"run": run_id})
    try:
        info = sbx.get_info()
        assert (info.cpu_count, info.memory_mb) == (1, 128)
        r = sbx.commands.run("nproc; awk '/MemTotal/ {print $2}' /proc/meminfo; python3 -c 'print(6*7)'")
        nproc, mem_kib, answer = r.stdout.split()
        assert nproc == "1"
        assert int(mem_kib) < 128 * 1024
        assert answer == "42"
    finally:
        sbx.kill()
