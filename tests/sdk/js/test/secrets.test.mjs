// Secrets through the JS SDK: the Secret class against /secrets (values write-only), network
// rules that use them at create, and placeholders refused where they would reach the guest.
// (The request path through the egress proxy is tests/sdk/python/test_secret_egress.py.)
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { Sandbox, Secret } from 'e2b'
import { TEMPLATE } from '../lib/helpers.mjs'

test('secrets: create, read back without the value, version, list, destroy', async () => {
  const name = `js-${randomUUID().slice(0, 8)}`
  const value = `v-${randomUUID()}`
  const info = await Secret.create(name.toUpperCase(), value, { metadata: { team: 'js' } })
  try {
    assert.equal(info.name, name, 'names are lower-cased')
    assert.equal(info.version, 1)
    assert.ok(!JSON.stringify(info).includes(value))
    assert.equal((await Secret.getInfo(info.secretId)).name, name)
    assert.equal(await Secret.exists(name), true)
    const updated = await Secret.update(name, `${value}-2`)
    assert.equal(updated.version, 2)
    const page = Secret.list({ limit: 100 })
    const all = []
    while (page.hasNext) all.push(...(await page.nextItems()))
    assert.ok(all.some((s) => s.name === name))
    assert.ok(!JSON.stringify(all).includes(value))
  } finally {
    assert.equal(await Secret.destroy(name), true)
  }
  assert.equal(await Secret.exists(name), false)
})

test('secrets: a rule with a placeholder at create; placeholders refused in envs and commands', async () => {
  const name = `js-${randomUUID().slice(0, 8)}`
  await Secret.create(name, `v-${randomUUID()}`)
  try {
    await assert.rejects(
      Sandbox.create(TEMPLATE, { timeoutMs: 60_000, envs: { KEY: Secret.fill(name) } }),
      (e) => /envVars/.test(e.message) && /network\.rules/.test(e.message),
    )
    await assert.rejects(
      Sandbox.create(TEMPLATE, {
        timeoutMs: 60_000,
        network: { allowOut: ['a.test'], rules: { 'a.test': [{ transform: { headers: { 'X-Key': Secret.fill('missing-js') } } }] } },
      }),
      (e) => /missing-js/.test(e.message),
    )
    const sbx = await Sandbox.create(TEMPLATE, {
      timeoutMs: 120_000,
      network: {
        allowOut: ['a.test'],
        rules: { 'a.test': [{ transform: { headers: { Authorization: `Bearer ${Secret.fill(name)}` } } }] },
      },
    })
    try {
      // The guest trusts its egress CA; Node picks it up through NODE_EXTRA_CA_CERTS.
      const env = (await sbx.commands.run('env')).stdout
      assert.match(env, /NODE_EXTRA_CA_CERTS=\/usr\/local\/share\/ca-certificates\/alcove-egress\.crt/)
      const ca = await sbx.files.read('/usr/local/share/ca-certificates/alcove-egress.crt')
      assert.ok(ca.startsWith('-----BEGIN CERTIFICATE-----'))
      await assert.rejects(sbx.commands.run(`echo ${Secret.fill(name)}`), /placeholder/)
      assert.equal((await sbx.commands.run('echo ok')).stdout, 'ok\n')
    } finally {
      await sbx.kill()
    }
  } finally {
    await Secret.destroy(name)
  }
})
