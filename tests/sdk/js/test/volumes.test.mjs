// Volumes through the JS SDK: the Volume class against /volumes and the content API (its own
// token), and volumeMounts at create: a file one sandbox writes is read by the next after the
// first is killed, and by the SDK on the host.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { Sandbox, Volume } from 'e2b'
import { TEMPLATE } from '../lib/helpers.mjs'

test('volumes: content calls, a mount shared across sandboxes, destroy', async () => {
  const name = `js-${randomUUID().slice(0, 8)}`
  const vol = await Volume.create(name)
  try {
    assert.equal(vol.name, name)
    assert.ok((await Volume.list()).some((v) => v.volumeId === vol.volumeId))
    assert.equal((await Volume.getInfo(vol.volumeId)).name, name)

    await vol.makeDir('/in')
    await vol.writeFile('/in/host.txt', 'from the host')
    assert.equal(await vol.readFile('/in/host.txt'), 'from the host')
    assert.equal(await vol.exists('/in/nothing'), false)
    assert.equal((await vol.getInfo('/in/host.txt')).size, 13)

    const a = await Sandbox.create(TEMPLATE, { timeoutMs: 120_000, volumeMounts: { '/data': vol } })
    try {
      const r = await a.commands.run('cat /data/in/host.txt && echo from-a > /data/a.txt')
      assert.equal(r.stdout, 'from the host')
    } finally {
      await a.kill()
    }
    // The volume outlives the sandbox; a second one, mounting it by name, reads what it wrote.
    const b = await Sandbox.create(TEMPLATE, { timeoutMs: 120_000, volumeMounts: { '/mnt/v': name } })
    try {
      assert.equal((await b.commands.run('cat /mnt/v/a.txt')).stdout, 'from-a\n')
      await assert.rejects(Volume.destroy(vol.volumeId), (e) => /mount/i.test(e.message))
    } finally {
      await b.kill()
    }
    assert.equal(await vol.readFile('/a.txt'), 'from-a\n')
    const names = (await vol.list('/')).map((e) => e.name).sort()
    assert.deepEqual(names, ['a.txt', 'in'])
    await vol.remove('/a.txt')
    assert.equal(await vol.exists('/a.txt'), false)
  } finally {
    for (let i = 0; i < 10; i++) {
      try {
        await Volume.destroy(vol.volumeId)
        break
      } catch {
        await new Promise((r) => setTimeout(r, 1000)) // a kill may still be settling
      }
    }
  }
  await assert.rejects(Volume.getInfo(vol.volumeId))
})
