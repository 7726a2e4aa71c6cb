#!/usr/bin/env node
// One short cutover flow through a running bridge, with the three role
// simulators in this process, then the end-of-run checks (lib/verify.js).
// Prints a one-screen summary; exits 0 when every check holds, 1 on any
// mismatch, 2 on bad arguments or an unreachable stage.
// scripts/smoke.sh starts what is needed and calls this; see its --help.
'use strict';

const c = require('./lib/common');
const { TradeService } = require('./lib/trade-service');
const { TradeProcessor } = require('./lib/trade-processor');
const { Ui } = require('./lib/ui');
const { verify, percentile } = require('./lib/verify');

const spec = {
  stage: { default: '', help: 'stage name, for the summary' },
  mode: { default: 'server', help: "the bridge's mode: server or attach" },
  service: { default: 'legacy', help: 'trade-service bus: legacy or nats' },
  processor: { default: 'legacy', help: 'trade-processor bus: legacy or nats' },
  ui: { default: 'legacy', help: 'UI bus: legacy or nats' },
  orders: { default: '200', help: 'orders to publish' },
  rate: { default: '200', help: 'orders per second' },
  'legacy-url': { help: 'Socket.IO URL legacy clients use (server mode: the bridge; attach mode: trade-feed)' },
  'legacy-path': { default: '/socket.io', help: 'Socket.IO path' },
  'nats-url': { help: 'NATS URL' },
  'ui-nats-url': { help: "the UI screens' NATS URL (default --nats-url), e.g. ws://ingress/nats-ws as browsers use" },
  'admin-url': { help: "the bridge's admin URL" },
  subjects: { default: 'spec', help: 'subject map: spec or verbatim' },
  accounts: { default: c.ACCOUNTS.join(','), help: 'accounts the orders are for, comma separated (one screen each)' },
  'skip-counters': { flag: true, help: "do not compare the bridge's counters (a bridge carrying other traffic)" },
  timeout: { default: '30', help: 'seconds to wait for the flow to complete' },
};

function fail(msg) {
  process.stderr.write(`smoke: ${msg}\n`);
  process.exit(2);
}

async function main() {
  let o;
  try {
    o = c.parseArgs(process.argv.slice(2), spec);
  } catch (e) {
    fail(e.message);
  }
  for (const k of ['service', 'processor', 'ui']) {
    if (o[k] !== 'legacy' && o[k] !== 'nats') fail(`--${k} must be legacy or nats`);
  }
  if (o.mode !== 'server' && o.mode !== 'attach') fail('--mode must be server or attach');
  const orders = Number(o.orders);
  if (!Number.isInteger(orders) || orders < 1) fail('--orders must be a positive integer');
  for (const k of ['legacy-url', 'nats-url', 'admin-url']) if (!o[k]) fail(`--${k} is required`);
  const accounts = String(o.accounts).split(',').map((a) => a.trim());
  if (!accounts.length || accounts.some((a) => !/^[0-9]{1,15}$/.test(a))) {
    fail('--accounts must be account ids (digits), comma separated');
  }
  const timeout = Number(o.timeout) * 1000;
  const base = { legacyUrl: o['legacy-url'], legacyPath: o['legacy-path'], natsUrl: o['nats-url'], subjectMap: o.subjects };
  const admin = o['admin-url'];
  const route = 'trade-orders';

  const metrics = async () => {
    const res = await fetch(`${admin.replace(/\/$/, '')}/metrics`);
    if (!res.ok) throw new Error(`GET ${admin}/metrics: ${res.status}`);
    return res.text();
  };
  let before;
  try {
    before = await metrics();
  } catch (e) {
    fail(`cannot read the bridge's metrics at ${admin}: ${e.message}`);
  }
  const runId = `SMOKE-${Date.now().toString(36)}`;
  const ui = new Ui({ ...base, natsUrl: o['ui-nats-url'] || base.natsUrl, accounts: accounts.map(Number) });
  const p = new TradeProcessor({ ...base, adminUrl: admin, mode: o.mode });
  const s = new TradeService({ ...base, runId, accounts: accounts.map(Number) });
  const t0 = Date.now();
  let problems = [];
  let facts = {};
  try {
    await ui.start(o.ui);
    await p.add(o.processor);
    const legacyProcessor = o.processor === 'legacy';
    if (o.mode === 'server') {
      // The bridge joins the queue group for its /trades room by itself.
      if (legacyProcessor) {
        try {
          await c.waitQueueMember(admin, route, true);
        } catch (e) {
          throw new Error(`${e.message}: is ${route} declared without legacy consumers? ` +
            `(PUT ${admin}/api/legacy-consumers/${route} with true)`);
        }
      }
    } else {
      const member = c.metricValue(await metrics(), 'tradefeed_bridge_queue_member', { route }) === 1;
      if (member !== legacyProcessor) {
        throw new Error(`the bridge is declared with legacy consumers ${member ? 'present' : 'absent'} for ${route}, ` +
          `but this stage runs the processor on ${o.processor}: declare it first (attach.legacy_consumers or ` +
          `PUT ${admin}/api/legacy-consumers/${route} with ${legacyProcessor})`);
      }
    }
    await s.start(o.service);
    await s.run({ count: orders, rate: Number(o.rate) });
    try {
      await p.waitBooked(orders, timeout);
    } catch (e) {
      problems.push(e.message);
    }
    await p.settle();
    const pr = p.report();
    const expect = {};
    for (const [a, ids] of Object.entries(pr.trades)) expect[a] = { trades: ids.length, positions: ids.length };
    try {
      await ui.waitFor(expect, timeout);
    } catch (e) {
      problems.push(e.message);
    }
    await c.sleep(300); // quiet period: a late double shows here
    const reports = { services: [s.report()], p: p.report(), ui: ui.report() };
    const check = async () => verify({
      ...reports, before, after: await metrics(), mode: o.mode, counters: !o['skip-counters'],
    });
    // The bridge may still be counting what it carried where no simulator
    // waits (legacy updates on their way to NATS with no NATS screen): its
    // counters must reach what the simulators saw within the timeout, then
    // stay there for a quiet period.
    const deadline = Date.now() + timeout;
    const onlyCounters = (r) => r.problems.length && r.problems.every((m) => m.startsWith('bridge counter'));
    let r = await check();
    while (onlyCounters(r) && Date.now() < deadline) {
      await c.sleep(50);
      r = await check();
    }
    if (!r.problems.length) {
      await c.sleep(300);
      r = await check();
    }
    problems = problems.concat(r.problems);
    facts = r.facts;
  } catch (e) {
    problems.push(e.message);
  } finally {
    await Promise.allSettled([s.close(), p.close(), ui.close()]);
  }

  const took = ((Date.now() - t0) / 1000).toFixed(1);
  const lines = [];
  lines.push(`smoke ${o.stage ? `stage ${o.stage}, ` : ''}${o.mode} mode: trade-service=${o.service} ` +
    `trade-processor=${o.processor} ui=${o.ui}, ${orders} orders at ${o.rate}/s, ${took} s`);
  if (facts.sent !== undefined) {
    lines.push(`  orders    sent ${facts.sent}, booked ${facts.booked} (legacy ${p.bookedBy.legacy}, nats ${p.bookedBy.nats}), ` +
      `lost ${facts.lost}, doubled ${facts.doubled}, no consumer ${facts.unconsumed}`);
    lines.push(`  latency   publish to booked: p50 ${percentile(facts.latency, 0.5).toFixed(1)} ms, ` +
      `p99 ${percentile(facts.latency, 0.99).toFixed(1)} ms, max ${percentile(facts.latency, 1).toFixed(1)} ms`);
    lines.push(`  screens   ${facts.screens} accounts, duplicates ${facts.duplicates}, stale ${facts.stale}`);
    for (const [what, got, want] of facts.counters) {
      lines.push(`  counter   ${what.padEnd(32)} ${String(got).padStart(6)}  (simulators: ${want})${got === want ? '' : '  MISMATCH'}`);
    }
  }
  for (const m of problems.slice(0, 12)) lines.push(`  FAIL      ${m}`);
  if (problems.length > 12) lines.push(`  ... and ${problems.length - 12} more`);
  lines.push(problems.length ? `RESULT: FAIL (${problems.length} mismatch(es))` : 'RESULT: PASS');
  process.stdout.write(lines.join('\n') + '\n', () => process.exit(problems.length ? 1 : 0));
}

main().catch((e) => fail(e.stack || e.message));
