// MCP servers in a sandbox: `Sandbox.create({ mcp })` starts the MCP gateway (template
// `mcp-gateway`, port 50005); `getMcpUrl()` and `getMcpToken()` reach it. getMcpUrl() is https
// (E2B's edge); Alcove's listener is plain HTTP, so requests go to E2B_SANDBOX_URL with the URL's
// host in Host (node:http lets us set it). Needs real sandboxes and the `mcp-gateway` template.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import http from 'node:http'
import { randomUUID } from 'node:crypto'
import { Sandbox } from 'e2b'

const SANDBOX_URL = process.env.E2B_SANDBOX_URL

function post(path, headers, body) {
  const u = new URL(SANDBOX_URL)
  return new Promise((resolve, reject) => {
    const req = http.request({ host: u.hostname, port: u.port, path, method: 'POST', headers }, (res) => {
      let text = ''
      res.setEncoding('utf8')
      res.on('data', (d) => { text += d })
      res.on('end', () => resolve({ status: res.statusCode, text }))
    })
    req.on('error', reject)
    req.end(body)
  })
}

const rpc = (id, method, params) => JSON.stringify({ jsonrpc: '2.0', id, method, params })

test('mcp: gateway serves a tool with the token, refuses without, names unsupported servers', async () => {
  const run = randomUUID()
  const sbx = await Sandbox.create({ mcp: { time: {} }, timeoutMs: 300_000, metadata: { suite: 'js', run } })
  try {
    const url = new URL(sbx.getMcpUrl())
    assert.equal(url.protocol, 'https:')
    assert.equal(url.host, sbx.getHost(50005))
    const base = { Host: url.host, 'Content-Type': 'application/json', Accept: 'application/json, text/event-stream' }
    const token = await sbx.getMcpToken()
    const init = rpc(1, 'initialize', { protocolVersion: '2025-06-18', capabilities: {}, clientInfo: { name: 'js', version: '1' } })

    let r = await post(url.pathname, base, init)
    assert.equal(r.status, 401, r.text)
    r = await post(url.pathname, { ...base, Authorization: 'Bearer wrong' }, init)
    assert.equal(r.status, 401, r.text)

    const auth = { ...base, Authorization: `Bearer ${token}`, 'MCP-Protocol-Version': '2025-06-18' }
    r = await post(url.pathname, auth, init)
    assert.equal(r.status, 200, r.text)
    r = await post(url.pathname, auth, rpc(2, 'tools/call', { name: 'get_current_time', arguments: { timezone: 'UTC' } }))
    assert.equal(r.status, 200, r.text)
    const result = JSON.parse(r.text).result
    assert.equal(result.isError, false, r.text)
    assert.match(result.content[0].text, /UTC/)
  } finally {
    await sbx.kill()
  }

  await assert.rejects(
    Sandbox.create({ mcp: { exa: { apiKey: 'x' } }, timeoutMs: 120_000, metadata: { suite: 'js', run } }),
    (e) => /Failed to start MCP gateway/.test(e.message) && /`exa`/.test(e.message),
  )
})
