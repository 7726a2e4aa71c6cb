#!/usr/bin/env node
// trade-processor simulator: books TradeOrders from the legacy /trades room
// and/or the NATS queue group trade-processor, keeps positions, publishes
// Trade and Position. Controlled by JSON lines on stdin (see sim/README.md).
'use strict';

const { options, bus, main } = require('./lib/cli');
const { TradeProcessor } = require('./lib/trade-processor');

const { o, base } = options({
  queue: { default: 'trade-processor', help: 'NATS queue group' },
  'admin-url': { help: "the bridge's admin URL, for the switch procedure (e.g. http://127.0.0.1:18097)" },
  mode: { default: 'server', help: "the bridge's mode: server or attach" },
  route: { default: 'trade-orders', help: 'name of the point-to-point route' },
});
const sim = new TradeProcessor({ ...base, queue: o.queue, adminUrl: o['admin-url'], mode: o.mode, route: o.route });
main('trade-processor', sim, o, (b) => sim.add(b), {
  add: (cmd) => sim.add(bus(cmd.bus)),
  remove: (cmd) => sim.remove(bus(cmd.bus)),
  switch: (cmd) => sim.switchTo(bus(cmd.from), bus(cmd.to)),
  wait: (cmd) => sim.waitBooked(cmd.booked, cmd.timeout_ms),
  settle: () => sim.settle(),
});
