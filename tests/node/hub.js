#!/usr/bin/env node
// The legacy TraderX trade-feed hub (Socket.IO 4.8 server), written from
// /work/shared/PROTOCOL.md section 2. Used by the tests as "the legacy
// trade-feed" and by the benchmarks, so per-message work is kept minimal.
//
// Usage: node tests/node/hub.js [--port N] [--host H] [--path /socket.io]
//                               [--allow-eio3] [--quiet] [--exit-on-stdin-close]
//                               [--auth-file FILE]
// Environment (command line wins): TRADE_FEED_PORT, TRADE_FEED_HOST,
// TRADE_FEED_PATH, TRADE_FEED_ALLOW_EIO3=1.
// --port 0 picks a free port. Once listening, prints exactly one line
// {"ev":"listening","port":N} on stdout. Connections are logged to stderr
// unless --quiet; messages are never logged.
// --auth-file: a JSON file {"headers": {"x-api-key": "..."}, "token": "..."}
// read at every connection (so a test can change it while the hub runs): a
// client whose handshake lacks one of the headers, or whose CONNECT auth
// token differs, is refused with CONNECT_ERROR "unauthorized" (trade-feed
// itself has no authentication; deployments put it in front of it).
'use strict';

const http = require('http');
const { Server } = require('socket.io');

function parseArgs(argv) {
  const env = process.env;
  const opts = {
    port: env.TRADE_FEED_PORT !== undefined ? Number(env.TRADE_FEED_PORT) : 18086,
    host: env.TRADE_FEED_HOST || '127.0.0.1',
    path: env.TRADE_FEED_PATH || '/socket.io',
    allowEIO3: /^(1|true|yes)$/i.test(env.TRADE_FEED_ALLOW_EIO3 || ''),
    quiet: false,
    exitOnStdinClose: false,
    authFile: null,
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) usage(`missing value for ${a}`);
      return argv[++i];
    };
    switch (a) {
      case '--port': opts.port = Number(value()); break;
      case '--host': opts.host = value(); break;
      case '--path': opts.path = value(); break;
      case '--allow-eio3': opts.allowEIO3 = true; break;
      case '--quiet': opts.quiet = true; break;
      case '--exit-on-stdin-close': opts.exitOnStdinClose = true; break;
      case '--auth-file': opts.authFile = value(); break;
      case '-h': case '--help': usage(); break;
      default: usage(`unknown argument ${a}`);
    }
  }
  if (!Number.isInteger(opts.port) || opts.port < 0 || opts.port > 65535) {
    usage(`bad port ${opts.port}`);
  }
  return opts;
}

function usage(err) {
  if (err) process.stderr.write(`hub: ${err}\n`);
  process.stderr.write('usage: hub.js [--port N] [--host H] [--path /socket.io] ' +
    '[--allow-eio3] [--quiet] [--exit-on-stdin-close] [--auth-file FILE]\n');
  process.exit(err ? 2 : 0);
}

const opts = parseArgs(process.argv.slice(2));
const log = opts.quiet ? () => {} : (line) => process.stderr.write(`hub: ${line}\n`);

const httpServer = http.createServer();
const io = new Server(httpServer, {
  path: opts.path,
  cors: { origin: '*' },
  allowEIO3: opts.allowEIO3,
  // maxHttpBufferSize, ping interval/timeout: socket.io defaults, as legacy.
});

const CATCH_ALL = '/*';

if (opts.authFile) {
  const fs = require('fs');
  io.use((socket, next) => {
    let want;
    try {
      want = JSON.parse(fs.readFileSync(opts.authFile, 'utf8'));
    } catch (e) {
      return next(new Error(`auth file: ${e.message}`));
    }
    const headers = socket.handshake.headers;
    for (const [k, v] of Object.entries(want.headers || {})) {
      if (headers[k.toLowerCase()] !== v) return next(new Error('unauthorized'));
    }
    if (want.token !== undefined && (socket.handshake.auth || {}).token !== want.token) {
      return next(new Error('unauthorized'));
    }
    next();
  });
}

// One emit to the union of both rooms: a socket in both gets one copy.
function broadcast(topic, type, from, payload) {
  io.to([topic, CATCH_ALL]).emit('publish', {
    type,
    from,
    topic,
    date: Date.now(),
    payload,
  });
}

io.on('connection', (socket) => {
  log(`connect ${socket.id} (${socket.conn.transport.name})`);

  socket.on('subscribe', (topic) => {
    socket.join(topic);
    broadcast(topic, 'message', 'System', { message: `New Joiner ${socket.id} to topic ${topic}` });
  });

  const unsubscribe = (topic) => {
    broadcast(topic, 'message', 'System', { message: `${socket.id} has left ${topic}` });
    socket.leave(topic);
  };
  socket.on('unsubscribe', unsubscribe);
  socket.on('unusbscribe', unsubscribe); // legacy misspelling, still sent by old clients

  socket.on('publish', (msg) => {
    if (msg === null || typeof msg !== 'object') return;
    broadcast(msg.topic, msg.type ?? 'message', socket.id, msg.payload);
  });

  socket.on('disconnect', (reason) => log(`disconnect ${socket.id} (${reason})`));
});

httpServer.on('error', (err) => {
  process.stderr.write(`hub: ${err.message}\n`);
  process.exit(1);
});

httpServer.listen(opts.port, opts.host, () => {
  process.stdout.write(JSON.stringify({ ev: 'listening', port: httpServer.address().port }) + '\n');
});

function shutdown() {
  io.close();
  process.exit(0);
}
process.on('SIGINT', shutdown);
process.on('SIGTERM', shutdown);
if (opts.exitOnStdinClose) {
  process.stdin.on('end', shutdown);
  process.stdin.on('error', shutdown);
  process.stdin.resume();
}
