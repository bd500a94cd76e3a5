"""Secrets (`e2b.Secret`): create, read by name and id, list pages, versions, destroy, and the
server's refusals, with the official SDK; values are write-only, so no response of the run may
carry one. No sandbox (and no VM) is needed."""

import json
import os
import uuid

import httpx
import pytest
from e2b import Secret
from e2b.exceptions import SecretException

pytestmark = pytest.mark.control

API = os.environ.get("E2B_API_URL", "")
HEADERS = {"X-API-KEY": os.environ.get("E2B_API_KEY", "")}


@pytest.fixture
def prefix():
    """A name prefix unique to this test (the server's secrets are shared by the whole run)."""
    p = f"t{uuid.uuid4().hex[:10]}-"
    yield p
    for info in _all():
        if info.name.startswith(p):
            Secret.destroy(info.secret_id)


def _all():
    pages = Secret.list(limit=100)
    out = []
    while pages.has_next:
        out.extend(pages.next_items())
    return out


def _raw(method, path, body=None):
    r = httpx.request(method, f"{API}{path}", headers=HEADERS, json=body, timeout=30)
    return r


def _assert_no_value(resp, *values):
    text = resp.text + json.dumps(dict(resp.headers))
    for v in values:
        assert v not in text, f"a response carries a secret value: {text}"


def test_create_read_update_destroy(prefix):
    value = f"sk-{uuid.uuid4().hex}"
    name = f"{prefix}OpenAI-Key"
    info = Secret.create(name, value, metadata={"env": "prod"})
    assert info.name == name.lower(), "names are lower-cased"
    assert info.secret_id.startswith("sec_")
    assert info.version == 1
    assert info.metadata == {"env": "prod"}
    assert info.created_at == info.updated_at

    by_name = Secret.get_info(name)
    by_lower = Secret.get_info(name.lower())
    by_id = Secret.get_info(info.secret_id)
    assert by_name == by_lower == by_id == info
    assert Secret.exists(name) is True
    assert Secret.exists(f"{prefix}never-made") is False

    # An update stores the next version; metadata is replaced only when given.
    v2 = f"sk-{uuid.uuid4().hex}"
    up = Secret.update(name, v2)
    assert up.version == 2 and up.metadata == {"env": "prod"}
    v3 = f"sk-{uuid.uuid4().hex}"
    up = Secret.update(info.secret_id, v3, metadata={"owner": "ci"})
    assert up.version == 3 and up.metadata == {"owner": "ci"}
    assert up.created_at == info.created_at and up.updated_at >= info.updated_at
    assert Secret.get_info(name).version == 3

    # No read surface carries any version's value.
    for method, path in [
        ("GET", f"/secrets/{info.secret_id}"),
        ("GET", f"/secrets/{name.lower()}"),
        ("GET", "/secrets?limit=1000"),
    ]:
        r = _raw(method, path)
        assert r.status_code == 200
        _assert_no_value(r, value, v2, v3)
    r = _raw("POST", f"/secrets/{info.secret_id}", {"value": value})
    assert r.status_code == 200 and r.json()["currentVersion"] == 4
    _assert_no_value(r, value)

    assert Secret.destroy(name) is True
    assert Secret.exists(name) is False
    assert Secret.exists(info.secret_id) is False
    assert Secret.destroy(info.secret_id) is False


def test_list_pages_with_a_limit(prefix):
    names = [f"{prefix}{c}" for c in "edcba"]
    for n in names:
        Secret.create(n, f"value-of-{n}")
    pages = Secret.list(limit=2)
    seen, sizes = [], []
    while pages.has_next:
        items = pages.next_items()
        sizes.append(len(items))
        seen.extend(i.name for i in items if i.name.startswith(prefix))
    assert max(sizes) <= 2
    assert seen == sorted(names), "every secret once, in name order"
    assert len(sizes) >= 3


def test_duplicate_names_conflict(prefix):
    name = f"{prefix}dup"
    Secret.create(name, "first")
    with pytest.raises(SecretException) as e:
        Secret.create(name.upper(), "second")
    assert "409" in str(e.value) and "already has a secret" in str(e.value)
    r = _raw("POST", "/secrets", {"name": name, "value": "second"})
    assert r.status_code == 409
    assert r.json()["error_code"] == "secret_name_taken"
    _assert_no_value(r, "second")


@pytest.mark.parametrize(
    "name, says",
    [
        ("", "is empty"),
        ("a{b}", "'{', '}'"),
        ("tab\there", "control"),
        ("sec_0123", "sec_"),
        ("n" * 129, "129 bytes"),
    ],
)
def test_invalid_names_are_refused_by_the_server(name, says):
    # Straight to the API: the SDK checks some of these itself before sending.
    value = f"sk-{uuid.uuid4().hex}"
    r = _raw("POST", "/secrets", {"name": name, "value": value})
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["code"] == 400 and body["error_code"] == "invalid_request_body"
    assert says in body["message"], body["message"]
    _assert_no_value(r, value)


def test_bad_values_and_metadata_are_refused(prefix):
    with pytest.raises(SecretException) as e:
        Secret.create(f"{prefix}empty", "")
    assert "400" in str(e.value) and "value is empty" in str(e.value)
    with pytest.raises(SecretException) as e:
        Secret.create(f"{prefix}big", "v" * (64 * 1024 + 1))
    assert "65536" in str(e.value)
    with pytest.raises(SecretException) as e:
        Secret.create(f"{prefix}meta", "v", metadata={str(i): "v" for i in range(33)})
    assert "33 entries" in str(e.value)
    r = _raw("POST", "/secrets", {"name": f"{prefix}num", "value": 987654321})
    assert r.status_code == 400 and "987654321" not in r.text
    assert Secret.exists(f"{prefix}empty") is False


def test_unknown_secrets_are_not_found():
    assert Secret.exists("sec_00000000000000000000000000000000") is False
    from e2b.exceptions import SecretNotFoundException

    with pytest.raises(SecretNotFoundException):
        Secret.get_info("no-such-secret-here")
    with pytest.raises(SecretNotFoundException):
        Secret.update("no-such-secret-here", "v")
    assert Secret.destroy("no-such-secret-here") is False
    r = _raw("GET", "/secrets/no-such-secret-here")
    assert r.status_code == 404 and r.json()["error_code"] == "secret_not_found"
