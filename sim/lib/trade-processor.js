// The trade-processor side: consumes TradeOrders, books each one as a Trade,
// keeps positions per account and security, and publishes the Trade and the
// new Position aggregate for the order's account.
//
// - legacy consumer: subscribes /trades on the hub (as TraderX's Java
//   processor does, keeping only envelopes of type TradeOrder) and publishes
//   on /accounts/<id>/trades and /accounts/<id>/positions;
// - NATS consumer: joins the queue group `trade-processor` on trades.new and
//   publishes on trades.account.<id>.updated, positions.account.<id>.updated
//   and trades.processed.
//
// One simulator may run both consumers at once (a legacy and a NATS
// processor side by side during the processor's cutover). They share one
// book, as TraderX's processors share the position database. The book stamps
// each position's `updated` strictly increasing per account and security, so
// a screen can keep the newest aggregate when two processors' updates travel
// different paths and arrive out of order.
'use strict';

const crypto = require('crypto');
const c = require('./common');

class TradeProcessor {
  /**
   * opts: legacyUrl, legacyPath, natsUrl, subjectMap, queue, adminUrl,
   * mode ('server' | 'attach'), route (the point-to-point route's name).
   */
  constructor(opts) {
    this.o = {
      legacyPath: '/socket.io',
      subjectMap: 'spec',
      queue: c.QUEUE_GROUP,
      mode: 'server',
      route: 'trade-orders',
      ...opts,
    };
    this.s = c.subjects(this.o.subjectMap);
    this.legacy = null;
    this.nc = null;
    this.sub = null;
    this.book = {}; // account -> security -> {quantity, updated}
    this.booked = {}; // order id -> [[bus, t], ...] (one entry per booking)
    this.bookedBy = { legacy: 0, nats: 0 };
    this.duplicates = [];
    this.ignored = 0; // envelopes that are not a TradeOrder
    this.late = 0; // legacy orders that arrived after our own leave notice
    this.trades = {}; // account -> [trade id]
    this.published = { legacy: { trades: 0, positions: 0 }, nats: { trades: 0, positions: 0, processed: 0 } };
    this.switches = [];
    this.waiters = [];
  }

  get count() {
    return this.bookedBy.legacy + this.bookedBy.nats;
  }

  consumers() {
    return [this.legacy && 'legacy', this.sub && 'nats'].filter(Boolean);
  }

  /** Starts a consumer on `bus`; resolves once it receives orders. */
  async add(bus) {
    if (bus === 'legacy') {
      if (this.legacy) return;
      const conn = await c.legacyConnect(this.o.legacyUrl, { path: this.o.legacyPath, name: 'trade-processor' });
      conn.socket.on('publish', (env) => {
        if (!env || env.from === 'System' || env.topic !== c.TOPICS.orders) return;
        if (env.type !== 'TradeOrder') return void this.ignored++;
        if (this.legacy !== conn) this.late++; // arrived after our leave notice
        this.onOrder('legacy', env.payload, conn);
      });
      this.legacy = conn;
      await conn.subscribe(c.TOPICS.orders);
    } else {
      if (this.sub) return;
      if (!this.nc) this.nc = await c.natsConnect(this.o.natsUrl, 'trade-processor');
      const nc = this.nc;
      this.sub = nc.subscribe(this.s.orders, {
        queue: this.o.queue,
        callback: (err, m) => {
          if (err) return;
          const env = c.parse(m.data);
          if (!env || env.type !== 'TradeOrder') return void this.ignored++;
          this.onOrder('nats', env.payload, nc);
        },
      });
      await nc.flush();
    }
  }

  /**
   * Stops a consumer without losing an order it was given:
   * - legacy: unsubscribe /trades and wait for our own leave notice (every
   *   order the hub sent before it has then arrived, and no more will come),
   *   then disconnect;
   * - NATS: drain the queue subscription (the server stops sending, the
   *   messages already on their way are still handled), then drain the
   *   connection.
   */
  async remove(bus) {
    if (bus === 'legacy' && this.legacy) {
      const conn = this.legacy;
      await conn.unsubscribe(c.TOPICS.orders);
      this.legacy = null;
      // Our Trade and Position publishes must reach the hub before we go.
      await conn.barrier();
      conn.close();
    } else if (bus === 'nats' && this.sub) {
      const sub = this.sub;
      this.sub = null;
      await sub.drain();
      await sub.closed;
      const nc = this.nc;
      this.nc = null;
      await nc.drain();
    }
  }

  /**
   * The processor's move from one bus to the other while orders flow, in the
   * order that keeps every order booked exactly once: the new consumer
   * starts first (so the queue group never lacks a member), the bridge is
   * told or checked, then the old consumer drains.
   */
  async switchTo(from, to) {
    const t0 = c.now();
    const steps = {};
    const step = async (name, f) => {
      const t = c.now();
      await f();
      steps[name] = Math.round((c.now() - t) * 10) / 10;
    };
    const booked0 = { ...this.bookedBy };
    await step(`start_${to}`, () => this.add(to));
    if (this.o.adminUrl) {
      if (this.o.mode === 'attach') {
        // trade-feed cannot tell who is in a room: say where the consumers are.
        await step('declare', () => c.declareLegacyConsumers(this.o.adminUrl, this.o.route, to === 'legacy'));
      } else if (to === 'legacy') {
        // The bridge joins the queue group for its /trades room by itself.
        await step('bridge_joined', () => c.waitQueueMember(this.o.adminUrl, this.o.route, true));
      }
    }
    await step(`drain_${from}`, () => this.remove(from));
    const took = Math.round((c.now() - t0) * 10) / 10;
    const during = {
      legacy: this.bookedBy.legacy - booked0.legacy,
      nats: this.bookedBy.nats - booked0.nats,
    };
    const s = { from, to, at_booked: this.count, started_at: Math.round(t0), took_ms: took, steps, booked_during: during };
    this.switches.push(s);
    return s;
  }

  onOrder(bus, o, conn) {
    if (!o || typeof o.id !== 'string') return void this.ignored++;
    const t = Math.round(c.now() * 1000) / 1000;
    const seen = this.booked[o.id];
    if (seen) {
      seen.push([bus, t]);
      this.duplicates.push(o.id);
    } else this.booked[o.id] = [[bus, t]];
    this.bookedBy[bus]++;
    const account = Number(o.accountId !== undefined ? o.accountId : o.accountID);
    const qty = (o.side === 'Sell' ? -1 : 1) * Number(o.quantity);
    const acct = (this.book[account] = this.book[account] || {});
    const prev = acct[o.security] || { quantity: 0, updated: 0 };
    const updated = Math.max(Date.now(), prev.updated + 1);
    const position = { accountId: account, security: o.security, quantity: prev.quantity + qty, updated };
    acct[o.security] = { quantity: position.quantity, updated };
    const trade = {
      id: crypto.randomUUID(),
      accountId: account,
      security: o.security,
      side: o.side,
      state: 'Settled',
      quantity: Number(o.quantity),
      created: updated,
      updated,
    };
    (this.trades[account] = this.trades[account] || []).push(trade.id);
    if (bus === 'legacy') {
      const s = conn.socket;
      s.emit('publish', { topic: c.TOPICS.trades(account), type: 'Trade', payload: trade });
      s.emit('publish', { topic: c.TOPICS.positions(account), type: 'Position', payload: position });
      this.published.legacy.trades++;
      this.published.legacy.positions++;
    } else {
      const subj = this.s;
      conn.publish(subj.trades(account), c.envelope('Trade', 'trade-processor', subj.trades(account), trade));
      conn.publish(subj.positions(account),
        c.envelope('Position', 'trade-processor', subj.positions(account), position));
      conn.publish(subj.processed, c.envelope('Trade', 'trade-processor', subj.processed, trade));
      this.published.nats.trades++;
      this.published.nats.positions++;
      this.published.nats.processed++;
    }
    for (let i = this.waiters.length - 1; i >= 0; i--) {
      if (this.count >= this.waiters[i].n) {
        this.waiters[i].resolve();
        this.waiters.splice(i, 1);
      }
    }
  }

  /** Resolves once `n` orders are booked; rejects after `timeout` ms. */
  waitBooked(n, timeout = 60000) {
    if (this.count >= n) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const w = { n, resolve };
      this.waiters.push(w);
      setTimeout(() => {
        const i = this.waiters.indexOf(w);
        if (i >= 0) {
          this.waiters.splice(i, 1);
          reject(new Error(`booked ${this.count} of ${n} orders within ${timeout} ms`));
        }
      }, timeout).unref();
    });
  }

  /** Everything published so far has reached the hub / the NATS server. */
  async settle() {
    if (this.legacy) await this.legacy.barrier();
    if (this.nc) await this.nc.flush();
  }

  report() {
    return {
      role: 'trade-processor',
      consumers: this.consumers(),
      booked: this.count,
      booked_by_bus: this.bookedBy,
      orders: this.booked,
      duplicates: this.duplicates,
      ignored: this.ignored,
      late: this.late,
      positions: this.book,
      trades: this.trades,
      published: this.published,
      switches: this.switches,
    };
  }

  async close() {
    if (this.legacy) this.legacy.close();
    if (this.nc) await this.nc.drain().catch(() => {});
  }
}

module.exports = { TradeProcessor };
