"""`alcove mcp` (stdio) and `/mcp` (Streamable HTTP) driven by the official `mcp` client package,
against the real server that tests/sdk/run.sh started: tools are listed, a sandbox is created,
commands and code run (a matplotlib chart comes back as a PNG image), files are written and read
(as a tool and as a resource), a background command is followed, the sandbox is forked and
everything is killed. Errors an LLM can cause come back as `isError` results, and the session
goes on. `/mcp` refuses a missing or wrong key with the API's structured 401.
"""

import asyncio
import base64
import json
import os
import uuid

import httpx2
import pytest
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

API_URL = os.environ["E2B_API_URL"]
API_KEY = os.environ["E2B_API_KEY"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

TOOLS = {
    "create_sandbox", "list_sandboxes", "kill_sandbox", "run_command", "command_status",
    "run_code", "read_file", "write_file", "list_files", "get_url", "pause_sandbox",
    "resume_sandbox", "snapshot_sandbox", "fork_sandbox",
}


def alcove_bin():
    b = os.environ.get("ALCOVE_BIN")
    if not b:
        pytest.skip("ALCOVE_BIN is not set (tests/sdk/run.sh sets it for the real server)")
    return b


def text_of(result):
    return "\n".join(c.text for c in result.content if c.type == "text")


async def call(session, tool, **args):
    return await session.call_tool(tool, args, read_timeout_seconds=300)


async def ok(session, tool, **args):
    r = await call(session, tool, **args)
    assert not r.is_error, f"{tool} failed: {text_of(r)}"
    return r


async def flow(session):
    """The issue's checklist, on one session."""
    await session.initialize()
    tools = {t.name: t for t in (await session.list_tools()).tools}
    assert TOOLS <= set(tools), set(tools) ^ TOOLS
    for t in tools.values():
        assert t.description and len(t.description) > 60, t.name
        assert t.input_schema["type"] == "object", t.name
    templates = (await session.list_resource_templates()).resource_templates
    assert any(t.uri_template.startswith("sandbox://") for t in templates)

    # No template: a code interpreter sandbox.
    label = uuid.uuid4().hex
    r = await ok(session, "create_sandbox", metadata={"test": label}, timeoutSeconds=600)
    sid = r.structured_content["sandboxId"]
    assert sid and r.structured_content["templateId"] == "code-interpreter-v1"
    children = []
    try:
        listed = await ok(session, "list_sandboxes", metadata={"test": label})
        assert [s["sandboxId"] for s in listed.structured_content["sandboxes"]] == [sid]

        r = await ok(session, "run_command", sandboxId=sid, command="echo hello; echo oops >&2; id -un")
        assert r.structured_content["exitCode"] == 0
        assert r.structured_content["stdout"] == "hello\nuser\n"
        assert r.structured_content["stderr"] == "oops\n"

        # A failing command is an error result carrying its output.
        r = await call(session, "run_command", sandboxId=sid, command="echo partial; exit 3")
        assert r.is_error and r.structured_content["exitCode"] == 3
        assert "partial" in text_of(r) and "code 3" in text_of(r)

        # A chart comes back as an image.
        r = await ok(
            session, "run_code", sandboxId=sid,
            code="import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title('t')\nplt.show()\nprint('drawn')",
        )
        images = [c for c in r.content if c.type == "image"]
        assert len(images) == 1, r.content
        assert images[0].mime_type == "image/png"
        assert base64.b64decode(images[0].data).startswith(PNG_MAGIC)
        assert "drawn" in r.structured_content["stdout"]
        # State persists between cells; the last expression is the result.
        await ok(session, "run_code", sandboxId=sid, code="x = 20")
        r = await ok(session, "run_code", sandboxId=sid, code="x * 2 + 2")
        assert r.structured_content["results"] == ["42"]
        # An exception is an error result with its traceback.
        r = await call(session, "run_code", sandboxId=sid, code="1 / 0")
        assert r.is_error and "ZeroDivisionError" in text_of(r)
        assert r.structured_content["error"]["name"] == "ZeroDivisionError"

        # Files: write, read (tool and resource), list.
        body = "line one\nünïcode ✓\n"
        await ok(session, "write_file", sandboxId=sid, path="/home/user/dir/notes.txt", content=body)
        r = await ok(session, "read_file", sandboxId=sid, path="/home/user/dir/notes.txt")
        assert text_of(r) == body
        res = await session.read_resource(f"sandbox://{sid}/home/user/dir/notes.txt")
        assert res.contents[0].text == body
        blob = bytes(range(256))
        await ok(session, "write_file", sandboxId=sid, path="dir/blob.bin",
                 content=base64.b64encode(blob).decode(), encoding="base64")
        r = await ok(session, "read_file", sandboxId=sid, path="/home/user/dir/blob.bin")
        assert base64.b64decode(r.content[1].resource.blob) == blob
        r = await ok(session, "list_files", sandboxId=sid, path="/home/user/dir")
        names = {e["name"]: e for e in r.structured_content["entries"]}
        assert names["notes.txt"]["type"] == "file" and names["blob.bin"]["size"] == 256
        r = await call(session, "read_file", sandboxId=sid, path="/home/user/nope.txt")
        assert r.is_error and "list_files" in text_of(r)

        # Background: a pid handle to read, wait for and kill.
        r = await ok(session, "run_command", sandboxId=sid, background=True,
                     command="echo started; sleep 1; echo finished")
        pid = r.structured_content["pid"]
        r = await ok(session, "command_status", sandboxId=sid, pid=pid, action="wait", timeoutSeconds=60)
        assert r.structured_content["exitCode"] == 0
        assert "finished" in r.structured_content["stdout"]
        r = await ok(session, "run_command", sandboxId=sid, background=True, command="sleep 600")
        pid = r.structured_content["pid"]
        r = await ok(session, "command_status", sandboxId=sid, pid=pid)
        assert r.structured_content["running"] is True
        r = await call(session, "command_status", sandboxId=sid, pid=pid, action="kill")
        assert r.structured_content["exitCode"] != 0 or "signal" in text_of(r).lower(), text_of(r)

        # A foreground timeout kills the command and says how to go on.
        r = await call(session, "run_command", sandboxId=sid, command="echo before; sleep 30", timeoutSeconds=2)
        assert r.is_error and "background" in text_of(r) and "before" in text_of(r)

        r = await ok(session, "get_url", sandboxId=sid, port=8000)
        assert r.structured_content["host"].startswith(f"8000-{sid}.")

        # Fork: the child has the parent's files.
        r = await ok(session, "fork_sandbox", sandboxId=sid, count=1)
        children = r.structured_content["sandboxIds"]
        assert len(children) == 1 and children[0] != sid
        r = await ok(session, "run_command", sandboxId=children[0], command="cat dir/notes.txt")
        assert r.structured_content["stdout"] == body

        # Unknown sandbox: an error result that says what to do, and the session goes on.
        r = await call(session, "run_command", sandboxId="nosuchsandbox0", command="true")
        assert r.is_error and "list_sandboxes" in text_of(r), text_of(r)
        r = await call(session, "run_command", sandboxId="../../etc", command="true")
        assert r.is_error and "sandboxId" in text_of(r)
        r = await call(session, "run_command", sandboxId=sid)
        assert r.is_error and "command" in text_of(r)
        r = await call(session, "no_such_tool")
        assert r.is_error and "run_command" in text_of(r)
        await ok(session, "list_sandboxes")
    finally:
        for c in children + [sid]:
            await call(session, "kill_sandbox", sandboxId=c)
    r = await call(session, "run_command", sandboxId=sid, command="true")
    assert r.is_error


def test_stdio():
    params = StdioServerParameters(
        command=alcove_bin(), args=["mcp"],
        env={"E2B_API_URL": API_URL, "E2B_API_KEY": API_KEY, "PATH": os.environ.get("PATH", "")},
    )

    async def main():
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write) as session:
                await flow(session)

    asyncio.run(main())


def test_stdio_lifecycle_tools():
    """pause, resume and snapshot on a base sandbox, and a create from the snapshot."""
    params = StdioServerParameters(
        command=alcove_bin(), args=["mcp"],
        env={"E2B_API_URL": API_URL, "E2B_API_KEY": API_KEY, "PATH": os.environ.get("PATH", "")},
    )

    async def main():
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                r = await ok(session, "create_sandbox", template="base", internet=False)
                sid = r.structured_content["sandboxId"]
                made = [sid]
                try:
                    await ok(session, "write_file", sandboxId=sid, path="/tmp/state", content="kept")
                    await ok(session, "pause_sandbox", sandboxId=sid)
                    r = await call(session, "run_command", sandboxId=sid, command="true")
                    assert r.is_error and "resume_sandbox" in text_of(r), text_of(r)
                    await ok(session, "resume_sandbox", sandboxId=sid, timeoutSeconds=300)
                    r = await ok(session, "run_command", sandboxId=sid, command="cat /tmp/state")
                    assert r.structured_content["stdout"] == "kept"
                    name = f"mcp-{uuid.uuid4().hex[:8]}"
                    r = await ok(session, "snapshot_sandbox", sandboxId=sid, name=name)
                    assert r.structured_content["snapshotId"]
                    r = await ok(session, "create_sandbox", template=name)
                    made.append(r.structured_content["sandboxId"])
                    r = await ok(session, "run_command", sandboxId=made[1], command="cat /tmp/state")
                    assert r.structured_content["stdout"] == "kept"
                finally:
                    for s in made:
                        await call(session, "kill_sandbox", sandboxId=s)

    asyncio.run(main())


def mcp_url():
    return API_URL.rstrip("/") + "/mcp"


def test_http():
    async def main():
        async with httpx2.AsyncClient(headers={"X-API-KEY": API_KEY}, timeout=300) as http:
            async with streamable_http_client(mcp_url(), http_client=http) as (read, write):
                async with ClientSession(read, write) as session:
                    await flow(session)

    asyncio.run(main())


INITIALIZE = {
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {},
               "clientInfo": {"name": "test", "version": "0"}},
}
HEADERS = {"content-type": "application/json", "accept": "application/json, text/event-stream"}


@pytest.mark.parametrize("auth", [None, {"X-API-KEY": "e2b_" + "0" * 40}, {"Authorization": "Bearer nope"}])
def test_http_refuses_without_a_valid_key(auth):
    r = httpx2.post(mcp_url(), json=INITIALIZE, headers={**HEADERS, **(auth or {})}, timeout=30)
    assert r.status_code == 401, r.text
    body = r.json()
    assert body["code"] == 401 and body["message"]


def test_http_accepts_a_bearer_key():
    r = httpx2.post(mcp_url(), json=INITIALIZE,
                    headers={**HEADERS, "Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert r.status_code == 200, r.text
    assert json.loads(r.text)["result"]["serverInfo"]["name"] == "alcove"


def test_http_refuses_an_oversized_body():
    big = {**INITIALIZE, "params": {**INITIALIZE["params"], "pad": "x" * (16 << 20)}}
    r = httpx2.post(mcp_url(), json=big, headers={**HEADERS, "X-API-KEY": API_KEY}, timeout=60)
    assert r.status_code == 413, r.status_code
