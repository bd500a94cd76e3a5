// Custom templates (issue 14) through the official JS SDK's `Template` API, unmodified: a build
// from `base` with COPY, RUN, ENV and a start command, its log, and a sandbox that sees each
// step and serves the start command's port through the proxy. Needs a real server (one build
// in a microVM, ~30-90 s under TCG).
import { test } from 'node:test'
import assert from 'node:assert/strict'
import http from 'node:http'
import { mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { randomUUID } from 'node:crypto'
import { Sandbox, Template, waitForPort } from 'e2b'

const SANDBOX_URL = process.env.E2B_SANDBOX_URL

function get(pathname, headers) {
  const u = new URL(SANDBOX_URL)
  return new Promise((resolve, reject) => {
    const req = http.request({ host: u.hostname, port: u.port, path: pathname, headers }, (res) => {
      let body = ''
      res.setEncoding('utf8')
      res.on('data', (d) => { body += d })
      res.on('end', () => resolve({ status: res.statusCode, body }))
    })
    req.on('error', reject)
    req.end()
  })
}

async function sh(sbx, cmd) {
  const r = await sbx.commands.run(cmd, { timeoutMs: 60_000 })
  assert.equal(r.exitCode, 0, `${cmd}: ${r.stderr}`)
  return r.stdout.trim()
}

test('templates: build from base with copy, run, env, start cmd; a sandbox sees each', { timeout: 900_000 }, async () => {
  const ctx = mkdtempSync(path.join(tmpdir(), 'alcove-js-template-'))
  writeFileSync(path.join(ctx, 'note.txt'), 'copied by js\n')
  const name = `sdk-js-${randomUUID().slice(0, 8)}`

  const template = Template({ fileContextPath: ctx })
    .fromTemplate('base')
    .copy('note.txt', '/home/user/note.txt')
    // Computed by the shell, so only the step's output (not the echoed command) has it.
    .runCmd('echo js-step-$((40+2)) && echo "$(id -un)" > /home/user/js-ran-as.txt', { user: 'user' })
    .setEnvs({ ALCOVE_JS_TPL: 'from-js' })
    .runCmd('mkdir -p /tmp/www && echo "$ALCOVE_JS_TPL" > /tmp/www/index.html')
    .setStartCmd('python3 -m http.server 8001 --directory /tmp/www', waitForPort(8001))

  const logs = []
  const info = await Template.build(template, name, { onBuildLogs: (e) => logs.push(String(e.message ?? '')) })
  assert.ok(info.templateId && info.buildId, JSON.stringify(info))
  const text = logs.join('\n')
  assert.match(text, /js-step-42/, text.slice(-3000))

  const sbx = await Sandbox.create(name, { timeoutMs: 300_000, metadata: { suite: 'js-templates' } })
  try {
    assert.equal(await sh(sbx, 'cat /home/user/note.txt'), 'copied by js')
    assert.equal(await sh(sbx, 'cat /home/user/js-ran-as.txt'), 'user')
    assert.equal(await sh(sbx, 'echo "$ALCOVE_JS_TPL"'), 'from-js')
    let r
    for (let i = 0; i < 120; i++) {
      r = await get('/index.html', { Host: sbx.getHost(8001) })
      if (r.status !== 502) break
      await new Promise((ok) => setTimeout(ok, 500))
    }
    assert.equal(r.status, 200, r.body)
    assert.equal(r.body, 'from-js\n')
  } finally {
    await sbx.kill()
  }
})
