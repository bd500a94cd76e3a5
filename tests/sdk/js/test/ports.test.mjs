// A server in the sandbox reached through the proxy (routing headers and the
// `<port>-<sandboxID>.<domain>` host form), and traffic tokens. Needs real sandboxes.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import http from 'node:http'
import { withSandbox } from '../lib/helpers.mjs'

const SANDBOX_URL = process.env.E2B_SANDBOX_URL

// GET through the server's address with the given headers (node:http lets us set Host).
function get(path, headers) {
  const u = new URL(SANDBOX_URL)
  return new Promise((resolve, reject) => {
    const req = http.request({ host: u.hostname, port: u.port, path, headers }, (res) => {
      let body = ''
      res.setEncoding('utf8')
      res.on('data', (d) => { body += d })
      res.on('end', () => resolve({ status: res.statusCode, body }))
    })
    req.on('error', reject)
    req.end()
  })
}

test('ports: http server by routing headers and host, traffic token enforced', async () => {
  await withSandbox(async (sbx) => {
    const token = sbx.trafficAccessToken
    assert.ok(token, 'create returns a traffic access token')
    await sbx.files.write('/tmp/www/index.html', 'hello from js\n')
    await sbx.commands.run('python3 -m http.server 8000 --directory /tmp/www', { background: true })
    const routed = { 'E2b-Sandbox-Id': sbx.sandboxId, 'E2b-Sandbox-Port': '8000' }
    let r
    for (let i = 0; i < 200; i++) {
      r = await get('/index.html', { ...routed, 'e2b-traffic-access-token': token })
      if (r.status !== 502) break
      await new Promise((ok) => setTimeout(ok, 300))
    }
    assert.equal(r.status, 200, r.body)
    assert.equal(r.body, 'hello from js\n')
    r = await get('/index.html', { Host: sbx.getHost(8000), 'e2b-traffic-access-token': token })
    assert.equal(r.status, 200, r.body)
    assert.equal(r.body, 'hello from js\n')
    r = await get('/index.html', routed)
    assert.equal(r.status, 403)
    assert.equal(JSON.parse(r.body).error_code, 'invalid_traffic_access_token')
    r = await get('/', { ...routed, 'E2b-Sandbox-Port': '8001', 'e2b-traffic-access-token': token })
    assert.equal(r.status, 502)
    assert.match(JSON.parse(r.body).message, /port is not open/)
  }, { network: { allowPublicTraffic: false } })
})
