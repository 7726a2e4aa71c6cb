#!/usr/bin/env node
// UI simulator: one screen per account, subscribed to its trades and
// positions (legacy topics or NATS wildcards), each keeping a blotter.
// Controlled by JSON lines on stdin (see sim/README.md).
'use strict';

const { options, bus, main } = require('./lib/cli');
const { Ui } = require('./lib/ui');
const { ACCOUNTS } = require('./lib/common');

const { o, base } = options({
  accounts: { default: ACCOUNTS.join(','), help: 'accounts on screen, comma separated' },
});
const sim = new Ui({ ...base, accounts: o.accounts.split(',').map(Number) });
main('ui', sim, o, (b) => sim.start(b), {
  start: (cmd) => sim.start(bus(cmd.bus)),
  switch: (cmd) => sim.switchTo(bus(cmd.to)),
  wait: (cmd) => sim.waitFor(cmd.expect, cmd.timeout_ms),
});
