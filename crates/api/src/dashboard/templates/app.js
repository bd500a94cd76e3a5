// The dashboard's scripts: the terminal, the charts and the live follows. Pages work without
// them (lists, forms, tables are server-rendered); these add what needs a live connection.
// Loaded with `defer`: the DOM is parsed and the libraries before it have run.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const enc = new TextEncoder();

  function cell(text) {
    const td = document.createElement("td");
    td.textContent = text == null ? "" : String(text); // never markup
    return td;
  }

  async function getJSON(url) {
    const r = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (!r.ok) throw new Error(url + ": " + r.status);
    return r.json();
  }

  // --- Terminal: xterm.js over the server's WebSocket to a PTY in the sandbox. ---
  function openTerminal(button) {
    const box = $("terminal");
    const status = $("terminal-status");
    button.disabled = true;
    const term = new window.Terminal({ cursorBlink: true, convertEol: false, fontSize: 14, rows: 24 });
    const fit = new window.FitAddon.FitAddon();
    term.loadAddon(fit);
    term.open(box);
    try { fit.fit(); } catch (e) { /* hidden box: keep the default size */ }
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const url = proto + "//" + location.host + button.dataset.ws + "?cols=" + term.cols + "&rows=" + term.rows;
    const ws = new WebSocket(url);
    ws.binaryType = "arraybuffer";
    box.alcove = { term, ws };
    status.textContent = "Connecting…";
    ws.onopen = () => { status.textContent = "Connected."; box.dataset.state = "open"; term.focus(); };
    ws.onmessage = (ev) => {
      if (typeof ev.data === "string") {
        let m = {};
        try { m = JSON.parse(ev.data); } catch (e) { /* ignore */ }
        status.textContent = m.error ? "Error: " + m.error : "The shell ended: " + (m.exit || "");
        box.dataset.state = "ended";
        return;
      }
      term.write(new Uint8Array(ev.data));
    };
    ws.onclose = () => {
      if (box.dataset.state !== "ended") status.textContent = "Disconnected.";
      box.dataset.state = "ended";
      button.disabled = false;
      button.textContent = "Open a new terminal";
      button.onclick = () => { term.dispose(); box.dataset.state = ""; openTerminal(button); };
    };
    term.onData((d) => { if (ws.readyState === 1) ws.send(enc.encode(d)); });
    term.onResize((s) => { if (ws.readyState === 1) ws.send(JSON.stringify({ cols: s.cols, rows: s.rows })); });
    window.addEventListener("resize", () => { try { fit.fit(); } catch (e) { /* ignore */ } });
  }

  // --- Charts (uPlot). ---
  function width(el) { return Math.max(320, Math.min(el.clientWidth || 800, 1100)); }

  function metricsChart(el) {
    let plot = null;
    let net = null;
    const netEl = $("network");
    async function draw() {
      let d;
      try { d = await getJSON(el.dataset.src); } catch (e) { return; }
      if (!d.t.length) return;
      const data = [d.t, d.cpu, d.mem];
      if (!plot) {
        el.textContent = "";
        plot = new window.uPlot({
          width: width(el), height: 220,
          series: [
            {},
            { label: "CPU %", stroke: "#2f6f4f", width: 2, scale: "%" },
            { label: "Memory MiB", stroke: "#3b5bdb", width: 2, scale: "mib" },
          ],
          axes: [{}, { scale: "%", label: "CPU %" }, { scale: "mib", side: 1, label: "MiB", grid: { show: false } }],
          scales: {
            "%": { range: [0, 100] },
            // A short history still spans a minute, not an auto-range of years.
            x: { time: true, range: (u, min, max) => (max - min < 60 ? [max - 60, max + 5] : [min, max]) },
          },
        }, data, el);
      } else {
        plot.setData(data);
      }
      el.dataset.points = String(d.t.length);
      if (!netEl) return;
      const netData = [d.t, d.netOut, d.netIn];
      if (!net) {
        net = new window.uPlot({
          width: width(netEl), height: 160,
          series: [
            {},
            { label: "Out B/s", stroke: "#c2410c", width: 2 },
            { label: "In B/s", stroke: "#0e7490", width: 2 },
          ],
          axes: [{}, { label: "bytes/s" }],
          scales: { x: { time: true, range: (u, min, max) => (max - min < 60 ? [max - 60, max + 5] : [min, max]) } },
        }, netData, netEl);
      } else {
        net.setData(netData);
      }
      netEl.dataset.points = String(d.t.length);
    }
    draw();
    if (el.dataset.live) setInterval(draw, 5000);
  }

  function usageChart(el) {
    const d = JSON.parse($("usage-data").textContent);
    const bars = window.uPlot.paths && window.uPlot.paths.bars ? window.uPlot.paths.bars({ size: [0.6, 40] }) : undefined;
    new window.uPlot({
      width: width(el), height: 240,
      series: [
        {},
        { label: "Cost USD", stroke: "#2f6f4f", fill: "#2f6f4f55", paths: bars, scale: "usd" },
        { label: "vCPU hours", stroke: "#3b5bdb", width: 2, scale: "h" },
      ],
      axes: [{}, { scale: "usd", label: "USD" }, { scale: "h", side: 1, label: "vCPU h", grid: { show: false } }],
    }, [d.t, d.cost, d.vcpuHours], el);
    el.dataset.points = String(d.t.length);
  }

  // --- Live follows: run events and build logs. ---
  function followEvents(table) {
    const body = table.tBodies[0];
    let after = Number(table.dataset.after || 0);
    const timer = setInterval(async () => {
      let d;
      try { d = await getJSON(table.dataset.src + "?after=" + after); } catch (e) { return; }
      for (const e of d.events) {
        const tr = document.createElement("tr");
        for (const v of [e.at, e.kind, e.action, e.target, e.result, e.detail]) tr.appendChild(cell(v));
        tr.lastChild.className = "detail";
        body.appendChild(tr);
        after = Math.max(after, e.seq);
      }
      if (d.ended) clearInterval(timer);
    }, 2000);
  }

  function followBuild(pre) {
    let offset = Number(pre.dataset.offset || 0);
    const timer = setInterval(async () => {
      let d;
      try { d = await getJSON(pre.dataset.src + "&offset=" + offset); } catch (e) { return; }
      for (const l of d.lines) {
        pre.appendChild(document.createTextNode(l.at + " " + l.level + (l.step ? " [" + l.step + "]" : "") + " " + l.message + "\n"));
      }
      offset += d.lines.length;
      $("build-status").textContent = d.status;
      if (d.finished) clearInterval(timer);
    }, 2000);
  }

  // The sandbox list follows the server: the same page fetched again every 10 s, its rows
  // swapped in (our own server-rendered, escaped HTML), unless a row's button has the focus.
  function followList(table) {
    setInterval(async () => {
      if (document.hidden || table.contains(document.activeElement)) return;
      let html;
      try {
        const r = await fetch(location.href, { credentials: "same-origin" });
        if (!r.ok || r.redirected) return;
        html = await r.text();
      } catch (e) { return; }
      const doc = new DOMParser().parseFromString(html, "text/html");
      const fresh = doc.querySelector("#sandbox-list tbody");
      const count = doc.getElementById("sandbox-count");
      if (fresh) table.tBodies[0].replaceWith(document.adoptNode(fresh));
      if (count && $("sandbox-count")) $("sandbox-count").textContent = count.textContent;
    }, 10000);
  }

  document.addEventListener("DOMContentLoaded", () => {
    const list = $("sandbox-list");
    if (list && list.dataset.live) followList(list);
    const open = $("terminal-open");
    if (open && window.Terminal) open.onclick = () => openTerminal(open);
    const m = $("metrics");
    if (m && window.uPlot) metricsChart(m);
    const u = $("usage-chart");
    if (u && window.uPlot) usageChart(u);
    const ev = $("events");
    if (ev && ev.dataset.src) followEvents(ev);
    const log = $("build-log");
    if (log && log.dataset.live) followBuild(log);
  });
})();
