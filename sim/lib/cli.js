// Command line and control loop shared by the three simulator programs.
'use strict';

const c = require('./common');

const COMMON = {
  'legacy-url': { help: 'Socket.IO URL of trade-feed or the bridge (e.g. http://127.0.0.1:18086)' },
  'legacy-path': { default: '/socket.io', help: 'Socket.IO path' },
  'nats-url': { help: 'NATS URL (e.g. nats://127.0.0.1:4222)' },
  subjects: { default: 'spec', help: 'subject map: spec (trades.new, ...) or verbatim (/trades, ...)' },
  bus: { help: 'legacy or nats: start on this bus at once and print {"ev":"ready"}' },
};

function options(extra) {
  const spec = { ...COMMON, ...extra };
  const o = c.parseArgs(process.argv.slice(2), spec);
  return {
    o,
    base: { legacyUrl: o['legacy-url'], legacyPath: o['legacy-path'], natsUrl: o['nats-url'], subjectMap: o.subjects },
  };
}

function bus(b) {
  if (b !== 'legacy' && b !== 'nats') throw new Error(`bus must be legacy or nats, not ${b}`);
  return b;
}

/** Runs a simulator: `start(bus)` when --bus is given, then the control loop. */
async function main(name, sim, o, start, handlers) {
  try {
    if (o.bus) {
      await start(bus(o.bus));
      c.out({ ev: 'ready', bus: o.bus });
    }
  } catch (e) {
    process.stderr.write(`${name}: ${e.message}\n`);
    process.exit(1);
  }
  c.serve(name, { ...handlers, report: () => ({ report: sim.report() }) }, () => sim.close());
}

module.exports = { options, bus, main };
