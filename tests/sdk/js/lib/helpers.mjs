// Shared setup: configured only through E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY.
import { randomUUID } from 'node:crypto'
import { Sandbox } from 'e2b'

for (const v of ['E2B_API_URL', 'E2B_SANDBOX_URL', 'E2B_API_KEY']) {
  if (!process.env[v]) throw new Error(`${v} is not set; run tests/sdk/run.sh`)
}

export const TEMPLATE = process.env.ALCOVE_SDK_TEMPLATE || 'base'

export async function withSandbox(fn, opts = {}) {
  const run = randomUUID()
  const sbx = await Sandbox.create(TEMPLATE, { timeoutMs: 120_000, metadata: { suite: 'js', run }, ...opts })
  try {
    return await fn(sbx, run)
  } finally {
    await sbx.kill()
  }
}
