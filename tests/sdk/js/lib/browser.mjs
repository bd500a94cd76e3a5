// A real browser for the SDK suites: Debian's Chromium, headless, driven by playwright-core.
// Python tests (tests/sdk/python/test_desktop.py) drive it as a child process, one JSON
// command per stdin line, one JSON answer per stdout line:
//
//   {"cmd": "open", "url": U, "timeout": S}  opens the noVNC page U; answers when the canvas
//                                            shows the remote screen ({"connected": true,
//                                            "size": [w, h]}) or noVNC gives up ({"connected":
//                                            false, "status": "..."})
//   {"cmd": "shot", "path": P}               the canvas as the person watching sees it, a PNG
//   {"cmd": "move", "x": X, "y": Y}          the browser's mouse to remote screen (X, Y)
//   {"cmd": "cdp", "endpoint": E, "headers": H, "url": U}
//                                            Playwright's connectOverCDP to E (with headers H on
//                                            every request, WebSocket included), a new page at
//                                            U: {"title": ..., "version": ...}
//   {"cmd": "goto", "url": U}               a web page (the dashboard): {"status", "url", "title"}
//   {"cmd": "fill", "selector": S, "value": V}   types V into the field S
//   {"cmd": "click", "selector": S}         clicks S and waits for the page it loads
//   {"cmd": "text", "selector": S}          S's text (default: the whole page's)
//   {"cmd": "screenshot", "path": P}        the whole page, a PNG (test artifacts)
//
// Errors answer {"error": "..."}; the process ends when stdin does. Environment:
// ALCOVE_CHROMIUM (default /usr/lib/chromium/chromium), ALCOVE_TLS_CERT (the server's
// certificate: Chromium accepts exactly that one, by its public key), NODE_EXTRA_CA_CERTS (the
// server's CA, for connectOverCDP over https).
import { createHash, X509Certificate } from 'node:crypto'
import dns from 'node:dns'
import { readFileSync } from 'node:fs'
import { createInterface } from 'node:readline'

// `*.localhost` is loopback (RFC 6761): Chromium knows it, this host's C library may not, so
// Node's own connections (connectOverCDP's) are told here, before playwright-core loads.
const loopback = (host) => (typeof host === 'string' && host.endsWith('.localhost') ? '127.0.0.1' : host)
const lookup = dns.lookup
dns.lookup = (host, ...rest) => lookup(loopback(host), ...rest)
const lookupPromise = dns.promises.lookup
dns.promises.lookup = (host, ...rest) => lookupPromise(loopback(host), ...rest)
const { chromium } = await import('playwright-core')

const executablePath = process.env.ALCOVE_CHROMIUM || '/usr/lib/chromium/chromium'
const args = []
if (process.env.ALCOVE_TLS_CERT) {
  const cert = new X509Certificate(readFileSync(process.env.ALCOVE_TLS_CERT))
  const spki = cert.publicKey.export({ type: 'spki', format: 'der' })
  args.push(`--ignore-certificate-errors-spki-list=${createHash('sha256').update(spki).digest('base64')}`)
}

let browser
let page

async function open({ url, timeout = 120 }) {
  browser ??= await chromium.launch({ executablePath, args, headless: true })
  if (page) await page.close()
  page = await browser.newPage({ viewport: { width: 1024, height: 768 } })
  await page.goto(url, { timeout: timeout * 1000 })
  // noVNC marks the document when the RFB session is up; its status line says why not.
  const outcome = await page.waitForFunction(
    () => {
      const html = document.documentElement
      const canvas = document.querySelector('#noVNC_container canvas')
      if (html.classList.contains('noVNC_connected') && canvas && canvas.width > 0) {
        return { connected: true, size: [canvas.width, canvas.height] }
      }
      const status = document.getElementById('noVNC_status')?.textContent || ''
      if (/fail|disconnect|error/i.test(status)) return { connected: false, status }
      return null
    },
    null,
    { timeout: timeout * 1000, polling: 250 },
  )
  return outcome.jsonValue()
}

async function canvas() {
  if (!page) throw new Error('no page: send {"cmd": "open"} first')
  return page.locator('#noVNC_container canvas')
}

async function shot({ path }) {
  await (await canvas()).screenshot({ path })
  return { path }
}

async function move({ x, y }) {
  const c = await canvas()
  const box = await c.boundingBox()
  const [w, h] = await c.evaluate((el) => [el.width, el.height])
  await page.mouse.move(box.x + ((x + 0.5) * box.width) / w, box.y + ((y + 0.5) * box.height) / h)
  return { moved: [x, y] }
}

async function cdp({ endpoint, headers = {}, url }) {
  const remote = await chromium.connectOverCDP(endpoint, { headers, timeout: 120_000 })
  try {
    const context = remote.contexts()[0] ?? (await remote.newContext())
    const p = await context.newPage()
    await p.goto(url, { timeout: 120_000 })
    const title = await p.title()
    await p.close()
    return { title, version: remote.version() }
  } finally {
    await remote.close() // disconnects; the sandbox's browser keeps running
  }
}

async function web() {
  browser ??= await chromium.launch({ executablePath, args, headless: true })
  if (!page) {
    page = await browser.newPage({ viewport: { width: 1280, height: 800 } })
    // Pages that snapshot or start sandboxes answer after the VM work (TCG: tens of seconds).
    page.setDefaultTimeout(180_000)
  }
  return page
}

async function goto({ url, timeout = 60 }) {
  const p = await web()
  const res = await p.goto(url, { timeout: timeout * 1000 })
  return { status: res?.status() ?? null, url: p.url(), title: await p.title() }
}

async function fill({ selector, value }) {
  await (await web()).fill(selector, value, { timeout: 30_000 })
  return { filled: selector }
}

async function click({ selector }) {
  const p = await web()
  await Promise.all([p.waitForLoadState('load'), p.click(selector, { timeout: 30_000 })])
  await p.waitForLoadState('load')
  return { url: p.url(), title: await p.title() }
}

async function text({ selector = 'body' }) {
  return { text: await (await web()).locator(selector).first().innerText({ timeout: 30_000 }) }
}

async function screenshot({ path }) {
  await (await web()).screenshot({ path, fullPage: true })
  return { path }
}

// Keys typed into the focused element (the dashboard's terminal), after a click on `selector`.
async function type({ selector, text, delay = 20 }) {
  const p = await web()
  if (selector) await p.click(selector, { timeout: 30_000 })
  await p.keyboard.type(text, { delay })
  return { typed: text.length }
}

// Waits for `selector` inside the iframe `frame` to be visible, or in `state` (a cross-origin
// frame too).
async function framewait({ frame, selector, state = 'visible', timeout = 60 }) {
  await (await web()).frameLocator(frame).locator(selector).first().waitFor({ state, timeout: timeout * 1000 })
  return { visible: selector }
}

// Chooses `path` in the file input `selector`.
async function upload({ selector, path }) {
  await (await web()).setInputFiles(selector, path, { timeout: 30_000 })
  return { chosen: path }
}

// Waits until `expr` (a JavaScript expression in the page) is truthy; answers its value.
async function wait({ expr, timeout = 60 }) {
  const p = await web()
  // A function, not a string: the dashboard's CSP forbids eval, which string predicates use.
  const h = await p.waitForFunction(new Function(`return (${expr})`), null, { timeout: timeout * 1000, polling: 100 })
  return { value: await h.jsonValue() }
}

// Evaluates `expr` in the page (a promise is awaited).
async function evaluate({ expr }) {
  return { value: await (await web()).evaluate(new Function(`return (${expr})`)) }
}

const commands = { open, shot, move, cdp, goto, fill, click, text, screenshot, type, wait, evaluate, upload, framewait }
for await (const line of createInterface({ input: process.stdin })) {
  if (!line.trim()) continue
  let answer
  try {
    const msg = JSON.parse(line)
    const run = commands[msg.cmd]
    if (!run) throw new Error(`unknown command ${msg.cmd}; known: ${Object.keys(commands).join(', ')}`)
    answer = await run(msg)
  } catch (e) {
    answer = { error: String(e?.message || e) }
  }
  process.stdout.write(JSON.stringify(answer) + '\n')
}
await browser?.close()
