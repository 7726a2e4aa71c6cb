#!/usr/bin/env node
// Browser test agent: Debian's Chromium, headless, driven by playwright-core.
// Protocol in tests/agents/README.md: JSON commands on stdin, JSON events on
// stdout, one object per line. Commands run one at a time, in order.
'use strict';

const fs = require('fs');
const os = require('os');
const path = require('path');
const readline = require('readline');
const { chromium } = require('playwright-core');

const EXECUTABLE = process.env.CHROMIUM_BIN || '/usr/bin/chromium';
const ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

let context = null;
let profile = null;
const pages = new Map(); // name -> Page

function out(obj) {
  obj.t = Date.now();
  process.stdout.write(JSON.stringify(obj) + '\n');
}
const diag = (line) => process.stderr.write(`browser-agent: ${line}\n`);

async function doLaunch(c) {
  if (context) throw new Error('already launched');
  profile = fs.mkdtempSync(path.join(os.tmpdir(), 'tfb-chromium-'));
  context = await chromium.launchPersistentContext(profile, {
    executablePath: EXECUTABLE,
    headless: true,
    args: ARGS,
    ignoreHTTPSErrors: !!c.ignoreHTTPSErrors,
    viewport: c.viewport || { width: 1400, height: 900 },
  });
  // A persistent context opens with one blank page: it becomes "main".
  const first = context.pages()[0] || (await context.newPage());
  watch('main', first);
}

function watch(name, page) {
  pages.set(name, page);
  page.on('console', (m) => out({ ev: 'console', page: name, type: m.type(), text: m.text() }));
  page.on('pageerror', (e) => out({ ev: 'pageerror', page: name, message: String(e && e.message || e) }));
}

async function page(c) {
  if (!context) throw new Error('not launched');
  const name = c.page || 'main';
  if (!pages.has(name)) watch(name, await context.newPage());
  return pages.get(name);
}

async function handleOne(c) {
  switch (c.cmd) {
    case 'launch': await doLaunch(c); return undefined;
    case 'open': {
      const p = await page(c);
      const resp = await p.goto(c.url, { waitUntil: 'domcontentloaded', timeout: c.timeout_ms || 30000 });
      return resp ? resp.status() : null;
    }
    case 'eval': return (await page(c)).evaluate(c.js);
    case 'wait': {
      const p = await page(c);
      const h = await p.waitForFunction(c.js, null, { timeout: c.timeout_ms || 10000, polling: 100 });
      return h.jsonValue();
    }
    case 'script': await (await page(c)).addScriptTag({ path: c.path }); return undefined;
    case 'screenshot':
      fs.mkdirSync(path.dirname(c.path), { recursive: true });
      await (await page(c)).screenshot({ path: c.path, fullPage: c.fullPage !== false });
      return undefined;
    case 'throttle': {
      // Chromium's network emulation, through the DevTools protocol.
      const cdp = await context.newCDPSession(await page(c));
      await cdp.send('Network.enable');
      await cdp.send('Network.emulateNetworkConditions', {
        offline: !!c.offline,
        latency: c.latencyMs || 0,
        downloadThroughput: c.downloadBps === undefined ? -1 : c.downloadBps,
        uploadThroughput: c.uploadBps === undefined ? -1 : c.uploadBps,
      });
      return undefined;
    }
    default: throw new Error(`unknown command ${JSON.stringify(c.cmd)}`);
  }
}

let exiting = false;
async function exit(seq) {
  exiting = true;
  if (context) {
    try { await context.close(); } catch (e) { diag(`close: ${e.message}`); }
  }
  if (profile) fs.rmSync(profile, { recursive: true, force: true });
  if (seq === null) process.exit(0);
  process.stdout.write(JSON.stringify({ ev: 'ok', seq, t: Date.now() }) + '\n', () => process.exit(0));
}

async function handle(line) {
  if (!line.trim() || exiting) return;
  let c;
  try {
    c = JSON.parse(line);
  } catch (e) {
    out({ ev: 'error', seq: null, message: `bad JSON: ${e.message}` });
    return;
  }
  const seq = c && c.seq !== undefined ? c.seq : null;
  if (c.cmd === 'exit') return exit(seq);
  try {
    const value = await handleOne(c);
    out(value === undefined ? { ev: 'ok', seq } : { ev: 'ok', seq, value });
  } catch (e) {
    out({ ev: 'error', seq, message: String(e && e.message || e) });
  }
}

process.stdout.on('error', () => process.exit(0));
let chain = Promise.resolve();
const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
rl.on('line', (line) => { chain = chain.then(() => handle(line)); });
rl.on('close', () => { chain = chain.then(() => (exiting ? undefined : exit(null))); });
