// Commands, PTY and files through the JS SDK: these need real sandboxes.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { CommandExitError, TimeoutError, FileType, FilesystemEventType } from 'e2b'
import { withSandbox } from '../lib/helpers.mjs'

test('commands: foreground with cwd, user, envs and callbacks', async () => {
  await withSandbox(async (sbx) => {
    const out = []
    const err = []
    const r = await sbx.commands.run('echo "$G from $(pwd) as $(whoami)"; echo oops >&2', {
      envs: { G: 'hi' }, cwd: '/tmp', user: 'root',
      onStdout: (d) => out.push(d), onStderr: (d) => err.push(d),
    })
    assert.equal(r.stdout.trim(), 'hi from /tmp as root')
    assert.equal(out.join('').trim(), 'hi from /tmp as root')
    assert.equal(err.join('').trim(), 'oops')
  })
})

test('commands: exit code, timeout, background, list, stdin, kill', async () => {
  await withSandbox(async (sbx) => {
    await assert.rejects(sbx.commands.run('exit 3'), (e) => e instanceof CommandExitError && e.exitCode === 3)
    await assert.rejects(sbx.commands.run('sleep 30', { timeoutMs: 2000 }), TimeoutError)
    const h = await sbx.commands.run('head -n 1', { background: true, stdin: true })
    assert.ok((await sbx.commands.list()).some((p) => p.pid === h.pid))
    await sbx.commands.sendStdin(h.pid, 'from stdin\n')
    assert.equal((await h.wait()).stdout.trim(), 'from stdin')
    const bg = await sbx.commands.run('sleep 300', { background: true })
    assert.equal(await sbx.commands.kill(bg.pid), true)
  })
})

test('pty: create, send input, resize', async () => {
  await withSandbox(async (sbx) => {
    let text = ''
    const dec = new TextDecoder()
    const h = await sbx.pty.create({ rows: 24, cols: 80, onData: (d) => { text += dec.decode(d) } })
    await sbx.pty.sendInput(h.pid, new TextEncoder().encode('stty size\n'))
    // Resize only once the first answer is in: the shell reads its input when it gets to it,
    // so a resize sent at once could land before the first `stty size` runs.
    const deadline = Date.now() + 30_000
    while (!/24 80/.test(text) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50))
    await sbx.pty.resize(h.pid, { rows: 40, cols: 120 })
    await sbx.pty.sendInput(h.pid, new TextEncoder().encode('stty size; exit\n'))
    await h.wait()
    assert.match(text, /24 80/)
    assert.match(text, /40 120/)
  })
})

test('files: write/read, write many, list, exists, info, mkdir, rename, remove, watch', async () => {
  await withSandbox(async (sbx) => {
    await sbx.files.write('/home/user/a.txt', 'hello')
    assert.equal(await sbx.files.read('/home/user/a.txt'), 'hello')
    const bytes = new Uint8Array(4096).map((_, i) => i % 256)
    await sbx.files.write('/home/user/b.bin', bytes)
    assert.deepEqual(await sbx.files.read('/home/user/b.bin', { format: 'bytes' }), bytes)
    await sbx.files.makeDir('/home/user/many')
    await sbx.files.write([0, 1, 2].map((i) => ({ path: `/home/user/many/${i}.txt`, data: String(i) })))
    assert.deepEqual((await sbx.files.list('/home/user/many')).map((e) => e.name).sort(), ['0.txt', '1.txt', '2.txt'])
    assert.equal(await sbx.files.exists('/home/user/many/1.txt'), true)
    assert.equal((await sbx.files.getInfo('/home/user/many')).type, FileType.DIR)
    await sbx.files.rename('/home/user/a.txt', '/home/user/c.txt')
    assert.equal(await sbx.files.exists('/home/user/a.txt'), false)
    await sbx.files.remove('/home/user/c.txt')
    assert.equal(await sbx.files.exists('/home/user/c.txt'), false)

    const events = []
    const w = await sbx.files.watchDir('/home/user/many', (e) => events.push(e.type))
    await sbx.files.write('/home/user/many/new.txt', 'x')
    await sbx.files.remove('/home/user/many/new.txt')
    for (let i = 0; i < 50 && !events.includes(FilesystemEventType.REMOVE); i++) {
      await new Promise((r) => setTimeout(r, 200))
    }
    await w.stop()
    assert.ok(events.includes(FilesystemEventType.REMOVE), JSON.stringify(events))
  })
})
