// The browser side: one screen per account, each with its own connection,
// subscribed to that account's trades and positions (legacy topics, as the
// Angular UI does, or the NATS wildcards trades.account.<id>.* and
// positions.account.<id>.*). Each screen keeps a blotter: trades by id, and
// positions by security, updated in place (a Position is the new aggregate).
//
// A message is identified by its trade id, or for a Position by security and
// `updated` (the processor stamps `updated` strictly increasing per account
// and security). A second copy is a duplicate, except while the screen moves
// from one bus to the other, which it does without losing or doubling an
// update:
// 1. subscribe on the new bus (the old one stays);
// 2. keep both until each stream (trades, positions) has shown one message
//    on both buses: the two paths differ in delay (the bridge's path is the
//    slower one), and a message seen on both means the slower path has
//    caught up, so what is still in flight on the old path is also on the
//    new one. A stream with no message for `syncQuietMs` has nothing in
//    flight (bounded wait);
// 3. leave the old bus (legacy: unsubscribe and wait for the leave notices;
//    NATS: drain), then drop its connection.
// A copy of an update on the second bus is dropped, counted as
// `overlap_discarded`; the slower path may still bring such copies for a
// moment after the switch. A second copy on the same bus is a duplicate.
'use strict';

const c = require('./common');

class Screen {
  constructor(account, ui) {
    this.account = account;
    this.ui = ui;
    this.bus = null;
    this.conns = {}; // bus -> legacy conn | {nc, subs}
    this.trades = new Set();
    this.positions = {}; // security -> {quantity, updated}
    this.seen = new Set(); // message identities
    this.received = { legacy: 0, nats: 0 };
    this.duplicates = [];
    this.overlapDiscarded = 0;
    this.sinceSwitch = new Set(); // while switching: identities first seen on the new bus
    this.firstFrom = new Map(); // message identity -> bus it came on first
    this.crossed = new Set(); // identities also seen on the other bus
    this.synced = null; // while switching: stream -> how it caught up
    this.lastAt = { trades: 0, positions: 0 }; // last message time per stream
    this.stale = 0; // positions older than the row they would replace
    this.foreign = 0; // messages for another account, or not of the expected shape
  }

  async open(bus) {
    const a = this.account;
    if (bus === 'legacy') {
      const conn = await c.legacyConnect(this.ui.o.legacyUrl, { path: this.ui.o.legacyPath, name: `ui-${a}` });
      const topics = [c.TOPICS.trades(a), c.TOPICS.positions(a)];
      conn.socket.on('publish', (env) => {
        // as the browser: System notices dropped, only the subscribed topics
        if (!env || env.from === 'System' || !topics.includes(env.topic)) return;
        if (this.conns.legacy !== conn) return; // closed: no longer listening
        this.onMessage('legacy', env.type, env.payload);
      });
      this.conns.legacy = conn;
      for (const t of topics) await conn.subscribe(t);
    } else {
      const nc = await c.natsConnect(this.ui.o.natsUrl, `ui-${a}`);
      const s = this.ui.s;
      const entry = { nc, subs: [] };
      this.conns.nats = entry;
      for (const subject of [s.tradesSub(a), s.positionsSub(a)]) {
        entry.subs.push(nc.subscribe(subject, {
          callback: (err, m) => {
            if (err || this.conns.nats !== entry) return;
            const env = c.parse(m.data);
            if (!env) return void this.foreign++;
            this.onMessage('nats', env.type, env.payload);
          },
        }));
      }
      await nc.flush();
    }
  }

  async closeBus(bus) {
    const conn = this.conns[bus];
    if (!conn) return;
    if (bus === 'legacy') {
      // The leave notices come after everything the rooms were sent before.
      await conn.unsubscribe(c.TOPICS.trades(this.account));
      await conn.unsubscribe(c.TOPICS.positions(this.account));
      delete this.conns.legacy;
      conn.close();
    } else {
      for (const sub of conn.subs) await sub.drain();
      delete this.conns.nats;
      await conn.nc.drain();
    }
  }

  onMessage(bus, type, p) {
    this.received[bus]++;
    if (!p || Number(p.accountId) !== this.account) return void this.foreign++;
    let key;
    if (type === 'Trade' && typeof p.id === 'string') key = `T:${p.id}`;
    else if (type === 'Position' && typeof p.security === 'string') key = `P:${p.security}@${p.updated}`;
    else return void this.foreign++;
    const stream = type === 'Trade' ? 'trades' : 'positions';
    this.lastAt[stream] = Date.now();
    if (this.seen.has(key)) {
      // One copy on each bus is the switch's overlap (the slower path may
      // still bring copies of older updates for a moment after the old bus
      // is closed); a second copy on the same bus is a duplicate.
      if (this.firstFrom.get(key) !== bus && !this.crossed.has(key)) {
        this.crossed.add(key);
        this.overlapDiscarded++;
        // The paths meet: a copy on the new bus, or on the old bus a copy of
        // an update the new bus brought during this switch (not a late copy
        // left over from an earlier switch).
        if (this.synced && !this.synced[stream] && (bus === this.bus || this.sinceSwitch.has(key))) {
          this.synced[stream] = 'message';
        }
      } else this.duplicates.push(key);
      return;
    }
    this.seen.add(key);
    this.firstFrom.set(key, bus);
    if (this.synced && bus === this.bus) this.sinceSwitch.add(key);
    if (type === 'Trade') this.trades.add(p.id);
    else {
      const row = this.positions[p.security];
      if (row && row.updated > p.updated) this.stale++;
      else this.positions[p.security] = { quantity: p.quantity, updated: p.updated };
    }
    this.ui.changed();
  }

  async switchTo(to) {
    const from = this.bus;
    if (from === to) return null;
    this.synced = { trades: null, positions: null };
    this.sinceSwitch.clear();
    this.bus = to; // from here on, `to` is the new bus
    const t0 = Date.now();
    await this.open(to);
    const quiet = this.ui.o.syncQuietMs;
    await c.until('both buses to carry the same update', () => {
      for (const st of ['trades', 'positions']) {
        if (!this.synced[st] && Date.now() - Math.max(this.lastAt[st], t0) >= quiet) this.synced[st] = 'quiet';
      }
      return this.synced.trades && this.synced.positions;
    }, 30000, 2);
    const synced = this.synced;
    await this.closeBus(from);
    this.synced = null;
    this.sinceSwitch.clear();
    return synced;
  }

  report() {
    return {
      account: this.account,
      bus: this.bus,
      trades: [...this.trades],
      positions: this.positions,
      received: this.received,
      distinct: this.seen.size,
      duplicates: this.duplicates,
      overlap_discarded: this.overlapDiscarded,
      stale: this.stale,
      foreign: this.foreign,
    };
  }
}

class Ui {
  /** opts: legacyUrl, legacyPath, natsUrl, subjectMap, accounts (list). */
  constructor(opts) {
    this.o = { legacyPath: '/socket.io', subjectMap: 'spec', accounts: c.ACCOUNTS, syncQuietMs: 1000, ...opts };
    this.s = c.subjects(this.o.subjectMap);
    this.screens = this.o.accounts.map((a) => new Screen(Number(a), this));
    this.waiters = [];
    this.switches = [];
  }

  async start(bus) {
    await Promise.all(this.screens.map(async (s) => {
      await s.open(bus);
      s.bus = bus;
    }));
  }

  /** Every screen moves to `to` (each on its own, as browsers do) while updates flow. */
  async switchTo(to) {
    const t0 = c.now();
    const from = this.screens[0].bus;
    const discarded0 = this.screens.reduce((n, s) => n + s.overlapDiscarded, 0);
    const synced = {};
    await Promise.all(this.screens.map(async (s) => {
      synced[s.account] = await s.switchTo(to);
    }));
    const sw = {
      from,
      to,
      synced,
      started_at: Math.round(t0),
      took_ms: Math.round((c.now() - t0) * 10) / 10,
      overlap_discarded: this.screens.reduce((n, s) => n + s.overlapDiscarded, 0) - discarded0,
    };
    this.switches.push(sw);
    return sw;
  }

  changed() {
    for (let i = this.waiters.length - 1; i >= 0; i--) {
      if (this.waiters[i].done()) {
        this.waiters[i].resolve();
        this.waiters.splice(i, 1);
      }
    }
  }

  /**
   * Resolves when every screen shows `expect[account].trades` distinct trades
   * and `expect[account].positions` distinct position messages.
   */
  waitFor(expect, timeout = 60000) {
    const done = () => this.screens.every((s) => {
      const e = expect[s.account] || { trades: 0, positions: 0 };
      return s.trades.size >= e.trades && s.seen.size - s.trades.size >= e.positions;
    });
    if (done()) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const w = { done, resolve };
      this.waiters.push(w);
      setTimeout(() => {
        const i = this.waiters.indexOf(w);
        if (i >= 0) {
          this.waiters.splice(i, 1);
          const have = this.screens.map((s) => `${s.account}: ${s.trades.size} trades, ${s.seen.size - s.trades.size} positions`);
          reject(new Error(`screens incomplete after ${timeout} ms (${have.join('; ')}; expected ${JSON.stringify(expect)})`));
        }
      }, timeout).unref();
    });
  }

  report() {
    return { role: 'ui', screens: this.screens.map((s) => s.report()), switches: this.switches };
  }

  async close() {
    for (const s of this.screens) {
      if (s.conns.legacy) s.conns.legacy.close();
      if (s.conns.nats) await s.conns.nats.nc.drain().catch(() => {});
    }
  }
}

module.exports = { Ui };
