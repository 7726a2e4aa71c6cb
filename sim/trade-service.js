#!/usr/bin/env node
// trade-service simulator: publishes TradeOrders on the legacy hub (/trades)
// or on NATS (trades.new). Controlled by JSON lines on stdin (see
// sim/README.md); prints its report as JSON on `report`.
'use strict';

const { options, bus, main } = require('./lib/cli');
const { TradeService } = require('./lib/trade-service');

const { o, base } = options({
  'run-id': { default: 'T', help: 'prefix of the order ids' },
  seed: { default: '1', help: 'seed of the order generator' },
  'retry-unconsumed': { flag: true, help: 'NATS: publish again an order the server reports no consumer for' },
});
const sim = new TradeService({ ...base, runId: o['run-id'], seed: Number(o.seed), retryUnconsumed: o['retry-unconsumed'] });
main('trade-service', sim, o, (b) => sim.start(b), {
  start: (cmd) => sim.start(bus(cmd.bus)),
  run: (cmd) => sim.run({ count: cmd.count, rate: cmd.rate, switchAt: cmd.switch_at || [] }),
  switch: (cmd) => sim.switchTo(bus(cmd.to)),
  stop: () => sim.stop(),
  settle: () => sim.settle(),
});
