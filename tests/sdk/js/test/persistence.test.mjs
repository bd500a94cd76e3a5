// Persistence through the JS SDK: pause/connect twice with a live process and files, fork, and a
// snapshot restored then deleted under its child. These need real sandboxes.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { Sandbox } from 'e2b'
import { TEMPLATE } from '../lib/helpers.mjs'

const HOLDER = `
import random, time
secret = "%016x" % random.getrandbits(64)
f = open("/home/user/holder.log", "a")
n = 0
while True:
    n += 1
    f.write(f"{secret} {n}\\n")
    f.flush()
    time.sleep(0.2)
`

async function startHolder(sbx) {
  await sbx.files.write('/home/user/holder.py', HOLDER)
  await sbx.commands.run('python3 /home/user/holder.py', { background: true })
  await sbx.commands.run(
    'for i in $(seq 600); do test -s /home/user/holder.log && exit 0; sleep 0.1; done; exit 1',
    { timeoutMs: 90_000 },
  )
}

async function lastLine(sbx) {
  const [secret, n] = (await sbx.commands.run('sleep 0.5; tail -n1 /home/user/holder.log')).stdout.split(/\s+/)
  return [secret, Number(n)]
}

test('persistence: pause and connect twice keep the process, its variable and the files', async () => {
  const sbx = await Sandbox.create(TEMPLATE, { timeoutMs: 300_000 })
  try {
    await startHolder(sbx)
    let [secret, n] = await lastLine(sbx)
    await sbx.files.write('/home/user/js-before.txt', 'before')
    for (let round = 0; round < 2; round++) {
      assert.equal(await sbx.pause(), true)
      assert.equal((await Sandbox.getInfo(sbx.sandboxId)).state, 'paused')
      assert.equal(await Sandbox.pause(sbx.sandboxId), false, 'second pause is a no-op')
      const back = await Sandbox.connect(sbx.sandboxId)
      const [s2, n2] = await lastLine(back)
      assert.equal(s2, secret)
      assert.ok(n2 > n, `round ${round}: ${n} -> ${n2}`)
      n = n2
      assert.equal(await back.files.read('/home/user/js-before.txt'), 'before')
    }
  } finally {
    await sbx.kill()
  }
})

test('persistence: fork into two children that diverge', async () => {
  const parent = await Sandbox.create(TEMPLATE, { timeoutMs: 300_000 })
  let kids = []
  try {
    await parent.files.write('/home/user/shared.txt', 'parent')
    kids = await parent.fork({ count: 2 })
    assert.equal(kids.length, 2)
    for (const [i, k] of kids.entries()) {
      assert.ok(!(k instanceof Error), String(k))
      assert.equal(await k.files.read('/home/user/shared.txt'), 'parent')
      await k.files.write('/home/user/mine.txt', `child ${i}`)
    }
    for (const [i, k] of kids.entries()) {
      assert.equal(await k.files.read('/home/user/mine.txt'), `child ${i}`)
    }
    assert.equal(await parent.files.exists('/home/user/mine.txt'), false)
  } finally {
    for (const k of kids) if (!(k instanceof Error)) await k.kill()
    await parent.kill()
  }
})

test('persistence: snapshot, restore, delete under a live child', async () => {
  const src = await Sandbox.create(TEMPLATE, { timeoutMs: 300_000 })
  let child
  try {
    await src.files.write('/home/user/cp.txt', 'checkpoint')
    const snap = await src.createSnapshot()
    assert.ok(snap.snapshotId)
    child = await Sandbox.create(snap.snapshotId, { timeoutMs: 300_000 })
    assert.equal(await child.files.read('/home/user/cp.txt'), 'checkpoint')
    assert.equal(await Sandbox.deleteSnapshot(snap.snapshotId), true)
    await child.files.write('/home/user/cp.txt', 'changed')
    assert.equal(await child.files.read('/home/user/cp.txt'), 'changed')
    assert.equal(await src.files.read('/home/user/cp.txt'), 'checkpoint')
  } finally {
    if (child) await child.kill()
    await src.kill()
  }
})
