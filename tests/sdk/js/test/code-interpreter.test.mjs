// The official @e2b/code-interpreter JS SDK (unmodified) against the code-interpreter-v1
// template: state, charts, errors, streaming, contexts and the Bash kernel. Needs real sandboxes.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { Sandbox } from '@e2b/code-interpreter'

test('code interpreter: state, png, errors, stdout, contexts, bash', async () => {
  const sbx = await Sandbox.create({ timeoutMs: 300_000, metadata: { suite: 'js-ci' } })
  try {
    await sbx.runCode('x = 1')
    assert.equal((await sbx.runCode('x + 1')).text, '2')

    const plot = await sbx.runCode('import matplotlib.pyplot as plt\nplt.plot([1, 2], [3, 4])\nplt.show()')
    const fig = plot.results.find((r) => r.png)
    assert.ok(fig, 'a figure result')
    assert.equal(Buffer.from(fig.png, 'base64').subarray(0, 4).toString('hex'), '89504e47')
    assert.equal(fig.chart?.type, 'line')

    const err = await sbx.runCode('raise ValueError("nope")')
    assert.equal(err.error?.name, 'ValueError')
    assert.equal(err.error?.value, 'nope')

    const lines = []
    await sbx.runCode('for i in range(3): print(i)', { onStdout: (m) => lines.push(m.line) })
    assert.deepEqual(lines.join('').split(/\s+/).filter(Boolean), ['0', '1', '2'])

    const ctx = await sbx.createCodeContext({ cwd: '/tmp' })
    const missing = await sbx.runCode('x', { context: ctx })
    assert.equal(missing.error?.name, 'NameError')

    const bash = await sbx.runCode('echo from-bash', { language: 'bash' })
    assert.match(bash.logs.stdout.join(''), /from-bash/)
  } finally {
    await sbx.kill()
  }
})

test('code interpreter: JavaScript and TypeScript cells, contexts and env vars', async () => {
  const sbx = await Sandbox.create({ timeoutMs: 300_000, envs: { FROM_CREATE: 'created' }, metadata: { suite: 'js-ci' } })
  try {
    const first = await sbx.runCode("import { basename } from 'node:path'\nconst v = await Promise.resolve(20)\nconsole.log(basename('/a/b.txt'))\nv * 2", { language: 'js', timeoutMs: 240_000 })
    assert.equal(first.error, undefined)
    assert.equal(first.text, '40')
    assert.match(first.logs.stdout.join(''), /b\.txt/)
    assert.equal((await sbx.runCode('v + 1', { language: 'javascript' })).text, '21')
    assert.equal((await sbx.runCode('process.env.FROM_CREATE', { language: 'js' })).text, 'created')
    assert.equal((await sbx.runCode('process.env.ONCE', { language: 'js', envs: { ONCE: 'yes' } })).text, 'yes')
    assert.equal((await sbx.runCode("process.env.ONCE ?? 'gone'", { language: 'js' })).text, 'gone')

    const ctx = await sbx.createCodeContext({ language: 'ts', cwd: '/tmp' })
    assert.equal(ctx.language, 'typescript')
    await sbx.runCode('const n: number = 7', { context: ctx, timeoutMs: 240_000 })
    assert.equal((await sbx.runCode('n * 6', { context: ctx })).text, '42')
    assert.equal((await sbx.runCode('Deno.cwd()', { context: ctx })).text, '/tmp')
    const err = await sbx.runCode("throw new TypeError('bad')", { context: ctx })
    assert.equal(err.error?.name, 'TypeError')
    assert.equal(err.error?.value, 'bad')
  } finally {
    await sbx.kill()
  }
})
