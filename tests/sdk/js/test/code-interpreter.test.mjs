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
