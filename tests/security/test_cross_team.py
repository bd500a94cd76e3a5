"""Team isolation: a second team's key can do nothing to the first team's sandboxes and
snapshots, and cannot even tell them from ids that never existed (E2B answers 404 for both).

One victim sandbox and one snapshot of it are shared by the module; every intrusion is tried
with raw HTTP (exact status codes) and the main ones again through the official SDK.
"""

import os
import uuid

import pytest
from e2b import Sandbox, SandboxState
from e2b.exceptions import NotFoundException, SandboxException

from conftest import TEMPLATE


@pytest.fixture(scope="module")
def victim():
    sbx = Sandbox.create(TEMPLATE, timeout=300, metadata={"suite": "security", "owner": "a"})
    sbx.files.write("/home/user/secret.txt", "team a only")
    snap = sbx.create_snapshot()
    try:
        yield sbx, snap.snapshot_id
    finally:
        sbx.kill()
        try:
            Sandbox.delete_snapshot(snap.snapshot_id)
        except Exception:
            pass


def fake_id():
    return "i" + uuid.uuid4().hex[:19]


def answer(resp, asked):
    """What a client learns from an answer: the status, the stable error code and the message
    (with the id it asked about taken out)."""
    try:
        body = resp.json()
    except ValueError:
        body = {}
    return resp.status_code, body.get("error_code"), str(body.get("message")).replace(asked, "<id>")


SANDBOX_CALLS = [
    ("GET", "/sandboxes/{id}", None),
    ("GET", "/alcove/v1/sandboxes/{id}", None),
    ("POST", "/sandboxes/{id}/connect", {"timeout": 60}),
    ("POST", "/v2/sandboxes/{id}/connect", {"timeout": 60}),
    ("POST", "/sandboxes/{id}/pause", None),
    ("POST", "/sandboxes/{id}/resume", {"timeout": 60}),
    ("POST", "/sandboxes/{id}/fork", {}),
    ("POST", "/alcove/v1/sandboxes/{id}/fork", {"count": 1}),
    ("POST", "/sandboxes/{id}/snapshots", {}),
    ("POST", "/sandboxes/{id}/timeout", {"timeout": 5}),
    ("POST", "/sandboxes/{id}/refreshes", {"duration": 5}),
    ("GET", "/sandboxes/{id}/logs", None),
    ("GET", "/v2/sandboxes/{id}/logs", None),
    ("GET", "/sandboxes/{id}/metrics", None),
    ("PUT", "/sandboxes/{id}/network", {"denyOut": ["0.0.0.0/0"]}),
    ("DELETE", "/sandboxes/{id}", None),
]


@pytest.mark.parametrize("method,path,body", SANDBOX_CALLS, ids=[f"{m} {p}" for m, p, _ in SANDBOX_CALLS])
def test_other_team_gets_404_for_a_sandbox_as_if_it_did_not_exist(victim, intruder, owner, method, path, body):
    sbx, _ = victim
    made_up = fake_id()
    real = intruder.request(method, path.format(id=sbx.sandbox_id), json=body)
    never = intruder.request(method, path.format(id=made_up), json=body)
    assert real.status_code == 404, (real.status_code, real.text)
    assert answer(real, sbx.sandbox_id) == answer(never, made_up), "an existing sandbox answers unlike a made-up id"
    # Nothing happened to it: still running, its timeout untouched, its files there.
    info = owner.get(f"/sandboxes/{sbx.sandbox_id}").json()
    assert info["state"] == "running"
    assert sbx.files.read("/home/user/secret.txt") == "team a only"


def test_other_team_lists_none_of_it(victim, intruder, other_key):
    sbx, snap = victim
    for path in ["/sandboxes", "/v2/sandboxes", "/v2/sandboxes?state=running,paused",
                 f"/sandboxes/metrics?sandbox_ids={sbx.sandbox_id}", "/snapshots", "/templates",
                 "/alcove/v1/snapshots/tree"]:
        r = intruder.get(path)
        assert r.status_code in (200, 400, 404), (path, r.status_code)
        assert sbx.sandbox_id not in r.text, path
        assert snap not in r.text, path
    assert all(s.sandbox_id != sbx.sandbox_id for s in Sandbox.list(api_key=other_key).next_items())
    assert all(
        s.snapshot_id != snap for s in Sandbox.list_snapshots(api_key=other_key).next_items()
    )


def test_other_team_cannot_use_or_delete_a_snapshot(victim, intruder, owner):
    sbx, snap = victim
    for method, path, body in [
        ("GET", "/templates/{id}", None),
        ("DELETE", "/templates/{id}", None),
        ("POST", "/sandboxes", {"templateID": "{id}", "timeout": 60}),
        ("POST", "/v2/sandboxes", {"templateID": "{id}", "timeout": 60}),
    ]:
        made_up = fake_id()
        b = body and {k: (v.format(id=snap) if isinstance(v, str) else v) for k, v in body.items()}
        real = intruder.request(method, path.format(id=snap), json=b)
        nb = body and {k: (v.format(id=made_up) if isinstance(v, str) else v) for k, v in body.items()}
        never = intruder.request(method, path.format(id=made_up), json=nb)
        assert real.status_code == 404, (method, path, real.status_code, real.text)
        assert answer(real, snap) == answer(never, made_up), (method, path)
    # The owner still sees it and can restore it.
    assert any(s.snapshot_id == snap for s in Sandbox.list_snapshots().next_items())


def test_other_team_through_the_sdk(victim, other_key):
    sbx, snap = victim
    with pytest.raises(NotFoundException):
        Sandbox.connect(sbx.sandbox_id, api_key=other_key)
    with pytest.raises(NotFoundException):
        Sandbox.get_info(sbx.sandbox_id, api_key=other_key)
    assert Sandbox.kill(sbx.sandbox_id, api_key=other_key) is False
    with pytest.raises(SandboxException):
        Sandbox.pause(sbx.sandbox_id, api_key=other_key)
    with pytest.raises(SandboxException):
        Sandbox.set_timeout(sbx.sandbox_id, 5, api_key=other_key)
    with pytest.raises(SandboxException):
        Sandbox.create_snapshot(sbx.sandbox_id, api_key=other_key)
    with pytest.raises(SandboxException):
        Sandbox.fork(sbx.sandbox_id, api_key=other_key)
    with pytest.raises(SandboxException):
        Sandbox.get_metrics(sbx.sandbox_id, api_key=other_key)
    with pytest.raises(SandboxException):
        Sandbox.create(snap, timeout=60, api_key=other_key)
    assert Sandbox.delete_snapshot(snap, api_key=other_key) is False
    assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.RUNNING


def test_host_wide_views_need_a_key_and_are_not_for_any_team(api_url, intruder):
    import httpx

    # Prometheus text is host-wide: not for anyone without a key.
    assert httpx.get(api_url + "/metrics", timeout=30).status_code in (401, 403)
    # The warm pool is the host's, not a team's.
    assert intruder.get("/alcove/v1/warm-pool").status_code in (401, 403, 404)
    # No key, wrong key: 401 on every team resource.
    for headers in [{}, {"X-API-KEY": "e2b_" + "0" * 40}]:
        assert httpx.get(api_url + "/sandboxes", headers=headers, timeout=30).status_code == 401
