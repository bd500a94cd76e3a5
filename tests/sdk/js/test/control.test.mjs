// Control API through the JS SDK: test names carry "control" so the fake-backend run can select them.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { Sandbox, NotFoundError, AuthenticationError, SandboxError } from 'e2b'
import { TEMPLATE, withSandbox } from '../lib/helpers.mjs'

test('control: create with metadata, envs and timeout; info; kill', async () => {
  const run = randomUUID()
  const sbx = await Sandbox.create(TEMPLATE, {
    timeoutMs: 90_000,
    metadata: { run, 'odd key&=': 'v/?%' },
    envs: { ALCOVE_TEST: 'yes' },
  })
  const info = await sbx.getInfo()
  assert.equal(info.sandboxId, sbx.sandboxId)
  assert.equal(info.state, 'running')
  assert.equal(info.metadata['odd key&='], 'v/?%')
  const lifetime = (info.endAt - info.startedAt) / 1000
  assert.ok(lifetime >= 80 && lifetime <= 100, String(lifetime))
  assert.equal(await sbx.kill(), true)
  assert.equal(await Sandbox.kill(sbx.sandboxId), false)
  await assert.rejects(Sandbox.getInfo(sbx.sandboxId), NotFoundError)
})

test('control: setTimeout moves the end time', async () => {
  await withSandbox(async (sbx) => {
    const before = (await sbx.getInfo()).endAt
    await sbx.setTimeout(600_000)
    const after = (await sbx.getInfo()).endAt
    assert.ok(after > before)
  })
})

test('control: list filters by metadata and state, with pagination', async () => {
  const run = randomUUID()
  const boxes = []
  for (let i = 0; i < 3; i++) {
    boxes.push(await Sandbox.create(TEMPLATE, { timeoutMs: 120_000, metadata: { run, n: String(i) } }))
  }
  try {
    const one = await Sandbox.list({ query: { metadata: { run, n: '1' } } }).nextItems()
    assert.deepEqual(one.map((s) => s.sandboxId), [boxes[1].sandboxId])
    const paginator = Sandbox.list({ query: { metadata: { run }, state: ['running'] }, limit: 2 })
    const seen = []
    while (paginator.hasNext) seen.push(...(await paginator.nextItems()).map((s) => s.sandboxId))
    assert.deepEqual(seen.sort(), boxes.map((b) => b.sandboxId).sort())
  } finally {
    for (const b of boxes) await b.kill()
  }
})

test('control: getMetrics returns a sample', async () => {
  await withSandbox(async (sbx) => {
    let metrics = []
    for (let i = 0; i < 20 && metrics.length === 0; i++) {
      metrics = await sbx.getMetrics()
      if (metrics.length === 0) await new Promise((r) => setTimeout(r, 1000))
    }
    assert.ok(metrics.length > 0)
    assert.ok(metrics.at(-1).cpuCount >= 1)
  })
})

test('control: connect to a running sandbox', async () => {
  await withSandbox(async (sbx) => {
    const again = await Sandbox.connect(sbx.sandboxId)
    assert.equal(again.sandboxId, sbx.sandboxId)
    assert.equal(await again.isRunning(), true)
  })
})

test('control: error paths (unknown sandbox, bad key, unknown template, timeout too long)', async () => {
  await assert.rejects(Sandbox.getInfo('doesnotexist0000'), NotFoundError)
  await assert.rejects(Sandbox.create(TEMPLATE, { apiKey: 'alcove_not_a_real_key' }), AuthenticationError)
  await assert.rejects(Sandbox.create('no-such-template-anywhere'), SandboxError)
  await assert.rejects(Sandbox.create(TEMPLATE, { timeoutMs: 10 ** 12 }), SandboxError)
})
