// Shared pieces of the TraderX role simulators: the fixed accounts and
// securities, the topic and subject maps, Socket.IO and NATS helpers, and the
// JSON-lines control protocol of tests/agents/README.md.
'use strict';

const readline = require('readline');
const { io } = require('socket.io-client');
const nats = require('nats');

/** The fixed set of accounts (the first three are TraderX sample accounts). */
const ACCOUNTS = [22214, 52355, 62654, 10031];
/** The fixed set of securities. */
const SECURITIES = ['MSFT', 'IBM', 'AAPL', 'GOOG', 'AMZN'];

const QUEUE_GROUP = 'trade-processor';

/** Legacy topics (PROTOCOL.md section 1). */
const TOPICS = {
  orders: '/trades',
  trades: (a) => `/accounts/${a}/trades`,
  positions: (a) => `/accounts/${a}/positions`,
};

/**
 * NATS subjects: `spec` is the state 006 subject map (config/traderx.toml),
 * `verbatim` the legacy topic strings used as subjects
 * (config/traderx-verbatim.toml), where no wildcard can match.
 */
const SUBJECT_MAPS = {
  spec: {
    orders: 'trades.new',
    processed: 'trades.processed',
    trades: (a) => `trades.account.${a}.updated`,
    positions: (a) => `positions.account.${a}.updated`,
    tradesSub: (a) => `trades.account.${a}.*`,
    positionsSub: (a) => `positions.account.${a}.*`,
  },
  verbatim: {
    orders: '/trades',
    processed: 'trades.processed',
    trades: (a) => `/accounts/${a}/trades`,
    positions: (a) => `/accounts/${a}/positions`,
    tradesSub: (a) => `/accounts/${a}/trades`,
    positionsSub: (a) => `/accounts/${a}/positions`,
  },
};

function subjects(name) {
  const m = SUBJECT_MAPS[name || 'spec'];
  if (!m) throw new Error(`unknown subject map ${name} (spec or verbatim)`);
  return m;
}

/** Wall clock in epoch milliseconds with sub-millisecond resolution. */
function now() {
  return performance.timeOrigin + performance.now();
}

/** A deterministic pseudo-random generator (mulberry32), so runs repeat. */
function rng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

/** Resolves when `pred()` holds, checking every `every` ms; rejects after `timeout` ms. */
async function until(what, pred, timeout = 15000, every = 5) {
  const deadline = Date.now() + timeout;
  for (;;) {
    if (await pred()) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms waiting for ${what}`);
    await sleep(every);
  }
}

// ------------------------------------------------------------------ Socket.IO

/**
 * A Socket.IO connection as TraderX's clients make it (socket.io-client 4.8,
 * default transports: polling, then upgrade to websocket). Resolves once
 * connected. Follows the System notices so that subscribe/unsubscribe can
 * wait for the hub's confirmation.
 */
function legacyConnect(url, { path = '/socket.io', name = 'sim' } = {}) {
  const socket = io(url, { path, reconnection: false, forceNew: true, timeout: 10000 });
  const waiters = [];
  socket.on('publish', (env) => {
    if (!env || env.from !== 'System' || !env.payload || typeof env.payload.message !== 'string') return;
    for (let i = waiters.length - 1; i >= 0; i--) {
      if (waiters[i].match(env)) {
        waiters[i].resolve();
        waiters.splice(i, 1);
      }
    }
  });
  const notice = (match, what) =>
    new Promise((resolve, reject) => {
      const w = { match, resolve };
      waiters.push(w);
      setTimeout(() => {
        const i = waiters.indexOf(w);
        if (i >= 0) {
          waiters.splice(i, 1);
          reject(new Error(`${name}: no ${what} within 15 s`));
        }
      }, 15000).unref();
    });
  const conn = {
    socket,
    /** Subscribes and waits for our own "New Joiner" notice. */
    async subscribe(topic) {
      const seen = notice((e) => e.topic === topic && e.payload.message === `New Joiner ${socket.id} to topic ${topic}`,
        `join notice for ${topic}`);
      socket.emit('subscribe', topic);
      await seen;
    },
    /**
     * Unsubscribes and waits for our own leave notice. The hub sends it to
     * the room before the socket leaves, and a socket's messages arrive in
     * order, so once it is here everything the room was sent before it has
     * arrived too, and nothing more will.
     */
    async unsubscribe(topic) {
      const seen = notice((e) => e.topic === topic && e.payload.message === `${socket.id} has left ${topic}`,
        `leave notice for ${topic}`);
      socket.emit('unsubscribe', topic);
      await seen;
    },
    /** A round trip: every event emitted before it has been handled by the hub. */
    async barrier() {
      const topic = `/sim/barrier/${name}/${Math.random().toString(36).slice(2)}`;
      await conn.subscribe(topic);
      await conn.unsubscribe(topic);
    },
    close() {
      socket.disconnect();
    },
  };
  return new Promise((resolve, reject) => {
    socket.once('connect', () => resolve(conn));
    socket.once('connect_error', (e) => reject(new Error(`${name}: cannot connect to ${url}${path}: ${e.message}`)));
  });
}

// ------------------------------------------------------------------ NATS

/**
 * A NATS connection: nats (TCP) for nats:// URLs; for ws:// and wss:// URLs
 * (a broker's WebSocket port, or the ingress path /nats-ws) nats.ws, the
 * browsers' client, over the `ws` package, as Node 20 has no WebSocket.
 */
async function natsConnect(url, name) {
  let lib = nats;
  if (/^wss?:\/\//.test(url)) {
    if (!globalThis.WebSocket) globalThis.WebSocket = require('ws');
    lib = require('nats.ws');
  }
  return lib.connect({ servers: url, name, maxReconnectAttempts: -1, reconnectTimeWait: 250 });
}

const enc = new TextEncoder();
const dec = new TextDecoder();

/** The five-field envelope the state 006 NATS publishers send. */
function envelope(type, from, topic, payload) {
  return enc.encode(JSON.stringify({ type, from, topic, date: Date.now(), payload }));
}

function parse(data) {
  try {
    return JSON.parse(dec.decode(data));
  } catch (_) {
    return null;
  }
}

// ------------------------------------------------------------------ admin endpoint

/** GET /metrics on the bridge's admin port: a metric summed over matching series. */
async function metric(adminUrl, name, labels = {}) {
  const res = await fetch(`${adminUrl.replace(/\/$/, '')}/metrics`);
  if (!res.ok) throw new Error(`GET ${adminUrl}/metrics: ${res.status}`);
  return metricValue(await res.text(), name, labels);
}

function metricValue(text, name, labels = {}) {
  let sum = 0;
  for (const line of text.split('\n')) {
    if (!line.startsWith(name) || line.startsWith('#')) continue;
    const rest = line.slice(name.length);
    let labelPart = '';
    let value;
    if (rest.startsWith('{')) {
      const end = rest.indexOf('}');
      labelPart = rest.slice(1, end);
      value = rest.slice(end + 1).trim();
    } else if (rest.startsWith(' ')) {
      value = rest.trim();
    } else continue;
    if (Object.entries(labels).every(([k, v]) => labelPart.includes(`${k}="${v}"`))) sum += Number(value) || 0;
  }
  return sum;
}

/**
 * Attach mode: declares whether the point-to-point route's consumers are on
 * trade-feed, then waits until the bridge has joined (or left) the queue
 * group accordingly (`tradefeed_bridge_queue_member`).
 */
async function declareLegacyConsumers(adminUrl, route, present) {
  const res = await fetch(`${adminUrl.replace(/\/$/, '')}/api/legacy-consumers/${route}`, {
    method: 'PUT',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(present),
  });
  if (!res.ok) throw new Error(`PUT legacy-consumers/${route}: ${res.status} ${await res.text()}`);
  await waitQueueMember(adminUrl, route, present);
}

/** Waits until the bridge is (or is no longer) a member of the route's queue group. */
async function waitQueueMember(adminUrl, route, member, timeout = 15000) {
  await until(`the bridge to ${member ? 'join' : 'leave'} the queue group of ${route}`,
    async () => (await metric(adminUrl, 'tradefeed_bridge_queue_member', { route })) === (member ? 1 : 0),
    timeout, 10);
}

// ------------------------------------------------------------------ control protocol

function out(obj) {
  obj.t = Date.now();
  process.stdout.write(JSON.stringify(obj) + '\n');
}

/**
 * Runs the JSON-lines control loop: one command per line on stdin, each
 * answered with {"ev":"ok","seq":N,...result} or {"ev":"error","seq":N,"message"}.
 * Commands run concurrently unless they return before the next one arrives;
 * `exit` (or the end of stdin) calls `shutdown` and exits.
 */
function serve(name, handlers, shutdown) {
  const rl = readline.createInterface({ input: process.stdin });
  let closing = false;
  const finish = async (seq) => {
    if (closing) return;
    closing = true;
    try {
      await shutdown();
    } catch (e) {
      process.stderr.write(`${name}: shutdown: ${e.message}\n`);
    }
    const bye = () => process.exit(0);
    if (seq !== undefined && seq !== null) {
      process.stdout.write(JSON.stringify({ ev: 'ok', seq, t: Date.now() }) + '\n', bye);
    } else bye();
  };
  rl.on('line', (line) => {
    if (!line.trim()) return;
    let c;
    try {
      c = JSON.parse(line);
    } catch (e) {
      out({ ev: 'error', seq: null, message: `bad JSON: ${e.message}` });
      return;
    }
    if (c.cmd === 'exit') return void finish(c.seq);
    const h = handlers[c.cmd];
    if (!h) return out({ ev: 'error', seq: c.seq, message: `unknown command ${c.cmd}` });
    Promise.resolve()
      .then(() => h(c))
      .then((r) => out({ ev: 'ok', seq: c.seq, ...(r || {}) }))
      .catch((e) => out({ ev: 'error', seq: c.seq, message: e.message }));
  });
  rl.on('close', () => finish(null));
}

/** Minimal `--key value` / `--flag` parser for the simulators' command lines. */
function parseArgs(argv, spec) {
  const opts = {};
  for (const [k, v] of Object.entries(spec)) opts[k] = v.default;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '-h' || a === '--help') {
      process.stdout.write(Object.entries(spec).map(([k, v]) => `  --${k}  ${v.help}`).join('\n') + '\n');
      process.exit(0);
    }
    const key = a.replace(/^--/, '');
    if (!a.startsWith('--') || !(key in spec)) throw new Error(`unknown argument ${a}`);
    if (spec[key].flag) opts[key] = true;
    else {
      if (i + 1 >= argv.length) throw new Error(`missing value for ${a}`);
      opts[key] = argv[++i];
    }
  }
  return opts;
}

module.exports = {
  ACCOUNTS,
  SECURITIES,
  QUEUE_GROUP,
  TOPICS,
  subjects,
  now,
  rng,
  sleep,
  until,
  legacyConnect,
  natsConnect,
  envelope,
  parse,
  enc,
  metric,
  metricValue,
  declareLegacyConsumers,
  waitQueueMember,
  out,
  serve,
  parseArgs,
  nats,
};
