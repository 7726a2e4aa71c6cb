#!/usr/bin/env node
// Socket.IO test agent (socket.io-client 4.8), protocol in tests/agents/README.md:
// JSON commands on stdin, JSON events on stdout, one object per line.
'use strict';

const readline = require('readline');
const { io } = require('socket.io-client');

let socket = null;

function out(obj) {
  obj.t = Date.now();
  process.stdout.write(JSON.stringify(obj) + '\n');
}
const diag = (line) => process.stderr.write(`sio-agent: ${line}\n`);

function closeSocket() {
  if (socket) {
    socket.disconnect(); // no reconnect after an explicit disconnect
    socket = null;
  }
}

function doConnect(c) {
  if (typeof c.url !== 'string') throw new Error('connect: url is required');
  closeSocket();
  const namespace = c.namespace || '/';
  const url = namespace === '/' ? c.url : c.url.replace(/\/+$/, '') + namespace;
  const opts = {
    path: c.path || '/socket.io',
    reconnection: c.reconnection !== false,
    forceNew: true,
  };
  if (Array.isArray(c.transports)) opts.transports = c.transports;
  if (c.headers && typeof c.headers === 'object') opts.extraHeaders = c.headers;
  const topics = Array.isArray(c.subscribeOnConnect) ? c.subscribeOnConnect : [];

  const s = io(url, opts);
  socket = s;
  // A new Engine.IO socket is created on every (re)connect: hook each one.
  s.io.on('open', () => {
    s.io.engine.on('upgrade', (transport) => out({ ev: 'upgraded', transport: transport.name }));
  });
  s.on('connect', () => {
    out({ ev: 'connected', id: s.id, transport: s.io.engine.transport.name });
    for (const topic of topics) s.emit('subscribe', topic);
  });
  s.on('connect_error', (err) => out({ ev: 'connect_error', message: String(err && err.message || err) }));
  s.on('disconnect', (reason) => out({ ev: 'disconnected', reason: String(reason) }));
  s.onAny((event, ...args) => out({ ev: 'event', event, args }));
}

function doEmit(c) {
  if (!socket) throw new Error('emit: not connected (no connect command yet)');
  if (typeof c.event !== 'string') throw new Error('emit: event is required');
  const args = Array.isArray(c.args) ? c.args.slice() : [];
  if (c.ack) {
    const seq = c.seq;
    args.push((...ackArgs) => out({ ev: 'ack', seq, args: ackArgs }));
  }
  socket.emit(c.event, ...args);
}

// "iterate": count fresh connections, `concurrency` at a time. Each emits
// subscribe(topic) and publish({topic, type, payload: {...payload, i}}) right
// after io() (socket.io-client sends them the instant CONNECT is answered),
// waits for its join notice, its ack (when asked) and its own publish coming
// back through the room (when echo), then disconnects and reports one
// "iteration" event. Ends with an "iterated" event.
function doIterate(c) {
  if (typeof c.url !== 'string' || typeof c.topic !== 'string') throw new Error('iterate: url and topic are required');
  const count = c.count | 0;
  const concurrency = Math.max(1, c.concurrency | 0 || 1);
  const base = c.payload && typeof c.payload === 'object' ? c.payload : {};
  const type = c.type || 'TradeOrder';
  const echo = c.echo !== false;
  const timeoutMs = c.timeoutMs || 15000;
  const wantAck = (i) => c.ack === true || (c.ack === 'alternate' && i % 2 === 0);
  const opts = { path: c.path || '/socket.io', reconnection: false, forceNew: true };
  if (Array.isArray(c.transports)) opts.transports = c.transports;
  let next = 0;
  let running = 0;
  let done = 0;
  let failed = 0;
  const mine = (env, i) => env && env.from !== 'System' && env.payload && env.payload.i === i &&
    Object.keys(base).every((k) => env.payload[k] === base[k]);
  function start(i, retried) {
    running++;
    const t0 = Date.now();
    const rec = retried || { ev: 'iteration', i };
    const ack = wantAck(i);
    let joined = false;
    let acked = !ack;
    let echoed = !echo;
    let finished = false;
    let timer = null;
    const s = io(c.url, opts);
    const finish = (err) => {
      if (finished) return;
      finished = true;
      clearTimeout(timer);
      if (err) { rec.error = err; failed++; }
      rec.ms = Date.now() - t0;
      s.disconnect();
      out(rec);
      running--;
      done++;
      launch();
    };
    const check = () => { if (joined && acked && echoed) finish(null); };
    s.on('connect', () => {
      rec.id = s.id;
      rec.connectMs = Date.now() - t0;
      rec.transport = s.io.engine.transport.name;
    });
    s.on('connect_error', (err) => {
      // A transport that failed below HTTP before the Engine.IO handshake
      // (status 0: a reused keep-alive connection reset, for example) never
      // reached the server, and the emits are still buffered: a new
      // connection is tried, at most twice, and the retry is reported.
      // An HTTP error status from the server is a failure.
      const status = err && err.description;
      if (!rec.id && !(typeof status === 'number' && status > 0) && (rec.retries || 0) < 2) {
        rec.retries = (rec.retries || 0) + 1;
        rec.retryReason = `${err && err.message || err} (${status && status.code || status})`;
        finished = true;
        clearTimeout(timer);
        s.off();
        s.disconnect();
        running--;
        start(i, rec);
        return;
      }
      const detail = typeof status === 'number' ? `, HTTP ${status}` : '';
      finish(`connect_error: ${err && err.message || err}${detail}`);
    });
    s.on('disconnect', (reason) => finish(`disconnected: ${reason}`));
    s.on('publish', (env) => {
      if (env && env.from === 'System' && env.payload && s.id &&
          env.payload.message === `New Joiner ${s.id} to topic ${c.topic}`) {
        joined = true;
      } else if (mine(env, i)) {
        rec.echo = env;
        echoed = true;
      }
      check();
    });
    s.emit('subscribe', c.topic);
    const msg = { topic: c.topic, type, payload: Object.assign({}, base, { i }) };
    if (ack) {
      s.emit('publish', msg, (...args) => {
        rec.ack = args;
        rec.ackMs = Date.now() - t0;
        acked = true;
        check();
      });
    } else {
      s.emit('publish', msg);
    }
    timer = setTimeout(() => finish('timeout waiting for ' +
      [!joined && 'join notice', !acked && 'ack', !echoed && 'echo'].filter(Boolean).join(', ')), timeoutMs);
  }
  function launch() {
    while (running < concurrency && next < count) start(next++);
    if (done === count && running === 0) out({ ev: 'iterated', count, failed });
  }
  launch();
}

function handle(line) {
  if (!line.trim()) return;
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
      case 'connect': doConnect(c); break;
      case 'emit': doEmit(c); break;
      case 'iterate': doIterate(c); break;
      case 'disconnect': closeSocket(); break;
      case 'exit': exit(seq); return;
      default: throw new Error(`unknown command ${JSON.stringify(c.cmd)}`);
    }
    out({ ev: 'ok', seq });
  } catch (e) {
    out({ ev: 'error', seq, message: e.message });
  }
}

let exiting = false;
function exit(seq) {
  if (exiting) return;
  exiting = true;
  closeSocket();
  const line = JSON.stringify({ ev: 'ok', seq, t: Date.now() }) + '\n';
  process.stdout.write(line, () => process.exit(0));
}

process.stdout.on('error', () => process.exit(0)); // reader went away
const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
rl.on('line', handle);
rl.on('close', () => {
  if (exiting) return;
  exiting = true;
  closeSocket();
  diag('stdin closed, exiting');
  process.exit(0);
});
