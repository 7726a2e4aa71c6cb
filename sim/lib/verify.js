// The end-of-run checks of a cutover stage, from the simulators' reports and
// the bridge's counters (the same checks tests/cutover.rs makes):
// every order booked exactly once; every screen equal to the processor's
// book; no message seen twice; the bridge's counters equal to what the
// simulators saw.
'use strict';

const { metricValue } = require('./common');

const R_ORDERS = 'trade-orders';
const R_TRADES = 'account-trades';
const R_POSITIONS = 'account-positions';

/**
 * services: trade-service reports; p: the processor's report; ui: the UI's
 * report; before/after: /metrics text at the start and the end (counters
 * are compared as differences, so a bridge that ran before is fine);
 * mode: 'server' | 'attach'; singlePath: one processor on one bus and no move (position
 * updates must then arrive in order).
 * Returns {problems: [...], facts: {...}} for the summary.
 */
function verify({ services, p, ui, before, after, mode, singlePath = true, counters = true }) {
  const bad = [];
  const facts = { sent: 0, booked: p.booked, lost: 0, doubled: 0, unconsumed: 0, latency: [] };
  const sentBy = new Map();
  for (const s of services) {
    facts.sent += s.sent;
    facts.unconsumed += Object.keys(s.unconsumed).length;
    for (const [id, v] of Object.entries(s.orders)) sentBy.set(id, v);
  }
  if (facts.unconsumed) {
    bad.push(`the NATS server found no consumer for ${facts.unconsumed} orders`);
  }
  const lost = [];
  const doubled = [];
  for (const [id, [, t]] of sentBy) {
    const b = p.orders[id];
    if (!b) lost.push(id);
    else if (b.length !== 1) doubled.push(`${id} x${b.length}`);
    else facts.latency.push(b[0][1] - t);
  }
  facts.lost = lost.length;
  facts.doubled = doubled.length;
  if (lost.length) bad.push(`${lost.length} orders never booked: ${lost.slice(0, 10).join(', ')}`);
  if (doubled.length) bad.push(`${doubled.length} orders booked more than once: ${doubled.slice(0, 10).join(', ')}`);
  const unknown = Object.keys(p.orders).filter((id) => !sentBy.has(id));
  if (unknown.length) bad.push(`${unknown.length} booked orders nobody sent: ${unknown.slice(0, 10).join(', ')}`);
  if (p.ignored) bad.push(`the processor got ${p.ignored} envelopes that are not TradeOrders`);
  if (p.late) bad.push(`the processor got ${p.late} orders after its own leave notice`);

  facts.screens = 0;
  facts.stale = 0;
  facts.duplicates = 0;
  for (const sc of ui.screens) {
    facts.screens++;
    const a = String(sc.account);
    const book = p.positions[a] || {};
    const shown = sc.positions;
    const keys = new Set([...Object.keys(book), ...Object.keys(shown)]);
    for (const k of keys) {
      const want = book[k];
      const got = shown[k];
      if (!want || !got || want.quantity !== got.quantity || want.updated !== got.updated) {
        bad.push(`account ${a} ${k}: blotter ${JSON.stringify(got)} != book ${JSON.stringify(want)}`);
      }
    }
    const want = new Set(p.trades[a] || []);
    const got = new Set(sc.trades);
    const missing = [...want].filter((x) => !got.has(x)).length;
    const extra = [...got].filter((x) => !want.has(x)).length;
    if (missing || extra) {
      bad.push(`account ${a}: ${got.size} trades on screen, ${want.size} booked (${missing} missing, ${extra} unknown)`);
    }
    if (sc.duplicates.length) bad.push(`account ${a}: ${sc.duplicates.length} messages seen twice`);
    if (sc.foreign) bad.push(`account ${a}: ${sc.foreign} messages for another account or of another shape`);
    facts.duplicates += sc.duplicates.length;
    facts.stale += sc.stale;
  }
  if (singlePath && facts.stale) bad.push(`${facts.stale} position updates arrived out of order on a single path`);

  facts.counters = [];
  if (counters) {
    const d = (name, labels) => metricValue(after, name, labels) - metricValue(before, name, labels);
    const fwd = (route, direction) => d('tradefeed_bridge_messages_forwarded_total', { route, direction });
    let l2n = 0;
    let n2l = 0;
    let l2l = 0;
    let fromLegacy = 0;
    for (const [id, [bus]] of sentBy) {
      const b = p.orders[id];
      if (!b) continue;
      const by = b[0][0];
      if (bus === 'legacy') fromLegacy++;
      if (bus === 'legacy' && by === 'nats') l2n++;
      if (bus === 'nats' && by === 'legacy') n2l++;
      if (bus === 'legacy' && by === 'legacy') l2l++;
    }
    const expect = [];
    if (mode === 'server') {
      expect.push([`${R_ORDERS} to_nats`, fwd(R_ORDERS, 'to_nats'), fromLegacy]);
      expect.push([`${R_ORDERS} to_socketio`, fwd(R_ORDERS, 'to_socketio'), l2l + n2l]);
    } else {
      expect.push([`${R_ORDERS} to_nats`, fwd(R_ORDERS, 'to_nats'), l2n]);
      expect.push([`${R_ORDERS} to_socketio`, fwd(R_ORDERS, 'to_socketio'), n2l]);
      expect.push(['orders consumed on trade-feed',
        d('tradefeed_bridge_messages_suppressed_total', { route: R_ORDERS, reason: 'consumed_on_trade_feed' }), l2l]);
    }
    for (const [route, key] of [[R_TRADES, 'trades'], [R_POSITIONS, 'positions']]) {
      expect.push([`${route} to_nats`, fwd(route, 'to_nats'), p.published.legacy[key]]);
      expect.push([`${route} to_socketio`, fwd(route, 'to_socketio'), p.published.nats[key]]);
    }
    if (mode === 'attach') {
      const toLegacy = [R_ORDERS, R_TRADES, R_POSITIONS].reduce((n, r) => n + fwd(r, 'to_socketio'), 0);
      const echoes = d('tradefeed_bridge_messages_suppressed_total', { direction: 'to_nats', reason: 'own_echo' }) +
        d('tradefeed_bridge_messages_suppressed_total', { direction: 'to_nats', reason: 'own_echo_id' });
      expect.push(['own echoes suppressed', echoes, toLegacy]);
    }
    expect.push(['dropped (any reason)', d('tradefeed_bridge_messages_dropped_total', {}), 0]);
    expect.push(['rejected (any reason)', d('tradefeed_bridge_messages_rejected_total', {}), 0]);
    for (const [what, got, want] of expect) {
      facts.counters.push([what, got, want]);
      if (got !== want) bad.push(`bridge counter ${what} = ${got}, the simulators saw ${want}`);
    }
  }
  return { problems: bad, facts };
}

function percentile(values, q) {
  if (!values.length) return 0;
  const v = [...values].sort((a, b) => a - b);
  return v[Math.round((v.length - 1) * q)];
}

module.exports = { verify, percentile };
