"""MCP servers inside sandboxes: `Sandbox.create(mcp={...})` starts Alcove's MCP gateway in the
sandbox (template `mcp-gateway`, port 50005), and the official `mcp` client reaches it at
`get_mcp_url()` with `get_mcp_token()`. Needs real sandboxes and the `mcp-gateway` template.

`get_mcp_url()` is https (E2B terminates TLS at its edge); Alcove's listener is plain HTTP, so the
client talks to E2B_SANDBOX_URL with the URL's host in `Host`, as tests/sdk/python/test_ports.py
reaches `<port>-<sandboxID>.<domain>`.
"""

import asyncio
import json
import os
import uuid
from urllib.parse import urlparse

import httpx
import httpx2
import pytest
from e2b import Sandbox, SandboxException, SandboxQuery
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

SANDBOX_URL = os.environ.get("E2B_SANDBOX_URL", "")
MCP = {"filesystem": {"paths": ["/home/user"]}, "memory": {}}


@pytest.fixture(scope="module")
def mcp_sandbox():
    sbx = Sandbox.create(mcp=MCP, timeout=300, metadata={"suite": "python", "test": "mcp"})
    try:
        yield sbx
    finally:
        sbx.kill()


def gateway_address(sbx):
    """(url on Alcove's listener, Host header) for the sandbox's `get_mcp_url()`."""
    u = urlparse(sbx.get_mcp_url())
    assert u.scheme == "https" and u.path == "/mcp", u
    assert u.netloc == sbx.get_host(50005), u
    return SANDBOX_URL + u.path, u.netloc


async def with_session(sbx, token, work):
    url, host = gateway_address(sbx)
    headers = {"Host": host, "Authorization": f"Bearer {token}"}
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(120)) as http:
        async with streamable_http_client(url, http_client=http) as (read, write):
            async with ClientSession(read, write, read_timeout_seconds=120) as session:
                await session.initialize()
                return await work(session)


def text_of(result):
    assert not result.is_error, result
    return "".join(c.text for c in result.content if getattr(c, "text", None) is not None)


def test_mcp_client_lists_and_calls_tools_of_two_servers(mcp_sandbox):
    sbx = mcp_sandbox
    token = sbx.get_mcp_token()
    assert token

    async def work(session):
        tools = {t.name for t in (await session.list_tools()).tools}
        # filesystem's and memory's tools, under their own names (no two share one).
        assert {"write_file", "read_text_file", "list_directory"} <= tools, tools
        assert {"create_entities", "read_graph"} <= tools, tools

        text_of(await session.call_tool(
            "write_file", {"path": "/home/user/mcp.txt", "content": "written over MCP\n"}
        ))
        read = text_of(await session.call_tool("read_text_file", {"path": "/home/user/mcp.txt"}))
        outside = await session.call_tool("read_text_file", {"path": "/etc/hostname"})

        text_of(await session.call_tool("create_entities", {"entities": [
            {"name": "alcove", "entityType": "project", "observations": ["runs sandboxes"]},
        ]}))
        graph = text_of(await session.call_tool("read_graph", {}))
        return read, outside, graph

    read, outside, graph = asyncio.run(with_session(sbx, token, work))
    assert read == "written over MCP\n"
    # The filesystem server keeps to its configured paths.
    assert outside.is_error, outside
    assert "alcove" in graph and "runs sandboxes" in graph, graph
    # The file is the sandbox's own: the SDK sees what the MCP tool wrote.
    assert sbx.files.read("/home/user/mcp.txt") == "written over MCP\n"


def test_gateway_refuses_requests_without_the_token(mcp_sandbox):
    url, host = gateway_address(mcp_sandbox)
    init = {
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "t", "version": "1"}},
    }
    base = {"Host": host, "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream"}
    for extra in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": "Basic dXNlcjo="}):
        r = httpx.post(url, headers={**base, **extra}, content=json.dumps(init), timeout=60)
        assert r.status_code == 401, (extra, r.status_code, r.text)
        assert "get_mcp_token()" in r.json()["message"], r.text

    # With the token the same request is answered; and the official client is refused without it.
    ok = {**base, "Authorization": f"Bearer {mcp_sandbox.get_mcp_token()}"}
    r = httpx.post(url, headers=ok, content=json.dumps(init), timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["result"]["serverInfo"]["name"] == "alcove-mcp-gateway"

    async def work(session):
        return await session.list_tools()

    # The client gets the 401 on its first POST and fails (it reports it as an MCP error).
    with pytest.raises(BaseException) as e:
        asyncio.run(with_session(mcp_sandbox, "not-the-token", work))
    assert "MCPError" in repr(e.value) or "401" in repr(e.value), repr(e.value)


def test_token_is_read_from_the_sandbox_after_connect(mcp_sandbox):
    again = Sandbox.connect(mcp_sandbox.sandbox_id)
    # Not cached on a connected handle: read from /etc/mcp-gateway/.token as root.
    assert again.get_mcp_token() == mcp_sandbox.get_mcp_token()
    assert again.get_mcp_url() == mcp_sandbox.get_mcp_url()
    # The token is root's alone.
    r = again.commands.run("stat -c %a:%U /etc/mcp-gateway/.token", user="root")
    assert r.stdout.strip() == "600:root"


def test_unsupported_server_fails_create_naming_it():
    run = uuid.uuid4().hex
    with pytest.raises(SandboxException) as e:
        Sandbox.create(
            mcp={"time": {}, "github": {"personalAccessToken": "x"}},
            timeout=120,
            metadata={"suite": "python", "run": run},
        )
    msg = str(e.value)
    assert "Failed to start MCP gateway" in msg, msg
    assert "`github`" in msg and "filesystem" in msg, msg
    # The SDK killed the sandbox it had created.
    left = Sandbox.list(query=SandboxQuery(metadata={"run": run})).next_items()
    assert left == [], left
