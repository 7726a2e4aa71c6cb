#!/usr/bin/env node
// NATS test agent (nats 2.x), protocol in tests/agents/README.md:
// JSON commands on stdin, JSON events on stdout, one object per line.
// Commands run one at a time, in order. Servers given as ws:// or wss://
// URLs are reached with nats.ws (the browsers' client) over the `ws`
// package, as Node 20 has no WebSocket of its own; others with nats.
'use strict';

const readline = require('readline');
const tcp = require('nats');

function library(servers) {
  if (!servers.some((s) => /^wss?:\/\//.test(s))) return tcp;
  if (!globalThis.WebSocket) globalThis.WebSocket = require('ws');
  return require('nats.ws');
}

let nc = null;
let lib = tcp; // the library of the current connection
const subs = new Map(); // sid -> Subscription
const decoder = new TextDecoder(); // invalid UTF-8 becomes U+FFFD in "data"; "b64" is exact

function out(obj) {
  obj.t = Date.now();
  process.stdout.write(JSON.stringify(obj) + '\n');
}
const diag = (line) => process.stderr.write(`nats-agent: ${line}\n`);

function needConn() {
  if (!nc || nc.isClosed()) throw new Error('not connected');
  return nc;
}

async function watchStatus(conn) {
  for await (const s of conn.status()) {
    if (s.type === 'disconnect') out({ ev: 'disconnected' });
    else if (s.type === 'reconnect') out({ ev: 'reconnected' });
    else if (s.type === 'error') diag(`status error: ${s.data}`);
  }
}

function msgEvent(sid, m) {
  const ev = {
    ev: 'msg',
    sid,
    subject: m.subject,
    data: decoder.decode(m.data),
    b64: Buffer.from(m.data.buffer, m.data.byteOffset, m.data.byteLength).toString('base64'),
  };
  if (m.headers) {
    const h = {};
    for (const [k, v] of m.headers) h[k] = v.slice();
    ev.headers = h;
  }
  return ev;
}

async function doConnect(c) {
  if (nc && !nc.isClosed()) throw new Error('already connected');
  const opts = { servers: c.servers || ['nats://127.0.0.1:4222'] };
  lib = library(opts.servers);
  if (c.name !== undefined) opts.name = c.name;
  // Optional extras (not in the README): reconnect tuning for restart tests.
  if (c.maxReconnectAttempts !== undefined) opts.maxReconnectAttempts = c.maxReconnectAttempts;
  if (c.reconnectTimeWait !== undefined) opts.reconnectTimeWait = c.reconnectTimeWait;
  // Authentication and TLS, for tests against a secured server.
  if (c.token !== undefined) opts.token = c.token;
  if (c.user !== undefined) opts.user = c.user;
  if (c.pass !== undefined) opts.pass = c.pass;
  if (c.nkeySeed !== undefined) opts.authenticator = lib.nkeyAuthenticator(new TextEncoder().encode(c.nkeySeed));
  if (c.creds !== undefined) opts.authenticator = lib.credsAuthenticator(new TextEncoder().encode(c.creds));
  if (c.tls && typeof c.tls === 'object') opts.tls = c.tls; // {caFile, certFile, keyFile}
  // Optional extra: behind an ingress, advertised cluster addresses are unreachable.
  if (c.ignoreClusterUpdates !== undefined) opts.ignoreClusterUpdates = c.ignoreClusterUpdates;
  nc = await lib.connect(opts);
  subs.clear();
  watchStatus(nc).catch((e) => diag(`status: ${e.message}`));
  nc.closed().then((err) => { if (err) diag(`closed: ${err.message}`); });
}

async function doSub(c) {
  const conn = needConn();
  if (typeof c.sid !== 'string' || typeof c.subject !== 'string') throw new Error('sub: sid and subject are required');
  if (subs.has(c.sid)) throw new Error(`sub: sid ${c.sid} already in use`);
  const opts = {};
  if (c.queue) opts.queue = c.queue;
  const sid = c.sid;
  opts.callback = (err, m) => {
    if (err) diag(`sub ${sid}: ${err.message}`);
    else out(msgEvent(sid, m));
  };
  subs.set(sid, conn.subscribe(c.subject, opts));
  await conn.flush();
}

async function doUnsub(c) {
  const conn = needConn();
  const sub = subs.get(c.sid);
  if (!sub) throw new Error(`unsub: unknown sid ${c.sid}`);
  subs.delete(c.sid);
  sub.unsubscribe();
  await conn.flush();
}

async function doPub(c) {
  const conn = needConn();
  if (typeof c.subject !== 'string') throw new Error('pub: subject is required');
  let data;
  if (typeof c.b64 === 'string') data = new Uint8Array(Buffer.from(c.b64, 'base64'));
  else data = new TextEncoder().encode(c.data === undefined ? '' : String(c.data));
  const opts = {};
  if (c.headers && typeof c.headers === 'object') {
    const h = lib.headers();
    for (const [k, v] of Object.entries(c.headers)) {
      for (const one of Array.isArray(v) ? v : [v]) h.append(k, String(one));
    }
    opts.headers = h;
  }
  conn.publish(c.subject, data, opts);
  await conn.flush();
}

let exiting = false;
async function exit(seq) {
  exiting = true;
  if (nc && !nc.isClosed()) {
    try { await nc.close(); } catch (e) { diag(`close: ${e.message}`); }
  }
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
  try {
    switch (c.cmd) {
      case 'connect': await doConnect(c); break;
      case 'sub': await doSub(c); break;
      case 'unsub': await doUnsub(c); break;
      case 'pub': await doPub(c); break;
      case 'exit': await exit(seq); return;
      default: throw new Error(`unknown command ${JSON.stringify(c.cmd)}`);
    }
    out({ ev: 'ok', seq });
  } catch (e) {
    out({ ev: 'error', seq, message: String(e && e.message || e) });
  }
}

process.stdout.on('error', () => process.exit(0));
let chain = Promise.resolve();
const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
rl.on('line', (line) => { chain = chain.then(() => handle(line)); });
rl.on('close', () => { chain = chain.then(() => (exiting ? undefined : exit(null))); });
